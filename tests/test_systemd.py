"""systemd integration: the sd_notify protocol against a real datagram socket, and the unit file
checked by `systemd-analyze verify` (installed from Debian's `systemd` package if missing)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from dvm_core.worker.keys import CREDENTIAL_NAME
from dvm_core.worker.sdnotify import STATUS_ONLY_INTERVAL, SystemdNotifier, watchdog_loop

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "dvm-worker.service"
INSTALLED_DVM = "/opt/dvm-worker/.venv/bin/dvm"


# --- the notify protocol -------------------------------------------------------------------

class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, at a path or in the abstract
    namespace (`@name`)."""

    def __init__(self, directory: Path | None = None, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"dvm-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        else:
            path = directory / "notify.sock"
            if len(str(path)) > 100:  # sun_path holds 108 bytes
                path = Path(tempfile.mkdtemp(prefix="dvm-notify-")) / "notify.sock"
            self.sock.bind(str(path))
            self.env_value = str(path)

    def recv(self, timeout: float = 2.0) -> bytes:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def drain(self) -> list[bytes]:
        """Every datagram waiting now."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096))
        except BlockingIOError:
            return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(tmp_path)
    yield s
    s.close()


def test_messages_arrive_as_single_datagrams(notify_socket):
    n = SystemdNotifier(env={"NOTIFY_SOCKET": notify_socket.env_value})
    assert n.enabled
    assert n.ready("queued 0, running 0, earned 0 sat")
    assert notify_socket.recv() == b"READY=1\nSTATUS=queued 0, running 0, earned 0 sat"
    assert n.ready()
    assert notify_socket.recv() == b"READY=1"
    assert n.status("queued 2, running 1, earned 21 sat")
    assert notify_socket.recv() == b"STATUS=queued 2, running 1, earned 21 sat"
    assert n.status("two\nlines")  # a newline would start a new assignment
    assert notify_socket.recv() == b"STATUS=two lines"
    assert n.watchdog()
    assert notify_socket.recv() == b"WATCHDOG=1"
    assert n.watchdog("queued 0, running 0, earned 21 sat")
    assert notify_socket.recv() == b"WATCHDOG=1\nSTATUS=queued 0, running 0, earned 21 sat"
    assert n.stopping()
    assert notify_socket.recv() == b"STOPPING=1"
    assert n.stopping("draining 1 job")
    assert notify_socket.recv() == b"STOPPING=1\nSTATUS=draining 1 job"
    assert n.extend_timeout(90)
    assert notify_socket.recv() == b"EXTEND_TIMEOUT_USEC=90000000"
    assert notify_socket.drain() == []
    n.close()


def test_abstract_namespace_socket():
    s = NotifySocket(abstract=True)
    try:
        n = SystemdNotifier(env={"NOTIFY_SOCKET": s.env_value})
        assert s.env_value.startswith("@") and n.enabled
        assert n.ready("up")
        assert s.recv() == b"READY=1\nSTATUS=up"
        assert n.stopping()
        assert s.recv() == b"STOPPING=1"
    finally:
        s.close()


def test_reads_the_process_environment(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = SystemdNotifier()
    assert n.watchdog_interval == 15.0
    assert n.ready()
    assert notify_socket.recv() == b"READY=1"


async def test_without_systemd_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # no socket: no watchdog either
    for n in (SystemdNotifier(), SystemdNotifier(env={})):
        assert not n.enabled
        assert n.watchdog_interval is None
        assert n.ready("x") is False
        assert n.status("x") is False
        assert n.watchdog() is False
        assert n.stopping() is False
        # the loop returns at once instead of pinging nobody forever
        await asyncio.wait_for(watchdog_loop(n, lambda: "x", interval=0.01), 1)


@pytest.mark.parametrize("value", ["relative/path.sock", "vsock:2:1234", "@"])
def test_unusable_socket_addresses_disable_notifying(value):
    assert not SystemdNotifier(env={"NOTIFY_SOCKET": value}).enabled


def test_a_vanished_socket_does_not_raise(tmp_path):
    n = SystemdNotifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.ready() is False  # logged, not raised: the worker keeps running
    assert n.watchdog() is False


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "<self>"}, 30.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "<other>"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "junk"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(notify_socket, env, interval):
    pid = os.getpid()
    values = {k: v.replace("<self>", str(pid)).replace("<other>", str(pid + 1)) for k, v in env.items()}
    n = SystemdNotifier(env={"NOTIFY_SOCKET": notify_socket.env_value, **values})
    assert n.watchdog_interval == interval


async def test_watchdog_loop_pings_at_half_the_timeout_until_cancelled(notify_socket):
    # WatchdogSec=0.2s: a ping every 0.1 s, each with the current status line
    n = SystemdNotifier(env={"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"})
    assert n.watchdog_interval == pytest.approx(0.1)
    calls = 0

    def status() -> str:
        nonlocal calls
        calls += 1
        return f"queued {calls}, running 0, earned 21 sat"

    task = asyncio.create_task(watchdog_loop(n, status))
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    got = notify_socket.drain()
    assert 11 <= len(got) <= 17, got  # 1 at once + 1.5 s / 0.1 s, give or take scheduling
    assert got == [f"WATCHDOG=1\nSTATUS=queued {i}, running 0, earned 21 sat".encode()
                   for i in range(1, len(got) + 1)]
    await asyncio.sleep(0.3)
    assert notify_socket.drain() == []  # cancelled means silent


async def test_watchdog_loop_explicit_interval(notify_socket):
    n = SystemdNotifier(env={"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "60000000"})
    task = asyncio.create_task(watchdog_loop(n, lambda: "ok", interval=0.25))
    await asyncio.sleep(1.5)
    task.cancel()
    got = notify_socket.drain()
    assert 5 <= len(got) <= 8, got
    assert set(got) == {b"WATCHDOG=1\nSTATUS=ok"}


async def test_watchdog_loop_keeps_pinging_when_the_status_fails(notify_socket):
    n = SystemdNotifier(env={"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(watchdog_loop(n, lambda: 1 / 0))
    await asyncio.sleep(0.3)
    task.cancel()
    got = notify_socket.drain()
    assert len(got) >= 3 and set(got) == {b"WATCHDOG=1"}


async def test_without_watchdog_the_loop_sends_status_only(notify_socket):
    assert STATUS_ONLY_INTERVAL == pytest.approx(10, abs=5)
    n = SystemdNotifier(env={"NOTIFY_SOCKET": notify_socket.env_value})
    assert n.watchdog_interval is None
    task = asyncio.create_task(watchdog_loop(n, lambda: "queued 0, running 0, earned 0 sat"))
    await asyncio.sleep(0.3)  # the first status goes at once, the next only after ~10 s
    task.cancel()
    assert notify_socket.drain() == [b"STATUS=queued 0, running 0, earned 0 sat"]

    task = asyncio.create_task(watchdog_loop(n, lambda: "s", interval=0.1))
    await asyncio.sleep(0.55)
    task.cancel()
    got = notify_socket.drain()
    assert 4 <= len(got) <= 7 and set(got) == {b"STATUS=s"}  # never WATCHDOG=1


# --- the unit file ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    """`systemd-analyze`, installing Debian's `systemd` package if it is missing. The unit file
    is part of what ships: not being able to check it is a failure, not a skip."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.fail("systemd-analyze is missing and cannot be installed here "
                    "(needs apt-get as root): apt-get install -y --no-install-recommends systemd")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "systemd"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:  # stale or empty package lists (fresh containers have none)
        subprocess.run([apt, "update"], env=env, capture_output=True, text=True, timeout=900)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail(f"could not install systemd (apt-get exit {result.returncode}):\n"
                    f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return found


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> [(key, value)], keeping repeated keys (DeviceAllow=, Environment=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(text: str, section: str, key: str) -> list[str]:
    return [v for k, v in unit_entries(text)[section] if k == key]


def verifiable_copy(directory: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this checkout's `dvm` (verify checks that the
    binary exists and is executable); everything else exactly as shipped."""
    text = UNIT.read_text() if text is None else text
    dvm = REPO / ".venv" / "bin" / "dvm"
    assert os.access(dvm, os.X_OK), f"{dvm} missing: run `make` first"
    assert text.count(f"ExecStart={INSTALLED_DVM} ") == 1
    path = directory / UNIT.name
    path.write_text(text.replace(f"ExecStart={INSTALLED_DVM} ", f"ExecStart={dvm} "))
    return path


PROBLEM = re.compile(r"error|unknown|invalid|failed|ignoring|not executable|warning", re.I)


def verify(systemd_analyze: str, unit: Path) -> tuple[int, list[str]]:
    """Exit code and the output lines that report a problem. systemd-analyze exits 0 on
    most unit mistakes (unknown keys, unparsable values are warnings, "…, ignoring"), so
    the lines about our unit count as much as the exit code."""
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run([systemd_analyze, "verify", "--man=no", str(unit)], env=env,
                            capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if PROBLEM.search(line) or unit.name in line or str(unit) in line]
    return result.returncode, problems


def test_unit_passes_systemd_analyze_verify(systemd_analyze, tmp_path):
    code, problems = verify(systemd_analyze, verifiable_copy(tmp_path))
    assert code == 0 and problems == [], problems


def test_verify_check_catches_mistakes(systemd_analyze, tmp_path):
    """The check above is not vacuous: each of these exits 0 yet is reported."""
    for bad in ("Foo=1", "WatchdogSec=soon", "DeviceAllow=nvidia0 rw", "RestrictAddressFamilies=AF_BOGUS"):
        text = UNIT.read_text().replace("\n[Install]", f"\n{bad}\n\n[Install]")
        _, problems = verify(systemd_analyze, verifiable_copy(tmp_path, text))
        assert problems, bad
    # and the shipped ExecStart (not installed in this checkout) is an error
    code, problems = verify(systemd_analyze, UNIT)
    assert code != 0 and problems


def test_unit_security_exposure(systemd_analyze, tmp_path):
    """systemd's own hardening score stays in its "OK" band (GPU access and W+X memory keep it
    from "good")."""
    result = subprocess.run([systemd_analyze, "security", "--offline=yes", "--no-pager",
                             str(verifiable_copy(tmp_path))], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SYSTEMD_COLORS": "0"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    level = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert level, result.stdout[-3000:]
    assert float(level.group(1)) <= 5.0, result.stdout[-3000:]  # 3.4 as written


def seconds(span: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


def test_unit_settings():
    text = UNIT.read_text()
    one = {k: v[0] for k in ("Type", "NotifyAccess", "WatchdogSec", "Restart", "RestartSec", "DynamicUser",
                             "StateDirectory", "CacheDirectory", "LoadCredential", "DevicePolicy",
                             "PrivateDevices", "MemoryDenyWriteExecute", "KillMode", "TimeoutStopSec",
                             "ExecStart", "UMask", "ProtectSystem", "NoNewPrivileges",
                             "CapabilityBoundingSet") if (v := values(text, "Service", k))}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert seconds(one["WatchdogSec"]) == 60
    assert one["Restart"] == "on-failure"
    assert seconds(one["RestartSec"]) == 5
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "dvm-worker"
    assert one["CacheDirectory"] == "dvm-worker"
    assert one["LoadCredential"] == f"{CREDENTIAL_NAME}:/etc/dvm-worker/dvm.key"
    assert one["ExecStart"] == f"{INSTALLED_DVM} run --config /etc/dvm-worker/dvm.toml"
    assert one["UMask"] == "0077" and one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    # GPUs: a closed device policy that still lets CUDA in
    assert one["DevicePolicy"] == "closed" and one["PrivateDevices"] == "no"
    assert one["MemoryDenyWriteExecute"] == "no"
    allowed = values(text, "Service", "DeviceAllow")
    for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
                 "/dev/nvidia-modeset"):
        assert f"{node} rw" in allowed
    assert not any("*" in a and a.startswith("/dev/") for a in allowed)  # globs: char-… names only
    # state where the worker looks for it; the drain fits inside the stop timeout
    env = dict(v.split("=", 1) for v in values(text, "Service", "Environment"))
    assert env["DVM_STATE_DIR"] == "%S/dvm-worker"
    grace = float(env["DVM_STOP_GRACE_SECONDS"])
    assert one["KillMode"] == "mixed"  # SIGTERM to the worker, not to its jobs' children
    assert 2 * grace + 30 < seconds(one["TimeoutStopSec"])  # grace for running jobs, again after cancel
    assert values(text, "Install", "WantedBy") == ["multi-user.target"]
