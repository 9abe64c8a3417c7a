"""Training in child processes: ``accelerate launch`` over several GPUs (or, for tests, the CPU).

The worker's process writes the job (`train.TrainSpec`) as JSON into the job's folder
(``launch/job.json``) and the tokenized examples beside it as ``.npy`` arrays (`data.Examples.save`:
int32 ids, bool targets, int64 starts and loss counts; written and read back piece by piece,
without pickle, each example read from the file when a batch needs it), and runs
`dvm_core.launch.run`, which starts ``python -m accelerate.commands.launch ... -m
dvm_llm_finetune.launch launch/job.json`` in a new process group. Each launched process runs
`train.train`; the main one prints progress lines (forwarded to the customer) and writes the
outcome to ``outcome.json``; a process that fails writes its error, with its kind (``"oom"``
for out of memory). Cancellation and the job's deadline kill every process: `dvm_core.launch`
describes the protocol.

On the CPU the children run under ``--cpu`` (`MULTI_CPU` False): one process, whatever
``processes`` says (the param is documented as GPUs). Under torchrun they would need to ask for
the CPU themselves, which `train.make_accelerator` does not: a launched process takes the
launcher's Accelerator as it is, and without ``cpu=True`` Accelerate sets up no DDP on a CPU
(each process would train a copy of its own).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dvm_core.launch import KILL_GRACE_S, error_message, print_progress, start_child, write_outcome

MULTI_CPU = False   # see above: `dvm_core.launch.command`'s multi_cpu

__all__ = ["write_job", "main", "MULTI_CPU", "KILL_GRACE_S"]


def _save_examples(folder: Path, name: str, examples) -> None:
    from .data import Examples

    Examples.of(examples).save(folder, name)


def _load_examples(folder: Path, name: str):
    from .data import Examples

    return Examples.load(folder, name)


def write_job(folder: Path, spec, train_examples, eval_examples) -> Path:
    """Write the spec (``job.json``, returned) and the tokenized examples into `folder`."""
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    _save_examples(folder, "train", train_examples)
    _save_examples(folder, "eval", eval_examples)
    path = folder / "job.json"
    path.write_text(json.dumps({"spec": asdict(spec)}), encoding="utf-8")
    return path


def main(argv: list[str]) -> int:
    """One launched process: train and, in the main process, write ``outcome.json``."""
    job_file = Path(argv[0])
    folder = job_file.parent
    rank = start_child(job_file)

    from dvm_core import JobInputError

    from . import model as modelmod
    from . import train as trainmod

    job = json.loads(job_file.read_text(encoding="utf-8"))
    spec = trainmod.TrainSpec(**job["spec"])
    train_examples = _load_examples(folder, "train")
    eval_examples = _load_examples(folder, "eval")

    def report(fraction: float, message: str, fields: dict) -> None:
        print_progress({"fraction": fraction, "message": message, "fields": fields})

    try:
        tokenizer = modelmod.load_tokenizer(Path(spec.model_folder))
        outcome = trainmod.train(spec, train_examples, eval_examples, tokenizer, report=report, launched=True)
    except JobInputError as exc:
        write_outcome(folder, rank, {"error": "input", "message": str(exc)})
        return 2
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        write_outcome(folder, rank, {"error": "oom" if trainmod.is_oom(exc) else "failed",
                                     "message": error_message(exc)})
        return 3
    if rank == 0:
        write_outcome(folder, rank, {"outcome": trainmod.outcome_to_dict(outcome)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
