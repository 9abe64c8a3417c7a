"""Finding the worker's Nostr key: environment, key file, or a systemd credential."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

from .config import ConfigError, Settings
from dvm_core.protocol.events import Keys

log = structlog.get_logger("dvm.keys")
CREDENTIAL_NAME = "dvm.key"


def write_key_file(path: str | Path, keys: Keys) -> None:
    """Write the nsec to `path`, readable by its owner alone (0600), never overwriting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(keys.nsec + "\n")


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
    for path in candidates:
        if path.exists():
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("key file is readable by others; chmod 600 it", path=str(path))
            try:
                return Keys.from_secret(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"key file {path}: {exc}") from None
            except OSError as exc:  # e.g. a root-only file under systemd's DynamicUser
                raise ConfigError(f"key file {path} cannot be read ({exc.strerror}); under systemd "
                                  "leave key_file unset and use LoadCredential=dvm.key:…") from None
    if candidates:
        raise ConfigError(f"key file {candidates[0]} does not exist: create one with `dvm keygen --out {candidates[0]}`")
    raise ConfigError("no key: set key_file in [dvm], or DVM_PRIVATE_KEY, or create one with `dvm keygen`")
