"""The checks of a merge that need no data (and no torch): weights, method and its needs.

Shared by `merge.merge_files` and the plugin's `parse_request`, which runs before payment on
the worker's event loop and must not import torch.
"""

from __future__ import annotations

import math
from typing import Sequence

METHODS = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")


class MergeError(ValueError):
    """An input that cannot be merged. The message names the input at fault; `index` is its
    position in `paths` (None for the base model or a problem of the whole set)."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def check_weights(weights: Sequence[float], labels: list[str]) -> list[float]:
    out = []
    for i, w in enumerate(weights):
        try:
            value = float(w)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise MergeError(f"input {i} ({labels[i]}) has weight {w!r}: a weight is the number of "
                             "training examples, a positive number", i)
        out.append(value)
    return out


def check_method(method: str, n: int, trim_ratio: float, f: int, m: int | None) -> tuple[int, int]:
    """(trim count k, kept count m) after checking the method's needs; MergeError if unmet."""
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    k, keep = 0, n
    if method == "median" and n < 3:
        raise MergeError(f"the median needs at least 3 inputs (got {n}); with fewer it is just the mean")
    if method == "trimmed_mean":
        if not (isinstance(trim_ratio, (int, float)) and 0 <= trim_ratio < 0.5):
            raise MergeError(f"trim_ratio must be at least 0 and below 0.5, got {trim_ratio!r}")
        k = int(math.floor(trim_ratio * n + 1e-9))
        if k < 1:
            raise MergeError(f"trimmed_mean with trim_ratio {trim_ratio:g} trims ⌊{trim_ratio:g}×{n}⌋ = 0 "
                             f"inputs from each end, which is a plain mean: send at least "
                             f"{math.ceil(1 / trim_ratio) if trim_ratio > 0 else 'more'} inputs or a larger trim_ratio")
    if method in ("krum", "multi_krum"):
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise MergeError(f"f (the number of Byzantine inputs tolerated) must be a whole number ≥ 0, got {f!r}")
        if n <= 2 * f + 2:
            raise MergeError(f"{method} with f = {f} needs more than 2f + 2 = {2 * f + 2} inputs (got {n})")
        if method == "krum":
            keep = 1
        else:
            keep = n - f if m is None else m
            if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n - f:
                raise MergeError(f"m (inputs multi_krum keeps) must be between 1 and N − f = {n - f}, got {m!r}")
    return k, keep
