"""Nostr relay connections (NIP-01) over asyncio and `websockets`.

pynostr's own transport is unfit for a long-running worker (see FACTS.md), so this module keeps
its own: a publish waits for the relay's OK and reports its reason; connections come back with
exponential backoff and re-send their subscriptions; events are verified, and an event seen on
several relays is delivered once.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog
import websockets

from dvm_core.protocol.events import InvalidEvent, verify_event

log = structlog.get_logger("dvm.relay")

# The longest wait between two tries to reach a relay, before the jitter (×0.5 to ×1.5): a relay
# back after a restart, however long it was down, is connected again within 5 s.
MAX_RECONNECT_WAIT = 3.0
STILL_DOWN_LOG_SECONDS = 60.0   # a relay that stays down is logged once a minute, not at each try

EventHandler = Callable[[dict, str], Awaitable[None] | None]
FilterFactory = Callable[[], list[dict]]


@dataclass(frozen=True)
class PublishResult:
    relay: str
    ok: bool
    message: str = ""

    @property
    def prefix(self) -> str:
        """NIP-01's machine-readable prefix of the message ("invalid", "duplicate", "blocked",
        "rate-limited", "pow", "restricted", "error"), or "" when there is none."""
        head, colon, _ = self.message.partition(":")
        return head.strip() if colon and head.strip().replace("-", "").isalpha() else ""

    @property
    def refused_for_good(self) -> bool:
        """The relay will never take this event (sending it again cannot help)."""
        return not self.ok and self.prefix in ("invalid", "blocked", "pow", "restricted")


class RelayConnection:
    """One relay: a connection kept open, subscriptions kept alive, publishes acknowledged.

    `filters` of a subscription are a factory called at every (re)subscription, so a worker can
    move its `since` forward and not replay its whole history after each reconnect.
    """

    def __init__(
        self, url: str, on_event: Callable[[dict, str, str], None], *,
        min_backoff: float = 0.25, max_backoff: float = MAX_RECONNECT_WAIT, max_message_bytes: int = 2**22,
    ):
        self.url = url
        self._on_event = on_event
        self._subs: dict[str, FilterFactory] = {}
        self._pending: OrderedDict[str, tuple[str, asyncio.Future]] = OrderedDict()
        self._sent_on: dict[str, int] = {}  # event id -> connection generation it was sent on
        self._ws = None
        self._generation = 0
        self._connected = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._max_message_bytes = max_message_bytes
        self._closing = False
        self.last_error = ""   # why the last try to connect failed or the connection dropped
        self.eose: dict[str, asyncio.Event] = {}

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"relay {self.url}")

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_result(PublishResult(self.url, False, "connection closed"))
        self._pending.clear()

    async def _run(self) -> None:
        backoff = self._min_backoff
        failures, logged_at = 0, 0.0
        while not self._closing:
            try:
                async with websockets.connect(
                    self.url, max_size=self._max_message_bytes, open_timeout=10,
                    ping_interval=20, ping_timeout=20, close_timeout=2,
                    # Nostr messages are small: deflate costs both ends more CPU than it saves.
                    compression=None,
                ) as ws:
                    self._ws = ws
                    self._generation += 1
                    backoff, failures = self._min_backoff, 0
                    # Read while the subscriptions and the publishes that waited are sent: the
                    # relay answers at once (a backlog of events, OKs), and a reader that waited
                    # for the sending to end would let both sides' buffers fill, each side
                    # waiting for the other, the keep-alive pings stuck behind them (issue 19).
                    sending = asyncio.create_task(self._on_connect(ws))
                    sending.add_done_callback(lambda t: t.cancelled() or t.exception())
                    try:
                        async for raw in ws:
                            try:
                                self._handle(raw)
                            except Exception:  # one bad message must not drop the connection
                                log.exception("failed to handle a relay message", relay=self.url)
                    finally:
                        sending.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any network failure: log it and come back
                failures += 1
                self.last_error = str(exc) or type(exc).__name__
                quiet = failures > 1 and time.monotonic() - logged_at < STILL_DOWN_LOG_SECONDS
                if not self._closing and not quiet:
                    logged_at = time.monotonic()
                    log.warning("relay connection lost" if failures == 1 else "relay still unreachable; retrying",
                                relay=self.url, error=str(exc) or type(exc).__name__, tries=failures)
            finally:
                self._ws = None
                self._connected.clear()
            if self._closing:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._max_backoff)

    async def _on_connect(self, ws) -> None:
        generation = self._generation
        for sub_id, factory in list(self._subs.items()):
            await ws.send(json.dumps(["REQ", sub_id, *factory()]))
        # Publishes that got no OK on an earlier connection are sent again: relays treat a
        # repeated id as a duplicate, so nothing is published twice. Those made while they
        # are sent wait in the queue: they go out once the connection counts as up (a
        # publish then sends its event itself).
        await self._send_pending(ws, generation)
        self._connected.set()
        await self._send_pending(ws, generation)
        log.info("relay connected", relay=self.url)

    async def _send_pending(self, ws, generation: int) -> None:
        unsent = [(event_id, message) for event_id, (message, _) in self._pending.items()
                  if self._sent_on.get(event_id) != generation]
        for event_id, message in unsent:
            if event_id in self._pending and self._sent_on.get(event_id) != generation:
                self._sent_on[event_id] = generation
                await ws.send(message)

    def _handle(self, raw: str | bytes) -> None:
        try:
            msg = json.loads(raw)
            kind = msg[0]
        except (ValueError, IndexError, KeyError, TypeError):
            log.warning("relay sent a malformed message", relay=self.url)
            return
        if kind == "EVENT" and len(msg) >= 3 and isinstance(msg[2], dict):
            self._on_event(msg[2], self.url, msg[1])
        elif kind == "OK" and len(msg) >= 3:
            message = str(msg[3]) if len(msg) > 3 else ""
            # NIP-01: "duplicate:" means the relay already holds the event: it is delivered.
            self._resolve_ok(str(msg[1]), bool(msg[2]) or message.startswith("duplicate:"), message)
        elif kind == "EOSE" and len(msg) >= 2:
            self.eose.setdefault(msg[1], asyncio.Event()).set()
        elif kind == "CLOSED" and len(msg) >= 2:
            log.warning("relay closed a subscription", relay=self.url, subscription=msg[1],
                        reason=msg[2] if len(msg) > 2 else "")
        elif kind == "NOTICE":
            log.info("relay notice", relay=self.url, notice=msg[1] if len(msg) > 1 else "")

    def _resolve_ok(self, event_id: str, ok: bool, message: str) -> None:
        entry = self._pending.pop(event_id, None)
        if entry is None and event_id == "":
            # nostr-relay answers a rejection with an empty id. Relays answer in order, so it
            # belongs to the oldest publish still waiting on this connection.
            for pending_id in self._pending:
                if self._sent_on.get(pending_id) == self._generation:
                    event_id = pending_id
                    entry = self._pending.pop(pending_id)
                    break
        if entry is None:
            return
        self._sent_on.pop(event_id, None)
        fut = entry[1]
        if not fut.done():
            fut.set_result(PublishResult(self.url, ok, message))

    async def publish(self, event: dict, timeout: float = 10.0) -> PublishResult:
        """Send an event and wait for the relay's OK; on time-out the result says so."""
        loop = asyncio.get_running_loop()
        existing = self._pending.get(event["id"])
        if existing is not None:
            fut = existing[1]
        else:
            message = json.dumps(["EVENT", event], separators=(",", ":"), ensure_ascii=False)
            fut = loop.create_future()
            self._pending[event["id"]] = (message, fut)
            ws = self._ws
            if ws is not None and self._connected.is_set():
                self._sent_on[event["id"]] = self._generation
                try:
                    await ws.send(message)
                except Exception:
                    pass  # stays pending; the next connection sends it again
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            entry = self._pending.pop(event["id"], None)
            self._sent_on.pop(event["id"], None)
            if entry is not None and not entry[1].done():
                entry[1].cancel()
            state = "no OK from the relay" if self.connected else "relay not connected"
            return PublishResult(self.url, False, f"timed out after {timeout:g}s: {state}")

    async def subscribe(self, sub_id: str, filters: FilterFactory) -> None:
        self._subs[sub_id] = filters
        self.eose.pop(sub_id, None)
        ws = self._ws
        if ws is not None and self._connected.is_set():
            try:
                await ws.send(json.dumps(["REQ", sub_id, *filters()]))
            except Exception:
                pass  # re-sent on reconnect

    async def unsubscribe(self, sub_id: str) -> None:
        if self._subs.pop(sub_id, None) is None:
            return
        ws = self._ws
        if ws is not None and self._connected.is_set():
            try:
                await ws.send(json.dumps(["CLOSE", sub_id]))
            except Exception:
                pass


