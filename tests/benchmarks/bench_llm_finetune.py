"""Benchmark of the llm-finetune plugin's training loop against a plain transformers `Trainer`.

    .venv/bin/python tests/benchmarks/bench_llm_finetune.py [--rounds 3] [--epochs 2] [--threads 1]
        [--device cpu|cuda|cuda:N] [--model gpt2-tiny|llama-135m|llama-1b] [--method full|lora]
        [--doc-tokens 9-100|500-2000] [--max-steps N] [--peak-flops F]

On a GPU (issue 18's figures), e.g. a 1.1 B Llama, LoRA, documents of 500-2,000 tokens:

    ... bench_llm_finetune.py --device cuda --model llama-1b --method lora --doc-tokens 500-2000 \
        --seq-len 2048 --examples 400 --epochs 1 --rounds 1

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module. Offline: the
model is a small GPT-2 built from a config (random weights) with a BPE tokenizer trained here
(the builders of tests/test_llm_finetune.py), saved once as a safetensors model folder.

Both sides fine-tune (`--method`: full, or LoRA on the architecture's default targets, r=16)
the same model (same initial weights, loaded from that folder) on the same data (documents of
sentences of a small grammar, `--doc-tokens` long, with the end-of-sequence token), for the
same epochs, batch size (8, the Trainer's default), learning rate, linear decay without
warm-up, no weight decay, AdamW, the same thread count, on the same `--device`, in this
process. On a GPU both train in bf16 mixed precision (fp16 where bf16 is missing) and, for
LoRA, both load the frozen base in that precision (the plugin decides so itself; the Trainer
gets ``dtype=bfloat16``, the usual recipe). Models (random weights, built here, no download):
``gpt2-tiny`` (n_embd 128, 2 layers: the CPU default), ``llama-135m`` (SmolLM-135M's shape),
``llama-1b`` (TinyLlama-1.1B's shape), each with a 32,000-token vocabulary except gpt2-tiny:

- plugin: `dvm_llm_finetune.train.train`, the function a job runs (Accelerate; packing off:
  random batches of 8 examples like the Trainer's, but the examples of a batch share rows as
  long as its longest, each attending only to itself, so little compute goes to padding;
  cancellation and time checks).
- baseline: `transformers.Trainer` with its defaults otherwise: random batches padded per batch
  (`DataCollatorForSeq2Seq`, labels padded with -100), its own loop and logging hooks.

Throughput counts real tokens only (not padding): tokens trained on / seconds of the training
loop (the plugin's epochs; the Trainer's ``train_runtime``). MFU where a peak is known
(`--peak-flops`; on ``cuda`` by default 790e12, an H200's dense bf16): 6 · parameters ·
tokens/s ÷ peak (the convention of issue 18, for LoRA too). `*_peak_gib`: the device's peak
memory during that side's run (CUDA only). `ratio` (the goal: ≥ 1.0) is the
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


def documents(n: int, seed: int, tokens: tuple[int, int] = (9, 100)) -> list[str]:
    """`n` documents of sentences of the small grammar, about `tokens` (min, max) tokens each
    (a sentence is about 9 tokens)."""
    rng = random.Random(seed)
    if tokens == (9, 100):   # the CPU default, as it always was: 1-10 distinct sentences
        pool = sentences(n * 6, seed=seed)
        return [" ".join(rng.sample(pool, rng.randint(1, 10))) for _ in range(n)]
    pool = sentences(max(n * 6, 2000), seed=seed)
    low, high = max(1, tokens[0] // 9), max(1, tokens[1] // 9)
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(low, high))) for _ in range(n)]


MODELS = {
    "gpt2-tiny": ("gpt2", {"n_embd": 128, "n_layer": 2, "n_head": 4}),
    "llama-135m": ("llama", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 32000,
                             "tie_word_embeddings": True}),
    "llama-1b": ("llama", {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                           "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                           "tie_word_embeddings": False}),
}


def build_model_folder(folder: Path, tokenizer, seed: int = 0, name: str = "gpt2-tiny",
                       positions: int = 128) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kind, shape = MODELS[name]
    if kind == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, **shape,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(max_position_embeddings=max(positions, 2048), **shape,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def precision_of(device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device):
    precision = precision_of(device)
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / (1 << 30), 2) if device.type == "cuda" else None


def run_plugin(folder: Path, tokenizer, train_ex, eval_ex, args, out: Path, seed: int = 0) -> dict:
    device = torch.device(args.device)
    params = FinetuneParams(method=args.method, learning_rate=args.lr, lr_schedule="linear", warmup_ratio=0.0,
                            weight_decay=0.0, epochs=args.epochs, max_seq_length=args.seq_len, batch_size=BATCH,
                            seed=seed, packing=args.packing, eval_fraction=0.0, max_steps=args.max_steps,
                            lora_r=16, lora_alpha=32, lora_dropout=0.0)
    spec = TrainSpec(model_folder=str(folder), model_type=MODELS[args.model][0], base_model_name="bench",
                     params=params.as_dict(), output_dir=str(out), device=args.device)
    reset_peak(device)
    outcome = train(spec, train_ex, eval_ex, tokenizer)
    return {"tokens": outcome.tokens_seen, "seconds": outcome.train_seconds, "steps": outcome.steps,
            "tokens_per_s": outcome.tokens_per_s, "eval_loss": outcome.after["eval_loss"],
            "parameters": outcome.total_parameters, "peak_gib": peak_gib(device),
            "base_dtype": outcome.extra.get("base_dtype"), "mixed_precision": outcome.mixed_precision}


def run_baseline(folder: Path, tokenizer, train_ex, eval_ex, args, out: Path, seed: int = 0) -> dict:
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    device = torch.device(args.device)
    precision = precision_of(device)
    lora = args.method == "lora"
    dtype = torch.bfloat16 if lora and precision == "bf16" else torch.float32
    reset_peak(device)
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    if lora:
        from peft import LoraConfig, get_peft_model

        from dvm_llm_finetune.model import lora_targets

        targets = lora_targets(model, MODELS[args.model][0], None)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                                                 bias="none", task_type="CAUSAL_LM"))
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in train_ex]
    training_args = TrainingArguments(output_dir=str(out), num_train_epochs=args.epochs, learning_rate=args.lr,
                                      per_device_train_batch_size=BATCH, seed=seed, report_to=[],
                                      save_strategy="no", use_cpu=device.type == "cpu", disable_tqdm=True,
                                      bf16=precision == "bf16", fp16=precision == "fp16",
                                      max_steps=args.max_steps or -1, lr_scheduler_type="linear",
                                      weight_decay=0.0, warmup_steps=0)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    trainer = Trainer(model=model, args=training_args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=datamod.IGNORE))
    with contextlib.redirect_stdout(sys.stderr):   # Trainer prints its logs: stdout holds only our JSON
        result = trainer.train()
    metrics = result.metrics
    steps = result.global_step
    if args.max_steps:   # the tokens of the batches it trained on: its sampler's order is its own
        tokens = round(sum(len(e.input_ids) for e in train_ex) * steps * BATCH / len(train_ex))
    else:
        tokens = sum(len(e.input_ids) for e in train_ex) * args.epochs
    seconds = metrics["train_runtime"]
    eval_batches = datamod.eval_batches(eval_ex, batch_size=8, pad_id=tokenizer.pad_token_id)
    with autocast(device):
        eval_loss = evaluate(trainer.model, eval_batches, device)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "eval_loss": eval_loss,
            "steps": steps, "parameters": parameters, "peak_gib": peak_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=800)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steady on a shared 2-core machine)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: both sides train there")
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2-tiny")
    parser.add_argument("--method", choices=["full", "lora"], default="full")
    parser.add_argument("--doc-tokens", default="9-100", help="documents' length in tokens, MIN-MAX (about)")
    parser.add_argument("--seq-len", type=int, default=128, help="max_seq_length (longer documents are split)")
    parser.add_argument("--packing", action="store_true", help="the plugin packs rows of --seq-len tokens")
    parser.add_argument("--max-steps", type=int, default=None, help="stop both sides after this many steps")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="the device's peak FLOP/s for MFU (default: 790e12 on cuda, none on cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = args.peak_flops or (790e12 if device.type == "cuda" else None)
    doc_tokens = tuple(int(x) for x in args.doc_tokens.split("-"))

    import transformers
    transformers.logging.set_verbosity_error()

    work = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    folder = build_model_folder(work / "model", tokenizer, name=args.model, positions=args.seq_len)
    train_set = datamod.Dataset([{"text": t} for t in documents(args.examples, seed=1, tokens=doc_tokens)],
                                "text", "", 0)
    eval_set = datamod.Dataset([{"text": t} for t in documents(args.eval_examples, seed=2, tokens=doc_tokens)],
                               "text", "", 0)
    train_ex = datamod.tokenize(train_set, tokenizer, args.seq_len, what="training set").examples
    eval_ex = datamod.tokenize(eval_set, tokenizer, args.seq_len, what="evaluation set").examples
    lengths = train_ex.lengths.tolist()
    log(f"{len(train_ex)} training documents, {sum(lengths)} tokens ({min(lengths)}-{max(lengths)} per document), "
        f"{args.model} {args.method} on {device}")

    sides = {"plugin": run_plugin, "baseline": run_baseline}
    for name, fn in sides.items():  # warm-up: first-use allocations, lazy imports
        log(f"warm-up {name}")
        fn(folder, tokenizer, train_ex[:64], eval_ex[:8],
           argparse.Namespace(**{**vars(args), "epochs": 1, "max_steps": min(args.max_steps or 8, 8)}),
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
    parameters = runs["plugin"][-1]["parameters"]

    def mfu(rate: float) -> float | None:
        return round(6 * parameters * rate / peak, 4) if peak else None

    print(json.dumps({
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "plugin_tokens_per_s": round(plugin_rate, 1),
        "baseline_tokens_per_s": round(baseline_rate, 1),
        "plugin_mfu": mfu(plugin_rate),
        "baseline_mfu": mfu(baseline_rate),
        "peak_flops": peak,
        "plugin_peak_gib": max((r["peak_gib"] or 0 for r in runs["plugin"]), default=None) or None,
        "baseline_peak_gib": max((r["peak_gib"] or 0 for r in runs["baseline"]), default=None) or None,
        "plugin_base_dtype": runs["plugin"][-1]["base_dtype"],
        "plugin_mixed_precision": runs["plugin"][-1]["mixed_precision"],
        "steps": {"plugin": runs["plugin"][-1]["steps"], "baseline": runs["baseline"][-1]["steps"]},
        "ratio": round(statistics.median(ratios), 3),
        "ratio_of_medians": round(plugin_rate / baseline_rate, 3),
        "ratios": [round(x, 3) for x in ratios],
        "plugin_eval_loss": round(statistics.mean(r["eval_loss"] for r in runs["plugin"]), 4),
        "baseline_eval_loss": round(statistics.mean(r["eval_loss"] for r in runs["baseline"]), 4),
        "plugin_eval_losses": [round(r["eval_loss"], 4) for r in runs["plugin"]],
        "baseline_eval_losses": [round(r["eval_loss"], 4) for r in runs["baseline"]],
        "baseline_padding_share_estimate": round(1 - sum(lengths) / random_padded, 3),
        "setup": {"model": args.model, "parameters": parameters, "tokenizer_vocab": len(tokenizer),
                  "method": args.method, "train_documents": len(train_ex), "train_tokens": sum(lengths),
                  "eval_documents": len(eval_ex), "doc_tokens": args.doc_tokens, "seq_len": args.seq_len,
                  "packing": args.packing, "epochs": args.epochs, "max_steps": args.max_steps,
                  "batch_size": BATCH, "learning_rate": args.lr, "schedule": "linear",
                  "threads": args.threads, "rounds": args.rounds},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }))


if __name__ == "__main__":
    main()
