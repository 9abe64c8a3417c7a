"""`dvm wallet …` against a real mint: mint, balance, send, receive, melt."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from .test_wallet import external_invoice


def dvm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvm_core.cli", "wallet", *args],
                          capture_output=True, text=True, timeout=120)


def test_wallet_commands_move_ecash_end_to_end(tmp_path, mint):
    alice = ["--wallet-dir", str(tmp_path / "alice"), "--mint", mint.url]
    bob = ["--wallet-dir", str(tmp_path / "bob"), "--mint", mint.url]

    out = dvm("mint", "50", *alice)
    assert out.returncode == 0, out.stderr
    assert "minted 50" in out.stdout
    assert json.loads(dvm("balance", "--json", *alice).stdout) == {mint.url: 50}

    sent = dvm("send", "20", *alice)
    assert sent.returncode == 0, sent.stderr
    token = sent.stdout.strip()
    assert token.startswith("cashuB") and "\n" not in token

    got = dvm("receive", token, *bob)
    assert got.returncode == 0, got.stderr
    assert "received 20 sat" in got.stdout
    again = dvm("receive", token, *bob)
    assert again.returncode == 1 and "already spent" in again.stderr and "Traceback" not in again.stderr

    melted = dvm("melt", external_invoice(5), *bob)
    assert melted.returncode == 0, melted.stderr
    assert json.loads(dvm("balance", "--json", *bob).stdout)[mint.url] <= 15
    assert json.loads(dvm("balance", "--json", *alice).stdout) == {mint.url: 30}
    # The wallet remembers its mint, and says its balance in words.
    words = dvm("balance", "--wallet-dir", str(tmp_path / "alice"))
    assert words.returncode == 0 and words.stdout.splitlines() == [f"30 sat at {mint.url}", "total: 30 sat"]

    directory = tmp_path / "alice"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    # the mnemonic never reaches the terminal
    assert "mnemonic" not in (out.stdout + out.stderr).lower()


def test_wallet_command_errors_are_one_clear_line(tmp_path, mint):
    out = dvm("balance")
    assert out.returncode != 0 and "--config" in out.stderr and "Traceback" not in out.stderr
    out = dvm("receive", "cashuBgarbage", "--wallet-dir", str(tmp_path / "w"), "--mint", mint.url)
    assert out.returncode == 1 and "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
