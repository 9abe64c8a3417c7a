"""The first hour, through the CLI as a person types it: `dvm localnet` (a relay, a mint and a
blob server on loopback, stopped by Ctrl-C), `dvm dvms` (finding DVMs), and the README's
"Try it by hand" section run command by command against what `dvm localnet` starts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


from dvm_core.protocol.events import Keys, sign_event
from dvm_core.protocol.nip90 import HANDLER_KIND
from dvm_core.worker.config import load_config

from .conftest import REPO, WorkerProcess

KIND = 5790


def cli_env(tmp_path: Path) -> dict:
    """The environment of a shell where `dvm` is this checkout's CLI (only the text-stats plugin)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "dvm"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m dvm_core.cli "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVM_")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", "DVM_PLUGINS": "textstats"}


class Shell:
    """A command in a terminal of its own (its own process group, as a shell's job is), its
    output collected as it comes."""

    def __init__(self, command: str, cwd: Path, env: dict):
        self.proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return self.output
            if self.proc.poll() is not None:
                self._reader.join(5)
                if text in self.output:
                    return self.output
                raise AssertionError(f"exited {self.proc.returncode} before {text!r}:\n{self.output[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not seen within {timeout:g}s:\n{self.output[-3000:]}")

    def signal(self, sig: int) -> None:
        """What Ctrl-C does in a terminal: the signal to the whole foreground process group."""
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 60.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def answers(url: str, headers: dict | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3):
            return True
    except OSError:
        return False


def banner_urls(output: str) -> dict[str, str]:
    return {name: re.search(rf"^  {label}\s+(\S+)", output, re.M).group(1)
            for name, label in (("relay", "relay"), ("mint", "mint"), ("blobs", "blob server"))}


def test_dvm_localnet_starts_prints_its_config_and_stops_on_ctrl_c(tmp_path):
    """`dvm localnet` starts the three services, prints their URLs and writes a worker config
    that `dvm run` serves with; Ctrl-C stops all three and exits 0; a second start on the same
    directory brings back the same URLs and provider key; SIGTERM stops it too."""
    env = cli_env(tmp_path)
    net = Shell("dvm localnet --dir ln", tmp_path, env)
    worker = None
    try:
        output = net.wait_for("ready; Ctrl-C stops all three")
        urls = banner_urls(output)
        assert urls["relay"].startswith("ws://127.0.0.1:") and urls["mint"].startswith("http://127.0.0.1:")
        assert answers(urls["relay"].replace("ws://", "http://"), {"Accept": "application/nostr+json"})
        assert answers(urls["mint"] + "/v1/info") and answers(urls["blobs"] + "/")

        config = load_config(tmp_path / "ln" / "dvm.toml", env={}).settings
        assert config.relays == [urls["relay"]] and config.mints == [urls["mint"]]
        assert config.blob_servers == [urls["blobs"]] and config.allow_private_urls is True
        assert f"dvm run --config {tmp_path / 'ln' / 'dvm.toml'}" in output
        customer_env = (tmp_path / "ln" / "customer.env").read_text()
        npub = re.search(r"DVM_NPUB=(npub1\w+)", customer_env).group(1)
        for line in (f"DVM_RELAY={urls['relay']}", f"DVM_MINT={urls['mint']}",
                     f"DVM_BLOSSOM={urls['blobs']}", "DVM_ALLOW_PRIVATE=1"):
            assert f"export {line}\n" in customer_env and line in output

        # The config works: a worker runs on it and announces itself with the printed key.
        worker = Shell("dvm run --config ln/dvm.toml", tmp_path, env)
        ready = worker.wait_for('"worker ready"', 60)
        assert npub in ready and "5790" in ready

        worker.signal(signal.SIGINT)
        assert worker.finish(60) == 0, worker.output[-2000:]
        net.signal(signal.SIGINT)   # Ctrl-C
        assert net.finish(60) == 0, net.output[-2000:]
        assert "stopped the relay, the mint and the blob server" in net.output
        assert not answers(urls["mint"] + "/v1/info") and not answers(urls["blobs"] + "/")
        assert not answers(urls["relay"].replace("ws://", "http://"), {"Accept": "application/nostr+json"})

        again = Shell("dvm localnet --dir ln", tmp_path, env)
        net = again
        output = again.wait_for("ready; Ctrl-C stops all three")
        assert banner_urls(output) == urls and npub in output
        again.signal(signal.SIGTERM)
        assert again.finish(60) == 0, again.output[-2000:]
        assert not answers(urls["mint"] + "/v1/info")
    finally:
        for shell in (worker, net):
            if shell is not None:
                shell.kill()


