"""The robust aggregators: coordinate-wise median and trimmed mean, Krum and multi-Krum, with
optional update clipping; merged chunk by chunk on the `_ChunkReader`.

Passes over the inputs: with ``clip_norm``, one for the update norms ‖xᵢ − base‖; for (multi-)
Krum, one for the pairwise distances; then the merge itself, which also measures each input's
distance to the merged model and to the base. The arithmetic is numpy's on plain arrays,
single-threaded (torch's OpenMP on 1 MB chunks stalls on busy cores); the read thread is the
parallelism.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .chunked import _ChunkReader
from .report import Measures
from .safetensors_io import (CHUNK_ELEMENTS, _Buffer, _File, _from_np, _Writer, blame_non_finite,
                             find_non_finite, merged_metadata)

ROBUST_CHUNK_ELEMENTS = 1 << 16   # median / trimmed mean: the sorting network's temporaries stay in cache


def _as_np(x, acc: torch.dtype) -> np.ndarray:
    """A chunk as a numpy array: a view for the dtypes numpy has, a float copy for bf16."""
    if isinstance(x, np.ndarray):
        return x
    if x.dtype == torch.bfloat16:
        return x.to(acc).numpy()
    return x.numpy()


def _sorted_values(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Every coordinate's values sorted across the inputs (result[0]: the smallest). For a few
    inputs an odd-even transposition network of elementwise min/max over the whole chunk is
    ~30× faster than torch.sort along a short axis; NaN propagates (and is refused later)."""
    n = len(rows)
    if n > 24:
        return list(np.sort(np.stack(rows), axis=0))
    a = list(rows)
    for r in range(n):
        for i in range(r % 2, n - 1, 2):
            a[i], a[i + 1] = np.minimum(a[i], a[i + 1]), np.maximum(a[i], a[i + 1])
    return a


def _dist2(x, y, tmp: torch.Tensor) -> float:
    """‖x − y‖² of two chunks (tensors or arrays; tmp in the accumulator's dtype)."""
    y = _as_np(y, tmp.dtype)
    d = np.subtract(_as_np(x, tmp.dtype), y, out=tmp[: y.size].numpy(), dtype=tmp.numpy().dtype)
    return float(np.dot(d, d))


