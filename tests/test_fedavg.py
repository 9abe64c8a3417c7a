"""The fedavg plugin (kind 5752) and its library `dvm_fedavg.merge`.

Each method against a naive in-memory reference on small random tensors; memory that stays
flat whatever N (peak RSS of a child process, which also proves the probe sees a naive merge);
poisoned inputs that move FedAvg far and the robust methods little; LoRA stacking that equals
the weighted mean of the B·A products; every kind of bad input, named; and the plugin run as a
job through a real JobContext, registered through pluggy, priced.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pluggy
import pytest
import structlog

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from dvm_core import JobCancelled, JobError, JobInputError, hookspecs  # noqa: E402
from dvm_core.jobs import JobContext  # noqa: E402
from dvm_core.protocol.nip90 import JobInput, JobRequest  # noqa: E402
from dvm_core.worker.plugins import check, collect_job_kinds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
try:
    import dvm_fedavg as fa
except ImportError:  # not installed as a package yet: use the source tree
    sys.path.insert(0, str(REPO / "plugins"))
    import dvm_fedavg as fa

from dvm_fedavg.merge import (CHUNK_ELEMENTS, METHODS, MergeError, merge_files,  # noqa: E402
                              read_header, stacked_adapter_config)

SHAPES = {"conv.weight": (8, 3, 3, 3), "fc.weight": (CHUNK_ELEMENTS // 100 + 7, 150), "fc.bias": (7,),
          "norm.weight": (5,)}   # fc.weight spans two chunks


# --- helpers -------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def one_thread():
    """Chunks are small: on 2 busy shared cores OpenMP's barriers cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_models(n, seed=0, dtype=torch.float32, spread=1.0, centre=None):
    g = torch.Generator().manual_seed(seed)
    centre = centre or {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = []
    for i in range(n):
        t = {k: (centre[k] + spread * torch.randn(s, generator=g)).to(dtype) for k, s in SHAPES.items()}
        t["norm.num_batches_tracked"] = torch.tensor(100 + i)
        models.append(t)
    return models, centre


def write(tmp_path, models, prefix="m", metadata=None):
    paths = []
    for i, m in enumerate(models):
        p = tmp_path / f"{prefix}{i}.safetensors"
        save_file(m, p, metadata=metadata[i] if isinstance(metadata, list) else metadata)
        paths.append(p)
    return paths


def stack(models, key):
    return torch.stack([m[key].double() for m in models])


def reference(models, weights, method, trim_ratio=0.1, f=1, m=None, base=None, clip_norm=None):
    """The naive in-memory merge: all models in memory, float64."""
    keys = [k for k in SHAPES]
    if clip_norm is not None:
        clipped = []
        for x in models:
            norm = math.sqrt(sum(float(((x[k].double() - base[k].double()) ** 2).sum()) for k in keys))
            s = min(1.0, clip_norm / norm)
            clipped.append({k: base[k].double() + s * (x[k].double() - base[k].double()) for k in keys})
        models = clipped
    n = len(models)
    if method in ("krum", "multi_krum"):
        flat = torch.stack([torch.cat([x[k].double().flatten() for k in keys]) for x in models])
        d2 = torch.cdist(flat, flat) ** 2
        scores = [float(torch.sort(torch.cat([d2[i, :i], d2[i, i + 1:]])).values[:n - f - 2].sum()) for i in range(n)]
        keep = 1 if method == "krum" else (m or n - f)
        chosen = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:keep])
        return reference([models[i] for i in chosen], [weights[i] for i in chosen], "fedavg"), chosen
    out = {}
    for k in keys:
        x = stack(models, k)
        if method == "fedavg":
            w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (x.dim() - 1))
            out[k] = (x * w).sum(0) / sum(weights)
        elif method == "median":
            out[k] = torch.from_numpy(__import__("numpy").median(x.numpy(), axis=0))
        elif method == "trimmed_mean":
            t = int(math.floor(trim_ratio * n + 1e-9))
            out[k] = x.sort(0).values[t:n - t].mean(0)
    return out


def assert_close(merged, ref, tol):
    for k, v in ref.items():
        err = (merged[k].double() - v).abs().max().item()
        assert err <= tol, f"{k}: max error {err}"


