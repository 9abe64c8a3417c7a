"""LLM fine-tuning as a NIP-90 job (kind 5751, ``llm-finetune``).

The customer sends a base model and a text dataset; the DVM fine-tunes the model with
transformers and peft through Accelerate and returns a LoRA adapter
(``adapter_model.safetensors`` + ``adapter_config.json``) or the whole model (``model.safetensors``,
config and tokenizer files), a model card (``model_card.json``: the base model and its hash, the
method and hyperparameters, losses and perplexities before and after, tokens seen, time, device),
the same for people (``README.md``, in the Hugging Face layout, with a snippet that loads the
result) and the loss and perplexity curves with the evaluations marked (``loss_curve.png``).

- Base model: param ``model``, a Hugging Face repo id in the provider's allow-list, served from
  the provider's hub cache (never downloaded), or a ``url`` input marked ``model``: a zip/tar of
  a model folder (config.json, ``*.safetensors``, tokenizer files). Pickle weights and model
  code are refused (the latter unless the provider allows it).
- Data: a ``url`` input (no marker) with a JSONL training set (``text``, or ``prompt`` and
  ``completion``, or chat ``messages``; see `data`), optionally one marked ``eval``.
- Params: `params.PARAMS`; settings of the provider: `params` (``[plugins.llm-finetune]``).

Training runs in the worker's process on the CPU or one GPU, or, with ``processes`` > 1 (or the
provider's ``launcher = "accelerate"``), under ``accelerate launch`` in a child process group
that cancellation and the time limit kill (`launch`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time

from dvm_core import Artifact, JobError, JobInputError, JobKind, JobResult, hookimpl
from dvm_core.datarefs import sha256_file

from .params import NAME, PARAMS, FinetuneJob, Limits, parse_request, price
from .params import schema as params_schema

__version__ = "0.1.0"
KIND = 5751
MAX_ARCHIVE_FILES = 1000
PRECHECK_MARGIN_SECONDS = 3.0

__all__ = ["KIND", "NAME", "run", "register_job_kinds", "job_kind"]


def job_kind(config: dict | None = None) -> JobKind:
    """The `JobKind` with the provider's limits from `config` (the worker's whole config)."""
    limits = Limits.from_config(config)
    rate = limits.sats_per_million_tokens
    pricing = (f"Price: {rate:g} sats per million tokens (dataset tokens × epochs), at least 1 sat."
               if rate > 0 else "Free.")
    models = ", ".join(limits.allowed_models) or "none (send a model archive)"
    return JobKind(
        kind=KIND, name=NAME,
        description=(
            "Fine-tunes a causal language model (LoRA adapter or full weights) on your text and returns "
            "the adapter (adapter_model.safetensors, adapter_config.json) or the model (model.safetensors, "
            "config and tokenizer files), model_card.json (losses and perplexities before and after) and "
            "loss_curve.png. Inputs: a url to a JSONL training set (each line {\"text\"}, or "
            "{\"prompt\",\"completion\"}, or chat {\"messages\"}), optionally a url marked 'eval' (an "
            "evaluation set) and a url marked 'model' (a zip/tar of a model folder with safetensors "
            f"weights) instead of param model. Hub models offered: {models}. Limits: "
            f"{limits.max_model_parameters:,} parameters, {limits.max_tokens:,} tokens, "
            f"{limits.max_seq_length} tokens per sequence, {limits.max_epochs} epochs, "
            f"{limits.max_seconds:g} s, {limits.max_processes} process(es). {pricing} "
            f"With checkpoint_every, a signed training transcript and its checkpoints, kept "
            f"{limits.checkpoint_retention_days:g} days; kind 5753 verifies a segment of it."),
        run=run, parse=lambda request: parse_request(request, limits), params=dict(PARAMS),
        params_schema=params_schema(limits),
        precheck=precheck,
        price=(lambda job: price(job, job.limits)) if rate > 0 else None,
        pricing=(f"{rate:g} sats per million tokens (dataset tokens × epochs, counted with the base "
                 "model's tokenizer before you pay), at least 1 sat" if rate > 0 else None))


@hookimpl
def register_job_kinds(register, config):
    """Register kind 5751 ``llm-finetune`` with the settings of ``[plugins.llm-finetune]``, and the
    checker of its transcripts, which kind 5753 (``training-verify``, served by the core wherever a
    training plugin is loaded) hands them to."""
    from .verify import checker

    register(job_kind(config))
    register(checker(config))


@hookimpl
def check_setup(config):
    """For `dvm doctor`: with no hub model allowed, the kind takes only models sent as archives."""
    if Limits.from_config(config).allowed_models:
        return []
    return [("warn", f"{NAME}: no hub model is allowed ([plugins.{NAME}] allowed_models is empty), so "
             "customers must send each base model as an archive; fix: list repo ids your hub cache holds, "
             f'e.g. [plugins.{NAME}] allowed_models = ["HuggingFaceTB/SmolLM2-135M"]')]


def resolve_model(ctx, job: FinetuneJob):
    """The checked base model folder (`model.BaseModel`), from the hub cache or the archive."""
    from dvm_core.archives import ArchiveError, extract_archive

    from . import model as modelmod

    limits = job.limits
    if job.model_repo is not None:
        folder, commit = modelmod.hub_folder(job.model_repo, job.model_revision, limits.hub_cache_dir)
        source = {"hub": job.model_repo, "revision": commit}
    else:
        archive = ctx.fetch(job.model_archive)
        size = archive.stat().st_size
        if size > limits.max_model_bytes:
            raise JobInputError(f"the model archive is {size} bytes; this provider takes at most "
                                f"{limits.max_model_bytes}")
        target = ctx.workdir / "base_model"
        if target.exists():  # a retried job in the same folder
            shutil.rmtree(target)
        try:
            extract_archive(archive, target, max_total_bytes=limits.max_model_bytes + (64 << 20),
                            max_files=MAX_ARCHIVE_FILES, check_cancelled=ctx.check_cancelled)
        except ArchiveError as exc:
            raise JobInputError(f"the model archive cannot be used: {exc}") from None
        folder = modelmod.find_model_folder(target)
        source = {"archive_sha256": sha256_file(archive)}
    return modelmod.check_folder(folder, source=source, limits=limits, check_cancelled=ctx.check_cancelled)


def precheck(ctx, job: FinetuneJob) -> FinetuneJob:
    """Before the price: check the base model and the training set, and count the set's tokens
    with the model's tokenizer, so the customer pays for the tokens they sent."""
    from . import data as datamod
    from . import model as modelmod

    limits, params = job.limits, job.params
    base = resolve_model(ctx, job)
    tokenizer = modelmod.load_tokenizer(base.folder)
    train_set = datamod.read_jsonl(ctx.fetch(job.dataset), what="training set", max_bytes=limits.max_dataset_bytes,
                                   max_examples=limits.max_examples, check_cancelled=ctx.check_cancelled)
    # A chat template that never ends is stopped a little before the precheck's own limit, so
    # the customer hears that it was the template, not that the inputs took too long.
    tokens = datamod.tokenize(train_set, tokenizer, params.max_seq_length, what="training set",
                              check_cancelled=ctx.check_cancelled,
                              render_seconds=max(1.0, ctx.time_left() - PRECHECK_MARGIN_SECONDS),
                              folder=ctx.workdir).tokens
    if tokens > limits.max_tokens:
        raise JobInputError(f"the training set holds {tokens:,} tokens; this provider trains on at "
                            f"most {limits.max_tokens:,} per epoch")
    return dataclasses.replace(job, declared_tokens=tokens)


