"""Benchmark of the image-classifier plugin's training loop against a bare PyTorch loop.

    PYTHONPATH=plugins .venv/bin/python tests/benchmarks/bench_image_classifier.py [--rounds 10] [--epochs 5]
        [--device cpu|cuda|cuda:N]

Prints one JSON object on stdout; progress goes to stderr. Not a pytest module. Needs
scikit-learn (the digits data).

Both sides train the same network (the plugin's ``cnn`` spec for 8×8 grey digits, 10 classes)
from the same initial weights on the same images (digits, the split of
tests/test_image_classifier.py: 1438 training images), with the same batch size, epochs,
optimizer (AdamW, the plugin's param groups), cosine learning-rate schedule and thread count,
on the same `--device` (default: the CPU), in this process. On a GPU both run in the precision
the plugin picks (`dvm_core.devices.precision_for`: bf16 autocast where supported, fp16 else);
the bare loop's images are on the device beforehand and it never reads the loss back:

- plugin: `dvm_image_classifier.train.train`, the function a job runs: Accelerate, the
  DataLoader over uint8 tensors with a seeded batch sampler, per-batch normalisation, metrics,
  NaN checks, cancellation and time checks between batches. No validation set, so no
  evaluation passes.
- bare: the loop one writes by hand: images normalised to float32 once, beforehand (not timed),
  a `torch.randperm` per epoch, slicing, forward, cross-entropy, backward, step.

Samples per second are over the training loops (the epochs); `ratio_whole_call` also counts
what comes before the loop (building the model and optimizer, for the plugin Accelerate's
set-up), a fixed cost that weighs more the shorter the run.

One warm-up run of each first; then `--rounds` rounds, each running both back to back in
alternating order. `ratio` (the goal: ≥ 0.95) is the median over rounds of plugin / bare
samples per second within the round, which cancels the slow phases of a shared machine;
`ratio_of_medians` and `ratio_of_best` (fastest run against fastest run) are there to compare.
`plugin_samples_per_s` and `bare_samples_per_s` are medians. `test_accuracy` is the plugin's
last model on the 359 held-out digits, loaded back with `predict.load_model` from the
safetensors file and model card a job would return.

`e2e_over_bare`: then `--e2e-jobs` whole jobs as a customer sees them, on loopback: a real
relay (nostr-relay, a child process), the embedded blob server and a worker (in this process,
the image classifier its only plugin, free: no mint) with the customer on their own event loop.
Each job is timed from publishing the request (its dataset already uploaded, encrypted) to the
result event decrypted, plus downloading, verifying and decrypting the model; it trains the same
epochs on all 1438 images (``validation_fraction=0``). The median over jobs is set against the
median whole-call time of the bare loop. The first job is a warm-up (it pays for the worker's
first download), not counted. What the ratio shows is the worker's cost around the training:
events, NIP-44, the download and decryption of the data, decoding, the model card, the curves,
the upload of three encrypted files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("dvm_image_classifier") is None:  # not installed yet: the source tree
    sys.path.insert(0, str(REPO / "plugins"))

from dvm_image_classifier import outputs  # noqa: E402
from dvm_image_classifier.digits import digits_split  # noqa: E402
from dvm_image_classifier.models import build_model, make_spec  # noqa: E402
from dvm_image_classifier.params import TrainParams  # noqa: E402
from dvm_image_classifier.predict import load_model  # noqa: E402
from dvm_image_classifier.train import (cosine_schedule, make_optimizer, normalisation,  # noqa: E402
                                        to_tensors, train)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


DEVICE = torch.device("cpu")   # --device


def autocast():
    from dvm_core.devices import precision_for

    precision = precision_for(DEVICE)
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def run_plugin(x: torch.Tensor, y: torch.Tensor, spec: dict, params: TrainParams, mean, std):
    """(loop samples/s, whole-call samples/s, outcome) of the plugin's `train`."""
    start = time.perf_counter()
    outcome = train(train_images=x, train_labels=y, val_images=None, val_labels=None, spec=spec,
                    params=params, mean=mean, std=std, device=DEVICE)
    seconds = time.perf_counter() - start
    return outcome.samples_per_s, outcome.samples_seen / seconds, outcome


