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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.stop()))
    await worker.run()


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
