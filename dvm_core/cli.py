"""The `dvm` command: run the worker, make a key, list plugins, run the local demo."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field

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
    remembered = directory / "mints.json"   # a wallet of its own remembers its mints
    known = json.loads(remembered.read_text()) if remembered.is_file() else []
    mints = list(mints) or (settings.mints if settings else []) or known
    if not mints:
        raise click.ClickException("no mint: give --mint URL (remembered for this wallet) or set mints "
                                   "in the config")
    if wallet_dir and set(mints) - set(known):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(remembered, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(list(dict.fromkeys(known + list(mints)))))
        mints = list(dict.fromkeys(list(mints) + known))
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
@click.option("--json", "as_json", is_flag=True, help="Print the balance per mint as JSON.")
def balance(config_path, wallet_dir, mints, as_json) -> None:
    """Balance per mint."""
    async def action(w):
        return await w.balance()
    balances = _run_wallet(config_path, wallet_dir, mints, action)
    if as_json:
        click.echo(json.dumps(balances, indent=2))
        return
    for mint, amount in balances.items():
        click.echo(f"{amount} sat at {mint}")
    click.echo(f"total: {sum(balances.values())} sat")


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
@click.option("--relay", "relays", multiple=True, required=True, help="Relay URL (repeatable).")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True), required=True,
              help="Your nsec key file: the key DVMs sent change and refunds to.")
def collect(config_path, wallet_dir, mints, relays, key_file) -> None:
    """Redeem the nutzaps sent to your key (change, refunds) into the wallet, and publish the
    wallet's key (kind 10019) so that later ones come locked to it."""
    from .client import Customer
    from .config import Settings
    try:
        keys = load_keys(Settings(key_file=key_file), env={})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    async def action(w):
        async with Customer(keys, list(relays)) as customer:
            await customer.publish_wallet_info(w)
            got = await customer.collect_nutzaps(w, timeout=3)
            return got, await w.total_balance()
    got, total = _run_wallet(config_path, wallet_dir, mints, action)
    click.echo(f"collected {got} sat; balance {total} sat")


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
@click.option("--file-as", "marked_files", multiple=True, nargs=2, metavar="MARKER PATH",
              help="A local file sent as a url input marked MARKER (e.g. model, eval, validation, weights).")
@click.option("--url-as", "marked_urls", multiple=True, nargs=2, metavar="MARKER URL",
              help="A data URL input marked MARKER.")
