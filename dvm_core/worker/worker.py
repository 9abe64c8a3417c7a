"""The DVM worker: takes NIP-90 job requests from relays, runs them through plugins, answers.

One request's path: verified and de-duplicated by the relay pool → recorded in the store (a
request is never handled twice, across restarts) → decrypted and parsed → `processing`
feedback → run by its plugin under a concurrency limit, a time limit and cancellation → the
result is signed, stored, then published. After a crash, stored results are published again and
jobs that were queued or running are run again, so each request gets exactly one result.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from .config import Config, ConfigError
from dvm_core.protocol.encryption import DecryptionError, Scheme, decrypt, encrypter
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.datarefs import parse_data_ref
from dvm_core.jobs import (TIME_LIMIT, WORKER_STOPPING, JobCancelled, JobContext, JobError, JobInputError, JobKind,
                   JobResult, JobTimeout)
from dvm_core.protocol.ecash import NUTZAP_KIND
from dvm_core.protocol.nip90 import (DELETION_KIND, InvalidRequest, JobRequest, KindDescription, addressed_providers,
                    build_feedback, build_handler_announcement, build_result, deleted_event_ids,
                    is_encrypted, parse_job_request)
from dvm_core.payments.crashpoints import crashpoint
from dvm_core.payments.cashier import Cashier, Paid, PaymentRefused
from .plugins import collect_job_kinds, plugin_manager
from dvm_core.transport.relay import RelayPool
from .store import ACTIVE_STATES, Store

log = structlog.get_logger("dvm.worker")

STOP_GRACE_SECONDS = 10.0
CATCHUP_MARGIN_SECONDS = 120
FUTURE_SLACK_SECONDS = 600   # a request dated further ahead than this is not taken
MAX_CRASHES = 2              # a job that took the worker down this often is failed and refunded
FETCH_ATTEMPTS = 3           # tries of a paid job's input download before it is refunded
FETCH_RETRY_SECONDS = 2.0


@dataclass
class ActiveJob:
    request: JobRequest
    job_kind: JobKind
    parsed: Any
    scheme: Scheme | None
    paid: Paid | None = None
    ctx: JobContext | None = None
    task: asyncio.Task | None = None      # the request's task (accept, queue, run, answer)
    job_task: asyncio.Future | None = None  # the plugin's run itself
    cancel_reason: str = ""
    last_progress_at: float = 0.0
    progress_pending: tuple[float, str] | None = None
    progress_timer: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)


class Worker:
    def __init__(self, config: Config, keys: Keys, pm: pluggy.PluginManager | None = None):
        self.config = config
        self.settings = config.settings
        self.keys = keys
        self.pm = pm or plugin_manager()
        self.kinds: dict[int, JobKind] = collect_job_kinds(self.pm, config.raw)
        self._state_lock = lock_state_dir(Path(self.settings.state_dir))
        self.store = Store(self.settings.store_path)
        self.pool = RelayPool(self.settings.relays, self._on_event)
        self.relay_hint = self.settings.relays[0]
        self.ready = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._active: dict[str, ActiveJob] = {}
        self._unpaid: dict[str, str] = {}   # jobs waiting for payment -> their customer
        self._slots = asyncio.Semaphore(self.settings.max_concurrent_jobs)
        capacity = config.raw.get("capacity") or {}
        self._kind_slots = {k.kind: asyncio.Semaphore(capacity[k.name])
                            for k in self.kinds.values() if k.name in capacity}
        self._devices: asyncio.Queue[str] | None = None
        if self.settings.devices:
            self._devices = asyncio.Queue()
            for device in self.settings.devices:
                self._devices.put_nowait(device)
        # Jobs get threads of their own, so long training never starves the default executor
        # that asyncio and libraries share.
        self._executor = ThreadPoolExecutor(self.settings.max_concurrent_jobs, thread_name_prefix="dvm-job")
        self._precheck_slots = asyncio.Semaphore(self.settings.max_prechecks)
        self._precheck_executor = ThreadPoolExecutor(self.settings.max_prechecks, thread_name_prefix="dvm-precheck")
        self._tasks: set[asyncio.Task] = set()
        self._cancel_sub_timer: asyncio.TimerHandle | None = None
        self.counts = {"received": 0, "rejected": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
        self.prices = dict(config.raw.get("prices") or {})
        self.cashier: Cashier | None = None
        if self.settings.mints:
            self.cashier = self._open_cashier()

    def _open_cashier(self) -> Cashier:
        from dvm_core.payments.wallet import ProviderWallet, load_or_create_p2pk_key, preload
        preload()  # Nutshell's import has process-wide side effects: take them now, contained
        directory = self.settings.wallet_dir
        wallet = ProviderWallet(directory=directory, accepted_mints=self.settings.mints,
                                unit=self.settings.unit,
                                p2pk_private_key=load_or_create_p2pk_key(directory / "p2pk.key"))

        async def publish(event, role, job_id):  # the event is in the outbox already
            return await self._publish(event, role=role, job_id=job_id, stored=True)

        return Cashier(wallet=wallet, store=self.store, keys=self.keys, mints=self.settings.mints,
                       unit=self.settings.unit, sign=self._sign, publish=publish,
                       query=self.pool.query, spawn=self._spawn,
                       mint_retry_seconds=self.settings.mint_retry_seconds,
                       payment_timeout=self.settings.payment_timeout)

    # lifecycle ------------------------------------------------------------
    async def start(self, connect_timeout: float = 10.0) -> None:
        if not self.kinds:
            log.warning("no job kinds registered: install a plugin or check DVM_PLUGINS")
        if not await self.pool.start(wait=connect_timeout):
            log.warning("no relay answered yet; still trying", relays=self.settings.relays)
        await self.pool.subscribe("dvm-requests", self._request_filters)
        if self.cashier is not None:
            await self.pool.subscribe("dvm-nutzaps", self._nutzap_filters)
        self._recover()
        if self.cashier is not None:
            self.cashier.start()
        if self.settings.announce and self.kinds:
            self._spawn(self._publish(self._sign(*self.announcement()), role="announcement"))
        if self.cashier is not None:
            self._spawn(self._publish(self._sign(*self.cashier.nutzap_info(self.settings.relays)),
                                      role="announcement"))
        if self.settings.announce and self.kinds and self.settings.heartbeat_seconds > 0:
            self._spawn(self._heartbeat())
        if self.cashier is not None:
            self._spawn(self._check_mints())
        self.ready.set()
        log.info("worker ready", npub=self.keys.npub, kinds=sorted(self.kinds),
                 relays=self.settings.relays)

    async def run(self) -> None:
        """Start, then serve until `stop()` is called."""
        await self.start()
        await self._stopped.wait()

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop taking jobs; give running ones `grace` seconds, then stop them and put them back
        in the queue (in the store) so the next start runs them."""
        if self._stopping:
            return
        self._stopping = True
        if self._cancel_sub_timer is not None:
            self._cancel_sub_timer.cancel()
        log.info("worker stopping", active=len(self._active))
        await self.pool.unsubscribe("dvm-requests")
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for active in list(self._active.values()):
            self._cancel(active, WORKER_STOPPING)
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        for task in self._tasks:
            task.cancel()  # what is left is in the outbox and goes out after the next start
        await self.pool.close()
        if self.cashier is not None:
            await self.cashier.wallet.close()
        self.store.close()
        self._state_lock.close()   # another worker may use this state directory now
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._precheck_executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _request_filters(self) -> list[dict]:
        # An event's created_at is the author's claim: it never moves `since` past our own clock.
        now = int(time.time())
        latest = self.store.latest_request_time()
        since = (min(latest, now) - CATCHUP_MARGIN_SECONDS if latest is not None
                 else now - self.settings.catchup_seconds)
        return [{"kinds": sorted(self.kinds), "since": since}]

    async def _check_mints(self) -> None:
        """A mint that is down at start is worth a clear line: payments will wait for it."""
        import httpx
        async with httpx.AsyncClient(timeout=5) as client:
            for mint in self.settings.mints:
                try:
                    (await client.get(mint.rstrip("/") + "/v1/info")).raise_for_status()
                except httpx.HTTPError as exc:
                    log.warning("mint unreachable at start; paid jobs will wait for it",
                                mint=mint, error=str(exc) or type(exc).__name__)

    async def _heartbeat(self) -> None:
        """Re-publish the announcement now and then: clients see from its `created_at` that the
        DVM is alive, and from its `status` how loaded it is."""
        while not self._stopping:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            if self._stopping:
                return
            await self._publish(self._sign(*self.announcement()), role="announcement")

    def status_line(self) -> str:
        """One line for systemd's STATUS= and the logs."""
        running = sum(1 for a in self._active.values() if a.ctx is not None)
        earned = ", ".join(f"{v} {u}" for u, v in self.store.earnings().items()) or "0"
        return (f"queued {len(self._active) - running}, running {running}, "
                f"done {self.counts['succeeded']}, failed {self.counts['failed']}, earned {earned}")

    def _nutzap_filters(self) -> list[dict]:
        # Since the newest request seen, less a margin: a nutzap for a job waiting for payment
        # while the worker was down is found again.
        return [{"kinds": [NUTZAP_KIND], "#p": [self.keys.public_key], "since": self._request_filters()[0]["since"]}]

    def announcement(self) -> tuple[int, str, list[list[str]]]:
        kinds = [KindDescription(k.kind, k.name, k.description, k.params or {})
                 for k in sorted(self.kinds.values(), key=lambda k: k.kind)]
        running = sum(1 for a in self._active.values() if a.ctx is not None)
        extra = {"status": {"queued": len(self._active) - running, "running": running,
                            "slots": self.settings.max_concurrent_jobs, "updated": int(time.time())}}
        if self.cashier is not None:
            extra["payment"] = {
                "unit": self.settings.unit, "mints": self.settings.mints,
                "p2pk_pubkey": self.cashier.p2pk_pubkey,
                "prices": {k.name: self.prices.get(k.name, self.settings.default_price)
                           for k in self.kinds.values() if not k.pricing},
                # Every kind says how it is priced, in words: a rule for kinds priced by work.
                "input_error_fee": self.settings.input_error_fee,
                "pricing": {k.name: k.pricing or _fixed_pricing(
                    self.prices.get(k.name, self.settings.default_price), self.settings.unit)
                    for k in self.kinds.values()},
                "methods": ["cashu tag (or param cashu) in encrypted params",
                            "cashu tag P2PK-locked to p2pk_pubkey with a NUT-11 refund key of the author",
                            "NIP-61 nutzap after payment-required, locked to the key it names"],
            }
        return build_handler_announcement(
            identifier=f"dvm-{self.keys.public_key[:16]}", name=self.settings.name,
            about=self.settings.about, kinds=kinds, extra_content=extra)

    def price(self, job_kind: JobKind, request: JobRequest, parsed: Any) -> int:
        if self.cashier is None:
            return 0  # no mints configured: this DVM serves every job free, whatever plugins ask
        fixed = self.prices.get(job_kind.name, self.settings.default_price)
        price = self.pm.hook.price_job(job_kind=job_kind, request=request, job=parsed, config=self.config.raw)
        if price is None:
            price = fixed
        elif not job_kind.pricing and price != fixed:
            # The announcement says this kind costs `fixed`: a customer pays only what was
            # announced, so a price the kind does not announce (JobKind.pricing) is not asked.
            log.warning("a plugin priced a kind that announces a fixed price; asking the fixed price",
                        kind=job_kind.name, plugin_price=price, announced=fixed)
            price = fixed
        if isinstance(price, bool) or not isinstance(price, int) or price < 0:
            raise ValueError(f"price of {job_kind.name!r} must be a whole number ≥ 0, got {price!r}")
        return price

    def _recover(self) -> None:
        for job_id, role, event in self.store.unpublished():
            log.info("publishing again after restart", job_id=job_id, role=role, event_id=event["id"])
            self._spawn(self._publish(event, role=role, job_id=job_id, stored=True))
        for record in self.store.jobs(ACTIVE_STATES + ("received", "payment-required")):
            if self.store.outgoing_for_job(record.id, "result") is not None:
                self.store.set_state(record.id, "succeeded")
                continue
            if record.state == "running" and self.store.count_crash(record.id) >= MAX_CRASHES:
                self._give_up(record)
                continue
            log.info("resuming job after restart", job_id=record.id, state=record.state)
            self._spawn(self._accept(record.request, resumed=True))

    def _give_up(self, record) -> None:
        """A job that took the worker down MAX_CRASHES times is not run again: failed, refunded,
        and its customer told, in one transaction."""
        event = record.request
        request = _bare_request(event)
        scheme = None
        if request.encrypted:
            try:
                _, scheme = decrypt(self.keys.private_key, event["pubkey"], event["content"])
            except DecryptionError:
                scheme = None
        error = (f"this job stopped the worker {MAX_CRASHES} times (it ran out of memory or crashed "
                 "it); it is not run again")
        log.error("job gave up after crashing the worker", job_id=record.id, crashes=MAX_CRASHES)
        self._end_job(request, "failed", error, scheme)
        self.counts["failed"] += 1

    def _end_job(self, request: JobRequest, state: str, error: str, scheme: Scheme | None, *,
                 refund: bool = True, keep: int = 0) -> None:
        """A job that will not deliver: the refund owed (less `keep`), its end and the customer's
        error feedback, in one transaction."""
        with self.store.atomic():
            refunded = self.cashier.refund_job(request, error, keep=keep) \
                if refund and self.cashier is not None else 0
            message = error
            if refunded:
                message += f"; your {refunded} {self.settings.unit} were refunded as a nutzap"
            self.store.set_state(request.id, state, error=error)
            self._finish_feedback(request, message, self._encrypter(request, scheme))

    # incoming events -------------------------------------------------------
    def _on_event(self, event: dict, relay_url: str):
        if event["kind"] == DELETION_KIND:
            self._on_deletion(event)
            return None
        if event["kind"] in self.kinds and not self._stopping:
            return self._accept(event)
        if event["kind"] == NUTZAP_KIND and self.cashier is not None:
            self.cashier.on_nutzap(event)
        return None

    def _on_deletion(self, event: dict) -> None:
        for job_id in deleted_event_ids(event):
            if self._unpaid.get(job_id) == event["pubkey"] and self.cashier is not None:
                log.info("job cancelled by the customer before paying", job_id=job_id)
                self.cashier.cancel_waiting(job_id)
                continue
            active = self._active.get(job_id)
            if active is not None and active.request.pubkey == event["pubkey"]:
                log.info("job cancelled by the customer", job_id=job_id)
                self._cancel(active, "cancelled by the customer")

    async def _accept(self, event: dict, resumed: bool = False) -> None:
        providers = addressed_providers(event)
        if providers and self.keys.public_key not in providers and not self.settings.accept_jobs_for_others:
            return  # addressed to other DVMs
        if is_encrypted(event) and self.keys.public_key not in providers:
            return  # private to another DVM: we could not read it anyway
        if not resumed and event["created_at"] > time.time() + FUTURE_SLACK_SECONDS:
            # Dated in the future: recorded, it would move where the next catch-up starts.
            log.warning("request dated in the future ignored", job_id=event["id"],
                        ahead_seconds=int(event["created_at"] - time.time()))
            return
        size = len(json.dumps(event, ensure_ascii=False).encode())
        # An oversized request is recorded without its body: the store keeps no stranger's megabytes.
        recorded = event if size <= self.settings.max_request_bytes else \
            dict(event, content="", tags=[t for t in event["tags"][:16] if t and t[0] in ("p", "encrypted")])
        if not resumed and not self.store.record_request(recorded):
            return  # seen before (on another relay, or before a restart)
        crashpoint("request-recorded")
        with structlog.contextvars.bound_contextvars(job_id=event["id"]):
            if not resumed:
                self.counts["received"] += 1
            scheme: Scheme | None = None
            try:
                if size > self.settings.max_request_bytes:
                    raise InvalidRequest(f"the request is {size} bytes; this DVM accepts at most "
                                         f"{self.settings.max_request_bytes}: send large inputs by URL")
                private_tags = None
                if is_encrypted(event):
                    try:
                        plaintext, scheme = decrypt(self.keys.private_key, event["pubkey"], event["content"])
                    except DecryptionError as exc:
                        raise InvalidRequest(str(exc)) from None
                    try:
                        private_tags = json.loads(plaintext)
                    except (ValueError, RecursionError):
                        raise InvalidRequest("the decrypted content is not JSON: it must be a JSON "
                                             "array of i and param tags") from None
                request = parse_job_request(event, private_tags)
                job_kind = self.kinds[request.kind]
                if job_kind.params is not None:
                    unknown = sorted(set(request.params) - set(job_kind.params))
                    if unknown:
                        accepted = ", ".join(sorted(job_kind.params)) or "none"
                        raise InvalidRequest(f"unknown param(s) {', '.join(unknown)} for kind "
                                             f"{request.kind} ({job_kind.name}); accepted: {accepted}")
                for job_input in request.inputs:
                    if job_input.type == "url":
                        try:
                            parse_data_ref(job_input.data)
                        except ValueError as exc:
                            raise InvalidRequest(f"input {job_input.data[:80]!r}: {exc}") from None
                parsed = job_kind.parse(request) if job_kind.parse else request
                paid_already = resumed and self._paid_already(request.id)
                if not paid_already:
                    await self._probe_inputs(request)   # a paid job's inputs are retried, then refunded
            except (InvalidRequest, JobInputError) as exc:
                self._reject(event, str(exc), scheme)
                return
            except Exception:
                log.exception("plugin failed to parse a request", kind=event["kind"])
                self._reject(event, "internal error while reading the request", scheme)
                return
            waiting = self._waiting()
            if not resumed and len(waiting) >= self.settings.max_queued_jobs and self._slots.locked():
                self._reject(event, f"busy: {len(waiting)} jobs are waiting and this DVM queues at most "
                                    f"{self.settings.max_queued_jobs}; nothing was charged, try again later",
                             None if scheme is None else scheme, private_detail=False)
                return
            if not resumed and len(self._unpaid) >= self.settings.max_unpaid_jobs:
                # Each holds a coroutine (and a subscription) until paid or payment_timeout.
                self._reject(event, f"busy: {len(self._unpaid)} jobs are waiting for payment, the most "
                                    "this DVM keeps; nothing was charged, try again later",
                             scheme, private_detail=False)
                return
            if job_kind.precheck is not None and not paid_already:
                try:
                    parsed = await self._precheck(request, job_kind, parsed)
                except InvalidRequest as exc:
                    self._reject(event, str(exc), scheme)
                    return
                except Exception:
                    log.exception("plugin failed to check a request's inputs", kind=event["kind"])
                    self._reject(event, "internal error while checking the inputs; nothing was charged", scheme)
                    return
            paid = await self._take_payment(request, job_kind, parsed, private_tags, scheme)
            if paid is False:
                return
            self.store.set_state(request.id, "queued")
            crashpoint("job-queued")
            active = ActiveJob(request=request, job_kind=job_kind, parsed=parsed, scheme=scheme, paid=paid)
            self._active[request.id] = active
            self._update_cancel_subscription()
            message = "resumed after a restart" if resumed else "job accepted"
            ahead = len(self._waiting()) - 1
            if self._slots.locked() or (request.kind in self._kind_slots and
                                        self._kind_slots[request.kind].locked()):
                message += f"; queued, position {ahead + 1}"
            if paid is not None:
                message += f"; paid {min(paid.amount, paid.price)} {paid.unit}"
                if paid.warning:
                    message += f". {paid.warning}"
            self._spawn(self._publish(self._sign(*build_feedback(
                request, "processing", message,
                relay_hint=self.relay_hint, encrypt=self._encrypter(request, scheme)))))
            await asyncio.sleep(0)  # let the feedback go out before the job's bookkeeping
            active.task = asyncio.current_task()
            await self._run(active)

    def _paid_already(self, job_id: str) -> bool:
        if self.cashier is None:
            return False
        row = self.store.payment_for_job(job_id)
        return row is not None and row["state"] in ("received", "redeeming", "redeemed", "consumed")

    def _waiting(self) -> list[ActiveJob]:
        """Accepted jobs that have not started yet, oldest first."""
        return [a for a in self._active.values() if a.ctx is None]

    async def _take_payment(self, request: JobRequest, job_kind: JobKind, parsed: Any,
                            private_tags: list | None, scheme: Scheme | None) -> Paid | None | bool:
        """Paid, None for a free job, or False when the request was refused (and answered)."""
        try:
            price = self.price(job_kind, request, parsed)
        except Exception:
            log.exception("pricing failed", kind=request.kind)
            self._reject(request.event, "internal error while pricing the job; nothing was charged", scheme)
            return False
        if price == 0:
            return None
        unit = self.settings.unit
        if self.cashier is None:  # prices without mints are refused at start; be safe anyway
            self._reject(request.event, "this DVM cannot take payments right now", scheme)
            return False
        offered = self.cashier.token_in(request, private_tags)
        if request.bid_msats is not None and request.bid_msats < price * 1000:
            reason = (f"the price of this job is {price} {unit} ({price * 1000} msats); "
                      f"your bid was {request.bid_msats} msats")
            if offered is not None:
                returned = await self.cashier.give_back(request, offered[0], offered[1], reason)
                if returned:
                    reason += (f"; your token, locked to this DVM, was redeemed and its {returned} {unit} "
                               "sent back to you as a nutzap")
                else:
                    reason += "; your token was not redeemed"
            self._reject(request.event, reason, scheme, amount_msats=price * 1000)
            return False
        encrypt = self._encrypter(request, scheme)

        def say(status: str, message: str, content: str) -> None:
            amount = price * 1000 if status == "payment-required" else None
            if status == "payment-required" and request.id not in self._unpaid:
                self._unpaid[request.id] = request.pubkey   # a kind-5 from them cancels the wait
                self._update_cancel_subscription()
            self._spawn(self._publish(self._sign(*build_feedback(
                request, status, message, content=content, amount_msats=amount,
                relay_hint=self.relay_hint, encrypt=encrypt))))

        limit = job_kind.time_limit or self.settings.job_time_limit
        try:
            paid = await self.cashier.collect(request, price, offered, limit, say)
            self.cashier.settle(request.id)   # nutzaps kept for it that did not pay go back
            return paid
        except PaymentRefused as exc:
            self._reject(request.event, str(exc), scheme, private_detail=False)
            return False
        except Exception:
            log.exception("taking payment failed", job_id=request.id)
            reason = "internal error while taking payment"
            with self.store.atomic():
                if self.cashier.refund_job(request, reason):
                    reason += "; what was redeemed was refunded as a nutzap"
                self._reject(request.event, reason, scheme)
            return False
        finally:
            if self._unpaid.pop(request.id, None) is not None:
                self._update_cancel_subscription()

    def _reject(self, event: dict, reason: str, scheme: Scheme | None, private_detail: bool = True,
                amount_msats: int | None = None) -> None:
        # The reason can quote decrypted params: for a private request only the customer gets it.
        logged = reason if scheme is None or not private_detail else "invalid private request (reason sent encrypted)"
        log.warning("request rejected", kind=event["kind"], reason=logged)
        self.counts["rejected"] += 1
        request = _bare_request(event)
        encrypt = self._encrypter(request, scheme)
        with self.store.atomic():
            self.store.set_state(event["id"], "rejected", error=logged)
            self._finish_feedback(request, reason, encrypt, amount_msats)
        if self.cashier is not None:
            self.cashier.settle(event["id"])   # nutzaps kept for it go back

    def _encrypter(self, request: JobRequest, scheme: Scheme | None):
        return encrypter(scheme, self.keys.private_key, request.pubkey) if scheme else None

    # running ---------------------------------------------------------------
    async def _run(self, active: ActiveJob) -> None:
        request, job_kind = active.request, active.job_kind
        outcome, error, metrics = "failed", "", {}
        refund = True  # a paid job that did not deliver is refunded
        fee = 0        # ...less the announced fee when the customer's data was at fault
        workdir = self.settings.jobs_dir / request.id
        kind_slot = self._kind_slots.get(request.kind) or contextlib.nullcontext()
        device = None
        try:
            async with kind_slot, self._slots:
                if active.cancel_reason:
                    raise JobCancelled(active.cancel_reason)
                if self._devices is not None:
                    device = await self._devices.get()
                self.store.set_state(request.id, "running", count_attempt=True)
                crashpoint("job-running")
                limit = job_kind.time_limit or self.settings.job_time_limit
                loop = asyncio.get_running_loop()
                ctx = active.ctx = self._job_context(
                    request, workdir, limit, device=device,
                    report=lambda pct, msg: loop.call_soon_threadsafe(self._progress, active, pct, msg))
                started = time.monotonic()
                result = await self._call_plugin(active, ctx, limit)
                if not isinstance(result, JobResult):
                    result = JobResult(result)
                metrics = dict(result.metrics, run_seconds=round(time.monotonic() - started, 3))
                await self._deliver_result(active, result, metrics)
                outcome = "succeeded"
        except JobCancelled as exc:
            if exc.stopping:
                outcome = "queued"  # run again after the restart
                self.store.set_state(request.id, "queued")
            else:
                outcome, error = "cancelled", str(exc)
                refund = active.ctx is None  # cancelled before it started: nothing was done
        except JobTimeout:
            limit = job_kind.time_limit or self.settings.job_time_limit
            error = f"the job ran past its time limit of {limit:g} s"
        except JobInputError as exc:
            error = str(exc)
            fee = self.settings.input_error_fee   # the customer's data, found out only while working
        except JobError as exc:  # e.g. an input that could not be fetched: refunded
            error = str(exc)
        except Exception as exc:
            log.error("job failed in its plugin", job_id=request.id, kind=request.kind,
                      plugin=job_kind.plugin, exc_info=exc)
            error = "internal error while running the job"
        finally:
            if device is not None:
                self._devices.put_nowait(device)
            self._active.pop(request.id, None)
            self._update_cancel_subscription()
            if active.progress_timer is not None:
                active.progress_timer.cancel()
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
        if outcome in ("failed", "cancelled"):
            self._end_job(request, outcome, error, active.scheme,
                          refund=refund and active.paid is not None, keep=fee)
        if outcome != "queued":
            self.counts[outcome] += 1
        log.info("job finished", job_id=request.id, kind=request.kind, job_kind=job_kind.name,
                 outcome=outcome, error=error or None, encrypted=request.encrypted,
                 seconds=round(time.monotonic() - active.started, 3), metrics=metrics)

    async def _call_plugin(self, active: ActiveJob, ctx: JobContext, limit: float):
        run = active.job_kind.run
        if inspect.iscoroutinefunction(run):
            task = asyncio.ensure_future(run(ctx, active.parsed))
        else:
            # Training blocks: run it in a thread, carrying the contextvars (the bound job_id).
            context = contextvars.copy_context()
            task = asyncio.get_running_loop().run_in_executor(
                self._executor, context.run, run, ctx, active.parsed)
        active.job_task = task
        if active.cancel_reason:
            ctx.cancel(active.cancel_reason)
        done, _ = await asyncio.wait({task}, timeout=limit)
        if not done:
            ctx.cancel(TIME_LIMIT)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if not done:
                log.error("job ignored its time limit; its thread is left running", job_id=ctx.job_id)
            raise JobTimeout()
        try:
            return task.result()
        except asyncio.CancelledError:
            raise JobCancelled(ctx.cancel_reason or "cancelled") from None

    def _cancel(self, active: ActiveJob, reason: str) -> None:
        active.cancel_reason = reason
        if active.ctx is not None:
            active.ctx.cancel(reason)
            if active.job_task is not None and inspect.iscoroutinefunction(active.job_kind.run):
                active.job_task.cancel()

    def _progress(self, active: ActiveJob, percent: float, message: str) -> None:
        if active.request.id not in self._active:
            return
        active.progress_pending = (percent, message)
        wait = active.last_progress_at + self.settings.progress_interval - time.monotonic()
        if wait <= 0:
            self._send_progress(active)
        elif active.progress_timer is None:
            active.progress_timer = asyncio.get_running_loop().call_later(wait, self._send_progress, active)

    def _send_progress(self, active: ActiveJob) -> None:
        active.progress_timer = None
        if active.progress_pending is None or active.request.id not in self._active:
            return
        percent, message = active.progress_pending
        active.progress_pending = None
        active.last_progress_at = time.monotonic()
        self.store.set_progress(active.request.id, percent, message)
        text = f"{percent:.0f}%" + (f" {message}" if message else "")
        self._spawn(self._publish(self._sign(*build_feedback(
            active.request, "processing", text, progress=percent, relay_hint=self.relay_hint,
            encrypt=self._encrypter(active.request, active.scheme)))))

    def _update_cancel_subscription(self) -> None:
        # One subscription for deletions of every active job, re-sent (debounced) as the set
        # changes: relays keep deletions, so one sent before the job started is seen too.
        if self._cancel_sub_timer is None and not self._stopping:
            self._cancel_sub_timer = asyncio.get_running_loop().call_later(0.05, self._resubscribe_cancels)

    def _resubscribe_cancels(self) -> None:
        self._cancel_sub_timer = None
        if self._stopping:
            return
        ids = sorted(set(self._active) | set(self._unpaid))
        if ids:
            self._spawn(self.pool.subscribe("dvm-cancels", [{"kinds": [DELETION_KIND], "#e": ids}]))
        else:
            self._spawn(self.pool.unsubscribe("dvm-cancels"))

    # outgoing --------------------------------------------------------------
    def _sign(self, kind: int, content: str, tags: list[list[str]]) -> dict:
        return sign_event(self.keys, kind, content, tags)

    def _job_context(self, request: JobRequest, workdir: Path, limit: float, *, device: str | None = None,
                     report=lambda percent, message: None, fetch_attempts: int = 0,
                     **bind) -> JobContext:
        """The context a plugin's function runs in, from a worker thread: downloads go through
        this event loop (`_fetch`), progress through `report`."""
        loop = asyncio.get_running_loop()
        return JobContext(
            job_id=request.id, request=request, workdir=workdir,
            log=log.bind(job_id=request.id, kind=request.kind, **bind),
            deadline=time.monotonic() + limit, report=report, config=self.config.raw, device=device,
            fetcher=lambda url, into: asyncio.run_coroutine_threadsafe(
                self._fetch(url, into, attempts=fetch_attempts), loop).result())

    async def _precheck(self, request: JobRequest, job_kind: JobKind, parsed: Any) -> Any:
        """The plugin's look at the inputs before pricing and payment (`JobKind.precheck`): the
        job with its real size, or InvalidRequest for data it cannot use."""
        workdir = self.settings.jobs_dir / f"{request.id}.precheck"
        loop = asyncio.get_running_loop()
        limit = self.settings.precheck_seconds
        ctx = self._job_context(request, workdir, limit, fetch_attempts=1, step="precheck")
        try:
            async with self._precheck_slots:
                context = contextvars.copy_context()
                task = loop.run_in_executor(self._precheck_executor, context.run,
                                            job_kind.precheck, ctx, parsed)
                done, _ = await asyncio.wait({task}, timeout=limit)
                if not done:
                    ctx.cancel(TIME_LIMIT)
                    raise InvalidRequest(f"reading the inputs took longer than {limit:g} s, the most this "
                                         "DVM spends before a job is paid; send a smaller dataset")
                return task.result()
        except (JobInputError, JobTimeout) as exc:
            raise InvalidRequest(str(exc) or "the inputs could not be read in time") from None
        except JobError as exc:
            raise InvalidRequest(f"the inputs could not be read: {exc}") from None
        finally:
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)

    async def _probe_inputs(self, request: JobRequest) -> None:
        """Before any work or payment: every url input answers, is not an HTML page and is not
        announced larger than the limit. Raises InvalidRequest."""
        from dvm_core.transport.fetch import FetchError, probe
        urls = [i.data for i in request.inputs if i.type == "url"]
        for url in urls:
            try:
                await probe(parse_data_ref(url).url, max_bytes=self.settings.max_download_bytes,
                            allow_private=self.settings.allow_private_urls)
            except FetchError as exc:
                raise InvalidRequest(str(exc)) from None

    async def _fetch(self, url: str, into: Path, attempts: int = 0) -> Path:
        """Download a url input for a running job: verified, cached, decrypted if need be."""
        from dvm_core.transport.blobcrypt import BlobDecryptError, decrypt_file
        from dvm_core.transport.fetch import FetchError, fetch
        try:
            ref = parse_data_ref(url)
        except ValueError as exc:
            raise JobInputError(str(exc)) from None
        s = self.settings
        attempts = attempts or FETCH_ATTEMPTS
        for attempt in range(1, attempts + 1):
            # The job is paid: a server that is briefly down is tried again before the job is
            # given up (and refunded).
            try:
                path = await fetch(ref.url, ref.sha256, into, cache_dir=s.cache_dir,
                                   max_bytes=s.max_download_bytes, timeout=s.download_timeout,
                                   allow_private=s.allow_private_urls)
                break
            except FetchError as exc:
                if attempt == attempts:
                    tries = f" after {attempt} tries" if attempt > 1 else ""
                    raise JobError(f"could not fetch an input{tries}: {exc}") from None
                log.warning("fetching an input failed; trying again", url=ref.url[:80], error=str(exc))
                await asyncio.sleep(FETCH_RETRY_SECONDS * attempt)
        if ref.key is None:
            return path
        plain = into / f"{ref.sha256}.plain"
        try:
            await asyncio.to_thread(decrypt_file, path, plain, ref.key)
        except BlobDecryptError as exc:
            raise JobInputError(f"could not decrypt {ref.url}: {exc}") from None
        return plain

    async def _upload_artifacts(self, active: ActiveJob, result: JobResult) -> list[dict]:
        """Upload the job's files; encrypted with a fresh key each when the request was."""
        if not result.artifacts:
            return []
        if not self.settings.blob_servers:
            raise JobError("this provider has no blob server configured to deliver result files")
        from dvm_core.transport.blobcrypt import encrypt_file
        from dvm_core.transport.blossom import BlossomClient, BlossomError
        client = BlossomClient(self.settings.blob_servers, self.keys)
        entries = []
        for artifact in result.artifacts:
            path, key = artifact.path, None
            if active.request.encrypted:
                sealed = path.with_name(path.name + ".sealed")
                key = await asyncio.to_thread(encrypt_file, path, sealed)
                path = sealed
            try:
                blob = await client.upload(path, "application/octet-stream" if key else artifact.type)
            except BlossomError as exc:
                raise JobError(f"could not upload the result files: {exc}") from None
            entry = {"name": artifact.name or artifact.path.name, "url": blob.url, "sha256": blob.sha256,
                     "size": blob.size, "type": artifact.type}
            if key:
                entry |= {"encrypted": True, "key": key}
            entries.append(entry)
        return entries

    async def _deliver_result(self, active: ActiveJob, result: JobResult, metrics: dict) -> None:
        request = active.request
        artifacts = await self._upload_artifacts(active, result)
        if artifacts:
            content = result.content if isinstance(result.content, dict) else {"output": result.content}
            result = JobResult(dict(content, artifacts=artifacts), result.metrics)
        event = self._sign(*build_result(request, result.payload(), relay_hint=self.relay_hint,
                                         encrypt=self._encrypter(request, active.scheme)))
        # Stored with the state change in one transaction: after a crash the result is either
        # published again or the job is run again, never both.
        with self.store.atomic():
            self.store.add_outgoing(event, "result", request.id)
            self.store.set_state(request.id, "succeeded", summary=metrics)
            if self.cashier is not None:
                self.cashier.consumed(request.id)
        crashpoint("result-stored")
        self._spawn(self._publish(event, role="result", job_id=request.id, stored=True))

    def _finish_feedback(self, request: JobRequest, message: str, encrypt,
                         amount_msats: int | None = None) -> None:
        event = self._sign(*build_feedback(request, "error", message, relay_hint=self.relay_hint,
                                           encrypt=encrypt, amount_msats=amount_msats))
        self.store.add_outgoing(event, "feedback", request.id)
        self._spawn(self._publish(event, role="feedback", job_id=request.id, stored=True))

    async def _publish(self, event: dict, role: str = "feedback", job_id: str | None = None,
                       stored: bool = False) -> bool:
        """Publish to every relay. A stored event (a result, a final error) is tried again with
        backoff until a relay accepts it; it stays in the outbox for the next start otherwise."""
        delay = 1.0
        while True:
            results = await self.pool.publish(event)
            accepted = [r.relay for r in results if r.ok]
            if accepted:
                if stored and not self._stopped.is_set():
                    self.store.mark_published(event["id"], accepted)
                return True
            log.warning("no relay accepted an event", role=role, job_id=job_id, event_id=event["id"],
                        reasons={r.relay: r.message for r in results})
            if not stored or self._stopping or any(r.refused_for_good for r in results):
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)


def lock_state_dir(state_dir: Path):
    """Hold the state directory for this worker alone (an flock on `state_dir/lock`, released
    when the returned file is closed or the process ends). Raises ConfigError when another
    worker holds it: two on one store would answer every request twice and spend one wallet."""
    import fcntl
    import os
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / "lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"another worker (pid {holder}) uses the state directory {state_dir}: "
                          "stop it first, or give this one a state_dir of its own") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _fixed_pricing(price: int, unit: str) -> str:
    return f"{price} {unit} per job" if price else "free"


def _bare_request(event: dict) -> JobRequest:
    """Enough of a request to answer it, for one that could not be parsed."""
    return JobRequest(id=event["id"], pubkey=event["pubkey"], kind=event["kind"],
                      created_at=event["created_at"], encrypted=is_encrypted(event), event=event)
