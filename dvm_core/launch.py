"""Training under ``accelerate launch``: both sides of the protocol between the worker's process
(the parent) and the training processes it launches (the children).

A plugin that trains in several processes (several GPUs, or DDP over gloo on CPUs), or in a
child it can kill, uses this module in both places; what is its own is what goes into the job's
folder, how the children train, and how it rebuilds its outcome.

The folder (one per job, e.g. ``ctx.workdir / "launch"``) holds every file of the protocol:

- ``job.json`` and any data files: written by the plugin before the launch; their content is
  the plugin's business. The path of ``job.json`` is the children's only argument.
- ``launch.log``: the children's stderr (all of them: Accelerate's and torchrun's logs, tracebacks).
- ``pid.<rank>``: each child's pid, written first thing (`start_child`). torchrun starts its
  workers in sessions of their own, outside the process group the parent kills; these files
  let the parent find them (`kill_job_processes`).
- ``outcome.json``: the main process's (rank 0) result, ``{"outcome": {...}}``, or its error,
  ``{"error": kind, "message": ...}`` (``kind`` ``"input"``: the customer's, others the
  plugin's own, e.g. ``"oom"``, ``"failed"``). ``outcome.<rank>.json``: another process's
  error. Each is written atomically (`write_outcome`), so the parent never reads half of one.

The parent (`run`, in the job's thread) clears the pid and outcome files of an earlier attempt,
starts `command` in a new process group with `environment` (`childproc.run_process_group`),
passes each line a child prints on stdout that starts with `PROGRESS_PREFIX` (a JSON object
follows: `print_progress`) to the plugin's callback, and when the launcher exits returns
``outcome.json``'s content, else the lowest rank's ``outcome.<rank>.json``, else raises with
the tail of ``launch.log``. On cancellation or the job's deadline it kills the process group
(SIGTERM, then SIGKILL after `KILL_GRACE_S`), then every child named in a pid file, and waits
until those are gone; a child also exits by itself once its launcher is gone (`watch_launcher`),
so no training process outlives its job.

Command line: ``python -m accelerate.commands.launch --num_processes N ... -m <module>
<folder>/job.json``, with the job's share of the worker's threads per process (Accelerate's
default is all cores in every process). Several processes run under torchrun (``--multi_gpu``),
on CPUs too: there each child asks for the CPU itself (``Accelerator(cpu=True)``, DDP over
gloo), because ``--cpu`` picks Accelerate's single-process launcher, which starts one process
whatever ``--num_processes`` says. A plugin whose children do not ask for the CPU keeps ``--cpu``
(``multi_cpu=False``), and trains in one process there. The children import the plugin from
where the worker does (its package's parent first on ``PYTHONPATH``), never reach the Hugging
Face hub, and see only the GPUs the job was given (``ctx.device``: ``"cuda:1"``, or a slot of
several, ``"cuda:0,1"``) through ``CUDA_VISIBLE_DEVICES``, which torchrun's workers inherit and
number from 0: without it every launched job would take the first GPUs of the machine.

Stdlib only (and `childproc`): no torch here; the plugin passes the thread count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .childproc import KILL_GRACE_S, json_lines, run_process_group
from .devices import gpu_indices

PROGRESS_PREFIX = "DVM-PROGRESS "
WATCH_PARENT_S = 0.5          # how often a child checks that its launcher is alive
ERROR_MESSAGE_MAX = 1000      # characters of an exception's text in an outcome file
STDERR_TAIL = 2000            # characters of launch.log logged when no outcome came back
KILL_WAIT_S = 5.0             # how long a cancelled job waits for its killed children to be gone


# --- the parent's side ---------------------------------------------------------------------------

def command(module: str, job_file: Path, *, processes: int, use_gpu: bool, precision: str,
            threads: int, multi_cpu: bool = True) -> list[str]:
    """The ``accelerate launch`` command line that runs ``python -m <module> <job_file>`` in
    `processes` processes with `threads` threads each, in `precision` (``"no"``, ``"bf16"``,
    ``"fp16"``).

    :param multi_cpu: several processes on the CPU run under torchrun (``--multi_gpu``; the
        children ask for the CPU themselves). False: ``--cpu``, one process on the CPU.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(threads)]
    if processes > 1 and (use_gpu or multi_cpu):
        cmd.append("--multi_gpu")
    elif not use_gpu:
        cmd.append("--cpu")
    return cmd + ["-m", module, str(job_file)]


