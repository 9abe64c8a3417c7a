"""The training loop: a causal language model, LoRA or full, through Accelerate.

The same function runs in the worker's process (one device: the CPU or one GPU) and in each
process of an ``accelerate launch`` (several GPUs; see `launch.py`). It loads the model, checks
it against the tokenizer and the requested LoRA targets, evaluates before, trains, evaluates
after and writes the weights: everything a job needs that touches the model.

- Loss: token-level cross-entropy summed over the labelled tokens of all micro-batches of an
  optimizer step and divided by their count, so long and short examples weigh per token, the
  same with or without packing or gradient accumulation.
- Each epoch is planned beforehand (`data.epoch_batches`, seeded: example indices only) and
  its batches built one at a time as the loop reaches them, their examples read from the
  tokenized examples' file (`data.Examples`), so host memory does not grow with the dataset;
  between steps only ``check_cancelled()`` and a clock read. The loss curve has a point every
  step on short jobs (about `CURVE_POINTS` in all), but those losses stay on the device and
  are read back together (one GPU sync) every `READ_BACK_STEPS` steps, for the
  curve, the NaN check and the progress report: never a sync per step.
- Mixed precision: bf16 on GPUs that support it, fp16 on others, none on a CPU. For LoRA the
  frozen base is loaded in bf16 where training runs in bf16 (`base_dtype`): half the memory and
  no cast of every weight on every forward; the adapters stay in fp32 (PEFT upcasts them), so
  the optimizer's updates are as precise as before. Full fine-tuning keeps fp32 master weights.
  fp16 GPUs and CPUs keep an fp32 base (fp16 weights of a bf16-trained model may overflow; bf16
  matmuls on most CPUs are slower than fp32).
- Reproducibility: weights and LoRA initialisation from ``torch.manual_seed(seed)`` under a
  lock, each step's dropout from ``torch.manual_seed(step_seed(seed, step))`` (derived, so a
  replay that starts at any step draws what training drew), batches from
  ``random.Random(seed)``. Same seed, data and thread count → the same weights. With a
  training transcript (`transcript.Recorder`) deterministic algorithms are on and a checkpoint
  is written every k steps; `transcript.replay` re-executes a segment with the functions here
  (`prepare_model`, `plan`, `epoch_groups`, `make_optimizer`, `optimizer_step`).
"""

from __future__ import annotations

import functools
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from dvm_core import JobError, JobInputError
from dvm_core.devices import choose_device, precision_for

from . import data as datamod
from . import model as modelmod
from .params import FinetuneParams

EVAL_BATCH = 8
EVAL_TRAIN_MAX_EXAMPLES = 256     # the training loss before/after is measured on this many
CURVE_POINTS = 200                # about this many points on the loss curve
READ_BACK_STEPS = 10              # the losses are read back (a GPU sync) once per this many steps,
READ_BACK_SECONDS = 5.0           # or this often if steps are slow (progress on a CPU)

_init_lock = threading.Lock()
_cpu_step_lock = threading.Lock()   # see `optimizer_step`


@dataclass
class TrainSpec:
    """Everything the loop needs besides the data; JSON-able, for the child processes."""

    model_folder: str
    model_type: str
    base_model_name: str          # written into adapter_config.json
    params: dict
    output_dir: str
    time_budget: float | None = None
    trust_remote_code: bool = False
    device: str | None = None


@dataclass
class Outcome:
    """What training produced (JSON-able): losses, speed, the files written."""

    history: list[dict]
    before: dict
    after: dict
    tokens_seen: int
    loss_tokens_seen: int
    steps: int
    planned_steps: int
    epochs_completed: float
    train_seconds: float
    stopped: str | None
    device: str
    mixed_precision: str
    processes: int
    threads: int
    trainable_parameters: int
    total_parameters: int
    target_modules: list[str] | None
    files: list[str]
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0


class OutOfMemory(JobError):
    """The job ran out of memory on its device."""


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def oom_message(params: FinetuneParams) -> str:
    hints = ["a smaller batch_size (with more gradient_accumulation_steps)", "a shorter max_seq_length"]
    if not params.gradient_checkpointing:
        hints.append("gradient_checkpointing=yes")
    if params.method == "full":
        hints.append("method=lora")
    return "the job ran out of memory on this provider's device: try " + ", ".join(hints)


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cache_accelerate_lomo_check() -> None:
    """Accelerate's optimizer wrapper asks importlib whether `lomo` is installed on every step
    (~0.5 ms); the answer cannot change while the process runs."""
    import accelerate.optimizer as accelerated

    check = getattr(accelerated, "is_lomo_available", None)
    if check is not None and not hasattr(check, "cache_info"):
        accelerated.is_lomo_available = functools.cache(check)


