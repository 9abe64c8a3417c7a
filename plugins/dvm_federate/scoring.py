"""Scores for federated updates, before they are merged (the customer's side of `dvm federate`).

Templar's Gauntlet scores a miner's update by the loss before and after applying it; we do the
same on the customer's held-out set, and against the other updates of the round, without a
blockchain:

1. **Nothing new.** An update equal to the global model (a lazy provider: ``‖Δ‖`` below
   `LAZY_TOLERANCE` of the largest update) or to another provider's update of the same round (a
   copy, ``‖Δᵢ − Δⱼ‖ ≤ COPY_TOLERANCE·‖Δⱼ‖``; the first in the providers' order is kept) adds
   nothing: its score is 0 and it is left out.
2. **Its own shard** (when the caller has the shards, as `dvm federate` does): the loss of the
   global model and of the update on the data the provider was given. An update that does not
   lower it did not learn that data (noise, a sign flip, another learning task): left out, its
   score the (negative) difference.
3. **Leave one out.** For the others, the held-out loss of the FedAvg of all of them and of all
   but one: ``score = loss(without it) − loss(with it)``, positive when the update lowers the
   loss. The worst one is left out while its score is below ``−tolerance × loss(with it)`` (it
   raised the held-out loss by more than `tolerance`, 20 % by default), and the scores are taken
   again without it, until none is. Noise, sign-flipped and scaled updates raise it many times
   over; an honest update can raise it a little: its effect lost in the noise late in a
   training, or, split by label, the first averages of models that saw different classes (in
   the digits, +6 % in a first round).

Each update that reaches step 3 also gets its `gain`, Gauntlet's own measure: the held-out loss
of the global model minus that of the update applied alone. `dvm federate --bonus` shares its
bonus by positive gain: among honest updates of a shuffled split, the leave-one-out scores are
mostly noise around zero, while each update alone lowers the loss by a comparable amount.

The scoring merge is plain FedAvg (weighted by shard size) whatever method merges the round
afterwards; `score_updates` returns one `UpdateScore` per update and the caller merges those
with ``merged=True``. Non-float tensors (BatchNorm's step counters) come from the first update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

LAZY_TOLERANCE = 1e-6   # ‖Δ‖ below this share of the largest ‖Δ‖: no change from the global model
COPY_TOLERANCE = 1e-3   # ‖Δᵢ − Δⱼ‖ below this share of ‖Δⱼ‖: the same update twice


@dataclass
class UpdateScore:
    provider: str
    score: float             # held-out loss without it − with it (0 for a lazy one or a copy)
    merged: bool
    reason: str              # why merged or left out, in words
    gain: float | None = None              # held-out loss of the global model − of its update alone
    heldout_with: float | None = None      # held-out loss of the FedAvg with it (None: not computed)
    heldout_without: float | None = None   # … and without it
    shard_before: float | None = None      # loss on its own shard: the global model,
    shard_after: float | None = None       # … and its update

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class LossOn:
    """Mean cross-entropy of a state dict on a labelled set, with one model built once."""

    def __init__(self, build: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor,
                 batch_size: int = 512):
        self.model = build().eval()
        self.x, self.y, self.batch_size = x, y, batch_size

    @torch.no_grad()
    def __call__(self, state: dict[str, torch.Tensor]) -> float:
        self.model.load_state_dict(state, strict=True)
        total = 0.0
        for start in range(0, self.x.shape[0], self.batch_size):
            logits = self.model(self.x[start:start + self.batch_size])
            total += float(torch.nn.functional.cross_entropy(
                logits, self.y[start:start + self.batch_size], reduction="sum"))
        loss = total / max(1, self.x.shape[0])
        return loss if math.isfinite(loss) else math.inf


def _float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def fedavg(base: dict[str, torch.Tensor], updates: Sequence[dict[str, torch.Tensor]],
           weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted mean of `updates` (the base itself when there is none)."""
    if not updates:
        return base
    total = float(sum(weights))
    merged = dict(updates[0])
    for key in _float_keys(base):
        acc = torch.zeros_like(base[key], dtype=torch.float64)
        for update, w in zip(updates, weights):
            acc += update[key].to(torch.float64) * (w / total)
        merged[key] = acc.to(base[key].dtype)
    return merged


def _delta_norms(base, updates) -> tuple[list[torch.Tensor], list[float]]:
    keys = _float_keys(base)
    deltas = [torch.cat([(u[k].to(torch.float64) - base[k].to(torch.float64)).flatten() for k in keys])
              for u in updates]
    return deltas, [float(d.norm()) for d in deltas]


