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
