"""Verify one segment of an LLM fine-tuning's transcript (kind 5751 sent with checkpoint_every).

Kind 5753 (``training-verify``) is one job kind for every transcript format, built by the core
(`dvm_core.transcripts`) wherever a training plugin is loaded: it reads the transcript and hands
those of format `transcript.FORMAT` to `run_job` here (this plugin registers `checker()` with its
job kinds). Besides the inputs every check takes (the training set, no marker; ``transcript``; ``start``;
optionally ``end``) an LLM check needs the base model: param ``model`` (a hub repo id the
provider offers, with ``revision``), or a ``url`` input marked ``model`` (the archive the job
was sent), or nothing when the transcript names a hub model this provider offers (its repo and
commit are taken from the transcript). Its weights must be the ones the transcript names.
Whether a share of the training set was held out, and which, follows from the transcript
(``data.eval``): the evaluation set is never needed.
"""

from __future__ import annotations

import math
import time
import types
from pathlib import Path

from dvm_core import JobInputError, JobResult, TranscriptChecker
from dvm_core.transcripts import check_price, check_pricing

from .params import REPO_ID, REVISION, Limits

FORMAT = "dvm-llm-finetune-transcript/1"   # transcript.FORMAT (that module imports torch)
PARAMS = {
    "model": "for a fine-tuning's transcript (kind 5751): the base model, a Hugging Face repo id this "
             "provider offers (default: the transcript's, when it names a hub model); or send a url "
             "input marked 'model' (the model archive the job was sent)",
    "revision": "with model: a branch, tag or commit (default: the transcript's commit)",
}


def check_request(job, limits: Limits | None = None) -> None:
    """At parse time, before any payment: the model params and input go together as the job's
    do, and with the provider's `limits` a param model is a repo id it offers (as the job
    checks it)."""
    if job.params.get("model") is not None and job.urls.get("model") is not None:
        raise JobInputError("send either param model or an input marked 'model', not both")
    if job.params.get("revision") is not None and job.params.get("model") is None:
        raise JobInputError("param revision goes with param model")
    if limits is not None:
        read_model_params(job.params.get("model"), job.params.get("revision"), limits)


def checker(config: dict | None = None) -> TranscriptChecker:
    """What this plugin registers for kind 5753 (`config`: the worker's, for the models it offers)."""
    limits = Limits.from_config(config) if config is not None else None
    rate, base = (limits or Limits()).sats_per_million_tokens, (limits or Limits()).sats_per_check
    priced = rate > 0 or base > 0
    return TranscriptChecker(format=FORMAT, run=run_job, what="kind 5751, LLM fine-tuning", params=PARAMS,
                             roles=("model",), check=lambda job: check_request(job, limits),
                             precheck=lambda ctx, job, transcript: checked_params(
                                 transcript, Limits.from_config(getattr(ctx, "config", None))),
                             needs="the base model, param model (a hub repo id offered here) or a url "
                                   "input marked 'model' (default: the transcript's hub model).",
                             price=(lambda transcript, steps: replay_price(transcript, steps, rate, base))
                             if priced else None,
                             pricing=check_pricing(base, rate, "tokens replayed, each step counted as full "
                                                   "sequences (batch_size × gradient_accumulation_steps × "
                                                   "max_seq_length tokens)") if priced else None)


def replay_price(transcript: dict, steps: int, rate: float, base: float = 0.0) -> int:
    """A check replaying `steps` optimizer steps: `base` sats (its fixed costs: the base model,
    tokenizing the data), plus at most batch_size × gradient_accumulation_steps ×
    max_seq_length tokens a step (the transcript's params, read as the replay reads them; the
    tokens themselves are only known once the data is tokenized) at `rate` sats per million,
    rounded up, at least 1 sat."""
    from .transcript import params_from

    params = params_from(transcript)
    return check_price(base, rate, steps,
                       params.batch_size * params.gradient_accumulation_steps * params.max_seq_length)


