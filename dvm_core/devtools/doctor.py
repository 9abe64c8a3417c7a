"""`dvm doctor`: check what a worker needs, one clear line each, without starting it.

Each line starts with `ok`, `warn` (it runs, but likely not as the provider means) or `FAIL`
(it cannot work as configured), and a line that is not ok ends with the fix. The last line
counts them; any FAIL makes the command exit non-zero. The relay connections' own log lines are
the CLI's to quiet (`dvm doctor` does): their failures are in the relay lines here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
from typing import Callable
from urllib.parse import urlsplit

import httpx

from dvm_core.devices import gpu_indices
from dvm_core.worker.config import ConfigError, load_config
from dvm_core.worker.keys import load_keys
from dvm_core.worker.offer import ignored_prices
from dvm_core.worker.plugins import PluginError, collect_job_kinds, plugin_manager
from dvm_core.transport.fetch import FetchError, blocked_reason, resolve_checked
from dvm_core.transport.relay import RelayConnection

RELAY_WAIT_SECONDS = 5


async def run_checks(config_path: str, say: Callable[[str], None]) -> bool:
    """Run every check, saying one line each; True when none FAILed."""
    counts = {"ok": 0, "warn": 0, "FAIL": 0}

    def line(level: str, text: str, fix: str = "") -> None:
        counts[level] += 1
        say(f"{level:<5} {text}" + (f"; fix: {fix}" if fix else ""))

    def good(text: str) -> None:
        line("ok", text)

    def warn(text: str, fix: str = "") -> None:
        line("warn", text, fix)

    def bad(text: str, fix: str = "") -> None:
        line("FAIL", text, fix)

    def summary() -> bool:
        say(f"doctor: {counts['ok']} ok, {counts['warn']} warn, {counts['FAIL']} FAIL"
            + (": fix the FAIL lines before `dvm run`" if counts["FAIL"] else ""))
        return not counts["FAIL"]

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        bad(f"config: {exc}")
        return summary()
    s = config.settings
    good(f"config {config_path}")
    try:
        keys = load_keys(s)
        good(f"key: {keys.npub}")
    except ConfigError as exc:
        bad(f"key: {exc}")   # the message says how to make one
    pm = None
    try:
        pm = plugin_manager()
        kinds = collect_job_kinds(pm, config.raw)
        if kinds:
            good("plugins: " + ", ".join(f"{k.name} (kind {k.kind}, {k.plugin})" for k in kinds.values()))
            for name in ignored_prices(kinds.values(), config.raw.get("prices") or {}):
                owners = next(k.plugin for k in kinds.values() if k.name == name).split(",")
                warn(f"[prices] {name}: not charged, its plugin prices this kind by work",
                     "drop the entry; the rate is set under " + " and ".join(f"[plugins.{o}]" for o in owners))
        else:
            bad("plugins: no job kinds registered", "install a plugin, or check DVM_PLUGINS names installed ones")
    except PluginError as exc:
        bad(f"plugins: {exc}")
    if pm is not None:
        _check_plugin_setup(pm, config.raw, warn, bad)

    async def relay_check(url: str) -> None:
        conn = RelayConnection(url, lambda *a: None, max_backoff=1)
        conn.start()
        try:
            if await conn.wait_connected(RELAY_WAIT_SECONDS):
                good(f"relay {url}")
            else:
                why = f" ({conn.last_error})" if conn.last_error else ""
                bad(f"relay {url}: no connection within {RELAY_WAIT_SECONDS} s{why}",
                    "check the URL in relays = [...] and that the relay is up and reachable from here")
        finally:
            await conn.close()

    async def http_check(what: str, url: str, fix: str) -> None:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(url)
            if response.status_code < 400:
                good(f"{what} {url}")
            else:
                bad(f"{what} {url}: HTTP {response.status_code}", fix)
        except httpx.HTTPError as exc:
            bad(f"{what} {url}: {type(exc).__name__} {exc}".rstrip(), fix)

    checks = [relay_check(u) for u in s.relays]
    checks += [http_check("mint", m.rstrip("/") + "/v1/info",
                          "start the mint, or correct its URL in mints = [...]") for m in s.mints]
    checks += [http_check("blob server", b, "start the blob server, or correct its URL in blob_servers = [...]")
               for b in s.blob_servers]
    checks += [_blob_reach(b, s.allow_private_urls, warn, bad) for b in s.blob_servers]
    await asyncio.gather(*checks)
    if not s.mints:
        warn("mints: none configured, so every job is free",
             "list the Cashu mints you accept in mints = [...] and set prices, if you mean to be paid")
    if not s.blob_servers:
        warn("blob servers: none configured, so jobs that return files fail",
             "list a Blossom server in blob_servers = [...]")
    _check_gpu(good, warn, bad, s.devices)
    _check_python(warn)
    return summary()


def _check_plugin_setup(pm, raw: dict, warn, bad) -> None:
    """Each plugin's own look at its settings (the `check_setup` hook)."""
    for impl in pm.hook.check_setup.get_hookimpls():
        try:
            found = impl.function(**{a: {"config": raw}[a] for a in impl.argnames}) or []
            problems = [(str(level), str(text)) for level, text in found]
        except Exception as exc:   # a plugin's bug must not hide the other checks
            bad(f"plugin {impl.plugin_name}: its setup check failed ({type(exc).__name__}: {exc})",
                "report it to the plugin's author")
            continue
        for level, text in problems:
            (bad if level.upper() == "FAIL" else warn)(text)