class RelayPool:
    """Several relays as one: publish to all, subscribe on all, each event delivered once.

    Events are verified (id and signature) before they count as seen, so a forged copy cannot
    shadow the real event.
    """

    def __init__(self, urls: list[str], on_event: EventHandler | None = None, *,
                 dedupe_size: int = 100_000, **conn_options):
        if not urls:
            raise ValueError("at least one relay URL is needed")
        self._on_event = on_event
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe_size = dedupe_size
        self.relays = [RelayConnection(u, self._deliver, **conn_options) for u in dict.fromkeys(urls)]
        self._tasks: set[asyncio.Task] = set()
        self._collectors: dict[str, list[dict]] = {}
        self._query_count = 0
        self.invalid_events = 0

    def set_handler(self, on_event: EventHandler) -> None:
        self._on_event = on_event

    async def start(self, wait: float | None = 10.0) -> bool:
        """Connect to every relay; return whether at least one answered within `wait`."""
        for r in self.relays:
            r.start()
        if wait is None:
            return False
        done, pending = await asyncio.wait(
            [asyncio.create_task(r.wait_connected()) for r in self.relays], timeout=wait,
            return_when=asyncio.FIRST_COMPLETED,
        )
        for t in pending:
            t.cancel()
        return bool(done)

    async def wait_all_connected(self, timeout: float) -> bool:
        results = await asyncio.gather(*(r.wait_connected(timeout) for r in self.relays))
        return all(results)

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.relays))
        for t in list(self._tasks):
            t.cancel()

    def _deliver(self, event: dict, relay_url: str, sub_id: str) -> None:
        event_id = event.get("id") if isinstance(event, dict) else None
        if not isinstance(event_id, str) or (event_id in self._seen and sub_id not in self._collectors):
            return
        try:
            verify_event(event)
        except InvalidEvent as exc:
            self.invalid_events += 1
            log.warning("dropped an invalid event", relay=relay_url, reason=str(exc))
            return
        collector = self._collectors.get(sub_id)
        if collector is not None:  # a one-off query: its events are not new traffic
            collector.append(event)
            return
        self._seen[event_id] = None
        if len(self._seen) > self._dedupe_size:
            self._seen.popitem(last=False)
        if self._on_event is None:
            return
        result = self._on_event(event, relay_url)
        if asyncio.iscoroutine(result):
            task = asyncio.create_task(result)
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event handler failed", error=repr(task.exception()))

    async def publish(self, event: dict, timeout: float = 10.0) -> list[PublishResult]:
        """Publish to every relay at once; one result per relay."""
        return list(await asyncio.gather(*(r.publish(event, timeout) for r in self.relays)))

    async def subscribe(self, sub_id: str, filters: FilterFactory | list[dict]) -> None:
        factory = filters if callable(filters) else (lambda f=filters: f)
        await asyncio.gather(*(r.subscribe(sub_id, factory) for r in self.relays))

    async def unsubscribe(self, sub_id: str) -> None:
        await asyncio.gather(*(r.unsubscribe(sub_id) for r in self.relays))

    async def wait_eose(self, sub_id: str, timeout: float = 10.0) -> bool:
        async def one(r: RelayConnection):
            await r.eose.setdefault(sub_id, asyncio.Event()).wait()
        try:
            await asyncio.wait_for(asyncio.gather(*(one(r) for r in self.relays)), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def query(self, filters: list[dict], timeout: float = 5.0) -> list[dict]:
        """Stored events matching `filters`, from every relay, until each sent EOSE (or the
        time-out); duplicates removed."""
        self._query_count += 1
        sub_id = f"q{self._query_count}"
        self._collectors[sub_id] = found = []
        try:
            await self.subscribe(sub_id, filters)
            await self.wait_eose(sub_id, timeout)
        finally:
            self._collectors.pop(sub_id, None)
            await self.unsubscribe(sub_id)
        return list({e["id"]: e for e in found}.values())
