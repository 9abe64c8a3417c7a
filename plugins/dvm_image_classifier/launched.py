"""Training in child processes: ``accelerate launch`` over several GPUs, or several CPU processes.

Used when the provider sets ``processes = N`` (N > 1) in ``[plugins.image-classifier]``. The
worker's process writes the prepared data into the job's folder (``launch/data.npz``: the uint8
images and int64 labels, no pickle; ``launch/initial.safetensors``: initial weights, if any) and
the job's settings (``launch/job.json``), then starts::

    python -m accelerate.commands.launch --num_processes N --multi_gpu ... \\
        -m dvm_image_classifier.launched launch/job.json

in a new process group. ``--multi_gpu`` is Accelerate's torchrun launcher, also on CPUs: its
``--cpu`` flag picks the single-process launcher, so on CPUs each process asks for the CPU itself
(``Accelerator(cpu=True)``: DDP over gloo). Each process runs `train.train` with
``launched=True``; the main one prints each epoch's record as a JSON line on stdout (forwarded
to the job's progress) and writes the weights (``weights.safetensors``) and the outcome (or the
error, with its kind) to ``outcome.json``. On cancellation or the job's deadline the parent
kills the process group (SIGTERM, then SIGKILL after `KILL_GRACE_S`) and any training process
that torchrun started in a session of its own; a training process also exits by itself when its
launcher is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from dvm_core.childproc import KILL_GRACE_S, json_lines, run_process_group

PROGRESS_PREFIX = "DVM-EPOCH "
WATCH_PARENT_S = 0.5


# --- the worker's side ---------------------------------------------------------------------------

def write_job(folder: Path, *, x, y, x_val, y_val, spec: dict, params, mean: list[float], std: list[float],
              initial_weights, time_budget: float, use_cpu: bool) -> Path:
    """Write the prepared tensors and the job's settings into `folder`; return ``job.json``."""
    import numpy as np
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "data.npz", x=x.numpy(), y=y.numpy(), x_val=x_val.numpy(), y_val=y_val.numpy())
    if initial_weights is not None:
        save_file({k: v.contiguous() for k, v in initial_weights.items()}, str(folder / "initial.safetensors"))
    path = folder / "job.json"
    path.write_text(json.dumps({"spec": spec, "params": asdict(params), "mean": mean, "std": std,
                                "time_budget": time_budget, "use_cpu": use_cpu,
                                "initial_weights": initial_weights is not None}), encoding="utf-8")
    return path


