"""Deterministic algorithms while a training job that must replay bit for bit runs.

`torch.use_deterministic_algorithms` is process-wide: the jobs that need it (the image
classifier, always; LLM fine-tuning with a training transcript) share one counter, and the
process's previous settings come back after the last of them.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_users = 0
_before: tuple | None = None


@contextmanager
def deterministic_algorithms():
    """Deterministic algorithms on while at least one job trains; the process's previous
    settings come back after the last one (the switches are process-wide)."""
    import torch

    global _users, _before
    with _lock:
        if _users == 0:
            _before = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled(),
                       torch.utils.deterministic.fill_uninitialized_memory)
            # cuBLAS is deterministic only with a fixed workspace; this takes effect if cuBLAS is
            # not initialised yet in this process (else the warn_only warning says so).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            # In deterministic mode PyTorch also fills every new tensor with NaN, a debugging
            # aid that cost 10% of a CPU step here; results are the same without it.
            torch.utils.deterministic.fill_uninitialized_memory = False
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _before is not None:
                enabled, warn_only, fill = _before
                torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
                torch.utils.deterministic.fill_uninitialized_memory = fill
