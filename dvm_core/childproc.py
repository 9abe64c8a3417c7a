"""A job's work in a child process group: for plugins whose training runs under a launcher
(``accelerate launch``, torchrun) in processes of their own.

`run_process_group` starts the command in a new session (its own process group), hands each
line the children print on stdout to a callback (progress, as `json_lines` parses it), and
polls the job's cancellation (the customer's, the deadline's, a shutdown's). When that raises,
the whole group is stopped (SIGTERM, then SIGKILL after `grace` seconds) before the error goes
on, so no training process outlives its job. Pure subprocess work: no torch here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

KILL_GRACE_S = 5.0
# The worker's secrets never reach a child that runs a customer's job (and its code, a model's
# or a chat template's): the identity key, systemd's credentials.
SECRET_VARIABLES = ("DVM_PRIVATE_KEY", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                    "WATCHDOG_PID")


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` without the worker's secrets (SECRET_VARIABLES)."""
    return {k: v for k, v in env.items() if k not in SECRET_VARIABLES}


def run_process_group(cmd: list[str], *, cwd: Path, env: dict[str, str], stderr_path: Path,
                      check_cancelled: Callable[[], None], on_line: Callable[[str], None] = lambda line: None,
                      grace: float = KILL_GRACE_S, on_kill: Callable[[], None] | None = None,
                      poll: float = 0.1) -> int:
    """Run `cmd` to its end and return its exit code; its stderr goes to `stderr_path`. If
    `check_cancelled` raises, stop the group (then call `on_kill`, for processes that left the
    group) and re-raise."""
    env = child_environment(env)
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(cwd), start_new_session=True)
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, on_line), daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                check_cancelled()
                time.sleep(poll)
        except BaseException:
            kill_process_group(proc, grace)
            if on_kill is not None:
                on_kill()
            raise
        finally:
            reader.join(5)
    return proc.returncode


def kill_process_group(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group of `proc`, SIGKILL it after `grace` seconds; wait for `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    try:  # also any grandchild still alive in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def json_lines(prefix: str, callback: Callable[[dict], None]) -> Callable[[str], None]:
    """An `on_line` that passes the JSON object after `prefix` on a line to `callback` and
    ignores every other line (and malformed ones: progress is never worth a crash)."""
    def on_line(line: str) -> None:
        if line.startswith(prefix):
            try:
                item = json.loads(line[len(prefix):])
                callback(item)
            except (ValueError, KeyError, TypeError):
                pass
    return on_line


def _read_lines(stream, on_line: Callable[[str], None]) -> None:
    for raw in stream:
        on_line(raw.decode("utf-8", "replace").strip())


__all__ = ["run_process_group", "kill_process_group", "json_lines", "KILL_GRACE_S"]
