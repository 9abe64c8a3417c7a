"""Full-model DiLoCo rounds: ``dvm federate --task llm --mode diloco``.

DiLoCo (Douillard et al. 2023; OpenDiLoCo, INTELLECT-1) trains one model across workers that talk
once every H steps. Each round here:

1. the global weights θ are zipped and uploaded (encrypted), as in LoRA rounds;
2. each provider gets a private llm-finetune job (kind 5751) with ``method=full``,
   ``max_steps=H``, a constant inner learning rate (AdamW, fresh each job: a marketplace job
   keeps no state between jobs) and ``output=delta``: it returns only its pseudo-gradient
   Δᵢ = θ − θᵢ (`dvm_llm_finetune.delta`), as float32, bf16 or int8 (``compression``);
3. the Δᵢ are checked (every floating-point tensor of the model, the same shapes, finite), made
   into states θ − Δᵢ, scored (`scoring.score_updates`: a lazy, copied, useless or harmful one is
   left out) and merged: FedAvg weighted by shard sizes, or a robust method (median, trimmed
   mean, Krum) or clipping on them (`dvm_fedavg.merge.merge_files`) — Δ = θ − merge;
4. the outer optimizer, SGD with Nesterov momentum as in DiLoCo (PyTorch's formula):
   m ← μ·m + Δ, θ ← θ − η·(Δ + μ·m), η the outer learning rate (0.7) and μ the momentum (0.9);
   η = 1, μ = 0 is plain averaging of the providers' weights;
5. the new θ is evaluated on the held-out JSONL and written as the next round's model folder,
   the momentum m as ``outer-<round>.safetensors`` and both named in ``state.json``, so a
   stopped ``dvm federate`` resumes after its last finished round with the same outer state.

What travels per round: the model archive to each provider (``bytes_down``) and the
pseudo-gradients back (``bytes_up``); int8 sends about a quarter of float32's bytes.
Limits: the customer holds N + 3 copies of the weights in memory during the merge (fine for
models of a few hundred million parameters); the inner optimizer's state is not carried across
rounds (OpenDiLoCo keeps it on the worker; a job here starts AdamW afresh).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from pathlib import Path

from .llm import LlmFederation, LlmRoundReport, _card_losses, _card_seconds, _failure
from .rounds import simulate_attack

MAX_EPOCHS = 20   # the llm-finetune plugin's default max_epochs


def outer_step(theta: dict, delta: dict, momentum: dict | None, lr: float, mu: float) -> tuple[dict, dict, dict]:
    """One outer step, SGD with Nesterov momentum on the pseudo-gradient `delta` (float tensors
    by name): m ← μ·m + Δ (m = Δ the first time), θ ← θ − lr·(Δ + μ·m). Returns (the new θ, in
    each tensor's dtype, computed in float64; the new m, float32; a short report)."""
    import torch

    new_theta, new_m = dict(theta), {}
    step_sq = delta_sq = 0.0
    for name, d in delta.items():
        d64 = d.to(torch.float64)
        m = d64 if momentum is None or name not in momentum else mu * momentum[name].to(torch.float64) + d64
        step = lr * (d64 + mu * m)
        new_theta[name] = (theta[name].to(torch.float64) - step).to(theta[name].dtype)
        new_m[name] = m.to(torch.float32)
        step_sq += float(step.pow(2).sum())
        delta_sq += float(d64.pow(2).sum())
    return new_theta, new_m, {"outer_lr": lr, "outer_momentum": mu, "pseudo_gradient_norm": math.sqrt(delta_sq),
                              "step_norm": math.sqrt(step_sq)}


def check_delta(delta: dict, global_state: dict) -> None:
    """ValueError unless `delta` holds exactly the global model's floating-point tensors, in
    their shapes, finite."""
    import torch

    wanted = {k for k, v in global_state.items() if v.is_floating_point()}
    missing, extra = sorted(wanted - delta.keys()), sorted(delta.keys() - wanted)
    if missing or extra:
        raise ValueError("its pseudo-gradient does not fit the model ("
                         + "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                                  f"not in the model {extra[:3]}" if extra else "") if x) + ")")
    for name, d in delta.items():
        if tuple(d.shape) != tuple(global_state[name].shape):
            raise ValueError(f"its pseudo-gradient of {name!r} is {list(d.shape)}, the weight "
                             f"{list(global_state[name].shape)}")
        if not torch.isfinite(d).all():
            raise ValueError(f"its pseudo-gradient of {name!r} holds NaN or infinite values")


def read_state(folder: Path) -> tuple[dict, dict]:
    """(name → tensor of every safetensors file of a model folder, file name → its names)."""
    from safetensors.torch import load_file

    state, layout = {}, {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors = load_file(str(f))
        state.update(tensors)
        layout[f.name] = list(tensors)
    return state, layout


def write_model_folder(source: Path, state: dict, layout: dict, out: Path) -> None:
    """A copy of model folder `source` with its safetensors files rewritten from `state`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    part = out.with_name(out.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, part / f.name)
    for name, keys in layout.items():
        with safe_open(str(source / name), "pt") as handle:
            metadata = handle.metadata()
        save_file({k: state[k].contiguous() for k in keys}, str(part / name), metadata=metadata)
    if out.exists():
        shutil.rmtree(out)
    part.rename(out)


class DilocoFederation(LlmFederation):
    """`LlmFederation` in full-model DiLoCo mode (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from dvm_llm_finetune.delta import COMPRESSIONS

        s = self.settings
        if s.merge_provider:
            raise ValueError("DiLoCo rounds merge here: a --merge-dvm is for LoRA rounds")
        if s.inner_steps < 1:
            raise ValueError("inner_steps (H) must be at least 1")
        if not s.outer_lr > 0 or not 0 <= s.outer_momentum < 1:
            raise ValueError("the outer learning rate must be > 0 and the momentum in [0, 1)")
        if s.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {s.compression!r}: one of {', '.join(COMPRESSIONS)}")
        self.momentum: dict | None = None
        self.momentum_file: Path | None = None

    async def prepare(self, resumed: bool = False) -> None:
        s = self.settings
        n = len(self.providers)
        for i in range(n):   # the shards' sizes (`LlmFederation.prepare` deals the lines out), before any upload
            shard = range(i, len(self.records), n)
            if self._epochs(shard) > MAX_EPOCHS:
                raise ValueError(
                    f"H = {s.inner_steps} steps of batch {s.batch_size} take {self._epochs(shard)} passes over "
                    f"shard {i} ({len(shard)} examples); providers allow {MAX_EPOCHS} by default: lower "
                    "--inner-steps or --batch-size, or give more data")
        await super().prepare(resumed)

    def _epochs(self, shard) -> int:
        """Passes over a shard that hold H steps (one more: examples dropped as too long)."""
        s = self.settings
        return math.ceil(s.inner_steps / max(1, len(shard) // s.batch_size)) + 1

    def _params(self, provider_index: int, shard, round_: int) -> dict[str, str]:
        s = self.settings
        epochs = min(MAX_EPOCHS, self._epochs(shard))
        params = {"method": "full", "output": "delta", "compression": s.compression,
                  "max_steps": str(s.inner_steps), "epochs": str(epochs), "batch_size": str(s.batch_size),
                  "max_seq_length": str(s.max_seq_length), "lr_schedule": "constant", "warmup_ratio": "0",
                  "seed": str(s.seed * 1000 + round_ * 100 + provider_index), "eval_fraction": "0"}
        if s.learning_rate is not None:
            params["learning_rate"] = f"{s.learning_rate:g}"
        return params

    def baseline_plan(self) -> str:
        s = self.settings
        n = len(self.providers)
        return (f"full fine-tuning on all {len(self.records)} examples, {s.rounds * s.inner_steps} steps of batch "
                f"{n * s.batch_size} (the rounds' {s.rounds}×{s.inner_steps} steps × {n} providers × batch "
                f"{s.batch_size}: the same tokens)")

    def baseline_params(self) -> dict:
        s = self.settings
        params = dict(self._params(0, self.shards[0], 0), max_steps=str(s.rounds * s.inner_steps),
                      batch_size=str(len(self.providers) * s.batch_size), epochs="1000000")
        for key in ("seed", "output", "compression"):
            params.pop(key, None)
        return params

    # --- the outer state, kept across rounds and restarts ------------------------------------

    def _state(self) -> dict:
        return {"outer_momentum": self.momentum_file.name if self.momentum_file else None}

    def _load_state(self, state: dict) -> None:
        from safetensors.torch import load_file

        name = state.get("outer_momentum")
        if name:
            self.momentum_file = self.workdir / name
            if not self.momentum_file.is_file():
                raise ValueError(f"the outer momentum {self.momentum_file} is gone: start over with --restart")
            self.momentum = load_file(str(self.momentum_file))

    # --- one round ---------------------------------------------------------------------------

    async def run_round(self, round_: int) -> LlmRoundReport:
        from dvm_llm_finetune.delta import FILE

        s = self.settings
        started = time.monotonic()
        rdir = self.workdir / f"round-{round_}"
        rdir.mkdir(parents=True, exist_ok=True)
        model_url, bytes_down = await self._upload_global(rdir)
        outcomes, paid, payments = await self._train_all(round_, rdir, model_url)
        global_state, layout = await asyncio.to_thread(read_state, self.global_model)
        base_file = rdir / "global.safetensors"
        await asyncio.to_thread(_save, global_state, base_file)
        base_sha256 = await asyncio.to_thread(weights_sha256, self.global_model)
        updates, weights, names, dropped, losses, seconds, bytes_up = [], [], [], {}, {}, {}, 0
        for i, (provider, outcome) in enumerate(zip(self.providers, outcomes)):
            if isinstance(outcome, BaseException):
                self._drop(round_, dropped, provider, _failure(outcome))
                continue
            files, _cost = outcome
            if FILE not in files:
                self._drop(round_, dropped, provider, f"the result has no {FILE}")
                continue
            path = rdir / f"update-{i}.safetensors"
            try:
                await asyncio.to_thread(_update_state, files[FILE], global_state, base_sha256, path)
            except ValueError as exc:
                self._drop(round_, dropped, provider, str(exc))
                continue
            bytes_up += files[FILE].stat().st_size
            steps = _card_steps(files.get("model_card.json"))
            if steps is not None and steps != s.inner_steps:
                self.say(f"round {round_}: provider {provider[:12]}… took {steps} inner steps, not {s.inner_steps}")
            losses[provider] = _card_losses(files.get("model_card.json"))
            seconds[provider] = _card_seconds(files.get("model_card.json"))
            if i in s.attacks:   # a simulation (--local --attack): this provider cheats
                await asyncio.to_thread(simulate_attack, path, base_file, s.attacks[i], path,
                                        updates[0] if updates else None)
                self.say(f"round {round_}: provider {provider[:12]}… plays {s.attacks[i]} (simulated)")
            updates.append(path)
            weights.append(float(len(self.shards[i])))
            names.append(provider)
        scores: dict[str, dict] = {}
        if updates and s.score:
            scored = await asyncio.to_thread(self.score_states, base_file, updates, weights, names)
            scores, (updates, weights, names) = self._keep_scored(round_, scored, "update", updates, weights, names)
        report: dict = {}
        outer: dict = {}
        if updates:
            report, outer = await asyncio.to_thread(self._outer_round, round_, rdir, base_file, global_state, layout,
                                                    updates, weights, names)
        elif not scores:
            self.say(f"round {round_}: no pseudo-gradient came back; the global model stays as it was")
        for path in [base_file, *rdir.glob("update-*.safetensors"), rdir / "merged.safetensors"]:
            path.unlink(missing_ok=True)   # whole-model copies; the pseudo-gradients received stay
        return await self._end_round(
            round_, started,
            lambda r: f"{len(r.providers)}/{len(self.providers)} pseudo-gradients merged ({s.method}), outer step "
                      f"{r.outer.get('step_norm', 0):.4g}; held-out loss {r.eval_loss:.4f} (perplexity "
                      f"{r.perplexity:.2f}), {r.bytes_up / 1e6:.2f} MB up ({s.compression}), paid "
                      f"{sum(r.paid.values())} sat, {r.seconds:.1f}s",
            providers=names, dropped=dropped, paid=paid, merge=report, payments=payments, scores=scores,
            provider_losses=losses, bytes_down=bytes_down, bytes_up=bytes_up, train_seconds=seconds, outer=outer)

    def _outer_round(self, round_: int, rdir: Path, base_file: Path, global_state: dict, layout: dict,
                     updates: list[Path], weights: list[float], names: list[str]) -> tuple[dict, dict]:
        """Merge the kept updates θ − Δᵢ (`merge_files`: FedAvg or the robust method), take the
        outer step on Δ = θ − merge, write the new global model folder and the momentum."""
        from dvm_fedavg.merge import merge_files
        from safetensors.torch import load_file, save_file

        s = self.settings
        merged_file = rdir / "merged.safetensors"
        report = merge_files(updates, weights, merged_file, method=s.method, base=base_file,
                             trim_ratio=s.trim_ratio, f=s.krum_f, clip_norm=s.clip_norm,
                             names=[n[:12] for n in names]).to_dict()
        merged = load_file(str(merged_file))
        delta = {k: global_state[k].float() - merged[k].float() for k, v in global_state.items() if v.is_floating_point()}
        new_state, self.momentum, outer = outer_step(global_state, delta, self.momentum, s.outer_lr, s.outer_momentum)
        out = self.workdir / f"global-{round_}"
        write_model_folder(self.global_model, new_state, layout, out)
        momentum_file = self.workdir / f"outer-{round_}.safetensors"
        save_file(self.momentum, str(momentum_file), metadata={"format": "dvm-diloco-momentum/1",
                                                                "round": str(round_)})
        self.global_model, self.momentum_file = out, momentum_file
        report["names"] = [n[:12] for n in names]
        return report, outer


def _card_steps(card: Path | None) -> int | None:
    try:
        return int(json.loads(card.read_text())["training"]["steps"]) if card else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def weights_sha256(folder: Path) -> str:
    """The model card's ``weights_sha256`` of a model folder: sha256 of the lines
    ``<file>:<sha256>\n`` of its safetensors files in name order."""
    import hashlib

    from dvm_core.datarefs import sha256_file

    digest = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def _update_state(delta_file: Path, global_state: dict, base_sha256: str, out: Path) -> None:
    """Read and check a provider's pseudo-gradient (against these global weights, fitting
    them) and write its update as a whole state θ − Δᵢ (in the global model's dtypes; the
    non-float tensors are the global model's)."""
    from dvm_llm_finetune.delta import read_delta

    delta, meta = read_delta(delta_file)
    if meta.get("base_sha256") != base_sha256:
        raise ValueError(f"its pseudo-gradient is against other weights (base_sha256 "
                         f"{str(meta.get('base_sha256'))[:16]}…, this round's {base_sha256[:16]}…)")
    check_delta(delta, global_state)
    state = {k: (v.to(delta[k].dtype) - delta[k]).to(v.dtype) if k in delta else v for k, v in global_state.items()}
    _save(state, out)
