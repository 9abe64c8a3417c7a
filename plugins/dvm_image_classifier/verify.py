"""Kind 5753 (``training-verify``, `dvm_core.transcripts`) on an image classifier's transcript:
replay one segment of it and say whether it lands where the provider said.

The core builds the verify kind, reads the request and the transcript, and hands a transcript
of format `transcript.FORMAT` to `check` here (this plugin registers `checker()` with its job
kinds). Besides the inputs every check takes (the training set, no marker; ``transcript``;
``start``; optionally ``end``) an image classifier's takes ``validation``: the validation set,
when the job was sent one (it is not trained on, but its presence decides whether a share of
the training set was held out). Params: ``end_step`` and ``tolerance`` (the core's). The
answer: ``match``, ``distance`` (‖replayed − claimed‖ / ‖claimed‖ of the weights),
``expected_sha256`` (the transcript's), ``got_sha256`` (the replay's), and what else was checked
(the data, the start checkpoint, the signature's key).
"""

from __future__ import annotations

import math
import time

from dvm_core import JobInputError, JobResult, TranscriptChecker
from dvm_core.transcripts import check_price, check_pricing
from dvm_core.datarefs import sha256_file

from .params import Limits

FORMAT = "dvm-image-classifier-transcript/1"   # transcript.FORMAT (that module imports torch)


def checker(config: dict | None = None) -> TranscriptChecker:
    """What this plugin registers for kind 5753 (`config`: the worker's, for its training rate,
    which prices a check as it priced the training: by the images its steps go through)."""
    limits = Limits.from_config(config)
    rate, base = limits.sats_per_million_sample_epochs, limits.sats_per_check
    priced = rate > 0 or base > 0
    return TranscriptChecker(format=FORMAT, run=check, what="kind 5750, image classifier",
                             roles=("validation", "weights"),
                             precheck=lambda ctx, job, transcript: checked_params(
                                 transcript, Limits.from_config(getattr(ctx, "config", None))),
                             needs="optionally the validation set the job was sent, marked 'validation', and "
                                   "the initial weights it was sent, marked 'weights' (to check step 0).",
                             price=(lambda transcript, steps: replay_price(transcript, steps, rate, base))
                             if priced else None,
                             pricing=check_pricing(base, rate, "images replayed (batch_size a step)")
                             if priced else None)


def replay_price(transcript: dict, steps: int, rate: float, base: float = 0.0) -> int:
    """A check replaying `steps` steps: `base` sats, plus the images they go through (batch_size
    each, read as the replay reads it; checked by the precheck) at `rate` sats per million,
    rounded up, at least 1 sat."""
    from .transcript import params_from

    return check_price(base, rate, steps, params_from(transcript).batch_size)


def training_tensors(path, transcript: dict, *, has_validation: bool, limits: Limits, workdir,
                     check_cancelled=lambda: None):
    """The uint8 images and labels the transcript's job trained on, read from the training set as
    `run` reads it (the same resizing, class order and held-out split)."""
    from . import data as datamod
    from .train import split_indices, to_tensors

    from .models import make_spec

    params = checked_params(transcript, limits)
    raw = datamod.load_labelled(path, what="training set", limits=limits, workdir=workdir,
                                image_size=params.image_size, check_cancelled=check_cancelled)
    train_set = datamod.as_training_set(raw)
    _, height, width, channels = train_set.images.shape
    if transcript.get("architecture") != make_spec(params.architecture, channels, len(train_set.classes),
                                                   height, width):
        raise JobInputError("the transcript's architecture is not the network its params and this training "
                            "set give (the job builds that one)")
    x, y = to_tensors(train_set.images, train_set.labels)
    if not has_validation and transcript["data"].get("validation", {}).get("source") != "input":
        train_idx, _ = split_indices(x.shape[0], params.validation_fraction, params.seed)
        x, y = x[train_idx], y[train_idx]
    return x, y, raw.sha256


def checked_params(transcript: dict, limits: Limits):
    """The transcript's `TrainParams`, refused (JobInputError) where a job sent to this provider
    could not have had them: a verifier rebuilds what the transcript names, and a stranger's
    transcript must not make it build a network, an image size or a replay its limits refuse."""
    from .params import ARCHITECTURES, MAX_BATCH_SIZE, MIN_IMAGE_SIZE
    from .transcript import params_from

    params = params_from(transcript)
    spe, planned, every = (transcript.get(k) for k in ("steps_per_epoch", "planned_steps", "checkpoint_every"))
    wrong = []
    if params.architecture not in ("auto",) + ARCHITECTURES:
        wrong.append(f"architecture {str(params.architecture)[:40]!r}")
    if not (isinstance(params.epochs, int) and 1 <= params.epochs <= limits.max_epochs):
        wrong.append(f"epochs (1-{limits.max_epochs} here)")
    if not (isinstance(params.batch_size, int) and 2 <= params.batch_size <= MAX_BATCH_SIZE):
        wrong.append(f"batch_size (2-{MAX_BATCH_SIZE})")
    if params.image_size is not None and not (isinstance(params.image_size, int)
                                              and MIN_IMAGE_SIZE <= params.image_size <= limits.max_image_size):
        wrong.append(f"image_size ({MIN_IMAGE_SIZE}-{limits.max_image_size} here)")
    if params.checkpoint_every != every:
        wrong.append("checkpoint_every (not the transcript's)")
    n = (transcript.get("data") or {}).get("train_samples") if isinstance(transcript.get("data"), dict) else None
    if not wrong and not (isinstance(n, int) and not isinstance(n, bool) and 2 <= n <= limits.max_samples
                          and spe == steps_per_epoch(n, params.batch_size) and planned == spe * params.epochs):
        # The replay takes an epoch's batches from the training set: steps_per_epoch must be
        # the number train_samples gives (else a replay runs off the end of an epoch).
        wrong.append(f"train_samples, steps_per_epoch and planned_steps (at most {limits.max_samples} images "
                     "here, in batches of batch_size)")
    if wrong:
        raise JobInputError("the transcript names params no job here could have: " + ", ".join(wrong))
    return params