class _RobustMerger(_ChunkReader):
    def __init__(self, files, base, method: str, k: int, progress, check):
        super().__init__(files, base, files[0].float_keys, progress, check)
        self.method, self.k = method, k
        self.tmp = torch.empty(CHUNK_ELEMENTS, dtype=self.acc)
        self.merged_buf = torch.empty(CHUNK_ELEMENTS, dtype=self.acc)
        self.scales = [1.0] * self.n   # clip factors: each update xᵢ − base scaled by these

    def _clipped(self, xs, b):
        """The inputs with each update scaled by its clip factor (as float chunks)."""
        if b is None or all(s == 1.0 for s in self.scales):
            return xs
        out = []
        for x, s in zip(xs, self.scales):   # b + s·(x − b)
            out.append(x if s == 1.0 else np.add(b, s * np.subtract(_as_np(x, self.acc), b)))
        return out

    def update_norms(self, start, span) -> torch.Tensor:
        """‖xᵢ − base‖² for every input, one pass."""
        sq = torch.zeros(self.n, dtype=torch.float64)
        for xs, b in self.measuring_pass(start, span, "measuring update norms"):
            b = _as_np(b, self.acc)
            for i, x in enumerate(xs):
                sq[i] += _dist2(x, b, self.tmp)
        return sq

    def pairwise(self, start, span) -> torch.Tensor:
        """Squared distances between every two (clipped) inputs, one pass."""
        d2 = torch.zeros(self.n, self.n, dtype=torch.float64)
        for xs, b in self.measuring_pass(start, span, "measuring distances between inputs"):
            xs = self._clipped([_as_np(x, self.acc) for x in xs], None if b is None else _as_np(b, self.acc))
            for i in range(self.n):
                for j in range(i + 1, self.n):
                    d2[i, j] += _dist2(xs[i], xs[j], self.tmp)
        return d2 + d2.T

    def _coordinate_wise(self, rows: list[np.ndarray], picked: torch.Tensor) -> np.ndarray:
        """The median or trimmed mean of a chunk; counts in `picked` the coordinates where each
        input supplied the median / was trimmed."""
        n, k = self.n, self.k
        values = _sorted_values(rows)
        if self.method == "median":
            mid = n // 2
            lo, hi = (values[mid], values[mid]) if n % 2 else (values[mid - 1], values[mid])
            merged = hi if n % 2 else (lo + hi) * 0.5
            for i, x in enumerate(rows):   # supplied the median: one of the middle values
                picked[i] += np.count_nonzero((x >= lo) & (x <= hi))
            return merged
        merged = values[k].copy()
        for v in values[k + 1:n - k]:
            merged += v
        merged /= n - 2 * k
        lo, hi = values[k], values[n - k - 1]
        for i, x in enumerate(rows):   # trimmed: outside the kept values
            picked[i] += np.count_nonzero((x < lo) | (x > hi))
        return merged

    def combine(self, writer: _Writer, coefs: list[float] | None, base_coef: float, start, span):
        """Write the merged floating-point tensors (and copy the others): the weighted mean by
        `coefs` (Krum's kept inputs), else the coordinate-wise rule. Returns per-input squared
        distances to the merged model and to the base, the merged model's to the base, and the
        per-input counts of `_coordinate_wise`."""
        n = self.n
        to_merged = torch.zeros(n, dtype=torch.float64)
        to_base = torch.zeros(n, dtype=torch.float64)
        merged_to_base = torch.zeros((), dtype=torch.float64)
        picked = torch.zeros(n, dtype=torch.float64)   # coordinates where each input was trimmed / the median
        source = self.base or self.files[0]
        float_set = set(self.float_keys)
        copy_buf = _Buffer(CHUNK_ELEMENTS * 8)
        # The sorting network makes ~N temporaries per chunk: smaller chunks keep them in cache.
        chunk = CHUNK_ELEMENTS if coefs is not None else ROBUST_CHUNK_ELEMENTS
        stream = self.stream(self.float_keys, chunk)   # in the same order as the loop below
        done = 0
        for key in self.order:
            info = self.files[0].tensors[key]
            if key not in float_set:   # copied as they are (e.g. BatchNorm's counters)
                writer.copy(source, key, copy_buf)
                continue
            for begin in range(0, info.numel, chunk):
                _key, _begin, count, xs, b = next(stream)
                # numpy on plain arrays: single-threaded, so no OpenMP barriers on busy cores
                # (torch's add_ on 1 MB chunks was 5-30× slower there); the read thread is the
                # parallelism.
                bf = _as_np(b, self.acc) if b is not None else None
                if coefs is not None:
                    merged = self.merged_buf[:count].numpy()
                    tmp = self.tmp[:count].numpy()
                    first = True
                    for x, c in list(zip(xs, coefs)) + ([(b, base_coef)] if base_coef else []):
                        if c == 0.0:
                            continue
                        np.multiply(_as_np(x, self.acc), c, out=merged if first else tmp, dtype=merged.dtype)
                        if not first:
                            np.add(merged, tmp, out=merged)
                        first = False
                else:
                    merged = self._coordinate_wise(self._clipped([_as_np(x, self.acc) for x in xs], bf), picked)
                out = _from_np(merged, info.torch_dtype)
                writer.write(out)
                mf = _as_np(out, self.acc)
                for i, x in enumerate(xs):
                    to_merged[i] += _dist2(x, mf, self.tmp)
                    if bf is not None:
                        to_base[i] += _dist2(x, bf, self.tmp)
                if bf is not None:
                    merged_to_base += _dist2(mf, bf, self.tmp)
                done += count
                self.tick(done, start, span, "merging")
        stream.close()
        return to_merged, to_base, merged_to_base, picked


