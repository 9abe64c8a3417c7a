"""Training in child processes: ``accelerate launch`` over several GPUs, or several CPU processes.

Used when the provider sets ``processes = N`` (N > 1) in ``[plugins.image-classifier]``. The
worker's process writes the prepared data into the job's folder (``launch/data.npz``: the uint8
images and int64 labels, no pickle; ``launch/initial.safetensors``: initial weights, if any) and
the job's settings (``launch/job.json``), then runs `dvm_core.launch.run`, which starts::

    python -m accelerate.commands.launch --num_processes N --multi_gpu ... \\
        -m dvm_image_classifier.launched launch/job.json

in a new process group. ``--multi_gpu`` is Accelerate's torchrun launcher, also on CPUs, where
each process asks for the CPU itself (``use_cpu`` in ``job.json``: ``Accelerator(cpu=True)``, DDP
over gloo). Each process runs `train.train` with ``launched=True``; the main one prints each
epoch's record as a progress line (forwarded to the job's progress) and writes the weights
(``weights.safetensors``) and the outcome to ``outcome.json``; a process that fails writes its
error. Cancellation and the job's deadline kill every process: `dvm_core.launch` describes the
protocol, the pid files and the kill.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from dvm_core.launch import KILL_GRACE_S, error_message, print_progress, start_child, write_outcome

__all__ = ["write_job", "outcome_from_dict", "main", "KILL_GRACE_S"]


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


def outcome_from_dict(content: dict, state_dict):
    """The `train.TrainOutcome` from ``outcome.json``'s outcome and the weights file's tensors."""
    from .train import TrainOutcome

    return TrainOutcome(state_dict=state_dict, history=content["history"], stopped=content["stopped"],
                        train_seconds=content["train_seconds"], samples_seen=content["samples_seen"],
                        device=content["device"], mixed_precision=content["mixed_precision"],
                        threads=content["threads"])


# --- one launched process ---------------------------------------------------------------------

def main(argv: list[str]) -> int:
    """One launched process: train and, in the main process, write the weights and ``outcome.json``."""
    job_file = Path(argv[0])
    folder = job_file.parent
    rank = start_child(job_file)

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

    def on_epoch(record: dict, epochs: int) -> None:
        print_progress({"record": record, "epochs": epochs})

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
        write_outcome(folder, rank, {"error": "input", "message": str(exc)})
        return 2
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        write_outcome(folder, rank, {"error": "failed", "message": error_message(exc)})
        return 3
    if rank == 0:
        save_file(outcome.state_dict, str(folder / "weights.safetensors"))
        write_outcome(folder, rank, {"outcome": {
            "history": outcome.history, "stopped": outcome.stopped, "train_seconds": outcome.train_seconds,
            "samples_seen": outcome.samples_seen, "device": outcome.device,
            "mixed_precision": outcome.mixed_precision, "threads": outcome.threads,
            "processes": int(os.environ.get("WORLD_SIZE", "1"))}})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
