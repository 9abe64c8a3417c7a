"""Image-classifier training as a NIP-90 job (kind 5750, ``image-classifier``).

The customer sends a labelled image dataset by URL; the DVM trains a small CNN (images up to
32 px) or a small ResNet (larger) with PyTorch through Accelerate and returns the weights
(``model.safetensors``), a model card (``model_card.json``, and ``README.md`` for people, in
the Hugging Face layout), the training curves (``training_curves.png``) and, when there are
validation images, a confusion matrix (``confusion_matrix.png``; per-class precision and recall
are in both cards). `predict.load_model(weights, card)` rebuilds the classifier.

Inputs (``url``, told apart by the ``i`` tag's marker):

- no marker (or ``train``): the training set, an ``.npz`` (``x`` uint8 N×H×W[×C], ``y`` integer
  labels, optional ``classes`` names) or a zip/tar with one folder of PNG/JPEG images per class;
- ``validation``: a validation set in the same form (else ``validation_fraction`` is held out);
- ``weights``: initial weights, a ``model.safetensors`` from an earlier result (fine-tuning).

Params: see `params.PARAMS` (all optional). The price is samples × epochs × the provider's
``sats_per_million_sample_epochs`` / 10⁶ (at least 1 sat), for the ``samples`` the customer
declares, else the provider's ``max_samples``; `params` documents the provider's settings.

Training runs in the worker's process, or, with the provider's ``processes = N`` (N > 1), under
``accelerate launch`` in N child processes (several GPUs, or CPU processes; see `launched`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from dvm_core import Artifact, JobInputError, JobKind, JobResult, hookimpl
from dvm_core.datarefs import sha256_file

from .params import NAME, PARAMS, ImageClassifierJob, Limits, parse_request, price
from .params import schema as params_schema

__version__ = "0.1.0"
KIND = 5750

__all__ = ["KIND", "NAME", "run", "register_job_kinds", "job_kind"]


def job_kind(config: dict | None = None) -> JobKind:
    """The `JobKind` with the provider's limits from `config` (the worker's whole config)."""
    limits = Limits.from_config(config)
    rate = limits.sats_per_million_sample_epochs
    pricing = (f"Price: {rate:g} sats per million sample-epochs (images × epochs), at least 1 sat."
               if rate > 0 else "Free.")
    return JobKind(
        kind=KIND, name=NAME,
        description=(
            "Trains an image classifier (a small CNN, or a small ResNet for images over 32 px) on your "
            "labelled images and returns model.safetensors, model_card.json, README.md, training_curves.png "
            "and confusion_matrix.png. "
            "Input: a url to an .npz (x: uint8 images N×H×W or N×H×W×C, y: integer labels, optional "
            "classes: names) or a zip/tar with one folder of PNG/JPEG images per class; optional url "
            "inputs marked 'validation' (a validation set) and 'weights' (initial safetensors weights). "
            f"Limits: {limits.max_samples} images, {limits.max_dataset_bytes} bytes, "
            f"{limits.max_image_size} px, {limits.max_epochs} epochs, {limits.max_seconds:g} s. {pricing} "
            f"With checkpoint_every, a signed training transcript and its checkpoints, kept "
            f"{limits.checkpoint_retention_days:g} days; kind 5753 verifies a segment of it."),
        run=run, parse=lambda request: parse_request(request, limits), params=dict(PARAMS),
        params_schema=params_schema(limits),
        precheck=precheck,
        price=(lambda job: price(job, job.limits)) if rate > 0 else None,
        pricing=(f"{rate:g} sats per million sample-epochs (images × epochs, counted in your "
                 "dataset before you pay), at least 1 sat" if rate > 0 else None))


@hookimpl
def register_job_kinds(register, config):
    """Register kind 5750 ``image-classifier`` with the limits of ``[plugins.image-classifier]``,
    and the checker of its transcripts, which kind 5753 (``training-verify``, served by the core
    wherever a training plugin is loaded) hands them to."""
    from . import verify

    register(job_kind(config))
    register(verify.checker(config))


def precheck(ctx, job: ImageClassifierJob) -> ImageClassifierJob:
    """Before the price: read the training set (and the validation set), refuse what cannot be
    trained on, and count the images, so the customer pays for the images they sent."""
    import numpy as np

    from . import data as datamod

    limits = job.limits
    counts = {}
    for what, url in (("training set", job.dataset), ("validation set", job.validation)):
        if url is None:
            continue
        raw = datamod.load_labelled(ctx.fetch(url), what=what, limits=limits, workdir=ctx.workdir,
                                    image_size=job.params.image_size, check_cancelled=ctx.check_cancelled)
        n, classes = raw.images.shape[0], len(np.unique(raw.codes))
        if n > limits.max_samples:
            raise JobInputError(f"the {what} holds {n} images; this provider trains on at most "
                                f"{limits.max_samples} per job")
        if what == "training set" and classes < 2:
            raise JobInputError(f"the training set holds images of {classes} class only: a classifier "
                                "needs at least two")
        counts[what] = n
    return dataclasses.replace(job, declared_samples=counts["training set"])


def run(ctx, job: ImageClassifierJob) -> JobResult:
    """Download and check the data, train, and return the weights, model card and curves."""
    # Imported here, not at module level: the worker loads every plugin at start, and torch
    # and Accelerate take seconds to import; only a running job needs them.
    from dvm_core.devices import choose_device

    from . import data as datamod
    from . import outputs, readme
    from .models import make_spec
    from .train import normalisation, split_indices, to_tensors, train

    started = time.monotonic()
    params, limits = job.params, job.limits
    ctx.progress(0, "downloading the training set")
    raw = datamod.load_labelled(ctx.fetch(job.dataset), what="training set", limits=limits,
                                workdir=ctx.workdir, image_size=params.image_size,
                                check_cancelled=ctx.check_cancelled)
    n = raw.images.shape[0]
    if n > limits.max_samples:
        raise JobInputError(f"the training set holds {n} images; this provider trains on at most "
                            f"{limits.max_samples} per job")
    if job.declared_samples is not None and n > job.declared_samples:
        raise JobInputError(f"the training set holds {n} images but param samples says "
                            f"{job.declared_samples} (the price was computed for that many): "
                            f"send samples={n} or more")
    train_set = datamod.as_training_set(raw)
    val_set = None
    if job.validation is not None:
        ctx.progress(1, "downloading the validation set")
        raw_val = datamod.load_labelled(ctx.fetch(job.validation), what="validation set", limits=limits,
                                        workdir=ctx.workdir, image_size=params.image_size,
                                        check_cancelled=ctx.check_cancelled)
        if raw_val.images.shape[0] > limits.max_samples:
            raise JobInputError(f"the validation set holds {raw_val.images.shape[0]} images; at most "
                                f"{limits.max_samples}")
        val_set = datamod.as_validation_set(raw_val, train_set)
    initial = None
    weights_sha256 = None
    if job.weights is not None:
        ctx.progress(2, "downloading the initial weights")
        weights_path = ctx.fetch(job.weights)
        weights_sha256 = sha256_file(weights_path)
        initial = _read_weights(weights_path, limits)
    ctx.check_cancelled()

    _, height, width, channels = train_set.images.shape
    spec = make_spec(params.architecture, channels, len(train_set.classes), height, width)
    x, y = to_tensors(train_set.images, train_set.labels)
    if val_set is not None:
        x_val, y_val = to_tensors(val_set.images, val_set.labels)
        validation = {"source": "input", "samples": int(x_val.shape[0]), "sha256": val_set.sha256,
                      "format": val_set.format}
    else:
        train_idx, val_idx = split_indices(n, params.validation_fraction, params.seed)
        x_val, y_val = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]
        validation = {"source": "held out from the training set", "fraction": params.validation_fraction,
                      "samples": int(x_val.shape[0])}
    if params.normalisation is not None:  # the customer's (a federated round: the whole dataset's)
        mean, std = (list(v) for v in params.normalisation)
        if len(mean) != x.shape[1]:
            raise JobInputError(f"param normalisation gives {len(mean)} channel(s) but the images "
                                f"have {x.shape[1]}")
    else:
        mean, std = normalisation(x)  # from the images trained on, never the validation ones

    # Leave time before the job's deadline to evaluate and write the results.
    left = ctx.time_left()
    budget = max(1.0, min(params.time_limit, left - min(60.0, 0.1 * left)))
    device = choose_device(getattr(ctx, "device", None))
    ctx.progress(5, f"training a {spec['type']} on {x.shape[0]} images of {len(train_set.classes)} "
                    f"classes ({height}×{width}×{channels}) on {device}")

    def on_epoch(record: dict, epochs: int) -> None:
        message = (f"epoch {record['epoch']}/{epochs} loss {record['train_loss']:.4f} "
                   f"acc {record['train_accuracy']:.4f}")
        if record["val_accuracy"] is not None:
            message += f" val_loss {record['val_loss']:.4f} val_acc {record['val_accuracy']:.4f}"
        ctx.progress(5 + 90 * record["epoch"] / epochs, message)

    recorder = _recorder(ctx, params, limits, n_train=int(x.shape[0]))
    if limits.processes > 1:
        outcome = _train_launched(ctx, limits.processes, device, x=x, y=y, x_val=x_val, y_val=y_val, spec=spec,
                                  params=params, mean=mean, std=std, initial_weights=initial,
                                  time_budget=budget, on_epoch=on_epoch)
    else:
        outcome = train(train_images=x, train_labels=y,
                        val_images=x_val if x_val.shape[0] else None, val_labels=y_val if x_val.shape[0] else None,
                        spec=spec, params=params, mean=mean, std=std, initial_weights=initial,
                        time_budget=budget, device=device, check_cancelled=ctx.check_cancelled,
                        on_epoch=on_epoch, transcript=recorder)

    ctx.progress(96, "writing the model")
    out = ctx.workdir / "result"
    out.mkdir(exist_ok=True)
    weights_file = out / "model.safetensors"
    card_file = out / "model_card.json"
    curves_file = out / "training_curves.png"
    outputs.save_weights(outcome.state_dict, weights_file, spec)
    card = outputs.model_card(
        spec=spec, classes=train_set.classes, mean=mean, std=std, params=params, outcome=outcome,
        datasets={"train": {"sha256": train_set.sha256, "format": train_set.format, "samples": n,
                            "trained_on": int(x.shape[0])},
                  "validation": validation},
        initial_weights_sha256=weights_sha256, weights_file=weights_file)
    if limits.processes > 1:
        card["training"]["launch"] = {"processes": limits.processes, "launcher": "accelerate launch"}
    warning = _no_better_than_chance(card["metrics"]["val_accuracy"], y_val)
    if warning:
        card["warning"] = warning
        ctx.log.warning("model no better than chance", val_accuracy=card["metrics"]["val_accuracy"])
    job_info = {"id": ctx.job_id, "kind": KIND, "name": NAME}
    card["job"] = job_info
    charts = {"training_curves.png": f"{NAME} job {ctx.job_id[:8]}: {spec['type']} on {int(x.shape[0]):,} images "
                                     f"of {len(train_set.classes)} classes ({height}×{width}×{channels})"}
    if x_val.shape[0]:
        # Per-class figures on the same validation images as val_accuracy.
        matrix = outputs.confusion_matrix(outcome.state_dict, spec, mean, std, x_val, y_val)
        card["metrics"]["per_class"] = outputs.per_class(matrix, train_set.classes)
        card["metrics"]["confusion_matrix"] = matrix
        charts["confusion_matrix.png"] = (f"{NAME} job {ctx.job_id[:8]}: confusion on {int(x_val.shape[0]):,} "
                                          "validation images")
        outputs.plot_confusion(matrix, train_set.classes, out / "confusion_matrix.png",
                               title=charts["confusion_matrix.png"])
    outputs.write_card(card_file, card)
    outputs.plot_curves(outcome.history, curves_file, title=charts["training_curves.png"])
    files = ["model.safetensors", "model_card.json", "README.md", *charts]
    readme.write(out / "README.md", card, job=job_info, files=files, charts=charts)
    ctx.progress(100, "done")

    content = {
        "classes": train_set.classes,
        "epochs": len(outcome.history),
        "architecture": spec["type"],
        **card["metrics"],
        "validation_samples": int(x_val.shape[0]),
        "train_samples": int(x.shape[0]),
        "stopped_early": outcome.stopped,
    }
    if warning:
        content["warning"] = warning
    signed = []
    if recorder is not None:
        signed = _write_transcript(out, recorder, params=params, spec=spec, mean=mean, std=std,
                                   data_sha256=train_set.sha256, x=x, y=y, validation=validation, outcome=outcome,
                                   retention_days=limits.checkpoint_retention_days,
                                   initial_weights_sha256=weights_sha256)
        content["transcript"] = {"checkpoint_every": recorder.every, "checkpoints": len(recorder.entries),
                                 "final_step": recorder.entries[-1]["step"],
                                 "final_weights_sha256": recorder.entries[-1]["weights_sha256"]}
    metrics = {"samples_per_s": round(outcome.samples_per_s, 1), "train_seconds": round(outcome.train_seconds, 3),
               "job_seconds": round(time.monotonic() - started, 3), "samples": n, "epochs": len(outcome.history),
               "val_accuracy": card["metrics"]["val_accuracy"], "device": outcome.device}
    types = {".safetensors": "application/octet-stream", ".json": "application/json", ".md": "text/markdown",
             ".png": "image/png"}
    return JobResult(content, metrics=metrics,
                     artifacts=[Artifact(out / name, types[Path(name).suffix], name) for name in files] + signed)


def _recorder(ctx, params, limits: Limits, n_train: int):
    """The transcript's recorder when param checkpoint_every asks for one, after checking that
    the job can have one (one process; a bounded number of checkpoints)."""
    if not params.checkpoint_every:
        return None
    from .transcript import MAX_CHECKPOINTS, Recorder

    if limits.processes > 1:
        raise JobInputError(f"this provider trains in {limits.processes} processes, where training "
                            "transcripts are not available: send checkpoint_every=0")
    per_epoch = n_train // params.batch_size + (1 if n_train % params.batch_size >= 2 else 0)
    planned = per_epoch * params.epochs
    wanted = planned // params.checkpoint_every + 2
    if wanted > MAX_CHECKPOINTS:
        least = math.ceil(planned / (MAX_CHECKPOINTS - 2))
        raise JobInputError(f"param checkpoint_every {params.checkpoint_every} would write {wanted} checkpoints "
                            f"over {planned} steps; at most {MAX_CHECKPOINTS}: send {least} or more")
    return Recorder(params.checkpoint_every, ctx.workdir / "checkpoints")


def _write_transcript(out: Path, recorder, *, params, spec, mean, std, data_sha256, x, y, validation,
                      outcome, retention_days: float, initial_weights_sha256: str | None) -> list[Artifact]:
    """transcript.json (signed by the worker) and the checkpoints, as the result's files."""
    import json

    from . import transcript

    per_epoch = x.shape[0] // params.batch_size + (1 if x.shape[0] % params.batch_size >= 2 else 0)
    record = transcript.build(recorder=recorder, params=params, spec=spec, mean=mean, std=std,
                              data_sha256=data_sha256, train_sha256=transcript.data_digest(x, y),
                              n_train=int(x.shape[0]), validation=validation, image_size=params.image_size,
                              steps_per_epoch=per_epoch, outcome=outcome)
    record["checkpoints_kept_days"] = retention_days   # the provider's promise for its blob servers
    record["initial_weights_sha256"] = initial_weights_sha256   # the customer's weights input, if any
    path = out / "transcript.json"
    path.write_text(json.dumps(record, indent=1))
    return [Artifact(path, "application/json", "transcript.json", signed=True)] + \
        [Artifact(f, "application/octet-stream", f.name, keep_days=retention_days) for f in recorder.files]


