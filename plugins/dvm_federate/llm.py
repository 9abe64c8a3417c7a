"""Federated LLM fine-tuning, LoRA mode, "a fresh adapter each round": ``dvm federate --task llm``.

The customer holds the base model (a folder: config.json, safetensors weights, tokenizer files)
and a JSONL training set. Once, the set is split into one shard per provider (a seeded shuffle
cut in equal parts), each shard uploaded encrypted. Each round:

1. the current global model folder is zipped and uploaded, encrypted;
2. each provider gets a private llm-finetune job (kind 5751) on its shard, the model as the
   input marked ``model``, and trains a fresh LoRA adapter; paid as image rounds are
   (`Federation._job`: a nutzap up to ``max_price``, or pay on delivery);
3. the adapters are merged into the weights exactly (`merge_adapters`):
   W' = W + Σᵢ pᵢ·(Bᵢ·Aᵢ)·(αᵢ/rᵢ), pᵢ the shard sizes' shares, the weighted average of the
   updates the adapters stand for (averaging the A and B factors separately would not be); or,
   with ``merge_provider``, stacked by a merge DVM (kind 5752, FLoRA) into one adapter that is
   merged with weight 1, the same sum;
4. the new global model is evaluated on the customer's held-out JSONL (mean per-token loss and
   perplexity, transformers on the CPU), and written as the next round's model folder.

Before the merge each adapter is scored as image updates are (`scoring.score_updates`, on by
default): its update applied alone to the global weights is a model like any other, so a lazy
adapter (B·A = 0), a copy, one that does not lower the loss on its own shard, and one that raises
the held-out loss of the merge (leave one out) are left out; the gains share ``--bonus``.
`simulate_adapter_attack` rewrites an adapter as a cheating provider would (``--local --attack``).

A provider that fails, refuses, asks too much or times out is left out of that round, as with
images. A robust ``method`` (median, trimmed mean, Krum) or ``clip_norm`` merges the updates
W + Δᵢ with `dvm_fedavg.merge.merge_files` instead of the exact sum.

Full-model DiLoCo rounds (``mode="diloco"``) are `diloco.DilocoFederation`, a subclass. Both
modes keep ``state.json`` in the work folder after each round and resume from it (`LlmFederation.run`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dvm_core.customer import upload_dataset
from dvm_core.datarefs import sha256_file
from dvm_core.protocol.nip90 import JobInput

from .rounds import Federation, FederationSettings, ProviderFailed

LLM_FINETUNE_KIND = 5751
ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
MAX_HELDOUT_BYTES = 256 << 20
SHARD_SCORE_EXAMPLES = 256   # an update's loss on its own shard is measured on this many of its examples
STATE = "state.json"   # in the work folder: the last finished round (see `LlmFederation.run`)
STATE_FORMAT = "dvm-federate-llm-state/1"
MODES = ("lora", "diloco")


@dataclass
class LlmSettings(FederationSettings):
    """`FederationSettings` for LLM rounds: each provider's job params (``epochs``,
    ``batch_size``, ``learning_rate``, ``seed`` from the base class; the LoRA ones here)."""

    kind: int = LLM_FINETUNE_KIND
    epochs: int = 1
    batch_size: int = 8
    max_seq_length: int = 64
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ()   # empty: the plugin's default for the architecture
    max_steps: int | None = None
    mode: str = "lora"   # lora: fresh adapters merged exactly; diloco: full model, outer Nesterov step (diloco.py)
    inner_steps: int = 20   # diloco: H, each provider's AdamW steps per round
    outer_lr: float = 0.7   # diloco: the outer learning rate (1 with momentum 0: plain averaging)
    outer_momentum: float = 0.9   # diloco: the outer Nesterov momentum
    compression: str = "none"   # diloco: how the pseudo-gradients travel: none, bf16 or int8
    resume: bool = True   # go on from the last finished round kept in the work folder


@dataclass
class LlmRoundReport:
    round: int
    eval_loss: float
    perplexity: float
    providers: list[str]  # whose adapters went into the merge
    dropped: dict[str, str]  # provider → why
    paid: dict[str, int]  # provider → sats
    seconds: float
    merge: dict = field(default_factory=dict)
    payments: dict[str, str] = field(default_factory=dict)
    scores: dict[str, dict] = field(default_factory=dict)
    bonus: dict[str, int] = field(default_factory=dict)
    provider_losses: dict[str, dict] = field(default_factory=dict)  # provider → its job's own losses
    bytes_down: int = 0   # the global model sent, once per provider (each downloads the archive)
    bytes_up: int = 0   # the updates received (adapters, weights or pseudo-gradients)
    train_seconds: dict[str, float] = field(default_factory=dict)  # provider → its training loop's time
    outer: dict = field(default_factory=dict)   # diloco: the outer step (lr, momentum, norms)


# --- the exact merge ----------------------------------------------------------------------------

def lora_scaling(config: dict, rank: int) -> float:
    """The factor peft multiplies B·A by: α/r, or α/√r with rsLoRA."""
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("adapters with a rank_pattern or alpha_pattern are not supported")
    alpha = float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_deltas(tensors: dict, config: dict) -> dict:
    """Base weight name → the update the adapter stands for, (B·A)·scaling in float64, in the
    base weight's layout (transposed for GPT-2's Conv1D, ``fan_in_fan_out``)."""
    import torch

    if config.get("use_dora"):
        raise ValueError("DoRA adapters cannot be merged as B·A products")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise ValueError(f"the adapter holds {key!r}, not a LoRA factor (modules_to_save, "
                                 "embeddings and biases are not supported)")
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise ValueError(f"LoRA tensor {key!r} has no matching {b_key!r}")
        b = tensors[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA pair {key!r} {list(a.shape)} / {list(b.shape)} do not share a rank")
        module = key.split(".lora_A.")[0]
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX):]
        delta = (b.to(torch.float64) @ a.to(torch.float64)) * lora_scaling(config, a.shape[0])
        deltas[module + ".weight"] = delta.T if config.get("fan_in_fan_out") else delta
    return deltas


def merge_into(state: dict, adapters: Sequence[tuple[dict, dict]], weights: Sequence[float]) -> dict:
    """W' = W + Σᵢ pᵢ·Δᵢ for every weight an adapter touches, pᵢ = wᵢ/Σw, Δᵢ = (Bᵢ·Aᵢ)·scalingᵢ
    (`adapter_deltas`); summed in float64, stored in W's dtype. `adapters`: (tensors, config)
    pairs. Returns the new state (the untouched tensors shared with `state`)."""
    import torch

    if not adapters or len(adapters) != len(weights):
        raise ValueError("give one weight per adapter, at least one adapter")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError("the weights must be non-negative and not all zero")
    sums: dict = {}
    for (tensors, config), w in zip(adapters, weights):
        for name, delta in adapter_deltas(tensors, config).items():
            if name not in state:
                raise ValueError(f"the adapter changes {name!r}, which the base model does not have")
            if tuple(delta.shape) != tuple(state[name].shape):
                raise ValueError(f"the adapter's update of {name!r} is {list(delta.shape)}, the weight "
                                 f"{list(state[name].shape)}")
            scaled = delta * (w / total)
            sums[name] = scaled if name not in sums else sums[name] + scaled
    out = dict(state)
    for name, delta in sums.items():
        out[name] = (state[name].to(torch.float64) + delta).to(state[name].dtype)
    return out


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor of a model folder's safetensors files (headers only)."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_adapter(folder: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """ValueError unless `folder` holds a LoRA adapter whose every update fits a weight of the
    model (`shapes`, from `weight_shapes`) and is finite: a provider's result is checked before
    it is scored or merged, so a bad one drops that provider, not the round."""
    import torch
    from safetensors.torch import load_file

    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(Path(folder) / ADAPTER))
    except Exception as exc:   # noqa: BLE001 - any unreadable file: the provider's fault
        raise ValueError(f"its adapter cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"its {ADAPTER_CONFIG} is not a JSON object")
    deltas = adapter_deltas(tensors, config)
    if not deltas:
        raise ValueError("its adapter holds no LoRA factors")
    for name, delta in deltas.items():
        if name not in shapes or tuple(delta.shape) != shapes[name]:
            raise ValueError(f"its update of {name!r} {list(delta.shape)} fits no weight of the model")
        if not torch.isfinite(delta).all():
            raise ValueError(f"its update of {name!r} holds NaN or infinite values")


def merge_adapters(base: Path, adapter_dirs: Sequence[Path], weights: Sequence[float], out: Path) -> dict:
    """Write into folder `out` the model folder `base` with the adapters merged (`merge_into`):
    its other files copied, each safetensors file rewritten with the merged tensors. Returns a
    short report (modules changed, the norm of the merged update)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapters = [(load_file(str(Path(d) / ADAPTER)), json.loads((Path(d) / ADAPTER_CONFIG).read_text()))
                for d in adapter_dirs]
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{base} holds no safetensors weights")
    states = {f: load_file(str(f)) for f in files}
    whole = {k: v for state in states.values() for k, v in state.items()}
    merged = merge_into(whole, adapters, weights)
    changed = [k for k in whole if merged[k] is not whole[k]]
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    for f, state in states.items():
        with safe_open(str(f), "pt") as handle:
            metadata = handle.metadata()
        save_file({k: merged[k].contiguous() for k in state}, str(out / f.name), metadata=metadata)
    norm = math.sqrt(sum(float((merged[k].double() - whole[k].double()).pow(2).sum()) for k in changed))
    total = float(sum(weights))
    return {"method": "lora-exact", "modules": len(changed), "update_norm": norm,
            "weights": [w / total for w in weights], "inputs": len(adapters)}