def threads_per_process(threads: int, processes: int) -> int:
    """Each process's share of the `threads` the job may use (at least one)."""
    return max(1, threads // processes)


def package_parent(module: str) -> Path:
    """The folder that holds `module`'s top-level package: the children must import the copy of
    the plugin the worker runs (a source tree that is not installed, too)."""
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None:
        raise RuntimeError(f"no module {module!r} to launch")
    if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
        return Path(spec.origin).resolve().parent.parent
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def visible_devices(device: str | None, processes: int, current: str | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for the children of a job the worker gave GPUs (`device`
    ``"cuda:N"`` or ``"cuda:N,M,..."``): those only, so that the children's ``cuda:0``,
    ``cuda:1``... are the job's GPUs and not the machine's first ones, whatever `processes`
    (a job asking for more processes than it has GPUs is the plugin's to refuse,
    `devices.gpus_given`). `current` is the worker's own setting (N counts among its GPUs).
    None: leave it as it is (no device, the CPU, a bare ``"cuda"``, a GPU the worker does not
    see)."""
    indices = gpu_indices(device)
    if indices is None:
        return None
    if current is None:
        return ",".join(str(i) for i in indices)
    visible = [part.strip() for part in current.split(",") if part.strip()]
    if any(i >= len(visible) for i in indices):
        return None
    return ",".join(visible[i] for i in indices)


def environment(module: str, *, processes: int = 1, device: str | None = None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The children's environment: `base` (the worker's, by default) with `module`'s package
    first on ``PYTHONPATH``, the hub offline (the model is on disk already: a child never
    downloads), tokenizers single-threaded unless the provider says otherwise (it forks
    otherwise-idle pools in every process), and the job's GPU (`visible_devices`). The worker's
    secrets are dropped later, by `childproc.run_process_group`."""
    env = dict(os.environ if base is None else base)
    parent = str(package_parent(module))
    env["PYTHONPATH"] = parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpus = visible_devices(device, processes, env.get("CUDA_VISIBLE_DEVICES"))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


def run(job_file: Path, *, module: str, processes: int, use_gpu: bool, precision: str, threads: int,
        check_cancelled: Callable[[], None], on_progress: Callable[[dict], None],
        multi_cpu: bool = True, device: str | None = None, log=None) -> dict:
    """Run ``python -m <module> <job_file>`` under ``accelerate launch`` to its end and return
    its outcome (`read_outcome`); on whatever `check_cancelled` raises, kill every process of
    the job and re-raise.

    :param threads: the threads the whole job may use (the worker's ``torch.get_num_threads()``),
        shared among the processes.
    :param on_progress: called with each progress object a child prints (`print_progress`).
    :param multi_cpu: see `command`.
    :param device: the device the worker gave the job (``ctx.device``), see `visible_devices`.
    :raises RuntimeError: the processes exited without an outcome file (a crash, a kill).
    """
    folder = job_file.parent
    for old in [*folder.glob("outcome*.json"), *folder.glob("pid.*")]:
        old.unlink()
    stderr_path = folder / "launch.log"
    returncode = run_process_group(
        command(module, job_file, processes=processes, use_gpu=use_gpu, precision=precision,
                threads=threads_per_process(threads, processes), multi_cpu=multi_cpu),
        cwd=folder, env=environment(module, processes=processes, device=device),
        stderr_path=stderr_path, check_cancelled=check_cancelled, grace=KILL_GRACE_S,
        on_line=json_lines(PROGRESS_PREFIX, on_progress), on_kill=lambda: kill_job_processes(job_file))
    outcome = read_outcome(folder)
    if outcome is None:
        tail = stderr_path.read_text(errors="replace")[-STDERR_TAIL:]
        if log is not None:
            log.warning("launched training failed", returncode=returncode, stderr=tail)
        raise RuntimeError(f"the training processes exited with code {returncode} without an outcome: "
                           f"{tail[-500:]}")
    return outcome


def read_outcome(folder: Path) -> dict | None:
    """The main process's ``outcome.json``, else the lowest rank's ``outcome.<rank>.json`` (the
    error that stopped the others), else None."""
    main = folder / "outcome.json"
    if main.is_file():
        return json.loads(main.read_text(encoding="utf-8"))
    ranked = []
    for path in folder.glob("outcome.*.json"):
        rank = path.name.split(".")[1]
        if rank.isdigit():
            ranked.append((int(rank), path))
    if not ranked:
        return None
    return json.loads(min(ranked)[1].read_text(encoding="utf-8"))


def kill_job_processes(job_file: Path, wait: float = KILL_WAIT_S) -> None:
    """SIGKILL any child of this job still alive once its group is stopped (torchrun starts each
    in a session of its own, outside the group), and wait up to `wait` seconds until they are
    dead: a killed process holds its memory (a GPU's too) until the kernel has torn it down,
    and the job's error must not reach the worker, which starts the next job, before that."""
    for pid in job_processes(job_file):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    pids = job_processes(job_file, exiting=True)
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _running(pid)]
        if pids:
            time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether `pid` is a process not yet dead (a zombie is dead: only its exit status is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def job_processes(job_file: Path, *, exiting: bool = False) -> list[int]:
    """The live children of this job, from their pid files, each checked against its command
    line (which names `job_file`) so that a reused pid is never killed. With `exiting`, also
    those on their way out: a dying process's command line is gone (empty) while the kernel
    still frees its memory, which on a loaded machine takes a while."""
    pids = []
    for pid_file in job_file.parent.glob("pid.*"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        if str(job_file) in cmdline or (exiting and not cmdline):
            pids.append(pid)
    return pids


# --- a child's side ------------------------------------------------------------------------------

def child_rank() -> int:
    """This process's rank among the launched ones (0: the main one; 0 without a launcher)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def start_child(job_file: Path) -> int:
    """What a launched process does first: write its pid file and watch its launcher; its rank."""
    rank = child_rank()
    write_pid_file(job_file.parent, rank)
    watch_launcher()
    return rank


def write_pid_file(folder: Path, rank: int) -> None:
    """``pid.<rank>``: how the parent finds this process if it left the process group."""
    (folder / f"pid.{rank}").write_text(str(os.getpid()))


def watch_launcher(interval: float = WATCH_PARENT_S) -> None:
    """Exit when the launcher is gone (killed with SIGKILL: this process was reparented), from a
    daemon thread, so that training never goes on for a job nobody waits for."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-launcher").start()


def print_progress(item: dict) -> None:
    """Hand `item` (a JSON object) to the parent's `on_progress`: one line on stdout."""
    print(PROGRESS_PREFIX + json.dumps(item), flush=True)


def outcome_path(folder: Path, rank: int) -> Path:
    """``outcome.json`` for the main process, ``outcome.<rank>.json`` for another."""
    return folder / ("outcome.json" if rank == 0 else f"outcome.{rank}.json")


def write_outcome(folder: Path, rank: int, content: dict) -> None:
    """Write this process's outcome (``{"outcome": ...}`` or ``{"error": kind, "message": ...}``)
    atomically: the parent reads it after the launcher exits, possibly killed mid-write."""
    target = outcome_path(folder, rank)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(content), encoding="utf-8")
    tmp.replace(target)


def error_message(exc: BaseException) -> str:
    """An unexpected exception as an outcome's ``message``: its type and the start of its text."""
    return f"{type(exc).__name__}: {str(exc)[:ERROR_MESSAGE_MAX]}"


__all__ = [
    "KILL_GRACE_S", "PROGRESS_PREFIX", "command", "environment", "run", "read_outcome",
    "kill_job_processes", "job_processes", "visible_devices", "package_parent", "threads_per_process",
    "child_rank", "start_child", "write_pid_file", "watch_launcher", "print_progress", "outcome_path",
    "write_outcome", "error_message",
]
