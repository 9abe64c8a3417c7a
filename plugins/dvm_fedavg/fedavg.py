"""FedAvg, the weighted mean Σ wᵢxᵢ / Σ wᵢ, streamed one input at a time.

Input i is memory-mapped, added into one preallocated accumulator (scipy's BLAS axpy, in
place) and unmapped before input i + 1, its pages given back block by block as it goes: memory
is the accumulator (every floating-point value of the model, in float32, or float64 when a
tensor is F64) plus the pages being read, whatever N. Each input is read once; with a base,
its update norm ‖xᵢ − base‖ is measured from the same mapping just before it is added (a second
read, from the page cache; `clip_norm` scales the update by it); with `distances`, one more read
of every input gives its distance to the merged model. NaN and Inf show as a non-finite sum of
the accumulator (or of an update norm), and only then are looked for input by input. Not for
LoRA adapters: those are stacked (`lora`).
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.linalg import blas   # axpy: one pass per input (imported once, with this module)

from .checks import MergeError
from .report import Measures
from .safetensors_io import _FLOATS, _File, _from_np, _Writer, blame_non_finite, find_non_finite, merged_metadata

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
FEDAVG_CHUNK = 1 << 16   # values converted / compared at once: 256 KB of fp32, in cache
FEDAVG_BLOCK = 1 << 20   # values added per BLAS call; their pages are released after it


class _Mapped:
    """A safetensors file mapped read-only: tensors as numpy views, no copy. `close` unmaps it,
    so its pages leave this process's resident set (they stay in the page cache)."""

    def __init__(self, f: _File):
        self.f = f
        with open(f.path, "rb") as fh:
            self.mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self.mm) != f.size:
            raise MergeError(f"{f.what} changed while being read", f.index)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)

    def array(self, key: str) -> np.ndarray:
        info = self.f.tensors[key]
        return self.buf[info.start:info.start + info.nbytes].view(_NP[info.dtype])

    def release(self, key: str, begin: int, count: int) -> None:
        """Drop the pages of values begin..begin+count of `key` from this process's resident
        set (read-only file pages: a later read faults them back in from the page cache)."""
        info = self.f.tensors[key]
        item = info.nbytes // max(1, info.numel)
        lo = (info.start + begin * item) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = info.start + (begin + count) * item
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self.buf = None
        try:
            self.mm.close()
        except BufferError:   # a view is still alive somewhere: at least give the pages back
            self.mm.madvise(mmap.MADV_DONTNEED)


def _as_float(x: np.ndarray, dtype: str, acc, out: np.ndarray) -> np.ndarray:
    """A chunk of raw values (`dtype` as in safetensors) as the accumulator's float type."""
    if dtype == "BF16":   # the top half of a float32
        np.left_shift(x.astype(np.uint32), 16, out=out.view(np.uint32)[:x.size])
        return out[:x.size]
    if x.dtype == acc:
        return x
    out = out[:x.size]
    out[:] = x
    return out


