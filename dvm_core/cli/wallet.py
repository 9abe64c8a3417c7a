"""`dvm wallet`: the ecash wallet, the provider's earnings or a customer's funds."""

from __future__ import annotations

import asyncio
import json
import os

import click

from dvm_core.worker.config import ConfigError, load_config
from dvm_core.state.keyfiles import KeyFileError, read_key_file

from . import main


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


def open_wallet(config_path, wallet_dir, mints):
    from pathlib import Path

    from dvm_core.payments.p2pk_keys import load_or_create_p2pk_key
    from dvm_core.payments.wallet import EcashWallet
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
    return EcashWallet(directory=directory, accepted_mints=mints, unit=unit,
                       p2pk_private_key=load_or_create_p2pk_key(directory / "p2pk.key"))


def _run_wallet(config_path, wallet_dir, mints, action):
    async def go():
        w = open_wallet(config_path, wallet_dir, mints)
        try:
            return await action(w)
        finally:
            await w.close()
    from dvm_core.payments.wallet_types import PaymentError
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
    from dvm_core.protocol.events import parse_public_key
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
    from dvm_core.customer.client import Customer
    try:
        keys = read_key_file(key_file)
    except KeyFileError as exc:
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