def run(ctx, job: FinetuneJob) -> JobResult:
    """Fetch and check the model and data, fine-tune, return the weights, card and curve."""
    # Imported here: the worker loads every plugin at start; torch and transformers take
    # seconds to import and only a running job needs them.
    from . import data as datamod
    from . import model as modelmod
    from . import outputs, readme
    from . import transcript
    from .train import TrainSpec

    started = time.monotonic()
    params, limits = job.params, job.limits
    ctx.progress(0, "preparing the base model")
    base = resolve_model(ctx, job)
    tokenizer = modelmod.load_tokenizer(base.folder)

    ctx.progress(1, "downloading the training set")
    train_set = datamod.read_jsonl(ctx.fetch(job.dataset), what="training set", max_bytes=limits.max_dataset_bytes,
                                   max_examples=limits.max_examples, check_cancelled=ctx.check_cancelled)
    train_tok = datamod.tokenize(train_set, tokenizer, params.max_seq_length, what="training set",
                                 check_cancelled=ctx.check_cancelled, render_seconds=ctx.time_left(),
                                 folder=ctx.workdir)   # the tokens go to a file there, read back by batch
    if train_tok.tokens > limits.max_tokens:
        raise JobInputError(f"the training set holds {train_tok.tokens:,} tokens; this provider trains on at "
                            f"most {limits.max_tokens:,} per epoch")
    if job.declared_tokens is not None and train_tok.tokens > job.declared_tokens:
        raise JobInputError(f"the training set holds {train_tok.tokens} tokens but param tokens says "
                            f"{job.declared_tokens} (the price was computed for that many): send "
                            f"tokens={train_tok.tokens} or more")
    datasets = {"train": {"sha256": train_set.sha256, "format": train_set.format,
                          "examples": len(train_set.records), "loss_on": train_tok.loss_on,
                          "dropped_too_long": train_tok.dropped_too_long}}
    if job.eval_dataset is not None:
        ctx.progress(2, "downloading the evaluation set")
        eval_set = datamod.read_jsonl(ctx.fetch(job.eval_dataset), what="evaluation set",
                                      max_bytes=limits.max_dataset_bytes, max_examples=limits.max_examples,
                                      check_cancelled=ctx.check_cancelled)
        eval_tok = datamod.tokenize(eval_set, tokenizer, params.max_seq_length, what="evaluation set",
                                    check_cancelled=ctx.check_cancelled, render_seconds=ctx.time_left(),
                                    folder=ctx.workdir)
        train_examples, eval_examples = train_tok.examples, eval_tok.examples
        datasets["eval"] = {"source": "input", "sha256": eval_set.sha256, "format": eval_set.format,
                            "examples": len(eval_examples)}
    else:
        train_examples, eval_examples = datamod.split_eval(train_tok.examples, params.eval_fraction, params.seed)
        datasets["eval"] = {"source": "held out from the training set", "fraction": params.eval_fraction,
                            "examples": len(eval_examples)}
    datasets["train"]["trained_on"] = len(train_examples)
    ctx.check_cancelled()

    left = ctx.time_left()
    budget = max(1.0, min(params.time_limit, left - min(120.0, 0.1 * left)))
    out = ctx.workdir / "result"
    if out.exists():
        shutil.rmtree(out)
    base_name = job.model_repo or f"archive sha256:{base.source['archive_sha256']}"
    spec = TrainSpec(model_folder=str(base.folder), model_type=base.model_type, base_model_name=base_name,
                     params=params.as_dict(), output_dir=str(out), time_budget=budget,
                     trust_remote_code=limits.trust_remote_code, device=getattr(ctx, "device", None))

    def report(fraction: float, message: str, fields: dict) -> None:
        ctx.progress(5 + 88 * fraction, message)

    ctx.progress(4, f"fine-tuning ({params.method}) a {base.model_type} model of {base.parameters:,} parameters "
                    f"on {len(train_examples)} examples ({train_tok.tokens:,} tokens)")
    launched = params.processes > 1 or limits.launcher == "accelerate"
    recorder = transcript.recorder_for(ctx, params)   # checkpoint_every: in this process only (params)
    outcome = _train_in_child(ctx, spec, train_examples, eval_examples, params) if launched else \
        _train_here(ctx, spec, train_examples, eval_examples, tokenizer, params, recorder)

    if params.output == "delta":
        ctx.progress(94, f"writing the pseudo-gradient ({params.compression})")
        outcome.files = _keep_only_delta(out, base, params.compression)
    ctx.progress(95, "writing the model card")
    weights = {name: sha256_file(out / name) for name in outcome.files if name.endswith(".safetensors")}
    card_file = out / "model_card.json"
    curve_file = out / "loss_curve.png"
    card = outputs.model_card(base=base, params=params, outcome=outcome, datasets=datasets, weights=weights,
                              job_seconds=time.monotonic() - started)
    job_info = {"id": ctx.job_id, "kind": KIND, "name": NAME}
    card["job"] = job_info
    outputs.write_card(card_file, card)
    shown = job.model_repo or f"an archive (sha256 {base.source['archive_sha256'][:12]}…)"
    charts = {"loss_curve.png": f"{NAME} job {ctx.job_id[:8]}: {'LoRA' if params.method == 'lora' else 'full'} "
                                f"fine-tuning of {shown} ({base.model_type}, {len(train_examples):,} examples)"}
    outputs.plot_loss(outcome.history, outcome.before, outcome.after, curve_file, title=charts["loss_curve.png"])
    files = [*outcome.files, "model_card.json", "README.md", "loss_curve.png"]
    # Replaces the README.md peft writes beside an adapter (an empty template).
    readme.write(out / "README.md", card, job=job_info, files=files, charts=charts)
    ctx.progress(100, "done")

    artifacts = [Artifact(out / name, _mime(name), name) for name in outcome.files]
    artifacts += [Artifact(card_file, "application/json", "model_card.json"),
                  Artifact(out / "README.md", "text/markdown", "README.md"),
                  Artifact(curve_file, "image/png", "loss_curve.png")]
    content = {
        "method": params.method,
        "base_model": base_name,
        "train_loss_before": outcome.before["train_loss"], "train_loss": outcome.after["train_loss"],
        "eval_loss_before": outcome.before["eval_loss"], "eval_loss": outcome.after["eval_loss"],
        "eval_perplexity_before": outcome.before["eval_perplexity"],
        "eval_perplexity": outcome.after["eval_perplexity"],
        "steps": outcome.steps, "tokens_seen": outcome.tokens_seen,
        "train_examples": len(train_examples), "eval_examples": len(eval_examples),
        "stopped_early": outcome.stopped,
    }
    metrics = {"tokens_per_s": round(outcome.tokens_per_s, 1), "train_seconds": round(outcome.train_seconds, 3),
               "job_seconds": round(time.monotonic() - started, 3), "steps": outcome.steps,
               "eval_loss": outcome.after["eval_loss"], "device": outcome.device, "method": params.method}
    if recorder is not None:
        signed, content["transcript"] = transcript.write(
            out, recorder, params=params, base=base, datasets=datasets, train_examples=train_examples,
            outcome=outcome, retention_days=limits.checkpoint_retention_days)
        artifacts += signed
    return JobResult(content, metrics=metrics, artifacts=artifacts)


