"""An LLM fine-tuning's training transcript, and the replay of one of its segments (issue 17).

The image classifier's design (`dvm_image_classifier.transcript`), for kind 5751: with param
``checkpoint_every`` = k, training (`train.train`, one process) writes a checkpoint every k
optimizer steps and at the end, as a safetensors file (never a pickle: a verifier loads
checkpoints it did not write) holding what a resumption needs:

- ``model/<name>``: the *trainable* parameters only, by their names in the training model (for
  LoRA the adapter's ``…lora_A.default.weight``, for ``method=full`` every weight); the frozen
  base is the base model's, which the verifier loads itself and checks by its sha256;
- ``optim/<i>/<name>``: AdamW's moments and step count per parameter; the metadata: its param
  groups and the learning-rate schedule's state.

No RNG state is stored: the order of the examples is drawn from ``random.Random(seed)`` epoch by
epoch (`train.plan`, `train.epoch_groups`), and step s's dropout from
``torch.manual_seed(train.step_seed(seed, s))``, so a replay derives both. The transcript lists
the sha256 of the trainable weights (`weights_sha256`) and of the whole state (`state_sha256`)
at each checkpoint; the worker signs it as a Nostr event (`dvm_core.jobs.Artifact.signed`).
A checkpoint at step s is the state in which step s + 1 starts; the last one is the returned
adapter or model (`result_weights` names the returned file's tensors' digest).

`replay` re-executes steps [a, b) from the checkpoint at a with the functions `train.train`
uses. On a CPU with the same thread count an honest segment replays bit for bit.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import mmap
import os
import platform
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy
import torch

from dvm_core import JobInputError
from dvm_core.transcripts import (  # noqa: F401 - one verdict for every format
    compare, distance, entry_at, segment_end, segments, state_distance)

FORMAT = "dvm-llm-finetune-transcript/1"
CHECKPOINT_FORMAT = "dvm-llm-finetune-checkpoint/1"
MAX_CHECKPOINTS = 64       # checkpoints one job may write (each is an artifact)
ORDER = ("epoch e's batches: the e-th draw of data.epoch_batches from random.Random(seed) (epoch 0 "
         "drawn first), over the training examples in file order after the held-out split; "
         "gradient_accumulation_steps batches an optimizer step")
DROPOUT = "optimizer step s (0-based) draws its dropout after torch.manual_seed(train.step_seed(seed, s))"


# The digest is defined as the image classifier's (dvm_image_classifier.transcript; plugins do
# not import each other), the distance and the verdict are the core's (dvm_core.transcripts).

def tensor_digest(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    """sha256 of named tensors (sorted by name: name, dtype, shape and raw bytes each) and of
    `meta` as canonical JSON: the same values give the same digest on any machine."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        head, raw = _head_and_bytes(tensors[name])
        h.update(name.encode() + head)
        h.update(raw)
    if meta is not None:
        h.update(_canonical(meta))
    return h.hexdigest()


