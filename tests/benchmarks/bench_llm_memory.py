"""Host memory of the llm-finetune plugin's data path: does it grow with the dataset?

    PYTHONPATH=plugins .venv/bin/python tests/benchmarks/bench_llm_memory.py [--tokens 20e6] [--seq-len 2048]

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module. CPU only, no
model: what is measured is reading the customer's JSONL, tokenizing it and building one epoch's
batches, the host memory a training job holds besides the model.

Input: synthetic documents of 500-2,000 tokens (sentences of the tests' small grammar, with the
tests' byte-level BPE tokenizer, trained here, offline), written as a ``{"text": ...}`` JSONL file
to a temporary directory, deleted at the end. Each side runs in a fresh child process; its peak
is the child's peak resident set (``VmHWM``), interpreter, torch and tokenizer included, its
baseline the resident set just before reading the data (``VmRSS``):

- ours (`--tokens`, ≥ 20 M by default): `data.read_jsonl` (checks every line, keeps none),
  `data.tokenize` (one pass over the records, the int32 token ids and bool targets written to a
  temporary file in the work folder as they come; only per-example starts, lengths and loss
  counts stay in memory), `data.epoch_batches` with packing into rows of `--seq-len` tokens, 8
  rows a batch, and every batch of the epoch built in turn (`Batches` builds one when it is
  reached, reading its examples from the file with ``os.pread``) and dropped, as the training
  loop does. The file's pages are in the page cache, not in the process's resident set; its
  size is reported (`examples_on_disk_mb`, about 5 bytes a token).
- old (`--old-tokens`, 1 M by default: it needs about 2 GB per million tokens at L = 2,048): what
  the plugin did at first, the same data path with the examples as lists of Python ints and
  the whole epoch's batches built up front, each with its rows × L × L boolean mask.

Figures: `tokens` (ours), `seq_len`, `peak_rss_gib` (ours, goal ≤ 2 whatever the epoch size),
`gib_per_million_tokens` = (peak − baseline) / tokens in millions, the same for the old path
(`old_gib_per_million_tokens`) and `old_over_ours` (their ratio).

Measured (2 CPU cores shared with other work, load average 1-4, L = 2,048):

- before the token file (records kept, examples as int32/bool arrays in memory): 20.5 M tokens,
  peak 0.616-0.625 GiB, 0.0173-0.0178 GiB per million tokens (about 19 bytes a token: the
  records, the arrays and their growth copies); 60 M tokens, 1.298 GiB, 0.0173.
- with it: 20.5 M tokens, peak 0.272 GiB, 0.0006 GiB per million; 60 M tokens, 0.278 GiB,
  0.0003 (of a 0.26 GiB baseline: what is left is a few MB of buffers and about 100 bytes an
  example for the epoch's plan). The file: 103 and 301 MB on disk.
- the time is mostly the tokenizer's: 23-92 s for 20.5 M tokens and 84-365 s for 60 M here,
  depending on the load (too noisy to tell the two paths' speeds apart).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BATCH = 8
GIB = 1 << 30

CHILD = r'''
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/plugins"]
spec = json.loads(sys.argv[2])


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


import random
from pathlib import Path

import torch
from dvm_llm_finetune import data as datamod
from dvm_llm_finetune.model import load_tokenizer

tokenizer = load_tokenizer(Path(spec["tokenizer"]))
baseline = status("VmRSS")
start = time.perf_counter()
dataset = datamod.read_jsonl(Path(spec["data"]), what="training set", max_bytes=1 << 40, max_examples=10**9)
tokenized = datamod.tokenize(dataset, tokenizer, spec["seq_len"], what="training set", folder=Path(spec["work"]))
tokenize_s = time.perf_counter() - start
length = spec["seq_len"]
batches = datamod.epoch_batches(tokenized.examples, batch_size=spec["batch"], packing=True, length=length,
                                pad_id=tokenizer.pad_token_id, rng=random.Random(0))
if spec["side"] == "old":
    # Before: examples as lists of Python ints, the epoch's batches all built up front, each
    # with its rows x L x L boolean mask (data.collate_rows of the time).
    examples = list(tokenized.examples)
    del tokenized
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    epoch = []
    for plan in batches.plans:
        batch = datamod.collate_rows([[examples[i] for i in row] for row in plan], tokenizer.pad_token_id, length)
        document = batch.document if batch.document is not None else \
            torch.zeros_like(batch.input_ids).masked_fill(batch.labels == -100, -1)
        mask = (document[:, :, None] == document[:, None, :]) & causal
        epoch.append((batch, mask[:, None]))
    tokens = sum(b.tokens for b, _ in epoch)
else:
    tokens = 0
    for batch in batches:          # one batch at a time, as training uses them
        tokens += batch.tokens
print(json.dumps({"tokens": tokens, "batches": len(batches), "examples": len(dataset.records),
                  "on_disk_bytes": batches.examples.nbytes if batches.examples.on_disk else 0,
                  "peak": status("VmHWM"), "baseline": baseline, "seconds": time.perf_counter() - start,
                  "tokenize_s": tokenize_s}))
'''


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def write_documents(path: Path, tokens: float, tokenizer, seed: int) -> int:
    """Documents of 500-2,000 tokens (about) until `tokens` tokens; the words written."""
    sys.path.insert(0, str(REPO))
    from dvm_federate.tiny import ADJS, NOUNS, VERBS

    rng = random.Random(seed)
    sample = " ".join(f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
                      for _ in range(200))
    per_sentence = len(tokenizer(sample)["input_ids"]) / 200
    written = 0.0
    with open(path, "w", encoding="utf-8") as f:
        while written < tokens:
            n = rng.randint(int(500 / per_sentence), int(2000 / per_sentence))
            text = " ".join(f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
                            for _ in range(n))
            f.write(json.dumps({"text": text}) + "\n")
            written += n * per_sentence
    return int(written)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO), json.dumps(spec)], capture_output=True,
                          text=True, env={**__import__("os").environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"the {spec['side']} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=20.5e6, help="the epoch's tokens (ours)")
    parser.add_argument("--old-tokens", type=float, default=1e6, help="the epoch's tokens (old path); 0: skip")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    sys.path[:0] = [str(REPO), str(REPO / "plugins")]
    from tests.test_llm_finetune import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-llm-memory-"))
    try:
        tokenizer = build_tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(str(work / "tokenizer"))
        results = {}
        for side, tokens in (("ours", args.tokens), ("old", args.old_tokens)):
            if tokens <= 0:
                continue
            data = work / f"{side}.jsonl"
            started = time.perf_counter()
            write_documents(data, tokens, tokenizer, seed=1)
            log(f"{side}: {data.stat().st_size / 1e6:.0f} MB of documents written "
                f"({time.perf_counter() - started:.1f} s); reading, tokenizing, batching")
            results[side] = run_child({"side": "old" if side == "old" else "new", "data": str(data),
                                       "tokenizer": str(work / "tokenizer"), "seq_len": args.seq_len, "work": str(work),
                                       "batch": BATCH})
            r = results[side]
            log(f"{side}: {r['tokens']:,} tokens, peak {r['peak'] / GIB:.2f} GiB "
                f"(baseline {r['baseline'] / GIB:.2f}), {r['seconds']:.1f} s")
            data.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def per_million(r: dict) -> float:
        return (r["peak"] - r["baseline"]) / GIB / (r["tokens"] / 1e6)

    ours = results["ours"]
    out = {
        "tokens": ours["tokens"],
        "seq_len": args.seq_len,
        "peak_rss_gib": round(ours["peak"] / GIB, 3),
        "gib_per_million_tokens": round(per_million(ours), 4),
        "baseline_rss_gib": round(ours["baseline"] / GIB, 3),
        "examples": ours["examples"],
        "batches": ours["batches"],
        "seconds": round(ours["seconds"], 1),
        "tokenize_s": round(ours["tokenize_s"], 1),
        "examples_on_disk_mb": round(ours["on_disk_bytes"] / 1e6, 1),
    }
    if "old" in results:
        old = results["old"]
        out.update({"old_tokens": old["tokens"], "old_peak_rss_gib": round(old["peak"] / GIB, 3),
                    "old_gib_per_million_tokens": round(per_million(old), 4),
                    "old_over_ours": round(per_million(old) / per_million(ours), 1),
                    "old_projected_gib_at_ours_tokens": round(old["baseline"] / GIB + per_million(old)
                                                              * ours["tokens"] / 1e6, 1)})
    out["setup"] = {"batch_size": BATCH, "packing": True, "documents_tokens": "500-2000", "python":
                    platform.python_version()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