def _keep_only_delta(out, base, compression: str) -> list[str]:
    """Param output=delta: replace the fine-tuned model in `out` by its pseudo-gradient against
    the base (`delta`); the names of the files left to return."""
    from safetensors.torch import load_file

    from .delta import FILE, write_delta

    trained = {}
    for f in sorted(out.glob("*.safetensors")):
        trained.update(load_file(str(f)))
    write_delta(base.folder, trained, out / (FILE + ".part"), compression, base.weights_sha256)
    for f in out.iterdir():
        if f.is_file() and f.name != FILE + ".part":
            f.unlink()
    (out / (FILE + ".part")).replace(out / FILE)
    return [FILE]


def _mime(name: str) -> str:
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def _train_here(ctx, spec, train_examples, eval_examples, tokenizer, params, recorder=None):
    """In this process. Out of memory: the training frames are gone by the time memory is freed
    (the except block keeps no reference), and the worker goes on with a clear error."""
    from .train import free_memory, is_oom, oom_message, train

    try:
        return train(spec, train_examples, eval_examples, tokenizer, check_cancelled=ctx.check_cancelled,
                     report=lambda f, m, fields: ctx.progress(5 + 88 * f, m), transcript=recorder)
    except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled here
        if not is_oom(exc):
            raise
        ctx.log.warning("out of memory", error=str(exc)[:300])
    free_memory()
    raise JobError(oom_message(params))


