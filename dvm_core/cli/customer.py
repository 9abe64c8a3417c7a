"""`dvm job`: the customer's side, sending a job to a DVM and collecting its result."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field

import click

from dvm_core.worker.config import ConfigError
from dvm_core.protocol.events import Keys
from dvm_core.state.keyfiles import KeyFileError, read_key_file, write_key_file
from .logs import configure_logging

from . import main
from .wallet import open_wallet


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
@click.option("--pay-on-delivery", is_flag=True,
              help="Pay only once the result is ready: the DVM seals it and is paid with ecash that it can "
                   "redeem only by revealing the key (NUT-14 HTLC); needs --wallet-dir.")
@click.option("--dry-run", is_flag=True, help="Show the DVM's quote, pay nothing, and cancel the job.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end (job, price paid, files, balance).")
@click.option("--no-local-check", is_flag=True,
              help="Upload without first running the kind's own data checks here (when its plugin is installed).")
@click.option("--out", type=click.Path(file_okay=False), default="dvm-result", show_default=True,
              help="Where to save the result and its files, and what was ordered (request.json, for "
                   "`dvm verify`).")
@click.option("--timeout", type=float, default=3600, show_default=True)
@click.option("--allow-private", is_flag=True, envvar="DVM_ALLOW_PRIVATE",
              help="Allow blob servers and downloads on loopback/private addresses (a local marketplace, "
                   "`dvm localnet`); also DVM_ALLOW_PRIVATE=1. Without it, when paying from --wallet-dir, "
                   "a private --blossom server is refused before anything is sent, and a pay-on-delivery "
                   "offer with files on one before anything is paid.")
@click.option("--trust", "trusted", multiple=True, metavar="KEY",
              help="Do not send the job if this key (npub or hex; `self` for yours) signed a negative "
                   "verdict on the DVM (NIP-32, e.g. from `dvm federate --publish-verdicts`): exit code 7. "
                   "Repeatable.")
def submit(relays, dvm, kind, texts, urls, files, marked_files, marked_urls, params, servers, clear, key_file,
           wallet_dir, mints, max_price, yes, pay_on_delivery, dry_run, as_json, no_local_check, out, timeout,
           allow_private, trusted) -> None:
    """Send a job, follow its progress, then download, verify and decrypt its result files.

    When the DVM asks for payment, its quote is shown and checked (signed by this DVM, the amount
    it announces, a lock to this job's key) before anything is paid; without --yes or a
    --max-price that covers it, you are asked. Ctrl-C cancels the job (a kind-5 deletion): a
    paid job that has not started is refunded.

    With --pay-on-delivery nothing is paid before the work: the DVM offers the sealed result,
    and the ecash paid for it (kept in OUT/delivery.json) gives the DVM the money only by
    handing you the key. A DVM that does not redeem it: `dvm job reclaim` after the locktime."""
    from pathlib import Path

    from dvm_core.protocol.events import parse_public_key
    configure_logging("console", "warning")
    try:
        provider = parse_public_key(dvm)
        keys = read_key_file(key_file) if key_file else Keys.generate()
        trusted = tuple(t if t == "self" else parse_public_key(t) for t in trusted)
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
    if pay_on_delivery and not wallet_dir:
        raise click.ClickException("--pay-on-delivery needs --wallet-dir: the wallet that pays, and "
                                   "whose key takes unredeemed ecash back")
    if files and not no_local_check:
        problem = _local_check(kind, texts, files, param_map)
        if problem:
            raise click.ClickException(f"not sent: {problem} (this kind's own check of your files, run "
                                       "here before uploading; --no-local-check skips it)")
    if servers and wallet_dir and not allow_private:   # before anything is sent, let alone paid
        problem = asyncio.run(_private_server(servers))
        if problem:
            raise click.ClickException(f"not sent: {problem}. A DVM on such a network delivers its files "
                                       "there too, and their download would be refused after paying: "
                                       "give --allow-private (or DVM_ALLOW_PRIVATE=1, as `dvm localnet` "
                                       "prints)")
    if not key_file:   # keep the key: it finds the job again and decrypts its result
        key_path = Path(out) / "customer.nsec"
        if key_path.exists():
            keys = read_key_file(key_path)
        else:
            write_key_file(key_path, keys)
    options = _SubmitOptions(max_price=max_price, yes=yes, dry_run=dry_run, as_json=as_json,
                             pay_on_delivery=pay_on_delivery,
                             trusted=tuple(keys.public_key if t == "self" else t for t in trusted))
    try:
        code = asyncio.run(_submit(relays, provider, kind, texts, urls, files, param_map, servers, clear,
                                   keys, wallet_dir, mints, Path(out), timeout, allow_private, options))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


async def _private_server(urls) -> str | None:
    """Which of `urls` is on a loopback or private address (the downloads' own rule), if any."""
    from urllib.parse import urlsplit

    from dvm_core.transport.fetch import FetchError, blocked_reason, resolve_checked
    for url in urls:
        parts = urlsplit(url)
        try:
            addresses = await resolve_checked(parts.hostname or "", parts.port or 443, allow_private=True)
        except FetchError:
            continue   # a name that does not resolve: the upload says so
        reason = next(filter(None, map(blocked_reason, addresses)), None)
        if reason:
            return f"{url} is on {reason}"
    return None


def _local_check(kind: int, texts, files, params: dict) -> str | None:
    """Run the plugin's own checks of a job's files here, before anything is uploaded, when the
    plugin of this kind is installed: the same `parse` and `precheck` the DVM runs before it asks
    for payment (with the plugin's default limits). Returns what is wrong with the data, or None
    (also when the check cannot run here, e.g. a model only the provider has)."""
    import tempfile
    import time
    from pathlib import Path

    import structlog

    from dvm_core.transport.fetch import sha256_file
    from dvm_core.jobs import JobContext, JobInputError
    from dvm_core.protocol.nip90 import JobInput, JobRequest
    from dvm_core.worker.plugins import collect_job_kinds, plugin_manager
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
    pay_on_delivery: bool = False
    trusted: tuple[str, ...] = ()   # keys whose negative verdicts on the DVM stop the job before it is sent
    report: dict = field(default_factory=dict)


async def _submit(relays, provider, kind, texts, urls, files, params, servers, clear, keys, wallet_dir,
                  mints, out, timeout, allow_private, options: _SubmitOptions | None = None) -> int:
    from pathlib import Path

    from dvm_core.customer.client import Customer, upload_dataset
    from dvm_core.protocol.nip90 import JobInput
    options = options or _SubmitOptions()
    report = options.report
    report.update(job_id=None, provider=provider, status="error", paid_sat=0, files=[], message="")
    inputs = [JobInput(t, "text") for t in texts] + [JobInput(u, "url", marker=m) for m, u in urls]
    if options.trusted:   # before anything is uploaded or sent
        async with Customer(keys, list(relays)) as customer:
            against = [v for v in await customer.verdicts([provider], list(options.trusted)) if v.negative]
        if against:
            v = against[0]
            report["message"] = f"not sent: {v.label} by {v.author}: {v.reason}"
            click.echo(f"not sent: a key you trust ({v.author[:12]}…) published a verdict against this DVM: "
                       f"{v.label}: {v.reason}" + (f" (and {len(against) - 1} more)" if len(against) > 1 else ""),
                       err=True)
            if options.as_json:
                click.echo(json.dumps(report))
            return 7
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
    wallet = open_wallet(None, wallet_dir, mints) if wallet_dir else None   # it remembers its mints
    if options.pay_on_delivery:
        params = dict(params, pay_on_delivery=wallet.p2pk_pubkey)   # the HTLC's refund key
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
                _keep_order(out, request, kind, provider, inputs, params)
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
    from dvm_core.customer.client import JobFailed
    from dvm_core.customer.progress import ProgressMeter
    from dvm_core.protocol.nip90 import Result
    report = options.report
    meter = ProgressMeter()
    try:
        async for update in customer.updates(request, timeout=timeout):
            if isinstance(update, Result):
                result = update
                break
            if update.status == "payment-required" and options.pay_on_delivery:
                paid = await _pay_on_delivery(customer, request, update, wallet, out, timeout, options,
                                              allow_private=allow_private)
                if isinstance(paid, int):
                    if report["paid_sat"] == 0:
                        await customer.cancel(request, report["message"])
                    return paid
                result = paid
                break
            if update.status == "payment-required" and report["paid_sat"]:
                # Paid once already: a DVM that asks again (after a restart, or to be paid twice)
                # is not paid again; the job goes on, and ends with its result or a refund.
                click.echo(f"the DVM asks for payment again ({update.message}); this job was paid "
                           f"{report['paid_sat']} sat already and is not paid twice", err=True)
                continue
            if update.status == "payment-required":
                code = await _pay(customer, request, update, wallet, options, out)
                if code is not None:
                    await customer.cancel(request, report["message"])
                    return code
            elif update.status == "error":
                click.echo(f"error: {update.message}", err=True)
                report["message"] = update.message
                return 1
            else:
                click.echo(_progress_line(update, meter), err=True)
    except (JobFailed, TimeoutError) as exc:
        click.echo(f"error: {exc}", err=True)
        report["message"] = str(exc)
        return 1
    click.echo(meter.done("result received"), err=True)
    report.update(status="succeeded", result=result.content)
    code = await _save_result(result, out, allow_private, report)
    if code == 0 and options.pay_on_delivery and report["paid_sat"]:
        click.echo(f"paid {report['paid_sat']} sat on delivery; got the result and "
                   f"{len(report['files'])} file(s), every sha256 checked", err=True)
    if code == 0 and not options.as_json:
        click.echo(result.content)
    return code


def _keep_order(out, request: dict, kind: int, provider: str, inputs, params: dict) -> None:
    """OUT/request.json (0600: the inputs' URLs may carry decryption keys): what was ordered,
    as sent (the params, the inputs and their markers), for `dvm verify` to hold the
    transcript to."""
    from dvm_core.customer.client import write_private_json
    out.mkdir(parents=True, exist_ok=True)
    write_private_json(out / "request.json", {
        "id": request["id"], "kind": kind, "provider": provider, "params": dict(params),
        "inputs": [{"data": i.data, "type": i.type, "marker": i.marker} for i in inputs]})


async def _save_result(result, out, allow_private, report) -> int:
    """Save result.json and the result's files (sha256 verified, decrypted); one clear line and
    exit code 5 when a download fails: `dvm job fetch` tries again."""
    from dvm_core.transport.blobcrypt import BlobDecryptError
    from dvm_core.customer.client import download_artifacts
    from dvm_core.transport.fetch import FetchError
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


async def _pay(customer, request, update, wallet, options, out) -> int | None:
    """Answer a payment-required: the quote, checked; asked or capped; paid, the payment kept
    in OUT/payment.json as it goes. None once paid, else the exit code."""
    from pathlib import Path

    from dvm_core.customer.client import PaymentDeclined, state_keeper
    from dvm_core.payments.wallet_types import PaymentError
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
        return _dry_run(report)
    if wallet is None:
        click.echo(f"payment required: {update.message} (give --wallet-dir to pay)", err=True)
        report["message"] = "payment required, no wallet given"
        return 2
    if not _confirmed(options, creq["a"]):
        return 4
    record = Path(out) / "payment.json"
    keep = state_keeper(record, lambda aside: click.echo(
        f"an earlier payment's record was in {record}: moved to {aside} (`dvm job reclaim "
        f"--wallet-dir DIR {aside}` finishes or brings back that payment)", err=True))
    kept = []
    try:
        await customer.pay_with_nutzap(request, update, wallet, max_price=options.max_price,
                                       keep=lambda state: (kept.append(True), keep(state)))
    except (PaymentDeclined, PaymentError, RuntimeError) as exc:
        code = _not_paid(report, exc)
        if kept:
            click.echo(f"the payment may have been made at the mint: this job is cancelled, and "
                       f"`dvm job reclaim --wallet-dir DIR --relay R {record}` sends that ecash to the DVM, "
                       "which sends it back to you as a nutzap (`dvm wallet collect` takes it in)",
                       err=True)
        return code
    report["paid_sat"] = creq["a"]
    click.echo(f"paid {creq['a']} sat with a nutzap", err=True)
    return None


async def _pay_on_delivery(customer, request, update, wallet, out, timeout, options, *, allow_private=False):
    """Answer a pay-on-delivery offer: checked, asked or capped, paid with HTLC ecash kept in
    OUT/delivery.json; then the key, from the DVM or the mint, opens the offered result.
    Returns the opened Result, or an exit code."""
    import time

    from dvm_core.customer.client import PaymentDeclined, state_keeper
    from dvm_core.payments.wallet_types import PaymentError
    report = options.report
    try:
        offer, terms, creq = await customer.check_delivery(
            request, update, refund_key=wallet.p2pk_pubkey, max_price=options.max_price,
            mints=list(wallet.accepted_mints))
    except PaymentDeclined as exc:
        click.echo(f"error: not paying: {exc}; the job is cancelled", err=True)
        report["message"] = f"not paying: {exc}"
        return 3
    private = None if allow_private else await _private_server(f.get("url", "") for f in offer.files)
    if private:   # its files could not be downloaded once paid for
        click.echo(f"error: not paying: the offered file {private} (give --allow-private to use it); "
                   "the job is cancelled", err=True)
        report["message"] = f"not paying: the offered file {private}"
        return 3
    public = ", ".join(f"{k} {v}" for k, v in list(offer.public.items())[:6])
    click.echo(f"the result is ready: {offer.amount} sat on delivery"
               + (f" ({public})" if public else "") + f"; {len(offer.files)} sealed file(s)", err=True)
    report["quote_sat"] = offer.amount
    if options.dry_run:
        return _dry_run(report)
    if not _confirmed(options, offer.amount):
        return 4
    token_path = out / "delivery.json"
    # Before each step: the key to the money if all else fails. An earlier run's, with money
    # of its own, is moved beside, not written over.
    keep = state_keeper(token_path, lambda aside: click.echo(
        f"an earlier payment's record was in {token_path}: moved to {aside} (take that ecash back "
        f"with `dvm job reclaim --wallet-dir DIR {aside}`)", err=True))
    try:
        delivery = await customer.pay_on_delivery(request, update, wallet, max_price=options.max_price,
                                                  keep=keep)
    except (PaymentDeclined, PaymentError) as exc:
        return _not_paid(report, exc)
    report["paid_sat"] = offer.amount
    click.echo(f"paid {offer.amount} sat on delivery (HTLC ecash, kept in {token_path}); waiting for "
               "the key", err=True)
    try:
        return await customer.await_delivery(delivery, wallet, timeout=timeout)
    except TimeoutError:
        wait = max(0, terms.locktime - int(time.time()))
        report["message"] = (f"the DVM has not redeemed the payment; take it back in {wait} s with "
                             f"`dvm job reclaim --wallet-dir DIR {token_path}`")
        click.echo(f"error: {report['message']}", err=True)
        return 6


def _dry_run(report: dict) -> int:
    report.update(status="quoted", message="dry run: nothing paid, the job is cancelled")
    click.echo("dry run: nothing paid; the job is cancelled", err=True)
    return 0


def _confirmed(options, amount: int) -> bool:
    """Whether to pay `amount`: --yes or --max-price say so, else the customer is asked."""
    if options.yes or options.max_price is not None:
        return True
    if sys.stdin.isatty() and click.confirm(f"pay {amount} sat?", default=False, err=True):
        return True
    click.echo("not paid (give --yes or --max-price to pay without asking); the job is cancelled", err=True)
    options.report["message"] = "not paid: not confirmed"
    return False


def _not_paid(report: dict, exc: Exception) -> int:
    """A payment declined by our checks or failed at the mint: one line, exit code 3."""
    from dvm_core.customer.client import PaymentDeclined
    message = (f"not paying: {exc}" if isinstance(exc, PaymentDeclined)
               else getattr(exc, "customer_message", str(exc)))
    click.echo(f"error: {message}", err=True)
    report["message"] = message
    return 3


def _pricing_rule(info, name: str) -> str:
    return info.pricing.get(name) or ""


def _job_customer(relays, key_file):
    from dvm_core.customer.client import Customer
    try:
        keys = read_key_file(key_file)
    except KeyFileError as exc:
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
@click.option("--allow-private", is_flag=True, envvar="DVM_ALLOW_PRIVATE",
              help="Allow downloads from loopback/private addresses (also DVM_ALLOW_PRIVATE=1).")
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


@job.command("reclaim")
@click.argument("token_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wallet-dir", type=click.Path(file_okay=False), required=True,
              help="The wallet that paid (its key is the ecash's refund key).")
@click.option("--mint", "mints", multiple=True, help="The wallet's mint(s).")
@click.option("--relay", "relays", multiple=True,
              help="Relay URL (repeatable): where a nutzap payment (OUT/payment.json) is sent again.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True),
              help="The nsec key file that sent the job (default: customer.nsec beside TOKEN_FILE).")
def job_reclaim(token_file, wallet_dir, mints, relays, key_file) -> None:
    """Take back ecash paid on delivery that the DVM did not redeem (after its locktime), or
    show the key it revealed if it did; or finish a nutzap payment cut short.

    TOKEN_FILE: OUT/delivery.json of `dvm job submit --pay-on-delivery` (also after it was cut
    short while paying), or a bare token; or OUT/payment.json of a nutzap payment that did not
    finish (a lost answer from the mint, a crash, no relay took it): its ecash, locked to the
    job's key, is the DVM's alone to spend, so its nutzap is sent (again, --relay): the DVM runs
    the job if it still waits for it, else sends the ecash back to you. The same for the
    records `dvm verify` keeps of its checks' payments and `dvm federate` of its bonuses."""
    from pathlib import Path

    from dvm_core.payments.wallet_types import PaymentError

    async def go():
        wallet = open_wallet(None, wallet_dir, mints)
        try:
            text = Path(token_file).read_text().strip()
            state = json.loads(text) if text.startswith("{") else {"token": text}
            if state.get("provider"):   # a nutzap payment (`dvm job submit`), not pay on delivery
                await _resend_payment(state, wallet, relays, key_file, Path(token_file))
                return
            token = state.get("token")
            if token is None and state.get("swap"):   # cut short while the ecash was being made
                token = await wallet.recover_htlc_send(state["swap"])
                if token is None:
                    click.echo("the payment was never made at the mint: your ecash is still in the "
                               f"wallet; balance {await wallet.total_balance()} sat")
                    return
            if token is None:
                raise click.ClickException(f"{token_file} holds no payment")
            preimage = await wallet.htlc_preimage(token)
            if preimage is not None:
                click.echo(f"the DVM redeemed it and revealed its key {preimage.hex()}: the result is "
                           "yours (`dvm job fetch`); what it did not redeem comes back now", err=True)
            received = await wallet.reclaim_htlc(token)
            click.echo(f"took back {received.amount} sat; balance {await wallet.total_balance()} sat")
            for unused in state.get("unused_tokens") or []:   # made for terms the offer did not keep
                received = await wallet.reclaim_htlc(unused)
                click.echo(f"took back {received.amount} sat made for earlier terms; balance "
                           f"{await wallet.total_balance()} sat")
        finally:
            await wallet.close()
    try:
        asyncio.run(go())
    except PaymentError as exc:
        raise click.ClickException(exc.customer_message) from None


async def _resend_payment(state: dict, wallet, relays, key_file, path) -> None:
    from dvm_core.customer.client import Customer, state_keeper
    from dvm_core.protocol.events import Keys
    what = (f"bonus of {state['amount']} sat to {state['provider'][:16]}…" if state.get("bonus")
            else f"payment of {state['amount']} sat for job {state['job_id']}")
    if state.get("published"):
        click.echo(f"this {what} was sent already")
        return
    if not relays:
        raise click.ClickException("give --relay: the payment's nutzap is sent there")
    beside = path.with_name("customer.nsec")
    try:
        keys = read_key_file(key_file or beside) if key_file or beside.exists() else Keys.generate()
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    async with Customer(keys, list(relays)) as customer:
        await customer.pool.wait_all_connected(10)
        event = await customer.resend_payment(state, wallet, keep=state_keeper(path))
    if event is None:
        click.echo("the payment was never made at the mint: your ecash is still in the wallet; "
                   f"balance {await wallet.total_balance()} sat")
        return
    if state.get("bonus"):
        click.echo(f"sent the {what} (nutzap {event['id']}): its operator collects it")
        return
    click.echo(f"sent the {what} to the DVM "
               f"(nutzap {event['id']}): it runs the job if it still waits, else sends the ecash back")


def _progress_line(feedback, meter) -> str:
    """A feedback as one line: with a percentage, the bar with its rate and ETA (`meter`)."""
    if feedback.progress is None:
        return f"{feedback.status}: {feedback.message}"
    return meter.line(feedback.progress, feedback.message)


@main.command()
@click.argument("dvm", required=False)
@click.option("--relay", "relays", multiple=True, required=True, help="Relay URL (repeatable).")
@click.option("--kind", type=click.IntRange(5000, 5999), help="Only DVMs that offer this job kind.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the relays.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list, or one DVM's object.")
def dvms(dvm, relays, kind, timeout, as_json) -> None:
    """Find DVMs: those that offer --kind, or with DVM (an npub or hex key) one of them in full.

    Read from the relays: each DVM's NIP-89 announcement (kind 31990: its kinds, their params and
    limits as JSON Schema, its prices, its load, re-published with each heartbeat) and its
    kind 10019 (the mints it takes, its wallet key). Only signed events count, and the newest
    of each DVM's. Exits 1 when DVM is given and not found."""
    from dvm_core.customer.directory import find_dvms
    from dvm_core.protocol.events import parse_public_key
    configure_logging("console", "warning")
    try:
        provider = parse_public_key(dvm) if dvm else None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        found = asyncio.run(find_dvms(list(relays), kind=kind, provider=provider, timeout=timeout))
    except ConnectionError as exc:
        raise click.ClickException(str(exc)) from None
    if provider is not None:
        if not found:
            raise click.ClickException(f"no announcement of {dvm} on {', '.join(relays)}"
                                       + (f" offering kind {kind}" if kind else ""))
        click.echo(json.dumps(found[0].to_json(), indent=2) if as_json else _dvm_in_full(found[0]))
        return
    if as_json:
        click.echo(json.dumps([d.to_json() for d in found], indent=2))
        return
    if not found:
        click.echo(f"no DVM on {', '.join(relays)} announces " + (f"kind {kind}" if kind else "itself"))
        return
    click.echo(f"{len(found)} DVM(s)" + (f" offer kind {kind}" if kind else "") + ":")
    for d in found:
        click.echo(f"\n{d.npub}  {d.name}")
        for k, about in sorted(d.kinds.items()):
            if kind is None or k == kind:
                click.echo(f"  kind {k} {about.get('name', '')}: {_price_of(d, about.get('name'))}")
        if d.mints:
            click.echo(f"  mints: {', '.join(d.mints)}")
        click.echo(f"  {_load_line(d)}")
    click.echo("\n`dvm dvms --relay … NPUB` shows one in full.")


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s ago" if seconds < 120 else (f"{seconds // 60} min ago" if seconds < 7200
                                                     else f"{seconds // 3600} h ago")


def _price_of(d, name) -> str:
    """How a kind is priced, as the DVM says: a rule in words, else its fixed price, else free."""
    if not d.payment:
        return "free (takes no payment)"
    rule = (d.payment.get("pricing") or {}).get(name) if isinstance(d.payment.get("pricing"), dict) else None
    fixed = (d.payment.get("prices") or {}).get(name) if isinstance(d.payment.get("prices"), dict) else None
    if rule:
        return str(rule)
    if isinstance(fixed, int):
        return f"{fixed} {d.payment.get('unit', 'sat')} per job" if fixed else "free"
    return "price not announced"


def _load_line(d) -> str:
    import time
    s = d.status
    load = (f"load: {s.get('running', '?')} running, {s.get('queued', '?')} queued, "
            f"{s.get('slots', '?')} slot(s)") if s else "load: not announced"
    return f"{load}; announced {_ago(time.time() - d.announced_at)}"


def _param_limits(schema: dict) -> str:
    """A param's JSON Schema in a few words: its type, range, choices and default."""
    if not isinstance(schema, dict):
        return ""
    parts = [str(schema["type"])] if schema.get("type") else []
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None or high is not None:
        parts.append(f"{'' if low is None else low}..{'' if high is None else high}")
    if schema.get("enum"):
        parts.append("one of " + "|".join(str(v) for v in schema["enum"]))
    if "default" in schema:
        parts.append(f"default {schema['default']}")
    return ", ".join(parts)


def _dvm_in_full(d) -> str:
    """One DVM's announcement and kind 10019, for a person to read."""
    lines = [f"{d.name}  {d.npub}", f"  pubkey: {d.pubkey}"]
    if d.about:
        lines.append(f"  about: {d.about}")
    lines.append(f"  {_load_line(d)}")
    p = d.payment
    if p:
        lines.append(f"  payment: in {p.get('unit', 'sat')}; mints: {', '.join(d.mints) or 'none announced'}")
        lines.append(f"  wallet key (P2PK): {d.wallet_pubkey or p.get('p2pk_pubkey') or 'none announced'}")
        if p.get("modes"):
            lines.append(f"  pays: {', '.join(str(m) for m in p['modes'])}")
        if p.get("input_error_fee") is not None:
            lines.append(f"  kept of a paid job that fails on your data: {p['input_error_fee']} "
                         f"{p.get('unit', 'sat')}")
    else:
        lines.append("  payment: none announced (free)")
    for k, about in sorted(d.kinds.items()):
        name = about.get("name", "")
        lines.append(f"\n  kind {k} {name}: {about.get('description', '')}".rstrip())
        lines.append(f"    price: {_price_of(d, name)}")
        params = about.get("params") if isinstance(about.get("params"), dict) else {}
        schema = about.get("params_schema") if isinstance(about.get("params_schema"), dict) else {}
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        names = list(dict.fromkeys(list(params) + list(props)))
        lines.append("    params:" + ("" if names else " none"))
        for param in names:
            limits = _param_limits(props.get(param))
            lines.append(f"      {param}: {params.get(param) or (props.get(param) or {}).get('description', '')}"
                         + (f"  [{limits}]" if limits else ""))
        if schema:
            lines.append("    params schema (JSON Schema): " + json.dumps(schema, separators=(",", ":")))
    return "\n".join(lines)
