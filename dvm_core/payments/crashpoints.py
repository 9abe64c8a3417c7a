"""Named places where a test kills the worker, to show that a crash there loses nothing.

`DVM_CRASH_AT=<name>` in the environment of `dvm run` makes the process SIGKILL itself the first
time it reaches `crashpoint(<name>)`: no `finally`, no flush, as a power cut or the OOM killer
would. Unset (always, outside tests), a crash point costs one comparison.
"""

from __future__ import annotations

import os
import signal
import sys

_AT = os.environ.get("DVM_CRASH_AT") or None


def crashpoint(name: str) -> None:
    if _AT is not None and name == _AT:
        sys.stderr.write(f"crash point {name}: killing the worker\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