# --- numerical correctness -----------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2),
                                       (torch.float64, 1e-12)])
def test_fedavg_is_the_weighted_mean_in_the_inputs_dtype(tmp_path, dtype, tol):
    models, _ = random_models(4, dtype=dtype)
    weights = [10, 1438, 3, 250.5]
    out = tmp_path / "out.safetensors"
    report = merge_files(write(tmp_path, models), weights, out)
    merged = load_file(out)
    assert {k: v.dtype for k, v in merged.items()} == {k: v.dtype for k, v in models[0].items()}
    assert_close(merged, reference(models, weights, "fedavg"), tol * 8)
    assert merged["norm.num_batches_tracked"].item() == 100        # copied from input 0
    assert [r["weight_used"] for r in report.inputs] == pytest.approx([w / sum(weights) for w in weights])
    assert report.copied_tensors == ["norm.num_batches_tracked"]


@pytest.mark.parametrize("n", [5, 6])
def test_median_and_trimmed_mean_match_the_reference(tmp_path, n):
    models, _ = random_models(n, seed=n)
    paths = write(tmp_path, models)
    weights = [1.0] * n
    out = tmp_path / "out.safetensors"
    merge_files(paths, weights, out, method="median")
    assert_close(load_file(out), reference(models, weights, "median"), 1e-6)
    report = merge_files(paths, weights, out, method="trimmed_mean", trim_ratio=0.2)
    assert_close(load_file(out), reference(models, weights, "trimmed_mean", trim_ratio=0.2), 2e-6)
    # each coordinate trims 2 of n values: the shares add up to 2
    assert sum(r["trimmed_fraction"] for r in report.inputs) == pytest.approx(2.0)


@pytest.mark.parametrize("method,m", [("krum", None), ("multi_krum", None), ("multi_krum", 2)])
def test_krum_selects_as_the_reference(tmp_path, method, m):
    models, _ = random_models(6, seed=3)
    for i, scale in ((1, 3.0), (4, 2.0)):   # two outliers so the choice is not a coin toss
        models[i] = {k: v * scale if v.is_floating_point() else v for k, v in models[i].items()}
    weights = [5, 1, 2, 3, 4, 6]
    out = tmp_path / "out.safetensors"
    report = merge_files(write(tmp_path, models), weights, out, method=method, f=1, m=m)
    ref, chosen = reference(models, weights, method, f=1, m=m)
    assert [r["index"] for r in report.inputs if r["selected"]] == chosen
    assert sorted(e["index"] for e in report.excluded) == sorted(set(range(6)) - set(chosen))
    assert all("Krum score" in e["reason"] for e in report.excluded)
    assert_close(load_file(out), ref, 2e-6)
    if method == "krum":   # Krum returns the selected model itself, bit for bit
        assert torch.equal(load_file(out)["fc.weight"], models[chosen[0]]["fc.weight"])


@pytest.mark.parametrize("method", ["fedavg", "median", "multi_krum"])
def test_clip_norm_scales_updates_against_the_base(tmp_path, method):
    models, centre = random_models(5, seed=7, spread=0.1)
    base = {k: v.clone() for k, v in centre.items()}
    base["norm.num_batches_tracked"] = torch.tensor(7)
    models[2] = {k: (base[k] + 40 * (v - base[k]) if v.is_floating_point() else v) for k, v in models[2].items()}
    weights = [1, 2, 3, 4, 5]
    save_file(base, tmp_path / "base.safetensors")
    out = tmp_path / "out.safetensors"
    report = merge_files(write(tmp_path, models), weights, out, method=method, base=tmp_path / "base.safetensors",
                         clip_norm=5.0)
    ref = reference(models, weights, method, base=base, clip_norm=5.0)
    ref = ref[0] if isinstance(ref, tuple) else ref
    merged = load_file(out)
    assert_close(merged, ref, 1e-5)
    assert merged["norm.num_batches_tracked"].item() == 7             # from the base
    norms = [math.sqrt(sum(float(((x[k].double() - base[k].double()) ** 2).sum()) for k in SHAPES)) for x in models]
    assert [r["update_norm"] for r in report.inputs] == pytest.approx(norms, rel=1e-5)
    assert report.inputs[2]["clip_scale"] == pytest.approx(5.0 / norms[2], rel=1e-5)


