"""The verify kind (5753, ``training-verify``): replay one segment of a training transcript and
say whether it lands where the provider said.

One kind for every transcript format, built here by the core and served by every worker where
a loaded plugin registers a `dvm_core.TranscriptChecker` (the image-classifier plugin for its
kind-5750 transcripts, llm-finetune for its kind-5751 ones): registered once however many do
(`dvm_core.worker.plugins.collect_job_kinds`). This module reads the request and the
transcript (its signature, its ``format``) and hands it to the checker of that format; a format
no loaded plugin checks is refused with the formats this provider does check.

Inputs (``url``, told apart by the ``i`` tag's marker), for every format:

- no marker (or ``dataset``): the training set the job was sent (the same file);
- ``transcript``: ``transcript.json`` from the result (the signed event, or the bare JSON);
- ``start``: the checkpoint at the segment's first step;
- ``end`` (optional): the provider's checkpoint at its last step, for the distance;

and those a checker adds (``validation`` for an image classifier's, ``model`` for an LLM's).
Params: ``end_step`` (default: the transcript's next checkpoint after the start),
``tolerance`` (default 0: bit-identical), and those a checker adds (``model``, ``revision``).

A check replays one segment, the one the start checkpoint begins (``end_step``, when sent, must
be where it ends), and is priced by it: each checker prices the steps of its format at its
plugin's training rate (`TranscriptChecker.price`), so a check costs what the training it
repeats cost, and a long segment (a stranger's transcript may make one of a whole job) costs
as much as its training would.

No torch and no plugin here: the checkers do the replaying, in their plugins.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace

from .jobs import JobInputError, JobKind, JobResult, TranscriptChecker, open_signed_file
from .params import number, params_schema, url_inputs

KIND = 5753
NAME = "training-verify"
ROLES = ("dataset", "transcript", "start", "end")
PARAMS = {
    "end_step": "the step the replay stops at: the checkpoint after the start checkpoint's step (a check "
                "replays one segment; default: that one). Sent, it prices the check before the start "
                "checkpoint is read",
    "tolerance": "the largest distance (‖replayed − claimed‖ / ‖claimed‖ of the weights and of each optimizer "
                 "moment apart) that still "
                 "matches; 0 (the default) asks for bit-identical weights and optimizer state, which "
                 "a replay on a CPU gives",
}
MAX_TRANSCRIPT_BYTES = 64 << 20


@dataclass(frozen=True)
class VerifyJob:
    """What the verify kind's parse hands to its run (and run to the format's checker)."""

    urls: dict                       # role -> URL or None (the common roles and the checkers')
    end_step: int | None
    tolerance: float
    params: dict = field(default_factory=dict)   # the checkers' own params, as sent
    # Read by the precheck (before payment) for run: the transcript, checked, and its signer.
    transcript: dict | None = field(default=None, compare=False, repr=False)
    signer: str | None = None


def read_params(params: dict) -> tuple[int | None, float]:
    return (number(params, "end_step", int, 1, 2**62, None),
            number(params, "tolerance", float, 0.0, 1.0, 0.0))


def parse_request(request, checkers: list[TranscriptChecker]) -> VerifyJob:
    roles = ROLES + tuple(dict.fromkeys(r for c in checkers for r in c.roles))
    extra = [f"'{r}'" for r in roles[4:]]
    urls = url_inputs(request, roles, what="the training set and the inputs marked 'transcript' and "
                      "'start' (optionally 'end'" + (", " + ", ".join(extra) if extra else "") + ")")
    for role in ("dataset", "transcript", "start"):
        if urls[role] is None:
            raise JobInputError(f"send the {'training set' if role == 'dataset' else role} as an input of "
                                f"type 'url'{'' if role == 'dataset' else f' marked {role!r}'}")
    end_step, tolerance = read_params(request.params)
    own = {name for c in checkers for name in c.params}
    job = VerifyJob(urls, end_step, tolerance, {k: v for k, v in request.params.items() if k in own})
    for checker in checkers:
        if checker.check is not None:
            checker.check(job)
    return job


def read_transcript(data: bytes, checkers: dict[str, TranscriptChecker]) -> tuple[dict, str | None]:
    """The transcript and the key that signed it (None for a bare, unsigned transcript); one of
    a format no checker here checks is refused."""
    signer = None
    try:
        raw = json.loads(data)
    except ValueError:
        raise JobInputError("the transcript is not JSON") from None
    if isinstance(raw, dict) and "sig" in raw:
        try:
            signed = open_signed_file(data)
        except ValueError as exc:
            raise JobInputError(f"the transcript's signature does not hold: {exc}") from None
        signer, raw = signed.pubkey, json.loads(signed.text)
    if not isinstance(raw, dict) or not isinstance(raw.get("format"), str) or not raw.get("checkpoints"):
        raise JobInputError("not a training transcript (a format and checkpoints)")
    if raw["format"] not in checkers:
        checked = "; ".join(f"{f} ({c.what})" for f, c in sorted(checkers.items()))
        raise JobInputError(f"this provider does not check transcripts of format {raw['format'][:80]!r}: "
                            f"it checks {checked}, those of the training plugins it runs")
    problems = structure_problems(raw)
    if problems:
        raise JobInputError("not a transcript as training writes it: " + "; ".join(problems[:3]))
    return raw, signer


def job_kind(checkers: list[TranscriptChecker]) -> JobKind:
    """The verify kind for the checkers the loaded plugins registered (at least one)."""
    if not checkers:
        raise ValueError("the verify kind needs at least one transcript checker")
    by_format = {c.format: c for c in checkers}
    params = dict(PARAMS)
    for checker in checkers:
        params.update(checker.params)
    whats = "; ".join(c.what for c in checkers)
    needs = " ".join(f"For {c.what}: {c.needs}" for c in checkers if c.needs)

    def read(ctx, job: VerifyJob) -> tuple[dict, str | None]:
        return read_transcript(ctx.fetch(job.urls["transcript"], max_bytes=MAX_TRANSCRIPT_BYTES).read_bytes(),
                               by_format)

    def precheck(ctx, job: VerifyJob) -> VerifyJob:
        """Before payment: the transcript (small) is read and checked, so one of a format not
        served here, not as training writes it, or (the checker's precheck) one no job here could
        have written, or an `end_step` that ends none of its segments, is refused before the
        customer pays; `run` gets it with the job, and `price` prices its segment."""
        transcript, signer = read(ctx, job)
        checker = by_format[transcript["format"]]
        if checker.precheck is not None:
            checker.precheck(ctx, job, transcript)
        segment_steps(transcript, job.end_step)
        return replace(job, transcript=transcript, signer=signer)

    def price(job: VerifyJob) -> int:
        """A check's price: its segment's steps (the longest segment's, when no end_step says
        which) at the training rate of the transcript's format; free for a format whose checker
        does not price. Called after the precheck, which read the transcript."""
        if job.transcript is None:
            raise ValueError("the verify kind prices a job only after its precheck read the transcript")
        checker = by_format[job.transcript["format"]]
        if checker.price is None:
            return 0
        return checker.price(job.transcript, segment_steps(job.transcript, job.end_step))

    priced = [c for c in checkers if c.price is not None]
    pricing = None
    if priced:
        free = [c.what for c in checkers if c.price is None]
        pricing = ("each check by the steps of the segment it replays (the longest segment's, unless "
                   "end_step names it), at the training rate: "
                   + "; ".join(f"{c.what}: {c.pricing}" for c in priced)
                   + (f"; {', '.join(free)}: free" if free else ""))

    def run(ctx, job: VerifyJob) -> JobResult:
        started = time.monotonic()
        ctx.progress(0, "downloading the transcript")
        # A job resumed after a restart was paid before it, and skips the precheck: read here.
        transcript, signer = (job.transcript, job.signer) if job.transcript is not None else read(ctx, job)
        return by_format[transcript["format"]].run(ctx, job, transcript, signer, started)

    return JobKind(
        kind=KIND, name=NAME,
        description=("Verifies one segment of a training transcript (a result sent with checkpoint_every; "
                     f"this provider checks those of {whats}): replays its steps from the start checkpoint "
                     "on the training set and answers match or mismatch, with the distance. Inputs: url "
                     "inputs, the training set (no marker), 'transcript', 'start', optionally 'end'. "
                     + needs).strip(),
        run=run, parse=lambda request: parse_request(request, checkers), params=params,
        params_schema=params_schema(read_params, params), precheck=precheck,
        price=price if priced else None, pricing=pricing)


# --- the verdict, the same for every format (the plugins replay; the arithmetic below only
# calls the tensors' own methods, so the core imports no torch) ------------------------------

def check_price(base: float, rate: float, steps: int, per_step: int) -> int:
    """What a checker's `price` charges: `base` sats, plus `steps` × `per_step` units (images,
    tokens) at `rate` sats per million, rounded up, at least 1 sat (`check_pricing` in words)."""
    return max(1, math.ceil(base + steps * per_step * rate / 1e6))


def check_pricing(base: float, rate: float, per: str) -> str:
    """A checker's `pricing` in words: `base` sats a check plus `rate` sats per million `per`
    (what its `price` charges, rounded up, at least 1 sat)."""
    parts = ([f"{base:g} sats a check"] if base else []) + ([f"{rate:g} sats per million {per}"] if rate else [])
    return " plus ".join(parts) + ", at least 1 sat"


def structure_problems(transcript: dict) -> list[str]:
    """What makes a transcript's list of checkpoints other than training writes it, or []: every
    checkpoint_every (k) steps from step 0 and at the end (the last one `final`, at
    planned_steps unless `stopped` early), each with its two digests and a plain file name.
    A provider who writes another list (uneven segments: a long untrained one among short
    honest ones, which a check drawn at random seldom picks; a replay of a million steps) has
    not written what the job wrote; the spot-check odds hold only for this one."""
    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def digest(value) -> bool:
        return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)

    entries, k, planned = transcript.get("checkpoints"), transcript.get("checkpoint_every"), transcript.get("planned_steps")
    if not isinstance(entries, list) or len(entries) < 2 or not all(isinstance(e, dict) for e in entries):
        return ["its checkpoints are not a list of at least two entries"]
    if not whole(k) or k < 1 or not whole(planned) or planned < 1:
        return ["it names no checkpoint_every and planned_steps (whole numbers, at least 1)"]
    problems = []
    for i, entry in enumerate(entries):
        step, name = entry.get("step"), entry.get("file")
        if not whole(step):
            problems.append(f"checkpoint {i} has no step")
            continue
        if not (digest(entry.get("weights_sha256")) and digest(entry.get("state_sha256"))):
            problems.append(f"the checkpoint at step {step} lacks its weights_sha256 or state_sha256")
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            problems.append(f"the checkpoint at step {step} names no plain file ({str(name)[:80]!r})")
        last = i == len(entries) - 1
        if not last and step != i * k:
            problems.append(f"checkpoint {i} is at step {step}, not {i * k} (every {k} steps from 0)")
        if bool(entry.get("final")) != last:
            problems.append(f"the checkpoint at step {step} is {'not ' if last else ''}marked final")
    if problems:
        return problems
    end, before = entries[-1]["step"], entries[-2]["step"]
    if not before < end <= before + k:
        problems.append(f"the last checkpoint is at step {end}, not within {k} steps after {before}")
    stopped = entries[-1].get("stopped")
    if stopped is None and end != planned:
        problems.append(f"training ends at step {end} without being stopped early, but {planned} steps were planned")
    if stopped is not None and end > planned:
        problems.append(f"training was stopped ({str(stopped)[:40]}) at step {end}, after the {planned} planned")
    return problems


def segments(transcript: dict) -> list[tuple[int, int]]:
    """The segments [a, b) between consecutive checkpoints."""
    steps = [c["step"] for c in transcript["checkpoints"]]
    return list(zip(steps, steps[1:]))


def entry_at(transcript: dict, step: int) -> dict:
    for entry in transcript["checkpoints"]:
        if entry["step"] == step:
            return entry
    raise JobInputError(f"the transcript has no checkpoint at step {step}")


def segment_end(transcript: dict, start_step: int, end_step: int | None) -> int:
    """The step a replay from `start_step` stops at: the next checkpoint after it. A check
    replays one segment: an `end_step` sent must be that checkpoint (several segments are
    several checks, each priced by its own)."""
    later = [c["step"] for c in transcript["checkpoints"] if c["step"] > start_step]
    if not later:
        raise JobInputError(f"the start checkpoint is the transcript's last (step {start_step})")
    if end_step is not None and end_step != later[0]:
        entry_at(transcript, end_step)
        raise JobInputError(f"a check replays one segment: the one from step {start_step} ends at step "
                            f"{later[0]}, not at end_step {end_step}; send one check for each segment")
    return later[0]


def segment_steps(transcript: dict, end_step: int | None) -> int:
    """The steps a check replays, known before its start checkpoint is read (what it is priced
    by): those of the segment that ends at `end_step`, else the longest segment's."""
    spans = segments(transcript)
    if end_step is None:
        return max(b - a for a, b in spans)
    for a, b in spans:
        if b == end_step:
            return b - a
    raise JobInputError(f"end_step {end_step} ends no segment of the transcript: its segments end at steps "
                        + ", ".join(str(b) for _, b in spans[:8]) + (", …" if len(spans) > 8 else ""))


