"""The DVM worker: takes NIP-90 job requests from relays, runs them through plugins, answers.

`Worker` wires the parts and walks each request through them in one straight line
(`_handle`):

1. `Intake.take` — ours to answer? recorded once, across restarts;
2. `Intake.read` — decrypted, parsed, checked, inputs probed, room in the queue, sized by the
   plugin's precheck (or `Refused`, answered by `_refuse`);
3. `Checkout.pay` — priced (`Offer.price`) and paid (`Cashier.collect`), or `Refused`;
4. queued with `processing` feedback, then `Runner.run` — run under slots, a time limit and
   cancellation, the result stored with the job's end and published by the `Outbox` (paid on
   delivery: the result sealed and offered instead, then `Checkout.collect_on_delivery` takes
   the hash-locked ecash and sends the result);
5. a job that did not deliver is ended by `_end_job`: refund, state and error in one
   transaction.

After a crash, stored results are published again and jobs that were taken in, queued or
running are read again and resumed, so each request gets exactly one answer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pluggy
import structlog

from dvm_core.jobs import JobKind, StopReason
from dvm_core.payments.cashier import Cashier, Paid
from dvm_core.payments.crashpoints import crashpoint
from dvm_core.protocol.ecash import NUTZAP_KIND
from dvm_core.protocol.encryption import DecryptionError, decrypt
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import DELETION_KIND, JobRequest, deleted_event_ids, is_encrypted
from dvm_core.state.jobstate import ACTIVE, AWAITING_PAYMENT, JobState
from dvm_core.state.store import Store, disk_full

from .cancels import Cancels
from .checkout import Checkout, Due
from .config import Config, ConfigError
from .intake import Intake, Job, Refused, event_size, masked, private_strings
from .offer import Offer
from .outbox import Outbox, Reply
from .plugins import collect_job_kinds, plugin_manager
from .room import WAITING_MESSAGE, log_full, retry_delay, when_room
from .runner import DELIVERY_LOCK, STOP_GRACE_SECONDS, ActiveJob, Outcome, Runner

log = structlog.get_logger("dvm.worker")

MAX_CRASHES = 2              # a job that took the worker down this often is failed and refunded
HANDLING_MARGIN = 256        # requests being read or refused at once, beyond those queued or unpaid
DEFERRED_BATCH = 64          # requests taken up from the store at a time


class Worker:
    """One DVM: its relays (`pool`, a `RelayPool` unless one is given), its store, its plugins'
    job kinds, and, when mints are configured, its cashier."""

    def __init__(self, config: Config, keys: Keys, pm: pluggy.PluginManager | None = None, *, pool=None):
        self.config = config
        self.settings = s = config.settings
        self.keys = keys
        self.pm = pm or plugin_manager()
        self.kinds: dict[int, JobKind] = collect_job_kinds(self.pm, config.raw)
        self._state_lock = lock_state_dir(Path(s.state_dir))
        self.store = Store(s.store_path)
        if pool is None:
            from dvm_core.transport.relay import RelayPool
            pool = RelayPool(s.relays)
        self.pool = pool
        self.pool.set_handler(self._on_event)
        self.ready = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._heartbeat_task: asyncio.Task | None = None
        self._expiry_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()      # background work: publishing, heartbeat
        self._requests: set[asyncio.Task] = set()   # one per request being handled
        self._handling: Counter[str] = Counter()    # their request ids
        # Requests with a task each, at most; beyond (or while the outbox is congested), new
        # requests are recorded and wait in the store, not in memory (issue 19's flood).
        self.max_handling = s.max_queued_jobs + s.max_unpaid_jobs + s.max_concurrent_jobs + HANDLING_MARGIN
        self._deferred_after: int | None = None     # requests recorded after this jobs rowid wait there
        self.counts = {"received": 0, "rejected": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
        self.outbox = Outbox(pool=self.pool, store=self.store, keys=keys, relay_hint=s.relays[0],
                             spawn=self._spawn)
        self.cancels = Cancels(self.pool, self._spawn)
        self.cashier: Cashier | None = self._open_cashier() if s.mints else None
        self.offer = Offer(settings=s, config=config.raw, kinds=self.kinds, pm=self.pm,
                           public_key=keys.public_key)
        self.runner = Runner(settings=s, config=config.raw, store=self.store, outbox=self.outbox,
                             cancels=self.cancels, cashier=self.cashier, kinds=self.kinds)
        self.checkout = Checkout(settings=s, offer=self.offer, cashier=self.cashier, cancels=self.cancels,
                                 store=self.store)
        self.intake = Intake(settings=s, config=config.raw, keys=keys, kinds=self.kinds, store=self.store,
                             queue_length=lambda: len(self.runner.waiting()), queue_full=self.runner.is_full,
                             unpaid=lambda: len(self.checkout.unpaid),
                             paid_already=self._paid_already)

    def _paid_already(self, job_id: str) -> bool:
        """A resumed job that is not asked to pay again: its payment was taken, or its result
        was sealed and offered (paid on delivery)."""
        return self.cashier is not None and (self.cashier.paid_for(job_id)
                                             or self.store.delivery(job_id) is not None)

    def _open_cashier(self) -> Cashier:
        from dvm_core.payments.nutshell import preload
        from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
        from dvm_core.payments.wallet import EcashWallet
        preload()  # Nutshell's import has process-wide side effects: take them now, contained
        directory = self.settings.wallet_dir
        wallet = EcashWallet(directory=directory, accepted_mints=self.settings.mints,
                             unit=self.settings.unit,
                             p2pk_private_key=load_or_create_p2pk_key(directory / "p2pk.key"))

        async def publish(event, role, job_id):  # the event is in the outbox already
            return await self.outbox.publish(event, role=role, job_id=job_id, stored=True)

        return Cashier(wallet=wallet, store=self.store, keys=self.keys, mints=self.settings.mints,
                       unit=self.settings.unit, sign=self.outbox.sign, publish=publish,
                       query=self.pool.query, spawn=self._spawn,
                       mint_retry_seconds=self.settings.mint_retry_seconds,
                       payment_timeout=self.settings.payment_timeout)

    # lifecycle ------------------------------------------------------------
    async def start(self, connect_timeout: float = 10.0) -> None:
        if not self.kinds:
            log.warning("no job kinds registered: install a plugin or check DVM_PLUGINS")
        if not await self.pool.start(wait=connect_timeout):
            log.warning("no relay answered yet; still trying", relays=self.settings.relays)
        await self.pool.subscribe("dvm-requests", self.intake.request_filters)
        if self.cashier is not None:
            await self.pool.subscribe("dvm-nutzaps", self.intake.nutzap_filters)
        self._recover()
        if self.cashier is not None:
            self.cashier.start()
        if self.settings.announce and self.kinds:
            self.outbox.send(self.outbox.sign(*self.announcement()), role="announcement")
        if self.cashier is not None:
            self.outbox.send(self.outbox.sign(*self.cashier.nutzap_info(self.settings.relays)),
                             role="announcement")
        if self.settings.announce and self.kinds and self.settings.heartbeat_seconds > 0:
            self._heartbeat_task = self._spawn(self._heartbeat())
        if self.cashier is not None:
            self._spawn(self._check_mints())
        self._expiry_task = self._spawn(self._expire_blobs())
        self.ready.set()
        log.info("worker ready", npub=self.keys.npub, kinds=sorted(self.kinds),
                 relays=self.settings.relays)

    async def run(self) -> None:
        """Start, then serve until `stop()` is called."""
        await self.start()
        await self._stopped.wait()

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop taking jobs; give running ones `grace` seconds, then stop them and put them back
        in the queue (in the store) so the next start runs them. Each wait is logged before it
        starts, and the last line counts, from the store, what the next start takes up."""
        if self._stopping:
            return
        started = time.monotonic()
        self._stopping = self.outbox.stopping = True
        self.cancels.stop()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()   # it sleeps between announcements: nothing to wait for
        if self._expiry_task is not None:
            self._expiry_task.cancel()      # what it did not delete stays in the store for the next start
        log.info("worker stopping", active=len(self.runner.active), running=self.runner.running(),
                 grace_seconds=grace)
        await self.pool.unsubscribe("dvm-requests")
        for attempt in range(2):   # first let them finish, then stop them and let them wind down
            if attempt:
                for active in list(self.runner.active.values()):
                    self.runner.cancel(active, StopReason.WORKER_STOPPING)
            tasks = [a.task for a in self.runner.active.values() if a.task is not None and not a.task.done()]
            if tasks:
                jobs = [job_id for job_id, a in self.runner.active.items() if a.task in tasks]
                if attempt:
                    log.info("stopping the jobs still running; they are queued again for the next start",
                             jobs=jobs, wait_seconds=grace)
                else:
                    log.info("waiting for the jobs in progress to finish", jobs=jobs, wait_seconds=grace)
                await asyncio.wait(tasks, timeout=grace)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            log.info("waiting for background work (publishing, payments)", wait_seconds=2.0,
                     tasks=_task_names(pending))
            await asyncio.wait(pending, timeout=2.0)
        left = [t for t in self._tasks | self._requests if not t.done()]
        if left:
            log.info("cancelling what is still in progress; the store keeps it for the next start",
                     tasks=_task_names(left))
        for task in left:
            task.cancel()  # what is left is in the outbox and goes out after the next start
        log.info("closing relay connections", relays=len(self.settings.relays))
        await self.pool.close()
        if self.cashier is not None:
            await self.cashier.wallet.close()
        try:
            left_over = self.store.left_over()
            next_start = _next_start(left_over)
        except Exception as exc:   # the count must not keep the worker from stopping
            left_over, next_start = {}, f"not counted: the store could not be read ({exc})"
        self.store.close()
        self.outbox.closed = True
        self._state_lock.close()   # another worker may use this state directory now
        self.runner.close()
        self.intake.close()
        log.info("worker stopped", seconds=round(time.monotonic() - started, 1),
                 next_start=next_start, **left_over)
        self._stopped.set()

    def _spawn(self, coro, tasks: set[asyncio.Task] | None = None) -> asyncio.Task:
        tasks = self._tasks if tasks is None else tasks
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

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
            await self.outbox.publish(self.outbox.sign(*self.announcement()), role="announcement")

    async def _expire_blobs(self) -> None:
        """Delete result files whose time is up (`Artifact.keep_days`, `expiry.sweep`): at start,
        then every `blob_sweep_seconds`."""
        from .expiry import sweep
        while not self._stopping:
            try:
                await sweep(self.store, self.keys, retry_seconds=self.settings.blob_retry_seconds)
            except sqlite3.OperationalError as exc:
                if not disk_full(exc):
                    raise
                log.warning("could not record an expired file's deletion: the disk is full", error=str(exc))
            await asyncio.sleep(self.settings.blob_sweep_seconds)

    def status_line(self) -> str:
        """One line for systemd's STATUS= and the logs."""
        running = self.runner.running()
        earned = ", ".join(f"{v} {u}" for u, v in self.store.earnings().items()) or "0"
        return (f"queued {len(self.runner.active) - running}, running {running}, "
                f"done {self.counts['succeeded']}, failed {self.counts['failed']}, earned {earned}")

    def announcement(self) -> tuple[int, str, list[list[str]]]:
        running = self.runner.running()
        payment = {"p2pk_pubkey": self.cashier.p2pk_pubkey} if self.cashier is not None else None
        return self.offer.announcement(queued=len(self.runner.active) - running, running=running,
                                       payment=payment)

    # restarts --------------------------------------------------------------
    def _recover(self) -> None:
        """Resume the jobs a stop left unfinished: at most `max_handling` at once, the rest (a
        flood cut short) a page at a time as room frees (`_resume_rest`), never all at once and
        never forgotten."""
        self.outbox.resend_unpublished()
        states = tuple(s.value for s in ACTIVE + AWAITING_PAYMENT)
        end = self.store.last_rowid()   # requests recorded after the start are not resumed ones
        rows = self.store.unfinished_after(states, 0, self.max_handling)
        after = self._resume(rows)
        if len(rows) == self.max_handling:
            self._spawn(self._resume_rest(states, after, end))

    def _resume(self, rows: list) -> int:
        """Resume these (rowid, job) of the store; the last rowid."""
        after = 0
        for after, record in rows:
            if record.id in self._handling:
                continue
            if self.store.outgoing_for_job(record.id, "result") is not None:
                self.store.set_state(record.id, JobState.SUCCEEDED)
                continue
            if record.state == JobState.RUNNING and self.store.count_crash(record.id) >= MAX_CRASHES:
                self._give_up(record)
                continue
            log.info("resuming job after restart", job_id=record.id, state=record.state)
            self._spawn_request(record.request, self._handle(record.request, resumed=True))
        return after

    async def _resume_rest(self, states: tuple[str, ...], after: int, end: int) -> None:
        """The unfinished jobs beyond the first `max_handling` after a restart, up to rowid
        `end`, a page at a time as the worker has room for them."""
        while not self._stopping and after < end:
            room = self.max_handling - len(self._handling)
            if self.outbox.congested or room < max(1, self.max_handling // 4):
                await asyncio.sleep(0.05)
                continue
            rows = [(rowid, record) for rowid, record in
                    self.store.unfinished_after(states, after, min(DEFERRED_BATCH, room)) if rowid <= end]
            if not rows:
                return
            after = self._resume(rows)
            await asyncio.sleep(0)

    def _give_up(self, record) -> None:
        """A job that took the worker down MAX_CRASHES times is not run again: failed, refunded,
        and its customer told, in one transaction."""
        event, scheme = record.request, None
        if is_encrypted(event):
            try:
                _, scheme = decrypt(self.keys.private_key, event["pubkey"], event["content"])
            except DecryptionError:
                scheme = None
        error = (f"this job stopped the worker {MAX_CRASHES} times (it ran out of memory or crashed "
                 "it); it is not run again")
        log.error("job gave up after crashing the worker", job_id=record.id, crashes=MAX_CRASHES)
        self._end_job(Reply(_bare_request(event), scheme, self.outbox), JobState.FAILED, error)
        self.counts["failed"] += 1

    # incoming events -------------------------------------------------------
    def _on_event(self, event: dict, relay_url: str) -> None:
        if event["kind"] == DELETION_KIND:
            self._on_deletion(event)
        elif event["kind"] in self.kinds and not self._stopping:
            self._take_request(event)
        elif event["kind"] == NUTZAP_KIND and self.cashier is not None:
            self.cashier.on_nutzap(event)

    def _on_deletion(self, event: dict) -> None:
        for job_id in deleted_event_ids(event):
            if self.checkout.unpaid.get(job_id) == event["pubkey"] and self.cashier is not None:
                log.info("job cancelled by the customer before paying", job_id=job_id)
                self.cashier.cancel_waiting(job_id)
                continue
            active = self.runner.active.get(job_id)
            if active is not None and active.request.pubkey == event["pubkey"]:
                log.info("job cancelled by the customer", job_id=job_id)
                self.runner.cancel(active, StopReason.CUSTOMER)

    # requests waiting in the store -----------------------------------------
    def _spawn_request(self, event: dict, coro) -> asyncio.Task:
        task = self._spawn(coro, self._requests)
        event_id = event["id"]
        self._handling[event_id] += 1

        def ended(_task, handling=self._handling):
            handling[event_id] -= 1
            if handling[event_id] <= 0:
                del handling[event_id]
        task.add_done_callback(ended)
        return task

    def _saturated(self) -> bool:
        return len(self._handling) >= self.max_handling or self.outbox.congested

    def _take_request(self, event: dict) -> None:
        """A new request gets a task of its own, or, when the worker has as many as it keeps or
        its answers wait for the relays (the outbox is congested), is recorded and waits in the
        store for `_take_up_deferred`: a flood of any length costs the store, not memory.

        One already handled here, or recorded (seen on another relay, or again after a restart),
        gets no task: a task, even one that would end at once as "seen before", would stand in
        `_handling` for the job, and `_recover` or `_take_up_deferred` would leave the recorded
        job to it (a request recorded just before a kill, sent again by the relay as the worker
        came back, was never resumed)."""
        try:
            if event["id"] in self._handling or self.store.job_rowid(event["id"]) is not None:
                return
        except Exception:   # the store unreadable: the request's own task finds out and says so
            pass
        if self._deferred_after is None and not self._saturated():
            self._spawn_request(event, self._handle(event))
            return
        try:
            size = event_size(event)
            if size > self.settings.max_request_bytes:
                # Recorded without its body, it could not be read again: refused now, at once.
                self._spawn_request(event, self._handle(event))
                return
            if not self.intake.take(event, size, resumed=False):
                return
            rowid = self.store.job_rowid(event["id"]) if self._deferred_after is None else None
        except Exception:   # e.g. a full disk: its own task takes it, and waits for room
            self._spawn_request(event, self._handle(event))
            return
        if rowid is not None:
            self._deferred_after = rowid - 1
            log.info("busy: new requests wait in the store", handling=len(self._handling),
                     publishing=self.outbox.in_flight)
            self._spawn(self._take_up_deferred())

    async def _take_up_deferred(self) -> None:
        """The requests that wait in the store, oldest first, a batch at a time as room frees."""
        while not self._stopping:
            if self.outbox.congested or len(self._handling) > self.max_handling * 3 // 4:
                await asyncio.sleep(0.05)
                continue
            limit = min(DEFERRED_BATCH, self.max_handling - len(self._handling))
            rows = self.store.received_after(self._deferred_after, limit)
            for rowid, event in rows:
                self._deferred_after = rowid
                if event["id"] not in self._handling:
                    self._spawn_request(event, self._handle(event, taken=True))
            if len(rows) < limit:
                self._deferred_after = None   # none wait any more
                log.info("no more requests wait in the store")
                return
            await asyncio.sleep(0)

    # one request, from the relay to its answer -----------------------------
    async def _handle(self, event: dict, resumed: bool = False, waited: int = 0, taken: bool = False) -> None:
        """`waited`: how many times this request already waited for room in the store;
        `taken`: recorded already, it waited in the store for its turn."""
        reply = None
        try:
            size = event_size(event)
            if not taken and not self.intake.take(event, size, resumed):
                return
            crashpoint("request-recorded")
            with structlog.contextvars.bound_contextvars(job_id=event["id"]):
                if not resumed:
                    self.counts["received"] += 1
                try:
                    job = await self.intake.read(event, size, resumed)
                    reply = Reply(job.request, job.scheme, self.outbox)
                    if resumed and self._delivered(job.request.id):   # offered before a restart
                        active = ActiveJob(request=job.request, job_kind=job.job_kind, parsed=job.parsed,
                                           reply=reply)
                        await self._collect_on_delivery(active, Outcome(JobState.DELIVERED))
                        return
                    paid = await self.checkout.pay(job, reply)
                except Refused as refusal:
                    self._refuse(reply or Reply(_bare_request(event), refusal.scheme, self.outbox), refusal)
                    return
                active = self._queue(job, reply, paid, resumed, after_wait=bool(waited))
                await asyncio.sleep(0)  # let the feedback go out before the job's bookkeeping
                active.task = asyncio.current_task()
                outcome = await self.runner.run(active)
                if outcome.state == JobState.DELIVERED:
                    await self._collect_on_delivery(active, outcome)
                    return
                await self._finish_when_room(active, outcome)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not disk_full(exc):
                log.error("event handler failed", error=repr(exc))
            elif self._stopping:
                log.error("the state directory's disk is full: the job goes on after the next start",
                          job_id=event["id"], state_dir=self.settings.state_dir)
            else:
                self._wait_for_room(event, reply, waited)

    def _wait_for_room(self, event: dict, reply: Reply | None, waited: int) -> None:
        """The store refused a write before the job's work began: the disk under the state
        directory is full. The store holds the request as far as it got (each step is one
        transaction), so it waits, and once there is room it is taken up again the way it would
        be after a restart. The customer is told why it waits (`room`)."""
        delay = retry_delay(waited)
        log_full(event["id"], "taking the request", waited, delay)
        if waited == 0 and reply is not None:
            reply.feedback("processing", WAITING_MESSAGE)
        self._spawn_request(event, self._when_room(event, waited + 1, delay))

    async def _when_room(self, event: dict, waited: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return   # what the store holds of it resumes after the next start
        record = self.store.get_job(event["id"])
        if record is not None and record.state not in ACTIVE + AWAITING_PAYMENT:
            return   # it ended: the write that failed came after its end was stored
        await self._handle(event, resumed=record is not None, waited=waited)

    def _delivered(self, job_id: str) -> bool:
        record = self.store.get_job(job_id)
        return record is not None and record.state == JobState.DELIVERED

    async def _collect_on_delivery(self, active: ActiveJob, outcome: Outcome) -> None:
        """Paid on delivery: the result is sealed and offered; wait for the ecash, then end."""
        state, error = await self.checkout.collect_on_delivery(active.request, active.reply)
        await self._finish_when_room(active, Outcome(state, error, refund=False, metrics=outcome.metrics))

    async def _finish_when_room(self, active: ActiveJob, outcome: Outcome) -> None:
        """`_finish`, waiting for room on a full disk: the job is done, its end is not redone."""
        await when_room(lambda: self._finish(active, outcome), job_id=active.request.id, what="ending the job",
                        on_wait=lambda: active.reply.feedback("processing", WAITING_MESSAGE))

    def _queue(self, job: Job, reply: Reply, paid: Paid | Due | None, resumed: bool,
               after_wait: bool = False) -> ActiveJob:
        request = job.request
        self.store.set_state(request.id, JobState.QUEUED)
        crashpoint("job-queued")
        due = paid.price if isinstance(paid, Due) else 0
        paid = None if isinstance(paid, Due) else paid
        active = ActiveJob(request=request, job_kind=job.job_kind, parsed=job.parsed, reply=reply,
                           refs=job.refs, paid=paid, due=due)
        self.runner.active[request.id] = active
        self.cancels.watch(request.id)
        if after_wait:   # it waited for room on a full disk
            message = "there is room again: job " + ("resumed" if resumed else "accepted")
        else:
            message = "resumed after a restart" if resumed else "job accepted"
        if self.runner.would_wait(request.kind):
            message += f"; queued, position {len(self.runner.waiting())}"
        if paid is not None:
            message += f"; paid {min(paid.amount, paid.price)} {paid.unit}"
            if paid.warning:
                message += f". {paid.warning}"
        terms = ""
        if due:
            message += (f"; you pay {due} {self.settings.unit} on delivery, when the result is ready "
                        "(nothing now; the ecash may be made now, as the terms below ask)")
            terms = self.runner.delivery_terms(request, job.job_kind, due)   # K kept before it is named
        reply.feedback("processing", message, content=terms)
        return active

    def _finish(self, active: ActiveJob, outcome: Outcome) -> None:
        request = active.request
        if active.due and outcome.state in (JobState.FAILED, JobState.CANCELLED):
            self.store.delete_meta(DELIVERY_LOCK + request.id)   # never offered: K named nothing paid
        if outcome.state in (JobState.FAILED, JobState.CANCELLED):
            self._end_job(active.reply, outcome.state, outcome.error,
                          refund=outcome.refund and active.paid is not None, keep=outcome.keep)
        if outcome.state != JobState.QUEUED:
            self.counts[outcome.state.value] += 1
        log.info("job finished", job_id=request.id, kind=request.kind, job_kind=active.job_kind.name,
                 outcome=outcome.state.value, error=outcome.error or None, encrypted=request.encrypted,
                 seconds=round(time.monotonic() - active.started, 3), metrics=outcome.metrics)

    # answers that end a job -------------------------------------------------
    def _refuse(self, reply: Reply, refusal: Refused) -> None:
        """A request not taken: rejected with the reason, and what was redeemed for it and is
        still held (a resumed job was paid before the restart) refunded, in one transaction."""
        reason = refusal.reason
        with self.store.atomic():
            if self.cashier is not None and self.cashier.refund_job(reply.request, reason):
                reason += "; what was redeemed was refunded as a nutzap"
            elif self.cashier is not None and self.cashier.return_unfinished(reply.request.id, reason):
                reason += "; your payment, whose redemption a restart cut short, is sent back as a nutzap"
            # The reason can quote decrypted params: for a private request the provider's log and
            # store get it with the customer's strings masked; the customer gets it whole.
            private = reply.scheme is not None and refusal.private_detail
            logged = reason
            if private:
                job_kind = self.kinds.get(reply.request.kind)
                logged = masked(reason, private_strings(self.keys.private_key, reply.request.event),
                                public=set(job_kind.params or {}) if job_kind else set())
            log.warning("request rejected", kind=reply.request.kind, reason=logged,
                        private=reply.scheme is not None)
            self.counts["rejected"] += 1
            self.store.set_state(reply.request.id, JobState.REJECTED, error=logged)
            reply.final_error(reason, refusal.amount_msats)
        if self.cashier is not None:
            self.cashier.settle(reply.request.id)   # nutzaps kept for it go back

    def _end_job(self, reply: Reply, state: JobState, error: str, *, refund: bool = True, keep: int = 0) -> None:
        """A job that will not deliver: the refund owed (less `keep`), its end and the customer's
        error feedback, in one transaction."""
        with self.store.atomic():
            refunded = self.cashier.refund_job(reply.request, error, keep=keep) \
                if refund and self.cashier is not None else 0
            message = error
            if refunded:
                message += f"; your {refunded} {self.settings.unit} were refunded as a nutzap"
            self.store.set_state(reply.request.id, state, error=error)
            reply.final_error(message)


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


def _task_names(tasks) -> dict[str, int]:
    """Tasks counted by what they run (e.g. {"Outbox.publish": 2}), for the stop's log lines."""
    names: dict[str, int] = {}
    for task in tasks:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", None) or task.get_name()
        names[name] = names.get(name, 0) + 1
    return names


def _next_start(left: dict[str, int]) -> str:
    """`Store.left_over` in words: what the next start resumes, sends or redeems."""
    words = [("jobs_queued", "job(s) queued to run"), ("jobs_running", "job(s) running to run again"),
             ("jobs_unpaid", "request(s) waiting for payment"),
             ("jobs_delivered", "result(s) offered, waiting for payment on delivery"),
             ("outbox_unsent", "event(s) to publish"), ("payments_unredeemed", "token(s) to redeem"),
             ("payouts_unsent", "refund/change payout(s) to send"),
             ("nutzaps_pending", "nutzap(s) kept for their job")]
    said = [f"{left[key]} {text}" for key, text in words if left.get(key)]
    return ("resumes " + ", ".join(said)) if said else "nothing left to resume"


def _bare_request(event: dict) -> JobRequest:
    """Enough of a request to answer it, for one that could not be parsed."""
    return JobRequest(id=event["id"], pubkey=event["pubkey"], kind=event["kind"],
                      created_at=event["created_at"], encrypted=is_encrypted(event), event=event)
