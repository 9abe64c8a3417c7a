"""Nostr key files (an nsec on one line), for the provider and the customer alike: written
readable by their owner alone, never overwritten, read with a warning when others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

from dvm_core.protocol.events import Keys

log = structlog.get_logger("dvm.keys")


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or holds no key; the message says what to do."""


def write_key_file(path: str | Path, keys: Keys) -> None:
    """Write the nsec to `path`, readable by its owner alone (0600), never overwriting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(keys.nsec + "\n")


def read_key_file(path: str | Path) -> Keys:
    """The key in `path`; KeyFileError if there is none."""
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"key file {path} does not exist: create one with `dvm keygen --out {path}`")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file is readable by others; chmod 600 it", path=str(path))
    try:
        return Keys.from_secret(path.read_text())
    except ValueError as exc:
        raise KeyFileError(f"key file {path}: {exc}") from None
    except OSError as exc:  # e.g. a root-only file under systemd's DynamicUser
        raise KeyFileError(f"key file {path} cannot be read ({exc.strerror}); under systemd "
                           "leave key_file unset and use LoadCredential=dvm.key:…") from None
