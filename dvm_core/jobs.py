"""What a plugin works with: the job kind it registers, the context a job runs in, its result.

These are the objects named in `hookspecs.py`; read that module first.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import JobCancelled, JobError, JobInputError, JobTimeout, StopReason
from .protocol.nip90 import JobRequest

__all__ = ["StopReason", "JobCancelled", "JobError", "JobInputError", "JobTimeout",
           "Artifact", "SIGNED_FILE_KIND", "SignedFile", "open_signed_file", "JobResult", "JobKind", "JobContext",
           "TranscriptChecker"]


@dataclass(frozen=True)
class Artifact:
    """A file a job produced (weights, a model card, a plot). The worker uploads it to the
    provider's Blossom servers, encrypted with a fresh key when the request was private, and
    the result lists its URL, sha256, size and type (and key, inside the encrypted result).

    `signed`: the file is a statement the provider stands behind (a training transcript): the
    worker delivers, in its place, a Nostr event of kind `SIGNED_FILE_KIND` signed with the
    provider's key, whose content is the file's text (UTF-8) and whose tags name the request
    (``e``), its kind (``k``), the file (``name``) and the sha256 of the content (``x``). A plugin
    never sees the key; the customer checks the signature against the provider's pubkey.

    `keep_days`: the file is kept for this many days only (a training transcript's checkpoints,
    for the retention the provider announces): the worker records the blob in its store when it
    uploads it and deletes it from the blob server once that time has passed (BUD-02 ``DELETE``;
    retried until the server answers, across restarts). None: the worker never deletes it."""

    path: Path
    type: str = "application/octet-stream"
    name: str | None = None
    signed: bool = False
    keep_days: float | None = None


SIGNED_FILE_KIND = 1750   # a file a provider signed for a job (docs/protocol.md)


@dataclass(frozen=True)
class SignedFile:
    """A file a provider signed (`Artifact.signed`), its signature checked."""

    text: str
    pubkey: str                 # the signer, hex
    job_id: str | None          # the request it was made for (the ``e`` tag)
    name: str | None


def open_signed_file(data: str | bytes) -> SignedFile:
    """Read a signed file (the JSON of a kind-`SIGNED_FILE_KIND` event): check its id, signature
    and content hash, or raise ValueError. Whose key signed it is the caller's to judge."""
    from .protocol.events import InvalidEvent, verify_event

    try:
        event = verify_event(json.loads(data))
    except (InvalidEvent, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a signed file: {exc}") from None
    if event["kind"] != SIGNED_FILE_KIND:
        raise ValueError(f"not a signed file: an event of kind {event['kind']}, not {SIGNED_FILE_KIND}")
    tags = {t[0]: t[1] for t in event["tags"] if len(t) >= 2}
    if tags.get("x") not in (None, hashlib.sha256(event["content"].encode()).hexdigest()):
        raise ValueError("not a signed file: its x tag is not the sha256 of its content")
    return SignedFile(event["content"], event["pubkey"], tags.get("e"), tags.get("name"))


@dataclass
class JobResult:
    """What a job returns. `content` is the result event's payload (a dict is sent as JSON);
    `artifacts` are files to upload (their descriptors are added to a dict content under
    "artifacts"); `metrics` go to the log's summary line and the store."""

    content: str | dict | list
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)

    def payload(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return json.dumps(self.content, separators=(",", ":"), ensure_ascii=False)


@dataclass
class JobKind:
    """A job kind a plugin serves.

    :param kind: the request kind (5000-5999); the result is `kind + 1000`. A provider can
        move it with `[kinds] <name> = <number>` in the config.
    :param name: short stable name, e.g. ``"image-classifier"``; config sections use it.
    :param description: one paragraph for customers (goes into the NIP-89 announcement).
    :param run: ``run(ctx, job) -> JobResult``; `job` is what `parse` returned. A plain
        function runs in a worker thread (training is blocking work); an ``async def`` runs on
        the event loop and must not block it.
    :param parse: ``parse(request) -> job``: check the request and turn it into whatever `run`
        wants. Raise `JobInputError` with a message for the customer. It runs before any work
        or payment, on the event loop: keep it quick and free of I/O. Default: the request.
    :param params: each param name this kind accepts, with a one-line description (also sent
        in the NIP-89 announcement). A request with a param not listed here is refused with a
        clear error, unless `params` is None.
    :param time_limit: seconds a job may run (default: the worker's `job_time_limit`).
    :param price: ``price(job) -> int``: this kind's price for one job, in the worker's unit,
        from what `precheck` (else `parse`) returned; it must come with `pricing`, so the
        announcement and the charge cannot drift apart. Without it the kind costs the fixed
        ``[prices] <name>`` (else ``default_price``) of the config.
    :param params_schema: the params as a JSON Schema, published in the announcement so that
        clients can check a request before sending it; build it with
        `dvm_core.params.params_schema` from the plugin's own reading of the params.
    :param pricing: how `price` prices, in one line for customers, e.g. ``"10 sats per million
        sample-epochs, at least 1 sat"``; the NIP-89 announcement shows it instead of a figure.
    :param precheck: ``precheck(ctx, job) -> job``: before pricing and payment, read the inputs
        (`ctx.fetch`; downloads are cached, so `run` finds them again) and return the job with
        its real size, which `price` then prices; raise `JobInputError` for data that cannot
        be used, and the customer is told before paying anything. It runs in a worker thread,
        under the worker's `precheck_seconds` and at most `max_prechecks` at once, with
        `ctx.progress` ignored: keep it to what pricing and refusing need.
    """

    kind: int
    name: str
    description: str
    run: Callable[["JobContext", Any], Any]
    parse: Callable[[JobRequest], Any] | None = None
    params: dict[str, str] | None = field(default_factory=dict)
    time_limit: float | None = None
    pricing: str | None = None
    params_schema: dict | None = field(default=None, compare=False)
    price: Callable[[Any], int] | None = field(default=None, compare=False)
    precheck: Callable[["JobContext", Any], Any] | None = None
    plugin: str = field(default="", compare=False)  # set by the worker: who registered it

    def __post_init__(self) -> None:
        if not 5000 <= int(self.kind) <= 5999:
            raise ValueError(f"job kind {self.kind} of {self.name!r} is not in 5000-5999")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"job kind name {self.name!r} must be letters, digits, - and _")
        if self.price is not None and not self.pricing:
            raise ValueError(f"job kind {self.name!r} has a price but no pricing: say how it prices, "
                             "customers see it in the announcement")


