"""Running accepted jobs: concurrency and device slots, the time limit, cancellation, progress,
and delivering the result (files uploaded, the result event stored with the job's end).

`Runner.run` takes one accepted, paid job to its end and says how it ended (`Outcome`); ending
a job that did not deliver (refund, error feedback) is the worker's, which owns the cashier.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import json
import secrets
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from dvm_core.datarefs import DataRef
from dvm_core.jobs import (Artifact, JobCancelled, JobContext, JobError, JobInputError, JobKind,
                           JobResult, JobTimeout, StopReason)
from dvm_core.payments.cashier import Cashier, Paid
from dvm_core.payments.crashpoints import crashpoint
from dvm_core.protocol.nip90 import JobRequest
from dvm_core.state.jobstate import JobState
from dvm_core.state.store import Store, disk_full

from .cancels import Cancels
from .config import Settings
from .inputs import job_context
from .outbox import Outbox, Reply
from .room import WAITING_MESSAGE, when_room

log = structlog.get_logger("dvm.worker")

STOP_GRACE_SECONDS = 10.0
DELIVERY_LOCK = "delivery-lock:"   # meta key prefix: K and the locktime of a job paid on delivery


@dataclass
class ActiveJob:
    """An accepted job, from `queued` to its end."""

    request: JobRequest
    job_kind: JobKind
    parsed: Any
    reply: Reply
    refs: dict[str, DataRef] = field(default_factory=dict)   # its url inputs, parsed by the intake
    paid: Paid | None = None
    due: int = 0                       # paid on delivery: the price, asked for once the result is sealed
    ctx: JobContext | None = None
    task: asyncio.Task | None = None        # the request's task (accept, queue, run, answer)
    job_task: asyncio.Future | None = None  # the plugin's run itself
    cancel_reason: str = ""            # a StopReason, once stopped
    last_progress_at: float = 0.0
    progress_pending: tuple[float, str] | None = None
    progress_timer: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass
class Outcome:
    """How a job ended: `state` is queued (stopped with the worker, run again after the
    restart), succeeded, failed or cancelled; for the last two, whether the customer's money
    goes back and how much of it the provider keeps (the announced fee for bad data)."""

    state: JobState
    error: str = ""
    refund: bool = True
    keep: int = 0
    metrics: dict = field(default_factory=dict)


class Runner:
    def __init__(self, *, settings: Settings, config: dict, store: Store, outbox: Outbox,
                 cancels: Cancels, cashier: Cashier | None, kinds: dict[int, JobKind]):
        self.settings = settings
        self.config = config
        self.store = store
        self.outbox = outbox
        self.cancels = cancels
        self.cashier = cashier
        self.active: dict[str, ActiveJob] = {}
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        # At most ``capacity[name]`` jobs of a kind at once (the config's [capacity] table).
        capacity = config.get("capacity") or {}
        self._kind_slots = {k.kind: asyncio.Semaphore(capacity[k.name]) for k in kinds.values() if k.name in capacity}
        self._devices: asyncio.Queue[str] | None = None
        if settings.devices:
            self._devices = asyncio.Queue()
            for device in settings.devices:
                self._devices.put_nowait(device)
        # Jobs get threads of their own, so long training never starves the default executor
        # that asyncio and libraries share.
        self._executor = ThreadPoolExecutor(settings.max_concurrent_jobs, thread_name_prefix="dvm-job")

    # what the rest of the worker asks --------------------------------------------------------
    def waiting(self) -> list[ActiveJob]:
        """Accepted jobs that have not started yet, oldest first."""
        return [a for a in self.active.values() if a.ctx is None]

    def running(self) -> int:
        return sum(1 for a in self.active.values() if a.ctx is not None)

    def is_full(self) -> bool:
        return self._slots.locked()

    def would_wait(self, kind: int) -> bool:
        return self._slots.locked() or (kind in self._kind_slots and self._kind_slots[kind].locked())

    def cancel(self, active: ActiveJob, reason: str) -> None:
        active.cancel_reason = reason
        if active.ctx is not None:
            active.ctx.cancel(reason)
            if active.job_task is not None and inspect.iscoroutinefunction(active.job_kind.run):
                active.job_task.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # one job --------------------------------------------------------------------------------
    async def run(self, active: ActiveJob) -> Outcome:
        request, job_kind = active.request, active.job_kind
        outcome = Outcome(JobState.FAILED)
        workdir = self.settings.jobs_dir / request.id
        kind_slot = self._kind_slots.get(request.kind) or contextlib.nullcontext()
        device = None
        limit = self.settings.time_limit(job_kind)
        try:
            async with kind_slot, self._slots:
                if active.cancel_reason:
                    raise JobCancelled(active.cancel_reason)
                if self._devices is not None:
                    device = await self._devices.get()
                self.store.set_state(request.id, JobState.RUNNING, count_attempt=True)
                crashpoint("job-running")
                loop = asyncio.get_running_loop()
                ctx = active.ctx = job_context(
                    self.settings, self.config, request, workdir, limit, refs=active.refs, device=device,
                    report=lambda pct, msg: loop.call_soon_threadsafe(self._progress, active, pct, msg))
                started = time.monotonic()
                result = await self._call_plugin(active, ctx, limit)
                if not isinstance(result, JobResult):
                    result = JobResult(result)
                metrics = dict(result.metrics, run_seconds=round(time.monotonic() - started, 3))
                if active.due:
                    await self._offer(active, result, metrics)
                    outcome = Outcome(JobState.DELIVERED, metrics=metrics)
                else:
                    await self._deliver(active, result, metrics)
                    outcome = Outcome(JobState.SUCCEEDED, metrics=metrics)
        except JobCancelled as exc:
            if exc.stopping:
                outcome = Outcome(JobState.QUEUED)  # run again after the restart
                self.store.set_state(request.id, JobState.QUEUED)
            else:   # cancelled before it started: nothing was done, the money goes back
                outcome = Outcome(JobState.CANCELLED, str(exc), refund=active.ctx is None)
        except JobTimeout:
            outcome.error = f"the job ran past its time limit of {limit:g} s"
        except JobInputError as exc:
            # The customer's data, found out only while working: the announced fee is kept.
            outcome.error, outcome.keep = str(exc), self.settings.input_error_fee
        except JobError as exc:  # e.g. an input that could not be fetched: refunded
            outcome.error = str(exc)
        except Exception as exc:
            if disk_full(exc):
                raise   # not the job's failure: it waits for room (Worker._handle), nothing is lost
            log.error("job failed in its plugin", job_id=request.id, kind=request.kind,
                      plugin=job_kind.plugin, exc_info=exc)
            outcome.error = "internal error while running the job"
        finally:
            if device is not None:
                self._devices.put_nowait(device)
            self.active.pop(request.id, None)
            self.cancels.forget(request.id)
            if active.progress_timer is not None:
                active.progress_timer.cancel()
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
        return outcome

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
            ctx.cancel(StopReason.TIME_LIMIT)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if not done:
                log.error("job ignored its time limit; its thread is left running", job_id=ctx.job_id)
            raise JobTimeout()
        try:
            return task.result()
        except asyncio.CancelledError:
            raise JobCancelled(ctx.cancel_reason or "cancelled") from None

    # progress, throttled to one feedback per progress_interval -------------------------------
    def _progress(self, active: ActiveJob, percent: float, message: str) -> None:
        if active.request.id not in self.active:
            return
        active.progress_pending = (percent, message)
        wait = active.last_progress_at + self.settings.progress_interval - time.monotonic()
        if wait <= 0:
            self._send_progress(active)
        elif active.progress_timer is None:
            active.progress_timer = asyncio.get_running_loop().call_later(wait, self._send_progress, active)

    def _send_progress(self, active: ActiveJob) -> None:
        active.progress_timer = None
        if active.progress_pending is None or active.request.id not in self.active:
            return
        percent, message = active.progress_pending
        active.progress_pending = None
        active.last_progress_at = time.monotonic()
        try:
            self.store.set_progress(active.request.id, percent, message)
        except sqlite3.OperationalError as exc:
            if not disk_full(exc):
                raise   # the progress is only for `dvm status`: a full disk does without it
        active.reply.feedback("processing", f"{percent:.0f}%" + (f" {message}" if message else ""),
                              progress=percent)

    # delivery -------------------------------------------------------------------------------
    async def _upload_artifacts(self, active: ActiveJob, result: JobResult,
                                key: str | None = None) -> list[dict]:
        """Upload the job's files: encrypted under `key` if given, else with a fresh key each
        when the request was encrypted."""
        if not result.artifacts:
            return []
        if not self.settings.blob_servers:
            raise JobError("this provider has no blob server configured to deliver result files")
        from dvm_core.transport.blobcrypt import encrypt_file
        from dvm_core.transport.blossom import BlossomClient, BlossomError
        client = BlossomClient(self.settings.blob_servers, self.outbox.keys)
        entries = []
        for artifact in result.artifacts:
            path, file_key = artifact.path, None
            if artifact.signed:
                path = await asyncio.to_thread(self._sign_file, active, artifact)
            if active.request.encrypted or key is not None:
                sealed = path.with_name(path.name + ".sealed")
                file_key = await asyncio.to_thread(encrypt_file, path, sealed, key=key)
                path = sealed
            try:
                server, blob = await client.upload_to(path, "application/octet-stream" if file_key else artifact.type)
            except BlossomError as exc:
                raise JobError(f"could not upload the result files: {exc}") from None
            if artifact.keep_days is not None:   # deleted then by the worker's sweep (`Worker._expire_blobs`)
                self.store.add_expiring_blob(server=server, sha256=blob.sha256, job_id=active.request.id,
                                             name=artifact.name or artifact.path.name,
                                             expires=time.time() + artifact.keep_days * 86400)
            entry = {"name": artifact.name or artifact.path.name, "url": blob.url, "sha256": blob.sha256,
                     "size": blob.size, "type": artifact.type}
            if file_key:
                entry |= {"encrypted": True, "key": file_key}
            entries.append(entry)
        return entries

    def _sign_file(self, active: ActiveJob, artifact: Artifact) -> Path:
        """A signed artifact (`Artifact.signed`): the file's text as the content of an event of
        kind `SIGNED_FILE_KIND` signed with the provider's key, written beside it."""
        import hashlib
        import json

        from dvm_core.jobs import SIGNED_FILE_KIND
        from dvm_core.protocol.events import sign_event
        try:
            text = artifact.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise JobError(f"the plugin asked to sign {artifact.path.name}, which is not UTF-8 text") from None
        name = artifact.name or artifact.path.name
        event = sign_event(self.outbox.keys, SIGNED_FILE_KIND, text, tags=[
            ["e", active.request.id], ["k", str(active.request.kind)], ["name", name],
            ["x", hashlib.sha256(text.encode()).hexdigest()]])
        signed = artifact.path.with_name(artifact.path.name + ".event.json")
        signed.write_text(json.dumps(event, ensure_ascii=False))
        return signed

    async def _deliver(self, active: ActiveJob, result: JobResult, metrics: dict) -> None:
        request = active.request
        artifacts = await self._upload_artifacts(active, result)
        if artifacts:
            content = result.content if isinstance(result.content, dict) else {"output": result.content}
            result = JobResult(dict(content, artifacts=artifacts), result.metrics)
        event = active.reply.result(result.payload())
        # Stored with the state change in one transaction: after a crash the result is either
        # published again or the job is run again, never both.
        def store_result() -> None:
            with self.store.atomic():
                self.store.add_outgoing(event, "result", request.id)
                self.store.set_state(request.id, JobState.SUCCEEDED, summary=metrics)
                if self.cashier is not None:
                    self.cashier.consumed(request.id)
        await when_room(store_result, job_id=request.id, what="storing the result",
                        on_wait=lambda: active.reply.feedback("processing", WAITING_MESSAGE))
        crashpoint("result-stored")
        self.outbox.send_stored(event, "result", request.id)

    def delivery_lock(self, request, job_kind) -> tuple[bytes, int]:
        """(K, locktime) of a job paid on delivery: drawn when the job is accepted and kept in
        the store (meta ``delivery-lock:<job id>``) before anything names sha256(K), so the
        terms announced with ``processing`` (`delivery_terms`) are the ones the offer asks for,
        across restarts too, when the job ends within half of ``delivery_lock_seconds`` (the
        locktime is that long after the acceptance); a job that runs longer is offered with
        fresh terms (`_offer`), so the customer's ecash is never locked longer than one lock."""
        key = DELIVERY_LOCK + request.id
        stored = self.store.get_meta(key)
        if stored:
            lock = json.loads(stored)
            return bytes.fromhex(lock["preimage"]), int(lock["locktime"])
        preimage = secrets.token_bytes(32)
        locktime = int(time.time()) + self.settings.delivery_lock_seconds
        self.store.set_meta(key, json.dumps({"preimage": preimage.hex(), "locktime": locktime}))
        return preimage, locktime

    def delivery_terms(self, request, job_kind, due: int) -> str:
        """The NUT-18 request the offer of this job will carry (HTLC on sha256(K), this job's
        key, the locktime, the customer's refund key), announced when the job is accepted so
        that the customer can make the ecash while the job runs (`Customer.prepare_delivery`)."""
        from dvm_core.protocol.ecash import htlc_hash

        preimage, locktime = self.delivery_lock(request, job_kind)
        return self._htlc_request(request, due, htlc_hash(preimage), locktime)[1]

    def _htlc_request(self, request, due: int, hash_: str, locktime: int):
        """(HtlcTerms, NUT-18 creqA) of a job paid on delivery: HTLC on `hash_`, this job's key,
        `locktime`, the customer's refund key; `due` on our mints."""
        from dvm_core.protocol.ecash import HtlcTerms, encode_payment_request

        terms = HtlcTerms(hash_, self.cashier.wallet.job_lock_pubkey(request.id), locktime, request.pay_on_delivery)
        return terms, encode_payment_request(
            payment_id=request.id[:16], amount=due, unit=self.settings.unit, mints=self.settings.mints,
            description=f"NIP-90 job {request.id}, paid on delivery", nostr_target=self.outbox.keys.npub,
            htlc=terms)

    async def _offer(self, active: ActiveJob, result: JobResult, metrics: dict) -> None:
        """Pay on delivery: seal the result under a key only the payment will reveal, and offer
        it (`protocol.delivery`). K, the sealed result and the offer are stored with the state
        `delivered` in one transaction, before the offer goes out; the checkout then waits for
        the ecash (`Checkout.collect_on_delivery`)."""
        from dvm_core.protocol.delivery import (MAX_SEALED_RESULT, DeliveryOffer, encode_sealed,
                                                seal_key)
        from dvm_core.protocol.ecash import htlc_hash
        from dvm_core.protocol.nip44 import get_conversation_key
        from dvm_core.transport.blobcrypt import encrypt_bytes
        request, keys = active.request, self.outbox.keys
        preimage, locktime = self.delivery_lock(request, active.job_kind)
        if locktime - time.time() < self.settings.delivery_lock_seconds / 2:
            # The job ran long past its announced terms: a fresh K and a full lock for the offer
            # (a customer that made ecash for the announced ones takes it back after their locktime).
            preimage = secrets.token_bytes(32)
            locktime = int(time.time()) + self.settings.delivery_lock_seconds
        conversation = get_conversation_key(keys.private_key, request.pubkey) if request.encrypted else None
        key = seal_key(preimage, conversation).hex()
        artifacts = await self._upload_artifacts(active, result, key=key)
        content = result.content if isinstance(result.content, dict) else {"output": result.content}
        hash_ = htlc_hash(preimage)
        content = dict(content, pay_on_delivery={"hash": hash_, "preimage": preimage.hex()})
        if artifacts:
            content["artifacts"] = artifacts
        payload = JobResult(content).payload()
        sealed = encode_sealed(encrypt_bytes(payload.encode(), key=key)[0])
        if len(sealed) > MAX_SEALED_RESULT:
            raise JobError(f"the result is too large to offer on delivery ({len(payload)} bytes of "
                           "JSON): nothing is charged")
        terms, creq = self._htlc_request(request, active.due, hash_, locktime)
        files = [{k: a[k] for k in ("name", "url", "sha256", "size", "type")} for a in artifacts]
        offer = DeliveryOffer(hash_, active.due, self.settings.unit, locktime, creq, sealed, files,
                              public=metrics)
        message = (f"the result is ready: pay {active.due} {self.settings.unit} on delivery (an HTLC "
                   "nutzap as the payment request asks); redeeming it gives you the key")
        event = active.reply.feedback_event("payment-required", message, content=offer.to_content(),
                                            amount_msats=active.due * 1000)
        def store_offer() -> None:
            with self.store.atomic():
                self.store.add_job_lock(terms.pubkey, request.id)
                self.store.add_delivery(job_id=request.id, preimage=preimage, hash=hash_, locktime=locktime,
                                        refund_key=terms.refund_key, price=active.due,
                                        offer=offer.to_content(), result=payload)
                self.store.add_outgoing(event, "feedback", request.id)
                self.store.set_state(request.id, JobState.DELIVERED, summary=metrics)
                self.store.delete_meta(DELIVERY_LOCK + request.id)   # K is in the delivery now
        await when_room(store_offer, job_id=request.id, what="storing the offer",
                        on_wait=lambda: active.reply.feedback("processing", WAITING_MESSAGE))
        crashpoint("delivery-offered")
        self.outbox.send_stored(event, "feedback", request.id)