def _head_and_bytes(t: torch.Tensor):
    """What `tensor_digest` hashes for one tensor after its name: dtype and shape, then its raw
    bytes as a buffer (a view, not a copy, for a contiguous tensor in memory)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.detach().cpu().contiguous()
    head = _head(t.dtype, t.shape)
    try:
        raw = t.detach().numpy().reshape(-1).view(numpy.uint8)
    except TypeError:           # a dtype numpy lacks (bfloat16, float8): reinterpret in torch
        raw = t.detach().reshape(-1).view(torch.uint8).numpy()
    return head, raw


def _both_digests(raw: dict, meta: dict) -> tuple[str, str]:
    """(weights_sha256, state_sha256) of tensors given as name → `_head_and_bytes`: both in one
    pass, since the ``model/`` keys sort in the same order with their prefix as without."""
    weights, state = hashlib.sha256(), hashlib.sha256()
    for key in sorted(raw):
        head, data = raw[key]
        state.update(key.encode() + head)
        state.update(data)
        if key.startswith("model/"):
            weights.update(key[len("model/"):].encode() + head)
            weights.update(data)
    state.update(_canonical(meta))
    return weights.hexdigest(), state.hexdigest()


@functools.lru_cache(maxsize=4096)
def _head(dtype: torch.dtype, shape: torch.Size) -> bytes:
    return f"\0{dtype}\0{list(shape)}\0".encode()


def _canonical(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def examples_digest(examples) -> str:
    """sha256 of the tokenized examples trained on (token ids, which tokens are targets, where
    each example starts), in order."""
    from . import data as datamod

    examples = datamod.Examples.of(examples)
    h = hashlib.sha256()
    # As if hashing the three arrays whole; the token arrays are read piece by piece (they
    # may be in a file, larger than memory should hold).
    for name, dtype, shape in (("ids", "<i4", (examples.tokens,)), ("trained", "|b1", (examples.tokens,)),
                               ("starts", examples.starts.dtype.str, examples.starts.shape)):
        h.update(f"{name}\0{dtype}\0{shape}\0".encode())
        for chunk in ([examples.starts] if name == "starts" else examples.chunks(name)):
            h.update(chunk.tobytes())
    return h.hexdigest()


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class Checkpoint:
    """One resumable state: flat tensors (``model/…``, ``optim/<i>/…``) and JSON metadata."""

    def __init__(self, step: int, tensors: dict[str, torch.Tensor], meta: dict):
        self.step, self.tensors, self.meta = step, tensors, meta

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {k[len("model/"):]: v for k, v in self.tensors.items() if k.startswith("model/")}

    def weights_sha256(self) -> str:
        return tensor_digest(self.weights)

    def state_sha256(self) -> str:
        return tensor_digest(self.tensors, self.meta)

    def digests(self) -> tuple[str, str]:
        """(`weights_sha256()`, `state_sha256()`) in one pass over the tensors."""
        return _both_digests({k: _head_and_bytes(v) for k, v in self.tensors.items()}, self.meta)

    @classmethod
    def capture(cls, step: int, model, optimizer, scheduler, *, to_cpu: bool = True) -> "Checkpoint":
        """The state now. On a CPU the tensors are the live ones, not copies: save or hash the
        checkpoint before training goes on. `to_cpu=False` leaves them where they are (for a
        `CheckpointWriter`, which copies them straight into its buffer)."""
        def held(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu") if to_cpu else t.detach()

        tensors = {f"model/{k}": held(v) for k, v in trainable_parameters(model).items()}
        opt = optimizer.state_dict()
        for index, state in opt["state"].items():
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    value = torch.tensor(value)
                tensors[f"optim/{index}/{name}"] = held(value)
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        return cls(step, tensors, {"format": CHECKPOINT_FORMAT, "step": step, "param_groups": groups,
                                   "scheduler": sched})

    def save(self, path: Path) -> Path:
        """A safetensors file. Written through numpy where every dtype has a numpy twin (the same
        bytes as safetensors.torch writes, with less work per tensor), else through torch."""
        import safetensors.numpy
        import safetensors.torch

        metadata = {"dvm": json.dumps(self.meta, sort_keys=True)}
        try:
            arrays = {k: v.contiguous().numpy() for k, v in self.tensors.items()}
        except TypeError:       # bfloat16 or another dtype numpy lacks
            safetensors.torch.save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path),
                                        metadata=metadata)
        else:
            safetensors.numpy.save_file(arrays, str(path), metadata=metadata)
        return path

    def save_and_digest(self, path: Path) -> tuple[str, str]:
        """`save(path)`, then `digests()`, in one pass over the tensors and with no copy of them:
        the digests are taken from the tensors' own bytes, and the file (the bytes
        `CheckpointWriter` writes, with the header padded to 8 bytes only) is written from them
        with ``writev``. For a dtype safetensors cannot name, `save` and `digests`."""
        if any(t.dtype not in SAFETENSORS_DTYPES for t in self.tensors.values()):
            self.save(path)
            return self.digests()
        raw = {k: _head_and_bytes(v) for k, v in self.tensors.items()}
        digests = _both_digests(raw, self.meta)
        layout = _file_layout(_layout_key(self.tensors))
        parts = [layout.tight_header(self.meta)]
        parts += [raw[name][1] for name, (begin, end) in layout.offsets.items() if end > begin]
        _write_parts(path, parts)
        return digests

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        """Read a checkpoint file, or raise JobInputError: it is someone else's file."""
        import json

        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["dvm"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
            raise JobInputError(f"not a checkpoint of an LLM fine-tuning ({str(exc)[:200]})") from None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT \
                or not isinstance(meta.get("step"), int) or meta["step"] < 0:
            raise JobInputError(f"not a checkpoint of an LLM fine-tuning (format {CHECKPOINT_FORMAT}, a step)")
        return cls(meta["step"], tensors, meta)

    def restore(self, model, optimizer, scheduler) -> None:
        """Put this state into objects freshly built from the transcript's params. Only what
        training accumulates comes from the file (the trainable weights, the optimizer's
        moments); the hyperparameters (learning rate, schedule, weight decay) come from the
        objects, i.e. the transcript: a checkpoint cannot smuggle another learning rate in."""
        own = trainable_parameters(model)
        weights = self.weights
        if set(own) != set(weights) or any(own[k].shape != weights[k].shape for k in own):
            missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
            raise JobInputError("the checkpoint's weights do not fit this model's trainable parameters "
                                f"(missing {missing[:3]}, unexpected {extra[:3]}, or other shapes)")
        try:
            with torch.no_grad():
                for name, p in own.items():
                    p.copy_(weights[name].to(p.dtype))
            state: dict[int, dict] = {}
            for key, value in self.tensors.items():
                if key.startswith("optim/"):
                    _, index, name = key.split("/", 2)
                    state.setdefault(int(index), {})[name] = value
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": state, "param_groups": groups})
            inner = getattr(scheduler, "scheduler", scheduler)   # Accelerate's wrapper, or the scheduler
            inner.last_epoch, inner._step_count = self.step, self.step + 1
            # What LambdaLR.get_lr computes at this step, the same arithmetic.
            inner._last_lr = [base * fn(self.step) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
            for group, lr in zip(optimizer.param_groups, inner._last_lr):
                group["lr"] = lr
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise JobInputError(f"the checkpoint does not fit this model or optimizer ({str(exc)[:200]})") from None


# safetensors' names of the dtypes a checkpoint may hold (safetensors/src/tensor.rs).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
ALIGN = 4096     # direct I/O: buffer address, file offset and length in multiples of this


class _Layout:
    """Where each tensor of a checkpoint goes in a `CheckpointWriter`'s buffer: a safetensors file
    whose header is padded with spaces to `room` bytes (a multiple of `ALIGN`, so that the data
    starts on a page), then the tensors by descending item size and name (as safetensors orders
    them, every tensor aligned to its item size)."""

    def __init__(self, tensors: dict[str, torch.Tensor] | tuple, room: int):
        self.key = _layout_key(tensors) if isinstance(tensors, dict) else tensors
        order = sorted(self.key, key=lambda e: (-e[1].itemsize, e[0]))
        self.offsets: dict[str, tuple[int, int]] = {}
        parts, at = [], 0
        for name, dtype, shape in order:
            size = math.prod(shape) * dtype.itemsize
            self.offsets[name] = (at, at + size)
            parts.append(f'{json.dumps(name)}:{{"dtype":"{SAFETENSORS_DTYPES[dtype]}","shape":'
                         f'{json.dumps(list(shape), separators=(",", ":"))},"data_offsets":[{at},{at + size}]}}')
            at += size
        self.tensors_json = ",".join(parts)
        self.data = at
        self.room = room
        self.size = -(-(room + at) // ALIGN) * ALIGN

    def header(self, meta: dict) -> bytes | None:
        """The header (with its length in front, padded), or None when it does not fit `room`."""
        raw = self._header_json(meta)
        return _framed(raw, self.room - 8) if 8 + len(raw) <= self.room else None

    def tight_header(self, meta: dict) -> bytes:
        """The header padded to a multiple of 8 bytes only, as safetensors pads it (whatever
        `room` is: a cached layout is shared by threads and never changed)."""
        raw = self._header_json(meta)
        return _framed(raw, -(-len(raw) // 8) * 8)

    def _header_json(self, meta: dict) -> bytes:
        metadata = json.dumps({"dvm": json.dumps(meta, sort_keys=True)}, separators=(",", ":"))
        return (f'{{"__metadata__":{metadata}' + (f",{self.tensors_json}}}" if self.tensors_json else "}")).encode()


def _framed(header: bytes, size: int) -> bytes:
    """A safetensors header: its length (`size`, little-endian u64), then the JSON padded with
    spaces to that length."""
    return size.to_bytes(8, "little") + header + b" " * (size - len(header))


def _layout_key(tensors: dict[str, torch.Tensor]) -> tuple:
    return tuple((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())


@functools.lru_cache(maxsize=4)
def _file_layout(key: tuple) -> _Layout:
    """The layout of `Checkpoint.save_and_digest`'s files: every checkpoint of a job has the
    same tensors, so it is worked out once (read only: jobs in other threads share it)."""
    return _Layout(key, ALIGN)


class CheckpointWriter:
    """Saves checkpoints of training on a GPU while training goes on. The loop only waits for
    each checkpoint's copy from the device into one reused, page-aligned host buffer laid out as
    its safetensors file; a background thread (the host's cores are idle while the GPU trains)
    then takes the digests (`Checkpoint.digests`') from the buffer and writes the file with
    direct I/O (``O_DIRECT``: no page cache filled with checkpoints, almost no CPU). `write`
    waits for the previous checkpoint first; `close` waits for the last one and frees the buffer.

    The files are valid safetensors files whose header is padded with spaces so that the data
    starts on a page; `Checkpoint.load` reads them. Where direct I/O is refused (tmpfs on older
    kernels, other systems) the same bytes go through the page cache.

    For a checkpoint on a CUDA device the buffer is page-locked (``cudaHostRegister``, as
    torch.distributed.checkpoint's stager pins its own), so that the copies from the device go
    to it by DMA, queued one after the other, with one wait at the end; where the driver
    refuses, they go through CUDA's staging buffer as before. `pin` forces it on or off."""

    def __init__(self, *, pin: bool | None = None):
        self.pin = pin
        self.pinned = False         # the buffer is page-locked now
        self._pinned_at = 0
        self._layout: _Layout | None = None
        self._buffer: mmap.mmap | None = None
        self._slots: dict[str, torch.Tensor] = {}
        self._hashed: list[tuple[bytes, bytes | None, memoryview]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.cpu_seconds = 0.0      # spent by the background thread
        self.direct = hasattr(os, "O_DIRECT")

    def write(self, point: Checkpoint, path: Path) -> Future:
        """Start saving `point` to `path`: a future of its (weights_sha256, state_sha256). It
        returns once the tensors are copied: training may change them."""
        self.wait()
        if any(t.dtype not in SAFETENSORS_DTYPES for t in point.tensors.values()):
            cpu = Checkpoint(point.step, {k: v.detach().cpu() for k, v in point.tensors.items()}, point.meta)
            cpu.save(path)
            return _done(cpu.digests())
        layout = self._layout
        header = layout.header(point.meta) if layout is not None and layout.key == _layout_key(point.tensors) \
            else None
        if header is None:
            layout = self._arrange(point)
            header = layout.header(point.meta)
        self._buffer[:layout.room] = header
        queued = set()      # devices with copies still queued (into the page-locked buffer)
        try:
            with torch.no_grad():
                for name, t in point.tensors.items():
                    slot = self._slots.get(name)
                    if slot is not None:
                        later = self.pinned and t.device.type == "cuda"
                        slot.copy_(t, non_blocking=later)
                        if later:
                            queued.add(t.device)
        finally:    # the copies are done before training may change the tensors (or the buffer goes)
            for device in queued:
                torch.cuda.current_stream(device).synchronize()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending = self._pool.submit(self._save, path, layout.room + layout.data, _canonical(point.meta))
        return self._pending

    def _digests(self, meta: bytes) -> tuple[str, str]:
        """Both digests in one pass over the buffer (`Checkpoint.digests`' definition)."""
        weights, state = hashlib.sha256(), hashlib.sha256()
        for state_head, weights_head, raw in self._hashed:
            state.update(state_head)
            state.update(raw)
            if weights_head is not None:
                weights.update(weights_head)
                weights.update(raw)
        state.update(meta)
        return weights.hexdigest(), state.hexdigest()

    def _arrange(self, point: Checkpoint) -> _Layout:
        """A layout (and a buffer, if the old one is too small) for tensors of these names,
        dtypes and shapes, with 1 KiB to spare in the header for metadata that grows."""
        bare = _Layout(point.tensors, ALIGN)
        need = 8 + len(bare.tensors_json) + len(json.dumps(json.dumps(point.meta, sort_keys=True))) + 1024
        layout = _Layout(point.tensors, -(-need // ALIGN) * ALIGN)
        if self._buffer is None or len(self._buffer) < layout.size:
            self._release()
            self._buffer = mmap.mmap(-1, layout.size)
            devices = {t.device for t in point.tensors.values() if t.device.type == "cuda"}
            if self.pin or (self.pin is None and devices):
                self._page_lock(next(iter(devices), None))
        self._slots, self._hashed = {}, []
        view = memoryview(self._buffer)
        for name, dtype, shape in layout.key:
            begin, end = layout.offsets[name]
            if end > begin:
                self._slots[name] = torch.frombuffer(self._buffer, dtype=dtype, count=math.prod(shape),
                                                     offset=layout.room + begin).view(shape)
        for name, dtype, shape in sorted(layout.key):
            begin, end = layout.offsets[name]
            head = _head(dtype, torch.Size(shape))
            weights_head = (name[len("model/"):].encode() + head) if name.startswith("model/") else None
            self._hashed.append((name.encode() + head, weights_head,
                                 view[layout.room + begin:layout.room + end]))
        self._layout = layout
        return layout

    def _save(self, path: Path, total: int, meta: bytes) -> tuple[str, str]:
        """In the background thread: the digests, then the file."""
        started = time.thread_time()
        try:
            digests = self._digests(meta)
            view = memoryview(self._buffer)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            if self.direct:     # whole pages from the page-aligned buffer, cut to size after
                try:
                    _write_file(path, flags | os.O_DIRECT, view[:-(-total // ALIGN) * ALIGN], total)
                    return digests
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct = False    # this file system refuses direct I/O: the page cache
            _write_file(path, flags, view[:total], total)
            return digests
        finally:
            self.cpu_seconds += time.thread_time() - started

    def wait(self) -> None:
        """Wait for the checkpoint being saved; raise what went wrong saving it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last checkpoint, stop the thread and free the buffer."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self._release()

    def _page_lock(self, device: torch.device | None) -> None:
        """Page-lock the buffer for copies from a GPU (portable: for every device); where that
        fails, go on without. The CUDA runtime keeps its last error per thread, and torch's next
        kernel launch in the thread would raise a failed registration's: so it is asked in a
        thread of its own."""
        address = torch.frombuffer(self._buffer, dtype=torch.uint8, count=1).data_ptr()
        size = len(self._buffer)

        def register() -> bool:
            if device is not None:
                torch.cuda.set_device(device)
            return int(torch.cuda.cudart().cudaHostRegister(address, size, CUDA_HOST_REGISTER_PORTABLE)) == 0
        try:
            self.pinned = _in_a_thread(register)
        except Exception:   # noqa: BLE001 - no CUDA runtime in this build, or none that answers
            self.pinned = False
        self._pinned_at = address

    def _release(self) -> None:
        self._slots, self._hashed, self._layout = {}, [], None
        if self.pinned:     # before the buffer is freed
            self.pinned, address = False, self._pinned_at
            _in_a_thread(lambda: torch.cuda.cudart().cudaHostUnregister(address))
        if self._buffer is not None:
            try:
                self._buffer.close()
            except BufferError:     # a view still held somewhere: the collector frees it
                pass
            self._buffer = None


CUDA_HOST_REGISTER_PORTABLE = 1    # cudaHostRegisterPortable


def _in_a_thread(call):
    """`call()` in a new thread, its result or its exception here."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cuda-host-register") as pool:
        return pool.submit(call).result()


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _write_file(path: Path, flags: int, data: memoryview, size: int) -> None:
    """Write `data` to `path` (opened with `flags`), then cut the file to `size` bytes if longer;
    the descriptor is closed whatever fails."""
    fd = os.open(path, flags, 0o644)
    try:
        longer = len(data) > size
        while data:
            data = data[os.write(fd, data):]
        if longer:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _write_parts(path: Path, parts: list) -> None:
    """Write buffers one after the other to a new `path` with ``writev`` (as many as the system
    takes a call); the descriptor is closed whatever fails."""
    views = [v for v in (memoryview(part).cast("B") for part in parts) if len(v)]
    batch = 1024
    if hasattr(os, "sysconf"):
        batch = max(1, min(os.sysconf("SC_IOV_MAX"), batch))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        i = 0
        while i < len(views):
            written = os.writev(fd, views[i:i + batch])
            if written <= 0:
                raise OSError(errno.EIO, f"writing {path} made no progress")
            while i < len(views) and written >= len(views[i]):
                written -= len(views[i])
                i += 1
            if written:
                views[i] = views[i][written:]
    finally:
        os.close(fd)


class Recorder:
    """Called by `train.train`: `start` once the steps are planned, `checkpoint` every `every`
    steps (before step s + 1, s a multiple of `every`) and at the end, each saved in
    `directory` and listed with its digests.

    Training on a GPU saves its checkpoints in the background (a `CheckpointWriter`); training
    on the CPU saves and hashes them in the loop, since there the cores a background thread would
    use are training (measured: a background writer cost a CPU job as much or more). `background`
    forces one or the other."""

    def __init__(self, every: int, directory: Path, *, background: bool | None = None):
        self.every = every
        self.directory = directory
        self.background = background
        self.entries: list[dict] = []
        self.files: list[Path] = []
        self.layout = None
        self.writer: CheckpointWriter | None = None
        self._digests: list[Future] = []
        self.loop_seconds = 0.0   # spent in the training loop on checkpoints
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def seconds(self) -> float:
        """The transcript's cost to training: the time the loop spent on checkpoints, and the
        CPU time of the thread saving them in the background, if any (counted in full, as if it
        competed with training for the cores)."""
        return self.loop_seconds + (self.writer.cpu_seconds if self.writer is not None else 0.0)

    def start(self, layout) -> None:
        """Refuse a checkpoint_every that would write more than `MAX_CHECKPOINTS` files."""
        wanted = layout.planned // self.every + 2
        if wanted > MAX_CHECKPOINTS:
            least = math.ceil(layout.planned / (MAX_CHECKPOINTS - 2))
            raise JobInputError(f"param checkpoint_every {self.every} would write {wanted} checkpoints over "
                                f"{layout.planned} steps; at most {MAX_CHECKPOINTS}: send {least} or more")
        self.layout = layout

    def checkpoint(self, step: int, model, optimizer, scheduler, *, final: bool = False,
                   stopped: str | None = None) -> None:
        """Save the state before step `step` + 1. The files and the entries' digests are complete
        once the final checkpoint is saved."""
        started = time.perf_counter()
        point = Checkpoint.capture(step, model, optimizer, scheduler, to_cpu=False)
        background = self.background
        if background is None:
            background = any(t.device.type != "cpu" for t in point.tensors.values())
        path = self.directory / f"checkpoint-{step:07d}.safetensors"
        if self.entries and self.entries[-1]["step"] == step:   # the end fell on a k-th step
            self.entries.pop()
            self.files.pop()
            self._digests.pop()
        entry = {"step": step, "weights_sha256": None, "state_sha256": None, "file": path.name}
        if final:
            entry["final"] = True
            entry["stopped"] = stopped
        self.entries.append(entry)
        self.files.append(path)
        if background:
            if self.writer is None:
                self.writer = CheckpointWriter()
            self._digests.append(self.writer.write(point, path))
        else:
            if self.writer is not None:
                self.writer.wait()
            point = Checkpoint(step, {k: v.to("cpu") for k, v in point.tensors.items()}, point.meta)
            self._digests.append(_done(point.save_and_digest(path)))
        if final and self.writer is not None:
            self.writer.close()
        for entry, digests in zip(self.entries, self._digests):
            if entry["state_sha256"] is None and digests.done():
                entry["weights_sha256"], entry["state_sha256"] = digests.result()
        self.loop_seconds += time.perf_counter() - started

    def abandon(self, error: BaseException) -> None:
        """Training stopped on `error` (cancelled, NaN, out of memory, out of time) before the
        final checkpoint: wait for the checkpoint being written, stop the writer's thread and
        free its buffer. A failure of the writer is added to `error` as a note, not raised over
        it."""
        if self.writer is None:
            return
        try:
            self.writer.close()
        except Exception as exc:    # noqa: BLE001 - `error` is what the job reports
            error.add_note(f"and saving a checkpoint failed: {type(exc).__name__}: {exc}")


def versions() -> dict:
    """The code the result depends on: these numbers must match for a bit-identical replay."""
    from . import __version__

    found = {name: _version(name) for name in ("transformers", "peft", "tokenizers", "accelerate", "numpy")}
    return {"dvm_llm_finetune": __version__, "torch": torch.__version__, **found,
            "python": platform.python_version(), "machine": platform.machine()}


def _version(name: str) -> str:
    """A library's version, without importing it for that alone (peft, for full fine-tuning,
    would take 0.1-1.5 s of a job's time just to say its number)."""
    module = sys.modules.get(name)
    if getattr(module, "__version__", None):
        return module.__version__
    from importlib.metadata import version

    return version(name)


def build(*, recorder: Recorder, params, base, datasets: dict, train_examples, outcome, result_weights: dict,
          retention_days: float) -> dict:
    """The transcript's JSON (what the worker signs)."""
    layout = recorder.layout
    return {
        "format": FORMAT,
        "versions": versions(),
        "device": outcome.device, "threads": outcome.threads, "mixed_precision": outcome.mixed_precision,
        "deterministic": True,
        "tolerance": 0.0 if outcome.device == "cpu" else None,
        "seed": params.seed,
        "params": params.as_dict(),
        "base_model": {"source": base.source, "model_type": base.model_type, "parameters": base.parameters,
                       "weights_sha256": base.weights_sha256, "base_dtype": outcome.extra.get("base_dtype")},
        "target_modules": outcome.target_modules,
        "trainable_parameters": outcome.trainable_parameters,
        "data": {"sha256": datasets["train"]["sha256"], "format": datasets["train"]["format"],
                 "train_examples_sha256": examples_digest(train_examples), "train_examples": len(train_examples),
                 "eval": datasets["eval"], "order": ORDER},
        "dropout": DROPOUT,
        "steps_per_epoch": layout.steps_per_epoch,
        "planned_steps": layout.planned,
        "warmup_steps": layout.warmup,
        "checkpoint_every": recorder.every,
        "checkpoints": recorder.entries,
        "checkpoints_kept_days": retention_days,
        "result_weights": result_weights,
    }


def params_from(transcript: dict):
    from .params import FinetuneParams

    try:
        return FinetuneParams.from_dict(dict(transcript.get("params") or {}))
    except (TypeError, ValueError) as exc:
        raise JobInputError(f"the transcript's params are not this plugin's ({exc})") from None


def _spec(transcript: dict, model_folder: Path, trust_remote_code: bool):
    from .train import TrainSpec

    return TrainSpec(model_folder=str(model_folder), model_type=str(transcript["base_model"]["model_type"]),
                     base_model_name="", params=transcript["params"], output_dir="",
                     trust_remote_code=trust_remote_code)


def replay(transcript: dict, start: Checkpoint, model_folder: Path, train_examples, tokenizer, stop: int,
           device: torch.device | None = None, trust_remote_code: bool = False,
           check_cancelled=lambda: None) -> Checkpoint:
    """Re-execute steps [start.step, stop) of the training the transcript describes, on the
    tokenized `train_examples`, from `start`, and return the state reached."""
    from dvm_core.devices import deterministic_algorithms
    from dvm_core.devices import choose_device

    from . import train as T

    params = params_from(transcript)
    final = transcript["checkpoints"][-1]
    a = start.step
    if not 0 <= a < stop <= final["step"]:
        raise JobInputError(f"steps [{a}, {stop}) are not within the transcript's 0-{final['step']}")
    if len(train_examples) != int(transcript["data"]["train_examples"]):
        raise JobInputError(f"the data gives {len(train_examples)} training examples; the transcript says "
                            f"{transcript['data']['train_examples']}")
    device = device or choose_device(None)
    pad_id = tokenizer.pad_token_id
    with deterministic_algorithms():
        accelerator = T.make_accelerator(device, False)
        precision = accelerator.mixed_precision if accelerator.device.type == device.type else "no"
        model, _, _ = T.prepare_model(_spec(transcript, model_folder, trust_remote_code), params, tokenizer,
                                      precision)
        model.to(device)
        with accelerator.autocast():
            isolate = T.positions_isolate(model, device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        layout = T.plan(train_examples, params, pad_id)
        if (layout.planned, layout.steps_per_epoch) != (transcript.get("planned_steps"),
                                                         transcript.get("steps_per_epoch")):
            # Before any step: a replay would otherwise run the steps the data gives, then fail.
            raise JobInputError(f"the transcript plans {transcript.get('planned_steps')} steps, "
                                f"{transcript.get('steps_per_epoch')} an epoch; its params on this data plan "
                                f"{layout.planned}, {layout.steps_per_epoch} an epoch")
        optimizer, scheduler = T.make_optimizer(trainable, params, layout)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        start.restore(accelerator.unwrap_model(model), optimizer, scheduler)
        model.train()
        gas = params.gradient_accumulation_steps
        step = 0
        for epoch in range(params.epochs):
            mine = T.epoch_groups(layout, epoch, train_examples, params, pad_id)
            for first in range(0, len(mine), gas):
                if step >= stop:
                    break
                if step >= a:
                    check_cancelled()
                    T.optimizer_step(accelerator, model, mine[first:first + gas], device, isolate,
                                     layout.mean_step_tokens, trainable, params, optimizer, scheduler, step)
                step += 1
            if step >= stop:
                break
        if step < stop:
            raise JobInputError(f"the transcript's params plan {step} steps, fewer than its checkpoints' {stop}")
        return Checkpoint.capture(stop, accelerator.unwrap_model(model), optimizer, scheduler)


def seeded_start(transcript: dict, model_folder: Path, tokenizer, trust_remote_code: bool = False) -> Checkpoint:
    """The state at step 0 that the seed and the base model determine: the trainable weights as
    `train.train` starts (LoRA drawn after ``torch.manual_seed(seed)``; for full, the base's),
    no optimizer state."""
    from . import train as T

    params = params_from(transcript)
    model, _, _ = T.prepare_model(_spec(transcript, model_folder, trust_remote_code), params, tokenizer, "no")
    tensors = {f"model/{k}": v.detach().clone() for k, v in trainable_parameters(model).items()}
    return Checkpoint(0, tensors, {})


# --- the job's side: a recorder when asked for, the transcript and checkpoints as result files --

def recorder_for(ctx, params) -> Recorder | None:
    """The transcript's recorder when param checkpoint_every asks for one (`params` refused it
    already where training is not in this process)."""
    return Recorder(params.checkpoint_every, ctx.workdir / "checkpoints") if params.checkpoint_every else None


def write(out: Path, recorder: Recorder, *, params, base, datasets: dict, train_examples, outcome,
          retention_days: float) -> tuple[list, dict]:
    """transcript.json (signed by the worker) and the checkpoints, as result files; and the
    summary for the result's content."""
    import json

    from safetensors.torch import load_file

    from dvm_core import Artifact

    result_weights = {name: tensor_digest(load_file(str(out / name)))
                      for name in outcome.files if name.endswith(".safetensors")}
    record = build(recorder=recorder, params=params, base=base, datasets=datasets, train_examples=train_examples,
                   outcome=outcome, result_weights=result_weights, retention_days=retention_days)
    path = out / "transcript.json"
    path.write_text(json.dumps(record, indent=1))
    artifacts = [Artifact(path, "application/json", "transcript.json", signed=True)] + \
        [Artifact(f, "application/octet-stream", f.name, keep_days=retention_days) for f in recorder.files]
    summary = {"checkpoint_every": recorder.every, "checkpoints": len(recorder.entries),
               "final_step": recorder.entries[-1]["step"],
               "final_weights_sha256": recorder.entries[-1]["weights_sha256"]}
    return artifacts, summary