class JobContext:
    """Everything a running job may use. Safe to call from the job's worker thread.

    - `request`: the parsed `JobRequest` (params decrypted).
    - `workdir`: a private directory for this job's files, removed when the job ends.
    - `progress(percent, message)`: report progress; sent to the customer as `processing`
      feedback, rate-limited by the worker, so call it as often as you like.
    - `cancelled`: a `threading.Event` set when the customer cancels, the time limit passes or
      the worker stops. Long loops call `check_cancelled()` between steps.
    - `deadline`: `time.monotonic()` value after which the job is stopped; `time_left()`.
    - `log`: a structlog logger bound to this job.
    - `device`: the accelerator the provider gave this job (e.g. ``"cuda:1"``), or None.
    - `fetch(input)`: download a `url` input (verified against its sha256, decrypted if the
      customer encrypted it, cached) and return the local path. Blocking; call it from `run`.
    """

    def __init__(self, *, job_id: str, request: JobRequest, workdir: Path, log,
                 deadline: float, report: Callable[[float, str], None], config: dict,
                 fetcher: Callable[[str, Path], Path] | None = None, device: str | None = None):
        self.job_id = job_id
        self.request = request
        self._workdir = workdir
        self.log = log
        self.deadline = deadline
        self.config = config
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self._report = report
        self._fetcher = fetcher
        self.device = device  # the device this job may use ("cuda:1"), or None: choose yourself

    @property
    def workdir(self) -> Path:
        # Made on first use: most quick jobs never need one.
        self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    def progress(self, percent: float, message: str = "") -> None:
        self._report(float(percent), message)

    def fetch(self, source, *, max_bytes: int | None = None) -> Path:
        """The local path of a `url` input (a `JobInput` or the URL itself): downloaded,
        checked against its sha256 and decrypted. `max_bytes`: stop downloading past this
        many bytes (the worker's own limit applies anyway). Raises JobInputError on a bad
        reference, JobError when it cannot be fetched."""
        if self._fetcher is None:
            raise RuntimeError("this worker fetches no inputs")
        url = getattr(source, "data", source)
        self.check_cancelled()
        if max_bytes is None:
            return self._fetcher(url, self.workdir)
        return self._fetcher(url, self.workdir, max_bytes=max_bytes)

    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check_cancelled(self) -> None:
        """Raise JobCancelled (or JobTimeout) if the job should stop now."""
        if self.cancelled.is_set():
            if self.cancel_reason is StopReason.TIME_LIMIT:
                raise JobTimeout("the job ran past its time limit")
            raise JobCancelled(self.cancel_reason or "cancelled")
        if time.monotonic() > self.deadline:
            raise JobTimeout("the job ran past its time limit")

    def cancel(self, reason: str) -> None:
        """Stop the job; `reason` is a `StopReason` (or words of the plugin's own)."""
        self.cancel_reason = StopReason(reason) if reason in set(StopReason) else reason
        self.cancelled.set()

    async def sleep(self, seconds: float) -> None:
        """For async jobs: sleep, waking early with JobCancelled on cancellation."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_cancelled()
            await asyncio.sleep(min(0.05, end - time.monotonic()))
        self.check_cancelled()


# --- training transcripts: one verify kind, many formats ---------------------------------------
#
# The verify kind (5753, ``training-verify``, built by the core: `dvm_core.transcripts`) replays
# a segment of a training transcript. It is served by every worker where a loaded plugin
# registers a `TranscriptChecker` (through the same ``register`` as its job kinds), once however
# many do; each transcript goes to the checker of its ``format``. Plugins never import each
# other: they meet here.


@dataclass(frozen=True)
class TranscriptChecker:
    """How a plugin checks segments of the training transcripts its jobs write.

    :param format: the transcript's ``format`` string, e.g. ``"dvm-llm-finetune-transcript/1"``.
    :param run: ``run(ctx, job, transcript, signer, started) -> JobResult``, in the job's worker
        thread: `job` is the verify kind's `dvm_core.transcripts.VerifyJob` (``urls`` by input
        marker, ``end_step``, ``tolerance``, ``params``: this checker's own params, as sent),
        `transcript` the transcript (a dict, its format checked), `signer` the hex key that
        signed it (None for a bare one), `started` the job's ``time.monotonic()`` start. Read
        the provider's settings from ``ctx.config``.
    :param what: the jobs whose transcripts these are, for the kind's description, e.g.
        ``"kind 5751, LLM fine-tuning"``.
    :param params: params only this format takes (name: one-line description), accepted by
        the verify kind wherever this checker is loaded.
    :param roles: input markers only this format takes (e.g. ``"model"``).
    :param check: ``check(job)`` at parse time (quick, no I/O): raise `JobInputError` for a
        combination of this checker's params or inputs that cannot work.
    :param needs: what the customer sends besides the common inputs, for the description.
    :param precheck: ``precheck(ctx, job, transcript)`` before payment (in the verify kind's
        precheck, the transcript downloaded and its structure checked): raise `JobInputError`
        for a transcript no job sent to this provider could have written (params, sizes,
        steps beyond ``ctx.config``'s limits), so the customer is told before paying.
    :param price: ``price(transcript, steps) -> int``: what replaying `steps` steps of this
        transcript costs, in the worker's unit (after `precheck`): the plugin's training rate
        for the work of those steps, so a check costs what the training it repeats cost. It
        must come with `pricing`. A worker where some checker prices charges each check by its
        segment; a format whose checker has no price is checked free; where none prices, a
        check costs the fixed ``[prices] training-verify`` (else ``default_price``).
    :param pricing: how `price` prices, in one line for customers (the verify kind's
        announcement shows it for this format).
    """

    format: str
    run: Callable
    what: str
    params: dict[str, str] = field(default_factory=dict)
    roles: tuple[str, ...] = ()
    check: Callable | None = None
    needs: str = ""
    precheck: Callable | None = None
    price: Callable[[dict, int], int] | None = field(default=None, compare=False)
    pricing: str | None = None

    def __post_init__(self) -> None:
        if self.price is not None and not self.pricing:
            raise ValueError(f"transcript checker {self.format!r} has a price but no pricing: say how "
                             "it prices, customers see it in the announcement")
