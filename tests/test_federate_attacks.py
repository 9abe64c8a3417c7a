"""`dvm federate --local` with a simulated misbehaving provider (``--attack``), other merge methods
compared on the same updates each round (``--compare``) and a centralised baseline (``--baseline``)
on accuracy.png. Through the CLI, with real providers, relay, mint and blob server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def test_simulated_attacks_rewrite_an_update_as_a_cheat_would(tmp_path):
    from dvm_federate.rounds import simulate_attack

    base = {"conv.weight": torch.ones(2, 2), "bn.running_var": torch.full((2,), 2.0),
            "bn.num_batches_tracked": torch.tensor(3)}
    trained = {"conv.weight": torch.full((2, 2), 1.5), "bn.running_var": torch.full((2,), 3.0),
               "bn.num_batches_tracked": torch.tensor(9)}
    save_file(base, str(tmp_path / "base.safetensors"), metadata={"k": "v"})
    save_file(trained, str(tmp_path / "update.safetensors"), metadata={"k": "v"})

    def attack(mode, other=None):
        out = simulate_attack(tmp_path / "update.safetensors", tmp_path / "base.safetensors", mode,
                              tmp_path / f"{mode}.safetensors", other)
        return load_file(str(out))

    flipped = attack("sign-flip")
    assert torch.equal(flipped["conv.weight"], torch.full((2, 2), -1.0))      # 1 - 4 × (1.5 - 1)
    assert torch.equal(flipped["bn.running_var"], trained["bn.running_var"])   # statistics as trained
    assert torch.equal(flipped["bn.num_batches_tracked"], trained["bn.num_batches_tracked"])
    assert torch.equal(attack("scaled")["conv.weight"], torch.full((2, 2), 6.0))   # 1 + 10 × 0.5
    lazy = attack("lazy")
    assert all(torch.equal(lazy[k], base[k]) for k in base)
    copied = attack("copy", other=tmp_path / "base.safetensors")
    assert all(torch.equal(copied[k], base[k]) for k in base)
    assert not torch.equal(attack("noise")["conv.weight"], trained["conv.weight"])
    assert torch.equal(load_file(str(tmp_path / "update.safetensors"))["conv.weight"], trained["conv.weight"])


def test_attack_options_are_checked_before_anything_starts(tmp_path):
    def federate(*args):
        return subprocess.run([sys.executable, "-m", "dvm_core.cli", "federate", *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)

    bad = federate("--local", "3", "--attack", "sign-flip:3")
    assert bad.returncode != 0 and "N a provider from 0 to 2" in bad.stderr
    bad = federate("--local", "3", "--attack", "flood:1")
    assert bad.returncode != 0 and "MODE one of lazy, sign-flip, noise, scaled, copy" in bad.stderr
    bad = federate("--relay", "ws://127.0.0.1:1", "--provider", "ab" * 32, "--attack", "lazy:0")
    assert bad.returncode != 0 and "use it with --local N" in bad.stderr
    bad = federate("--local", "3", "--compare", "median,krum")
    assert bad.returncode != 0 and "--compare krum with 3 providers" in bad.stderr


@pytest.mark.timeout(900)
def test_federate_local_with_a_sign_flipping_provider_compares_methods_and_a_baseline(tmp_path):
    out = tmp_path / "federation"
    run = subprocess.run(
        [sys.executable, "-m", "dvm_core.cli", "federate", "--local", "3", "--rounds", "2", "--epochs", "1",
         "--attack", "sign-flip:1", "--compare", "median,krum", "--krum-f", "0", "--baseline", "--no-score",
         "--out", str(out)],
        capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for r in (1, 2):
        assert f"round {r}: provider 1 (" in run.stdout and "plays sign-flip (simulated)" in run.stdout
    saved = json.loads((out / "rounds.json").read_text())
    assert saved["settings"]["attacks"] == {"1": "sign-flip"} and saved["settings"]["compare"] == ["median", "krum"]
    for report in saved["rounds"]:
        assert set(report["compared"]) == {"median", "krum"} and len(report["providers"]) == 3
    baseline = saved["centralised_baseline"]
    assert len(baseline) == 2 and all(0.8 < a <= 1.0 for a in baseline), baseline
    # What was merged for provider 1 is its update reversed around the global model it was sent.
    for r in (1, 2):
        sent = load_file(str(out / f"global-{r - 1}.safetensors"))
        trained = load_file(str(out / f"round-{r}" / "provider-1" / "model.safetensors"))
        merged_in = load_file(str(out / f"round-{r}" / "provider-1" / "sign-flip.safetensors"))
        key = next(k for k in sent if k.endswith("weight") and sent[k].ndim == 4)
        assert torch.allclose(merged_in[key], sent[key] - 4 * (trained[key] - sent[key]), atol=1e-6)
        assert not torch.allclose(trained[key], sent[key])
    table = run.stdout.split("round  accuracy")[1]
    assert "median" in table.splitlines()[0] and "krum" in table.splitlines()[0]
    with Image.open(out / "accuracy.png") as png:
        assert png.size == (760, 420)
        colours = {c for _, c in png.getcolors(1 << 20)}
    # One line each: global model (C0 blue), median (C1 orange), krum (C2 green), centralised (C3 red).
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)} <= colours