@click.option("--param", "params", multiple=True, help="A param as name=value (repeatable).")
@click.option("--blossom", "servers", multiple=True, help="Blossom server for --file uploads (repeatable).")
@click.option("--clear", is_flag=True, help="Send the request and files unencrypted.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="Your nsec key file (default: a new key, saved as OUT/customer.nsec for `dvm job fetch`).")
@click.option("--wallet-dir", type=click.Path(file_okay=False), help="A wallet to pay from when payment is required.")
@click.option("--mint", "mints", multiple=True, help="The wallet's mint(s).")
@click.option("--max-price", type=click.IntRange(0), default=None,
              help="Pay without asking up to this many sat; a higher price is refused (the job is cancelled).")
@click.option("--yes", is_flag=True, help="Pay the price the DVM asks without asking (still checked).")
@click.option("--dry-run", is_flag=True, help="Show the DVM's quote, pay nothing, and cancel the job.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end (job, price paid, files, balance).")
@click.option("--no-local-check", is_flag=True,
              help="Upload without first running the kind's own data checks here (when its plugin is installed).")
@click.option("--out", type=click.Path(file_okay=False), default="dvm-result", show_default=True,
              help="Where to save the result and its files.")
@click.option("--timeout", type=float, default=3600, show_default=True)
@click.option("--allow-private", is_flag=True, help="Allow downloads from loopback/private addresses.")
def submit(relays, dvm, kind, texts, urls, files, marked_files, marked_urls, params, servers, clear, key_file,
           wallet_dir, mints, max_price, yes, dry_run, as_json, no_local_check, out, timeout, allow_private) -> None:
    """Send a job, follow its progress, then download, verify and decrypt its result files.

    When the DVM asks for payment, its quote is shown and checked (signed by this DVM, the amount
    it announces, a lock to this job's key) before anything is paid; without --yes or a
    --max-price that covers it, you are asked. Ctrl-C cancels the job (a kind-5 deletion): a
    paid job that has not started is refunded."""
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
    files = [("", f) for f in files] + list(marked_files)
    urls = [("", u) for u in urls] + list(marked_urls)
    for _, path in marked_files:
        if not Path(path).is_file():
            raise click.ClickException(f"--file-as: no file {path}")
    if files and not servers:
        raise click.ClickException("--file needs a --blossom server to upload to")
    if files and not no_local_check:
        problem = _local_check(kind, texts, files, param_map)
        if problem:
            raise click.ClickException(f"not sent: {problem} (this kind's own check of your files, run "
                                       "here before uploading; --no-local-check skips it)")
    if not key_file:   # keep the key: it finds the job again and decrypts its result
        key_path = Path(out) / "customer.nsec"
        if key_path.exists():
            keys = load_keys(Settings(key_file=str(key_path)), env={})
        else:
            write_key_file(key_path, keys)
    options = _SubmitOptions(max_price=max_price, yes=yes, dry_run=dry_run, as_json=as_json)
    try:
        code = asyncio.run(_submit(relays, provider, kind, texts, urls, files, param_map, servers, clear,
                                   keys, wallet_dir, mints, Path(out), timeout, allow_private, options))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _local_check(kind: int, texts, files, params: dict) -> str | None:
    """Run the plugin's own checks of a job's files here, before anything is uploaded, when the
    plugin of this kind is installed: the same `parse` and `precheck` the DVM runs before it asks
    for payment (with the plugin's default limits). Returns what is wrong with the data, or None
    (also when the check cannot run here, e.g. a model only the provider has)."""
    import tempfile
    import time
    from pathlib import Path

    import structlog

    from .fetch import sha256_file
    from .jobs import JobContext, JobInputError
    from .nip90 import JobInput, JobRequest
    from .plugins import collect_job_kinds, plugin_manager
    try:
        job_kind = collect_job_kinds(plugin_manager(), {}).get(kind)
    except Exception:
        return None
    if job_kind is None or job_kind.precheck is None:
        return None
    local = {f"https://local.invalid/{sha256_file(path)}": Path(path) for _, path in files}
    inputs = [JobInput(t, "text") for t in texts]
    inputs += [JobInput(url, "url", marker=marker) for url, (marker, _) in zip(local, files)]
    request = JobRequest(id="0" * 64, pubkey="0" * 64, kind=kind, created_at=0, inputs=tuple(inputs),
                         params=dict(params))
    try:
        job = job_kind.parse(request) if job_kind.parse else request
    except Exception:
        return None   # the request itself is judged by the DVM, with its own limits
    with tempfile.TemporaryDirectory(prefix="dvm-check-") as tmp:
        ctx = JobContext(job_id=request.id, request=request, workdir=Path(tmp) / "work",
                         log=structlog.get_logger("dvm.check"), deadline=time.monotonic() + 600,
                         report=lambda percent, message: None, config={},
                         fetcher=lambda url, into: local[url])
        try:
            job_kind.precheck(ctx, job)
        except JobInputError as exc:
            return str(exc)
        except Exception:
            return None
    return None


@dataclass
class _SubmitOptions:
    max_price: int | None = None
    yes: bool = False
    dry_run: bool = False
    as_json: bool = False
    report: dict = field(default_factory=dict)


async def _submit(relays, provider, kind, texts, urls, files, params, servers, clear, keys, wallet_dir,
                  mints, out, timeout, allow_private, options: _SubmitOptions | None = None) -> int:
    from pathlib import Path

    from .client import Customer, upload_dataset
    from .nip90 import JobInput
    options = options or _SubmitOptions()
    report = options.report
    report.update(job_id=None, provider=provider, status="error", paid_sat=0, files=[], message="")
    inputs = [JobInput(t, "text") for t in texts] + [JobInput(u, "url", marker=m) for m, u in urls]
    for marker, f in files:
        try:
            url = await upload_dataset(Path(f), list(servers), keys, encrypt=not clear)
        except Exception as exc:   # BlossomError, an unreachable server
            click.echo(f"error: could not upload {f}: {exc}", err=True)
            report["message"] = f"could not upload {f}: {exc}"
            if options.as_json:
                click.echo(json.dumps(report))
            return 1
        click.echo(f"uploaded {f} ({'encrypted' if not clear else 'in the clear'})"
                   + (f" as {marker}" if marker else ""), err=True)
        inputs.append(JobInput(url, "url", marker=marker))
    wallet = _open_wallet(None, wallet_dir, mints) if wallet_dir else None   # it remembers its mints
    request = None
    try:
        async with Customer(keys, list(relays)) as customer:
            if wallet is not None:
                await customer.publish_wallet_info(wallet)   # change and refunds come to this wallet
            try:
                try:
                    request = await customer.submit(kind, inputs, params, provider=provider,
                                                    encrypt=None if clear else "nip44")
                except RuntimeError as exc:   # no relay took it
                    click.echo(f"error: {exc}", err=True)
                    report["message"] = str(exc)
                    return 1
                report["job_id"] = request["id"]
                click.echo(f"job {request['id']} sent", err=True)
                code = await _follow(customer, request, wallet, out, timeout, allow_private, options)
            except asyncio.CancelledError:   # Ctrl-C
                asyncio.current_task().uncancel()   # what follows must still run
                if request is not None:
                    await asyncio.shield(customer.cancel(request, "cancelled by the customer"))
                    click.echo(f"cancelled job {request['id']} (a paid job that had not started is "
                               "refunded)", err=True)
                report.update(status="cancelled", message="cancelled by the customer")
                code = 130
            if wallet is not None:
                # Change, or the refund of a paid job that did not run, comes back as a nutzap.
                owed = report["paid_sat"] if report["status"] != "succeeded" else 0
                back = await customer.collect_nutzaps(wallet, expect=owed, timeout=20 if owed else 3)
                if back:
                    report["collected_sat"] = back
                    click.echo(f"collected {back} sat sent back to you (change or refund)", err=True)
                report["balance_sat"] = await wallet.total_balance()
                click.echo(f"balance: {report['balance_sat']} sat", err=True)
            return code
    finally:
        if wallet is not None:
            await wallet.close()
        if options.as_json:
            click.echo(json.dumps(report))


async def _follow(customer, request, wallet, out, timeout, allow_private, options) -> int:
    from .client import JobFailed
    from .nip90 import Result
    report = options.report
    try:
        async for update in customer.updates(request, timeout=timeout):
            if isinstance(update, Result):
                result = update
                break
            if update.status == "payment-required":
                code = await _pay(customer, request, update, wallet, options)
                if code is not None:
                    await customer.cancel(request, report["message"])
                    return code
            elif update.status == "error":
                click.echo(f"error: {update.message}", err=True)
                report["message"] = update.message
                return 1
            else:
                click.echo(_progress_line(update), err=True)
    except (JobFailed, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        report["message"] = str(exc)
        return 1
    report.update(status="succeeded", result=result.content)
    code = await _save_result(result, out, allow_private, report)
    if code == 0 and not options.as_json:
        click.echo(result.content)
    return code


async def _save_result(result, out, allow_private, report) -> int:
    """Save result.json and the result's files (sha256 verified, decrypted); one clear line and
    exit code 5 when a download fails: `dvm job fetch` tries again."""
    from .blobcrypt import BlobDecryptError
    from .client import download_artifacts
    from .fetch import FetchError
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(result.content)
    try:
        saved = await download_artifacts(result, out, allow_private=allow_private)
    except (FetchError, BlobDecryptError, OSError, ValueError) as exc:
        click.echo(f"error: the result is in {out / 'result.json'}, but its files could not be "
                   f"downloaded: {exc}. Try again with `dvm job fetch {result.request_id}`.", err=True)
        report["message"] = f"download failed: {exc}"
        return 5
    for path in saved:
        click.echo(f"saved {path} (sha256 verified{', decrypted' if result.encrypted else ''})", err=True)
    report["files"] = [str(p) for p in saved]
    return 0


async def _pay(customer, request, update, wallet, options) -> int | None:
    """Answer a payment-required: the quote, checked; asked or capped; paid. None once paid,
    else the exit code."""
    from .client import PaymentDeclined
    from .wallet import PaymentError
    report = options.report
    mints = list(wallet.accepted_mints) if wallet is not None else None
    try:
        creq = await customer.check_payment_request(request, update, max_price=options.max_price,
                                                    mints=mints)
    except PaymentDeclined as exc:
        click.echo(f"error: not paying: {exc}; the job is cancelled", err=True)
        report["message"] = f"not paying: {exc}"
        return 3
    info = await customer.wallet_info(update.event["pubkey"])
    name = info.names.get(str(request["kind"]), str(request["kind"]))
    rule = _pricing_rule(info, name)
    click.echo(f"quote: {creq['a']} sat for this {name} job" + (f" ({rule})" if rule else ""), err=True)
    report["quote_sat"] = creq["a"]
    if options.dry_run:
        report.update(status="quoted", message="dry run: nothing paid, the job is cancelled")
        click.echo("dry run: nothing paid; the job is cancelled", err=True)
        return 0
    if wallet is None:
        click.echo(f"payment required: {update.message} (give --wallet-dir to pay)", err=True)
        report["message"] = "payment required, no wallet given"
        return 2
    if not options.yes and options.max_price is None:
        if not sys.stdin.isatty() or not click.confirm(f"pay {creq['a']} sat?", default=False, err=True):
            click.echo("not paid (give --yes or --max-price to pay without asking); the job is "
                       "cancelled", err=True)
            report["message"] = "not paid: not confirmed"
            return 4
    try:
        await customer.pay_with_nutzap(request, update, wallet, max_price=options.max_price)
    except PaymentDeclined as exc:
        click.echo(f"error: not paying: {exc}", err=True)
        report["message"] = f"not paying: {exc}"
        return 3
    except PaymentError as exc:
        click.echo(f"error: {exc.customer_message}", err=True)
        report["message"] = exc.customer_message
        return 3
    report["paid_sat"] = creq["a"]
    click.echo(f"paid {creq['a']} sat with a nutzap", err=True)
    return None


def _pricing_rule(info, name: str) -> str:
    return info.pricing.get(name) or ""


def _job_customer(relays, key_file):
    from .client import Customer
    from .config import Settings
    try:
        keys = load_keys(Settings(key_file=key_file), env={})
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return Customer(keys, list(relays))


def _job_lookup_options(f):
    f = click.argument("job_id")(f)
    f = click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True), required=True,
                     help="The nsec key file that sent the job (`dvm job submit` saves OUT/customer.nsec).")(f)
    f = click.option("--relay", "relays", multiple=True, required=True, help="Relay URL (repeatable).")(f)
    return f


