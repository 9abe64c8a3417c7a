"""Merging models from federated clients, streamed: FedAvg and robust aggregators.

`merge_files` reads N safetensors files (and optionally the base model they were trained from)
chunk by chunk and writes the merged ``model.safetensors`` atomically. It never holds N models,
nor even one: every method walks the tensors in chunks of `CHUNK_ELEMENTS` values, reading the
same chunk of every input with ``pread`` (no mmap, so the page cache never counts against the
process), combining them and writing the result's chunk before the next. Peak memory is a few
megabytes of buffers over the interpreter's, whatever N and the model's size. Distances to the
merged model and update norms are computed in the same pass, from the chunks already in cache.
A thread reads the next chunk while the current one is merged; the arithmetic is numpy's,
single-threaded (torch's OpenMP on 1 MB chunks stalls on busy cores).

Methods (`METHODS`):

- ``fedavg``: the weighted mean Σ wᵢxᵢ / Σ wᵢ (McMahan et al. 2017); wᵢ = the input's number
  of training examples. One pass.
- ``median``: the coordinate-wise median (the mean of the two middle values for even N), and
- ``trimmed_mean``: per coordinate, drop the ⌊trim_ratio·N⌋ largest and smallest values and
  average the rest (Yin et al. 2018). Both are unweighted, as published: a weight cannot buy a
  client more say against a coordinate-wise robust rule. One pass.
- ``krum`` / ``multi_krum``: score each input by the sum of its squared distances to its
  N − f − 2 nearest neighbours, keep the m lowest (m = 1 for krum, default N − f for
  multi_krum) and take their weighted mean (Blanchard et al. 2017). Needs N > 2f + 2. Two
  passes: pairwise distances accumulated chunk by chunk, then the mean of the kept inputs.
- ``clip_norm`` (any method; needs a base): each update uᵢ = xᵢ − base is scaled to an L2 norm of
  at most clip_norm (over all floating-point tensors) before merging. One extra pass for norms.

Tensors that are not floating point (e.g. BatchNorm's ``num_batches_tracked``) are copied from
the base if given, else from input 0.

LoRA adapters (PEFT safetensors whose keys hold ``lora_A``/``lora_B``): averaging A and B
separately is wrong (the mean of products is not the product of means), so `fedavg` stacks them
(FLoRA, Wang et al. 2024): A' = [A₁; …; A_N] along the rank, B' = [p₁B₁ | … | p_N B_N] with
pᵢ = wᵢ / Σw, so B'A' = Σ pᵢ BᵢAᵢ exactly. The adapter's rank becomes r·N; to keep its scaling
α/r, its ``lora_alpha`` must become α·N too: `stacked_adapter_config` rewrites an
``adapter_config.json`` that way. The robust methods, `clip_norm` and a base are refused for
adapters (MergeError): they are not defined on factor pairs.

Validation, each failure a `MergeError` naming the input (index and name): unreadable or invalid
safetensors, different tensor names, shapes or dtypes (inputs and base), NaN or Inf anywhere, a
weight that is not a positive finite number, too few inputs for the method, and a base mismatch:
an update whose safetensors metadata names ``base_sha256`` must name the base's sha256 (given as
`base_sha256`, else computed from the `base` file), and updates naming a base must agree.

No pickle is ever loaded: the safetensors header is JSON, the data raw little-endian arrays.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.linalg import blas   # axpy: FedAvg's one pass per input (imported once, with the plugin)

from dvm_core.datarefs import sha256_file

from .checks import METHODS, MergeError, check_method, check_weights

__all__ = ["METHODS", "MergeError", "MergeReport", "merge_files", "stacked_adapter_config",
           "is_lora_key", "read_header", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 18          # values per input read at once: 1 MB of fp32, stays in cache
ROBUST_CHUNK_ELEMENTS = 1 << 16   # median / trimmed mean
LEAVE_OUT_METHODS = ("median", "trimmed_mean", "krum", "multi_krum")   # merge around a bad input
MAX_HEADER_BYTES = 100 << 20      # safetensors' own limit
BASE_HASH_KEY = "base_sha256"     # the metadata key by which an update names its base

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_FLOATS = {"F64", "F32", "F16", "BF16"}


@dataclass
class MergeReport:
    """What a merge did, for ``merge_report.json``.

    `inputs`: one dict per input, in order: index, name, weight (as given), weight_used (its
    share of the merged model; None for the unweighted coordinate-wise methods), update_norm
    (‖xᵢ − base‖, with a base), clip_scale, distance_to_merged (‖xᵢ − merged‖), and per method
    krum_score / selected, or trimmed_fraction / median_fraction (share of coordinates where the
    input was trimmed / supplied the median). `excluded`: index, name, reason.
    """

    method: str
    inputs: list[dict]
    excluded: list[dict]
    params: dict = field(default_factory=dict)
    base: dict | None = None
    merged_distance_to_base: float | None = None
    tensors: int = 0
    parameters: int = 0
    copied_tensors: list[str] = field(default_factory=list)
    lora: dict | None = None
    bytes_read: int = 0
    output_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def is_lora_key(key: str) -> bool:
    return "lora_A" in key or "lora_B" in key or "lora_embedding_A" in key or "lora_embedding_B" in key


# --- reading safetensors without a library: a JSON header, then raw arrays --------------------

@dataclass(frozen=True)
class _Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int   # absolute offset of its first byte in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


class _File:
    """One safetensors file, its header checked; `read` copies a range of a tensor's values."""

    def __init__(self, path: Path, label: str, index: int | None):
        self.path, self.label, self.index = Path(path), label, index
        self.fd: int | None = None
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                self.tensors, self.metadata = _parse_header(fh, self.size)
        except MergeError as exc:
            raise MergeError(f"{self.what} is not a valid safetensors file: {exc}", index) from None
        except OSError as exc:
            raise MergeError(f"{self.what} cannot be read: {exc.strerror or exc}", index) from None

    @property
    def what(self) -> str:
        return f"input {self.index} ({self.label})" if self.index is not None else f"the base model ({self.label})"

    def open(self) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self, key: str, begin: int, count: int, buf: "_Buffer") -> torch.Tensor:
        """Values begin..begin+count of tensor `key` (flattened), in its dtype, in `buf`."""
        info = self.tensors[key]
        item = info.torch_dtype.itemsize
        nbytes = count * item
        view = buf.bytes(nbytes)
        offset, done = info.start + begin * item, 0
        while done < nbytes:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise MergeError(f"{self.what} is shorter than its header says", self.index)
            done += got
        return buf.tensor[:nbytes].view(info.torch_dtype)