def _krum_choice(d2: torch.Tensor, f: int, keep: int, files: list[_File]) -> tuple[list[int], list[dict], list[dict]]:
    """(chosen, per-input fields, excluded): each input scored by the sum of its squared
    distances to its N − f − 2 nearest neighbours, the `keep` lowest kept."""
    n = len(files)
    neighbours = n - f - 2
    scores = []
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1:]])
        scores.append(float(torch.sort(others).values[:neighbours].sum()))
    ranking = sorted(range(n), key=lambda i: (scores[i], i))
    chosen = sorted(ranking[:keep])
    cutoff = scores[ranking[keep - 1]]
    extra = [{"krum_score": scores[i], "selected": i in chosen} for i in range(n)]
    excluded = [{"index": i, "name": files[i].label, "reason":
                 f"Krum score {scores[i]:.6g} (sum of squared distances to its {neighbours} "
                 f"nearest inputs) is higher than those of the {keep} kept "
                 f"(the highest kept: {cutoff:.6g})"} for i in ranking[keep:]]
    return chosen, extra, excluded


def _fractions(method: str, picked: torch.Tensor, values: int, files: list[_File]) -> tuple[list[dict], list[dict]]:
    """(per-input fields, excluded) of the coordinate-wise methods: the share of coordinates
    where each input was trimmed / supplied the median, and who never counted."""
    extra, excluded = [], []
    for i, f in enumerate(files):
        share = float(picked[i]) / max(1, values)
        if method == "trimmed_mean":
            extra.append({"trimmed_fraction": share})
            if share >= 1.0 and values:
                excluded.append({"index": i, "name": f.label,
                                 "reason": "trimmed at every coordinate (always among the extremes)"})
        else:
            extra.append({"median_fraction": share})
            if share == 0.0 and values:
                excluded.append({"index": i, "name": f.label,
                                 "reason": "never the median (or one of the two middle values) at any coordinate"})
    return extra, excluded


def merge_robust(files: list[_File], base_file: _File | None, weights: list[float], out: Path, *, method: str,
                 k: int, f: int, keep: int, clip_norm: float | None, progress: Callable[[float, str], None],
                 check: Callable[[], None]) -> Measures:
    """Merge by a robust `method` into `out` (committed atomically); what it measured."""
    n = len(files)
    krum = method in ("krum", "multi_krum")
    with _RobustMerger(files, base_file, method, k, progress, check) as merger:
        passes = 1 + (clip_norm is not None) + krum
        span, at = 1.0 / passes, 0.0
        if clip_norm is not None:
            sq = merger.update_norms(at, span)
            at += span
            if not torch.isfinite(sq).all():
                find_non_finite([base_file] + files, merger.float_keys)
            for i, s2 in enumerate(sq.tolist()):
                norm = math.sqrt(s2)
                merger.scales[i] = min(1.0, clip_norm / norm) if norm > 0 else 1.0

        coefs: list[float] | None = None
        base_coef = 0.0
        extra, excluded = None, []
        weight_used: list[float | None] = [None] * n   # the coordinate-wise methods are unweighted
        if krum:
            d2 = merger.pairwise(at, span)
            at += span
            if not torch.isfinite(d2).all():
                find_non_finite(([base_file] if base_file else []) + files, merger.float_keys)
            chosen, extra, excluded = _krum_choice(d2, f, keep, files)
            total = sum(weights[i] for i in chosen)
            coefs = [0.0] * n
            for i in chosen:
                coefs[i] = weights[i] * merger.scales[i] / total
                base_coef += weights[i] * (1.0 - merger.scales[i]) / total
            weight_used = [weights[i] / total if i in chosen else 0.0 for i in range(n)]

        first = files[0].tensors
        layout = [(key, first[key].dtype, first[key].shape) for key in merger.order]
        with _Writer(out, layout, merged_metadata(files[0], method, n)) as writer:
            to_merged, to_base, merged_to_base, picked = merger.combine(writer, coefs, base_coef, at, 1.0 - at)
            bad = [files[i] for i in range(n) if not math.isfinite(float(to_merged[i]) + float(to_base[i]))]
            if bad or (base_file and not math.isfinite(float(merged_to_base))):
                blame_non_finite(([base_file] if base_file else []) + bad, merger.float_keys)
            writer.commit()

    if not krum:
        extra, excluded = _fractions(method, picked, merger.total, files)
    return Measures(weight_used=weight_used, bytes_read=merger.bytes_read,
                    update_sq=to_base.tolist() if base_file is not None else None,
                    clip_scales=list(merger.scales) if clip_norm is not None else None,
                    to_merged_sq=to_merged.tolist(),
                    merged_to_base_sq=float(merged_to_base) if base_file is not None else None,
                    extra=extra, excluded=excluded)
