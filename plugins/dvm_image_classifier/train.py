"""The training loop: in-memory tensors, Accelerate, per-epoch metrics, reproducible by seed.

- Data stays uint8 (N×C×H×W) in memory, a quarter of float32; each batch is converted and
  normalised on the device. On a GPU the whole set is moved there first when it fits
  (`ON_DEVICE_MAX_BYTES`), so batches never cross PCIe.
- Batches come from a `DataLoader` over a `TensorDataset` whose sampler yields whole batches of
  indices (`ShuffledBatches`: a seeded permutation per epoch, split): one indexing per batch
  instead of one per image and a collate, which is what makes the loop as fast as a bare
  PyTorch loop on small images.
- Accelerate runs the model and optimizer, with bf16 (fp16 where bf16 is missing) mixed
  precision on a GPU and full precision on a CPU. Placement is ours (`device_placement=False`)
  because the worker may hand this job a particular GPU (``ctx.device``, e.g. ``"cuda:1"``).
- Reproducibility: the initial weights come from ``torch.manual_seed(seed)`` (under a lock: the
  global RNG is shared with other jobs' threads), the shuffling and the augmentation from
  generators of their own, the validation split from the seed; deterministic algorithms are on
  while a job trains. Same seed, data and thread count → bit-identical weights.
- Between batches: ``check_cancelled()`` (cancellation, the job's deadline) and the training
  time limit, after which the model is returned as it is.
- Under ``accelerate launch`` (``launched=True``, see `launched.py`) the same loop runs in each
  process: every global batch of the seeded sampler is split across the processes
  (`RankShard`, Accelerate's ``split_batches``: ``batch_size`` stays the images per step), DDP
  averages the gradients, and once per step the processes agree (one all-reduce) on the time
  limit and a non-finite loss, so they all stop at the same step. BatchNorm becomes SyncBatchNorm
  only with several processes on GPUs; on CPUs each process normalises its own shard and DDP
  broadcasts the main process's running statistics. One launched process trains exactly as
  in-process training does.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from dvm_core import JobInputError
from dvm_core.devices import deterministic_algorithms  # noqa: F401 - used here and by transcript
from dvm_core.devices import choose_device, precision_for

from .models import build_model
from .params import TrainParams

ON_DEVICE_MAX_BYTES = 2 << 30
EVAL_BATCH = 512
NAN_CHECK_EVERY = 10      # steps between checks that the loss is finite (a check syncs a GPU)
BN_SETTLE_STEPS = 300     # before this many steps BatchNorm's running statistics are recomputed
BN_CALIBRATION_IMAGES = 4096   # ...over this many training images at most
AUGMENT_MIN_SIDE = 16     # crops and flips only make sense on images at least this large

_init_lock = threading.Lock()
# Accelerate's state objects are per-process singletons, set up without locking: two jobs
# building an Accelerator at once (two devices, or two workers in one process) raced, and one
# failed with "'GradientState' object has no attribute 'plugin_kwargs'".
_accelerate_lock = threading.Lock()


@dataclass
class TrainOutcome:
    """What training produced: the weights (CPU tensors), the history and the speed."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict]
    stopped: str | None              # "time_limit" when training stopped early, else None
    train_seconds: float             # the training loop only (no evaluation)
    samples_seen: int
    device: str
    mixed_precision: str
    threads: int
    hyperparameters: dict = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0


