"""Benchmark of federated LLM fine-tuning in DiLoCo mode on loopback: federated against
centralised for the same tokens, the bytes a round moves with and without compression, and a
round's wall time against the providers' training time.

    .venv/bin/python tests/benchmarks/bench_federated_llm.py [--providers 3] [--rounds 3]
        [--inner-steps 800] [--batch-size 8] [--learning-rate 3e-3] [--examples 500]

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module.

Fresh for each run, in a temporary directory, as `dvm federate --task llm --local N` starts it
(`dvm_federate.commands.local_marketplace`): a relay, a Nutshell mint (FakeWallet) and a blob
server, each a child process on 127.0.0.1, and N providers, each a `dvm run` process serving
llm-finetune with its share of the cores (OMP_NUM_THREADS = cores // N, at least 1). The model
is the tiny GPT-2 the tests build (`dvm_federate.tiny`, 2 layers, width 64, about 140 k
parameters, random weights) and the data the toy grammar: `--examples` sentences per provider to
train on, 60 held out.

1. A warm-up round (2 inner steps, its own folder): each provider process imports torch and
   transformers on its first job; no figure is taken from it.
2. `none`: `--rounds` DiLoCo rounds, H = `--inner-steps`, batch `--batch-size` per provider, the
   inner learning rate constant, outer Nesterov (lr 0.7, momentum 0.9), every update scored
   (the default), pseudo-gradients sent as float32; then the centralised baseline here: one
   model, full fine-tuning on all the shards for rounds × H steps of batch N × batch-size, the same
   tokens (`LlmFederation.centralised_baseline`, the plugin's own training loop).
3. `int8`: the same rounds with the pseudo-gradients sent as int8 with per-row scales.

Figures:
- `loss_ratio` = the held-out loss after the last `none` round / the centralised baseline's
  (goal ≤ 1.02); `int8_loss_ratio` = int8's last loss / none's (the loss cost of compressing).
- `compression_ratio` = bytes of pseudo-gradients received per round, none / int8 (what the
  compression acts on); `moved_ratio` the same with the model archive sent to each provider
  counted too (that direction is not compressed: a provider is hired per job and holds no
  earlier weights to apply a compressed outer step to).
- `overhead_ratio` = the median over the rounds of both runs of (round wall time / the longest
  training loop of the round's providers, from their model cards' `training.seconds`) (goal ≤ 1.3
  on loopback): what the round adds to the providers' training — requests, payment, the uploads and
  downloads, the providers' loading of model and data, scoring, the merge, the outer step and the
  held-out evaluation.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("dvm_federate") is None:  # not installed yet: the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import eprint, loadavg  # noqa: E402
from dvm_federate import tiny  # noqa: E402
from dvm_federate.commands import local_marketplace  # noqa: E402
from dvm_federate.llm import LlmSettings, federate_llm  # noqa: E402


def per_round(federation) -> list[dict]:
    out = []
    for r in federation.reports:
        trained = [s for s in r.train_seconds.values() if s]
        out.append({"round": r.round, "eval_loss": round(r.eval_loss, 5), "seconds": r.seconds,
                    "train_seconds_max": max(trained) if trained else None, "bytes_up": r.bytes_up,
                    "bytes_down": r.bytes_down, "merged": len(r.providers), "dropped": len(r.dropped)})
    return out


async def bench(args) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="bench-federated-llm-"))
    n = args.providers
    model = tiny.save_model_folder(root / "model", "gpt2")
    train = tiny.write_corpus(root / "train.jsonl", args.examples * n, seed=1)
    test = tiny.write_corpus(root / "test.jsonl", 60, seed=2)
    base = LlmSettings(mode="diloco", rounds=args.rounds, inner_steps=args.inner_steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, max_seq_length=64, allow_private_urls=True,
                       job_timeout=args.job_timeout, score=not args.no_score)
    runs: dict = {}
    async with local_marketplace(n, "llm-finetune", root / "market", funds=100_000, say=eprint) as market:
        async def federate(name: str, **changes):
            import dataclasses
            settings = dataclasses.replace(base, **changes)
            started = time.perf_counter()
            federation = await federate_llm(market.customer, market.wallet, market.providers, train, test, model,
                                            market.servers, root / name, settings, say=eprint)
            eprint(f"{name}: {time.perf_counter() - started:.1f}s")
            return federation

        await federate("warm-up", rounds=1, inner_steps=2, score=False)
        runs["none"] = await federate("none", baseline=True)
        runs["int8"] = await federate("int8", compression="int8")
    none, int8 = runs["none"], runs["int8"]
    from safetensors.torch import load_file
    parameters = sum(v.numel() for v in load_file(str(model / "model.safetensors")).values())
    up = {k: statistics.mean(r.bytes_up for r in f.reports) for k, f in runs.items()}
    moved = {k: statistics.mean(r.bytes_up + r.bytes_down for r in f.reports) for k, f in runs.items()}
    overheads = [r.seconds / max(s for s in r.train_seconds.values() if s)
                 for f in runs.values() for r in f.reports if any(r.train_seconds.values())]
    final = {k: f.reports[-1].eval_loss for k, f in runs.items()}
    return {
        "benchmark": "federated LLM fine-tuning, DiLoCo, loopback",
        "providers": n, "rounds": args.rounds, "inner_steps": args.inner_steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "outer_lr": base.outer_lr, "outer_momentum": base.outer_momentum,
        "scored": not args.no_score,
        "model_parameters": parameters,
        "initial_loss": round(none.initial_loss, 5),
        "federated_loss": round(final["none"], 5), "centralised_loss": round(none.baseline, 5),
        "centralised_plan": none.baseline_plan(),
        "loss_ratio": round(final["none"] / none.baseline, 4), "loss_ratio_goal": 1.02,
        "int8_loss": round(final["int8"], 5), "int8_loss_ratio": round(final["int8"] / final["none"], 4),
        "bytes_up_per_round": {k: round(v) for k, v in up.items()},
        "bytes_moved_per_round": {k: round(v) for k, v in moved.items()},
        "compression_ratio": round(up["none"] / up["int8"], 3),
        "moved_ratio": round(moved["none"] / moved["int8"], 3),
        "overhead_ratio": round(statistics.median(overheads), 3), "overhead_ratio_goal": 1.3,
        "overhead_ratios": [round(o, 3) for o in overheads],
        "rounds_none": per_round(none), "rounds_int8": per_round(int8),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "loadavg_end": loadavg()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--examples", type=int, default=500,
                        help="training sentences per provider (H steps of the batch must fit in 19 passes)")
    parser.add_argument("--job-timeout", type=float, default=600)
    parser.add_argument("--no-score", action="store_true", help="merge every update unscored")
    args = parser.parse_args()
    from dvm_core.cli.logs import configure_logging
    configure_logging("console", "warning")   # stdout holds the JSON only
    print(json.dumps(asyncio.run(bench(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