def _no_better_than_chance(val_accuracy: float | None, y_val) -> str | None:
    """A plain sentence when the model does no better on the validation set than always
    answering its most common class (which a model that learned nothing does)."""
    import numpy as np

    if val_accuracy is None or y_val is None or len(y_val) == 0:
        return None
    labels = np.asarray(y_val.cpu() if hasattr(y_val, "cpu") else y_val)
    chance = np.bincount(labels).max() / len(labels)
    if val_accuracy > chance + 0.5 * (1 - chance) / max(2, len(labels)) ** 0.5:
        return None
    return (f"this model is no better than chance: validation accuracy {val_accuracy:.3f}, while "
            f"always answering the most common class scores {chance:.3f}. It has not learned to tell "
            "the classes apart: send more images per class, train for more epochs, or check the labels.")


def _train_launched(ctx, processes: int, device, *, x, y, x_val, y_val, spec, params, mean, std,
                    initial_weights, time_budget, on_epoch):
    """Train under ``accelerate launch`` in `processes` processes (see `launched`): cancellation
    and the job's deadline kill them; the outcome is the in-process one's."""
    import torch
    from dvm_core import JobError, launch
    from dvm_core.devices import gpus_given, precision_for
    from safetensors.torch import load_file

    from . import launched

    use_gpu = device.type == "cuda"
    given = gpus_given(getattr(ctx, "device", None))   # the job's GPUs: all its children see
    if use_gpu and given < processes:
        raise JobError(f"this job was given {given} GPU(s) and the provider is set to train with "
                       f"{processes} processes (list a slot of that many GPUs in devices, e.g. \"cuda:0,1\")")
    precision = precision_for(device)
    job_file = launched.write_job(ctx.workdir / "launch", x=x, y=y, x_val=x_val, y_val=y_val, spec=spec,
                                  params=params, mean=mean, std=std, initial_weights=initial_weights,
                                  time_budget=time_budget, use_cpu=not use_gpu)
    result = launch.run(job_file, module=launched.__name__, processes=processes, use_gpu=use_gpu,
                        precision=precision, threads=torch.get_num_threads(), check_cancelled=ctx.check_cancelled,
                        on_progress=lambda item: on_epoch(item["record"], item["epochs"]),
                        device=getattr(ctx, "device", None), log=ctx.log)
    if "outcome" in result:
        state = load_file(str(job_file.parent / "weights.safetensors"))
        return launched.outcome_from_dict(result["outcome"], state)
    if result.get("error") == "input":
        raise JobInputError(result["message"])
    raise JobError(f"training failed: {result.get('message', 'unknown error')[:500]}")


def _read_weights(path: Path, limits: Limits):
    """The customer's initial weights: a safetensors file (never a pickle), within the limits."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    size = path.stat().st_size
    if size > limits.max_dataset_bytes:
        raise JobInputError(f"the initial weights are {size} bytes; at most {limits.max_dataset_bytes}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise JobInputError(f"the initial weights are not a valid safetensors file ({exc})") from None