def make_accelerator(device: torch.device | None, launched: bool):
    """In a launched process: the Accelerator `accelerate launch` configured. In the worker's
    process: one for `device`, our own placement (the worker may give this job ``cuda:1``)."""
    from accelerate import Accelerator

    _cache_accelerate_lomo_check()
    if launched:
        return Accelerator()
    try:
        return Accelerator(mixed_precision=precision_for(device), cpu=device.type == "cpu",
                           device_placement=False)
    except ValueError:
        # Accelerate keeps one state per process; another job set it up first with other
        # settings. Train with that state rather than fail.
        return Accelerator(device_placement=False)


def read_losses(values: list[torch.Tensor]) -> list[float]:
    """Device scalars as floats, in one transfer (one sync)."""
    return torch.stack(values).tolist()


def base_dtype(method: str, precision: str) -> torch.dtype:
    """The dtype the base model is loaded in: bf16 for LoRA under bf16 mixed precision (its
    weights never change, autocast computes in bf16 anyway), else fp32."""
    return torch.bfloat16 if method == "lora" and precision == "bf16" else torch.float32


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def token_loss_sum(model, batch: datamod.Batch, device, positions_isolate: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens of `batch` (float32).

    Rows of one example: no attention mask (right padding is never looked at by a causal
    model, and the attention kernel takes its causal fast path). Rows of several examples:
    their position ids, and, unless `positions_isolate` (the model keeps examples apart by
    their position ids itself, see `positions_isolate`), a block-diagonal causal mask built
    here on the device from `batch.document`, one batch at a time."""
    ids = batch.input_ids.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    extra = {}
    if batch.position_ids is not None:
        extra["position_ids"] = batch.position_ids.to(device, non_blocking=True)
        if not positions_isolate:
            document = batch.document.to(device, non_blocking=True)
            length = document.shape[1]
            causal = torch.ones((length, length), dtype=torch.bool, device=document.device).tril()
            # padding sees padding (one block): no row of the mask is empty
            extra["attention_mask"] = ((document[:, :, None] == document[:, None, :]) & causal)[:, None]
    logits = model(input_ids=ids, use_cache=False, **extra).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=datamod.IGNORE, reduction="sum")


@torch.no_grad()
def positions_isolate(model, device) -> bool:
    """Whether `model`, given position ids that restart at 0 and no attention mask, keeps the
    examples packed in a row apart by itself: transformers (5.x) derives a block-diagonal
    causal mask from such position ids in ``create_causal_mask`` (SDPA, eager) or runs
    flash-attention's variable-length kernel, on the device and without a mask from us. Models
    that do not (older or custom modelling code) get the mask `token_loss_sum` builds. Checked
    on two short random sequences: the second one's logits packed after the first must be
    those it has alone, far closer than with the first in plain view."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)      # not the global RNG: dropout draws stay as they were
    a = torch.randint(0, vocab, (1, 7), generator=generator)
    b = torch.randint(0, vocab, (1, 5), generator=generator)
    row = torch.cat([a, b], dim=1).to(device)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=b.to(device), use_cache=False).logits[0].float()
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, 7:].float()
        seen = model(input_ids=row, use_cache=False).logits[0, 7:].float()
    except Exception:  # noqa: BLE001 - a model that refuses position ids: build the mask
        return False
    finally:
        model.train(was_training)
    off, leak = float((packed - alone).abs().max()), float((seen - alone).abs().max())
    return off < 0.25 * leak if leak > 0 else off == 0


