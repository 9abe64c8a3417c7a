"""Running it as a provider: capacity, graceful stop of a real process, operator commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from dvm_core.customer.client import JobFailed, result_json
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import JobInput

from .conftest import WorkerProcess

KIND = 5790
TEXT = [JobInput("one two three", "text")]


def dvm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvm_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


async def test_a_full_queue_answers_busy_before_payment_and_queued_jobs_get_a_position(workers, customer):
    worker = await workers.start(max_concurrent_jobs=1, max_queued_jobs=1)
    running = await customer.submit(KIND, TEXT, {"work_seconds": "3"}, provider=worker.keys.public_key)
    async for update in customer.updates(running, timeout=10):
        break
    queued = await customer.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    async for update in customer.updates(queued, timeout=10):
        assert "queued, position 1" in update.message
        break
    refused = await customer.submit(KIND, TEXT, {}, provider=worker.keys.public_key)
    with pytest.raises(JobFailed, match="busy: 1 jobs are waiting .* nothing was charged"):
        await customer.result(refused, timeout=10)
    assert result_json(await customer.result(queued, timeout=20))["words"] == 3


async def test_per_kind_slots_and_devices_are_handed_out(workers, customer, tmp_path):
    from dvm_core import JobKind, JobResult, hookimpl
    from dvm_core.worker.plugins import plugin_manager
    seen: list[str] = []

    class Device:
        @hookimpl
        def register_job_kinds(self, register):
            def run(ctx, job):
                seen.append(ctx.device)
                import time
                time.sleep(0.3)
                return JobResult({"device": ctx.device})
            register(JobKind(kind=5792, name="device-echo", description="says its device", run=run))

    pm = plugin_manager(only=[])
    pm.register(Device(), name="device")
    (tmp_path / "caps").mkdir()
    worker = await workers.start(pm=pm, max_concurrent_jobs=4, devices=["cuda:0", "cuda:1"])
    requests = [await customer.submit(5792, TEXT, {}, provider=worker.keys.public_key) for _ in range(4)]
    results = [result_json(await customer.result(r, timeout=20))["device"] for r in requests]
    assert sorted(results) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


async def test_sigterm_lets_running_jobs_finish_within_the_window(tmp_path, relay, customer):
    keys = Keys.generate()
    proc = WorkerProcess(tmp_path, relay.url, keys, stop_grace_seconds=10)
    proc.start()
    try:
        proc.wait_log("worker ready")
        request = await customer.submit(KIND, TEXT, {"work_seconds": "2"}, provider=keys.public_key)
        async for update in customer.updates(request, timeout=10):
            if update.progress:
                break
        proc.proc.terminate()
        result = await customer.result(request, timeout=20)
        assert result_json(result)["words"] == 3
        assert await asyncio.to_thread(proc.proc.wait, 20) == 0
    finally:
        proc.stop()


async def test_sigterm_past_the_window_requeues_and_a_restart_resumes(tmp_path, relay, customer):
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
        assert await asyncio.to_thread(proc.proc.wait, 20) == 0
        out = dvm("jobs", "--config", str(proc.config), "--json")
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert rows[0]["id"] == request["id"] and rows[0]["state"] == "queued"
        proc.start()
        result = await customer.result(request, timeout=30)
        assert result_json(result)["words"] == 3
    finally:
        proc.stop()


async def test_status_jobs_and_doctor(tmp_path, relay, customer, mint):
    keys = Keys.generate()
    proc = WorkerProcess(tmp_path, relay.url, keys)
    proc.start()
    try:
        proc.wait_log("worker ready")
        request = await customer.submit(KIND, TEXT, {}, provider=keys.public_key)
        await customer.result(request, timeout=20)
        bad = await customer.submit(KIND, TEXT, {"top": "0"}, provider=keys.public_key)
        with pytest.raises(JobFailed):
            await customer.result(bad, timeout=20)
        await asyncio.sleep(0.3)
        status = await asyncio.to_thread(dvm, "status", "--config", str(proc.config))
        assert status.returncode == 0, status.stderr
        assert "succeeded" in status.stdout and "rejected" in status.stdout and "earned:" in status.stdout
        jobs = await asyncio.to_thread(dvm, "jobs", "--config", str(proc.config), "--state", "rejected")
        assert bad["id"] in jobs.stdout and request["id"] not in jobs.stdout
        doctor = await asyncio.to_thread(dvm, "doctor", "--config", str(proc.config))
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert f"ok    relay {relay.url}" in doctor.stdout and "ok    key: npub1" in doctor.stdout
        assert "text-stats (kind 5790" in doctor.stdout
    finally:
        proc.stop()


def test_doctor_names_what_is_broken(tmp_path):
    config = tmp_path / "dvm.toml"
    config.write_text('[dvm]\nrelays = ["ws://127.0.0.1:9"]\nmints = ["http://127.0.0.1:9"]\n'
                      f'key_file = "{tmp_path / "missing.key"}"\n'
                      '[prices]\n"text-stats" = 1\n"image-classifier" = 5\n"training-verify" = 2\n')
    out = dvm("doctor", "--config", str(config))
    assert out.returncode == 1
    # Fixed prices for kinds their plugins price by work are not what a job costs: said.
    for name in ("image-classifier", "training-verify"):
        assert f"[prices] {name}: not charged, its plugin prices this kind by work" in out.stdout, out.stdout
    assert "[prices] text-stats" not in out.stdout
    # A Python whose AST constructor is not thread-safe (python/cpython#106905) is said.
    from dvm_core.devtools.doctor import ast_race_in
    assert [ast_race_in(v) for v in ((3, 11, 7), (3, 11, 8), (3, 12, 1), (3, 12, 2), (3, 13, 0))] == \
        [True, False, True, False, False]
    assert ("AST constructor recursion depth mismatch" in out.stdout) == ast_race_in(sys.version_info[:3])
    assert "FAIL  key:" in out.stdout and "FAIL  relay ws://127.0.0.1:9" in out.stdout
    assert "FAIL  mint http://127.0.0.1:9/v1/info" in out.stdout
    assert "Traceback" not in out.stderr


async def test_dvm_run_speaks_sd_notify_to_a_real_socket(tmp_path, relay):
    import socket
    import time
    path = f"/tmp/dvm-notify-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    proc = WorkerProcess(tmp_path, relay.url, Keys.generate())
    proc.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    try:
        messages = []
        while not any(m.startswith("READY=1") for m in messages):
            messages.append((await asyncio.to_thread(sock.recv, 4096)).decode())
        ready = next(m for m in messages if m.startswith("READY=1"))
        assert "STATUS=queued 0, running 0" in ready
        ping = (await asyncio.to_thread(sock.recv, 4096)).decode()
        assert ping.startswith("WATCHDOG=1") and "STATUS=" in ping
        proc.proc.terminate()
        while True:
            message = (await asyncio.to_thread(sock.recv, 4096)).decode()
            if message.startswith("STOPPING=1"):
                break
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    finally:
        proc.stop()
        sock.close()
        os.unlink(path)


def test_a_second_worker_on_the_same_state_directory_refuses_to_start(tmp_path, relay):
    """Two workers on one store would answer every request twice and spend one wallet."""
    import subprocess
    import sys

    from dvm_core.protocol.events import Keys

    from .conftest import WorkerProcess
    first = WorkerProcess(tmp_path, relay.url, Keys.generate())
    first.start()
    try:
        first.wait_log("worker ready")
        second = subprocess.run([sys.executable, "-m", "dvm_core.cli", "run", "--config", str(first.config)],
                                capture_output=True, text=True, timeout=60,
                                env={**__import__("os").environ, "DVM_PLUGINS": "textstats"})
        assert second.returncode != 0
        assert f"another worker (pid {first.proc.pid}) uses the state directory" in second.stderr, second.stderr
    finally:
        first.stop()
