"""The chunked merger (`_Merger`) of the robust methods: median, trimmed mean, Krum, clipping."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .lora import is_lora_key
from .safetensors_io import _DTYPES, _FLOATS, CHUNK_ELEMENTS, _Buffer, _chunks, _from_np, _Writer

ROBUST_CHUNK_ELEMENTS = 1 << 16   # median / trimmed mean


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


class _Merger:
    def __init__(self, files, base, weights, method, k, keep, clip_norm, progress, check_cancelled):
        self.files, self.base, self.weights = files, base, weights
        self.method, self.k, self.keep, self.clip_norm = method, k, keep, clip_norm
        self.progress = progress or (lambda fraction, message: None)
        self.check = check_cancelled or (lambda: None)
        self.n = len(files)
        first = files[0].tensors
        self.order = sorted(first, key=lambda key: first[key].start)
        self.float_keys = [key for key in self.order if first[key].dtype in _FLOATS and not is_lora_key(key)]
        self.acc = torch.float64 if any(first[key].dtype == "F64" for key in self.float_keys) else torch.float32
        self.total = sum(first[key].numel for key in self.float_keys)
        item = max((_DTYPES[t.dtype].itemsize for t in first.values()), default=4)
        # Two sets of read buffers: one being read by the prefetching thread, one being merged.
        self.bufs = [[_Buffer(CHUNK_ELEMENTS * item) for _ in range(self.n + 1)] for _ in range(2)]
        self.tmp = torch.empty(CHUNK_ELEMENTS, dtype=self.acc)
        self.merged_buf = torch.empty(CHUNK_ELEMENTS, dtype=self.acc)
        self.bytes_read = 0
        self.scales = [1.0] * self.n

    def _read_all(self, key, begin, count, which=0):
        bufs = self.bufs[which]
        xs = [f.read(key, begin, count, bufs[i]) for i, f in enumerate(self.files)]
        b = self.base.read(key, begin, count, bufs[self.n]) if self.base else None
        self.bytes_read += count * self.files[0].tensors[key].torch_dtype.itemsize * (self.n + (b is not None))
        return xs, b

    def _stream(self, keys: list[str], size: int = CHUNK_ELEMENTS):
        """(key, begin, count, xs, base chunk) for every chunk of `keys`, the next chunk read by a
        thread while the caller merges this one: pread copies from the page cache on one core
        while torch computes on the other."""
        tasks = list(_chunks(keys, self.files, size))
        if not tasks:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="merge-read") as pool:
            pending = pool.submit(self._read_all, *tasks[0], 0)
            for j, task in enumerate(tasks):
                xs, b = pending.result()
                if j + 1 < len(tasks):   # into the other buffer set: the caller is done with it
                    pending = pool.submit(self._read_all, *tasks[j + 1], (j + 1) % 2)
                yield (*task, xs, b)

    def _tick(self, done: int, start: float, span: float, message: str) -> None:
        self.check()
        self.progress(start + span * done / max(1, self.total), message)

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
        done = 0
        for key, begin, count, xs, b in self._stream(self.float_keys):
            b = _as_np(b, self.acc)
            for i, x in enumerate(xs):
                sq[i] += _dist2(x, b, self.tmp)
            done += count
            self._tick(done, start, span, "measuring update norms")
        return sq

    def pairwise(self, start, span) -> torch.Tensor:
        """Squared distances between every two (clipped) inputs, one pass."""
        d2 = torch.zeros(self.n, self.n, dtype=torch.float64)
        done = 0
        for key, begin, count, xs, b in self._stream(self.float_keys):
            xs = self._clipped([_as_np(x, self.acc) for x in xs], None if b is None else _as_np(b, self.acc))
            for i in range(self.n):
                for j in range(i + 1, self.n):
                    d2[i, j] += _dist2(xs[i], xs[j], self.tmp)
            done += count
            self._tick(done, start, span, "measuring distances between inputs")
        return d2 + d2.T

    def combine(self, writer: _Writer, coefs: list[float] | None, base_coef: float, start, span):
        """Write the merged floating-point tensors (and copy the others); per-input squared
        distances to the merged model and to the base, and the merged model's to the base."""
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
        stream = self._stream(self.float_keys, chunk)   # in the same order as the loop below
        done = 0
        for key in self.order:
            info = self.files[0].tensors[key]
            if key not in float_set:
                if is_lora_key(key):
                    continue   # written by the LoRA stacking
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
                    rows = self._clipped([_as_np(x, self.acc) for x in xs], bf)
                    values = _sorted_values(rows)
                    if self.method == "median":
                        mid = n // 2
                        lo, hi = (values[mid], values[mid]) if n % 2 else (values[mid - 1], values[mid])
                        merged = hi if n % 2 else (lo + hi) * 0.5
                        for i, x in enumerate(rows):   # supplied the median: one of the middle values
                            picked[i] += np.count_nonzero((x >= lo) & (x <= hi))
                    else:
                        merged = values[self.k].copy()
                        for v in values[self.k + 1:n - self.k]:
                            merged += v
                        merged /= n - 2 * self.k
                        lo, hi = values[self.k], values[n - self.k - 1]
                        for i, x in enumerate(rows):   # trimmed: outside the kept values
                            picked[i] += np.count_nonzero((x < lo) | (x > hi))
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
                self._tick(done, start, span, "merging")
        stream.close()
        return to_merged, to_base, merged_to_base, picked
