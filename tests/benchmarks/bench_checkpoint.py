"""Benchmark of saving an LLM transcript's checkpoint (issue 17): how long a training loop on a
GPU is held up by each checkpoint, with the background writer against saving in the loop.

    PYTHONPATH=plugins .venv/bin/python tests/benchmarks/bench_checkpoint.py [--params 25e6] [--device cuda]

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module.

The state is what full fine-tuning of a model of ``--params`` fp32 parameters checkpoints: the
weights and AdamW's two moments (12 bytes a parameter), as tensors of 2,048 × 2,048 on
``--device``. Each round saves it both ways, in alternating order, into new files:

- baseline, in the loop (`Checkpoint.save_and_digest` after a copy to the host:
  what `transcript.Recorder` does for training on the CPU, and did for every device before):
  `baseline_seconds`, all of which the loop waits for;
- contender, `transcript.CheckpointWriter`: `blocked_seconds` is what the loop waits for (the
  copy into the writer's host buffer), `background_seconds` the rest (hashing and writing with
  direct I/O, in a thread, while a GPU would be training).

`blocked_over_baseline` is the ratio of the medians. On a GPU the host's cores are idle while it
trains, so the background part costs training nothing; on a CPU job it would compete with
training, which is why `Recorder` saves in the loop there (see `bench_verify.py --task llm`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("dvm_llm_finetune") is None:  # not installed yet: the source tree
    sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import eprint, loadavg  # noqa: E402
from dvm_llm_finetune import transcript as T  # noqa: E402

SIDE = 2048


def state(params: int, device: torch.device) -> T.Checkpoint:
    g = torch.Generator(device=device).manual_seed(0)
    tensors, left, i = {}, params, 0
    while left > 0:
        n = min(left, SIDE * SIDE)
        shape = (n // SIDE, SIDE) if n % SIDE == 0 else (n,)
        tensors[f"model/layer.{i}.weight"] = torch.randn(shape, generator=g, device=device)
        tensors[f"optim/{i}/exp_avg"] = torch.randn(shape, generator=g, device=device)
        tensors[f"optim/{i}/exp_avg_sq"] = torch.rand(shape, generator=g, device=device)
        tensors[f"optim/{i}/step"] = torch.tensor(100.0)
        left, i = left - n, i + 1
    return T.Checkpoint(100, tensors, {"format": T.CHECKPOINT_FORMAT, "step": 100,
                                       "param_groups": [{"lr": 1e-4}], "scheduler": {"last_epoch": 100}})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_the_loop(point: T.Checkpoint, path: Path) -> tuple[float, tuple]:
    started = time.perf_counter()
    host = T.Checkpoint(point.step, {k: v.to("cpu") for k, v in point.tensors.items()}, point.meta)
    digests = host.save_and_digest(path)
    return time.perf_counter() - started, digests


def in_the_background(writer: T.CheckpointWriter, point: T.Checkpoint, path: Path) -> tuple[float, float, tuple]:
    started = time.perf_counter()
    future = writer.write(point, path)
    sync(point.tensors[next(iter(point.tensors))].device)
    blocked = time.perf_counter() - started
    writer.wait()
    return blocked, time.perf_counter() - started - blocked, future.result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6, help="fp32 parameters (default 25e6: 300 MB saved)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    point = state(int(args.params), device)
    size = sum(t.numel() * t.element_size() for t in point.tensors.values())
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    writer = T.CheckpointWriter()
    eprint(f"{size / 1e6:.0f} MB a checkpoint on {device}: warm-up")
    in_the_loop(point, root / "warm-baseline.safetensors")
    in_the_background(writer, point, root / "warm-writer.safetensors")
    baseline, blocked, background = [], [], []
    for r in range(args.rounds):
        folder = root / f"round-{r}"
        folder.mkdir()
        for contender in ((False, True) if r % 2 == 0 else (True, False)):
            if contender:
                b, g, ours = in_the_background(writer, point, folder / "writer.safetensors")
                blocked.append(b)
                background.append(g)
            else:
                s, theirs = in_the_loop(point, folder / "baseline.safetensors")
                baseline.append(s)
        if ours != theirs:
            raise SystemExit(f"the two ways gave different digests: {ours} {theirs}")
        eprint(f"round {r + 1}: in the loop {baseline[-1]:.3f}s; background writer: the loop waits "
               f"{blocked[-1]:.3f}s, then {background[-1]:.3f}s in the background")
        shutil.rmtree(folder)
    writer.close()
    shutil.rmtree(root)
    base_s, blocked_s = statistics.median(baseline), statistics.median(blocked)
    print(json.dumps({
        "blocked_over_baseline": round(blocked_s / base_s, 4),
        "blocked_seconds": round(blocked_s, 4), "baseline_seconds": round(base_s, 4),
        "background_seconds": round(statistics.median(background), 4),
        "checkpoint_bytes": size, "device": str(device), "direct_io": writer.direct, "rounds": args.rounds,
        "torch": torch.__version__, "machine": platform.machine(), "loadavg": loadavg(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