def run_bare(x_float: torch.Tensor, y: torch.Tensor, spec: dict, params: TrainParams) -> tuple[float, float]:
    """(loop samples/s, whole-run samples/s) of the hand-written loop."""
    start = time.perf_counter()
    torch.manual_seed(params.seed)
    model = build_model(spec).to(DEVICE)
    optimizer = make_optimizer(model, params)
    x_float, y = x_float.to(DEVICE), y.to(DEVICE)
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported())
    n = x_float.shape[0]
    steps = params.epochs * math.ceil(n / params.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(steps))
    generator = torch.Generator().manual_seed(params.seed)
    model.train()
    seen = 0
    loop_start = time.perf_counter()
    for _ in range(params.epochs):
        perm = torch.randperm(n, generator=generator).to(DEVICE)
        for i in range(0, n, params.batch_size):
            idx = perm[i:i + params.batch_size]
            with autocast():
                loss = F.cross_entropy(model(x_float[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += idx.shape[0]
    synchronize()
    end = time.perf_counter()
    return seen / (end - loop_start), seen / (end - start)


def e2e_seconds(x_train: np.ndarray, y_train: np.ndarray, epochs: int, batch_size: int, jobs: int) -> list[float]:
    """Seconds from request to downloaded model, for each of `jobs` timed jobs (after one warm-up)."""
    import asyncio
    import os

    from dvm_core.devtools.blobserver import start_blob_server
    from dvm_core.customer.client import Customer, download_artifacts, upload_dataset
    from dvm_core.worker.config import load_config
    from dvm_core.protocol.events import Keys
    from dvm_core.devtools.localnet import start_relay
    from dvm_core.cli.logs import configure_logging
    from dvm_core.protocol.nip90 import JobInput
    from dvm_core.worker.plugins import plugin_manager
    from dvm_core.worker.worker import Worker

    async def measure(root: Path) -> list[float]:
        configure_logging("json", "warning")
        relay = start_relay(root / "relay")
        blobs = await start_blob_server(root / "blobs")
        worker = None
        try:
            (root / "dvm.toml").write_text(
                f'[dvm]\nrelays = ["{relay.url}"]\nstate_dir = "{root / "state"}"\n'
                f'blob_servers = ["{blobs.url}"]\nallow_private_urls = true\nprogress_interval = 1.0\n')
            provider = Keys.generate()
            worker = Worker(load_config(root / "dvm.toml", env={}), provider,
                            plugin_manager(only=["image-classifier"]))
            await worker.start()
            dataset = root / "digits.npz"
            np.savez(dataset, x=x_train, y=y_train)
            times = []
            async with Customer(Keys.generate(), [relay.url]) as customer:
                await customer.pool.wait_all_connected(10)
                url = await upload_dataset(dataset, [blobs.url], customer.keys, encrypt=True)
                for job in range(jobs + 1):
                    start = time.perf_counter()
                    request = await customer.submit(
                        5750, [JobInput(url, "url")],
                        {"epochs": str(epochs), "batch_size": str(batch_size), "validation_fraction": "0",
                         "seed": str(job)}, provider=provider.public_key)
                    result = await customer.result(request, timeout=600)
                    saved = await download_artifacts(result, root / f"result-{job}", allow_private=True)
                    elapsed = time.perf_counter() - start
                    assert {p.name for p in saved} >= {"model.safetensors", "model_card.json"}
                    log(f"end-to-end job {job}{' (warm-up)' if job == 0 else ''}: {elapsed:.2f}s")
                    if job:
                        times.append(elapsed)
            return times
        finally:
            if worker is not None:
                await worker.stop(grace=1.0)
            await blobs.stop()
            relay.stop()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("DVM_PLUGINS", "image-classifier")
        return asyncio.run(measure(Path(tmp)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--e2e-jobs", type=int, default=3, help="timed end-to-end jobs (0: skip)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: both sides train there")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)

    x_train, y_train, x_test, y_test = digits_split()
    x, y = to_tensors(x_train[..., None], y_train)  # N×H×W×C, as the plugin reads an .npz
    mean, std = normalisation(x)
    x_float = (x.float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    spec = make_spec("auto", 1, 10, 8, 8)
    params = TrainParams(epochs=args.epochs, batch_size=args.batch_size)

    log("warm-up")
    run_plugin(x, y, spec, replace(params, epochs=1), mean, std)
    run_bare(x_float, y, spec, replace(params, epochs=1))
    plugin_rates, bare_rates, ratios, call_ratios, bare_call_rates = [], [], [], [], []
    outcome = None
    for r in range(args.rounds):
        # Each round runs both, back to back, alternating which goes first: a slow phase of the
        # machine (other processes, a throttled CPU) then hits the pair alike, and the ratio
        # within a round cancels it.
        order = ("plugin", "bare") if r % 2 == 0 else ("bare", "plugin")
        rates = {}
        for side in order:
            if side == "plugin":
                *rates[side], outcome = run_plugin(x, y, spec, params, mean, std)
            else:
                rates[side] = run_bare(x_float, y, spec, params)
        plugin_rates.append(rates["plugin"][0])
        bare_rates.append(rates["bare"][0])
        ratios.append(rates["plugin"][0] / rates["bare"][0])
        call_ratios.append(rates["plugin"][1] / rates["bare"][1])
        bare_call_rates.append(rates["bare"][1])
        log(f"round {r + 1}: plugin {rates['plugin'][0]:.0f}, bare {rates['bare'][0]:.0f} samples/s, "
            f"ratio {ratios[-1]:.3f} (whole calls: {call_ratios[-1]:.3f})")

    with tempfile.TemporaryDirectory() as tmp:
        weights, card = Path(tmp) / "model.safetensors", Path(tmp) / "model_card.json"
        outputs.save_weights(outcome.state_dict, weights, spec)
        outputs.write_card(card, {"format": outputs.CARD_FORMAT, "architecture": spec,
                                  "classes": [str(i) for i in range(10)],
                                  "input": {"height": 8, "width": 8, "channels": 1, "mean": mean, "std": std}})
        model, preprocess = load_model(weights, card)
        with torch.no_grad():
            accuracy = float((model(preprocess(x_test)).argmax(1).numpy() == y_test).mean())

    e2e = e2e_seconds(x_train[..., None], y_train, args.epochs, args.batch_size, args.e2e_jobs) \
        if args.e2e_jobs > 0 else []
    bare_s = len(y_train) * args.epochs / statistics.median(bare_call_rates)
    plugin = statistics.median(plugin_rates)
    bare = statistics.median(bare_rates)
    print(json.dumps({
        "plugin_samples_per_s": round(plugin, 1),
        "bare_samples_per_s": round(bare, 1),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_of_medians": round(plugin / bare, 4),
        "ratio_of_best": round(max(plugin_rates) / max(bare_rates), 4),
        "ratio_whole_call": round(statistics.median(call_ratios), 4),
        "test_accuracy": round(accuracy, 4),
        "e2e_over_bare": round(statistics.median(e2e) / bare_s, 3) if e2e else None,
        "e2e_s": round(statistics.median(e2e), 3) if e2e else None,
        "bare_s": round(bare_s, 3),
        "e2e_jobs_s": [round(t, 3) for t in e2e],
        "round_ratios": [round(v, 3) for v in ratios],
        "train_samples": int(x.shape[0]), "test_samples": int(len(y_test)),
        "epochs": args.epochs, "batch_size": args.batch_size, "threads": args.threads,
        "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else platform.processor(),
        "model": spec, "torch": torch.__version__, "cpu_count": __import__("os").cpu_count(),
        "machine": platform.machine(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