@torch.no_grad()
def evaluate(model, batches: list[datamod.Batch], device, check_cancelled=lambda: None) -> float | None:
    """Mean per-token loss of `model` over `batches`, or None without batches."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for batch in batches:
        check_cancelled()
        total += token_loss_sum(model, batch, device)
        count += batch.loss_tokens
    model.train(was_training)
    return float(total) / max(1, count)


def _losses(model, train_eval, eval_batches, device, check_cancelled) -> dict:
    train_loss = evaluate(model, train_eval, device, check_cancelled)
    eval_loss = evaluate(model, eval_batches, device, check_cancelled)
    out = {"train_loss": train_loss, "eval_loss": eval_loss}
    for key in ("train", "eval"):
        loss = out[f"{key}_loss"]
        out[f"{key}_perplexity"] = math.exp(min(loss, 700.0)) if loss is not None else None
    return out


def step_seed(seed: int, step: int) -> int:
    """The seed of the global RNG (dropout) for optimizer step `step` (0-based)."""
    return ((seed + 1) * 0x9E3779B97F4A7C15 + step) % 2**63


def prepare_model(spec: TrainSpec, params: FinetuneParams, tokenizer, precision: str, model=None):
    """The model as training starts: loaded after ``torch.manual_seed(seed)``, checked against
    the tokenizer, LoRA added (its initialisation drawn from that seed). (model, LoRA targets,
    the base's dtype)."""
    with _init_lock:  # the global RNG is shared with other jobs' threads
        torch.manual_seed(params.seed)
        if model is None:
            model = modelmod.load_model(Path(spec.model_folder), trust_remote_code=spec.trust_remote_code,
                                        dtype=base_dtype(params.method, precision))
        loaded_dtype = next(model.parameters()).dtype
        modelmod.check_tokenizer_fits(tokenizer, model)
        targets = None
        if params.method == "lora":
            targets = modelmod.lora_targets(model, spec.model_type, params.target_modules)
        if params.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if params.method == "lora":
            model = modelmod.add_lora(model, targets, params)
    model.config.use_cache = False
    return model, targets, loaded_dtype


@dataclass
class Plan:
    """How the steps are laid out: the first epoch's batches, drawn from ``random.Random(seed)``
    (`rng`, which draws the later epochs' in turn), and the figures derived from them."""

    rng: random.Random
    first_epoch: datamod.Batches
    per_rank: int
    steps_per_epoch: int
    planned: int
    warmup: int
    mean_step_tokens: float


def plan(train_examples, params: FinetuneParams, pad_id: int, world: int = 1) -> Plan:
    rng = random.Random(params.seed)
    first_epoch = datamod.epoch_batches(train_examples, batch_size=params.batch_size, packing=params.packing,
                                        length=params.max_seq_length, pad_id=pad_id, rng=rng)
    per_rank = max(1, len(first_epoch) // world)
    steps_per_epoch = max(1, math.ceil(per_rank / params.gradient_accumulation_steps))
    planned = steps_per_epoch * params.epochs
    if params.max_steps is not None:
        planned = min(planned, params.max_steps)
    warmup = math.ceil(params.warmup_ratio * planned)
    mean_step_tokens = max(1.0, first_epoch.loss_tokens() / world / steps_per_epoch)
    return Plan(rng, first_epoch, per_rank, steps_per_epoch, planned, warmup, mean_step_tokens)


def epoch_groups(p: Plan, epoch: int, train_examples, params: FinetuneParams, pad_id: int, world: int = 1,
                 rank: int = 0):
    """Epoch `epoch`'s batches of this process (call for epochs 0, 1, … in turn: each draws from
    the plan's generator)."""
    batches = p.first_epoch if epoch == 0 else datamod.epoch_batches(
        train_examples, batch_size=params.batch_size, packing=params.packing, length=params.max_seq_length,
        pad_id=pad_id, rng=p.rng)
    if len(batches) < world:
        batches = batches * world
    return batches[rank::world][:p.per_rank]


def make_optimizer(trainable: list, params: FinetuneParams, p: Plan):
    decay = [t for t in trainable if t.ndim > 1]
    no_decay = [t for t in trainable if t.ndim <= 1]
    groups = [g for g in ({"params": decay, "weight_decay": params.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=params.learning_rate, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(params.lr_schedule, p.warmup, p.planned))
    return optimizer, scheduler


def optimizer_step(accelerator, model, group, device, isolate: bool, denominator: float, trainable: list,
                   params: FinetuneParams, optimizer, scheduler, step: int,
                   on_batch: Callable = lambda loss_sum, batch: None) -> None:
    """Optimizer step `step` (0-based) over the micro-batches of `group`.

    Its dropout draws come from a generator seeded for this step (`step_seed`): on a GPU the
    job's own device's generator; on the CPU the process-wide one, which every job of this
    process shares, so the CPU steps that draw run one at a time (`_cpu_step_lock`): two jobs
    at once would otherwise interleave their draws, and neither would replay bit for bit."""
    seed = step_seed(params.seed, step)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
        lock = _nullcontext()
    else:
        lock = _cpu_step_lock
    with lock:
        if device.type != "cuda":
            torch.default_generator.manual_seed(seed)
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            sync = accelerator.no_sync(model) if not last else _nullcontext()
            with sync, accelerator.autocast():
                loss_sum = token_loss_sum(model, batch, device, isolate)
                accelerator.backward(loss_sum / denominator)
            on_batch(loss_sum, batch)
    if params.max_grad_norm > 0:
        accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
    optimizer.step()
    scheduler.step()
    model.zero_grad(set_to_none=True)


def train(spec: TrainSpec, train_examples, eval_examples, tokenizer, *, transcript=None, **kwargs) -> Outcome:
    """`_train`; with `transcript` (a `transcript.Recorder`, one process only), under
    deterministic algorithms and with its checkpoints."""
    if transcript is None:
        return _train(spec, train_examples, eval_examples, tokenizer, **kwargs)
    from dvm_core.devices import deterministic_algorithms

    try:
        with deterministic_algorithms():
            return _train(spec, train_examples, eval_examples, tokenizer, transcript=transcript, **kwargs)
    except BaseException as exc:     # cancelled, NaN, out of memory: no final checkpoint
        transcript.abandon(exc)
        raise


def _train(spec: TrainSpec, train_examples: list[datamod.Example], eval_examples: list[datamod.Example],
           tokenizer, *, check_cancelled: Callable[[], None] = lambda: None,
           report: Callable[[float, str, dict], None] = lambda fraction, message, fields: None,
           launched: bool = False, model=None, transcript=None) -> Outcome:
    """Fine-tune the model in `spec.model_folder` and write the result into `spec.output_dir`.

    :param report: called every few steps with the fraction done (0-1), a message and fields
        (loss, tokens/s, step) — from the main process only.
    :param launched: running under ``accelerate launch`` (one of several processes).
    :param model: an already loaded base model (tests); else loaded from the folder.
    :raises JobInputError: the model does not fit the tokenizer or the LoRA targets, the loss
        became NaN. Out-of-memory errors propagate (the caller frees memory and reports).
    """
    params = FinetuneParams.from_dict(spec.params)
    device = None if launched else choose_device(spec.device)
    accelerator = make_accelerator(device, launched)
    if launched:
        device = accelerator.device
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    say = report if main else (lambda fraction, message, fields: None)
    precision = accelerator.mixed_precision if accelerator.device.type == device.type else "no"

    model, targets, loaded_dtype = prepare_model(spec, params, tokenizer, precision, model)
    model.to(device)
    with accelerator.autocast():   # on the bare model, before DDP wraps it
        isolate = positions_isolate(model, device)
    total_params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    pad_id = tokenizer.pad_token_id
    train_examples, eval_examples = datamod.Examples.of(train_examples), datamod.Examples.of(eval_examples)
    layout = plan(train_examples, params, pad_id, world)
    per_rank, planned, mean_step_tokens = layout.per_rank, layout.planned, layout.mean_step_tokens
    if transcript is not None:
        transcript.start(layout)   # refuses a checkpoint_every that would write too many
    optimizer, scheduler = make_optimizer(trainable, params, layout)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    train_eval = datamod.eval_batches(train_examples[:EVAL_TRAIN_MAX_EXAMPLES], batch_size=EVAL_BATCH, pad_id=pad_id)
    eval_set = datamod.eval_batches(eval_examples, batch_size=EVAL_BATCH, pad_id=pad_id)
    say(0.0, "evaluating the base model", {})
    with accelerator.autocast():
        before = _losses(model, train_eval, eval_set, device, check_cancelled)

    history: list[dict] = []
    log_every = max(1, min(10, planned // CURVE_POINTS or 1))
    step = 0
    tokens_seen = 0
    loss_tokens_seen = 0
    stopped = None
    train_seconds = 0.0
    start = time.monotonic()
    stop_at = start + spec.time_budget if spec.time_budget else math.inf
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_tokens = 0
    window_real = 0
    window_start = time.perf_counter()
    pending: list[tuple[int, torch.Tensor, int, float, int]] = []   # curve points not read back yet
    last_read = (0, time.monotonic())

    def read_back() -> None:
        """The pending curve points' losses, in one transfer: history, NaN check, progress."""
        nonlocal window_real, window_start, last_read
        if not pending:
            return
        sums = read_losses([p[1] for p in pending])
        for (at, _, count, lr, seen), total in zip(pending, sums):
            loss = total / max(1, count)
            if not math.isfinite(loss):
                raise JobInputError(f"the loss became NaN at step {at}: try a lower learning rate "
                                    f"(param learning_rate is {params.learning_rate:g})")
            history.append({"step": at, "loss": round(loss, 6), "lr": lr, "tokens": seen})
        now = time.perf_counter()
        rate = window_real * world / max(1e-9, now - window_start)
        at = pending[-1][0]
        say(at / planned, f"step {at}/{planned} loss {loss:.4f} {rate:,.0f} tokens/s",
            {"step": at, "loss": loss, "tokens_per_s": rate})
        pending.clear()
        window_real = 0
        window_start = now
        last_read = (at, time.monotonic())
    def on_batch(loss_sum, batch) -> None:
        nonlocal window_loss, window_tokens, window_real, tokens_seen, loss_tokens_seen
        window_loss += loss_sum.detach()   # on the device: no sync
        window_tokens += batch.loss_tokens
        window_real += batch.tokens
        tokens_seen += batch.tokens
        loss_tokens_seen += batch.loss_tokens

    batches_done = 0
    model.train()
    epoch = 0
    while epoch < params.epochs and step < planned and stopped is None:
        mine = epoch_groups(layout, epoch, train_examples, params, pad_id, world, rank)
        epoch_start = time.perf_counter()
        for first in range(0, len(mine), params.gradient_accumulation_steps):
            check_cancelled()
            if time.monotonic() >= stop_at:
                stopped = "time_limit"
                break
            if transcript is not None and step % transcript.every == 0:
                transcript.checkpoint(step, accelerator.unwrap_model(model), optimizer, scheduler)
            group = mine[first:first + params.gradient_accumulation_steps]
            # Divided by the epoch's mean, not this step's count: batches of long examples then
            # weigh more than batches of short ones, as in random batches, and every token of
            # the epoch weighs the same whatever batch length grouping put it in.
            optimizer_step(accelerator, model, group, device, isolate, mean_step_tokens, trainable, params,
                           optimizer, scheduler, step, on_batch)
            step += 1
            batches_done += len(group)
            if step % log_every == 0 or step == planned:
                pending.append((step, window_loss, window_tokens, scheduler.get_last_lr()[0], tokens_seen * world))
                window_loss = torch.zeros((), dtype=torch.float64, device=device)
                window_tokens = 0
                if step == planned or step - last_read[0] >= READ_BACK_STEPS \
                        or time.monotonic() - last_read[1] >= READ_BACK_SECONDS:
                    read_back()
            if step >= planned:
                break
        read_back()
        if device.type == "cuda":
            torch.cuda.synchronize(device)   # the epoch's time includes the device's queued work
        train_seconds += time.perf_counter() - epoch_start
        epoch += 1
    epochs_completed = batches_done / max(1, per_rank)

    if transcript is not None:
        transcript.checkpoint(step, accelerator.unwrap_model(model), optimizer, scheduler, final=True,
                              stopped=stopped)
    say(1.0, "evaluating the fine-tuned model", {})
    with accelerator.autocast():
        after = _losses(model, train_eval, eval_set, device, check_cancelled)
    for value in (after["train_loss"], after["eval_loss"]):
        if value is not None and not math.isfinite(value):
            raise JobInputError("the fine-tuned model's loss is NaN: try a lower learning rate "
                                f"(param learning_rate is {params.learning_rate:g})")

    accelerator.wait_for_everyone()
    files: list[str] = []
    if main:
        files = save(accelerator.unwrap_model(model), tokenizer, spec, params)
    accelerator.wait_for_everyone()
    return Outcome(history=history, before=before, after=after, tokens_seen=tokens_seen * world,
                   loss_tokens_seen=loss_tokens_seen * world, steps=step, planned_steps=planned,
                   epochs_completed=round(epochs_completed, 4), train_seconds=train_seconds, stopped=stopped,
                   device=str(device), mixed_precision=precision, processes=world,
                   threads=torch.get_num_threads(), trainable_parameters=n_trainable,
                   total_parameters=total_params, target_modules=targets, files=files,
                   extra={"base_dtype": str(loaded_dtype).removeprefix("torch."),
                          "packed_by_position_ids": isolate})


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def save(model, tokenizer, spec: TrainSpec, params: FinetuneParams) -> list[str]:
    """Write the adapter (LoRA) or the whole model and tokenizer (full) as safetensors; the
    names of the files written."""
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if params.method == "lora":
        for config in model.peft_config.values():
            config.base_model_name_or_path = spec.base_model_name
        # save_embedding_layers=False: LoRA targets only linear layers here, and "auto" would
        # look the base model's config up on the hub (a network call) to decide.
        model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
        names = ["adapter_model.safetensors", "adapter_config.json"]
    else:
        model.config.use_cache = True
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        names = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "README.md")
    for name in names:
        if not (out / name).is_file():
            raise RuntimeError(f"saving the model did not write {name}")
    return names


def outcome_to_dict(outcome: Outcome) -> dict:
    return asdict(outcome)


def outcome_from_dict(data: dict) -> Outcome:
    return Outcome(**data)