def normalisation(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images (N×C×H×W), on the 0-1 scale."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    chunk = max(1, (32 << 20) // max(1, images[0].numel()))
    for start in range(0, images.shape[0], chunk):
        part = images[start:start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant images: leave the scale
    return [float(m) for m in mean], [float(s) for s in std]


def split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/validation split of `n` samples by `seed`: (train, validation)."""
    if fraction <= 0:
        return torch.arange(n), torch.arange(0)
    n_val = max(1, round(n * fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def load_initial_weights(model: nn.Module, tensors: dict[str, torch.Tensor], spec: dict) -> None:
    """Copy `tensors` (from the customer's safetensors file) into `model`, or raise
    JobInputError naming the keys that do not fit this architecture."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    reshaped = [f"{k} ({'×'.join(map(str, tensors[k].shape))} in the file, "
                f"{'×'.join(map(str, own[k].shape))} here)"
                for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        problems = []
        if reshaped:
            problems.append(f"different shapes: {few(reshaped)}")
        if missing:
            problems.append(f"missing: {few(missing)}")
        if unexpected:
            problems.append(f"not in this network: {few(unexpected)}")
        raise JobInputError(
            f"the initial weights do not fit the network ({spec['type']}, {spec['in_channels']} "
            f"channel(s), {spec['num_classes']} classes, widths {spec['widths']}): {'; '.join(problems)}")
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise JobInputError(f"the initial weights hold NaN or infinite values ({key})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)


class ShuffledBatches(Sampler):
    """Each epoch, a fresh permutation of ``range(n)`` from `generator`, cut into batches of
    index tensors. Indexing a `TensorDataset` with a tensor is one gather per tensor; the
    lists a `BatchSampler` yields cost a conversion per batch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __iter__(self):
        yield from torch.randperm(self.n, generator=self.generator).split(self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)


def _cache_accelerate_lomo_check() -> None:
    """Accelerate's optimizer wrapper asks `is_lomo_available()` twice per step, and each asks
    importlib to search sys.path for the package anew: ~0.5 ms per step, 3% of a CPU step on
    digits and far more of a GPU step. Whether a package is installed does not change while the
    process runs, so the answer is cached (process-wide, harmless to other users)."""
    import accelerate.optimizer as accelerated

    check = getattr(accelerated, "is_lomo_available", None)
    if check is not None and not hasattr(check, "cache_info"):
        accelerated.is_lomo_available = functools.cache(check)


def make_accelerator(device: torch.device):
    """An Accelerator for `device`: bf16 (or fp16) mixed precision on a GPU, none on a CPU."""
    from accelerate import Accelerator  # imported here: it is slow to import and only training needs it

    _cache_accelerate_lomo_check()

    with _accelerate_lock:
        try:
            return Accelerator(mixed_precision=precision_for(device), cpu=device.type == "cpu", device_placement=False)
        except ValueError:
            # Accelerate keeps one state per process; another job (another plugin) set it up first
            # with other settings. Train with that state rather than fail.
            return Accelerator(device_placement=False)


def make_launched_accelerator(use_cpu: bool):
    """In a process of ``accelerate launch``: the Accelerator it configured (mixed precision from
    the launcher), on the CPU when `use_cpu` (torchrun on CPUs needs it to pick gloo), with
    ``split_batches`` (each process trains on its share of a global batch, so the learning-rate
    scheduler steps once per step, not once per process)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    _cache_accelerate_lomo_check()
    return Accelerator(cpu=use_cpu, device_placement=False,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


class RankShard(Sampler):
    """This process's part of each global batch of `batches`: the same seeded batches in every
    process, each split in `world` nearly equal parts. Global batches too small to give every
    process two images are dropped (in every process alike, so the steps stay in step)."""

    def __init__(self, batches: ShuffledBatches, world: int, rank: int):
        self.batches, self.world, self.rank = batches, world, rank

    def __iter__(self):
        for batch in self.batches:
            if batch.numel() >= 2 * self.world:
                yield batch.tensor_split(self.world)[self.rank]

    def __len__(self) -> int:
        n, size = self.batches.n, self.batches.batch_size
        return n // size + (1 if n % size >= 2 * self.world else 0)


def make_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    """adam, adamw or sgd (Nesterov momentum 0.9) with the job's learning rate and weight decay.
    BatchNorm and bias parameters get no weight decay (decaying them only hurts)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": params.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one batched update for all tensors instead of a Python loop over them. PyTorch
    # only defaults to it on GPUs; on a CPU it is ~8% faster for these small nets, same bits.
    if params.optimizer == "adam":
        return torch.optim.Adam(groups, lr=params.learning_rate, foreach=True)
    if params.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=params.learning_rate, foreach=True)
    return torch.optim.SGD(groups, lr=params.learning_rate, momentum=0.9, nesterov=True, foreach=True)


def cosine_schedule(total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: cosine decay from 1 to 0 over the planned run."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crops (after padding each side by 1/8 of the image with zeros, i.e. the mean
    colour once normalised) and random horizontal flips of a normalised batch, drawn from
    `generator` (on the CPU, so the same seed gives the same draws on any device)."""
    b, c, h, w = x.shape
    pad = max(2, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]                  # b×h
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]                  # b×w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Gather each image's crop: padded[i, :, rows[i], cols[i]] for all i at once.
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]     # b×h×w×c
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          device: torch.device, batch_size: int, max_images: int = BN_CALIBRATION_IMAGES) -> None:
    """Set every BatchNorm's running statistics to their exact averages over the training images
    (up to `max_images`) under the current weights ("precise BatchNorm").

    After a few dozen steps the running averages (momentum 0.1) still remember the early
    weights: the model in eval mode then scores at chance on images it classifies perfectly
    in train mode. Small datasets train for few steps, so they are recalibrated."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None          # a cumulative average over the batches below
    was_training = model.training
    model.train()
    batch = max(2, batch_size)
    for start in range(0, min(images.shape[0], max_images), batch):
        xb = images[start:start + batch]
        if xb.shape[0] < 2:
            break
        model(xb.to(device, non_blocking=True).float().mul_(scale).add_(shift))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on uint8 `images` (N×C×H×W)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, images.shape[0], EVAL_BATCH):
        xb = images[start:start + EVAL_BATCH].to(device, non_blocking=True)
        yb = labels[start:start + EVAL_BATCH].to(device, non_blocking=True)
        logits = model(xb.float().mul_(scale).add_(shift)).float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, images.shape[0])
    return float(loss_sum) / n, int(correct) / n


def train(*, train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor | None,
          val_labels: torch.Tensor | None, spec: dict, params: TrainParams, mean: list[float],
          std: list[float], initial_weights: dict[str, torch.Tensor] | None = None,
          time_budget: float | None = None, device: torch.device | None = None,
          check_cancelled: Callable[[], None] = lambda: None,
          on_epoch: Callable[[dict, int], None] = lambda record, epochs: None,
          launched: bool = False, use_cpu: bool = False, transcript=None) -> TrainOutcome:
    """Train the network `spec` describes on uint8 images (N×C×H×W) with int64 labels.

    :param time_budget: seconds of training after which the model is returned as it is
        (`TrainOutcome.stopped` = "time_limit"); None: no limit.
    :param check_cancelled: called between batches; whatever it raises stops training.
    :param on_epoch: called after each epoch with its record (losses, accuracies) and the
        number of planned epochs (in the main process only).
    :param launched: one process of ``accelerate launch`` (`launched.py`): the device is the one
        the launcher gave; `use_cpu` trains on the CPU.
    :param transcript: a `transcript.Recorder` (one process only): a checkpoint every
        ``transcript.every`` steps, before the step that follows, and one at the end.
    :raises JobInputError: the loss became NaN, or the initial weights do not fit.
    """
    device = device or choose_device(None)
    n_train = train_images.shape[0]
    if n_train < 2:
        raise JobInputError("training needs at least two images after holding out the validation set")
    with deterministic_algorithms():
        if launched:
            accelerator = make_launched_accelerator(use_cpu)
            device = accelerator.device
        else:
            accelerator = make_accelerator(device)
        world, main = accelerator.num_processes, accelerator.is_main_process
        if world > 1 and params.batch_size < 2 * world:
            raise JobInputError(f"param batch_size must be at least {2 * world} with {world} training "
                                f"processes (two images per process), got {params.batch_size}")
        with _init_lock:  # the global RNG is shared with other threads: seed and draw at once
            torch.manual_seed(params.seed)
            model = build_model(spec)
        if initial_weights is not None:
            load_initial_weights(model, initial_weights, spec)
        if world > 1 and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        optimizer = make_optimizer(model, params)
        # A last batch of one image is dropped: BatchNorm cannot train on a single value.
        steps_per_epoch = n_train // params.batch_size + (1 if n_train % params.batch_size >= 2 * world else 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps_per_epoch * params.epochs))
        with _accelerate_lock:
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

        on_device = device.type != "cpu" and train_images.nbytes <= ON_DEVICE_MAX_BYTES
        if on_device:
            train_images, train_labels = train_images.to(device), train_labels.to(device)
        dataset = TensorDataset(train_images, train_labels)
        sampler = ShuffledBatches(n_train, params.batch_size, torch.Generator().manual_seed(params.seed))
        if world > 1:
            sampler = RankShard(sampler, world, accelerator.process_index)
        # batch_size=None: the sampler already yields whole batches, fetched in one indexing.
        loader = DataLoader(dataset, sampler=sampler, batch_size=None,
                            pin_memory=device.type == "cuda" and not on_device)
        aug_generator = torch.Generator().manual_seed((params.seed + 1) % 2**64)
        use_augment = params.augment and min(train_images.shape[2:]) >= AUGMENT_MIN_SIDE
        channels = train_images.shape[1]
        std_t = torch.tensor(std, dtype=torch.float32)
        scale = (1.0 / (255.0 * std_t)).view(1, channels, 1, 1).to(device)
        shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, channels, 1, 1).to(device)

        history: list[dict] = []
        stopped = None
        samples_seen = 0
        train_seconds = 0.0
        global_step = 0
        started = time.monotonic()
        stop_at = started + time_budget if time_budget is not None else math.inf
        model.train()
        for epoch in range(1, params.epochs + 1):
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            for step, (xb, yb) in enumerate(loader):
                check_cancelled()
                if world > 1:  # every process stops at the same step, or the others would wait forever
                    time_up, bad = _agree(time.monotonic() >= stop_at, loss_sum, device)
                    if bad:
                        _nan(params, epoch)
                    if time_up:
                        stopped = "time_limit"
                        break
                elif time.monotonic() >= stop_at:
                    stopped = "time_limit"
                    break
                if yb.shape[0] < 2:
                    continue
                if transcript is not None and global_step % transcript.every == 0:
                    transcript.checkpoint(global_step, accelerator.unwrap_model(model), optimizer, scheduler,
                                          aug_generator)
                xb = xb.to(device, non_blocking=True).float().mul_(scale).add_(shift)
                yb = yb.to(device, non_blocking=True)
                if use_augment:
                    xb = augment(xb, aug_generator)
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb)
                # The model's zero_grad, not the wrapped optimizer's: the same parameters, but
                # Accelerate's wrapper inspects the optimizer's signature on every call.
                model.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                global_step += 1
                loss_sum += loss.detach() * yb.shape[0]
                correct += (logits.detach().argmax(1) == yb).sum()
                seen += yb.shape[0]
                if world == 1 and step % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
                    _nan(params, epoch)
            if world > 1:  # the epoch's figures over all processes
                totals = torch.stack([loss_sum, correct.to(torch.float64),
                                      torch.tensor(float(seen), dtype=torch.float64, device=device)])
                torch.distributed.all_reduce(totals)
                loss_sum, correct, seen = totals[0], int(totals[1].item()), int(totals[2].item())
            if seen and not torch.isfinite(loss_sum):
                _nan(params, epoch)
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            samples_seen += seen
            if seen == 0:  # stopped before this epoch's first step: nothing new to report
                break
            record = {"epoch": epoch, "train_loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen,
                      "val_loss": None, "val_accuracy": None, "seconds": round(epoch_seconds, 3),
                      "complete": stopped is None}
            steps_done = epoch * steps_per_epoch
            if world == 1 and steps_done < BN_SETTLE_STEPS:
                recalibrate_batchnorm(model, train_images, scale, shift, device, params.batch_size)
            if val_images is not None and val_images.shape[0] and main:
                # Several processes: the main one alone, on the bare module (no DDP collectives).
                record["val_loss"], record["val_accuracy"] = evaluate(
                    accelerator.unwrap_model(model) if world > 1 else model, val_images, val_labels,
                    scale, shift, device)
            history.append(record)
            if main:
                on_epoch(record, params.epochs)
            if stopped:
                break
        unwrapped = accelerator.unwrap_model(model)
        if transcript is not None:
            transcript.checkpoint(global_step, unwrapped, optimizer, scheduler, aug_generator,
                                  final=True, stopped=stopped)
        state = {k: v.detach().to("cpu").contiguous() for k, v in unwrapped.state_dict().items()}
        for key, value in state.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                _nan(params, len(history))
        precision = accelerator.mixed_precision if accelerator.device.type == device.type else "no"
    return TrainOutcome(state_dict=state, history=history, stopped=stopped, train_seconds=train_seconds,
                        samples_seen=samples_seen, device=str(device), mixed_precision=precision,
                        threads=torch.get_num_threads())


def _agree(time_up: bool, loss_sum: torch.Tensor, device: torch.device) -> tuple[bool, bool]:
    """All processes' verdict (the max over them): the time limit reached, a non-finite loss."""
    flags = torch.stack([torch.tensor(float(time_up), device=device),
                         (~torch.isfinite(loss_sum)).to(torch.float32)])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    time_up_any, bad_any = flags.tolist()
    return bool(time_up_any), bool(bad_any)


def _nan(params: TrainParams, epoch: int):
    raise JobInputError(f"the loss became NaN in epoch {epoch}: try a lower learning rate "
                        f"(param learning_rate is {params.learning_rate:g})")


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×H×W×C numpy images and labels → uint8 N×C×H×W and int64 tensors (contiguous)."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # torch wants writable memory
        images = images.copy()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