@job.command("status")
@_job_lookup_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def job_status(relays, key_file, job_id, as_json) -> None:
    """Where one of your jobs stands: its last feedback, and whether its result is there."""
    async def go():
        async with _job_customer(relays, key_file) as customer:
            return await customer.recover(job_id)
    try:
        request, feedback, result = asyncio.run(go())
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    last = feedback[-1] if feedback else None
    state = "succeeded" if result else (last.status if last else "sent, no answer yet")
    if as_json:
        click.echo(json.dumps({"job_id": job_id, "kind": request["kind"], "state": state,
                               "message": last.message if last else "", "result": result.content if result else None}))
        return
    click.echo(f"job {job_id} (kind {request['kind']}): {state}" + (f": {last.message}" if last and not result else ""))


@job.command("fetch")
@_job_lookup_options
@click.option("--out", type=click.Path(file_okay=False), default="dvm-result", show_default=True)
@click.option("--allow-private", is_flag=True, help="Allow downloads from loopback/private addresses.")
def job_fetch(relays, key_file, job_id, out, allow_private) -> None:
    """Download one of your jobs' result again (files verified and decrypted)."""
    from pathlib import Path

    async def go():
        async with _job_customer(relays, key_file) as customer:
            _, _, result = await customer.recover(job_id)
            if result is None:
                raise click.ClickException(f"job {job_id} has no result yet (see `dvm job status`)")
            return await _save_result(result, Path(out), allow_private, {})
    try:
        sys.exit(asyncio.run(go()))
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None


@job.command("cancel")
@_job_lookup_options
def job_cancel(relays, key_file, job_id) -> None:
    """Cancel one of your jobs (a kind-5 deletion): one paid and not started yet is refunded."""
    async def go():
        async with _job_customer(relays, key_file) as customer:
            request, _, _ = await customer.recover(job_id)
            await customer.cancel(request, "cancelled by the customer")
    try:
        asyncio.run(go())
    except LookupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"cancel sent for job {job_id}")


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
