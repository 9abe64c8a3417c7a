"""Which device a training job runs on, and at which precision: one rule for every plugin.

The worker may give a job a device of its own (``ctx.device``, e.g. ``"cuda:1"``, from its
``devices`` setting); without one the job takes a GPU if there is one, else the CPU. A slot may
name several GPUs, ``"cuda:0,1"``, for jobs that train in several processes (one per GPU,
`dvm_core.launch` shows the children only those); a job training in the worker's process
takes the first of them. On a GPU
training runs in bf16 mixed precision, fp16 where bf16 is missing; on a CPU in full precision
(mixed precision there is slower and no smaller).

torch is imported inside the functions, never at module import: `dvm_core` does not import
torch, and the worker loads every plugin at start while only a running job needs it.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations only
    import torch


def gpu_indices(device: str | None) -> list[int] | None:
    """The GPU numbers a device slot names: ``"cuda:1"`` → [1], ``"cuda:0,1"`` → [0, 1]; None
    for no device, a bare ``"cuda"``, the CPU or anything else."""
    if not device:
        return None
    kind, _, numbers = device.partition(":")
    parts = [part.strip() for part in numbers.split(",")]
    if kind.strip() != "cuda" or not all(part.isdigit() for part in parts):
        return None
    return [int(part) for part in parts]


def gpus_given(device: str | None) -> int:
    """How many GPUs a job given `device` may use: those its slot names, else every GPU of the
    machine (no slot, a bare ``"cuda"``), none on the CPU."""
    indices = gpu_indices(device)
    if indices is not None:
        return len(indices)
    if device and device.split(":")[0] != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def choose_device(requested: str | None) -> torch.device:
    """The device the worker gave this job (`requested`; of a slot of several GPUs, the first),
    else a GPU if there is one, else the CPU. A device torch does not know is the provider's
    configuration error, said plainly."""
    import torch

    indices = gpu_indices(requested)
    if indices is not None:
        requested = f"cuda:{indices[0]}"
    if requested:
        try:
            return torch.device(requested)
        except (RuntimeError, ValueError):
            raise RuntimeError(f"the worker gave this job an unknown device {requested!r}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_for(device: torch.device | str) -> str:
    """Accelerate's ``mixed_precision`` for `device`: ``"bf16"`` on a GPU that supports it,
    ``"fp16"`` on an older GPU, ``"no"`` on a CPU."""
    import torch

    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


__all__ = ["choose_device", "deterministic_algorithms", "gpu_indices", "gpus_given", "precision_for"]


# --- deterministic algorithms ------------------------------------------------------------------

_determinism_lock = threading.Lock()
_determinism_users = 0
_determinism_before: tuple | None = None


@contextmanager
def deterministic_algorithms():
    """Deterministic algorithms on while at least one job trains that must replay bit for bit
    (the image classifier, always; LLM fine-tuning with a training transcript); the process's
    previous settings come back after the last one (the switches are process-wide)."""
    import torch

    global _determinism_users, _determinism_before
    with _determinism_lock:
        if _determinism_users == 0:
            _determinism_before = (torch.are_deterministic_algorithms_enabled(),
                                   torch.is_deterministic_algorithms_warn_only_enabled(),
                                   torch.utils.deterministic.fill_uninitialized_memory)
            # cuBLAS is deterministic only with a fixed workspace; this takes effect if cuBLAS is
            # not initialised yet in this process (else the warn_only warning says so).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            # In deterministic mode PyTorch also fills every new tensor with NaN, a debugging
            # aid that cost 10% of a CPU step here; results are the same without it.
            torch.utils.deterministic.fill_uninitialized_memory = False
        _determinism_users += 1
    try:
        yield
    finally:
        with _determinism_lock:
            _determinism_users -= 1
            if _determinism_users == 0 and _determinism_before is not None:
                enabled, warn_only, fill = _determinism_before
                torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
                torch.utils.deterministic.fill_uninitialized_memory = fill
