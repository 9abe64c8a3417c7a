"""A training transcript, and the replay of one of its segments (issue 17).

With param ``checkpoint_every`` = k, training writes a checkpoint every k steps and at the end:
everything a resumption needs (the weights and BatchNorm statistics, the optimizer's moments and
param groups, the learning-rate schedule, the augmentation generator's state), as a safetensors
file (never a pickle: a verifier loads checkpoints it did not write). The transcript lists the
sha256 of the weights and of the whole state at each of them; the worker signs it as a Nostr
event (`dvm_core.jobs.Artifact.signed`).

A checkpoint at step s is the state after s optimizer steps *and* the epoch-end work that follows
them (BatchNorm recalibration), i.e. the state in which step s + 1 starts; the last one is the
returned model. The order of the examples is not stored: epoch e's batches are the e-th
permutation drawn from ``Generator().manual_seed(seed)`` (`train.ShuffledBatches`), so a replay
derives them from the seed.

`replay` re-executes steps [a, b) from the checkpoint at a, with the same functions `train.train`
uses, and `compare` says whether it lands on the recorded state. On a CPU, with the same
thread count, an honest segment replays bit for bit; across devices (a GPU's mixed precision)
the verifier states a tolerance on the distance.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dvm_core import JobInputError
from dvm_core.transcripts import (  # noqa: F401 - one verdict for every format
    compare, distance, entry_at, segment_end, segments, state_distance)

FORMAT = "dvm-image-classifier-transcript/1"
CHECKPOINT_FORMAT = "dvm-image-classifier-checkpoint/1"
MAX_CHECKPOINTS = 64       # checkpoints one job may write (each is an artifact)


def tensor_digest(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    """sha256 of named tensors (sorted by name: name, dtype, shape and raw bytes each) and of
    `meta` as canonical JSON: the same values give the same digest on any machine."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if meta is not None:
        h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the exact tensors trained on (after the validation split), in order."""
    return tensor_digest({"images": images, "labels": labels})


@dataclass
class Checkpoint:
    """One resumable state: flat tensors (``model/…``, ``optim/<i>/…``, ``rng/augment``) and
    JSON metadata (step, the optimizer's param groups, the scheduler)."""

    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {k[len("model/"):]: v for k, v in self.tensors.items() if k.startswith("model/")}

    def weights_sha256(self) -> str:
        return tensor_digest(self.weights)

    def state_sha256(self) -> str:
        return tensor_digest(self.tensors, self.meta)

    @classmethod
    def capture(cls, step: int, model, optimizer, scheduler, aug_generator: torch.Generator) -> "Checkpoint":
        """The state now. On a CPU the tensors are the live ones, not copies (copying them was
        most of a checkpoint's cost): save or hash the checkpoint before training goes on."""
        tensors = {f"model/{k}": v.detach().to("cpu") for k, v in model.state_dict().items()}
        opt = optimizer.state_dict()
        for index, state in opt["state"].items():
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                tensors[f"optim/{index}/{name}"] = value.detach().to("cpu")
        tensors["rng/augment"] = aug_generator.get_state()
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        return cls(step, tensors, {"format": CHECKPOINT_FORMAT, "step": step, "param_groups": groups,
                                   "scheduler": sched})

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path),
                  metadata={"dvm": json.dumps(self.meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        """Read a checkpoint file, or raise JobInputError: it is someone else's file."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["dvm"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            raise JobInputError(f"not a checkpoint of this plugin ({str(exc)[:200]})") from None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT \
                or not isinstance(meta.get("step"), int) or "rng/augment" not in tensors:
            raise JobInputError("not a checkpoint of this plugin (format, step or generator state missing)")
        return cls(meta["step"], tensors, meta)

    def restore(self, model, optimizer, scheduler, aug_generator: torch.Generator) -> None:
        """Put this state into objects freshly built from the transcript's params. Only what
        training accumulates comes from the file (weights, the optimizer's moments, the generator);
        the hyperparameters (the learning rate, its schedule, weight decay) come from the
        objects, i.e. the transcript: a checkpoint that carries another learning rate does not
        smuggle it into the replay."""
        try:
            model.load_state_dict({k: v for k, v in self.weights.items()}, strict=True)
            state: dict[int, dict] = {}
            for key, value in self.tensors.items():
                if key.startswith("optim/"):
                    _, index, name = key.split("/", 2)
                    state.setdefault(int(index), {})[name] = value
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": state, "param_groups": groups})
            inner = getattr(scheduler, "scheduler", scheduler)   # Accelerate's wrapper, or the scheduler
            inner.last_epoch, inner._step_count = self.step, self.step + 1
            # What LambdaLR.get_lr computes at this step, the same arithmetic.
            inner._last_lr = [base * fn(self.step) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
            for group, lr in zip(optimizer.param_groups, inner._last_lr):
                group["lr"] = lr
            aug_generator.set_state(self.tensors["rng/augment"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise JobInputError(f"the checkpoint does not fit this network or optimizer ({str(exc)[:200]})") from None


class Recorder:
    """Called by `train.train`: a checkpoint every `every` steps (before step s + 1, s a multiple
    of `every`) and one at the end, each saved in `directory` and listed with its digests."""

    def __init__(self, every: int, directory: Path):
        self.every = every
        self.directory = directory
        self.entries: list[dict] = []
        self.files: list[Path] = []
        self.seconds = 0.0        # spent writing checkpoints (the transcript's cost)
        directory.mkdir(parents=True, exist_ok=True)

    def checkpoint(self, step: int, model, optimizer, scheduler, aug_generator, *, final: bool = False,
                   stopped: str | None = None) -> None:
        import time

        started = time.perf_counter()
        point = Checkpoint.capture(step, model, optimizer, scheduler, aug_generator)
        path = point.save(self.directory / f"checkpoint-{step:07d}.safetensors")
        if self.entries and self.entries[-1]["step"] == step:   # the end fell on a k-th step
            self.entries.pop()
            self.files.pop()
        entry = {"step": step, "weights_sha256": point.weights_sha256(), "state_sha256": point.state_sha256(),
                 "file": path.name}
        if final:
            entry["final"] = True
            entry["stopped"] = stopped
        self.entries.append(entry)
        self.files.append(path)
        self.seconds += time.perf_counter() - started


def versions() -> dict:
    """The code the result depends on: these numbers must match for a bit-identical replay."""
    import accelerate
    import numpy

    from . import __version__

    return {"dvm_image_classifier": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "machine": platform.machine()}


def build(*, recorder: Recorder, params, spec: dict, mean, std, data_sha256: str, train_sha256: str,
          n_train: int, validation: dict, image_size, steps_per_epoch: int, outcome) -> dict:
    """The transcript's JSON (what the worker signs)."""
    return {
        "format": FORMAT,
        "versions": versions(),
        "device": outcome.device, "threads": outcome.threads, "mixed_precision": outcome.mixed_precision,
        "deterministic": True,
        "tolerance": 0.0 if outcome.device == "cpu" else None,
        "seed": params.seed,
        "params": _params_json(params),
        "architecture": spec, "normalisation": {"mean": list(mean), "std": list(std)},
        "data": {"sha256": data_sha256, "train_tensors_sha256": train_sha256, "train_samples": n_train,
                 "validation": validation, "image_size": image_size,
                 "order": "epoch e: the e-th torch.randperm(train_samples) of Generator().manual_seed(seed), "
                          "cut into batches of batch_size; a last batch of one image is skipped"},
        "steps_per_epoch": steps_per_epoch,
        "planned_steps": steps_per_epoch * params.epochs,
        "checkpoint_every": recorder.every,
        "checkpoints": recorder.entries,
    }


def _params_json(params) -> dict:
    out = asdict(params)
    if out.get("normalisation") is not None:
        out["normalisation"] = [list(v) for v in out["normalisation"]]
    return out


def params_from(transcript: dict):
    """The `TrainParams` a transcript names (JobInputError when it does not name them)."""
    from .params import TrainParams

    raw = dict(transcript.get("params") or {})
    if raw.get("normalisation") is not None:
        raw["normalisation"] = tuple(tuple(v) for v in raw["normalisation"])
    try:
        return TrainParams(**raw)
    except TypeError as exc:
        raise JobInputError(f"the transcript's params are not this plugin's ({exc})") from None


def replay(transcript: dict, start: Checkpoint, images: torch.Tensor, labels: torch.Tensor, stop: int,
           device: torch.device | None = None, check_cancelled=lambda: None) -> Checkpoint:
    """Re-execute steps [start.step, stop) of the training the transcript describes on the uint8
    `images` and `labels` trained on, from `start`, and return the state reached (the epoch-end
    work after the last step included, as in `train.train`)."""
    from dvm_core.devices import choose_device

    from . import train as T
    from .models import build_model

    params = params_from(transcript)
    spec = transcript["architecture"]
    spe = int(transcript["steps_per_epoch"])
    final = transcript["checkpoints"][-1]
    a = start.step
    if not 0 <= a < stop <= final["step"] or spe < 1:
        raise JobInputError(f"steps [{a}, {stop}) are not within the transcript's 0-{final['step']}")
    n = images.shape[0]
    if n != int(transcript["data"]["train_samples"]):
        raise JobInputError(f"the data holds {n} training images; the transcript says "
                            f"{transcript['data']['train_samples']}")
    device = device or choose_device(None)
    with T.deterministic_algorithms():
        accelerator = T.make_accelerator(device)
        with T._init_lock:  # building draws from the global RNG, which seeded jobs share
            model = build_model(spec)
        model.to(device)
        optimizer = T.make_optimizer(model, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, T.cosine_schedule(spe * params.epochs))
        with T._accelerate_lock:
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        aug_generator = torch.Generator()
        start.restore(accelerator.unwrap_model(model), optimizer, scheduler, aug_generator)
        if device.type != "cpu":
            images, labels = images.to(device), labels.to(device)
        channels = images.shape[1]
        std_t = torch.tensor(transcript["normalisation"]["std"], dtype=torch.float32)
        mean_t = torch.tensor(transcript["normalisation"]["mean"], dtype=torch.float32)
        scale = (1.0 / (255.0 * std_t)).view(1, channels, 1, 1).to(device)
        shift = (-mean_t / std_t).view(1, channels, 1, 1).to(device)
        use_augment = params.augment and min(images.shape[2:]) >= T.AUGMENT_MIN_SIDE
        order = torch.Generator().manual_seed(params.seed)
        epoch, batches = 0, None
        model.train()
        for step in range(a, stop):
            check_cancelled()
            while epoch < step // spe + 1:     # the permutation of the step's epoch
                batches = torch.randperm(n, generator=order).split(params.batch_size)
                epoch += 1
            index = batches[step % spe]
            xb = images[index].to(device, non_blocking=True).float().mul_(scale).add_(shift)
            yb = labels[index].to(device, non_blocking=True)
            if use_augment:
                xb = T.augment(xb, aug_generator)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits.float(), yb)
            model.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            done = step + 1
            epoch_end = done % spe == 0 or (done == final["step"] and final.get("stopped"))
            if epoch_end and math.ceil(done / spe) * spe < T.BN_SETTLE_STEPS:
                T.recalibrate_batchnorm(model, images, scale, shift, device, params.batch_size)
        return Checkpoint.capture(stop, accelerator.unwrap_model(model), optimizer, scheduler, aug_generator)


def seeded_start(transcript: dict, initial_weights: dict | None = None) -> Checkpoint | None:
    """The state at step 0 that the seed alone determines (the network initialised after
    ``torch.manual_seed(seed)``, the augmentation generator seeded with seed + 1), as `train.train`
    starts; for a job that started from the customer's weights (the transcript names their
    sha256), with `initial_weights` loaded into it, or None without them."""
    from . import train as T
    from .models import build_model

    if transcript.get("initial_weights_sha256") and initial_weights is None:
        return None
    params = params_from(transcript)
    with T._init_lock:  # the global RNG is shared with other threads: seed and draw at once
        torch.manual_seed(params.seed)
        model = build_model(transcript["architecture"])
    if transcript.get("initial_weights_sha256"):
        T.load_initial_weights(model, initial_weights, transcript["architecture"])
    tensors = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    tensors["rng/augment"] = torch.Generator().manual_seed((params.seed + 1) % 2**64).get_state()
    return Checkpoint(0, tensors, {})