def distance(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over the floating-point tensors (inf when the keys or shapes differ)."""
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return math.inf
    diff = norm = 0.0
    for k in a:
        if a[k].is_floating_point():
            x, y = a[k].double(), b[k].double()
            diff += float((x - y).square().sum())
            norm += float(y.square().sum())
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-30)


def state_distance(a: dict, b: dict) -> float:
    """The largest ‖a − b‖ / ‖b‖ over the groups of two whole checkpoint states (name → tensor):
    the weights (``model/…``) and each kind of optimizer state (``optim/<i>/exp_avg``, …) apart,
    since the moments are orders of magnitude smaller than the weights and a change to them
    (one that stops training, say) would hide in a single norm. Tensors that are not floating
    point (counters, RNG states) must be equal. inf when the keys, shapes or those differ."""
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return math.inf
    groups: dict[str, tuple[float, float]] = {}
    for k in a:
        if not (a[k].is_floating_point() and b[k].is_floating_point()):
            if a[k].dtype != b[k].dtype or not bool((a[k] == b[k]).all()):
                return math.inf
            continue
        group = "optim/" + k.rsplit("/", 1)[-1] if k.startswith("optim/") else k.split("/", 1)[0]
        x, y = a[k].double(), b[k].double()
        diff, norm = groups.get(group, (0.0, 0.0))
        groups[group] = (diff + float((x - y).square().sum()), norm + float(y.square().sum()))
    return max((math.sqrt(d) / max(math.sqrt(n), 1e-30) for d, n in groups.values()), default=0.0)


def compare(transcript: dict, got, claimed, tolerance: float = 0.0) -> dict:
    """The verdict on a replayed segment: the state reached (`got`) against the transcript's
    record, and against the provider's end checkpoint (`claimed`, or None) for the distance.
    `got` and `claimed` are a plugin's checkpoints: ``step``, ``tensors`` (the whole state,
    name → tensor), ``weights`` (name → tensor), ``weights_sha256()`` and ``state_sha256()``.

    Bit for bit (`exact`) is a match. With a `tolerance`, so is a replay whose whole state lies
    within it of the end checkpoint (`state_distance`: the weights and each optimizer moment
    apart), provided that checkpoint is the one the transcript committed to (its state's
    sha256, not only its weights'): else the next segment's replay would start from moments
    the provider chose, and an untrained run could replay "within tolerance" forever."""
    expected = entry_at(transcript, got.step)
    got_sha, got_state = got.weights_sha256(), got.state_sha256()
    dist = 0.0 if got_sha == expected["weights_sha256"] else math.inf
    whole = 0.0 if got_state == expected["state_sha256"] else math.inf
    if claimed is not None:
        dist = distance(got.weights, claimed.weights)
        whole = state_distance(got.tensors, claimed.tensors)
    exact = got_sha == expected["weights_sha256"] and got_state == expected["state_sha256"]
    claimed_ok = claimed is None or (claimed.weights_sha256() == expected["weights_sha256"]
                                     and claimed.state_sha256() == expected["state_sha256"])
    match = claimed_ok and (exact or (tolerance > 0 and whole <= tolerance))
    return {"match": bool(match), "distance": dist if math.isfinite(dist) else None,
            "state_distance": whole if math.isfinite(whole) else None, "exact": exact,
            "expected_sha256": expected["weights_sha256"], "got_sha256": got_sha,
            "expected_state_sha256": expected["state_sha256"], "got_state_sha256": got_state,
            "end_checkpoint_matches_transcript": claimed_ok}