def steps_per_epoch(n: int, batch_size: int) -> int:
    """A one-process training's steps per epoch over `n` images (`train.train`): a last batch of
    one image is dropped."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


def verify_segment(transcript: dict, data_path, start_path, end_path=None, *, end_step: int | None = None,
                   tolerance: float = 0.0, has_validation: bool = False, limits: Limits | None = None,
                   workdir=None, device=None, check_cancelled=lambda: None, weights_path=None) -> dict:
    """Replay one segment and give the verdict (`transcript.compare`'s, with the checks around it).
    `weights_path`: the initial weights the job was sent, if any (step 0 is checked against
    them; without them, a transcript that names some cannot pass step 0)."""
    import tempfile
    from pathlib import Path

    import torch

    from . import transcript as T

    if workdir is None:     # the data's unpacked files go with the verdict, not into /tmp for good
        with tempfile.TemporaryDirectory(prefix="dvm-verify-") as tmp:
            return verify_segment(transcript, data_path, start_path, end_path, end_step=end_step,
                                  tolerance=tolerance, has_validation=has_validation, limits=limits,
                                  workdir=tmp, device=device, check_cancelled=check_cancelled,
                                  weights_path=weights_path)
    limits = limits or Limits()
    workdir = Path(workdir)
    started = time.perf_counter()
    start = T.Checkpoint.load(start_path)
    recorded = T.entry_at(transcript, start.step)
    end_step = T.segment_end(transcript, start.step, end_step)
    x, y, file_sha = training_tensors(data_path, transcript, has_validation=has_validation, limits=limits,
                                      workdir=workdir, check_cancelled=check_cancelled)
    data_ok = T.data_digest(x, y) == transcript["data"]["train_tensors_sha256"]
    start_ok = start.state_sha256() == recorded["state_sha256"]
    why = None
    if start.step == 0:      # step 0 is the seed's (and the customer's weights'): no other start slips in
        initial = None
        if transcript.get("initial_weights_sha256"):
            if weights_path is None:
                why = ("the job started from the customer's weights (the transcript says so): send them, "
                       "marked 'weights', to check step 0")
            elif sha256_file(weights_path) != transcript["initial_weights_sha256"]:
                why = "the weights sent are not the ones the transcript says the job started from"
            else:
                from . import _read_weights
                initial = _read_weights(Path(weights_path), limits)
        seeded = T.seeded_start(transcript, initial) if why is None else None
        start_ok = start_ok and seeded is not None and seeded.weights_sha256() == start.weights_sha256() and \
            torch.equal(seeded.tensors["rng/augment"], start.tensors["rng/augment"]) and \
            not any(k.startswith("optim/") for k in start.tensors)
    claimed = T.Checkpoint.load(end_path) if end_path is not None else None
    got = T.replay(transcript, start, x, y, end_step, device=device, check_cancelled=check_cancelled)
    verdict = T.compare(transcript, got, claimed, tolerance)
    verdict["match"] = bool(verdict["match"] and data_ok and start_ok)
    if why is not None:
        verdict["reason"] = why
    verdict.update({"segment": [start.step, end_step], "data_matches_transcript": data_ok,
                    "data_file_sha256": file_sha,
                    "start_checkpoint_matches_transcript": start_ok, "tolerance": tolerance,
                    "replay_seconds": round(time.perf_counter() - started, 3)})
    return verdict


def check(ctx, job, transcript: dict, signer: str | None, started: float) -> JobResult:
    """Fetch the inputs, replay the segment, answer (the limits: ``[plugins.image-classifier]``)."""
    from dvm_core.devices import choose_device

    limits = Limits.from_config(getattr(ctx, "config", None))
    if job.params.get("model") is not None or job.urls.get("model") is not None:
        raise JobInputError("param model and an input marked 'model' are for fine-tuning transcripts; this is "
                            "an image classifier's")
    start_path = ctx.fetch(job.urls["start"], max_bytes=limits.max_dataset_bytes)
    end_path = ctx.fetch(job.urls["end"], max_bytes=limits.max_dataset_bytes) if job.urls["end"] else None
    data_path = ctx.fetch(job.urls["dataset"])
    weights_path = ctx.fetch(job.urls["weights"], max_bytes=limits.max_dataset_bytes) \
        if job.urls.get("weights") else None
    ctx.progress(10, "replaying the segment")
    verdict = verify_segment(transcript, data_path, start_path, end_path, end_step=job.end_step,
                             weights_path=weights_path,
                             tolerance=job.tolerance, has_validation=job.urls.get("validation") is not None,
                             limits=limits, workdir=ctx.workdir,
                             device=choose_device(getattr(ctx, "device", None)),
                             check_cancelled=ctx.check_cancelled)
    verdict["transcript_signer"] = signer
    ctx.progress(100, "match" if verdict["match"] else "mismatch")
    metrics = {"match": verdict["match"], "segment": verdict["segment"],
               "job_seconds": round(time.monotonic() - started, 3)}
    if verdict["distance"] is not None and not math.isfinite(verdict["distance"]):
        verdict["distance"] = None
    return JobResult(verdict, metrics=metrics)
