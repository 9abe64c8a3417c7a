"""The verify job (kind 5753, ``image-classifier-verify``): replay one segment of a training
transcript and say whether it lands where the provider said.

One kind for every transcript format: an image classifier's (kind 5750) is replayed here; one
of another format goes to the function its plugin registered with
`dvm_core.register_transcript_verifier` (the llm-finetune plugin's, kind 5751, format
``dvm-llm-finetune-transcript/1``, takes the base model too: param ``model`` and ``revision``,
or an input marked ``model``; see `dvm_llm_finetune.verify`). The inputs and params below are
the image classifier's.

Inputs (``url``, told apart by the ``i`` tag's marker):

- no marker (or ``dataset``): the training set the job was sent (the same file);
- ``validation``: the validation set, when the job was sent one (it is not trained on, but its
  presence decides whether a share of the training set was held out);
- ``transcript``: ``transcript.json`` from the result (the signed event, or the bare JSON);
- ``start``: the checkpoint at the segment's first step;
- ``end`` (optional): the provider's checkpoint at its last step, for the distance.

Params: ``end_step`` (default: the transcript's next checkpoint after the start), ``tolerance``
(default 0: bit-identical). The answer: ``match``, ``distance`` (‖replayed − claimed‖ / ‖claimed‖
of the weights), ``expected_sha256`` (the transcript's), ``got_sha256`` (the replay's), and
what else was checked (the data, the start checkpoint, the signature's key).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from dvm_core import JobInputError, JobKind, JobResult, open_signed_file, transcript_verifier
from dvm_core.params import number, params_schema, url_inputs

from .params import Limits

KIND = 5753
NAME = "image-classifier-verify"
PARAMS = {
    "end_step": "the step the replay stops at, a checkpoint of the transcript (default: the next "
                "checkpoint after the start checkpoint's step)",
    "tolerance": "the largest distance (‖replayed − claimed‖ / ‖claimed‖ of the weights) that still "
                 "matches; 0 (the default) asks for bit-identical weights and optimizer state, which "
                 "a replay on a CPU gives",
}
MODEL_PARAMS = {
    "model": "for a fine-tuning's transcript (kind 5751): the base model, a Hugging Face repo id this "
             "provider offers (default: the transcript's, when it names a hub model); or send a url "
             "input marked 'model' (the model archive the job was sent)",
    "revision": "with model: a branch, tag or commit (default: the transcript's commit)",
}
ROLES = ("dataset", "validation", "transcript", "start", "end", "model")


@dataclass(frozen=True)
class VerifyJob:
    urls: dict
    end_step: int | None
    tolerance: float
    limits: Limits
    model_repo: str | None = None      # a fine-tuning transcript's base model (param model, revision),
    model_revision: str | None = None  # checked by the plugin that registered its format


def read_params(params: dict) -> tuple[int | None, float]:
    return (number(params, "end_step", int, 1, 2**62, None),
            number(params, "tolerance", float, 0.0, 1.0, 0.0))


def parse_request(request, limits: Limits) -> VerifyJob:
    urls = url_inputs(request, ROLES, what="the training set and the inputs marked 'transcript' and "
                      "'start' (optionally 'end', 'validation' and, for an LLM transcript, 'model')")
    for role in ("dataset", "transcript", "start"):
        if urls[role] is None:
            raise JobInputError(f"send the {'training set' if role == 'dataset' else role} as an input of "
                                f"type 'url'{'' if role == 'dataset' else f' marked {role!r}'}")
    end_step, tolerance = read_params(request.params)
    repo, revision = request.params.get("model"), request.params.get("revision")
    if repo is not None and urls["model"] is not None:
        raise JobInputError("send either param model or an input marked 'model', not both")
    if revision is not None and repo is None:
        raise JobInputError("param revision goes with param model")
    return VerifyJob(urls, end_step, tolerance, limits, repo, revision)


def job_kind(config: dict | None = None) -> JobKind:
    limits = Limits.from_config(config)
    params = dict(PARAMS) | MODEL_PARAMS
    return JobKind(
        kind=KIND, name=NAME,
        description=("Verifies one segment of a training transcript (a result sent with checkpoint_every: "
                     "kind 5750, image classifier, or 5751, LLM fine-tuning, where the llm-finetune plugin "
                     "runs too): replays its steps from the start checkpoint on the training set and answers "
                     "match or mismatch, with the distance. Inputs: url inputs, the training set (no marker), "
                     "'transcript', 'start', optionally 'end' and 'validation'; for an LLM transcript the base "
                     "model: param model or an input marked 'model' (default: the transcript's hub model)."),
        run=run, parse=lambda request: parse_request(request, limits), params=params,
        params_schema=params_schema(read_params, params))


def read_transcript(data: bytes) -> tuple[dict, str | None]:
    """The transcript and the key that signed it (None for a bare, unsigned transcript)."""
    from .transcript import FORMAT

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
    if raw["format"] != FORMAT and transcript_verifier(raw["format"]) is None:
        raise JobInputError(f"this provider does not check transcripts of format {raw['format'][:80]!r} "
                            f"(it checks {FORMAT} and those of the plugins it runs)")
    return raw, signer


def training_tensors(path, transcript: dict, *, has_validation: bool, limits: Limits, workdir,
                     check_cancelled=lambda: None):
    """The uint8 images and labels the transcript's job trained on, read from the training set as
    `run` reads it (the same resizing, class order and held-out split)."""
    from . import data as datamod
    from .train import split_indices, to_tensors
    from .transcript import params_from

    params = params_from(transcript)
    raw = datamod.load_labelled(path, what="training set", limits=limits, workdir=workdir,
                                image_size=params.image_size, check_cancelled=check_cancelled)
    train_set = datamod.as_training_set(raw)
    x, y = to_tensors(train_set.images, train_set.labels)
    if not has_validation and transcript["data"].get("validation", {}).get("source") != "input":
        train_idx, _ = split_indices(x.shape[0], params.validation_fraction, params.seed)
        x, y = x[train_idx], y[train_idx]
    return x, y, raw.sha256


def verify_segment(transcript: dict, data_path, start_path, end_path=None, *, end_step: int | None = None,
                   tolerance: float = 0.0, has_validation: bool = False, limits: Limits | None = None,
                   workdir=None, device=None, check_cancelled=lambda: None) -> dict:
    """Replay one segment and give the verdict (`transcript.compare`'s, with the checks around it)."""
    import tempfile
    from pathlib import Path

    import torch

    from . import transcript as T

    limits = limits or Limits()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="verify-"))
    started = time.perf_counter()
    start = T.Checkpoint.load(start_path)
    recorded = T.entry_at(transcript, start.step)
    if end_step is None:
        later = [c["step"] for c in transcript["checkpoints"] if c["step"] > start.step]
        if not later:
            raise JobInputError(f"the start checkpoint is the transcript's last (step {start.step})")
        end_step = later[0]
    T.entry_at(transcript, end_step)
    x, y, file_sha = training_tensors(data_path, transcript, has_validation=has_validation, limits=limits,
                                      workdir=workdir, check_cancelled=check_cancelled)
    data_ok = T.data_digest(x, y) == transcript["data"]["train_tensors_sha256"]
    start_ok = start.state_sha256() == recorded["state_sha256"]
    seeded = T.seeded_start(transcript) if start.step == 0 else None
    if seeded is not None:   # step 0 is the seed's: no other starting point slips in
        start_ok = start_ok and seeded.weights_sha256() == start.weights_sha256() and \
            torch.equal(seeded.tensors["rng/augment"], start.tensors["rng/augment"]) and \
            not any(k.startswith("optim/") for k in start.tensors)
    claimed = T.Checkpoint.load(end_path) if end_path is not None else None
    got = T.replay(transcript, start, x, y, end_step, device=device, check_cancelled=check_cancelled)
    verdict = T.compare(transcript, got, claimed, tolerance)
    verdict["match"] = bool(verdict["match"] and data_ok and start_ok)
    verdict.update({"segment": [start.step, end_step], "data_matches_transcript": data_ok,
                    "data_file_sha256": file_sha,
                    "start_checkpoint_matches_transcript": start_ok, "tolerance": tolerance,
                    "replay_seconds": round(time.perf_counter() - started, 3)})
    return verdict


