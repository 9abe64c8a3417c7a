"""Development tools: the embedded blob server and the local demo."""

from __future__ import annotations

import asyncio
import sys

import click

from .logs import configure_logging

from . import main


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
    from dvm_core.devtools.blobserver import serve as serve_blobs
    from dvm_core.protocol.events import parse_public_key
    configure_logging("auto", "info")
    pubkeys = [parse_public_key(p) for p in allowed] or None
    serve_blobs(directory, host, port, max_bytes=max_bytes, allowed_pubkeys=pubkeys, public_url=public_url)


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Keep the demo's files here (default: a temporary directory, removed after).")
@click.option("--verbose", is_flag=True, help="Show the worker's log as it runs.")
def demo(workdir: str | None, verbose: bool) -> None:
    """Run a whole marketplace on this machine: a relay, a provider and a customer.

    Exits 0 only when every step succeeded."""
    from dvm_core.devtools.demo import run_demo
    configure_logging("console", "warning")
    sys.exit(asyncio.run(run_demo(workdir, verbose)))


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="localnet", show_default=True,
              help="Where the relay, mint and blob server keep their data, and where the worker config "
                   "and customer.env are written; a second start here brings the same ones back.")
@click.option("--relay-port", type=click.IntRange(1, 65535), help="Default: the last start's, else a free one.")
@click.option("--mint-port", type=click.IntRange(1, 65535), help="Default: the last start's, else a free one.")
@click.option("--blob-port", type=click.IntRange(1, 65535), help="Default: the last start's, else a free one.")
@click.option("--price", type=click.IntRange(0), default=5, show_default=True,
              help="The text-stats price (sat) in the worker config written.")
def localnet(directory, relay_port, mint_port, blob_port, price) -> None:
    """A local marketplace to try things by hand: a Nostr relay, a Cashu mint (Nutshell with
    the FakeWallet backend: its Lightning invoices pay themselves, so ecash is free) and a
    Blossom blob server, all on 127.0.0.1, until Ctrl-C or SIGTERM.

    It writes DIR/dvm.toml, a worker config for these three (`dvm run --config DIR/dvm.toml`;
    it sets allow_private_urls, as they are on loopback), and DIR/customer.env, the customer's
    side as shell variables (`source DIR/customer.env`): DVM_RELAY, DVM_MINT, DVM_BLOSSOM,
    DVM_NPUB (the worker's key) and DVM_ALLOW_PRIVATE=1, which lets `dvm job submit` and `dvm job
    fetch` use a blob server on loopback (as --allow-private does). Without it, `dvm job submit`
    refuses a --blossom server on a private address (when paying from --wallet-dir)
    before anything is sent or paid."""
    import signal
    import threading

    from dvm_core.devtools.localnet import LocalNetError, start_localnet
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        click.echo(f"dvm localnet: starting a relay, a Cashu mint and a blob server in {directory} …")
        try:
            net = start_localnet(directory, relay_port=relay_port, mint_port=mint_port, blob_port=blob_port,
                                 price=price)
        except LocalNetError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            if not stop.is_set():
                click.echo(_localnet_banner(net))
            while not stop.wait(0.5):
                dead = net.stopped()
                if dead is not None:
                    click.echo(f"error: the {dead.name} exited ({dead.process.returncode}); see "
                               f"{dead.log_path}. Stopping the others.", err=True)
                    break
        finally:
            net.stop()
        click.echo("stopped the relay, the mint and the blob server")
        if not stop.is_set():
            sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _localnet_banner(net) -> str:
    d, config, env = net.directory, net.config_path, net.env_path
    return f"""
  relay        {net.relay.url}
  mint         {net.mint.url}   (Nutshell, FakeWallet: invoices pay themselves)
  blob server  {net.blobs.url}
  logs         {net.relay.log_path}, {net.mint.log_path}, {net.blobs.log_path}

provider (another terminal):
  dvm run --config {config}
  (its key: {d / 'dvm.key'}, npub {net.provider_npub}; earnings: dvm wallet balance --config {config})

customer (a third terminal): source {env}, which sets
  DVM_RELAY={net.relay.url} DVM_MINT={net.mint.url} DVM_BLOSSOM={net.blobs.url}
  DVM_NPUB={net.provider_npub} DVM_ALLOW_PRIVATE=1
then for example:
  dvm wallet mint 100 --wallet-dir wallet --mint "$DVM_MINT"
  dvm dvms --relay "$DVM_RELAY" --kind 5790
  dvm job submit --relay "$DVM_RELAY" --dvm "$DVM_NPUB" --kind 5790 --text "hello hello world" \\
      --wallet-dir wallet --max-price 10

ready; Ctrl-C stops all three"""
