"""Fixtures: a real nostr-relay on loopback, workers in-process or as child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dvm_core.customer.client import Customer
from dvm_core.worker.config import load_config
from dvm_core.protocol.events import Keys
from dvm_core.state.keyfiles import write_key_file
from dvm_core.devtools.localnet import start_mint, start_relay
from dvm_core.worker.plugins import plugin_manager
from dvm_core.worker.worker import Worker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def relay(tmp_path_factory):
    """One relay for the session; tests tell their events apart by fresh keys."""
    service = start_relay(tmp_path_factory.mktemp("relay"))
    yield service
    service.stop()


@pytest.fixture(scope="session")
def mint(tmp_path_factory):
    """One Nutshell mint (FakeWallet Lightning, no fees) for the session."""
    service = start_mint(tmp_path_factory.mktemp("mint"))
    yield service
    service.stop()


@pytest.fixture
def fresh_relay(tmp_path):
    """A relay of the test's own, for tests that stop or restart it."""
    service = start_relay(tmp_path / "relay")
    yield service
    service.stop()


def write_config(path: Path, relay_url: str | list[str], prices: dict | None = None,
                 plugins: dict[str, dict] | None = None, **settings) -> Path:
    """A worker's TOML: `settings` in [dvm], `prices` in [prices], `plugins` as [plugins.<name>]."""
    values = {"relays": [relay_url] if isinstance(relay_url, str) else relay_url,
              "state_dir": str(path.parent / "state"), "progress_interval": 0.2,
              "log_format": "json", **settings}
    lines = ["[dvm]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    if prices:
        lines += ["[prices]"] + [f"{json.dumps(k)} = {v}" for k, v in prices.items()]
    for name, table in (plugins or {}).items():
        lines += [f"[plugins.{json.dumps(name)}]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class WorkerFactory:
    """Start in-process workers; each is stopped at the end of the test."""

    def __init__(self, tmp_path: Path, relay_url: str):
        self.tmp_path = tmp_path
        self.relay_url = relay_url
        self.workers: list[Worker] = []

    async def start(self, keys: Keys | None = None, pm=None, name: str = "worker", prices: dict | None = None,
                    plugins: dict[str, dict] | None = None, **settings) -> Worker:
        keys = keys or Keys.generate()
        live = {w.factory_name for w in self.workers if not w._stopped.is_set()}
        if name in live:   # a worker holds that state directory: this one gets its own
            name = f"{name}-{len(self.workers)}"
        directory = self.tmp_path / name
        directory.mkdir(exist_ok=True)
        config = load_config(write_config(directory / "dvm.toml", settings.pop("relay_url", self.relay_url),
                                          prices=prices, plugins=plugins, **settings), env={})
        worker = Worker(config, keys, pm or plugin_manager(only=["textstats"]))
        worker.factory_name = name
        await worker.start()
        await worker.pool.wait_all_connected(10)
        self.workers.append(worker)
        return worker

    async def stop_all(self) -> None:
        for worker in self.workers:
            await worker.stop(grace=1.0)


@pytest.fixture
async def workers(tmp_path, relay):
    factory = WorkerFactory(tmp_path, relay.url)
    yield factory
    await factory.stop_all()


@pytest.fixture
async def funded_customers(tmp_path, mint, relay):
    """Make customers with FUNDS sat each at the session mint (see paying.py); closed at the end."""
    from .paying import close_customer, funded_customer
    made = []

    async def make():
        made.append(await funded_customer(tmp_path, mint.url, relay.url))
        return made[-1]
    yield make
    for made_customer in made:
        await close_customer(made_customer)


@pytest.fixture
async def funded(funded_customers):
    """A customer with FUNDS sat at the session mint; its P2PK key is its Nostr key (refunds)."""
    return await funded_customers()


@pytest.fixture
async def customer(relay):
    async with Customer(Keys.generate(), [relay.url]) as c:
        await c.pool.wait_all_connected(10)
        yield c


class WorkerProcess:
    """`dvm run` as a child process, to kill and restart for real."""

    def __init__(self, tmp_path: Path, relay_url: str, keys: Keys, **settings):
        self.dir = tmp_path / "proc"
        self.dir.mkdir(exist_ok=True)
        key_file = self.dir / "dvm.key"
        if not key_file.exists():
            write_key_file(key_file, keys)
        self.config = write_config(self.dir / "dvm.toml", relay_url, key_file=str(key_file), **settings)
        self.log = self.dir / "worker.log"
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dvm_core.cli", "run", "--config", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "DVM_PLUGINS": "textstats", **(env or {})},
        )

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in the worker log:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
