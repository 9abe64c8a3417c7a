"""The `dvm` command: run the worker, make a key, list plugins, run the local demo."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import click

from .config import ConfigError, load_config
from .events import Keys
from .keys import load_keys, write_key_file
from .logs import configure_logging
from .plugins import PluginError


class _Commands(click.Group):
    """The built-in commands, then the plugins' (the `register_commands` hook), loaded only
    when a command that is not built in, or the list of commands, is asked for."""

    _loaded = False

    def _load_plugin_commands(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from .plugins import plugin_manager
        builtin = set(self.commands)
        group = click.Group()
        try:
            plugin_manager().hook.register_commands(cli=group)
        except PluginError as exc:
            click.echo(f"warning: plugin commands not loaded: {exc}", err=True)
            return
        for name, command in group.commands.items():
            if name in builtin:
                raise click.ClickException(f"a plugin adds a command {name!r}, which is built in")
            self.add_command(command, name)

    def get_command(self, ctx, name):
        if name not in self.commands:
            self._load_plugin_commands()
        return super().get_command(ctx, name)

    def list_commands(self, ctx):
        self._load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dvm-worker")
def main() -> None:
    """A NIP-90 Data Vending Machine worker for AI training, paid in Cashu ecash."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG",
              help="TOML config file (see examples/dvm.toml); DVM_<SETTING> variables override it.")
def run(config_path: str | None) -> None:
    """Run the worker until SIGTERM or Ctrl-C."""
    try:
        config = load_config(config_path)
        configure_logging(config.settings.log_format, config.settings.log_level)
        keys = load_keys(config.settings)
        from .plugins import plugin_manager
        from .worker import Worker
        worker = Worker(config, keys, plugin_manager())
    except (ConfigError, PluginError) as exc:
        raise click.ClickException(str(exc)) from None
    asyncio.run(_serve(worker))


async def _serve(worker) -> None:
    from .sdnotify import SystemdNotifier, watchdog_loop
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
        raise click.ClickException(f"{out} exists; not overwriting a key") from None
    click.echo(keys.npub)
    click.echo(f"private key written to {out} (mode 0600)", err=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG",
              help="Config file, for [kinds] renumbering and plugin settings.")
def plugins(config_path: str | None) -> None:
    """List installed plugins as JSON: hooks, version, and the job kinds each registers."""
    from .plugins import describe, plugin_manager
    try:
        raw = load_config(config_path, env={}).raw if config_path else {}
        click.echo(json.dumps(describe(plugin_manager(), raw), indent=2))
    except (ConfigError, PluginError) as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def wallet() -> None:
    """The ecash wallet: the provider's earnings, or a customer's funds.

    Uses the wallet in the config's state directory (--config), or --wallet-dir."""


def _wallet_options(f):
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG",
                     help="Worker config: its state directory and mints.")(f)
    f = click.option("--wallet-dir", type=click.Path(file_okay=False),
                     help="A wallet directory of its own (e.g. a customer's).")(f)
    f = click.option("--mint", "mints", multiple=True, help="Mint URL (repeatable); default: the config's mints.")(f)
    return f


def _open_wallet(config_path, wallet_dir, mints):
    from pathlib import Path

    from .wallet import ProviderWallet, load_or_create_p2pk_key
    try:
        settings = load_config(config_path).settings if config_path else None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    directory = Path(wallet_dir) if wallet_dir else (settings.wallet_dir if settings else None)
    if directory is None:
        raise click.ClickException("give --config (a worker's wallet) or --wallet-dir")
    mints = list(mints) or (settings.mints if settings else [])
    if not mints:
        raise click.ClickException("no mint: give --mint URL or set mints in the config")
    unit = settings.unit if settings else "sat"
    return ProviderWallet(directory=directory, accepted_mints=mints, unit=unit,
                          p2pk_private_key=load_or_create_p2pk_key(directory / "p2pk.key"))


def _run_wallet(config_path, wallet_dir, mints, action):
    async def go():
        w = _open_wallet(config_path, wallet_dir, mints)
        try:
            return await action(w)
        finally:
            await w.close()
    from .wallet import PaymentError
    try:
        return asyncio.run(go())
    except PaymentError as exc:
        raise click.ClickException(exc.customer_message) from None


@wallet.command()
@_wallet_options
def balance(config_path, wallet_dir, mints) -> None:
    """Balance per mint, as JSON."""
    async def action(w):
        return await w.balance()
    click.echo(json.dumps(_run_wallet(config_path, wallet_dir, mints, action), indent=2))


