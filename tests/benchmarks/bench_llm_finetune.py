"""Benchmark of the llm-finetune plugin's training loop against a plain transformers `Trainer`.

    .venv/bin/python tests/benchmarks/bench_llm_finetune.py [--rounds 3] [--epochs 2] [--threads 1]

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module. Offline: the
model is a small GPT-2 built from a config (random weights) with a BPE tokenizer trained here
(the builders of tests/test_llm_finetune.py), saved once as a safetensors model folder.

Both sides fully fine-tune the same model (same initial weights, loaded from that folder) on
the same data (documents of 1-10 sentences of a small grammar, 9-100 tokens, with the
end-of-sequence token), for the same epochs, batch size (8, the Trainer's default), learning
rate, linear decay without warm-up, no weight decay, AdamW, the same thread count, in this
process:

- plugin: `dvm_llm_finetune.train.train`, the function a job runs (Accelerate; packing off:
  random batches of 8 examples like the Trainer's, but the examples of a batch share rows as
  long as its longest, each attending only to itself, so little compute goes to padding;
  cancellation and time checks).
- baseline: `transformers.Trainer` with its defaults otherwise: random batches padded per batch
  (`DataCollatorForSeq2Seq`, labels padded with -100), its own loop and logging hooks.

Throughput counts real tokens only (not padding): tokens trained on / seconds of the training
loop (the plugin's epochs; the Trainer's ``train_runtime``). `ratio` (the goal: ≥ 1.0) is the
median over rounds of plugin / baseline tokens per second within the round; each round runs
both in alternating order, after one warm-up of each; round r seeds both sides with r (the
order of examples, dropout). Both final eval losses are measured by the same function
(`train.evaluate`: mean next-token loss per token over 100 held-out documents, each on its
own) and averaged over the rounds (one seed's shuffle moves them by ~0.003); the goal is
plugin_eval_loss ≤ baseline_eval_loss. The per-round values are printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("dvm_llm_finetune") is None:  # not installed yet: the source tree
    sys.path.insert(0, str(REPO / "plugins"))
sys.path.insert(0, str(REPO))

from dvm_llm_finetune import data as datamod  # noqa: E402
from dvm_llm_finetune.params import FinetuneParams  # noqa: E402
from dvm_llm_finetune.train import TrainSpec, evaluate, train  # noqa: E402
from tests.test_llm_finetune import build_tokenizer, sentences  # noqa: E402

BATCH = 8          # the Trainer's default per-device batch size


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = sentences(n * 6, seed=seed)
    return [" ".join(rng.sample(pool, rng.randint(1, 10))) for _ in range(n)]


def build_model_folder(folder: Path, tokenizer, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def run_plugin(folder: Path, tokenizer, train_ex, eval_ex, args, out: Path, seed: int = 0) -> dict:
    params = FinetuneParams(method="full", learning_rate=args.lr, lr_schedule="linear", warmup_ratio=0.0,
                            weight_decay=0.0, epochs=args.epochs, max_seq_length=128, batch_size=BATCH,
                            seed=seed, packing=False, eval_fraction=0.0)
    spec = TrainSpec(model_folder=str(folder), model_type="gpt2", base_model_name="bench", params=params.as_dict(),
                     output_dir=str(out))
    outcome = train(spec, train_ex, eval_ex, tokenizer)
    return {"tokens": outcome.tokens_seen, "seconds": outcome.train_seconds,
            "tokens_per_s": outcome.tokens_per_s, "eval_loss": outcome.after["eval_loss"]}


def run_baseline(folder: Path, tokenizer, train_ex, eval_ex, args, out: Path, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in train_ex]
    training_args = TrainingArguments(output_dir=str(out), num_train_epochs=args.epochs, learning_rate=args.lr,
                                      per_device_train_batch_size=BATCH, seed=seed, report_to=[],
                                      save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=datamod.IGNORE))
    with contextlib.redirect_stdout(sys.stderr):   # Trainer prints its logs: stdout holds only our JSON
        metrics = trainer.train().metrics
    tokens = sum(len(e.input_ids) for e in train_ex) * args.epochs
    seconds = metrics["train_runtime"]
    eval_batches = datamod.eval_batches(eval_ex, batch_size=8, pad_id=tokenizer.pad_token_id)
    eval_loss = evaluate(trainer.model, eval_batches, torch.device("cpu"))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "eval_loss": eval_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a shared 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    transformers.logging.set_verbosity_error()

    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    folder = build_model_folder(work / "model", tokenizer)
    train_set = datamod.Dataset([{"text": t} for t in documents(args.examples, seed=1)], "text", "", 0)
    eval_set = datamod.Dataset([{"text": t} for t in documents(100, seed=2)], "text", "", 0)
    train_ex = datamod.tokenize(train_set, tokenizer, 128, what="training set").examples
    eval_ex = datamod.tokenize(eval_set, tokenizer, 128, what="evaluation set").examples
    lengths = [len(e.input_ids) for e in train_ex]
    log(f"{len(train_ex)} training documents, {sum(lengths)} tokens ({min(lengths)}-{max(lengths)} per document)")

    sides = {"plugin": run_plugin, "baseline": run_baseline}
    for name, fn in sides.items():  # warm-up: first-use allocations, lazy imports
        log(f"warm-up {name}")
        fn(folder, tokenizer, train_ex[:64], eval_ex[:8], argparse.Namespace(**{**vars(args), "epochs": 1}),
           work / f"warm-{name}")

    runs: dict[str, list[dict]] = {"plugin": [], "baseline": []}
    ratios = []
    for r in range(args.rounds):
        order = ["plugin", "baseline"] if r % 2 == 0 else ["baseline", "plugin"]
        for name in order:
            started = time.perf_counter()
            result = sides[name](folder, tokenizer, train_ex, eval_ex, args, work / f"{name}-{r}", seed=r)
            runs[name].append(result)
            log(f"round {r + 1}/{args.rounds} {name}: {result['tokens_per_s']:.0f} tokens/s, "
                f"eval loss {result['eval_loss']:.4f} ({time.perf_counter() - started:.1f} s)")
        ratios.append(runs["plugin"][-1]["tokens_per_s"] / runs["baseline"][-1]["tokens_per_s"])

    plugin_rate = statistics.median(r["tokens_per_s"] for r in runs["plugin"])
    baseline_rate = statistics.median(r["tokens_per_s"] for r in runs["baseline"])
    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_padded = sum(max(lengths[i] for i in order[s:s + BATCH]) * len(order[s:s + BATCH])
                        for s in range(0, len(order), BATCH))
    print(json.dumps({
        "plugin_tokens_per_s": round(plugin_rate, 1),
        "baseline_tokens_per_s": round(baseline_rate, 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_of_medians": round(plugin_rate / baseline_rate, 3),
        "ratios": [round(x, 3) for x in ratios],
        "plugin_eval_loss": round(statistics.mean(r["eval_loss"] for r in runs["plugin"]), 4),
        "baseline_eval_loss": round(statistics.mean(r["eval_loss"] for r in runs["baseline"]), 4),
        "plugin_eval_losses": [round(r["eval_loss"], 4) for r in runs["plugin"]],
        "baseline_eval_losses": [round(r["eval_loss"], 4) for r in runs["baseline"]],
        "baseline_padding_share_estimate": round(1 - sum(lengths) / random_padded, 3),
        "setup": {"model": "gpt2 n_embd=128 n_layer=2", "vocab": len(tokenizer), "method": "full",
                  "train_documents": len(train_ex), "train_tokens": sum(lengths), "eval_documents": len(eval_ex),
                  "epochs": args.epochs, "batch_size": BATCH, "learning_rate": args.lr, "schedule": "linear",
                  "threads": args.threads, "rounds": args.rounds},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }))


if __name__ == "__main__":
    main()