def publish(relay_url: str, event: dict) -> bool:
    import asyncio

    from dvm_core.transport.relay import RelayPool

    async def go():
        pool = RelayPool([relay_url])
        await pool.start()
        try:
            return any(r.ok for r in await pool.publish(event))
        finally:
            await pool.close()
    return asyncio.run(go())


def dvm_cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvm_core.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dvm_dvms_lists_a_running_worker_and_shows_its_announcement(relay, mint, tmp_path):
    """`dvm dvms --kind` lists a running worker with its price, mints and load, once (its
    newest announcement, not an older one it left with another `d`); `dvm dvms NPUB` shows
    its kinds, params, prices, mints and wallet key; an unknown DVM is exit 1."""
    env = cli_env(tmp_path)
    keys = Keys.generate()
    worker = WorkerProcess(tmp_path, relay.url, keys, mints=[mint.url], prices={"text-stats": 7},
                           heartbeat_seconds=1, name="Listed DVM")
    # An older announcement of the same key at another address: a relay keeps both.
    stale = sign_event(keys, HANDLER_KIND, json.dumps({"name": "Stale DVM", "nip90": {}}),
                       [["d", "dvm-stale"], ["k", str(KIND)]], created_at=int(time.time()) - 3600)
    assert publish(relay.url, stale)
    worker.start(env={k: v for k, v in env.items() if k != "DVM_PLUGINS"})
    try:
        worker.wait_log('"worker ready"', 60)
        listed = None
        for _ in range(60):
            found = dvm_cli("dvms", "--relay", relay.url, "--kind", str(KIND), "--json", env=env)
            assert found.returncode == 0, found.stderr
            ours = [d for d in json.loads(found.stdout) if d["pubkey"] == keys.public_key]
            if ours and ours[0]["status"]:
                listed = ours
                break
            time.sleep(0.5)
        assert listed is not None and len(listed) == 1, "the worker's announcement never came"
        dvm = listed[0]
        assert dvm["name"] == "Listed DVM" and dvm["npub"] == keys.npub
        assert dvm["kinds"][str(KIND)]["name"] == "text-stats" and dvm["mints"] == [mint.url]
        assert dvm["payment"]["prices"] == {"text-stats": 7} and dvm["wallet_pubkey"]
        assert dvm["status"]["slots"] == 1 and dvm["age_seconds"] < 30

        human = dvm_cli("dvms", "--relay", relay.url, "--kind", str(KIND), env=env)
        block = human.stdout[human.stdout.index(keys.npub):].split("\n\n")[0]
        assert "Listed DVM" in block and "kind 5790 text-stats: 7 sat per job" in block, human.stdout
        assert f"mints: {mint.url}" in block and "load: 0 running, 0 queued, 1 slot(s)" in block
        assert "Stale DVM" not in human.stdout

        full = dvm_cli("dvms", "--relay", relay.url, keys.npub, env=env)
        assert full.returncode == 0, full.stderr
        for text in ("Listed DVM", keys.public_key, "kind 5790 text-stats: Counts characters", "price: 7 sat per job",
                     "top: how many frequent words", "counts_file:", f"mints: {mint.url}",
                     f"wallet key (P2PK): {dvm['wallet_pubkey']}", "pays: upfront, on-delivery"):
            assert text in full.stdout, full.stdout

        other = dvm_cli("dvms", "--relay", relay.url, "--kind", "5791", keys.npub, env=env)
        assert other.returncode == 1 and "no announcement of" in other.stderr
        unknown = dvm_cli("dvms", "--relay", relay.url, Keys.generate().npub, env=env)
        assert unknown.returncode == 1 and "no announcement of" in unknown.stderr
    finally:
        worker.stop()