@wallet.command()
@_wallet_options
@click.argument("amount", type=click.IntRange(min=1))
@click.option("--lock-to", help="P2PK-lock the token to this public key (hex, or an npub).")
def send(config_path, wallet_dir, mints, amount, lock_to) -> None:
    """Print a token worth AMOUNT."""
    from .events import parse_public_key
    if lock_to and lock_to.startswith("npub1"):
        lock_to = parse_public_key(lock_to)

    async def action(w):
        return await w.send(amount, mint=(list(mints) or [None])[0], lock_to=lock_to)
    click.echo(_run_wallet(config_path, wallet_dir, mints, action))


@wallet.command()
@_wallet_options
@click.argument("token")
def receive(config_path, wallet_dir, mints, token) -> None:
    """Redeem TOKEN into the wallet."""
    async def action(w):
        return await w.receive(token, min_amount=1)
    got = _run_wallet(config_path, wallet_dir, mints, action)
    click.echo(f"received {got.amount} {got.unit} from {got.mint} (mint fee {got.fee})")


@wallet.command()
@_wallet_options
@click.argument("bolt11")
def melt(config_path, wallet_dir, mints, bolt11) -> None:
    """Withdraw over Lightning: pay BOLT11 from the wallet."""
    async def action(w):
        return await w.melt(bolt11)
    click.echo(json.dumps(_run_wallet(config_path, wallet_dir, mints, action), indent=2, default=str))


@wallet.command("mint")
@_wallet_options
@click.argument("amount", type=click.IntRange(min=1))
def mint_(config_path, wallet_dir, mints, amount) -> None:
    """Fund the wallet with AMOUNT from a mint quote (pay its Lightning invoice)."""
    async def action(w):
        return await w.mint_from_lightning(amount, list(mints)[0] if mints else w.accepted_mints[0])
    got = _run_wallet(config_path, wallet_dir, mints, action)
    click.echo(f"minted {got}")


def _store(config_path):
    from .store import Store
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
    active = store.job_rows(states=("payment-required", "queued", "running"), limit=200)
    recent = store.job_rows(states=("succeeded", "failed", "cancelled", "rejected"), limit=10)
    earned = store.earnings()
    balance = None
    if settings.mints and settings.wallet_dir.exists():
        async def read_balance():
            from .wallet import ProviderWallet
            async with ProviderWallet(directory=settings.wallet_dir, accepted_mints=settings.mints,
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
              type=click.Choice(["received", "payment-required", "queued", "running", "succeeded",
                                 "failed", "cancelled", "rejected"]), help="Only jobs in this state (repeatable).")
@click.option("--kind", type=int, help="Only this job kind.")
@click.option("--customer", help="Only this customer (hex or npub).")
@click.option("--since", type=float, help="Only jobs received in the last SINCE hours.")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def jobs(config_path, states, kind, customer, since, limit, as_json) -> None:
    """Job history, newest first."""
    import time

    from .events import parse_public_key
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


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="DVM_CONFIG", required=True)
def doctor(config_path) -> None:
    """Check the config, key, relays, mints, blob servers, plugins and GPU; one line each."""
    from .doctor import run_checks
    ok = asyncio.run(run_checks(config_path, click.echo))
    sys.exit(0 if ok else 1)


@main.group()
def blobs() -> None:
    """The embedded Blossom blob server."""


@blobs.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="blobs", show_default=True,
              help="Where blobs are stored.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=3000, show_default=True)
@click.option("--max-bytes", type=int, default=10 * 1024**3, show_default=True, help="Largest blob accepted.")
@click.option("--public-url", help="The URL clients reach this server at, if not http://HOST:PORT.")
@click.option("--allow-pubkey", "allowed", multiple=True,
              help="Only these pubkeys (hex or npub) may upload (repeatable); default: anyone.")
def serve(directory, host, port, max_bytes, public_url, allowed) -> None:
    """Serve blobs (BUD-01/02): GET/HEAD /<sha256>, PUT /upload, GET /list/<pubkey>, DELETE."""
    from .blobserver import serve as serve_blobs
    from .events import parse_public_key
    configure_logging("auto", "info")
    pubkeys = [parse_public_key(p) for p in allowed] or None
    serve_blobs(directory, host, port, max_bytes=max_bytes, allowed_pubkeys=pubkeys, public_url=public_url)


@main.group()
def job() -> None:
    """The customer's side: send a job to a DVM and collect its result."""