# --- held-out loss ------------------------------------------------------------------------------

class HeldOut:
    """The customer's held-out JSONL, tokenized once with the model's tokenizer; `loss` is the
    mean per-token loss of a model folder on it, as the llm-finetune plugin computes its eval loss."""

    def __init__(self, path: Path, tokenizer_folder: Path, max_seq_length: int, batch_size: int = 16):
        from dvm_llm_finetune import data as datamod
        from dvm_llm_finetune import model as modelmod

        tokenizer = modelmod.load_tokenizer(tokenizer_folder)
        dataset = datamod.read_jsonl(path, what="held-out set", max_bytes=MAX_HELDOUT_BYTES, max_examples=10**6)
        tokenized = datamod.tokenize(dataset, tokenizer, max_seq_length, what="held-out set")
        if not tokenized.examples:
            raise ValueError(f"the held-out set {path} has no example within {max_seq_length} tokens")
        self.examples = len(tokenized.examples)
        self.tokens = tokenized.tokens
        self.batches = datamod.eval_batches(tokenized.examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id)

    def loss(self, folder: Path) -> float:
        import torch

        from dvm_llm_finetune import model as modelmod
        from dvm_llm_finetune.train import evaluate

        model = modelmod.load_model(folder, trust_remote_code=False)
        return evaluate(model, self.batches, torch.device("cpu"))


