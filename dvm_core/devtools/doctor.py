"""`dvm doctor`: check what a worker needs, one clear line each, without starting it."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
from typing import Callable

import httpx

from dvm_core.worker.config import ConfigError, load_config
from dvm_core.worker.keys import load_keys
from dvm_core.worker.plugins import PluginError, collect_job_kinds, plugin_manager
from dvm_core.transport.relay import RelayConnection


async def run_checks(config_path: str, say: Callable[[str], None]) -> bool:
    ok = True

    def good(text: str) -> None:
        say(f"ok    {text}")

    def bad(text: str) -> None:
        nonlocal ok
        ok = False
        say(f"FAIL  {text}")

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        bad(f"config: {exc}")
        return False
    s = config.settings
    good(f"config {config_path}")
    try:
        keys = load_keys(s)
        good(f"key: {keys.npub}")
    except ConfigError as exc:
        bad(f"key: {exc}")
    try:
        kinds = collect_job_kinds(plugin_manager(), config.raw)
        if kinds:
            good("plugins: " + ", ".join(f"{k.name} (kind {k.kind}, {k.plugin})" for k in kinds.values()))
        else:
            bad("plugins: no job kinds registered; install a plugin or check DVM_PLUGINS")
    except PluginError as exc:
        bad(f"plugins: {exc}")

    async def relay_check(url: str) -> None:
        conn = RelayConnection(url, lambda *a: None, max_backoff=1)
        conn.start()
        try:
            if await conn.wait_connected(5):
                good(f"relay {url}")
            else:
                bad(f"relay {url}: no connection within 5 s")
        finally:
            await conn.close()

    async def http_check(what: str, url: str) -> None:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(url)
            if response.status_code < 400:
                good(f"{what} {url}")
            else:
                bad(f"{what} {url}: HTTP {response.status_code}")
        except httpx.HTTPError as exc:
            bad(f"{what} {url}: {type(exc).__name__} {exc}".rstrip())

    checks = [relay_check(u) for u in s.relays]
    checks += [http_check("mint", m.rstrip("/") + "/v1/info") for m in s.mints]
    checks += [http_check("blob server", b) for b in s.blob_servers]
    await asyncio.gather(*checks)
    if not s.mints:
        say("note  no mints configured: every job is free")
    if not s.blob_servers:
        say("note  no blob servers configured: jobs that return files will fail")
    _check_gpu(good, bad, say, s.devices)
    return ok


def _check_gpu(good, bad, say, devices: list[str]) -> None:
    # The core never imports torch: ask a child process, as a plugin would see it.
    if importlib.util.find_spec("torch") is None:
        say("note  torch is not installed: training plugins cannot run")
        return
    probe = ("import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), "
             "'count': torch.cuda.device_count(), 'names': [torch.cuda.get_device_name(i) "
             "for i in range(torch.cuda.device_count())], 'version': torch.__version__}))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        import json
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:
        bad(f"gpu: could not ask torch ({exc})")
        return
    if info["cuda"]:
        good(f"gpu: {info['count']} CUDA device(s): {', '.join(info['names'])} (torch {info['version']})")
        missing = [d for d in devices if d.startswith("cuda:") and int(d.split(":")[1]) >= info["count"]]
        if missing:
            bad(f"devices: {', '.join(missing)} configured but not present")
    else:
        say(f"note  gpu: none visible to torch {info['version']}; training runs on the CPU"
            + (" (nvidia-smi is installed: check the driver and DeviceAllow=)" if shutil.which("nvidia-smi") else ""))