def run(ctx, job: VerifyJob) -> JobResult:
    """Fetch the inputs, replay the segment, answer."""
    from dvm_core.devices import choose_device

    started = time.monotonic()
    ctx.progress(0, "downloading the transcript and checkpoints")
    transcript, signer = read_transcript(ctx.fetch(job.urls["transcript"]).read_bytes())
    from .transcript import FORMAT

    if transcript["format"] != FORMAT:   # another plugin's (read_transcript found its verifier)
        return transcript_verifier(transcript["format"])(ctx, job, transcript, signer, started)
    if job.model_repo is not None or job.urls["model"] is not None:
        raise JobInputError("param model and an input marked 'model' are for fine-tuning transcripts; this is "
                            "an image classifier's")
    start_path = ctx.fetch(job.urls["start"], max_bytes=job.limits.max_dataset_bytes)
    end_path = ctx.fetch(job.urls["end"], max_bytes=job.limits.max_dataset_bytes) if job.urls["end"] else None
    data_path = ctx.fetch(job.urls["dataset"])
    ctx.progress(10, "replaying the segment")
    verdict = verify_segment(transcript, data_path, start_path, end_path, end_step=job.end_step,
                             tolerance=job.tolerance, has_validation=job.urls["validation"] is not None,
                             limits=job.limits, workdir=ctx.workdir,
                             device=choose_device(getattr(ctx, "device", None)),
                             check_cancelled=ctx.check_cancelled)
    verdict["transcript_signer"] = signer
    ctx.progress(100, "match" if verdict["match"] else "mismatch")
    metrics = {"match": verdict["match"], "segment": verdict["segment"],
               "job_seconds": round(time.monotonic() - started, 3)}
    if verdict["distance"] is not None and not math.isfinite(verdict["distance"]):
        verdict["distance"] = None
    return JobResult(verdict, metrics=metrics)