class LossOnModel:
    """`scoring.LossOn` for a causal LM: the mean per-token loss of a state dict on token batches,
    one model loaded once. Tied weights (GPT-2's lm_head) are absent from safetensors files and
    follow the embedding they are tied to."""

    def __init__(self, model, batches: list):
        self.model = model.eval()
        self.batches = batches

    def __call__(self, state: dict) -> float:
        import torch

        from dvm_llm_finetune.train import evaluate

        _missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"the state holds tensors the model does not have: {unexpected[:3]}")
        loss = evaluate(self.model, self.batches, torch.device("cpu"))
        return loss if math.isfinite(loss) else math.inf


def simulate_adapter_attack(adapter_dir: Path, mode: str, other: Path | None = None) -> None:
    """Rewrite a downloaded adapter as a cheating provider would have sent it (``--local
    --attack``): `lazy` B = 0 (no change), `sign-flip` B·(−4), `scaled` B·10, `noise` B random
    with 10× its spread, `copy` another provider's adapter (`other`, a folder)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / ADAPTER
    if mode == "copy":
        if other is None:
            raise ValueError("copy needs another provider's adapter")
        shutil.copy2(Path(other) / ADAPTER, path)
        shutil.copy2(Path(other) / ADAPTER_CONFIG, Path(adapter_dir) / ADAPTER_CONFIG)
        return
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(3)
    for key, b in tensors.items():
        if ".lora_B." not in key:
            continue
        if mode == "lazy":
            tensors[key] = torch.zeros_like(b)
        elif mode == "sign-flip":
            tensors[key] = -4 * b
        elif mode == "scaled":
            tensors[key] = 10 * b
        elif mode == "noise":
            tensors[key] = torch.randn(b.shape, generator=generator) * float(b.std()) * 10
        else:
            raise ValueError(f"unknown attack {mode!r}")
    save_file(tensors, str(path), metadata=metadata)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def read_records(path: Path) -> list[str]:
    """The non-empty lines of a JSONL file, each checked to be a JSON object (the provider checks
    the rest: one format per file, the fields)."""
    lines = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: each line must be a JSON object")
        lines.append(line)
    if not lines:
        raise ValueError(f"{path} holds no examples")
    return lines


def zip_model(folder: Path, path: Path) -> Path:
    """The model folder as the zip the llm-finetune plugin takes (an input marked ``model``)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                zf.write(f, "model/" + f.name)
    return path


# --- the rounds ---------------------------------------------------------------------------------