def merge_fedavg(files: list[_File], base_file: _File | None, weights: list[float], out: Path, *,
                 clip_norm: float | None, distances: bool, progress: Callable[[float, str], None],
                 check: Callable[[], None]) -> Measures:
    """Weighted FedAvg into `out` (committed atomically); what it measured (see the module)."""
    n = len(files)
    first = files[0].tensors
    order = files[0].order
    float_keys = files[0].float_keys
    acc_t = np.float64 if any(first[key].dtype == "F64" for key in float_keys) else np.float32
    axpy = blas.daxpy if acc_t == np.float64 else blas.saxpy
    offsets, total = {}, 0
    for key in float_keys:
        offsets[key] = total
        total += first[key].numel
    acc = np.empty(total, dtype=acc_t)   # the first input is written into it, the others added
    tmp = np.empty(FEDAVG_CHUNK, dtype=acc_t)
    tmp2 = np.empty(FEDAVG_CHUNK, dtype=acc_t)
    diff = np.empty(FEDAVG_CHUNK, dtype=np.float64)
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    scales = [1.0] * n
    update_sq: list[float | None] = [None] * n
    bytes_read = 0
    base_map = _Mapped(base_file) if base_file is not None else None
    float_bytes = sum(first[key].nbytes for key in float_keys)   # what one read of a model costs

    def sq_distance(x_of, y_of) -> float:
        """Σ over the float tensors of ‖x − y‖², chunk by chunk, in float64. `x_of`/`y_of` give
        a tensor's values by key: raw from a file, or `merged_view` (already floats)."""
        s2 = 0.0
        maps = [getattr(v, "__self__", None) for v in (x_of, y_of)]
        for key in float_keys:
            check()
            x_all, y_all = x_of(key), y_of(key)
            dtype = first[key].dtype
            for b in range(0, x_all.size, FEDAVG_CHUNK):
                x, y = x_all[b:b + FEDAVG_CHUNK], y_all[b:b + FEDAVG_CHUNK]
                x = x if x_of is merged_view else _as_float(x, dtype, acc_t, tmp)
                y = y if y_of is merged_view else _as_float(y, dtype, acc_t, tmp2)
                d = diff[:x.size]
                np.subtract(x, y, out=d)
                s2 += float(np.dot(d, d))
                if (b + FEDAVG_CHUNK) % FEDAVG_BLOCK == 0 or b + FEDAVG_CHUNK >= x_all.size:
                    start = b + FEDAVG_CHUNK - FEDAVG_BLOCK if (b + FEDAVG_CHUNK) % FEDAVG_BLOCK == 0 \
                        else b // FEDAVG_BLOCK * FEDAVG_BLOCK
                    for m_ in maps:
                        if isinstance(m_, _Mapped):
                            m_.release(key, max(0, start), b + x.size - max(0, start))
        return s2

    def merged_view(key: str) -> np.ndarray:
        return acc[offsets[key]:offsets[key] + first[key].numel]

    try:
        base_coef = 0.0
        passes = 1 + bool(distances)
        for i, f in enumerate(files):
            mapped = _Mapped(f)
            try:
                if base_map is not None:
                    s2 = sq_distance(mapped.array, base_map.array)
                    bytes_read += 2 * float_bytes
                    if not math.isfinite(s2):
                        find_non_finite([base_file, f], float_keys)
                    update_sq[i] = s2
                    if clip_norm is not None and s2 > 0:
                        scales[i] = min(1.0, clip_norm / math.sqrt(s2))
                c = shares[i] * scales[i]
                base_coef += shares[i] * (1.0 - scales[i])
                for key in float_keys:
                    check()
                    x_all, dtype = mapped.array(key), first[key].dtype
                    into = merged_view(key)
                    for block in range(0, x_all.size, FEDAVG_BLOCK):
                        part = x_all[block:block + FEDAVG_BLOCK]
                        if i == 0 and part.dtype == acc_t:
                            np.multiply(part, c, out=into[block:block + part.size])   # into = c·x
                        elif dtype in ("F32", "F64") and part.dtype == acc_t:
                            axpy(part, into[block:block + part.size], a=c)   # into += c·x, in place
                        else:
                            for b in range(0, part.size, FEDAVG_CHUNK):
                                x = _as_float(part[b:b + FEDAVG_CHUNK], dtype, acc_t, tmp)
                                if i == 0:
                                    np.multiply(x, c, out=into[block + b:block + b + x.size])
                                else:
                                    axpy(x, into[block + b:block + b + x.size], a=c)
                        mapped.release(key, block, part.size)
                bytes_read += float_bytes
            finally:
                mapped.close()
            progress((i + 1) / (n * passes), "merging")
        if base_coef:
            for key in float_keys:
                x_all, dtype = base_map.array(key), first[key].dtype
                into = merged_view(key)
                for b in range(0, x_all.size, FEDAVG_CHUNK):
                    axpy(_as_float(x_all[b:b + FEDAVG_CHUNK], dtype, acc_t, tmp), into[b:b + FEDAVG_CHUNK], a=base_coef)
        # A NaN or Inf anywhere makes the sum non-finite (a sum of huge finite values can overflow
        # too: then look closer before blaming an input).
        if not math.isfinite(float(np.add.reduce(acc))) and \
                not all(np.isfinite(acc[b:b + FEDAVG_BLOCK]).all() for b in range(0, total, FEDAVG_BLOCK)):
            blame_non_finite(([base_file] if base_file else []) + list(files), float_keys)

        layout = [(key, first[key].dtype, first[key].shape) for key in order]
        with _Writer(out, layout, merged_metadata(files[0], "fedavg", n)) as writer:
            source = _Mapped(base_file if base_file is not None else files[0]) if len(float_keys) < len(order) else None
            try:
                for key in order:
                    info = first[key]
                    if info.dtype not in _FLOATS:   # copied as they are (e.g. BatchNorm's counters)
                        start = source.f.tensors[key].start
                        writer.write_bytes(memoryview(source.buf[start:start + info.nbytes]))
                        continue
                    merged = merged_view(key)
                    for b in range(0, merged.size, FEDAVG_BLOCK):
                        if merged.dtype == _NP[info.dtype]:   # already in the file's dtype: as it is
                            writer.write_bytes(memoryview(merged[b:b + FEDAVG_BLOCK]).cast("B"))
                        else:
                            writer.write(_from_np(merged[b:b + FEDAVG_BLOCK], info.torch_dtype))
            finally:
                if source is not None:
                    source.close()
            writer.commit()

        to_merged: list[float | None] = [None] * n
        if distances:
            for i, f in enumerate(files):
                mapped = _Mapped(f)
                try:
                    to_merged[i] = sq_distance(mapped.array, merged_view)
                finally:
                    mapped.close()
                bytes_read += float_bytes
                progress((n + i + 1) / (n * passes), "measuring distances to the merged model")
        merged_to_base = sq_distance(merged_view, base_map.array) if base_map is not None else None
    finally:
        if base_map is not None:
            base_map.close()

    return Measures(weight_used=shares, bytes_read=bytes_read,
                    update_sq=update_sq if base_file is not None else None,
                    clip_scales=scales if clip_norm is not None else None,
                    to_merged_sq=to_merged if distances else None, merged_to_base_sq=merged_to_base)