def score_updates(base_path: Path, update_paths: Sequence[Path], providers: Sequence[str],
                  weights: Sequence[float], heldout: Callable[[dict], float],
                  shard_loss: Callable[[int, dict], float] | None = None,
                  tolerance: float = 0.2) -> list[UpdateScore]:
    """Score each update (see the module docstring); one `UpdateScore` per update, in order."""
    base = load_file(str(base_path))
    updates = [load_file(str(p)) for p in update_paths]
    scores: list[UpdateScore | None] = [None] * len(updates)
    for i, update in enumerate(updates):
        if update.keys() != base.keys() or any(update[k].shape != base[k].shape for k in base):
            scores[i] = UpdateScore(providers[i], 0.0, False, "its tensors do not fit the global model")
        elif not all(torch.isfinite(update[k]).all() for k in _float_keys(base)):
            scores[i] = UpdateScore(providers[i], -math.inf, False, "its update holds NaN or infinite values")
    usable = [i for i in range(len(updates)) if scores[i] is None]
    deltas, norms = _delta_norms(base, [updates[i] for i in usable]) if usable else ([], [])
    largest = max(norms, default=0.0)
    candidates: list[int] = []
    shard: dict[int, tuple[float, float]] = {}   # candidate → its shard's loss before, after
    for j, i in enumerate(usable):
        if norms[j] <= LAZY_TOLERANCE * largest or norms[j] == 0.0:
            scores[i] = UpdateScore(providers[i], 0.0, False, "no change from the global model (a lazy update)")
            continue
        twin = next((usable[k] for k in range(j) if usable[k] in candidates
                     and float((deltas[j] - deltas[k]).norm()) <= COPY_TOLERANCE * norms[k]), None)
        if twin is not None:
            scores[i] = UpdateScore(providers[i], 0.0, False,
                                    f"a copy of the update of {providers[twin][:12]}… (adds nothing)")
            continue
        candidates.append(i)
    if shard_loss is not None:
        for i in usable:
            scores_i = scores[i]
            before, after = shard_loss(i, base), shard_loss(i, updates[i])
            if scores_i is not None:
                scores_i.shard_before, scores_i.shard_after = before, after
                continue
            if not after < before:    # it did not learn its own data
                scores[i] = UpdateScore(providers[i], min(0.0, _difference(before, after)), False,
                                        f"it did not lower the loss on its own shard ({_fmt(before)} → {_fmt(after)})",
                                        shard_before=before, shard_after=after)
                candidates.remove(i)
            else:
                shard[i] = (before, after)

    kept = list(candidates)
    gains: dict[int, float] = {}
    if kept:    # Gauntlet's own measure: the held-out loss before and after applying it alone
        start = heldout(base)
        gains = {i: _difference(start, heldout(updates[i])) for i in kept}
    while kept:
        with_all = heldout(fedavg(base, [updates[i] for i in kept], [weights[i] for i in kept]))
        without = {}
        for i in kept:
            rest = [k for k in kept if k != i]
            without[i] = heldout(fedavg(base, [updates[k] for k in rest], [weights[k] for k in rest]))
        current = {i: _difference(without[i], with_all) for i in kept}
        worst = min(kept, key=lambda i: current[i])
        limit = -tolerance * with_all if math.isfinite(with_all) else 0.0
        if current[worst] < limit or (len(kept) > 1 and not math.isfinite(with_all)):
            scores[worst] = UpdateScore(
                providers[worst], current[worst], False,
                f"it raised the held-out loss from {_fmt(without[worst])} to {_fmt(with_all)}",
                heldout_with=with_all, heldout_without=without[worst])
            kept.remove(worst)
            continue
        for i in kept:
            scores[i] = UpdateScore(providers[i], current[i], True,
                                    f"held-out loss {_fmt(without[i])} without it, {_fmt(with_all)} with it",
                                    heldout_with=with_all, heldout_without=without[i])
        break
    for i, (before, after) in shard.items():
        scores[i].shard_before, scores[i].shard_after = before, after
    for i, gain in gains.items():
        scores[i].gain = gain
    return [s for s in scores if s is not None]


def _difference(without: float, with_: float) -> float:
    if math.isinf(with_) and math.isinf(without):
        return 0.0
    return without - with_


def _fmt(loss: float) -> str:
    return f"{loss:.4f}" if math.isfinite(loss) else "∞"


def labelled(x: np.ndarray, labels: Sequence[str], preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and class names as the model reads them: (inputs, class indices)."""
    index = {name: i for i, name in enumerate(preprocess.classes)}
    return preprocess(x), torch.tensor([index[str(label)] for label in labels], dtype=torch.long)