def test_report_distances_to_the_merged_model(tmp_path):
    models, _ = random_models(3, seed=11)
    out = tmp_path / "out.safetensors"
    report = merge_files(write(tmp_path, models), [1, 2, 3], out, names=["alice", "bob", "carol"],
                         distances=True)
    merged = load_file(out)
    for r, x in zip(report.inputs, models):
        d = math.sqrt(sum(float(((x[k].double() - merged[k].double()) ** 2).sum()) for k in SHAPES))
        assert r["distance_to_merged"] == pytest.approx(d, rel=1e-5)
    d = report.to_dict()
    assert json.loads(json.dumps(d))["inputs"][1]["name"] == "bob"
    assert d["parameters"] == sum(math.prod(s) for s in SHAPES.values())
    # FedAvg reads each input once to merge, and once more for these distances.
    assert d["bytes_read"] == 2 * 3 * 4 * d["parameters"]
    quick = merge_files(write(tmp_path, models), [1, 2, 3], out, distances=False)
    assert quick.bytes_read == 3 * 4 * d["parameters"] and "distance_to_merged" not in quick.inputs[0]
    assert load_file(out).keys() == merged.keys() and all(torch.equal(load_file(out)[k], merged[k]) for k in merged)


# --- memory: streamed, whatever N -----------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import torch
    torch.set_num_threads(1)
    from dvm_fedavg.merge import merge_files
    from safetensors.torch import load_file

    def status(field):   # ru_maxrss would carry the parent's peak over fork + exec
        return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    d, mode = Path(sys.argv[1]), sys.argv[2]
    paths = sorted(d.glob("m*.safetensors"))
    methods = [("fedavg", {}), ("median", {}), ("krum", {"f": 1})]   # trimmed_mean: median's path
    small = sorted(d.glob("s*.safetensors"))
    for method, kw in methods:   # first use of each op allocates for good: not what we measure
        merge_files(small, [1] * len(small), d / "warm.safetensors", method=method, **kw)
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    if mode == "ours":
        for method, kw in methods:
            merge_files(paths, [1] * len(paths), d / "out.safetensors", method=method, **kw)
    else:   # what a merge that loads every input holds
        models = [{k: v.clone() for k, v in load_file(p).items()} for p in paths]
    print(status("VmHWM") - before)
