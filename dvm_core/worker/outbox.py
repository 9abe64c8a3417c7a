"""What the worker says: events signed, published to every relay, and the ones that must arrive
(results, final errors, payouts' nutzaps) kept in the store until a relay took them.

`Reply` is everything said about one request, encrypted as the request was; `Outbox` signs and
publishes. A stored event is published again with backoff, and after a restart, until a relay
accepts it or refuses it for good (relays drop a repeated id, so the customer sees one).

At most `max_in_flight` publishes wait for a relay's OK at once (issue 19: in a flood the
relay acknowledges more slowly than the worker answers, and each waiting publish held ~10 KB).
Beyond that, a stored event waits in the store alone, and goes out, oldest first, as room
frees up; an event that may be lost waits in a bounded queue, and the oldest is dropped when
that is full. A restart's backlog goes out the same way, never all at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import deque
from typing import Callable

import structlog

from dvm_core.protocol.encryption import Scheme, encrypter
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import JobRequest, build_feedback, build_result
from dvm_core.state.store import Store, disk_full

log = structlog.get_logger("dvm.worker")

MAX_BACKOFF_SECONDS = 60.0
MAX_IN_FLIGHT = 256       # publishes waiting for a relay's OK at once
MAX_WAITING = 1024        # events that may be lost, waiting for room; beyond, the oldest is dropped


class Outbox:
    """Signs with the DVM's key and publishes through the relay pool (any object with
    ``async publish(event) -> list[PublishResult]``)."""

    def __init__(self, *, pool, store: Store, keys: Keys, relay_hint: str,
                 spawn: Callable[[object], asyncio.Task], max_in_flight: int = MAX_IN_FLIGHT,
                 max_waiting: int = MAX_WAITING):
        self.pool = pool
        self.store = store
        self.keys = keys
        self.relay_hint = relay_hint
        self.spawn = spawn
        self.stopping = False   # no more retries: what is stored goes out after the next start
        self.closed = False     # the store is closed: nothing more is marked
        self.max_in_flight = max_in_flight
        self.max_waiting = max_waiting
        self.in_flight = 0                          # publishes started and not ended
        self.dropped = 0                            # events that may be lost, dropped for want of room
        self._publishing: set[str] = set()          # stored events among them
        self._waiting: deque[tuple[dict, str]] = deque()   # events that may be lost, waiting for room
        # Stored events after this rowid of the store's outbox wait there for room (None: none wait).
        self._backlog_after: int | None = None

    @property
    def congested(self) -> bool:
        """Whether what is said now waits: every publish slot is taken, or events wait for one."""
        return self.in_flight >= self.max_in_flight or self._backlog_after is not None or bool(self._waiting)

    def sign(self, kind: int, content: str, tags: list[list[str]]) -> dict:
        return sign_event(self.keys, kind, content, tags)

    def send(self, event: dict, role: str = "feedback") -> None:
        """Publish once, in the background; lost if no relay takes it (progress, notices), or if
        `max_waiting` newer ones wait for room before it goes out."""
        if self.in_flight < self.max_in_flight and not self._waiting:
            self._start(event, role, None, stored=False)
            return
        if len(self._waiting) >= self.max_waiting:
            _, dropped_role = self._waiting.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("relays are slower than the worker: feedback dropped", dropped=self.dropped,
                            role=dropped_role, waiting=len(self._waiting), in_flight=self.in_flight)
        self._waiting.append((event, role))

    def send_stored(self, event: dict, role: str, job_id: str | None) -> asyncio.Task | None:
        """Publish an event already in the store's outbox, in the background, until it arrives
        (when every publish slot is taken, it waits in the store for one). Returns the publishing
        task when it started now."""
        if event["id"] in self._publishing:
            return None
        if self._backlog_after is None and self.in_flight < self.max_in_flight:
            return self._start(event, role, job_id, stored=True)
        if self._backlog_after is None:
            rowid = self.store.outgoing_rowid(event["id"])
            if rowid is None:   # not in the store after all: it goes out now, whatever the load
                return self._start(event, role, job_id, stored=True)
            self._backlog_after = rowid - 1   # it and every stored event after it wait there
        return None

    def _start(self, event: dict, role: str, job_id: str | None, stored: bool) -> asyncio.Task:
        self.in_flight += 1
        if stored:
            self._publishing.add(event["id"])
        task = self.spawn(self.publish(event, role=role, job_id=job_id, stored=stored))
        task.add_done_callback(lambda _t, event_id=event["id"]: self._ended(event_id))
        return task

    def _ended(self, event_id: str) -> None:
        self.in_flight -= 1
        self._publishing.discard(event_id)
        # Refilled in batches, a quarter of the slots at a time: one store query per batch.
        if self.in_flight <= self.max_in_flight * 3 // 4:
            self._refill()

    def _refill(self) -> None:
        """Start what waits for room: stored events first (oldest first), then the others."""
        if self.stopping or self.closed:
            return   # the stored ones go out after the next start
        room = self.max_in_flight - self.in_flight
        if room > 0 and self._backlog_after is not None:
            rows = self.store.unpublished_after(self._backlog_after, limit=room)
            for rowid, job_id, role, event in rows:
                self._backlog_after = rowid
                if event["id"] not in self._publishing:
                    self._start(event, role, job_id, stored=True)
            if len(rows) < room:
                self._backlog_after = None   # none wait in the store any more
            room = self.max_in_flight - self.in_flight
        while room > 0 and self._waiting:
            event, role = self._waiting.popleft()
            self._start(event, role, None, stored=False)
            room -= 1

    def store_and_send(self, event: dict, role: str, job_id: str | None) -> None:
        """Put `event` in the store's outbox (inside the caller's transaction, if any), then
        publish it until it arrives."""
        self.store.add_outgoing(event, role, job_id)
        self.send_stored(event, role, job_id)

    def resend_unpublished(self) -> None:
        """After a restart: everything stored that no relay confirmed goes out again, oldest
        first, `max_in_flight` at a time."""
        unsent = self.store.count_unpublished()
        if unsent:
            log.info("publishing again after restart", events=unsent)
            self._backlog_after = 0
            self._refill()

    async def publish(self, event: dict, role: str = "feedback", job_id: str | None = None,
                      stored: bool = False) -> bool:
        """Publish to every relay. A stored event is tried again with backoff until a relay
        accepts it; it stays in the outbox for the next start otherwise."""
        delay = 1.0
        while True:
            results = await self.pool.publish(event)
            accepted = [r.relay for r in results if r.ok]
            if accepted:
                if stored and not self.closed:
                    try:
                        self.store.mark_published(event["id"], accepted)
                    except sqlite3.OperationalError as exc:
                        if not disk_full(exc):
                            raise
                        # Out, but not marked: the next start publishes it again (a duplicate
                        # the relays drop).
                        log.warning("published, but the full disk could not record it",
                                    role=role, job_id=job_id, event_id=event["id"])
                return True
            log.warning("no relay accepted an event", role=role, job_id=job_id, event_id=event["id"],
                        reasons={r.relay: r.message for r in results})
            if not stored or self.stopping or any(r.refused_for_good for r in results):
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)


class Reply:
    """Everything the worker tells the customer about one request: encrypted to them exactly
    when the request was (with the request's scheme), always tagged with the request."""

    def __init__(self, request: JobRequest, scheme: Scheme | None, outbox: Outbox):
        self.request = request
        self.scheme = scheme
        self._outbox = outbox
        self._encrypt = encrypter(scheme, outbox.keys.private_key, request.pubkey) if scheme else None

    def feedback_event(self, status: str, message: str, **fields) -> dict:
        """A signed feedback event, not yet stored or sent."""
        return self._feedback(status, message, **fields)

    def _feedback(self, status: str, message: str, **fields) -> dict:
        return self._outbox.sign(*build_feedback(self.request, status, message,
                                                 relay_hint=self._outbox.relay_hint,
                                                 encrypt=self._encrypt, **fields))

    def feedback(self, status: str, message: str, **fields) -> None:
        """Feedback that may be lost (`processing`, progress, `payment-required`)."""
        self._outbox.send(self._feedback(status, message, **fields))

    def final_error(self, message: str, amount_msats: int | None = None) -> None:
        """The job's last word, an `error`: stored, so it reaches the customer across restarts.
        Call it inside the transaction that ends the job."""
        event = self._feedback("error", message, amount_msats=amount_msats)
        self._outbox.store_and_send(event, "feedback", self.request.id)

    def send_stored(self, event: dict, role: str) -> asyncio.Task | None:
        """Publish one of this request's events, already in the store's outbox, until it arrives;
        the publishing task when it started now."""
        return self._outbox.send_stored(event, role, self.request.id)

    def result(self, payload: str) -> dict:
        """The signed result event (not yet stored or sent)."""
        return self._outbox.sign(*build_result(self.request, payload, relay_hint=self._outbox.relay_hint,
                                               encrypt=self._encrypt))