class LlmFederation(Federation):
    """`Federation` for LLM fine-tuning: JSONL shards, the global model as a folder, fresh LoRA
    adapters merged exactly each round, held-out loss and perplexity. The provider jobs, their
    payment and bonuses are `Federation`'s."""

    def __init__(self, customer, wallet, providers: Sequence[str], train: Path, test: Path, model: Path,
                 servers: Sequence[str], workdir: Path, settings: LlmSettings | None = None,
                 say: Callable[[str], None] = print):
        self.base_model = Path(model)
        if not self.base_model.is_dir() or not any(self.base_model.glob("*.safetensors")):
            raise ValueError(f"{model} is not a model folder with safetensors weights")
        settings = settings or LlmSettings()
        if settings.compare or (settings.merge_provider and settings.method != "fedavg"):
            raise ValueError("LLM rounds: --compare, and a robust method on a merge DVM, are not supported yet")
        super().__init__(customer, wallet, providers, train, test, servers, workdir, settings, say)
        self.global_model: Path | None = None
        self.initial_loss: float | None = None
        self._fingerprint: dict | None = None

    def _load_data(self, train: Path, test: Path) -> None:
        self.train_path = Path(train)
        self.records = read_records(train)
        self.test_path = Path(test)
        read_records(self.test_path)   # fail before any money is spent

    async def prepare(self, resumed: bool = False) -> None:
        """Copy the base model as round 0's global model (unless `resumed`: the global model is
        the last finished round's), split and upload the shards, and evaluate the base model
        on the held-out set."""
        s = self.settings
        if not resumed:
            self.global_model = self.workdir / "global-0"
            if self.global_model.exists():
                shutil.rmtree(self.global_model)
            shutil.copytree(self.base_model, self.global_model,
                            ignore=lambda d, names: [n for n in names if (Path(d) / n).is_dir()])
        order = list(range(len(self.records)))
        random.Random(s.seed).shuffle(order)
        n = len(self.providers)
        if len(order) < n:
            raise ValueError(f"{len(order)} training examples cannot be split among {n} providers")
        self.shards = [sorted(order[i::n]) for i in range(n)]
        self.shard_urls = []
        for i, idx in enumerate(self.shards):
            path = self.workdir / f"shard-{i}.jsonl"
            path.write_text("".join(self.records[j] + "\n" for j in idx))
            self.shard_urls.append(await upload_dataset(path, self.servers, self.customer.keys, encrypt=True))
            self.say(f"shard {i} → {self.providers[i][:12]}…: {len(idx)} examples")
        self.heldout = await asyncio.to_thread(HeldOut, self.test_path, self.global_model, s.max_seq_length)
        self.shard_sets = [self.workdir / f"shard-{i}.jsonl" for i in range(n)]
        if resumed:
            return
        self.initial_loss = await asyncio.to_thread(self.heldout.loss, self.global_model)
        self.say(f"held-out set: {self.heldout.examples} examples, {self.heldout.tokens} tokens; base model "
                 f"loss {self.initial_loss:.4f}, perplexity {perplexity(self.initial_loss):.2f}")

    def _params(self, provider_index: int, shard, round_: int) -> dict[str, str]:
        s = self.settings
        params = {"method": "lora", "epochs": str(s.epochs), "batch_size": str(s.batch_size),
                  "max_seq_length": str(s.max_seq_length), "lora_r": str(s.lora_r),
                  "lora_alpha": f"{s.lora_alpha:g}", "lora_dropout": f"{s.lora_dropout:g}",
                  "seed": str(s.seed * 1000 + round_ * 100 + provider_index),
                  "eval_fraction": "0"}   # the customer evaluates; every example trains
        if s.learning_rate is not None:
            params["learning_rate"] = f"{s.learning_rate:g}"
        if s.target_modules:
            params["target_modules"] = ",".join(s.target_modules)
        if s.max_steps is not None:
            params["max_steps"] = str(s.max_steps)
        return params

    async def run_round(self, round_: int) -> LlmRoundReport:
        s = self.settings
        started = time.monotonic()
        rdir = self.workdir / f"round-{round_}"
        rdir.mkdir(parents=True, exist_ok=True)
        model_url, bytes_down = await self._upload_global(rdir)
        outcomes, paid, payments = await self._train_all(round_, rdir, model_url)
        adapters, weights, names, dropped, losses, seconds = [], [], [], {}, {}, {}
        bytes_up = 0
        shapes = await asyncio.to_thread(weight_shapes, self.global_model)
        for i, (provider, outcome) in enumerate(zip(self.providers, outcomes)):
            if isinstance(outcome, BaseException):
                self._drop(round_, dropped, provider, _failure(outcome))
                continue
            files, _cost = outcome
            if ADAPTER not in files or ADAPTER_CONFIG not in files:
                self._drop(round_, dropped, provider, f"the result has no {ADAPTER} and {ADAPTER_CONFIG}")
                continue
            try:
                await asyncio.to_thread(check_adapter, files[ADAPTER].parent, shapes)
            except ValueError as exc:
                self._drop(round_, dropped, provider, str(exc))
                continue
            losses[provider] = _card_losses(files.get("model_card.json"))
            seconds[provider] = _card_seconds(files.get("model_card.json"))
            bytes_up += files[ADAPTER].stat().st_size + files[ADAPTER_CONFIG].stat().st_size
            if i in s.attacks:   # a simulation (--local --attack): this provider cheats
                await asyncio.to_thread(simulate_adapter_attack, files[ADAPTER].parent, s.attacks[i],
                                        adapters[0] if adapters else None)
                self.say(f"round {round_}: provider {provider[:12]}… plays {s.attacks[i]} (simulated)")
            adapters.append(files[ADAPTER].parent)
            weights.append(float(len(self.shards[i])))
            names.append(provider)
        scores: dict[str, dict] = {}
        if adapters and s.score:
            scored = await asyncio.to_thread(self.score, adapters, weights, names, rdir)
            scores, (adapters, weights, names) = self._keep_scored(round_, scored, "adapter", adapters, weights, names)
        report: dict = {}
        if adapters:
            merged = self.workdir / f"global-{round_}"
            if merged.exists():
                shutil.rmtree(merged)
            try:
                if s.method != "fedavg" or s.clip_norm is not None:
                    report = await asyncio.to_thread(self._merge_robust, adapters, weights, names, merged, rdir)
                elif s.merge_provider:   # FLoRA-stacked there: one adapter whose B·A is Σ pᵢ BᵢAᵢ
                    stacked, remote = await self._stack_remote(adapters, weights, rdir)
                    report = await asyncio.to_thread(merge_adapters, self.global_model, [stacked], [1.0], merged)
                    report.update(weights=[w / sum(weights) for w in weights], inputs=len(adapters),
                                  stacked_by=s.merge_provider[:12], remote=remote)
                else:
                    report = await asyncio.to_thread(merge_adapters, self.global_model, adapters, weights, merged)
                report["names"] = [n[:12] for n in names]
                self.global_model = merged
            except (ValueError, ProviderFailed) as exc:   # an adapter that does not fit, the merge DVM failed
                report, names = {"error": str(exc)}, []
                self.say(f"round {round_}: the merge failed ({exc}); the global model stays as it was")
        elif not scores:
            self.say(f"round {round_}: no adapter came back; the global model stays as it was")
        return await self._end_round(
            round_, started, lambda r: f"{len(r.providers)}/{len(self.providers)} adapters merged, held-out loss "
                                       f"{r.eval_loss:.4f} (perplexity {r.perplexity:.2f}), paid "
                                       f"{sum(r.paid.values())} sat, {r.seconds:.1f}s",
            providers=names, dropped=dropped, paid=paid, merge=report, payments=payments, scores=scores,
            provider_losses=losses, bytes_down=bytes_down, bytes_up=bytes_up, train_seconds=seconds)

    def _drop(self, round_: int, dropped: dict[str, str], provider: str, why: str) -> None:
        """Leave `provider` out of this round (`dropped`), and say why."""
        dropped[provider] = why
        self.say(f"round {round_}: provider {provider[:12]}… dropped: {why}")

    async def _end_round(self, round_: int, started: float, summary: Callable[[LlmRoundReport], str],
                         **fields) -> LlmRoundReport:
        """A round's end, in either mode, once the global model is written: bonuses and verdicts
        for the scored updates, the held-out loss, the report kept and `summary` of it said."""
        s = self.settings
        names, scores = fields["providers"], fields["scores"]
        bonus = await self._pay_bonus(round_, names, scores, fields["payments"]) if s.bonus and names else {}
        if s.publish_verdicts and scores:
            await self._publish_verdicts(round_, scores)
        loss = await asyncio.to_thread(self.heldout.loss, self.global_model)
        result = LlmRoundReport(round=round_, eval_loss=loss, perplexity=perplexity(loss), bonus=bonus,
                                seconds=round(time.monotonic() - started, 3), **fields)
        self.reports.append(result)
        self.say(f"round {round_}: {summary(result)}")
        return result

    async def _train_all(self, round_: int, rdir: Path, model_url: str) -> tuple[list, dict, dict]:
        """Every provider's job of this round, at once, each on its shard and the global model
        (`Federation._job`: paid, its result downloaded into rdir/provider-i): (the outcomes, an
        exception for each provider that failed; provider → sats paid; provider → why paid)."""
        s = self.settings

        async def train(i: int, provider: str):
            journal = rdir / f"provider-{i}.job.json"
            if self._paid_before(provider, journal):   # this round was cut short: paid already?
                return await self._recover_job(provider, journal, rdir / f"provider-{i}")
            inputs = [JobInput(self.shard_urls[i], "url"), JobInput(model_url, "url", "", "model")]
            return await self._job(provider, s.kind, inputs, self._params(i, self.shards[i], round_),
                                   rdir / f"provider-{i}", journal=journal)

        self._paid, self._payments = {}, {}
        outcomes = await asyncio.gather(*(train(i, p) for i, p in enumerate(self.providers)),
                                        return_exceptions=True)
        paid, payments = dict(self._paid), dict(self._payments)
        for provider, why in payments.items():
            self.say(f"round {round_}: provider {provider[:12]}… {why}")
        return outcomes, paid, payments

    async def _upload_global(self, rdir: Path) -> tuple[str, int]:
        """Zip and upload (encrypted) the global model for this round's jobs: (its URL, the bytes
        the providers download in all, the archive's size once per provider)."""
        archive = await asyncio.to_thread(zip_model, self.global_model, rdir / "model.zip")
        try:
            url = await upload_dataset(archive, self.servers, self.customer.keys, encrypt=True)
            return url, archive.stat().st_size * len(self.providers)
        finally:
            archive.unlink()   # the same files as the global model folder

    def _states_alone(self, adapters: list[Path], rdir: Path, prefix: str) -> tuple[Path, list[Path]]:
        """The global weights and each adapter's update applied alone to them, as whole-model
        safetensors files in `rdir` (the caller removes them): the form the scores and the robust
        methods take updates in."""
        from safetensors.torch import load_file, save_file

        base = {k: v for f in sorted(self.global_model.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        base_file = rdir / f"{prefix}-global.safetensors"
        save_file(base, str(base_file), metadata={"format": "pt"})
        paths = []
        for i, adapter in enumerate(adapters):
            config = json.loads((adapter / ADAPTER_CONFIG).read_text())
            path = rdir / f"{prefix}-{i}.safetensors"
            try:
                state = merge_into(base, [(load_file(str(adapter / ADAPTER)), config)], [1.0])
            except ValueError:   # it does not fit this model: no tensors (scored "do not fit")
                state = {}
            save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
            paths.append(path)
        return base_file, paths

    def _merge_robust(self, adapters: list[Path], weights: list[float], names: list[str], out: Path,
                      rdir: Path) -> dict:
        """A robust method (median, trimmed mean, Krum) or clipping on the adapters' updates
        W + Δᵢ, Δᵢ = (BᵢAᵢ)·(α/r), with `dvm_fedavg.merge.merge_files` against the global
        weights: the result is a full model, no longer W plus a low-rank sum. Single-file models."""
        from dvm_fedavg.merge import merge_files

        s = self.settings
        if len(list(self.global_model.glob("*.safetensors"))) != 1:
            raise ValueError(f"{s.method} needs a model in one safetensors file")
        base_file, paths = self._states_alone(adapters, rdir, "robust")
        try:
            out.mkdir(parents=True, exist_ok=True)
            for f in self.global_model.iterdir():
                if f.is_file() and f.suffix != ".safetensors":
                    shutil.copy2(f, out / f.name)
            name = next(self.global_model.glob("*.safetensors")).name
            return merge_files(paths, weights, out / name, method=s.method, base=base_file,
                               trim_ratio=s.trim_ratio, f=s.krum_f, clip_norm=s.clip_norm,
                               names=[n[:12] for n in names]).to_dict()
        finally:
            for path in [base_file, *paths]:
                path.unlink(missing_ok=True)

    async def _stack_remote(self, adapters: list[Path], weights: list[float], rdir: Path) -> tuple[Path, dict]:
        """Stack the adapters on a merge DVM (kind 5752, FLoRA: A' = [A₁; …], B' = [p₁B₁ | …],
        r and α multiplied by N): merged with weight 1, B'·A'·(α'/r') = Σ pᵢ·BᵢAᵢ·(α/r), the same
        as merging them here. That needs one r and α for all, as every job here asks."""
        s = self.settings
        configs = [json.loads((a / ADAPTER_CONFIG).read_text()) for a in adapters]
        shape = [(c.get("r"), c.get("lora_alpha"), c.get("use_rslora", False), c.get("fan_in_fan_out", False))
                 for c in configs]
        if len(set(shape)) != 1:
            raise ValueError(f"the adapters' r, lora_alpha, use_rslora or fan_in_fan_out differ ({shape}): "
                             "stacking them would not give their weighted sum")
        # Journaled like the providers' jobs: a run resumed after it was paid takes its result,
        # and pays again only for other adapters.
        journal = rdir / "merge.job.json"
        what = {"adapters": [sha256_file(a / ADAPTER) for a in adapters], "weights": list(weights)}
        if self._paid_before(s.merge_provider, journal, what):
            files, _ = await self._recover_job(s.merge_provider, journal, rdir / "merge")
            return self._stacked(files, rdir)
        inputs = []
        for adapter in adapters:
            url = await upload_dataset(adapter / ADAPTER, self.servers, self.customer.keys, encrypt=True)
            inputs.append(JobInput(url, "url", "", "update"))
        config_url = await upload_dataset(adapters[0] / ADAPTER_CONFIG, self.servers, self.customer.keys,
                                          encrypt=True)
        inputs.append(JobInput(config_url, "url", "", "adapter_config"))
        params = {"method": "fedavg", "weights": ",".join(f"{w:g}" for w in weights)}
        files, _ = await self._job(s.merge_provider, s.merge_kind, inputs, params, rdir / "merge",
                                   journal=journal, what=what)
        return self._stacked(files, rdir)

    @staticmethod
    def _stacked(files: dict[str, Path], rdir: Path) -> tuple[Path, dict]:
        if "model.safetensors" not in files or "adapter_config.json" not in files:
            raise ProviderFailed("the merge result has no model.safetensors and adapter_config.json")
        stacked = rdir / "stacked"
        stacked.mkdir(exist_ok=True)
        files["model.safetensors"].replace(stacked / ADAPTER)
        files["adapter_config.json"].replace(stacked / ADAPTER_CONFIG)
        report = files.get("merge_report.json")
        return stacked, (json.loads(report.read_text()) if report else {})

    def score(self, adapters: list[Path], weights: list[float], names: list[str], rdir: Path) -> list:
        """Score the round's adapters (`scoring.score_updates`): each one's update applied alone
        to the global weights is written as a whole state (``rdir/scored-i.safetensors``, removed
        afterwards); the FedAvg of those states is the exact merge, so leave-one-out scores the
        merge itself. It holds N + 1 copies of the model in memory: fine for small models."""
        base_file, updates = self._states_alone(adapters, rdir, "scored")
        try:
            return self.score_states(base_file, updates, weights, names)
        finally:   # whole-model copies, one per adapter: not kept
            for path in [base_file, *updates]:
                path.unlink(missing_ok=True)

    def score_states(self, base_file: Path, updates: list[Path], weights: list[float], names: list[str]) -> list:
        """`scoring.score_updates` on whole-model states (the global one and each update's):
        the held-out loss with and without each, and each one's loss on its provider's shard."""
        from dvm_llm_finetune import data as datamod
        from dvm_llm_finetune import model as modelmod

        from .scoring import score_updates

        model = modelmod.load_model(self.global_model, trust_remote_code=False)   # one, for every loss
        heldout = LossOnModel(model, self.heldout.batches)
        tokenizer = modelmod.load_tokenizer(self.global_model)
        index = {name: self.providers.index(name) for name in names}
        shard_sets: dict[int, LossOnModel] = {}

        def shard_loss(i: int, state: dict) -> float:
            if i not in shard_sets:
                shard = datamod.read_jsonl(self.shard_sets[index[names[i]]], what="shard", max_bytes=1 << 40,
                                           max_examples=10**9)
                examples = datamod.tokenize(shard, tokenizer, self.settings.max_seq_length, what="shard").examples
                # Its first SHARD_SCORE_EXAMPLES (in the training file's order): enough to tell whether
                # the update learnt its data, at a cost that does not grow with the shard.
                shard_sets[i] = LossOnModel(model, datamod.eval_batches(
                    examples[:SHARD_SCORE_EXAMPLES], batch_size=16, pad_id=tokenizer.pad_token_id))
            return shard_sets[i](state)

        return score_updates(base_file, updates, names, weights, heldout, shard_loss,
                             tolerance=self.settings.score_tolerance)

    # --- all rounds, resumable ------------------------------------------------------------------

    async def run(self) -> list[LlmRoundReport]:
        """The rounds not done yet: a work folder whose `STATE` file says rounds 1…k are done
        (and holds the same data) goes on from round k + 1 (``resume``, the default), with the
        global model, the outer optimizer's state and the reports of round k. An interrupted
        round runs again from its start, except that a job paid (by nutzap) before the stop is
        not asked or paid again: its result is taken from the relays (`Federation._recover_job`,
        from the journal ``round-k/provider-i.job.json``)."""
        s = self.settings
        if not s.resume:
            (self.workdir / STATE).unlink(missing_ok=True)
        resumed = self._resumed = (self.workdir / STATE).exists()
        done = self._resume() if resumed else 0
        if not resumed:   # journals of jobs of an earlier federation in this folder: not ours
            for journal in self.workdir.glob("round-*/*.job.json"):
                journal.unlink()
        if s.trusted:
            await self.skip_flagged()
        await self.prepare(resumed=resumed)
        if not resumed:
            self._save_state(0)   # from here a stop resumes, with the journals of round 1's jobs
        if done >= s.rounds:
            self.say(f"all {s.rounds} rounds were done already (see {self.workdir / STATE}); ask for more "
                     "with --rounds, or start over with --restart")
        for round_ in range(done + 1, s.rounds + 1):
            await self.run_round(round_)
            self._save_state(round_)
        if s.baseline:
            self.say("training the centralised baseline here: " + self.baseline_plan())
            self.baseline = await asyncio.to_thread(self.centralised_baseline)
            last = self.reports[-1].eval_loss if self.reports else self.initial_loss
            self.say(f"centralised baseline: held-out loss {self.baseline:.4f}; federated {last:.4f} "
                     f"(ratio {last / self.baseline:.4f})")
        self.write_reports()
        return self.reports

    def fingerprint(self) -> dict:
        """What a resumed run must share with the one it resumes: the task, the mode, the data
        and the base model (sha256 of each file), hashed once a run (the base model's weights
        can be gigabytes; `_save_state` writes it every round)."""
        if self._fingerprint is None:
            self._fingerprint = self._hash_inputs()
        return self._fingerprint

    def _hash_inputs(self) -> dict:
        return {"task": "llm", "mode": self.settings.mode, "train": sha256_file(self.train_path),
                "test": sha256_file(self.test_path),
                "base_model": {f.name: sha256_file(f) for f in sorted(self.base_model.glob("*.safetensors"))}}

    def _resume(self) -> int:
        """Load the state of the last finished round, if the work folder holds one: its number."""
        path = self.workdir / STATE
        if not path.exists():
            return 0
        try:
            state = json.loads(path.read_text())
            fingerprint, done, folder = state["fingerprint"], int(state["round"]), state["global_model"]
            if state.get("format") != STATE_FORMAT:
                raise ValueError(state.get("format"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}): start over with --restart") \
                from None
        ours = self.fingerprint()
        differs = [k for k in ours if fingerprint.get(k) != ours[k]]
        if differs:
            raise ValueError(f"{self.workdir} holds another federation (its {', '.join(differs)} differ, round "
                             f"{done} done): give another --out, or --restart to start over there")
        model = self.workdir / folder
        if not model.is_dir():
            raise ValueError(f"{path} names {model}, which is gone: start over with --restart")
        self.global_model = model
        self.initial_loss = state["initial_loss"]
        self.reports = [LlmRoundReport(**r) for r in state["reports"]]
        self._load_state(state)
        self.say(f"resuming after round {done} (from {path}): global model {model}")
        return done

    def _load_state(self, state: dict) -> None:
        """Read what a mode keeps across rounds besides the global model (`DilocoFederation`:
        the outer momentum)."""

    def _state(self) -> dict:
        return {}

    def _save_state(self, round_: int) -> None:
        """Written once round `round_`'s global model (and outer state) are on disk: replaced
        atomically, so a stop at any point leaves the last finished round's state."""
        state = {"format": STATE_FORMAT, "round": round_, "fingerprint": self.fingerprint(),
                 "global_model": self.global_model.relative_to(self.workdir).as_posix(),
                 "initial_loss": self.initial_loss, "reports": [asdict(r) for r in self.reports], **self._state()}
        part = self.workdir / (STATE + ".part")
        part.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(part, self.workdir / STATE)

    def baseline_plan(self) -> str:
        s = self.settings
        return (f"one LoRA adapter on all {len(self.records)} examples, {s.rounds * s.epochs} epochs of batch "
                f"{s.batch_size}, merged into the base model")

    def baseline_params(self) -> dict:
        """The plugin's params for the centralised reference: the same tokens as the rounds."""
        s = self.settings
        params = dict(self._params(0, self.shards[0], 0), epochs=str(s.rounds * s.epochs))
        params.pop("seed", None)
        return params

    def centralised_baseline(self) -> float:
        """Train one model here on the whole training set with the llm-finetune plugin's own
        loop (``baseline_params``) and return its held-out loss: the reference the federated
        rounds are measured against (``loss_ratio``)."""
        from dvm_llm_finetune import data as datamod
        from dvm_llm_finetune import model as modelmod
        from dvm_llm_finetune.params import Limits, parse_params
        from dvm_llm_finetune.train import TrainSpec, train

        folder = self.workdir / "baseline"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        limits = Limits(max_epochs=10**6, max_steps=10**9, max_seq_length=1 << 20)
        params = parse_params({**self.baseline_params(), "seed": str(self.settings.seed)}, limits,
                              has_eval_input=True)
        tokenizer = modelmod.load_tokenizer(self.base_model)
        (folder / "train.jsonl").write_text("".join(line + "\n" for line in self.records))
        dataset = datamod.read_jsonl(folder / "train.jsonl", what="training set", max_bytes=1 << 40,
                                     max_examples=10**9)
        examples = datamod.tokenize(dataset, tokenizer, params.max_seq_length, what="training set").examples
        model_type = json.loads((self.base_model / "config.json").read_text())["model_type"]
        spec = TrainSpec(model_folder=str(self.base_model), model_type=model_type, base_model_name="baseline",
                         params=params.as_dict(), output_dir=str(folder / "trained"), device="cpu")
        train(spec, examples, datamod.Examples.of([]), tokenizer)
        trained = folder / "trained"
        if params.method == "lora":
            merge_adapters(self.base_model, [trained], [1.0], folder / "model")
            trained = folder / "model"
        return self.heldout.loss(trained)

    def write_reports(self) -> None:
        from dvm_core.charts import plot_lines

        baseline = getattr(self, "baseline", None)
        last = self.reports[-1].eval_loss if self.reports else self.initial_loss
        (self.workdir / "rounds.json").write_text(json.dumps(
            {"settings": asdict(self.settings), "providers": self.providers,
             "base_model": {"eval_loss": self.initial_loss, "perplexity": perplexity(self.initial_loss)},
             "rounds": [asdict(r) for r in self.reports],
             "centralised_baseline": None if baseline is None else
             {"eval_loss": baseline, "plan": self.baseline_plan(), "loss_ratio": last / baseline}},
            indent=2) + "\n")
        points = [(0, self.initial_loss)] + [(r.round, r.eval_loss) for r in self.reports]
        series = [("global model", points)]
        if baseline is not None and self.reports:
            series.append(("centralised, same tokens", [(self.reports[-1].round, baseline)]))
        what = "DiLoCo, outer Nesterov" if self.settings.mode == "diloco" else "LoRA, merged exactly"
        plot_lines(self.workdir / "loss.png", f"held-out loss per round ({what})", series,
                   x_label="round", y_label="loss")


def _failure(outcome: BaseException) -> str:
    """Why a provider's job failed, from what `asyncio.gather` returned for it (anything but an
    Exception, a cancellation say, goes on up)."""
    if not isinstance(outcome, Exception):
        raise outcome
    return str(outcome) if isinstance(outcome, ProviderFailed) else f"{type(outcome).__name__}: {outcome}"


def _card_seconds(card: Path | None) -> float | None:
    """A provider's training-loop seconds, from its model card (what `overhead_ratio` compares)."""
    try:
        return float(json.loads(card.read_text())["training"]["seconds"]) if card else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _card_losses(card: Path | None) -> dict:
    """A provider's own loss on its shard before and after, from its model card (informative)."""
    try:
        metrics = json.loads(card.read_text()).get("metrics", {}) if card else {}
        return {"train_loss_before": (metrics.get("before") or {}).get("train_loss"),
                "train_loss": metrics.get("train_loss")}
    except (OSError, ValueError, AttributeError):
        return {}


def round_table(federation: LlmFederation) -> list[str]:
    """The per-round table `dvm federate --task llm` prints (round 0: the base model)."""
    lines = ["round  eval loss  perplexity  merged  dropped  paid(sat)  MB up  seconds",
             f"{0:5d}  {federation.initial_loss:9.4f}  {perplexity(federation.initial_loss):10.2f}  "
             f"{'-':>6}  {'-':>7}  {'-':>9}  {'-':>5}  {'-':>7}"]
    for r in federation.reports:
        lines.append(f"{r.round:5d}  {r.eval_loss:9.4f}  {r.perplexity:10.2f}  {len(r.providers):6d}  "
                     f"{len(r.dropped):7d}  {sum(r.paid.values()):9d}  {r.bytes_up / 1e6:5.2f}  {r.seconds:7.1f}")
    baseline = getattr(federation, "baseline", None)
    if baseline is not None and federation.reports:
        lines.append(f"centralised, same tokens: eval loss {baseline:.4f}; federated / centralised "
                     f"{federation.reports[-1].eval_loss / baseline:.4f}")
    return lines


async def federate_llm(customer, wallet, providers: Sequence[str], train: Path, test: Path, model: Path,
                       servers: Sequence[str], workdir: Path, settings: LlmSettings | None = None,
                       say: Callable[[str], None] = print) -> LlmFederation:
    """Run the LLM rounds (see the module docstring; ``settings.mode`` diloco: `diloco`);
    returns the federation (its `reports`)."""
    from .diloco import DilocoFederation

    settings = settings or LlmSettings()
    if settings.mode not in MODES:
        raise ValueError(f"unknown mode {settings.mode!r}: one of {', '.join(MODES)}")
    cls = DilocoFederation if settings.mode == "diloco" else LlmFederation
    federation = cls(customer, wallet, providers, train, test, model, servers, workdir, settings, say)
    await federation.run()
    return federation