""")


def test_memory_stays_flat_whatever_n(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, numel = 8, 8_000_000                       # 8 models of 32 MB
    for i in range(n):
        save_file({"w": torch.randn(numel, generator=g), "b": torch.randn(1000, generator=g)},
                  tmp_path / f"m{i}.safetensors")
    for i in range(5):
        save_file({"w": torch.randn(1000, generator=g), "b": torch.randn(1000, generator=g)},
                  tmp_path / f"s{i}.safetensors")
    model_bytes = numel * 4
    rss = {}
    for mode in ("ours", "naive"):
        probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), mode, str(REPO / "plugins")],
                               capture_output=True, text=True, timeout=300)
        assert probe.returncode == 0, probe.stderr
        rss[mode] = int(probe.stdout.strip().splitlines()[-1])
    assert rss["naive"] > 6 * model_bytes, rss    # the probe sees inputs held in memory...
    # ...and ours holds FedAvg's accumulator (one model) and a few MB of the input being read
    assert rss["ours"] < 1.4 * model_bytes, rss


# --- poisoning --------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["random", "sign_flip_x10"])
def test_robust_methods_resist_one_poisoned_input(tmp_path, attack):
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    honest_update = {k: 0.05 * torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: base[k] + honest_update[k] + 0.01 * torch.randn(base[k].shape, generator=g) for k in base}
              for _ in range(5)]
    if attack == "random":
        models[3] = {k: 10 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    else:
        models[3] = {k: base[k] - 10 * (models[3][k] - base[k]) for k in base}
    honest = reference([x for i, x in enumerate(models) if i != 3], [1.0] * 4, "fedavg")
    honest_norm = math.sqrt(sum(float((honest[k] - base[k].double()).pow(2).sum()) for k in base))
    paths = write(tmp_path, models)
    out = tmp_path / "out.safetensors"

    def error(method, **kw):
        merge_files(paths, [1.0] * 5, out, method=method, **kw)
        merged = load_file(out)
        return math.sqrt(sum(float((merged[k].double() - honest[k]).pow(2).sum()) for k in base)) / honest_norm

    assert error("fedavg") > 1.5                       # one bad client drags FedAvg far
    assert error("median") < 0.2
    assert error("trimmed_mean", trim_ratio=0.2) < 0.2
    assert error("krum", f=1) < 0.3
    assert error("multi_krum", f=1) < 0.1
    report = merge_files(paths, [1.0] * 5, out, method="multi_krum", f=1)
    assert [e["index"] for e in report.excluded] == [3]


# --- LoRA ---------------------------------------------------------------------------------------

def lora_adapters(n, rank=4, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for _ in range(n):
        adapters.append({
            "base_model.model.q.lora_A.weight": torch.randn(rank, d_in, generator=g),
            "base_model.model.q.lora_B.weight": torch.randn(d_out, rank, generator=g),
            "base_model.model.emb.lora_embedding_A": torch.randn(rank, 20, generator=g),
            "base_model.model.emb.lora_embedding_B": torch.randn(6, rank, generator=g),
            "base_model.model.head.modules_to_save.weight": torch.randn(3, 3, generator=g),
        })
    return adapters


def test_lora_adapters_are_stacked_exactly(tmp_path):
    adapters = lora_adapters(3)
    weights = [100, 300, 600]
    p = [w / sum(weights) for w in weights]
    out = tmp_path / "out.safetensors"
    report = merge_files(write(tmp_path, adapters), weights, out)
    merged = load_file(out)
    config = stacked_adapter_config({"r": 4, "lora_alpha": 8, "target_modules": ["q"]}, 3)
    assert (config["r"], config["lora_alpha"]) == (12, 24)
    assert stacked_adapter_config({"r": 4, "lora_alpha": 8, "use_rslora": True}, 4)["lora_alpha"] == 16
    scale_in, scale_out = 8 / 4, config["lora_alpha"] / config["r"]
    for a, b in (("q.lora_A.weight", "q.lora_B.weight"), ("emb.lora_embedding_A", "emb.lora_embedding_B")):
        a, b = "base_model.model." + a, "base_model.model." + b
        assert merged[a].shape[0] == 12 and merged[b].shape[1] == 12
        want = sum(pi * scale_in * (x[b].double() @ x[a].double()) for pi, x in zip(p, adapters))
        got = scale_out * (merged[b].double() @ merged[a].double())
        assert (got - want).abs().max().item() < 1e-5
        naive = scale_in * (sum(pi * x[b].double() for pi, x in zip(p, adapters))
                            @ sum(pi * x[a].double() for pi, x in zip(p, adapters)))
        assert (naive - want).norm() / want.norm() > 0.3          # what averaging A and B gets wrong
    key = "base_model.model.head.modules_to_save.weight"
    assert_close(merged, {key: sum(pi * x[key].double() for pi, x in zip(p, adapters))}, 1e-6)
    assert report.lora["rank_multiplier"] == 3 and report.lora["modules"] == 2


def test_lora_refuses_what_is_not_defined(tmp_path):
    paths = write(tmp_path, lora_adapters(5))
    with pytest.raises(MergeError, match="LoRA adapters: median"):
        merge_files(paths, [1] * 5, tmp_path / "out.safetensors", method="median")
    half = lora_adapters(2)
    del half[1]["base_model.model.q.lora_B.weight"]
    with pytest.raises(MergeError, match="input 1"):
        merge_files(write(tmp_path, half, "h"), [1, 1], tmp_path / "out.safetensors")


# --- bad inputs, each named -------------------------------------------------------------------

def expect_error(tmp_path, match, index, paths, weights=None, **kw):
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match=match) as info:
        merge_files(paths, weights or [1] * len(paths), out, **kw)
    assert info.value.index == index
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.*"))   # nothing half-written
    return str(info.value)


def test_bad_inputs_are_refused_naming_the_input(tmp_path):
    models, _ = random_models(5)
    paths = write(tmp_path, models)
    names = [f"https://blobs.example/{i}" for i in range(5)]
    missing = tmp_path / "nowhere.safetensors"
    msg = expect_error(tmp_path, "cannot be read", 2, paths[:2] + [missing] + paths[3:], names=names)
    assert "input 2 (https://blobs.example/2)" in msg
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    expect_error(tmp_path, r"input 1 \(junk.safetensors\) is not a valid safetensors", 1,
                 [paths[0], tmp_path / "junk.safetensors"])

    other = [dict(models[0]), dict(models[0]), dict(models[0])]
    other[1]["fc.weight"] = torch.zeros(3, 3)
    other[2].pop("fc.bias")
    arch = write(tmp_path, other, "o")
    expect_error(tmp_path, r"input 1 .*'fc.weight' has shape \[3, 3\]", 1, arch[:2])
    expect_error(tmp_path, r"input 1 .*not the same architecture: it lacks .*fc.bias", 1, [arch[0], arch[2]])
    half = dict(models[0])
    half["fc.bias"] = half["fc.bias"].half()
    expect_error(tmp_path, r"input 1 .*'fc.bias' is F16 .* F32", 1, [paths[0], write(tmp_path, [half], "f")[0]])

    for bad in (0, -3, float("nan"), "many"):
        expect_error(tmp_path, "input 3 .* positive number", 3, paths, weights=[1, 1, 1, bad, 1])
    expect_error(tmp_path, r"2f \+ 2 = 4 inputs \(got 4\)", None, paths[:4], method="krum", f=1)
    expect_error(tmp_path, "at least 3 inputs", None, paths[:2], method="median")
    expect_error(tmp_path, "trims .* = 0", None, paths, method="trimmed_mean", trim_ratio=0.1)
    expect_error(tmp_path, "m .* between 1 and", None, paths, method="multi_krum", f=1, m=5)
    expect_error(tmp_path, "unknown method", None, paths, method="mean")
    expect_error(tmp_path, "send the base", None, paths, clip_norm=1.0)
    expect_error(tmp_path, "one weight per input", None, paths, weights=[1, 2])

    for value in (float("nan"), float("inf")):
        poisoned = [dict(m) for m in models]
        poisoned[4]["fc.weight"] = poisoned[4]["fc.weight"].clone()
        poisoned[4]["fc.weight"][-1, -1] = value
        bad = write(tmp_path, poisoned, "n")
        expect_error(tmp_path, r"input 4 .*'fc.weight' holds NaN or Inf", 4, bad, method="fedavg")
        for method in ("median",):   # the robust methods merge around it (issue 19)
            report = merge_files(bad, [1] * 5, tmp_path / "merged.safetensors", method=method)
            assert [(e["index"], "holds NaN or Inf" in e["reason"]) for e in report.excluded
                    if e["reason"].startswith("left out")] == [(4, True)]


def test_base_hash_mismatch(tmp_path):
    models, centre = random_models(3)
    save_file({**centre, "norm.num_batches_tracked": torch.tensor(0)}, tmp_path / "base.safetensors")
    from dvm_core.transport.fetch import sha256_file
    good = sha256_file(tmp_path / "base.safetensors")
    paths = write(tmp_path, models, metadata=[{"base_sha256": good}, {"base_sha256": good}, {"base_sha256": "ab" * 32}])
    expect_error(tmp_path, f"input 2 .*trained from base abab.*not from {good[:16]}", 2, paths,
                 base=tmp_path / "base.safetensors")
    expect_error(tmp_path, "input 2 .*trained from base abab", 2, paths)   # no base: they must agree
    expect_error(tmp_path, "the base model .* not the expected base", None, paths[:2],
                 base=tmp_path / "base.safetensors", base_sha256="cd" * 32)
    report = merge_files(paths[:2], [1, 1], tmp_path / "out.safetensors", base=tmp_path / "base.safetensors")
    assert report.base["sha256"] == good
    _, metadata = read_header(tmp_path / "out.safetensors")
    assert "base_sha256" not in metadata and metadata["merge_method"] == "fedavg"


def test_cancelling_leaves_nothing_behind(tmp_path):
    models, _ = random_models(3)
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) > 2:
            raise JobCancelled("cancelled")
    with pytest.raises(JobCancelled):
        merge_files(write(tmp_path, models), [1, 1, 1], tmp_path / "out.safetensors", check_cancelled=cancel)
    assert not list(tmp_path.glob("*out.safetensors*"))


# --- the plugin, as a job ------------------------------------------------------------------------

def url(i):
    return f"https://blobs.example/{i:064x}"


class Job:
    """One request of kind 5752, parsed as the worker would, run with a real JobContext."""

    def __init__(self, tmp_path, files: list[tuple[str, Path | None]], params=None, config=None):
        self.urls = {}
        inputs = []
        for i, (marker, path) in enumerate(files):
            inputs.append(JobInput(url(i), "url", "", marker))
            self.urls[url(i)] = path
        self.request = JobRequest(id="ab" * 32, pubkey="cd" * 32, kind=fa.KIND, created_at=0,
                                  inputs=tuple(inputs), params={k: str(v) for k, v in (params or {}).items()})
        self.config = config or {}
        self.kind = fa.job_kind(self.config)
        self.reports = []
        self.ctx = JobContext(job_id=self.request.id, request=self.request, workdir=tmp_path / "work",
                              log=structlog.get_logger(), deadline=time.monotonic() + 600,
                              report=lambda p, m: self.reports.append((p, m)), config=self.config,
                              fetcher=self.fetch)

    def fetch(self, link, into, max_bytes=None):   # as the worker's: a download stops at max_bytes
        if self.urls[link] is None:
            raise JobError("could not fetch an input: 404 Not Found")
        if max_bytes is not None and self.urls[link].stat().st_size > max_bytes:
            raise JobError(f"could not fetch an input: {link}: the file is larger than the "
                           f"{max_bytes} bytes allowed")
        return self.urls[link]

    def parse(self):
        return self.kind.parse(self.request)

    def run(self):
        return self.kind.run(self.ctx, self.parse())


def test_runs_as_a_job(tmp_path):
    models, centre = random_models(5, spread=0.1)
    save_file({**centre, "norm.num_batches_tracked": torch.tensor(0)}, tmp_path / "base.safetensors")
    paths = write(tmp_path, models)
    job = Job(tmp_path, [(f"update:{100 * (i + 1)}", p) for i, p in enumerate(paths)]
              + [("base", tmp_path / "base.safetensors")], {"method": "trimmed_mean", "trim_ratio": 0.2})
    result = job.run()
    names = [a.name for a in result.artifacts]
    assert names == ["model.safetensors", "merge_report.json"]
    assert_close(load_file(result.artifacts[0].path), reference(models, [1] * 5, "trimmed_mean", 0.2), 2e-6)
    report = json.loads(result.artifacts[1].path.read_text())
    assert report["method"] == "trimmed_mean" and report["inputs"][0]["name"] == url(0)
    assert all(r["update_norm"] > 0 for r in report["inputs"])
    assert result.content["inputs"] == 5 and result.metrics["bytes_read"] > 0
    assert result.metrics["merge_gb_per_s"] > 0 and job.reports[-1][0] == 100

    fedavg = Job(tmp_path, [(f"update:{100 * (i + 1)}", p) for i, p in enumerate(paths)]).run()
    assert_close(load_file(fedavg.artifacts[0].path), reference(models, [100, 200, 300, 400, 500], "fedavg"), 2e-6)
    by_param = Job(tmp_path, [("", p) for p in paths], {"weights": "100,200,300,400,500"}).run()
    assert torch.equal(load_file(by_param.artifacts[0].path)["fc.weight"],
                       load_file(fedavg.artifacts[0].path)["fc.weight"])
    plain = json.loads(fedavg.artifacts[1].path.read_text())["inputs"][0]
    asked = Job(tmp_path, [("", p) for p in paths], {"distances": "yes"}).run()
    assert "distance_to_merged" not in plain
    assert json.loads(asked.artifacts[1].path.read_text())["inputs"][0]["distance_to_merged"] > 0
    with pytest.raises(JobInputError, match="param distances must be yes or no"):
        Job(tmp_path, [("", p) for p in paths], {"distances": "maybe"}).parse()


def test_lora_job_returns_the_stacked_config(tmp_path):
    paths = write(tmp_path, lora_adapters(2))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "peft_type": "LORA"}))
    result = Job(tmp_path, [("update:1", paths[0]), ("update:3", paths[1]),
                            ("adapter_config", tmp_path / "adapter_config.json")]).run()
    config = json.loads(next(a.path for a in result.artifacts if a.name == "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 32, "LORA")


def test_bad_requests_refused_before_payment(tmp_path):
    p = tmp_path / "x.safetensors"
    cases = [
        ([("update:0", p), ("update:1", p)], {}, r"update 0 .*positive number of training examples"),
        ([("update:-5", p)], {}, "positive number"),
        ([("update", p), ("update:2", p)], {"weights": "1,2"}, "either in the markers"),
        ([("", p), ("", p)], {"weights": "1"}, "1 values for 2 updates"),
        ([("", p), ("", p)], {"weights": "1,0"}, r"update 1 \(https://blobs.example/0+1\) has weight"),
        ([("", p)] * 4, {"method": "krum"}, r"more than 2f \+ 2"),
        ([("", p)] * 2, {"method": "median"}, "at least 3"),
        ([("", p)] * 5, {"method": "trimmed_mean"}, "trims"),
        ([("", p)] * 5, {"method": "average"}, "unknown method"),
        ([("", p)] * 5, {"m": 2}, "multi_krum only"),
        ([("", p)] * 5, {"clip_norm": 1}, "send an input marked base"),
        ([("", p), ("base", p)], {"base_sha256": "ab" * 32}, "not param base_sha256"),
        ([("", p), ("base", p), ("base", p)], {}, "at most one input marked 'base'"),
        ([("weights", p)], {}, "unknown input marker"),
        ([("base", p)], {}, "send the models to merge"),
        ([("", p)] * 3, {"model_bytes": 10 ** 12}, "at most"),
        ([("", p)] * 70, {}, "at most 64 updates"),
    ]
    for files, params, match in cases:
        with pytest.raises(JobInputError, match=match):
            Job(tmp_path, files, params).parse()


def test_bad_data_refused_at_run_naming_the_update(tmp_path):
    models, _ = random_models(3)
    paths = write(tmp_path, models)
    other = dict(models[0])
    other["fc.bias"] = torch.zeros(9)
    odd = write(tmp_path, [other], "odd")[0]
    with pytest.raises(JobInputError, match=r"update 2 \(https://blobs.example/0+2\).*shape \[9\]"):
        Job(tmp_path, [("", paths[0]), ("", paths[1]), ("", odd)]).run()
    with pytest.raises(JobInputError, match=r"update 1 \(https://blobs.example/0+1\): could not fetch.*404"):
        Job(tmp_path, [("", paths[0]), ("", None)]).run()
    with pytest.raises(JobInputError, match=r"update 0 .*larger than the 100 bytes allowed"):
        Job(tmp_path, [("", paths[0]), ("", paths[1])], {"model_bytes": 100}).run()
    with pytest.raises(JobInputError, match="not LoRA adapters"):
        (tmp_path / "c.json").write_text("{}")
        Job(tmp_path, [("", paths[0]), ("adapter_config", tmp_path / "c.json")]).run()


def test_price_by_bytes_merged(tmp_path):
    p = tmp_path / "x.safetensors"
    config = {"plugins": {"fedavg": {"sats_per_gb": 2}}}
    job = Job(tmp_path, [("", p)] * 8 + [("base", p)], {"model_bytes": 400_000_000}, config)
    assert job.kind.price(job.parse()) == 8       # 9 × 0.4 GB × 2 = 7.2 → 8
    small = Job(tmp_path, [("", p)] * 2, {"model_bytes": 1000}, config)
    assert small.kind.price(small.parse()) == 1    # at least 1 sat
    undeclared = Job(tmp_path, [("", p)] * 2, {}, config)
    assert undeclared.kind.price(undeclared.parse()) == math.ceil(2 * (4 << 30) / 1e9 * 2)
    # Krum's pairwise distances: one model size more per pair of updates (quadratic).
    krum = Job(tmp_path, [("", p)] * 8, {"model_bytes": 400_000_000, "method": "krum", "f": "1"}, config)
    assert krum.kind.price(krum.parse()) == math.ceil((8 + 28) * 0.4 * 2)   # 36 × 0.4 GB × 2
    free = Job(tmp_path, [("", p)] * 2, {}, {"plugins": {"fedavg": {"sats_per_gb": 0}}})
    assert free.kind.price is None   # a rate of 0: no price of its own (the config's fixed price)


def test_registers_through_pluggy():
    pm = pluggy.PluginManager("dvm")
    pm.add_hookspecs(hookspecs)
    pm.register(fa, name="fedavg")
    check(pm)
    kinds = collect_job_kinds(pm, {"plugins": {"fedavg": {"max_inputs": 5}}})
    kind = kinds[5752]
    assert kind.name == "fedavg" and kind.plugin == "fedavg" and kind.kind + 1000 == 6752
    assert set(kind.params) == set(fa.params.PARAMS) and "method" in kind.params
    assert all(m in kind.params["method"] for m in METHODS)
    with pytest.raises(ValueError, match="unknown setting.*max_input\\b"):
        collect_job_kinds(pm, {"plugins": {"fedavg": {"max_input": 5}}})
    with pytest.raises(ValueError, match="must be positive"):
        collect_job_kinds(pm, {"plugins": {"fedavg": {"max_inputs": 0}}})


def test_plugin_load_does_not_import_torch():
    code = "import sys, dvm_fedavg; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO / "plugins") + ":" + str(REPO)})
    assert out.stdout.strip() == "False", out.stderr


def test_no_pickle_anywhere():
    source = "\n".join(p.read_text() for p in (REPO / "plugins" / "dvm_fedavg").glob("*.py"))
    source += (REPO / "tests" / "benchmarks" / "bench_fedavg.py").read_text()
    assert "torch.load" not in source and "import pickle" not in source
    assert all("allow_pickle=False" in args for args in re.findall(r"np\.load\(([^)]*)\)", source))


def test_a_header_nested_too_deep_is_refused_naming_the_input(tmp_path):
    """`[[[[…]]]]` 100,000 deep made json.loads raise RecursionError, not a MergeError."""
    models, _ = random_models(2)
    paths = write(tmp_path, models)
    header = b"[" * 100_000 + b"]" * 100_000
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(len(header).to_bytes(8, "little") + header)
    expect_error(tmp_path, r"input 1 \(deep.safetensors\) .*nests JSON too deeply", 1, [paths[0], deep])


@pytest.mark.parametrize("method", ["median", "trimmed_mean", "krum"])
def test_robust_methods_leave_a_broken_update_out_with_its_reason(tmp_path, method):
    """One update with NaN and one of another shape: the round is merged from the others, and
    the report says who was left out and why (FedAvg still refuses: it cannot merge around one)."""
    models, _ = random_models(7)
    broken = [dict(m) for m in models]
    broken[2]["fc.weight"] = torch.full_like(models[0]["fc.weight"], float("nan"))
    broken[5]["fc.weight"] = torch.zeros(3, 3)
    paths = write(tmp_path, broken)
    report = merge_files(paths, [1] * 7, tmp_path / "merged.safetensors", method=method, trim_ratio=0.2, f=1)
    left = {e["index"]: e["reason"] for e in report.excluded if e["reason"].startswith("left out")}
    assert set(left) == {2, 5}, report.excluded
    assert "NaN" in left[2] or "nan" in left[2].lower(), left[2]
    assert "shape" in left[5], left[5]
    assert sorted(i["index"] for i in report.inputs) == [0, 1, 3, 4, 6]
    expect_error(tmp_path, "input 5", 5, paths, method="fedavg")   # the shape is found first
