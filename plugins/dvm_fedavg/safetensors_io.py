"""Reading and writing safetensors without the library: a JSON header, then raw arrays.

The header is parsed with safetensors' own limits and checked (offsets inside the file, no two
tensors overlapping) before any value is read, so a hostile file fails as a `MergeError`
naming it. `_File.read` copies a range of a tensor's values with ``pread`` (no mmap here: the
page cache never counts against the process); `_Writer` streams a file whose header is known up
front and commits it atomically. No pickle is ever loaded. Shared by both merge engines.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .checks import MergeError

CHUNK_ELEMENTS = 1 << 18          # values per input read at once: 1 MB of fp32, stays in cache
MAX_HEADER_BYTES = 100 << 20      # safetensors' own limit
BASE_HASH_KEY = "base_sha256"     # the metadata key by which an update names its base

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_FLOATS = {"F64", "F32", "F16", "BF16"}


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

    @property
    def order(self) -> list[str]:
        """The tensor names in the order of their data in the file: the order merges read and write."""
        return sorted(self.tensors, key=lambda key: self.tensors[key].start)

    @property
    def float_keys(self) -> list[str]:
        """The floating-point tensors, in file order: the ones a merge combines (the others are copied)."""
        return [key for key in self.order if self.tensors[key].dtype in _FLOATS]

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


def _chunks(keys: list[str], files: list[_File], size: int = CHUNK_ELEMENTS):
    """(key, begin, count) over the tensors `keys`, `size` values at a time."""
    for key in keys:
        n = files[0].tensors[key].numel
        for begin in range(0, n, size):
            yield key, begin, min(size, n - begin)


# --- finding the input at fault ------------------------------------------------------------------

def check_finite(values: torch.Tensor, f: _File, key: str) -> None:
    """MergeError naming `f` and its tensor `key` if `values`, read from it, hold NaN or Inf."""
    if not torch.isfinite(values).all():
        raise MergeError(f"{f.what}: tensor {key!r} holds NaN or Inf values", f.index)


def find_non_finite(candidates: list[_File], keys: list[str]) -> None:
    """Raise MergeError naming the first of `candidates` holding NaN or Inf in the tensors `keys`;
    return if none does (a non-finite result then came from finite inputs: an overflow). A
    second read: the engines look here only when a sum or a distance came out non-finite."""
    opened = [f for f in candidates if f.fd is None]   # FedAvg maps its inputs: no descriptor open
    for f in opened:
        f.open()
    try:
        buf = _Buffer(CHUNK_ELEMENTS * 8)
        for f in candidates:
            for key, begin, count in _chunks(keys, [f]):
                check_finite(f.read(key, begin, count, buf), f, key)
    finally:
        for f in opened:
            f.close()


def blame_non_finite(candidates: list[_File], keys: list[str]) -> NoReturn:
    """A merged value is not finite: MergeError naming the first of `candidates` holding NaN or
    Inf, else one saying that finite inputs overflowed."""
    find_non_finite(candidates, keys)
    raise MergeError("the merged values overflow the dtype (inputs with extreme values)")


# --- writing ------------------------------------------------------------------------------------

def merged_metadata(first: _File, method: str, n: int) -> dict[str, str]:
    """The merged file's metadata: input 0's, less its `BASE_HASH_KEY` (the merged model was not
    trained from that base: it is the next one), plus how it was made."""
    metadata = {k: v for k, v in first.metadata.items() if k != BASE_HASH_KEY}
    metadata.update({"format": metadata.get("format", "pt"), "merge_method": method, "merged_inputs": str(n)})
    return metadata


def _from_np(merged: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The merged chunk in the output dtype, rounded to nearest."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(merged).to(dtype)
    return torch.from_numpy(merged.astype(torch.empty(0, dtype=dtype).numpy().dtype, copy=False))


class _Writer:
    """Writes a safetensors file whose header is known up front, data streamed in order. As a
    context manager it removes the partial file unless `commit` was reached."""

    def __init__(self, out: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for key, dtype, shape in layout:
            nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned, as safetensors writes it
        self.out = out
        self.tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.part")
        self.committed = False
        self.fh = open(self.tmp, "wb")
        self.fh.write(len(raw).to_bytes(8, "little") + raw)
        self.size = 8 + len(raw) + offset

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            self.abort()

    def write(self, tensor: torch.Tensor) -> None:
        self.fh.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))

    def write_bytes(self, data) -> None:
        self.fh.write(data)

    def copy(self, source: _File, key: str, buf: _Buffer) -> None:
        """Tensor `key` of `source` (open) as it is, chunk by chunk through `buf`."""
        for _key, begin, count in _chunks([key], [source]):
            self.write(source.read(key, begin, count, buf))

    def commit(self) -> None:
        # Atomic, not durable: no fsync (0.3 s per 400 MB); a result lost to a power cut is redone.
        self.fh.close()
        if self.tmp.stat().st_size != self.size:
            raise RuntimeError(f"wrote {self.tmp.stat().st_size} bytes, expected {self.size}")
        os.replace(self.tmp, self.out)
        self.committed = True

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)
