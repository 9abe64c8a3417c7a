"""Finding the worker's Nostr key: environment, key file, or a systemd credential."""

from __future__ import annotations

import os
from pathlib import Path

from dvm_core.protocol.events import Keys
from dvm_core.state.keyfiles import KeyFileError, read_key_file, write_key_file

from .config import ConfigError, Settings

CREDENTIAL_NAME = "dvm.key"

__all__ = ["CREDENTIAL_NAME", "load_keys", "write_key_file"]


def load_keys(settings: Settings, env: dict[str, str] | None = None) -> Keys:
    """DVM_PRIVATE_KEY, else the configured key_file, else systemd's credential `dvm.key`."""
    env = os.environ if env is None else env
    if env.get("DVM_PRIVATE_KEY"):
        try:
            return Keys.from_secret(env["DVM_PRIVATE_KEY"])
        except ValueError as exc:
            raise ConfigError(f"DVM_PRIVATE_KEY: {exc}") from None
    candidates = []
    if settings.key_file:
        candidates.append(Path(settings.key_file))
    if env.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME)
    if not candidates:
        raise ConfigError("no key: set key_file in [dvm], or DVM_PRIVATE_KEY, or create one with `dvm keygen`")
    path = next((p for p in candidates if p.exists()), candidates[0])   # else: "does not exist"
    try:
        return read_key_file(path)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from None
