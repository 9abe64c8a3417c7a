"""Local services on loopback for the demo and the tests: a real Nostr relay (PyPI
`nostr-relay`) and a Cashu mint (Nutshell, FakeWallet backend), each in a child process."""

from __future__ import annotations

import os
import secrets
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


def start_mint(workdir: str | Path, port: int | None = None, timeout: float = 30.0,
               input_fee_ppk: int = 0) -> LocalService:
    """Start a Nutshell Cashu mint (FakeWallet backend: invoices pay themselves) on 127.0.0.1.

    Everything the mint keeps lives in `workdir`: its private key (made on first start, reused
    after), its database, its CASHU_DIR. Starting again on the same `workdir` (and `port`) brings
    back the same mint — same keysets, same spent proofs — which is how tests stage an outage.
    Returns once `GET /v1/info` answers.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)
    port = port or free_port()
    key_file = workdir / "mint.key"
    if not key_file.exists():
        # The mint derives every keyset from this key: losing it would void all ecash issued.
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    env = {name: os.environ[name] for name in _MINT_INHERITED_ENV if name in os.environ}
    env.update({
        # The mint reads ~/.cashu/.env and ./.env over its environment: point both at workdir.
        "HOME": str(workdir),
        "MINT_BACKEND_BOLT11_SAT": "FakeWallet",
        "MINT_LISTEN_HOST": "127.0.0.1",
        "MINT_LISTEN_PORT": str(port),
        "MINT_PRIVATE_KEY": key_file.read_text().strip(),
        "MINT_DATABASE": str(workdir / "data"),
        "MINT_AUTH_DATABASE": str(workdir / "data"),
        "CASHU_DIR": str(workdir / "cashu"),
        "MINT_INPUT_FEE_PPK": str(int(input_fee_ppk)),
        "MINT_RATE_LIMIT": "FALSE",
        # FakeWallet waits 3 s by default before it "pays" an invoice either way.
        "FAKEWALLET_DELAY_INCOMING_PAYMENT": "0",
        "FAKEWALLET_DELAY_OUTGOING_PAYMENT": "0",
        "DEBUG": "FALSE",
        "LOG_LEVEL": "INFO",
    })
    log_path = workdir / "mint.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from cashu.mint.main import main; sys.exit(main())",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, env=env,
            start_new_session=True,
        )
    service = LocalService("mint", f"http://127.0.0.1:{port}", process, log_path)
    _wait_http(service, f"{service.url}/v1/info", {}, timeout)
    return service


# Only what a Python child needs: the mint reads every other variable as a setting (DEBUG, TOR...).
_MINT_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV",
                       "SYSTEMROOT")


def start_blob_server_process(workdir: str | Path, port: int | None = None, *,
                              max_bytes: int | None = None, allowed_pubkeys: list[str] | None = None,
                              public_url: str | None = None, timeout: float = 30.0) -> LocalService:
    """Start the embedded Blossom server (`dvm_core.devtools.blobserver.serve`) as a child process on
    127.0.0.1, storing blobs under `workdir/blobs`; returns once `GET /` answers."""
    import json

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    options = {"max_bytes": max_bytes, "allowed_pubkeys": allowed_pubkeys, "public_url": public_url}
    options = {k: v for k, v in options.items() if v is not None}
    code = ("import json, sys; from dvm_core.devtools.blobserver import serve; "
            "serve(sys.argv[1], '127.0.0.1', int(sys.argv[2]), **json.loads(sys.argv[3]))")
    log_path = workdir / "blobserver.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(workdir / "blobs"), str(port), json.dumps(options)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
        )
    service = LocalService("blossom", f"http://127.0.0.1:{port}", process, log_path)
    _wait_http(service, f"{service.url}/", {}, timeout)
    return service


# `dvm localnet`: the three services above, kept in one directory, for a person to use by hand.

class LocalNetError(Exception):
    """The local marketplace cannot start; the message says why."""


@dataclass
class LocalNet:
    """A relay, a mint and a blob server on loopback, with a worker's config and key to use them."""

    directory: Path
    relay: LocalService
    mint: LocalService
    blobs: LocalService
    provider_npub: str
    config_path: Path      # a worker config for `dvm run --config`
    env_path: Path         # the customer's side, as shell variables

    @property
    def services(self) -> list[LocalService]:
        return [self.relay, self.mint, self.blobs]

    def stopped(self) -> LocalService | None:
        """A service that exited by itself, if any."""
        return next((s for s in self.services if s.process.poll() is not None), None)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