def test_dvm_dvms_shows_param_limits_and_the_dvms_own_mints(relay, tmp_path):
    """Any DVM software's announcement: `dvm dvms NPUB` shows each param's limits from its JSON
    Schema, a rate in words, and the mints of the DVM's kind 10019 over those it announces; the
    newer of two kind-10019 events wins. A relay that does not answer is one clear error."""
    from dvm_core.protocol.ecash import build_nutzap_info
    from dvm_core.protocol.nip90 import KindDescription, build_handler_announcement
    env = cli_env(tmp_path)
    keys, wallet_key = Keys.generate(), "02" + "ab" * 32
    schema = {"type": "object", "additionalProperties": False, "properties": {
        "epochs": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10, "description": "passes"},
        "arch": {"type": "string", "enum": ["mlp", "cnn"], "description": "the network"}}}
    kinds = [KindDescription(5750, "image-classifier", "Trains a classifier.",
                             {"epochs": "passes over the data", "arch": "mlp or cnn"}, schema)]
    announcement = sign_event(keys, *build_handler_announcement(
        "dvm-x", "Schema DVM", "", kinds, extra_content={
            "payment": {"unit": "sat", "mints": ["http://mint.invalid"], "p2pk_pubkey": wallet_key,
                        "prices": {}, "pricing": {"image-classifier": "1000 sats per million sample-epochs"}},
            "status": {"queued": 2, "running": 1, "slots": 1, "updated": int(time.time())}}))
    now = int(time.time())
    old_info = sign_event(keys, *build_nutzap_info([relay.url], ["http://old.invalid"], ["sat"], wallet_key),
                          created_at=now - 60)
    info = sign_event(keys, *build_nutzap_info([relay.url], ["http://own.invalid"], ["sat"], wallet_key),
                      created_at=now)
    for event in (announcement, info, old_info):   # a relay keeps the newest 10019; the check is ours
        assert publish(relay.url, event)
    full = dvm_cli("dvms", "--relay", relay.url, keys.public_key, env=env)
    assert full.returncode == 0, full.stderr
    for text in ("Schema DVM", "load: 1 running, 2 queued, 1 slot(s)", "mints: http://own.invalid",
                 "price: 1000 sats per million sample-epochs",
                 "epochs: passes over the data  [integer, 1..50, default 10]",
                 "arch: mlp or cnn  [string, one of mlp|cnn]", '"maximum":50'):
        assert text in full.stdout, full.stdout
    assert "old.invalid" not in full.stdout
    as_json = json.loads(dvm_cli("dvms", "--relay", relay.url, keys.npub, "--json", env=env).stdout)
    assert as_json["kinds"]["5750"]["params_schema"] == schema and as_json["mints"] == ["http://own.invalid"]

    down = dvm_cli("dvms", "--relay", "ws://127.0.0.1:1", "--timeout", "1", env=env)
    assert down.returncode == 1 and "no relay answered" in down.stderr and "Traceback" not in down.stderr


