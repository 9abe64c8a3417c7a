"""The `dvm` command.

One module per audience: `operator` (the provider: run, keygen, plugins, status, jobs, doctor),
`wallet` (either side's ecash), `customer` (`dvm job ...`, `dvm dvms`), `dev` (blobs serve, demo,
localnet). Plugins add
theirs through the `register_commands` hook (e.g. `dvm federate`).
"""

from __future__ import annotations

import click

from dvm_core.worker.plugins import PluginError


class _Commands(click.Group):
    """The built-in commands, then the plugins' (the `register_commands` hook), loaded only
    when a command that is not built in, or the list of commands, is asked for."""

    _loaded = False

    def _load_plugin_commands(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from dvm_core.worker.plugins import plugin_manager
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


# The commands register themselves on `main` when their module is imported.
from . import customer, dev, operator, wallet  # noqa: E402,F401
