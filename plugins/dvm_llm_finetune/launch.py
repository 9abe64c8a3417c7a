"""Training in child processes: ``accelerate launch`` over several GPUs (or, for tests, the CPU).

The worker's process writes the job (`train.TrainSpec`) and the tokenized examples as JSON
into the job's folder and starts ``python -m accelerate.commands.launch ... -m
dvm_llm_finetune.launch <job.json>`` in a new process group. Each launched process runs
`train.train`; the main one prints progress as JSON lines on stdout and writes the outcome (or
the error, with its kind) to ``outcome.json``. The parent forwards progress to the customer
and, on cancellation or the job's deadline, kills the whole process group (SIGTERM, then SIGKILL
after a grace period), so no training process outlives its job.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from dvm_core.childproc import KILL_GRACE_S, json_lines, run_process_group

PROGRESS_PREFIX = "DVM-PROGRESS "


def _examples_to_json(examples) -> list[list[list[int]]]:
    return [[e.input_ids, e.labels] for e in examples]


def write_job(folder: Path, spec, train_examples, eval_examples) -> Path:
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.json"
    path.write_text(json.dumps({"spec": asdict(spec), "train": _examples_to_json(train_examples),
                                "eval": _examples_to_json(eval_examples)}), encoding="utf-8")
    return path


def command(job_file: Path, processes: int, use_gpu: bool, precision: str, threads: int) -> list[str]:
    # Threads per process: the worker's own setting (accelerate's default is all cores per
    # process, which oversubscribes a CPU shared with other jobs).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", str(threads)]
    if not use_gpu:
        cmd.append("--cpu")
    elif processes > 1:
        cmd.append("--multi_gpu")
    return cmd + ["-m", "dvm_llm_finetune.launch", str(job_file)]


def run_launched(job_file: Path, *, processes: int, use_gpu: bool, precision: str,
                 check_cancelled: Callable[[], None], report: Callable[[float, str, dict], None],
                 log=None) -> dict:
    """Run the launched training to its end and return ``outcome.json``'s content; kill the
    process group if `check_cancelled` raises (and re-raise)."""
    folder = job_file.parent
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"   # the model is already on disk: never reach the hub
    import torch

    threads = max(1, torch.get_num_threads() // processes)
    stderr_path = folder / "launch.log"
    returncode = run_process_group(
        command(job_file, processes, use_gpu, precision, threads), cwd=folder, env=env,
        stderr_path=stderr_path, check_cancelled=check_cancelled, grace=KILL_GRACE_S,
        on_line=json_lines(PROGRESS_PREFIX, lambda item: report(item["fraction"], item["message"],
                                                                item.get("fields") or {})))
    outcome_file = folder / "outcome.json"
    if not outcome_file.is_file():
        tail = stderr_path.read_text(errors="replace")[-2000:]
        if log is not None:
            log.warning("launched training failed", returncode=returncode, stderr=tail)
        raise RuntimeError(f"the training processes exited with code {returncode} without an outcome: "
                           f"{tail[-500:]}")
    return json.loads(outcome_file.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    """One launched process: train and, in the main process, write ``outcome.json``."""
    from dvm_core import JobInputError

    from . import data as datamod
    from . import model as modelmod
    from . import train as trainmod

    job_file = Path(argv[0])
    job = json.loads(job_file.read_text(encoding="utf-8"))
    spec = trainmod.TrainSpec(**job["spec"])
    train_examples = [datamod.Example(ids, labels) for ids, labels in job["train"]]
    eval_examples = [datamod.Example(ids, labels) for ids, labels in job["eval"]]
    outcome_file = job_file.parent / "outcome.json"
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))

    def report(fraction: float, message: str, fields: dict) -> None:
        print(PROGRESS_PREFIX + json.dumps({"fraction": fraction, "message": message, "fields": fields}),
              flush=True)

    def write(content: dict) -> None:
        if rank == 0:
            tmp = outcome_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(content), encoding="utf-8")
            tmp.replace(outcome_file)

    try:
        tokenizer = modelmod.load_tokenizer(Path(spec.model_folder))
        outcome = trainmod.train(spec, train_examples, eval_examples, tokenizer, report=report, launched=True)
    except JobInputError as exc:
        write({"error": "input", "message": str(exc)})
        return 2
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        oom = trainmod.is_oom(exc)
        write({"error": "oom" if oom else "failed", "message": f"{type(exc).__name__}: {str(exc)[:1000]}"})
        return 3
    write({"outcome": trainmod.outcome_to_dict(outcome)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