def readme_section(title: str) -> list[str]:
    """The shell blocks of one section of the README, in order."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"### {title}\n")
    end = text.index("\n## ", start)
    return re.findall(r"```sh\n(.*?)```", text[start:end], re.S)


def test_readme_try_it_by_hand_works_as_written(tmp_path):
    """Each command of the README's "Try it by hand", as written: `dvm localnet` in one terminal,
    `dvm run` in a second, and in a third a wallet funded from the fake mint, `dvm dvms`, a paid
    text-stats job and its result."""
    terminal_1, terminal_2, terminal_3 = readme_section("Try it by hand")
    env = cli_env(tmp_path)
    net = Shell(terminal_1, tmp_path, env)
    worker, worker_code = None, None
    try:
        net.wait_for("ready; Ctrl-C stops all three")
        worker = Shell(terminal_2, tmp_path, env)
        worker.wait_for('"worker ready"', 60)
        # The announcement goes out just after "worker ready": wait for it as a person would.
        customer_env = dict(re.findall(r"export (\w+)=(\S+)", (tmp_path / "localnet" / "customer.env").read_text()))
        for _ in range(60):
            if customer_env["DVM_NPUB"] in dvm_cli("dvms", "--relay", customer_env["DVM_RELAY"], env=env).stdout:
                break
            time.sleep(0.5)

        customer = subprocess.run(["bash", "-euo", "pipefail", "-c", terminal_3], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=180)
        out = customer.stdout
        assert customer.returncode == 0, out + customer.stderr
        assert "minted 100" in out
        assert "1 DVM(s) offer kind 5790" in out and "kind 5790 text-stats: 5 sat per job" in out
        assert "price: 5 sat per job" in out and "top: how many frequent words" in out
        result = json.loads(next(line for line in out.splitlines() if line.startswith('{"characters"')))
        assert result["top_words"] == [["the", 4], ["sat", 2], ["on", 2]]
        assert "word,count\nthe,4\n" in out
        assert "paid 5 sat with a nutzap" in customer.stderr
        assert re.findall(r"^total: (\d+) sat$", out, re.M) == ["95", "5"]
    finally:
        if worker is not None:
            worker.signal(signal.SIGINT)
            worker_code = worker.finish(60)
        net.signal(signal.SIGINT)
        net_code = net.finish(60)
        for shell in (worker, net):
            if shell is not None:
                shell.kill()
    assert worker_code == 0, worker.output[-2000:] if worker else "no worker"
    assert net_code == 0 and "stopped the relay, the mint and the blob server" in net.output


async def test_dvm_job_submit_refuses_a_private_blob_server_before_paying(workers, relay, mint, tmp_path):
    """Without --allow-private (or DVM_ALLOW_PRIVATE=1), a blob server on loopback is refused
    before any sat moves: a --blossom one before anything is uploaded or sent, and the files of a
    pay-on-delivery offer before it is paid (the job is cancelled), not after paying."""
    from dvm_core.devtools.blobserver import start_blob_server

    from .paying import FUNDS, PRICE, paid_worker, provider_balance
    from .test_customer_money import cli_wallet, dvm_submit
    server = await start_blob_server(tmp_path / "blobs")
    try:
        worker = await paid_worker(workers, mint, blob_servers=[server.url], allow_private_urls=True)
        wallet = await cli_wallet(tmp_path, mint.url)
        await wallet.close()
        words = tmp_path / "words.txt"
        words.write_text("the cat sat on the mat")
        code, _, err = await dvm_submit(relay, worker, wallet, "--file", str(words), "--blossom", server.url,
                                        "--max-price", str(PRICE), "--out", str(tmp_path / "o1"))
        assert code == 1 and f"not sent: {server.url} is on a loopback address" in err, err
        assert "--allow-private" in err and "uploaded" not in err and "sent\n" not in err

        code, out, err = await dvm_submit(relay, worker, wallet, "--pay-on-delivery", "--max-price", str(PRICE),
                                          "--param", "counts_file=yes", "--json", "--out", str(tmp_path / "o2"))
        report = json.loads(out.strip().splitlines()[-1])
        assert code == 3 and "not paying: the offered file" in err and "loopback" in err, err
        assert report["paid_sat"] == 0 and report["balance_sat"] == FUNDS, report
        assert await provider_balance(worker) == 0
    finally:
        await server.stop()
