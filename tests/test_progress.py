"""Progress as the customer sees it: every bar of `dvm job submit` and `dvm federate` carries a
rate and an ETA, and ends at 100 % when the result is in; `dvm federate` shows each provider's
progress inside a round. Through the CLI, against a real relay and real workers."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest

from dvm_core.customer.progress import ProgressMeter

BAR = re.compile(r"\[(#*)(-*)\] +(\d+)% (?:(\d+\.\d) %/(s|min)|-- %/s) ETA (\d+:\d\d|--)")
DONE = re.compile(r"\[#{20}\] 100% result received in \d+:\d\d")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_rate_eta_and_the_last_bar():
    clock = Clock()
    meter = ProgressMeter(clock)
    first = meter.line(0, "downloading")
    assert first == "[--------------------]   0% -- %/s ETA -- downloading"
    clock.now += 10
    assert meter.line(20, "20% epoch 1/5") == "[####----------------]  20% 2.0 %/s ETA 0:40 epoch 1/5"
    clock.now += 90
    # 50 % in 100 s: 30 %/min, 100 s left.
    assert meter.line(50, "epoch 3/5") == "[##########----------]  50% 30.0 %/min ETA 1:40 epoch 3/5"
    clock.now += 5
    assert meter.done("result received") == "[####################] 100% result received in 1:45"


async def test_dvm_job_submit_bars_have_a_rate_an_eta_and_end_at_100(workers, relay, tmp_path):
    worker = await workers.start(progress_interval=0.3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dvm_core.cli", "job", "submit", "--relay", relay.url, "--dvm", worker.keys.npub,
        "--kind", "5790", "--text", "the quick brown fox jumps over the lazy dog", "--param", "work_seconds=2.5",
        "--out", str(tmp_path / "out"), "--timeout", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    log = stderr.decode().splitlines()
    assert proc.returncode == 0, "\n".join(log)
    shown = [i for i, line in enumerate(log) if line.startswith("[")]
    last = shown[-1]
    assert DONE.match(log[last]), log[last]                     # full, whatever the last feedback said
    bars = [BAR.match(log[i]) for i in shown[:-1]]
    assert len(bars) >= 3 and all(bars), log
    measured = [m for m in bars if m.group(4)]
    assert len(measured) >= 2, log                              # a rate and an ETA once the bar moves
    assert all(m.group(6) != "--" for m in measured)
    percents = [int(m.group(3)) for m in bars]
    assert percents == sorted(percents) and percents[-1] < 100


@pytest.mark.timeout(600)
def test_dvm_federate_shows_each_providers_progress_inside_a_round(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "dvm_core.cli", "federate", "--local", "2", "--rounds", "1", "--epochs", "4",
         "--out", str(tmp_path / "federation")],
        capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for i in range(2):
        mine = [line for line in lines if line.startswith(f"round 1: provider {i} (") and "[" in line]
        assert len(mine) >= 3 and DONE.search(mine[-1]), mine
        bars = [BAR.search(line) for line in mine[:-1]]
        assert all(bars), mine
        assert any(m.group(4) and m.group(6) != "--" for m in bars), mine   # a rate and an ETA
        assert any("epoch " in line for line in mine), mine                # the provider's own message
        assert [int(m.group(3)) for m in bars] == sorted(int(m.group(3)) for m in bars)
    assert "round 1: 2/2 updates merged (fedavg)" in run.stdout
