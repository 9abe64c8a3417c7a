"""Benchmark of checkable training (issue 17): what a transcript costs the provider, and what one
spot-check costs the verifier, against the job's own training time.

    PYTHONPATH=plugins .venv/bin/python tests/benchmarks/bench_verify.py [--rounds 3] [--epochs 10] [--segments 10]
    PYTHONPATH=plugins .venv/bin/python tests/benchmarks/bench_verify.py --task llm [--method lora|full]
    ... [--device cuda]     # training and every replay on that device (default: cpu)

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module. Needs
scikit-learn (the digits data).

The job: the image classifier's training function (`train.train`, what a job runs) on the 1438
training digits (the split of tests/test_image_classifier.py, nothing held out), ``--epochs``
epochs of batches of 64 (23 steps an epoch), with ``checkpoint_every`` chosen so the run has
``--segments`` segments (10: a checkpoint every 23 steps, 11 checkpoints).

- `transcript_overhead` (goal ≤ 0.03): the time spent writing the transcript, over the training
  time of the same run without one (median over rounds). Writing it is capturing and saving
  each checkpoint (weights, optimizer moments, generator state: a safetensors file) with the
  sha256 of its weights and of its whole state, timed inside the loop, plus the sha256 of the
  data and the transcript's JSON after it. `transcript_overhead_paired` is the same
  measured from outside: the median over rounds of (time with) / (time without) − 1, run back
  to back in alternating order; on a shared machine it is noisy at this scale, which is why the
  goal is checked on the direct measure.
- `spot_check_over_job` (goal ≤ 0.15): one spot-check of one segment, as the verify job
  (kind 5753) runs it — `verify.verify_segment`: read the training set from its .npz, rebuild
  the tensors trained on and check their sha256, load the start and end checkpoints, build the
  network and optimizer, replay the segment, compare — over the job's own training time (the
  whole `train` call, with the transcript). The median over every segment of every round (the
  last segment of a run is as long as the others here).
- `all_matched`: every segment of every round replayed bit for bit (an honest run passes).
- `max_distance`: the largest distance (‖replayed − claimed‖ / ‖claimed‖ of the weights, the
  verify job's) of an honest replay: 0.0 where every segment replays bit for bit. Against it,
  `one_step_short_distance` (median over rounds): the distance of a replay of the middle segment
  that stops one optimizer step short, the smallest cheat there is. `max_state_distance` and
  `one_step_short_state_distance`: the same for the whole state (`state_distance`: the weights
  and each optimizer moment apart), which is what a tolerance is checked against (null where
  the counters or RNG state differ, as one step short does for the image classifier: no
  tolerance takes that). On a device
  where replays are not bit for bit (a GPU), a verifier's ``tolerance`` must lie between
  `max_state_distance` and `one_step_short_state_distance`.

``--task llm``: the same keys for LLM fine-tuning (`dvm_llm_finetune.train.train`, what a
kind-5751 job runs) of the tiny offline GPT-2 of `dvm_federate.tiny` (2 layers, width 64, GPT-2
and LoRA dropout on) on ``--examples`` sentences of its toy grammar (5% held out), batches of 8
of at most 32 tokens, ``--epochs`` epochs (default 2), LoRA (``--method``), with
``checkpoint_every`` chosen for ``--segments`` segments. A spot check is
`dvm_llm_finetune.verify.verify_segment`: check the base model folder's sha256, load its
tokenizer, read and tokenize the JSONL, check the examples' sha256, build the model (LoRA from
the seed), replay, compare. The tiny model makes the fixed costs (loading, tokenizing) weigh far
more against a job than they would for a real model. `checkpoints_seconds` is the part of
`transcript_seconds` spent inside the training loop (capturing, saving and hashing the
checkpoints); the rest is `transcript.write` after it (the returned weights' digest, the
examples' digest, the JSON).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("dvm_image_classifier") is None:  # not installed yet: the source tree
    sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import eprint, loadavg  # noqa: E402
from dvm_image_classifier import transcript as T  # noqa: E402
from dvm_image_classifier.digits import digits_split, write_npz  # noqa: E402
from dvm_image_classifier.models import make_spec  # noqa: E402
from dvm_image_classifier.params import TrainParams  # noqa: E402
from dvm_image_classifier.train import normalisation, to_tensors, train  # noqa: E402
from dvm_image_classifier.verify import verify_segment  # noqa: E402

DEVICE = torch.device("cpu")    # --device


def run(x, y, spec, params, mean, std, folder: Path | None):
    """One training call: (its seconds, the recorder or None, the outcome)."""
    recorder = T.Recorder(params.checkpoint_every, folder) if folder is not None else None
    started = time.perf_counter()
    outcome = train(train_images=x, train_labels=y, val_images=None, val_labels=None, spec=spec, params=params,
                    mean=mean, std=std, device=DEVICE, transcript=recorder)
    return time.perf_counter() - started, recorder, outcome


def middle(segments) -> tuple[int, int]:
    return segments[len(segments) // 2]


def finite(value: float) -> float | None:
    """None for inf (a state whose counters or RNG state differ: never within a tolerance)."""
    return value if value == value and abs(value) != float("inf") else None


def distances(verdicts: list[dict]) -> dict:
    """The figures of the honest replays' distances (None where a replay was not comparable)."""
    found = [v["distance"] for v in verdicts]
    whole = [v["state_distance"] for v in verdicts if v["state_distance"] is not None]
    return {"max_distance": max((d for d in found if d is not None), default=None),
            "max_state_distance": max(whole, default=None),
            "exact": sum(bool(v["exact"]) for v in verdicts), "incomparable": sum(d is None for d in found)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("image", "llm"), default="image")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (image), 2 (llm)")
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (image), 8 (llm)")
    parser.add_argument("--examples", type=int, default=800, help="llm: training sentences")
    parser.add_argument("--method", choices=("lora", "full"), default="lora", help="llm")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="where training and the replays run (cpu, cuda, cuda:1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.task == "llm":
        return main_llm(args)
    args.epochs = args.epochs or 10
    args.batch_size = args.batch_size or 64

    x_np, y_np, _, _ = digits_split(0)
    x, y = to_tensors(x_np[..., None], y_np)
    n = x.shape[0]
    per_epoch = n // args.batch_size + (1 if n % args.batch_size >= 2 else 0)
    steps = per_epoch * args.epochs
    every = -(-steps // args.segments)
    params = TrainParams(epochs=args.epochs, batch_size=args.batch_size, validation_fraction=0.0,
                         checkpoint_every=every)
    spec = make_spec("auto", 1, 10, 8, 8)
    mean, std = normalisation(x)
    root = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    data = write_npz(root / "digits_train.npz", x_np, y_np)

    eprint(f"{n} images, {steps} steps, a checkpoint every {every}: warm-up")
    run(x, y, spec, params, mean, std, None)
    run(x, y, spec, params, mean, std, root / "warm-up")

    without, with_, paired, written, checks, matched = [], [], [], [], [], []
    verdicts, short, short_state = [], [], []
    checkpoint_bytes = 0
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        times = {}
        for recording in order:
            folder = root / f"round-{r}" if recording else None
            seconds, recorder, outcome = run(x, y, spec, params, mean, std, folder)
            times[recording] = seconds
            if recording:
                started = time.perf_counter()
                record = T.build(recorder=recorder, params=params, spec=spec, mean=mean, std=std,
                                 data_sha256="-", train_sha256=T.data_digest(x, y), n_train=n,
                                 validation={"source": "none"}, image_size=None, steps_per_epoch=per_epoch,
                                 outcome=outcome)
                (folder / "transcript.json").write_text(json.dumps(record, indent=1))
                written.append(recorder.seconds + time.perf_counter() - started)
                checkpoint_bytes = sum(f.stat().st_size for f in recorder.files)
                transcript, recorded_in = json.loads((folder / "transcript.json").read_text()), folder
        without.append(times[False])
        with_.append(times[True])
        paired.append(times[True] / times[False] - 1)
        eprint(f"round {r + 1}: training {times[False]:.2f}s without a transcript, {times[True]:.2f}s with "
               f"({written[-1]:.3f}s writing it)")
        for a, b in T.segments(transcript):
            started = time.perf_counter()
            verdict = verify_segment(transcript, data, recorded_in / T.entry_at(transcript, a)["file"],
                                     recorded_in / T.entry_at(transcript, b)["file"], end_step=b, device=DEVICE)
            checks.append(time.perf_counter() - started)
            matched.append(verdict["match"])
            verdicts.append(verdict)
        eprint(f"  spot checks: median {statistics.median(checks[-len(T.segments(transcript)):]):.3f}s a segment")
        a, b = middle(T.segments(transcript))
        got = T.replay(transcript, T.Checkpoint.load(recorded_in / T.entry_at(transcript, a)["file"]), x, y, b - 1,
                       device=DEVICE)
        claimed = T.Checkpoint.load(recorded_in / T.entry_at(transcript, b)["file"])
        short.append(T.distance(got.weights, claimed.weights))
        short_state.append(T.state_distance(got.tensors, claimed.tensors))

    train_s = statistics.median(without)
    job_s = statistics.median(with_)
    check_s = statistics.median(checks)
    print(json.dumps({
        "spot_check_over_job": round(check_s / job_s, 4),
        "transcript_overhead": round(statistics.median(written) / train_s, 4),
        "transcript_overhead_paired": round(statistics.median(paired), 4),
        "all_matched": all(matched), "checks": len(matched), **distances(verdicts),
        "one_step_short_distance": statistics.median(short),
        "one_step_short_state_distance": finite(statistics.median(short_state)), "device": str(DEVICE),
        "spot_check_seconds": round(check_s, 3), "job_train_seconds": round(job_s, 3),
        "train_seconds_without_transcript": round(train_s, 3),
        "transcript_seconds": round(statistics.median(written), 4),
        "steps": steps, "segments": len(T.segments(transcript)), "checkpoint_every": every,
        "checkpoint_bytes": checkpoint_bytes, "images": n, "epochs": args.epochs, "batch_size": args.batch_size,
        "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
        "machine": platform.machine(), "loadavg": loadavg(),
    }))
    return 0


def main_llm(args) -> int:
    import dataclasses

    from dvm_federate import tiny
    from dvm_llm_finetune import data as datamod
    from dvm_llm_finetune import model as modelmod
    from dvm_llm_finetune import transcript as LT
    from dvm_llm_finetune.params import Limits, parse_params
    from dvm_llm_finetune.train import TrainSpec, plan
    from dvm_llm_finetune.train import train as llm_train
    from dvm_llm_finetune.verify import verify_segment as llm_verify
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    epochs, batch = args.epochs or 2, args.batch_size or 8
    root = Path(tempfile.mkdtemp(prefix="bench-verify-llm-"))
    model_folder = tiny.save_model_folder(root / "gpt2")
    data = tiny.write_corpus(root / "train.jsonl", args.examples)
    base = modelmod.check_folder(model_folder, source={"archive_sha256": "-"}, limits=Limits())
    tokenizer = modelmod.load_tokenizer(model_folder)
    params = parse_params({"method": args.method, "epochs": str(epochs), "batch_size": str(batch),
                           "max_seq_length": "32", "learning_rate": "0.01" if args.method == "lora" else "0.001"},
                          Limits(), has_eval_input=False)
    dataset = datamod.read_jsonl(data, what="training set", max_bytes=1 << 30, max_examples=10**6)
    examples = datamod.tokenize(dataset, tokenizer, params.max_seq_length, what="training set").examples
    train_ex, eval_ex = datamod.split_eval(examples, params.eval_fraction, params.seed)
    steps = plan(train_ex, params, tokenizer.pad_token_id).planned
    every = -(-steps // args.segments)
    params = dataclasses.replace(params, checkpoint_every=every)
    datasets = {"train": {"sha256": dataset.sha256, "format": dataset.format},
                "eval": {"source": "held out from the training set", "fraction": params.eval_fraction}}

    def run_llm(folder: Path | None):
        out = root / "out"
        spec = TrainSpec(model_folder=str(model_folder), model_type=base.model_type, base_model_name="tiny",
                         params=params.as_dict(), output_dir=str(out), device=str(DEVICE))
        recorder = LT.Recorder(every, folder) if folder is not None else None
        started = time.perf_counter()
        outcome = llm_train(spec, train_ex, eval_ex, tokenizer, transcript=recorder)
        return time.perf_counter() - started, recorder, outcome, out

    eprint(f"{len(train_ex)} examples, {steps} steps, a checkpoint every {every}: warm-up")
    run_llm(None)
    run_llm(root / "warm-up")
    without, with_, paired, written, checks, matched = [], [], [], [], [], []
    checkpoint_bytes, in_loop, verdicts, short, short_state = 0, [], [], [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        times = {}
        for recording in order:
            folder = root / f"round-{r}" if recording else None
            seconds, recorder, outcome, out = run_llm(folder)
            times[recording] = seconds
            if recording:
                started = time.perf_counter()
                LT.write(out, recorder, params=params, base=base, datasets=datasets, train_examples=train_ex,
                         outcome=outcome, retention_days=30.0)
                written.append(recorder.seconds + time.perf_counter() - started)
                in_loop.append(recorder.seconds)
                checkpoint_bytes = sum(f.stat().st_size for f in recorder.files)
                transcript, recorded_in = json.loads((out / "transcript.json").read_text()), folder
        without.append(times[False])
        with_.append(times[True])
        paired.append(times[True] / times[False] - 1)
        eprint(f"round {r + 1}: training {times[False]:.2f}s without a transcript, {times[True]:.2f}s with "
               f"({written[-1]:.3f}s writing it)")
        for a, b in LT.segments(transcript):
            started = time.perf_counter()
            verdict = llm_verify(transcript, data, recorded_in / LT.entry_at(transcript, a)["file"],
                                 recorded_in / LT.entry_at(transcript, b)["file"], model_folder=model_folder,
                                 end_step=b, device=DEVICE)
            checks.append(time.perf_counter() - started)
            matched.append(verdict["match"])
            verdicts.append(verdict)
        eprint(f"  spot checks: median {statistics.median(checks[-len(LT.segments(transcript)):]):.3f}s a segment")
        a, b = middle(LT.segments(transcript))
        got = LT.replay(transcript, LT.Checkpoint.load(recorded_in / LT.entry_at(transcript, a)["file"]), model_folder,
                        train_ex, tokenizer, b - 1, device=DEVICE)
        claimed = LT.Checkpoint.load(recorded_in / LT.entry_at(transcript, b)["file"])
        short.append(LT.distance(got.weights, claimed.weights))
        short_state.append(LT.state_distance(got.tensors, claimed.tensors))

    train_s, job_s, check_s = statistics.median(without), statistics.median(with_), statistics.median(checks)
    print(json.dumps({
        "task": "llm", "method": args.method,
        "spot_check_over_job": round(check_s / job_s, 4),
        "transcript_overhead": round(statistics.median(written) / train_s, 4),
        "transcript_overhead_paired": round(statistics.median(paired), 4),
        "all_matched": all(matched), "checks": len(matched), **distances(verdicts),
        "one_step_short_distance": statistics.median(short),
        "one_step_short_state_distance": finite(statistics.median(short_state)), "device": str(DEVICE),
        "spot_check_seconds": round(check_s, 3), "job_train_seconds": round(job_s, 3),
        "train_seconds_without_transcript": round(train_s, 3),
        "transcript_seconds": round(statistics.median(written), 4),
        "checkpoints_seconds": round(statistics.median(in_loop), 4),
        "steps": steps, "segments": len(LT.segments(transcript)), "checkpoint_every": every,
        "checkpoint_bytes": checkpoint_bytes, "examples": len(train_ex), "epochs": epochs, "batch_size": batch,
        "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
        "machine": platform.machine(), "loadavg": loadavg(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
