"""`dvm verify`: check a training result against its transcript, the customer's side (issue 17).

Customer software, not a job kind, like `dvm federate`: it adds the `verify` command through the
`register_commands` hook and its entry point (``verify = "dvm_verify"``). Given a result folder
(``dvm job submit --out DIR`` of an image-classifier or LLM fine-tuning job sent with
``checkpoint_every``; an LLM's needs its base model too, ``--model``), it
checks the transcript's signature, picks segments at random with a seed, and replays each one
here (``--local``, `dvm_image_classifier.verify` or `dvm_llm_finetune.verify`) or hires a verifier DVM (kind 5753) for each.
`checks` holds the logic, `commands` the command line.
"""

from __future__ import annotations

from dvm_core import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_commands(cli):
    from .commands import verify_command

    cli.add_command(verify_command)