async def _blob_reach(url: str, allow_private: bool, warn, bad) -> None:
    """A blob server on a loopback or private address: results there reach only this machine
    (or network), and with allow_private_urls off the worker refuses the inputs stored on it."""
    parts = urlsplit(url)
    if not parts.hostname:
        return
    try:
        addresses = await resolve_checked(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                          allow_private=True)
    except FetchError:
        return   # the blob server's own line says it cannot be reached
    reasons = [r for r in (blocked_reason(a) for a in addresses) if r]
    if not reasons:
        return
    if allow_private:
        warn(f"blob server {url} is on {reasons[0]}: customers off this machine or network cannot "
             "download the results it holds", "fine for a test here; for customers elsewhere list a "
             "public Blossom server in blob_servers = [...]")
    else:
        bad(f"blob server {url} is on {reasons[0]} but allow_private_urls = false: the worker refuses "
            "inputs stored on it, and customers elsewhere cannot download the results it holds",
            "for a test on this machine set allow_private_urls = true in [dvm]; for customers "
            "elsewhere list a public Blossom server in blob_servers = [...]")


def ast_race_in(version: tuple[int, int, int]) -> bool:
    """Whether this CPython's AST constructor keeps its recursion depth in state shared by
    threads (python/cpython#106905, fixed in 3.11.8 and 3.12.2): there, code that parses Python
    in two job threads at once (numpy reading .npy headers, inspect, jinja2) can fail with
    "SystemError: AST constructor recursion depth mismatch"."""
    return (3, 11, 0) <= version < (3, 11, 8) or (3, 12, 0) <= version < (3, 12, 2)


def _check_python(warn) -> None:
    version = tuple(sys.version_info[:3])
    if ast_race_in(version):
        warn(f"python {'.'.join(map(str, version))}: jobs running at once can fail now and then with "
             "\"SystemError: AST constructor recursion depth mismatch\" (CPython bug gh-106905; the "
             "worker guards numpy's .npy reading, the common case, but not every library)",
             "run the worker on Python 3.11.8 or later (3.12.2 or later on 3.12)")


def _check_gpu(good, warn, bad, devices: list[str]) -> None:
    # The core never imports torch: ask a child process, as a plugin would see it.
    if importlib.util.find_spec("torch") is None:
        warn("torch is not installed: training plugins cannot run",
             "install torch in the worker's environment (not needed for plugins that do not train)")
        return
    probe = ("import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), "
             "'count': torch.cuda.device_count(), 'names': [torch.cuda.get_device_name(i) "
             "for i in range(torch.cuda.device_count())], 'version': torch.__version__}))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        import json
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:
        bad(f"gpu: could not ask torch ({exc})", "check that `python -c 'import torch'` works for the worker")
        return
    if info["cuda"]:
        good(f"gpu: {info['count']} CUDA device(s): {', '.join(info['names'])} (torch {info['version']})")
        missing = [d for d in devices if any(i >= info["count"] for i in gpu_indices(d) or [])]
        if missing:
            bad(f"devices: {', '.join(missing)} configured but not present",
                f"list only cuda:0 to cuda:{info['count'] - 1} in devices = [...]")
    else:
        warn(f"gpu: none visible to torch {info['version']}; training runs on the CPU",
             "check the driver and DeviceAllow= (nvidia-smi is installed)" if shutil.which("nvidia-smi")
             else "none, if CPU training is what you mean; else install a CUDA build of torch")