LOCALNET_PORTS = "localnet.json"   # the ports of the first start, reused: the URLs stay the same


def _port_free(port: int) -> bool:
    """Whether a server could listen on `port` (as the services do: connections of a previous
    start still closing do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_localnet(directory: str | Path, *, relay_port: int | None = None, mint_port: int | None = None,
                   blob_port: int | None = None, price: int = 5) -> LocalNet:
    """Start the three services with their files under `directory` and write, beside them, a
    worker config (`dvm.toml`, with a provider key `dvm.key` made on the first start) and the
    customer's variables (`customer.env`). A second start on the same directory brings back the
    same relay, mint (keys, ecash) and blobs on the same ports. Raises LocalNetError."""
    import json

    from dvm_core.protocol.events import Keys
    from dvm_core.state.keyfiles import read_key_file, write_key_file
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ports_file = directory / LOCALNET_PORTS
    remembered = json.loads(ports_file.read_text()) if ports_file.is_file() else {}
    ports = {}
    for name, given in (("relay", relay_port), ("mint", mint_port), ("blobs", blob_port)):
        port = given or remembered.get(name) or free_port()
        if not _port_free(port):
            raise LocalNetError(f"port {port} for the {name} is in use (another `dvm localnet` on "
                                f"{directory}?); give --{'blob' if name == 'blobs' else name}-port")
        ports[name] = port
    started: list[LocalService] = []
    try:
        started.append(start_relay(directory / "relay", ports["relay"]))
        started.append(start_mint(directory / "mint", ports["mint"]))
        started.append(start_blob_server_process(directory / "blobs", ports["blobs"]))
    except BaseException as exc:
        for service in started:
            service.stop()
        if isinstance(exc, RuntimeError):
            raise LocalNetError(str(exc)) from None
        raise
    relay, mint, blobs = started
    ports_file.write_text(json.dumps(ports) + "\n")
    key_file = directory / "dvm.key"
    if not key_file.exists():
        write_key_file(key_file, Keys.generate())
    npub = read_key_file(key_file).npub
    config = directory / "dvm.toml"
    config.write_text(
        "# Written by `dvm localnet` at each start: a worker for the relay, mint and blob server\n"
        "# it runs on loopback. Use it with `dvm run --config " + str(config) + "`.\n"
        "[dvm]\n"
        'name = "Local DVM"\n'
        'about = "A worker on the local marketplace of `dvm localnet`."\n'
        f"relays = [{json.dumps(relay.url)}]\n"
        f"mints = [{json.dumps(mint.url)}]\n"
        f"blob_servers = [{json.dumps(blobs.url)}]\n"
        'key_file = "dvm.key"\n'
        'state_dir = "worker-state"\n'
        "allow_private_urls = true   # inputs on the loopback blob server\n"
        "heartbeat_seconds = 30      # `dvm dvms` shows the load of at most 30 s ago\n"
        "progress_interval = 0.5\n"
        "\n[prices]\n"
        f'"text-stats" = {int(price)}\n')
    env = directory / "customer.env"
    env.write_text(
        "# Written by `dvm localnet`: the customer's side of the local marketplace.\n"
        f"# Load it with `source {env}`.\n"
        f"export DVM_RELAY={relay.url}\n"
        f"export DVM_MINT={mint.url}\n"
        f"export DVM_BLOSSOM={blobs.url}\n"
        f"export DVM_NPUB={npub}\n"
        "# The blob server is on loopback: let `dvm job submit` and `dvm job fetch` use it.\n"
        "export DVM_ALLOW_PRIVATE=1\n")
    return LocalNet(directory, relay, mint, blobs, npub, config, env)