def _train_in_child(ctx, spec, train_examples, eval_examples, params):
    """Under ``accelerate launch`` (see `launch`): cancellation and the deadline kill it."""
    import torch

    from dvm_core import launch as launcher
    from dvm_core.devices import choose_device, gpus_given, precision_for

    from . import launch
    from .train import oom_message, outcome_from_dict

    device = choose_device(spec.device)
    use_gpu = device.type == "cuda"
    # The GPUs of this job's device slot (`devices`), else the machine's: the launched
    # processes see only those (`dvm_core.launch.visible_devices`), one each.
    if params.processes > 1 and use_gpu and gpus_given(spec.device) < params.processes:
        raise JobError(f"this job was given {gpus_given(spec.device)} GPU(s) ({spec.device or 'all'}), it asks for "
                       f"{params.processes} processes: the provider lists a slot of that many GPUs in "
                       "devices, e.g. \"cuda:0,1\"")
    job_file = launch.write_job(ctx.workdir / "launch", spec, train_examples, eval_examples)
    result = launcher.run(job_file, module=launch.__name__, processes=params.processes, use_gpu=use_gpu,
                          precision=precision_for(device), threads=torch.get_num_threads(),
                          check_cancelled=ctx.check_cancelled,
                          on_progress=lambda item: ctx.progress(5 + 88 * item["fraction"], item["message"]),
                          multi_cpu=launch.MULTI_CPU, device=spec.device, log=ctx.log)
    if "outcome" in result:
        return outcome_from_dict(result["outcome"])
    if result.get("error") == "input":
        raise JobInputError(result["message"])
    if result.get("error") == "oom":
        raise JobError(oom_message(params))
    raise JobError(f"training failed: {result.get('message', 'unknown error')[:500]}")


