"""Which device a training job runs on, and at which precision: one rule for every plugin.

The worker may give a job a device of its own (``ctx.device``, e.g. ``"cuda:1"``, from its
``devices`` setting); without one the job takes a GPU if there is one, else the CPU. On a GPU
training runs in bf16 mixed precision, fp16 where bf16 is missing; on a CPU in full precision
(mixed precision there is slower and no smaller).

torch is imported inside the functions, never at module import: `dvm_core` does not import
torch, and the worker loads every plugin at start while only a running job needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations only
    import torch


def choose_device(requested: str | None) -> torch.device:
    """The device the worker gave this job (`requested`), else a GPU if there is one, else the
    CPU. A device torch does not know is the provider's configuration error, said plainly."""
    import torch

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


__all__ = ["choose_device", "precision_for"]