def command(job_file: Path, processes: int, use_gpu: bool, precision: str, threads: int) -> list[str]:
    """The ``accelerate launch`` command line (threads per process: the worker's share, not
    Accelerate's default of all cores per process)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(threads)]
    if processes > 1:
        cmd.append("--multi_gpu")     # torchrun; on CPUs the processes ask for the CPU themselves
    elif not use_gpu:
        cmd.append("--cpu")
    return cmd + ["-m", "dvm_image_classifier.launched", str(job_file)]


def run_launched(job_file: Path, *, processes: int, use_gpu: bool, precision: str,
                 check_cancelled: Callable[[], None], on_epoch: Callable[[dict, int], None],
                 log=None) -> dict:
    """Run the launched training to its end and return ``outcome.json``'s content; kill the
    processes if `check_cancelled` raises (and re-raise)."""
    import torch

    folder = job_file.parent
    for old in [*folder.glob("outcome*.json"), *folder.glob("pid.*")]:
        old.unlink()
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"   # nothing to download: never reach the hub
    threads = max(1, torch.get_num_threads() // processes)
    stderr_path = folder / "launch.log"
    returncode = run_process_group(
        command(job_file, processes, use_gpu, precision, threads), cwd=folder, env=env,
        stderr_path=stderr_path, check_cancelled=check_cancelled, grace=KILL_GRACE_S,
        on_line=json_lines(PROGRESS_PREFIX, lambda item: on_epoch(item["record"], item["epochs"])),
        on_kill=lambda: _kill_job_processes(job_file))
    # The main process's outcome.json, else another process's error (outcome.<rank>.json).
    outcomes = [folder / "outcome.json"] if (folder / "outcome.json").is_file() else \
        sorted(folder.glob("outcome.*.json"))
    if not outcomes:
        tail = stderr_path.read_text(errors="replace")[-2000:]
        if log is not None:
            log.warning("launched training failed", returncode=returncode, stderr=tail)
        raise RuntimeError(f"the training processes exited with code {returncode} without an outcome: "
                           f"{tail[-500:]}")
    return json.loads(outcomes[0].read_text(encoding="utf-8"))


def _kill_job_processes(job_file: Path) -> None:
    """SIGKILL any training process of this job still alive once its group is stopped (torchrun
    starts each in a session of its own, outside the group)."""
    for pid in _job_processes(job_file):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _job_processes(job_file: Path) -> list[int]:
    """The training processes of this job (from their pid files, checked against their command
    line so that a reused pid is never killed)."""
    pids = []
    for pid_file in job_file.parent.glob("pid.*"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        if str(job_file) in cmdline:
            pids.append(pid)
    return pids


def outcome_from_dict(content: dict, state_dict):
    from .train import TrainOutcome

    return TrainOutcome(state_dict=state_dict, history=content["history"], stopped=content["stopped"],
                        train_seconds=content["train_seconds"], samples_seen=content["samples_seen"],
                        device=content["device"], mixed_precision=content["mixed_precision"],
                        threads=content["threads"])


# --- one launched process ---------------------------------------------------------------------

def _watch_launcher() -> None:
    """Exit when the launcher is gone (killed with SIGKILL: this process was reparented)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(WATCH_PARENT_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> int:
    """One launched process: train and, in the main process, write the weights and ``outcome.json``."""
    job_file = Path(argv[0])
    folder = job_file.parent
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    (folder / f"pid.{rank}").write_text(str(os.getpid()))
    _watch_launcher()

    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from dvm_core import JobInputError

    from .params import TrainParams
    from .train import train

    job = json.loads(job_file.read_text(encoding="utf-8"))
    raw = dict(job["params"])
    if raw.get("normalisation") is not None:
        raw["normalisation"] = tuple(tuple(v) for v in raw["normalisation"])
    params = TrainParams(**raw)

    def write(content: dict) -> None:
        target = folder / ("outcome.json" if rank == 0 else f"outcome.{rank}.json")
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(content), encoding="utf-8")
        tmp.replace(target)

    def on_epoch(record: dict, epochs: int) -> None:
        print(PROGRESS_PREFIX + json.dumps({"record": record, "epochs": epochs}), flush=True)

    try:
        with np.load(folder / "data.npz", allow_pickle=False) as data:
            x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
            x_val, y_val = torch.from_numpy(data["x_val"]), torch.from_numpy(data["y_val"])
        initial = load_file(str(folder / "initial.safetensors")) if job["initial_weights"] else None
        has_val = x_val.shape[0] > 0
        outcome = train(train_images=x, train_labels=y, val_images=x_val if has_val else None,
                        val_labels=y_val if has_val else None, spec=job["spec"], params=params,
                        mean=job["mean"], std=job["std"], initial_weights=initial,
                        time_budget=job["time_budget"], on_epoch=on_epoch, launched=True,
                        use_cpu=job["use_cpu"])
    except JobInputError as exc:
        write({"error": "input", "message": str(exc)})
        return 2
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        write({"error": "failed", "message": f"{type(exc).__name__}: {str(exc)[:1000]}"})
        return 3
    if rank == 0:
        save_file(outcome.state_dict, str(folder / "weights.safetensors"))
        write({"outcome": {"history": outcome.history, "stopped": outcome.stopped,
                           "train_seconds": outcome.train_seconds, "samples_seen": outcome.samples_seen,
                           "device": outcome.device, "mixed_precision": outcome.mixed_precision,
                           "threads": outcome.threads,
                           "processes": int(os.environ.get("WORLD_SIZE", "1"))}})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
