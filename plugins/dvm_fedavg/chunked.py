"""The chunked engine under the robust methods and LoRA stacking: the same chunk of every input.

Coordinate-wise rules (median, trimmed mean) and distances between inputs (Krum) need every
input's value of a coordinate at once, so `_ChunkReader` walks the tensors in chunks of
`CHUNK_ELEMENTS` values (or fewer), reading that chunk of every input and of the base with
``pread`` into two sets of reused buffers: a thread reads the next chunk into one while the
caller merges the other (`stream`; LoRA stacking, on small adapters, calls `read_all`). Memory is those 2·(N + 1) chunk buffers plus the caller's
temporaries per chunk, whatever the model's size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .safetensors_io import _DTYPES, CHUNK_ELEMENTS, _Buffer, _chunks, _File


class _ChunkReader:
    """Reads chunks of the tensors `keys` from every input (and the base); a context manager
    holding the files open. `bytes_read` counts what it read, for the report."""

    def __init__(self, files: list[_File], base: _File | None, keys: list[str],
                 progress: Callable[[float, str], None], check: Callable[[], None]):
        self.files, self.base = files, base
        self.progress, self.check = progress, check
        self.n = len(files)
        first = files[0].tensors
        self.order = files[0].order
        self.float_keys = keys
        self.acc = torch.float64 if any(first[key].dtype == "F64" for key in self.float_keys) else torch.float32
        self.total = sum(first[key].numel for key in self.float_keys)
        item = max((_DTYPES[t.dtype].itemsize for t in first.values()), default=4)
        # Two sets of read buffers: one being read by the prefetching thread, one being merged.
        self.bufs = [[_Buffer(CHUNK_ELEMENTS * item) for _ in range(self.n + 1)] for _ in range(2)]
        self.bytes_read = 0

    def __enter__(self) -> "_ChunkReader":
        for f in self.files + ([self.base] if self.base else []):
            f.open()
        return self

    def __exit__(self, *exc_info) -> None:
        for f in self.files + ([self.base] if self.base else []):
            f.close()

    def read_all(self, key, begin, count, which=0):
        """Values begin..begin+count of `key` from every input, and from the base (or None)."""
        bufs = self.bufs[which]
        xs = [f.read(key, begin, count, bufs[i]) for i, f in enumerate(self.files)]
        b = self.base.read(key, begin, count, bufs[self.n]) if self.base else None
        self.bytes_read += count * self.files[0].tensors[key].torch_dtype.itemsize * (self.n + (b is not None))
        return xs, b

    def stream(self, keys: list[str], size: int = CHUNK_ELEMENTS):
        """(key, begin, count, xs, base chunk) for every chunk of `keys`, the next chunk read by a
        thread while the caller merges this one: pread copies from the page cache on one core
        while numpy computes on the other."""
        tasks = list(_chunks(keys, self.files, size))
        if not tasks:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="merge-read") as pool:
            pending = pool.submit(self.read_all, *tasks[0], 0)
            for j, task in enumerate(tasks):
                xs, b = pending.result()
                if j + 1 < len(tasks):   # into the other buffer set: the caller is done with it
                    pending = pool.submit(self.read_all, *tasks[j + 1], (j + 1) % 2)
                yield (*task, xs, b)

    def measuring_pass(self, start: float, span: float, message: str):
        """(xs, base chunk) for every chunk of the floating-point tensors, progress reported
        after the caller has taken each: a pass that measures and writes nothing."""
        done = 0
        for _key, _begin, count, xs, b in self.stream(self.float_keys):
            yield xs, b
            done += count
            self.tick(done, start, span, message)

    def tick(self, done: int, start: float, span: float, message: str) -> None:
        """Check for cancellation; report `done` of `total` values as part of a pass."""
        self.check()
        self.progress(start + span * done / max(1, self.total), message)
