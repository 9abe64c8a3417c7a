"""The provider's commands: run the worker, make a key, list plugins, see its jobs, check its set-up."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import click

from dvm_core.worker.config import ConfigError, load_config
from dvm_core.protocol.events import Keys
from dvm_core.state.jobstate import JobState
from dvm_core.worker.keys import load_keys, write_key_file
from .logs import configure_logging
from dvm_core.worker.plugins import PluginError

from . import main


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG",
              help="TOML config file (see examples/dvm.toml); DVM_<SETTING> variables override it.")
def run(config_path: str | None) -> None:
    """Run the worker until SIGTERM or Ctrl-C."""
    try:
        config = load_config(config_path)
        configure_logging(config.settings.log_format, config.settings.log_level)
        keys = load_keys(config.settings)
        from dvm_core.worker.plugins import plugin_manager
        from dvm_core.worker.worker import Worker
        worker = Worker(config, keys, plugin_manager())
    except (ConfigError, PluginError) as exc:
        raise click.ClickException(str(exc)) from None
    asyncio.run(_serve(worker))


async def _serve(worker) -> None:
    from dvm_core.worker.sdnotify import SystemdNotifier, watchdog_loop
    notifier = SystemdNotifier()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if not stopping.is_set():
            stopping.set()
            notifier.stopping(worker.status_line())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await worker.start()
    notifier.ready(worker.status_line())  # relays are connecting and the store is open
    pings = asyncio.create_task(watchdog_loop(notifier, worker.status_line))
    try:
        await stopping.wait()
        await worker.stop(worker.settings.stop_grace_seconds)
    finally:
        pings.cancel()  # only now: STATUS= keeps coming while the jobs drain


@main.command()
@click.option("--out", type=click.Path(dir_okay=False), default="dvm.key", show_default=True,
              help="Where to write the private key (mode 0600; never overwritten).")
def keygen(out: str) -> None:
    """Make a new Nostr key for the worker; prints its npub."""
    keys = Keys.generate()
    try:
        write_key_file(out, keys)
    except FileExistsError:
        raise click.ClickException(_existing_key(out)) from None
    click.echo(keys.npub)
    click.echo(f"private key written to {out} (mode 0600)", err=True)


def _existing_key(out: str) -> str:
    """The refusal to overwrite a key, with the npub of the key already there: the provider
    ran keygen again to see it."""
    from pathlib import Path

    from dvm_core.state.keyfiles import KeyFileError, read_key_file
    where = Path(out).resolve()
    try:
        npub = read_key_file(where).npub
    except (KeyFileError, OSError) as exc:
        return f"{where} exists; not overwriting it, though it holds no usable key ({exc}): move it away first"
    return f"{where} exists; not overwriting a key. Its npub: {npub}"


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG",
              help="Config file, for [kinds] renumbering and plugin settings.")
def plugins(config_path: str | None) -> None:
    """List installed plugins as JSON: hooks, version, and the job kinds each registers."""
    from dvm_core.worker.plugins import describe, plugin_manager
    try:
        raw = load_config(config_path, env={}).raw if config_path else {}
        click.echo(json.dumps(describe(plugin_manager(), raw), indent=2))
    except (ConfigError, PluginError) as exc:
        raise click.ClickException(str(exc)) from None


def _store(config_path):
    from dvm_core.state.store import Store
    try:
        settings = load_config(config_path).settings
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not settings.store_path.exists():
        raise click.ClickException(f"no store at {settings.store_path}: has the worker run yet?")
    return settings, Store(settings.store_path)


def _ago(timestamp: float) -> str:
    import time
    seconds = max(0, int(time.time() - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG", required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def status(config_path, as_json) -> None:
    """What the worker is doing: queued and running jobs, recent results, earnings, balance."""
    settings, store = _store(config_path)
    active = store.job_rows(states=("payment-required", "queued", "running", "delivered"), limit=200)
    recent = store.job_rows(states=("succeeded", "failed", "cancelled", "rejected"), limit=10)
    earned = store.earnings()
    balance = None
    if settings.mints and settings.wallet_dir.exists():
        async def read_balance():
            from dvm_core.payments.wallet import EcashWallet
            async with EcashWallet(directory=settings.wallet_dir, accepted_mints=settings.mints,
                                   unit=settings.unit) as w:
                return await w.balance()
        try:
            balance = asyncio.run(read_balance())
        except Exception as exc:  # the mint may be down: status still answers
            balance = {"error": str(exc)}
    if as_json:
        click.echo(json.dumps({"active": active, "recent": recent, "earned": earned,
                               "balance": balance}, indent=2, default=str))
        return
    click.echo(f"active jobs: {len(active)}")
    for job in active:
        progress = f" {job['progress']:.0f}% {job['progress_message'] or ''}" if job["progress"] is not None else ""
        click.echo(f"  {job['id'][:12]}  kind {job['kind']}  {job['state']:<16}{progress}  "
                   f"received {_ago(job['received_at'])}")
    click.echo("recent jobs:")
    for job in recent:
        click.echo(f"  {job['id'][:12]}  kind {job['kind']}  {job['state']:<10} {_ago(job['updated_at'])}"
                   + (f"  {job['error']}" if job["error"] else ""))
    click.echo("earned: " + (", ".join(f"{v} {u}" for u, v in earned.items()) or "nothing yet"))
    if balance is not None:
        click.echo("wallet: " + json.dumps(balance))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG", required=True)
@click.option("--state", "states", multiple=True,
              type=click.Choice([state.value for state in JobState]), help="Only jobs in this state (repeatable).")
@click.option("--kind", type=int, help="Only this job kind.")
@click.option("--customer", help="Only this customer (hex or npub).")
@click.option("--since", type=float, help="Only jobs received in the last SINCE hours.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def jobs(config_path, states, kind, customer, since, limit, as_json) -> None:
    """Job history, newest first."""
    import time

    from dvm_core.protocol.events import parse_public_key
    settings, store = _store(config_path)
    rows = store.job_rows(states=tuple(states), kind=kind,
                          customer=parse_public_key(customer) if customer else None,
                          since=time.time() - since * 3600 if since else None, limit=limit)
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, default=str))
        else:
            click.echo(f"{row['id']}  kind {row['kind']}  {row['state']:<16} {_ago(row['received_at'])}"
                       + (f"  {row['error']}" if row["error"] else ""))
    if not rows:
        # Empty output looks like a broken command: say so (on stderr under --json, whose
        # stdout stays JSON lines), and which filters hid what.
        filters = [f"--state {s}" for s in states]
        if kind is not None:
            filters.append(f"--kind {kind}")
        if customer:
            filters.append(f"--customer {customer}")
        if since:
            filters.append(f"--since {since:g}")
        total = len(store.job_rows(limit=1)) if filters else 0
        if total:
            message = (f"no jobs match {' '.join(filters)} in {settings.state_dir}; "
                       f"`dvm jobs --config {config_path}` lists all")
        else:
            message = f"no jobs yet in {settings.state_dir}: a request shows here once the worker takes it"
        click.echo(message + "; filters: --state " + "|".join(s.value for s in JobState)
                   + ", --kind, --customer, --since HOURS", err=as_json)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG", required=True)
def doctor(config_path) -> None:
    """Check the config, key, relays, mints, blob servers, plugins and GPU; one line each
    (ok, warn or FAIL, with the fix), then a count. Exits 1 on any FAIL."""
    import logging

    from dvm_core.devtools.doctor import run_checks
    # Log lines go to stderr, and the relay connections' own (retries, drops) not at all: the
    # relay lines of the report say what failed, once.
    configure_logging("console", "warning", stream=sys.stderr)
    logging.getLogger("dvm.relay").setLevel(logging.CRITICAL)
    ok = asyncio.run(run_checks(config_path, click.echo))
    sys.exit(0 if ok else 1)