class _Buffer:
    """A reusable byte buffer seen both as a torch tensor and as a writable memoryview."""

    def __init__(self, nbytes: int):
        self.tensor = torch.empty(max(nbytes, 8), dtype=torch.uint8)
        self._view = memoryview(self.tensor.numpy())

    def bytes(self, nbytes: int) -> memoryview:
        if nbytes > len(self._view):
            self.__init__(nbytes)
        return self._view[:nbytes]


def _parse_header(fh, size: int) -> tuple[dict[str, _Tensor], dict[str, str]]:
    if size < 8:
        raise MergeError("the file is shorter than 8 bytes")
    n = int.from_bytes(fh.read(8), "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise MergeError(f"its header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(fh.read(n))
    except (UnicodeDecodeError, ValueError):
        raise MergeError("its header is not JSON") from None
    except RecursionError:   # "[[[[…]]]]" nested deeper than Python's stack
        raise MergeError("its header nests JSON too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise MergeError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergeError("its __metadata__ is not a map of strings")
    tensors: dict[str, _Tensor] = {}
    data_start = 8 + n
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise MergeError(f"tensor {key!r} has a malformed header entry")
        if dtype not in _DTYPES:
            raise MergeError(f"tensor {key!r} has dtype {str(dtype)[:20]!r}; supported: {', '.join(_DTYPES)}")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
            raise MergeError(f"tensor {key!r} has data offsets [{begin}, {end}] that do not match its "
                             f"shape {shape} and dtype {dtype} within the file")
        tensors[key] = _Tensor(dtype, tuple(shape), data_start + begin, nbytes)
    spans = sorted((t.start, t.start + t.nbytes) for t in tensors.values() if t.nbytes)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise MergeError("two tensors overlap in the file")
    return tensors, dict(metadata)


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensors (name → dtype, shape) and metadata of a safetensors file, from its header."""
    f = _File(Path(path), Path(path).name, None)
    return ({k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in f.tensors.items()}, f.metadata)


class _Writer:
    """Writes a safetensors file whose header is known up front, data streamed in order."""

    def __init__(self, out: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.expected = []
        for key, dtype, shape in layout:
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned, as safetensors writes it
        self.out = out
        self.tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.part")
        self.fh = open(self.tmp, "wb")
        self.fh.write(len(raw).to_bytes(8, "little") + raw)
        self.size = 8 + len(raw) + offset

    def write(self, tensor: torch.Tensor) -> None:
        self.fh.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))

    def write_bytes(self, data) -> None:
        self.fh.write(data)

    def commit(self) -> None:
        # Atomic, not durable: no fsync (0.3 s per 400 MB); a result lost to a power cut is redone.
        self.fh.close()
        if self.tmp.stat().st_size != self.size:
            raise RuntimeError(f"wrote {self.tmp.stat().st_size} bytes, expected {self.size}")
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


# --- checks before any data is read ---------------------------------------------------------------

def _check_same_architecture(files: list[_File], base: _File | None) -> None:
    ref = files[0]
    for other in ([base] if base else []) + files[1:]:
        missing = sorted(set(ref.tensors) - set(other.tensors))
        extra = sorted(set(other.tensors) - set(ref.tensors))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} tensor(s) of {ref.what} ({', '.join(missing[:3])}"
                             f"{', …' if len(missing) > 3 else ''})")
            if extra:
                parts.append(f"has {len(extra)} tensor(s) {ref.what} lacks ({', '.join(extra[:3])}"
                             f"{', …' if len(extra) > 3 else ''})")
            raise MergeError(f"{other.what} is not the same architecture: it {' and '.join(parts)}", other.index)
        for key, t in ref.tensors.items():
            o = other.tensors[key]
            if o.shape != t.shape:
                raise MergeError(f"{other.what}: tensor {key!r} has shape {list(o.shape)} but {ref.what} "
                                 f"has {list(t.shape)} (not the same architecture)", other.index)
            if o.dtype != t.dtype:
                raise MergeError(f"{other.what}: tensor {key!r} is {o.dtype} but in {ref.what} it is "
                                 f"{t.dtype}; send every model in the same dtype", other.index)


def _check_base_hash(files: list[_File], base: _File | None, base_sha256: str | None) -> str | None:
    named = [(f, f.metadata[BASE_HASH_KEY].strip().lower()) for f in files if f.metadata.get(BASE_HASH_KEY)]
    expected = base_sha256.strip().lower() if base_sha256 else None
    if base is not None and (named or expected):
        actual = sha256_file(base.path)
        if expected and actual != expected:
            raise MergeError(f"{base.what} has sha256 {actual}, not the expected base {expected}")
        expected = actual
    for f, h in named:
        if expected is None:
            expected = h   # no base given: the updates must at least agree with each other
        elif h != expected:
            raise MergeError(f"{f.what} was trained from base {h[:16]}…, not from {expected[:16]}… "
                             f"(its metadata {BASE_HASH_KEY})", f.index)
    return expected


# --- the passes -----------------------------------------------------------------------------------

def _chunks(keys: list[str], files: list[_File], size: int = CHUNK_ELEMENTS):
    """(key, begin, count) over the floating-point tensors, `size` values at a time."""
    for key in keys:
        n = files[0].tensors[key].numel
        for begin in range(0, n, size):
            yield key, begin, min(size, n - begin)


def _as_np(x, acc: torch.dtype) -> np.ndarray:
    """A chunk as a numpy array: a view for the dtypes numpy has, a float copy for bf16."""
    if isinstance(x, np.ndarray):
        return x
    if x.dtype == torch.bfloat16:
        return x.to(acc).numpy()
    return x.numpy()


def _from_np(merged: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The merged chunk in the output dtype, rounded to nearest."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(merged).to(dtype)
    return torch.from_numpy(merged.astype(torch.empty(0, dtype=dtype).numpy().dtype, copy=False))


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
                for begin in range(0, info.numel, CHUNK_ELEMENTS):
                    count = min(CHUNK_ELEMENTS, info.numel - begin)
                    writer.write(source.read(key, begin, count, copy_buf))
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

    def find_non_finite(self, candidates: list[_File]) -> None:
        """Raise MergeError naming the first file (of `candidates`) holding NaN or Inf."""
        buf = _Buffer(CHUNK_ELEMENTS * 8)
        for f in candidates:
            for key, begin, count in _chunks(self.float_keys, [f]):
                if not torch.isfinite(f.read(key, begin, count, buf)).all():
                    raise MergeError(f"{f.what}: tensor {key!r} holds NaN or Inf values", f.index)


def stacked_adapter_config(config: dict, n: int) -> dict:
    """The ``adapter_config.json`` of N LoRA adapters stacked by `merge_files`: rank r·N and
    lora_alpha scaled so that the adapter's scaling (α/r, or α/√r with rsLoRA) is unchanged."""
    out = dict(config)
    factor = math.sqrt(n) if out.get("use_rslora") else n
    out["r"] = int(out.get("r", 8)) * n
    out["lora_alpha"] = float(out.get("lora_alpha", 8)) * factor
    if out["lora_alpha"].is_integer():
        out["lora_alpha"] = int(out["lora_alpha"])
    for name, scale in (("rank_pattern", n), ("alpha_pattern", factor)):
        if out.get(name):
            out[name] = {k: (int(v * scale) if float(v * scale).is_integer() else v * scale)
                         for k, v in out[name].items()}
    return out


def _lora_pairs(files: list[_File]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module, checked: pairs complete, ranks consistent."""
    tensors = files[0].tensors
    pairs = []
    for key in sorted(tensors):
        if "magnitude" in key:
            raise MergeError(f"{files[0].what}: tensor {key!r} is a DoRA magnitude vector; DoRA adapters "
                             "cannot be merged exactly (send plain LoRA adapters)", files[0].index)
        for a_name, b_name in (("lora_embedding_A", "lora_embedding_B"), ("lora_A", "lora_B")):
            if a_name in key:
                b_key = key.replace(a_name, b_name)
                if b_key not in tensors:
                    raise MergeError(f"{files[0].what}: LoRA tensor {key!r} has no matching {b_key!r}",
                                     files[0].index)
                a, b = tensors[key], tensors[b_key]
                rank_dim = 0
                if len(a.shape) < 1 or len(b.shape) < 2 or a.shape[rank_dim] != b.shape[1]:
                    raise MergeError(f"{files[0].what}: LoRA pair {key!r} {list(a.shape)} / {b_key!r} "
                                     f"{list(b.shape)} do not share a rank", files[0].index)
                if a.dtype not in _FLOATS:
                    raise MergeError(f"{files[0].what}: LoRA tensor {key!r} is {a.dtype}", files[0].index)
                pairs.append((key, b_key))
                break
        else:
            if ("lora_B" in key or "lora_embedding_B" in key) and \
                    key.replace("lora_embedding_B", "lora_embedding_A").replace("lora_B", "lora_A") not in tensors:
                raise MergeError(f"{files[0].what}: LoRA tensor {key!r} has no matching A", files[0].index)
    return pairs


# --- the entry point -------------------------------------------------------------------------------

def merge_files(paths: Sequence[Path], weights: Sequence[float], out: Path, *, method: str = "fedavg",
                base: Path | None = None, trim_ratio: float = 0.1, f: int = 1, m: int | None = None,
                clip_norm: float | None = None, names: Sequence[str] | None = None,
                base_sha256: str | None = None,
                progress: Callable[[float, str], None] | None = None,
                check_cancelled: Callable[[], None] | None = None,
                distances: bool = False) -> MergeReport:
    """Merge the safetensors models at `paths` into `out` (written atomically) and report.

    FedAvg (not of LoRA adapters) reads one input at a time, memory-mapped, into one
    preallocated accumulator (`_fedavg_one_at_a_time`): each input is read once, or twice with
    a base (its update norm first, for the report and `clip_norm`). The other methods read a
    chunk of every input at a time (`_Merger`).

    :param weights: one per input, in order: its number of training examples (> 0). FedAvg and
        (multi-)Krum's mean use them; median and trimmed_mean are unweighted.
    :param method: one of `METHODS`.
    :param base: the global model the inputs were trained from: needed by `clip_norm`; gives
        update norms in the report; its non-float tensors are the ones copied.
    :param trim_ratio: trimmed_mean drops ⌊trim_ratio·N⌋ values at each end (0 ≤ r < 0.5, ≥ 1 value).
    :param f: Krum's number of Byzantine inputs tolerated (N > 2f + 2).
    :param m: inputs multi_krum keeps (default N − f).
    :param clip_norm: scale each update xᵢ − base to an L2 norm of at most this (needs `base`).
    :param names: labels of the inputs for messages and the report (default: the file names).
    :param base_sha256: the expected base hash: the base file must have it (if given), and an
        update whose metadata names ``base_sha256`` must name it.
    :param progress: called with (fraction 0-1, message) as the merge goes.
    :param check_cancelled: called between chunks; raise from it to stop (nothing is written).
    :param distances: FedAvg: also report each input's distance to the merged model, at the
        cost of a second read of every input (its update norm, with a base, comes free). The
        coordinate-wise methods and Krum always report them: they cost nothing there.
    :raises MergeError: naming the input at fault (`.index`), before writing anything.
    """
    # NaN/Inf are found and refused after the pass, naming the input: no numpy warnings meanwhile.
    with np.errstate(invalid="ignore", over="ignore"):
        if method not in LEAVE_OUT_METHODS:
            return _merge(paths, weights, out, method=method, base=base, trim_ratio=trim_ratio, f=f, m=m,
                          clip_norm=clip_norm, names=names, base_sha256=base_sha256, progress=progress,
                          check_cancelled=check_cancelled, distances=distances)
        # The robust methods exist to merge around bad inputs: one that cannot be read (NaN, a
        # wrong shape, not safetensors) is left out with its reason, as long as enough remain.
        paths = [Path(p) for p in paths]
        labels = [str(x) for x in names] if names is not None else [p.name for p in paths]
        if len(labels) == len(paths) == len(weights):
            check_weights(weights, labels)   # the customer's weights are not an input's fault
        keep, left_out = list(range(len(paths))), []
        while True:
            try:
                report = _merge([paths[i] for i in keep], [weights[i] for i in keep], out, method=method,
                                base=base, trim_ratio=trim_ratio, f=f, m=m, clip_norm=clip_norm,
                                names=[labels[i] for i in keep], base_sha256=base_sha256, progress=progress,
                                check_cancelled=check_cancelled, distances=distances)
            except MergeError as exc:
                if exc.index is None:   # the set, the base or the params: nothing to leave out
                    if left_out:
                        raise MergeError(f"{exc} (after leaving out "
                                         + "; ".join(f"{e['name']}: {e['reason']}" for e in left_out) + ")") from None
                    raise
                original = keep.pop(exc.index)
                left_out.append({"index": original, "name": labels[original], "reason": f"left out: {exc}"})
                continue
            for entry in report.inputs + report.excluded:
                if entry.get("index") is not None:
                    entry["index"] = keep[entry["index"]]
            report.excluded = left_out + report.excluded
            return report


def _merge(paths, weights, out, *, method, base, trim_ratio, f, m, clip_norm, names, base_sha256,
           progress, check_cancelled, distances) -> MergeReport:
    started = time.monotonic()
    paths = [Path(p) for p in paths]
    n = len(paths)
    if n == 0:
        raise MergeError("no inputs to merge")
    labels = [str(x) for x in names] if names is not None else [p.name for p in paths]
    if len(labels) != n:
        raise MergeError(f"{len(labels)} names for {n} inputs")
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} inputs: give one weight per input")
    weights = check_weights(weights, labels)
    k, keep = check_method(method, n, trim_ratio, f, m)
    if clip_norm is not None:
        if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
            raise MergeError(f"clip_norm must be a positive number, got {clip_norm!r}")
        if base is None:
            raise MergeError("clip_norm clips each update against the base model: send the base too")
    files = [_File(p, labels[i], i) for i, p in enumerate(paths)]
    base_file = _File(Path(base), Path(base).name, None) if base is not None else None
    _check_same_architecture(files, base_file)
    pairs = _lora_pairs(files)
    if pairs:
        if method != "fedavg":
            raise MergeError(f"these are LoRA adapters: {method} on separate A and B factors is not "
                             "defined (the factors of two adapters are not comparable); use fedavg, "
                             "which stacks them exactly")
        if base_file is not None or clip_norm is not None:
            raise MergeError("these are LoRA adapters: a base model and clip_norm do not apply to them "
                             "(their update is the adapter itself); send the adapters alone")
    expected_base = _check_base_hash(files, base_file, base_sha256)
    if method == "fedavg" and not pairs:
        return _fedavg_one_at_a_time(files, base_file, weights, Path(out), clip_norm=clip_norm,
                                     distances=distances, expected_base=expected_base, progress=progress,
                                     check_cancelled=check_cancelled, started=started)

    merger = _Merger(files, base_file, weights, method, k, keep, clip_norm, progress, check_cancelled)
    all_files = files + ([base_file] if base_file else [])
    for x in all_files:
        x.open()
    writer = None
    try:
        report_inputs = [{"index": i, "name": labels[i], "weight": weights[i]} for i in range(n)]
        excluded: list[dict] = []
        passes = 1 + (clip_norm is not None) + (method in ("krum", "multi_krum"))
        span, at = 1.0 / passes, 0.0
        if clip_norm is not None:
            sq = merger.update_norms(at, span)
            at += span
            if not torch.isfinite(sq).all():
                merger.find_non_finite([base_file] + files)
            for i, s2 in enumerate(sq.tolist()):
                norm = math.sqrt(s2)
                merger.scales[i] = min(1.0, clip_norm / norm) if norm > 0 else 1.0
                report_inputs[i]["clip_scale"] = merger.scales[i]

        coefs: list[float] | None = None
        base_coef = 0.0
        if method in ("fedavg", "krum", "multi_krum"):
            chosen = list(range(n))
            if method != "fedavg":
                d2 = merger.pairwise(at, span)
                at += span
                if not torch.isfinite(d2).all():
                    merger.find_non_finite(([base_file] if base_file else []) + files)
                neighbours = n - f - 2
                scores = []
                for i in range(n):
                    others = torch.cat([d2[i, :i], d2[i, i + 1:]])
                    scores.append(float(torch.sort(others).values[:neighbours].sum()))
                ranking = sorted(range(n), key=lambda i: (scores[i], i))
                chosen = sorted(ranking[:keep])
                cutoff = scores[ranking[keep - 1]]
                for i in range(n):
                    report_inputs[i]["krum_score"] = scores[i]
                    report_inputs[i]["selected"] = i in chosen
                for i in ranking[keep:]:
                    excluded.append({"index": i, "name": labels[i], "reason":
                                     f"Krum score {scores[i]:.6g} (sum of squared distances to its {neighbours} "
                                     f"nearest inputs) is higher than those of the {keep} kept "
                                     f"(the highest kept: {cutoff:.6g})"})
            total = sum(weights[i] for i in chosen)
            coefs = [0.0] * n
            for i in chosen:
                coefs[i] = weights[i] * merger.scales[i] / total
                base_coef += weights[i] * (1.0 - merger.scales[i]) / total
            for i in range(n):
                report_inputs[i]["weight_used"] = weights[i] / total if i in chosen else 0.0
        else:
            for i in range(n):
                report_inputs[i]["weight_used"] = None

        first = files[0].tensors
        layout, lora_info = [], None
        pair_of = {a: b for a, b in pairs}
        b_keys = set(pair_of.values())
        for key in merger.order:
            t = first[key]
            if key in pair_of:
                layout.append((key, t.dtype, (t.shape[0] * n,) + t.shape[1:]))
            elif key in b_keys:
                layout.append((key, t.dtype, (t.shape[0], t.shape[1] * n) + t.shape[2:]))
            else:
                layout.append((key, t.dtype, t.shape))
        metadata = {k_: v for k_, v in files[0].metadata.items() if k_ != BASE_HASH_KEY}
        metadata.update({"format": metadata.get("format", "pt"), "merge_method": method, "merged_inputs": str(n)})
        writer = _Writer(Path(out), layout, metadata)
        if pairs:
            lora_info = _write_lora_and_rest(merger, writer, pairs, coefs, layout, at, 1.0 - at)
            to_merged = to_base = picked = None
            merged_to_base = None
        else:
            to_merged, to_base, merged_to_base, picked = merger.combine(writer, coefs, base_coef, at, 1.0 - at)
            bad = [files[i] for i in range(n) if not math.isfinite(float(to_merged[i]) + float(to_base[i]))]
            if bad or (base_file and not math.isfinite(float(merged_to_base))):
                merger.find_non_finite(([base_file] if base_file else []) + bad)
                raise MergeError("the merged values overflow the dtype (inputs with extreme values)")
        writer.commit()
        writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        for x in all_files:
            x.close()

    for i in range(n):
        r = report_inputs[i]
        if to_merged is not None:
            r["distance_to_merged"] = math.sqrt(float(to_merged[i]))
        if base_file is not None:
            r["update_norm"] = math.sqrt(float(to_base[i]))
        if picked is not None and method in ("median", "trimmed_mean"):
            values = merger.total
            share = float(picked[i]) / max(1, values)
            if method == "trimmed_mean":
                r["trimmed_fraction"] = share
                if share >= 1.0 and values:
                    excluded.append({"index": i, "name": labels[i],
                                     "reason": "trimmed at every coordinate (always among the extremes)"})
            else:
                r["median_fraction"] = share
                if share == 0.0 and values:
                    excluded.append({"index": i, "name": labels[i],
                                     "reason": "never the median (or one of the two middle values) at any coordinate"})
    params = {"trim_ratio": trim_ratio, "trimmed_each_end": k} if method == "trimmed_mean" else {}
    if method in ("krum", "multi_krum"):
        params = {"f": f, "m": keep}
    if clip_norm is not None:
        params["clip_norm"] = clip_norm
    first = files[0].tensors
    return MergeReport(
        method=method, inputs=report_inputs, excluded=sorted(excluded, key=lambda e: e["index"]),
        params=params,
        base={"name": base_file.label, "sha256": expected_base} if base_file else (
            {"sha256": expected_base} if expected_base else None),
        merged_distance_to_base=math.sqrt(float(merged_to_base)) if merged_to_base is not None and base_file else None,
        tensors=len(first), parameters=sum(t.numel for t in first.values() if t.dtype in _FLOATS),
        copied_tensors=[key for key in merger.order if first[key].dtype not in _FLOATS],
        lora=lora_info, bytes_read=merger.bytes_read, output_bytes=Path(out).stat().st_size,
        seconds=round(time.monotonic() - started, 4))


def _write_lora_and_rest(merger: _Merger, writer: _Writer, pairs, coefs, layout, start, span) -> dict:
    """LoRA: stack A along the rank and B (scaled by each input's share) along the rank; average
    every other floating-point tensor; copy the rest. Adapters are small: one module's factors
    from all inputs at a time."""
    files, n = merger.files, merger.n
    pair_of = {a: b for a, b in pairs}
    a_of = {b: a for a, b in pairs}
    buf = _Buffer(CHUNK_ELEMENTS * 8)
    float_set = set(merger.float_keys)
    ranks = set()
    for key, dtype, _shape in layout:
        info = files[0].tensors[key]
        merger.check()

        def whole(f: _File) -> torch.Tensor:
            return f.read(key, 0, info.numel, buf).clone().view(info.shape)
        if key in pair_of:
            parts = [whole(f) for f in files]
            ranks.add(info.shape[0])
            for i, part in enumerate(parts):
                if not torch.isfinite(part).all():
                    raise MergeError(f"{files[i].what}: tensor {key!r} holds NaN or Inf values", i)
            writer.write(torch.cat(parts, dim=0))
        elif key in a_of:
            parts = []
            for i, f in enumerate(files):
                part = whole(f)
                if not torch.isfinite(part).all():
                    raise MergeError(f"{f.what}: tensor {key!r} holds NaN or Inf values", i)
                parts.append((part.to(merger.acc) * coefs[i]).to(part.dtype))
            writer.write(torch.cat(parts, dim=1))
        elif key in float_set:
            for begin in range(0, info.numel, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, info.numel - begin)
                xs, _ = merger._read_all(key, begin, count)
                merged = None
                for i, x in enumerate(xs):
                    if not torch.isfinite(x).all():
                        raise MergeError(f"{files[i].what}: tensor {key!r} holds NaN or Inf values", i)
                    merged = torch.mul(x.to(merger.acc), coefs[i]) if merged is None else merged.add_(x, alpha=coefs[i])
                writer.write(merged.to(info.torch_dtype))
        else:
            for begin in range(0, info.numel, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, info.numel - begin)
                writer.write(files[0].read(key, begin, count, buf))
        merger.progress(start + span, "stacking LoRA adapters")
    merger.bytes_read += sum(f.size for f in files)
    return {"modules": len(pairs), "rank_in": sorted(ranks), "rank_multiplier": n,
            "rank_out": sorted(r * n for r in ranks),
            "note": f"stacked (FLoRA): multiply the adapter's r and lora_alpha by {n} "
                    f"(see stacked_adapter_config), or use the adapter_config.json returned with it"}


# --- FedAvg: one input at a time ------------------------------------------------------------------

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
FEDAVG_CHUNK = 1 << 16   # values converted / compared at once: 256 KB of fp32, in cache
FEDAVG_BLOCK = 1 << 20   # values added per BLAS call; their pages are released after it


class _Mapped:
    """A safetensors file mapped read-only: tensors as numpy views, no copy. `close` unmaps it,
    so its pages leave this process's resident set (they stay in the page cache)."""

    def __init__(self, f: "_File"):
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


def _fedavg_one_at_a_time(files, base_file, weights, out: Path, *, clip_norm, distances, expected_base,
                          progress, check_cancelled, started) -> MergeReport:
    """Weighted FedAvg, streaming: input i is mapped, added into one preallocated accumulator
    (BLAS axpy, one pass) and unmapped before input i + 1, so memory stays at the accumulator
    plus the tensors being read (plus the base, when there is one, mapped once). With a base,
    each input's update norm ‖xᵢ − base‖ is measured first (clip_norm scales the update to it);
    with `distances`, a second read gives each input's distance to the merged model."""
    progress = progress or (lambda fraction, message: None)
    check = check_cancelled or (lambda: None)
    n = len(files)
    first = files[0].tensors
    order = sorted(first, key=lambda key: first[key].start)
    float_keys = [key for key in order if first[key].dtype in _FLOATS]
    acc_t = np.float64 if any(first[key].dtype == "F64" for key in float_keys) else np.float32
    axpy, dot = (blas.daxpy, blas.ddot) if acc_t == np.float64 else (blas.saxpy, blas.sdot)
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

    def non_finite(candidates) -> None:
        """Raise MergeError naming the first of `candidates` that holds NaN or Inf."""
        for c in candidates:
            c.open()
        try:
            _Merger(files, base_file, weights, "fedavg", 0, n, None, None, check_cancelled).find_non_finite(candidates)
        finally:
            for c in candidates:
                c.close()

    writer = None
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
                        non_finite([base_file, f])
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
            non_finite(([base_file] if base_file else []) + list(files))
            raise MergeError("the merged values overflow the dtype (inputs with extreme values)")

        layout = [(key, first[key].dtype, first[key].shape) for key in order]
        metadata = {k_: v for k_, v in files[0].metadata.items() if k_ != BASE_HASH_KEY}
        metadata.update({"format": metadata.get("format", "pt"), "merge_method": "fedavg",
                         "merged_inputs": str(n)})
        writer = _Writer(out, layout, metadata)
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
        writer = None

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
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if base_map is not None:
            base_map.close()

    report_inputs = []
    for i, f in enumerate(files):
        r = {"index": i, "name": f.label, "weight": weights[i], "weight_used": shares[i]}
        if update_sq[i] is not None:
            r["update_norm"] = math.sqrt(update_sq[i])
        if clip_norm is not None:
            r["clip_scale"] = scales[i]
        if to_merged[i] is not None:
            r["distance_to_merged"] = math.sqrt(to_merged[i])
        report_inputs.append(r)
    params = {"clip_norm": clip_norm} if clip_norm is not None else {}
    return MergeReport(
        method="fedavg", inputs=report_inputs, excluded=[], params=params,
        base={"name": base_file.label, "sha256": expected_base} if base_file else (
            {"sha256": expected_base} if expected_base else None),
        merged_distance_to_base=math.sqrt(merged_to_base) if merged_to_base is not None else None,
        tensors=len(first), parameters=total,
        copied_tensors=[key for key in order if first[key].dtype not in _FLOATS],
        bytes_read=bytes_read, output_bytes=out.stat().st_size, seconds=round(time.monotonic() - started, 4))
