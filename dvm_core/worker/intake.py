"""Taking requests in: which events the worker asks relays for, which requests it takes, and
reading one into a job its plugin can price and run — or a refusal with the reason.

`take` decides before anything is stored (addressed to us, not dated in the future) and records
the request once, across restarts; `read` decrypts, parses and checks it (params, data
references, the plugin's `parse`), looks at its url inputs, refuses it when the DVM is busy, and
lets the plugin's `precheck` size it. Nothing here is paid for yet: every refusal costs the
customer nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from dvm_core.datarefs import DataRef, parse_data_ref
from dvm_core.jobs import JobError, JobInputError, JobKind, JobTimeout, StopReason
from dvm_core.protocol.ecash import NUTZAP_KIND
from dvm_core.protocol.encryption import DecryptionError, Scheme, decrypt
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import JobRequest, addressed_providers, is_encrypted, parse_job_request
from dvm_core.state.store import Store

from . import inputs
from .config import Settings

log = structlog.get_logger("dvm.worker")

CATCHUP_MARGIN_SECONDS = 120
FUTURE_SLACK_SECONDS = 600   # a request dated further ahead than this is not taken


@dataclass
class Job:
    """A request read and checked: what its plugin runs (`parsed`), and the scheme to answer in."""

    request: JobRequest
    job_kind: JobKind
    parsed: Any
    scheme: Scheme | None
    private_tags: list | None     # the decrypted tags, where a private request carries its token
    refs: dict[str, DataRef]      # each url input's data reference, parsed once
    paid_already: bool = False    # resumed after a restart with its payment taken


class Refused(Exception):
    """The request is not taken; `reason` goes to the customer (encrypted when the request
    was), and whatever was redeemed for it and is still held goes back with the refusal.
    `private_detail`: the reason may quote the private request, so the log masks its strings."""

    def __init__(self, reason: str, scheme: Scheme | None, private_detail: bool = True, *,
                 amount_msats: int | None = None):
        super().__init__(reason)
        self.reason, self.scheme, self.private_detail = reason, scheme, private_detail
        self.amount_msats = amount_msats   # the price, when the bid was below it


MASK = "‹private›"
INPUT_TYPES = frozenset({"text", "url", "job", "event"})   # NIP-90's own words, not the customer's


def private_strings(private_key: str, event: dict) -> list[str]:
    """What a private request holds that only its customer and this DVM may read: every string
    of its decrypted tags (but the tag names); [] for a public request or one not decryptable."""
    if not is_encrypted(event):
        return []
    try:
        tags = json.loads(decrypt(private_key, event["pubkey"], event["content"])[0])
    except (DecryptionError, ValueError, RecursionError, KeyError, TypeError):
        return []
    found: list[str] = []

    def walk(value, depth: int = 0) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list) and depth < 8:
            for item in value:
                walk(item, depth + 1)
    for tag in tags if isinstance(tags, list) else [tags]:
        walk(tag[1:] if isinstance(tag, list) else tag)
    return found


def masked(reason: str, secrets: list[str], public: frozenset[str] | set[str] = frozenset()) -> str:
    """`reason` with the private request's strings (`secrets`) replaced by ‹private›, for the
    provider's log and `dvm jobs`: the provider reads why it refused, the customer's content
    stays between the customer and the DVM. A string quoted in part (errors cut long inputs to
    80 characters) or escaped (repr, JSON) is masked too. `public` words (the kind's announced
    param names) and strings under 3 characters stay: masking them would garble the reason
    and they tell nothing."""
    variants: set[str] = set()
    for secret in secrets:
        if len(secret) < 3 or secret in public or secret in INPUT_TYPES:
            continue
        variants.update({secret, repr(secret)[1:-1], json.dumps(secret)[1:-1],
                         json.dumps(secret, ensure_ascii=False)[1:-1]})
    hidden = [False] * len(reason)
    for text in variants:
        head = text[:12]
        start = reason.find(head)
        while start != -1:
            end = start + len(head)
            while end < len(reason) and end - start < len(text) and reason[end] == text[end - start]:
                end += 1
            hidden[start:end] = [True] * (end - start)
            start = reason.find(head, start + 1)
    out = []
    for i, char in enumerate(reason):
        if not hidden[i]:
            out.append(char)
        elif i == 0 or not hidden[i - 1]:
            out.append(MASK)
    return "".join(out)


class Intake:
    def __init__(self, *, settings: Settings, config: dict, keys: Keys, kinds: dict[int, JobKind],
                 store: Store, queue_length: Callable[[], int], queue_full: Callable[[], bool],
                 unpaid: Callable[[], int], paid_already: Callable[[str], bool]):
        self.settings = settings
        self.config = config
        self.keys = keys
        self.kinds = kinds
        self.store = store
        self._queue_length = queue_length
        self._queue_full = queue_full
        self._unpaid = unpaid
        self._paid_already = paid_already
        self._precheck_slots = asyncio.Semaphore(settings.max_prechecks)
        self._precheck_executor = ThreadPoolExecutor(settings.max_prechecks, thread_name_prefix="dvm-precheck")

    def close(self) -> None:
        self._precheck_executor.shutdown(wait=False, cancel_futures=True)

    # what the worker subscribes to -----------------------------------------------------------
    def request_filters(self) -> list[dict]:
        # An event's created_at is the author's claim: it never moves `since` past our own clock.
        now = int(time.time())
        latest = self.store.latest_request_time()
        since = (min(latest, now) - CATCHUP_MARGIN_SECONDS if latest is not None
                 else now - self.settings.catchup_seconds)
        return [{"kinds": sorted(self.kinds), "since": since}]

    def nutzap_filters(self) -> list[dict]:
        # Since the newest request seen, less a margin: a nutzap for a job waiting for payment
        # while the worker was down is found again.
        return [{"kinds": [NUTZAP_KIND], "#p": [self.keys.public_key],
                 "since": self.request_filters()[0]["since"]}]

    # taking a request ------------------------------------------------------------------------
    def take(self, event: dict, size: int, resumed: bool) -> bool:
        """Whether this request is ours to answer, recorded (once: False if seen before)."""
        providers = addressed_providers(event)
        if providers and self.keys.public_key not in providers and not self.settings.accept_jobs_for_others:
            return False  # addressed to other DVMs
        if is_encrypted(event) and self.keys.public_key not in providers:
            return False  # private to another DVM: we could not read it anyway
        if resumed:
            return True
        if event["created_at"] > time.time() + FUTURE_SLACK_SECONDS:
            # Dated in the future: recorded, it would move where the next catch-up starts.
            log.warning("request dated in the future ignored", job_id=event["id"],
                        ahead_seconds=int(event["created_at"] - time.time()))
            return False
        # An oversized request is recorded without its body: the store keeps no stranger's megabytes.
        recorded = event if size <= self.settings.max_request_bytes else \
            dict(event, content="", tags=[t for t in event["tags"][:16] if t and t[0] in ("p", "encrypted")])
        return self.store.record_request(recorded)  # False: seen before (another relay, a restart)

    async def read(self, event: dict, size: int, resumed: bool) -> Job:
        """The request (`size` bytes of JSON) as a job its plugin accepted and sized, or Refused."""
        scheme: Scheme | None = None
        try:
            if size > self.settings.max_request_bytes:
                raise JobInputError(f"the request is {size} bytes; this DVM accepts at most "
                                    f"{self.settings.max_request_bytes}: send large inputs by URL")
            private_tags = None
            if is_encrypted(event):
                try:
                    plaintext, scheme = decrypt(self.keys.private_key, event["pubkey"], event["content"])
                except DecryptionError as exc:
                    raise JobInputError(str(exc)) from None
                try:
                    private_tags = json.loads(plaintext)
                except (ValueError, RecursionError):
                    raise JobInputError("the decrypted content is not JSON: it must be a JSON "
                                        "array of i and param tags") from None
            request = parse_job_request(event, private_tags)
            job_kind = self.kinds[request.kind]
            refs = _check_inputs(request, job_kind)
            parsed = job_kind.parse(request) if job_kind.parse else request
            paid_already = resumed and self._paid_already(request.id)
            if not paid_already:
                await inputs.probe(self.settings, refs.values())  # a paid job's are retried, then refunded
        except JobInputError as exc:
            raise Refused(str(exc), scheme) from None
        except Exception:
            log.exception("plugin failed to parse a request", kind=event["kind"])
            raise Refused("internal error while reading the request", scheme) from None
        self._admit(resumed, scheme)
        if job_kind.precheck is not None and not paid_already:
            parsed = await self._precheck(request, job_kind, parsed, scheme, refs)
        return Job(request, job_kind, parsed, scheme, private_tags, refs, paid_already)

    def _admit(self, resumed: bool, scheme: Scheme | None) -> None:
        """Refuse a new request the DVM has no room for (a resumed one was admitted before)."""
        if resumed:
            return
        waiting = self._queue_length()
        if waiting >= self.settings.max_queued_jobs and self._queue_full():
            raise Refused(f"busy: {waiting} jobs are waiting and this DVM queues at most "
                          f"{self.settings.max_queued_jobs}; nothing was charged, try again later",
                          scheme, private_detail=False)
        unpaid = self._unpaid()
        if unpaid >= self.settings.max_unpaid_jobs:
            # Each holds a coroutine (and a subscription) until paid or payment_timeout.
            raise Refused(f"busy: {unpaid} jobs are waiting for payment, the most this DVM keeps; "
                          "nothing was charged, try again later", scheme, private_detail=False)

    async def _precheck(self, request: JobRequest, job_kind: JobKind, parsed: Any, scheme: Scheme | None,
                        refs: dict[str, DataRef]) -> Any:
        """The plugin's look at the inputs before pricing and payment (`JobKind.precheck`): the
        job with its real size, or Refused for data it cannot use."""
        workdir = self.settings.jobs_dir / f"{request.id}.precheck"
        loop = asyncio.get_running_loop()
        limit = self.settings.precheck_seconds
        ctx = inputs.job_context(self.settings, self.config, request, workdir, limit, refs=refs,
                                 fetch_attempts=1, step="precheck")
        try:
            async with self._precheck_slots:
                context = contextvars.copy_context()
                task = loop.run_in_executor(self._precheck_executor, context.run,
                                            job_kind.precheck, ctx, parsed)
                done, _ = await asyncio.wait({task}, timeout=limit)
                if not done:
                    ctx.cancel(StopReason.TIME_LIMIT)
                    # It ends in its thread with JobTimeout; nobody awaits it any more, and an
                    # exception never retrieved would be logged as an error of the worker's.
                    task.add_done_callback(lambda t: t.cancelled() or t.exception())
                    raise Refused(f"reading the inputs took longer than {limit:g} s, the most this "
                                  "DVM spends before a job is paid; send a smaller dataset", scheme)
                return task.result()
        except (JobInputError, JobTimeout) as exc:
            raise Refused(str(exc) or "the inputs could not be read in time", scheme) from None
        except JobError as exc:
            raise Refused(f"the inputs could not be read: {exc}", scheme) from None
        except Refused:
            raise
        except Exception:
            log.exception("plugin failed to check a request's inputs", kind=request.kind)
            raise Refused("internal error while checking the inputs; nothing was charged", scheme) from None
        finally:
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)


def event_size(event: dict) -> int:
    """The request's size in bytes, as JSON: what `max_request_bytes` bounds."""
    return len(json.dumps(event, ensure_ascii=False).encode())


def _check_inputs(request: JobRequest, job_kind: JobKind) -> dict[str, DataRef]:
    """Only the params the kind announces; every url input a valid data reference (returned
    by URL, parsed once for the probe, the precheck and the run)."""
    if job_kind.params is not None:
        unknown = sorted(set(request.params) - set(job_kind.params))
        if unknown:
            accepted = ", ".join(sorted(job_kind.params)) or "none"
            raise JobInputError(f"unknown param(s) {', '.join(unknown)} for kind "
                                f"{request.kind} ({job_kind.name}); accepted: {accepted}")
    refs = {}
    for job_input in request.inputs:
        if job_input.type == "url":
            try:
                refs[job_input.data] = parse_data_ref(job_input.data)
            except ValueError as exc:
                raise JobInputError(f"input {job_input.data[:80]!r}: {exc}") from None
    return refs
