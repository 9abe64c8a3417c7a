"""`dvm federate`: federated training across DVMs, the customer's side (FEDSTR, arXiv 2404.15834).

Customer software, not a job kind: it adds the `federate` command through the same
`register_commands` hook and entry point (``federate = "dvm_federate"``) any plugin uses. It
hires image-classifier providers (kind 5750) and, optionally, a merge DVM (kind 5752) through
the customer's API (`dvm_core.customer`), merges with `dvm_fedavg.merge.merge_files` and evaluates
with the image classifier's public functions. `rounds` runs the rounds; `llm` runs them on the
LLM fine-tuning kind (5751: LoRA adapters merged exactly, held-out loss); `commands` is the CLI
(against real providers, or ``--local N`` on this machine).
"""

from __future__ import annotations

from dvm_core import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_commands(cli):
    from .commands import federate_command

    cli.add_command(federate_command)
