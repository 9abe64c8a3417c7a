"""Benchmark of `dvm_fedavg.merge.merge_files` (FedAvg) against Flower's ``aggregate()``.

    PYTHONPATH=plugins .venv/bin/python tests/benchmarks/bench_fedavg.py [--models 8] [--params 100e6]

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module.

Inputs: `--models` safetensors files of a ~`--params`-parameter fp32 transformer-shaped model
(an embedding and 12 blocks of attention and MLP matrices with their norms and biases), random,
written to a temporary directory that is deleted at the end (8 × 400 MB by default). The
files are in the page cache for both sides (written just before, far less than the RAM): what is
measured is the merge, not the disk.

Each side runs in a fresh child process, so that one's memory does not pollute the other's, and
its peak is the child's peak resident set (``VmHWM``), interpreter and libraries included:

- ours: `merge_files(paths, weights, out)`, as a merge job runs it by default: FedAvg reads one
  file at a time, memory-mapped, into one preallocated accumulator (BLAS axpy, the file's pages
  given back as it goes), and writes the merged model to a file. `ours_with_distances_s` adds
  the report's distances to the merged model (``distances=True``: a second read of every file).
- Flower: what a Flower server needs for the same result: each file loaded into numpy
  (``safetensors.numpy.load_file``, the tensors in our file order), then
  ``flwr.server.strategy.aggregate.aggregate([(ndarrays, num_examples), ...])``; the time
  includes the loading, not writing the result. Flower runs in its own virtual environment
  (created on first use under ``~/.cache/dvm-worker/bench-flwr`` with uv, or the interpreter in
  ``$DVM_BENCH_FLWR_PYTHON``): it resolves beside our pins only by downgrading protobuf (7 → 4),
  rich and typer in the project's environment, so it is kept out of it. Its child also checks our
  merged file against its own result (`max_abs_diff_vs_flower`).

Each side runs `--repeat` times (alternating); times are the fastest run, peaks the largest.

- `speedup_vs_flower` = flower_s / ours_s (goal ≥ 5);
- `merge_gb_per_s` = bytes our merge read / ours_s, against `membw_gb_per_s`: this machine's
  memory bandwidth measured in this run, the bytes a large numpy copy (1 GiB, best of 3) copies
  per second (each byte read once and written once);
- `peak_rss_over_model` = our child's peak RSS / one model file's size (goal ≤ 2.5);
  `ours_rss_over_baseline_mb` is the part above the interpreter with torch imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import eprint, loadavg  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FLWR_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dvm-worker" / "bench-flwr"

PEAK = r'''
import re
from pathlib import Path
def status(field):
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
'''

OURS = PEAK + r'''
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from dvm_fedavg.merge import merge_files
spec = json.loads(sys.argv[2])
baseline = status("VmRSS")
start = time.perf_counter()
report = merge_files([Path(p) for p in spec["paths"]], spec["weights"], Path(spec["out"]),
                     distances=spec.get("distances", False))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak": status("VmHWM"), "baseline": baseline,
                  "bytes_read": report.bytes_read, "threads": torch.get_num_threads()}))
'''

FLOWER = PEAK + r'''
import json, sys, time
import numpy as np
from safetensors.numpy import load_file
from flwr.server.strategy.aggregate import aggregate
spec = json.loads(sys.argv[1])
baseline = status("VmRSS")
start = time.perf_counter()
results = []
for path, weight in zip(spec["paths"], spec["weights"]):
    tensors = load_file(path)
    results.append(([tensors[k] for k in spec["keys"]], weight))
merged = aggregate(results)
seconds = time.perf_counter() - start
peak = status("VmHWM")
del results
ours = load_file(spec["out"])
diff = max(float(np.max(np.abs(ours[k].astype(np.float64) - m))) for k, m in zip(spec["keys"], merged))
print(json.dumps({"seconds": seconds, "peak": peak, "baseline": baseline, "max_abs_diff": diff}))
'''


def layout(params: float) -> dict[str, tuple[int, ...]]:
    """A GPT-2-small-like model scaled to about `params` parameters."""
    d, blocks = 768, 12
    per_block = 4 * d * d + 2 * d * 4 * d + 4 * d + 4 * d + 4 * d + d   # attn, mlp, biases, norms
    vocab = max(1000, int((params - blocks * per_block - 2 * d) // d))
    shapes = {"embed.weight": (vocab, d), "final_norm.weight": (d,), "final_norm.bias": (d,)}
    for b in range(blocks):
        p = f"blocks.{b}."
        shapes.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                       p + "attn.out.weight": (d, d), p + "attn.out.bias": (d,),
                       p + "mlp.up.weight": (4 * d, d), p + "mlp.up.bias": (4 * d,),
                       p + "mlp.down.weight": (d, 4 * d), p + "mlp.down.bias": (d,),
                       p + "norm1.weight": (d,), p + "norm2.weight": (d,)})
    return shapes


def write_models(directory: Path, n: int, params: float) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = layout(params)
    paths = []
    for i in range(n):
        t0 = time.perf_counter()
        model = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        path = directory / f"client{i}.safetensors"
        save_file(model, path)
        del model
        paths.append(path)
        eprint(f"wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return paths


def memory_bandwidth(nbytes: int = 1 << 30) -> float:
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def flower_python() -> str:
    """An interpreter with flwr, numpy and safetensors, made on first use."""
    if os.environ.get("DVM_BENCH_FLWR_PYTHON"):
        return os.environ["DVM_BENCH_FLWR_PYTHON"]
    python = FLWR_VENV / "bin" / "python"
    check = [str(python), "-c", "import flwr.server.strategy.aggregate, safetensors.numpy"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python)
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise SystemExit("needs uv (or DVM_BENCH_FLWR_PYTHON=<a python with flwr, numpy, safetensors>)")
    eprint(f"creating {FLWR_VENV} with flwr (once)")
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(FLWR_VENV)], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(python), "flwr", "numpy", "safetensors"],
                   check=True)
    return str(python)


def run_child(argv: list[str]) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the temporary files go (default: the system's)")
    args = parser.parse_args()

    flwr_python = flower_python()
    flwr_version = subprocess.run([flwr_python, "-c", "import flwr; print(flwr.__version__)"],
                                  capture_output=True, text=True).stdout.strip()
    eprint("measuring memory bandwidth")
    membw = memory_bandwidth()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fedavg-", dir=args.dir))
    try:
        paths = write_models(workdir, args.models, args.params)
        sys.path.insert(0, str(REPO / "plugins"))
        from dvm_fedavg.merge import read_header
        tensors, _ = read_header(paths[0])
        with open(paths[0], "rb") as fh:   # the file's own order, as our merge writes it
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        keys = sorted(tensors, key=lambda k: header[k]["data_offsets"][0])
        params = sum(int(np.prod(t["shape"])) for t in tensors.values())
        model_bytes = paths[0].stat().st_size
        weights = [1000 + 137 * i for i in range(args.models)]
        out = workdir / "merged.safetensors"
        spec = {"paths": [str(p) for p in paths], "weights": weights, "out": str(out), "keys": keys}

        ours_runs, flower_runs, distance_runs = [], [], []
        for r in range(args.repeat):
            eprint(f"round {r + 1}/{args.repeat}: ours")
            out.unlink(missing_ok=True)   # as a job does, ours writes a new file (replacing one costs more)
            ours_runs.append(run_child([sys.executable, "-c", OURS, str(REPO / "plugins"), json.dumps(spec)]))
            out.unlink(missing_ok=True)
            distance_runs.append(run_child([sys.executable, "-c", OURS, str(REPO / "plugins"),
                                            json.dumps({**spec, "distances": True})]))
            eprint(f"  ours {ours_runs[-1]['seconds']:.2f} s; Flower")
            flower_runs.append(run_child([flwr_python, "-c", FLOWER, json.dumps(spec)]))
            eprint(f"  flower {flower_runs[-1]['seconds']:.2f} s")
        ours_s = min(x["seconds"] for x in ours_runs)
        flower_s = min(x["seconds"] for x in flower_runs)
        ours_peak = max(x["peak"] for x in ours_runs)
        bytes_read = ours_runs[0]["bytes_read"]
        result = {
            "models": args.models,
            "parameters_per_model": params,
            "model_mb": round(model_bytes / 1e6, 1),
            "ours_s": round(ours_s, 3),
            "ours_with_distances_s": round(min(x["seconds"] for x in distance_runs), 3),
            "speedup_with_distances": round(flower_s / min(x["seconds"] for x in distance_runs), 2),
            "flower_s": round(flower_s, 3),
            "speedup_vs_flower": round(flower_s / ours_s, 2),
            "merge_gb_per_s": round(bytes_read / ours_s / 1e9, 2),
            "membw_gb_per_s": round(membw, 2),
            "merge_over_membw": round(bytes_read / ours_s / 1e9 / membw, 3),
            "peak_rss_over_model": round(ours_peak / model_bytes, 3),
            "ours_peak_rss_mb": round(ours_peak / 1e6, 1),
            "ours_rss_over_baseline_mb": round(max(x["peak"] - x["baseline"] for x in ours_runs) / 1e6, 1),
            "flower_peak_rss_mb": round(max(x["peak"] for x in flower_runs) / 1e6, 1),
            "flower_peak_rss_over_model": round(max(x["peak"] for x in flower_runs) / model_bytes, 3),
            "max_abs_diff_vs_flower": max(x["max_abs_diff"] for x in flower_runs),
            "ours_runs_s": [round(x["seconds"], 3) for x in ours_runs],
            "flower_runs_s": [round(x["seconds"], 3) for x in flower_runs],
            "torch_threads": ours_runs[0]["threads"],
            "flwr_version": flwr_version,
            "loadavg_1min": loadavg(),
            "cpus": os.cpu_count(),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
