"""Local services on loopback for the demo and the tests: a real Nostr relay (PyPI
`nostr-relay`) in a child process. Later: the Cashu mint and the blob server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

RELAY_CONFIG = """\
DEBUG: false
relay_name: dvm-worker local relay
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{db}
  validators:
    - nostr_relay.validators.is_not_too_large
    - nostr_relay.validators.is_signed
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
max_event_size: {max_event_size}
oldest_event: 315360000
subscription_limit: 256
message_timeout: 86400
max_limit: 10000
logging:
  version: 1
  root:
    level: WARNING
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalService:
    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_relay(workdir: str | Path, port: int | None = None, max_event_size: int = 131072,
                timeout: float = 30.0) -> LocalService:
    """Start nostr-relay on 127.0.0.1 with its store in `workdir`; returns once it answers."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = workdir / "relay.yaml"
    config.write_text(RELAY_CONFIG.format(db=workdir / "relay.sqlite3", port=port,
                                          max_event_size=max_event_size))
    log_path = workdir / "relay.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from nostr_relay.cli import main; sys.exit(main())",
             "-c", str(config), "serve", "--use-uvicorn"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
        )
    service = LocalService("relay", f"ws://127.0.0.1:{port}", process, log_path)
    _wait_http(service, f"http://127.0.0.1:{port}/", {"Accept": "application/nostr+json"}, timeout)
    return service


def _wait_http(service: LocalService, url: str, headers: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited at start; see {service.log_path}:\n"
                               + service.log_path.read_text()[-2000:])
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    service.kill()
    raise RuntimeError(f"{service.name} did not answer on {url} within {timeout:g}s; see {service.log_path}")