@job.command()
@click.option("--relay", "relays", multiple=True, required=True, help="Relay URL (repeatable).")
@click.option("--dvm", required=True, help="The DVM's npub or hex public key.")
@click.option("--kind", type=click.IntRange(5000, 5999), required=True, help="The job kind.")
@click.option("--text", "texts", multiple=True, help="A text input (repeatable).")
@click.option("--url", "urls", multiple=True, help="A data URL input with its sha256 (repeatable).")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A local file: uploaded to --blossom (encrypted unless --clear) and sent as a url input.")
@click.option("--param", "params", multiple=True, help="A param as name=value (repeatable).")
@click.option("--blossom", "servers", multiple=True, help="Blossom server for --file uploads (repeatable).")
@click.option("--clear", is_flag=True, help="Send the request and files unencrypted.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False), help="Your nsec key file (default: a throwaway key).")
@click.option("--wallet-dir", type=click.Path(file_okay=False), help="A wallet to pay from when payment is required.")
@click.option("--mint", "mints", multiple=True, help="The wallet's mint(s).")
@click.option("--out", type=click.Path(file_okay=False), default="dvm-result", show_default=True,
              help="Where to save the result and its files.")
@click.option("--timeout", type=float, default=3600, show_default=True)
@click.option("--allow-private", is_flag=True, help="Allow downloads from loopback/private addresses.")
def submit(relays, dvm, kind, texts, urls, files, params, servers, clear, key_file, wallet_dir, mints,
           out, timeout, allow_private) -> None:
    """Send a job, follow its progress, then download, verify and decrypt its result files."""
    from pathlib import Path

    from .events import parse_public_key
    from .keys import load_keys
    from .config import Settings
    configure_logging("console", "warning")
    try:
        provider = parse_public_key(dvm)
        keys = load_keys(Settings(key_file=key_file), env={}) if key_file else Keys.generate()
    except (ValueError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        param_map = dict(p.split("=", 1) for p in params)
    except ValueError:
        raise click.ClickException("--param takes name=value") from None
    if files and not servers:
        raise click.ClickException("--file needs a --blossom server to upload to")
    code = asyncio.run(_submit(relays, provider, kind, texts, urls, files, param_map, servers, clear,
                               keys, wallet_dir, mints, Path(out), timeout, allow_private))
    sys.exit(code)


async def _submit(relays, provider, kind, texts, urls, files, params, servers, clear, keys, wallet_dir,
                  mints, out, timeout, allow_private) -> int:
    from pathlib import Path

    from .client import Customer, JobFailed, download_artifacts, upload_dataset
    from .nip90 import JobInput, Result
    inputs = [JobInput(t, "text") for t in texts] + [JobInput(u, "url") for u in urls]
    for f in files:
        url = await upload_dataset(Path(f), list(servers), keys, encrypt=not clear)
        click.echo(f"uploaded {f} ({'encrypted' if not clear else 'in the clear'})", err=True)
        inputs.append(JobInput(url, "url"))
    wallet = None
    if wallet_dir:
        from .wallet import ProviderWallet, load_or_create_p2pk_key
        wallet = ProviderWallet(directory=Path(wallet_dir), accepted_mints=list(mints),
                                p2pk_private_key=load_or_create_p2pk_key(Path(wallet_dir) / "p2pk.key"))
    try:
        async with Customer(keys, list(relays)) as customer:
            request = await customer.submit(kind, inputs, params, provider=provider,
                                            encrypt=None if clear else "nip44")
            click.echo(f"job {request['id']} sent", err=True)
            async for update in customer.updates(request, timeout=timeout):
                if isinstance(update, Result):
                    result = update
                    break
                if update.status == "payment-required":
                    if wallet is None:
                        click.echo(f"payment required: {update.message} (give --wallet-dir to pay)", err=True)
                        return 2
                    await customer.pay_with_nutzap(request, update, wallet)
                    click.echo(f"paid {update.amount_msats // 1000} sat with a nutzap", err=True)
                elif update.status == "error":
                    click.echo(f"error: {update.message}", err=True)
                    return 1
                else:
                    click.echo(_progress_line(update), err=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "result.json").write_text(result.content)
            saved = await download_artifacts(result, out, allow_private=allow_private)
            for path in saved:
                click.echo(f"saved {path} (sha256 verified{', decrypted' if not clear else ''})", err=True)
            click.echo(result.content)
            return 0
    except (JobFailed, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    finally:
        if wallet is not None:
            await wallet.close()


def _progress_line(feedback) -> str:
    if feedback.progress is None:
        return f"{feedback.status}: {feedback.message}"
    filled = int(feedback.progress / 5)
    return f"[{'#' * filled}{'-' * (20 - filled)}] {feedback.message}"


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep the demo's files here (default: a temporary directory, removed after).")
@click.option("--verbose", is_flag=True, help="Show the worker's log as it runs.")
def demo(workdir: str | None, verbose: bool) -> None:
    """Run a whole marketplace on this machine: a relay, a provider and a customer.

    Exits 0 only when every step succeeded."""
    from .demo import run_demo
    sys.exit(asyncio.run(run_demo(workdir, verbose)))


if __name__ == "__main__":
    main()
