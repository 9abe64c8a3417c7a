"""The provider's first hour (issue 21): what `dvm doctor`, `dvm jobs`, `dvm keygen` and the
worker's own log tell the person running it, through the command line as they type it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dvm_core.cli import main
from dvm_core.customer.client import JobFailed, result_json
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import JobInput

from .conftest import REPO, WorkerProcess

KIND = 5790
TEXT = [JobInput("one two three", "text")]


def dvm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvm_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def log_lines(proc: WorkerProcess) -> list[dict]:
    out = []
    for line in proc.log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# 1. doctor ----------------------------------------------------------------------------------

def doctor(config: Path) -> subprocess.CompletedProcess:
    """`dvm doctor` with the text and LLM plugins of this checkout (plugins/ first on the path)."""
    env = {**os.environ, "DVM_PLUGINS": "textstats,llm-finetune",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "dvm_core.cli", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=180, env=env)


def test_doctor_one_line_per_check_with_the_fix_and_no_relay_noise(tmp_path, relay, mint):
    from dvm_core.devtools.localnet import free_port, start_blob_server_process
    blobs = start_blob_server_process(tmp_path / "blobs")
    try:
        key = tmp_path / "dvm.key"
        assert CliRunner().invoke(main, ["keygen", "--out", str(key)]).exit_code == 0
        dead = f"ws://127.0.0.1:{free_port()}"
        config = tmp_path / "dvm.toml"
        base = (f'[dvm]\nkey_file = "{key}"\nstate_dir = "{tmp_path / "state"}"\nmints = ["{mint.url}"]\n'
                f'blob_servers = ["{blobs.url}"]\n')
        config.write_text(base + f'relays = ["{relay.url}", "{dead}"]\n')
        out = doctor(config)
        assert out.returncode == 1, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        assert all(line[:6] in ("ok    ", "warn  ", "FAIL  ") for line in lines[:-1]), out.stdout
        assert lines[-1].startswith("doctor: ") and lines[-1].endswith("FAIL: fix the FAIL lines before `dvm run`")
        assert "relay connection lost" not in out.stdout + out.stderr   # its own line says it, once
        assert "still unreachable" not in out.stdout + out.stderr
        assert f"ok    relay {relay.url}" in lines and f"ok    mint {mint.url}/v1/info" in lines
        [dead_line] = [line for line in lines if dead in line]
        assert dead_line.startswith(f"FAIL  relay {dead}: no connection within 5 s (")
        assert "Connect call failed" in dead_line and "; fix: check the URL in relays" in dead_line
        [local] = [line for line in lines if line.startswith(f"FAIL  blob server {blobs.url} is on a loopback")]
        assert "allow_private_urls = false" in local
        assert "fix: for a test on this machine set allow_private_urls = true" in local
        [llm] = [line for line in lines if line.startswith("warn  llm-finetune: no hub model is allowed")]
        assert "fix: list repo ids your hub cache holds" in llm

        # Fixed as the lines say: no FAIL, exit 0; a loopback blob server allowed is still a warn.
        config.write_text(base + f'relays = ["{relay.url}"]\nallow_private_urls = true\n'
                          '[plugins.llm-finetune]\nallowed_models = ["HuggingFaceTB/SmolLM2-135M"]\n')
        fixed = doctor(config)
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert "\nFAIL  " not in fixed.stdout and "llm-finetune: no hub model" not in fixed.stdout
        assert f"warn  blob server {blobs.url} is on a loopback address: customers off this machine" in fixed.stdout
        assert f"ok    blob server {blobs.url}" in fixed.stdout
        assert ", 0 FAIL" in fixed.stdout.splitlines()[-1]
    finally:
        blobs.stop()


# 4. keygen ----------------------------------------------------------------------------------

def test_a_second_keygen_refuses_and_shows_the_npub_of_the_key_there(tmp_path):
    out = tmp_path / "dvm.key"
    runner = CliRunner()
    first = runner.invoke(main, ["keygen", "--out", str(out)])
    assert first.exit_code == 0, first.output
    npub = first.stdout.strip()
    assert npub.startswith("npub1")
    key = out.read_text()
    again = runner.invoke(main, ["keygen", "--out", str(out)])
    assert again.exit_code == 1   # as before: it refuses
    assert npub in again.output and str(out.resolve()) in again.output and "not overwriting" in again.output
    assert out.read_text() == key

    broken = tmp_path / "broken.key"
    broken.write_text("not a key\n")
    refused = runner.invoke(main, ["keygen", "--out", str(broken)])
    assert refused.exit_code == 1 and "exists; not overwriting it, though it holds no usable key" in refused.output
    assert broken.read_text() == "not a key\n"


# 2. an empty `dvm jobs` ---------------------------------------------------------------------

async def test_dvm_jobs_says_when_there_are_none_and_which_filters_hid_them(tmp_path, relay, customer):
    keys = Keys.generate()
    proc = WorkerProcess(tmp_path, relay.url, keys)
    proc.start()
    try:
        proc.wait_log("worker ready")
        state_dir = str(tmp_path / "proc" / "state")
        empty = await asyncio.to_thread(dvm, "jobs", "--config", str(proc.config))
        assert empty.returncode == 0, empty.stderr
        assert f"no jobs yet in {state_dir}" in empty.stdout and "--state" in empty.stdout
        as_json = await asyncio.to_thread(dvm, "jobs", "--config", str(proc.config), "--json")
        assert as_json.returncode == 0 and as_json.stdout == ""   # JSON lines stay JSON lines
        assert "no jobs yet" in as_json.stderr

        request = await customer.submit(KIND, TEXT, {}, provider=keys.public_key)
        assert result_json(await customer.result(request, timeout=20))["words"] == 3
        hidden = await asyncio.to_thread(dvm, "jobs", "--config", str(proc.config), "--state", "rejected",
                                         "--kind", str(KIND))
        assert hidden.returncode == 0, hidden.stderr
        assert f"no jobs match --state rejected --kind {KIND} in {state_dir}" in hidden.stdout
        assert f"dvm jobs --config {proc.config}` lists all" in hidden.stdout
        listed = await asyncio.to_thread(dvm, "jobs", "--config", str(proc.config))
        assert request["id"] in listed.stdout and "no jobs" not in listed.stdout
    finally:
        proc.stop()


# 3. the reasons of rejected private requests ------------------------------------------------

async def test_the_provider_reads_why_it_rejected_a_private_request(tmp_path, relay, customer):
    keys = Keys.generate()
    proc = WorkerProcess(tmp_path, relay.url, keys)
    proc.start()
    try:
        proc.wait_log("worker ready")
        out_of_range = await customer.submit(KIND, TEXT, {"top": "0"}, provider=keys.public_key,
                                             encrypt="nip44")
        unknown = await customer.submit(KIND, [JobInput("purple-elephant-7391", "text")],
                                        {"secret-name-4471": "v"}, provider=keys.public_key, encrypt="nip44")
        with pytest.raises(JobFailed, match="param top must be between 1 and 100"):
            await customer.result(out_of_range, timeout=20)
        with pytest.raises(JobFailed, match="secret-name-4471"):   # the customer gets it whole
            await customer.result(unknown, timeout=20)
        await asyncio.to_thread(proc.wait_log, unknown["id"])

        rejected = {line["job_id"]: line for line in log_lines(proc) if line.get("event") == "request rejected"}
        assert rejected[out_of_range["id"]]["level"] == "warning"
        assert rejected[out_of_range["id"]]["reason"] == "param top must be between 1 and 100"
        assert rejected[out_of_range["id"]]["private"] is True
        reason = rejected[unknown["id"]]["reason"]
        assert reason.startswith("unknown param(s) ‹private› for kind 5790 (text-stats); accepted: ")
        log_text = proc.log.read_text()
        assert "4471" not in log_text and "purple-elephant" not in log_text
        assert "reason sent encrypted" not in log_text

        jobs = await asyncio.to_thread(dvm, "jobs", "--config", str(proc.config), "--state", "rejected")
        assert jobs.returncode == 0, jobs.stderr
        assert f"{out_of_range['id']}  kind {KIND}  rejected" in jobs.stdout
        assert "param top must be between 1 and 100" in jobs.stdout
        assert "unknown param(s) ‹private›" in jobs.stdout and "4471" not in jobs.stdout
        status = await asyncio.to_thread(dvm, "status", "--config", str(proc.config))
        assert "param top must be between 1 and 100" in status.stdout and "4471" not in status.stdout
    finally:
        proc.stop()


# 5. what a stopping worker waits for, and what it left ----------------------------------------

async def test_sigterm_logs_each_wait_and_what_the_next_start_resumes(tmp_path, relay, customer):
    keys = Keys.generate()
    proc = WorkerProcess(tmp_path, relay.url, keys, stop_grace_seconds=0.5)
    proc.start()
    try:
        proc.wait_log("worker ready")
        request = await customer.submit(KIND, TEXT, {"work_seconds": "4"}, provider=keys.public_key)
        async for update in customer.updates(request, timeout=10):
            if update.progress:
                break
        proc.proc.terminate()
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        lines = [line for line in log_lines(proc) if line.get("logger") == "dvm.worker"]
        events = [line["event"] for line in lines]
        first = events.index("worker stopping")
        steps = events[first:]
        assert steps[0] == "worker stopping" and steps[-1] == "worker stopped", steps
        waiting = lines[first + steps.index("waiting for the jobs in progress to finish")]
        assert waiting["jobs"] == [request["id"]] and waiting["wait_seconds"] == 0.5
        stopping = lines[first + steps.index("stopping the jobs still running; they are queued again for the "
                                             "next start")]
        assert stopping["jobs"] == [request["id"]]
        assert "closing relay connections" in steps
        stopped = lines[-1]
        assert stopped["event"] == "worker stopped"
        # Counted from the store: the job is queued there, and `dvm jobs` says the same.
        assert stopped["jobs_queued"] == 1 and stopped["jobs_running"] == 0, stopped
        assert stopped["next_start"].startswith("resumes 1 job(s) queued to run")
        queued = await asyncio.to_thread(dvm, "jobs", "--config", str(proc.config), "--state", "queued")
        assert request["id"] in queued.stdout

        proc.start()   # the next start resumes it, then a stop with nothing left says so
        assert result_json(await customer.result(request, timeout=30))["words"] == 3
        await asyncio.sleep(0.5)   # the result's bookkeeping
        proc.proc.terminate()
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        stopped = [line for line in log_lines(proc) if line.get("event") == "worker stopped"]
        assert len(stopped) == 2 and stopped[-1]["next_start"] == "nothing left to resume", stopped[-1]
        assert stopped[-1]["jobs_queued"] == 0 and stopped[-1]["outbox_unsent"] == 0
    finally:
        proc.stop()