def read_model_params(repo: str | None, revision: str | None, limits: Limits) -> tuple[str | None, str | None]:
    """Param model and revision, checked as the job checks them."""
    if repo is not None:
        repo = repo.strip()
        if not REPO_ID.match(repo):
            raise JobInputError(f"param model must be a Hugging Face repo id like owner/name, got {repo[:100]!r}")
        if repo not in limits.allowed_models:
            allowed = ", ".join(limits.allowed_models) or "none: send the model as an archive"
            raise JobInputError(f"model {repo!r} is not offered by this provider (allowed: {allowed})")
    if revision is not None:
        revision = revision.strip()
        if repo is None:
            raise JobInputError("param revision goes with param model")
        if not REVISION.match(revision):
            raise JobInputError(f"param revision is not a branch, tag or commit name: {revision[:60]!r}")
    return repo, revision


def training_examples(transcript: dict, data_path: Path, tokenizer, *, limits: Limits,
                      check_cancelled=lambda: None):
    """The tokenized examples the transcript's job trained on, read from the training set as
    the job reads it (the same tokenizer, sequence length and held-out split); and the file's
    sha256."""
    from . import data as datamod

    params = checked_params(transcript, limits)
    dataset = datamod.read_jsonl(data_path, what="training set", max_bytes=limits.max_dataset_bytes,
                                 max_examples=limits.max_examples, check_cancelled=check_cancelled)
    examples = datamod.tokenize(dataset, tokenizer, params.max_seq_length, what="training set",
                                check_cancelled=check_cancelled).examples
    if (transcript["data"].get("eval") or {}).get("source") != "input":
        examples, _ = datamod.split_eval(examples, params.eval_fraction, params.seed)
    return examples, dataset.sha256


def checked_params(transcript: dict, limits: Limits):
    """The transcript's `FinetuneParams`, read again as a job's params are read here
    (`params.parse_params`, this provider's limits): a verifier rebuilds what a stranger's
    transcript names, and must not build a LoRA rank, a sequence length, a batch or a run of
    steps its limits refuse a job. Refused with JobInputError. (Its time limit is not the
    replay's and is not compared.)"""
    import dataclasses

    from .params import parse_params
    from .transcript import params_from

    params = params_from(transcript)
    raw = {}
    for name, value in params.as_dict().items():
        if value is None or name == "time_limit" or (params.method == "full" and name.startswith("lora_")):
            continue
        raw[name] = ("true" if value else "false") if isinstance(value, bool) else \
            ",".join(value) if isinstance(value, list) else repr(value) if isinstance(value, float) else str(value)
    has_eval = (transcript.get("data", {}).get("eval") or {}).get("source") == "input"
    try:
        again = parse_params(raw, dataclasses.replace(limits, launcher="auto"), has_eval_input=has_eval)
    except JobInputError as exc:
        raise JobInputError(f"the transcript names params no job here could have: {exc}") from None
    planned = transcript.get("planned_steps")
    if dataclasses.replace(again, time_limit=params.time_limit) != params:
        raise JobInputError("the transcript's params are not as a job's are read here")
    if not isinstance(planned, int) or not 1 <= planned <= limits.max_steps:
        raise JobInputError(f"the transcript plans {str(planned)[:20]} steps; a job here runs at most {limits.max_steps}")
    return params


def verify_segment(transcript: dict, data_path, start_path, end_path=None, *, model_folder, end_step: int | None = None,
                   tolerance: float = 0.0, limits: Limits | None = None, device=None,
                   check_cancelled=lambda: None) -> dict:
    """Replay one segment and give the verdict (`transcript.compare`'s, with the checks around
    it: the base model, the data, the start checkpoint)."""
    from . import model as modelmod
    from . import transcript as T

    limits = limits or Limits()
    started = time.perf_counter()
    model_folder = Path(model_folder)
    start = T.Checkpoint.load(start_path)
    recorded = T.entry_at(transcript, start.step)
    end_step = T.segment_end(transcript, start.step, end_step)
    base = modelmod.check_folder(model_folder, source={}, limits=limits, check_cancelled=check_cancelled)
    base_ok = base.weights_sha256 == transcript["base_model"]["weights_sha256"]
    tokenizer = modelmod.load_tokenizer(model_folder)
    examples, file_sha = training_examples(transcript, Path(data_path), tokenizer, limits=limits,
                                           check_cancelled=check_cancelled)
    data_ok = T.examples_digest(examples) == transcript["data"]["train_examples_sha256"]
    start_ok = start.state_sha256() == recorded["state_sha256"]
    if start.step == 0:   # step 0 is the seed's (and the base model's): no other starting point slips in
        seeded = T.seeded_start(transcript, model_folder, tokenizer, trust_remote_code=limits.trust_remote_code)
        start_ok = start_ok and seeded.weights_sha256() == start.weights_sha256() and \
            not any(k.startswith("optim/") for k in start.tensors)
    claimed = T.Checkpoint.load(end_path) if end_path is not None else None
    got = T.replay(transcript, start, model_folder, examples, tokenizer, end_step, device=device,
                   trust_remote_code=limits.trust_remote_code, check_cancelled=check_cancelled)
    verdict = T.compare(transcript, got, claimed, tolerance)
    verdict["match"] = bool(verdict["match"] and data_ok and start_ok and base_ok)
    verdict.update({"segment": [start.step, end_step], "data_matches_transcript": data_ok,
                    "data_file_sha256": file_sha, "start_checkpoint_matches_transcript": start_ok,
                    "base_model_matches_transcript": base_ok, "tolerance": tolerance,
                    "replay_seconds": round(time.perf_counter() - started, 3)})
    return verdict


def resolve_base(ctx, job, transcript: dict, limits: Limits):
    """The base model folder for the check: param model, the input marked 'model', or the hub
    model the transcript names."""
    from . import resolve_model

    repo, revision = read_model_params(job.params.get("model"), job.params.get("revision"), limits)
    archive = job.urls.get("model")
    if repo is None and archive is None:
        source = transcript["base_model"].get("source") or {}
        if "hub" not in source:
            raise JobInputError("the transcript's base model was sent as an archive: send it again as a url "
                                "input marked 'model'")
        repo, revision = read_model_params(str(source["hub"]), str(source.get("revision")), limits)
    wanted = types.SimpleNamespace(model_repo=repo, model_revision=revision, model_archive=archive, limits=limits)
    return resolve_model(ctx, wanted)


def run_job(ctx, job, transcript: dict, signer: str | None, started: float) -> JobResult:
    """Kind 5753 for an LLM transcript: the base model, the data, the checkpoints; replay. The
    limits are this provider's ``[plugins.llm-finetune]``."""
    from dvm_core.devices import choose_device

    limits = Limits.from_config(getattr(ctx, "config", None))

    ctx.progress(2, "preparing the base model")
    base = resolve_base(ctx, job, transcript, limits)
    start_path = ctx.fetch(job.urls["start"], max_bytes=limits.max_model_bytes * 3 + (64 << 20))
    end_path = ctx.fetch(job.urls["end"], max_bytes=limits.max_model_bytes * 3 + (64 << 20)) \
        if job.urls["end"] else None
    data_path = ctx.fetch(job.urls["dataset"], max_bytes=limits.max_dataset_bytes)
    ctx.progress(10, "replaying the segment")
    verdict = verify_segment(transcript, data_path, start_path, end_path, model_folder=base.folder,
                             end_step=job.end_step, tolerance=job.tolerance, limits=limits,
                             device=choose_device(getattr(ctx, "device", None)), check_cancelled=ctx.check_cancelled)
    verdict["transcript_signer"] = signer
    ctx.progress(100, "match" if verdict["match"] else "mismatch")
    metrics = {"match": verdict["match"], "segment": verdict["segment"],
               "job_seconds": round(time.monotonic() - started, 3)}
    if verdict["distance"] is not None and not math.isfinite(verdict["distance"]):
        verdict["distance"] = None
    return JobResult(verdict, metrics=metrics)


def local_base(transcript: dict, model: Path | None, workdir: Path) -> Path:
    """For `dvm verify --local`: the base model folder, from `model` (a folder, or the archive
    the job was sent, unpacked under `workdir`, which the caller removes) or, for a hub model,
    this machine's hub cache."""
    from dvm_core.archives import ArchiveError, extract_archive

    from . import model as modelmod

    if model is None:
        source = transcript["base_model"].get("source") or {}
        if "hub" not in source:
            raise JobInputError("the job's base model was an archive: give it (--model PATH)")
        folder, _ = modelmod.hub_folder(source["hub"], source.get("revision"), None)
        return folder
    model = Path(model)
    if model.is_dir():
        return modelmod.find_model_folder(model)
    target = Path(workdir) / "base_model"
    try:
        extract_archive(model, target, max_total_bytes=Limits.max_model_bytes + (64 << 20), max_files=1000)
    except ArchiveError as exc:
        raise JobInputError(f"the model archive cannot be used: {exc}") from None
    return modelmod.find_model_folder(target)
