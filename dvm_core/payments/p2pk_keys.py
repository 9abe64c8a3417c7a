"""P2PK keys (NUT-11): the wallet's own key file and the secp256k1 helpers for keys in locks.

A wallet receives P2PK-locked ecash on a key of its own, kept 0600 beside its databases
(`load_or_create_p2pk_key`), never on the Nostr identity key. Locks name keys compressed
("02"/"03" + x, 66 hex); Nostr keys are x-only (64 hex) and stand for "02" + x.

May import: the standard library and coincurve. Nothing of dvm_core; no network.
"""

from __future__ import annotations

import os
from pathlib import Path

import coincurve

# secp256k1 group order: d and n - d have the same x-coordinate, opposite Y parity.
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def even_y_secret(secret_hex: str) -> str:
    """The secret key with the same x-only public key whose public key has even Y (BIP-340).

    Nutshell signs a P2PK proof only when the lock equals its own compressed key, and locks to
    Nostr keys are written "02" + x: with the even-Y secret, that is our key.
    """
    d = int(secret_hex, 16)
    if not 0 < d < SECP256K1_ORDER:
        raise ValueError("not a secp256k1 secret key")
    if coincurve.PrivateKey(d.to_bytes(32, "big")).public_key.format()[0] == 3:
        d = SECP256K1_ORDER - d
    return d.to_bytes(32, "big").hex()


def xonly_pubkey(secret_hex: str) -> str:
    """The x-only public key (64 hex) of a secret key."""
    return coincurve.PrivateKey(bytes.fromhex(secret_hex)).public_key.format()[1:].hex()


def compressed_pubkey(pubkey: str) -> str:
    """A 66-hex compressed key as it is (lower case), or a 64-hex x-only (Nostr) key as "02" + x.
    Raises ValueError for anything that is not a point on the curve."""
    pubkey = pubkey.strip().lower()
    if len(pubkey) == 64:
        pubkey = "02" + pubkey
    try:
        coincurve.PublicKey(bytes.fromhex(pubkey))
    except ValueError:
        raise ValueError(f"not a secp256k1 public key: {pubkey!r}") from None
    if len(pubkey) != 66:
        raise ValueError(f"not a compressed public key: {pubkey!r}")
    return pubkey


def create_private_file(path: Path) -> None:
    """Create an empty file readable by us only, so SQLite (and its -wal/-shm files) keep 0600."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    path.chmod(0o600)


def load_or_create_p2pk_key(path: str | Path) -> str:
    """The wallet's dedicated P2PK key (hex), made on first use and kept 0600 beside the wallet.

    NIP-61 forbids locking ecash to the Nostr identity key, so the DVM receives on this one."""
    path = Path(path)
    if path.exists():
        secret = path.read_text().strip()
        if len(secret) != 64:
            raise ValueError(f"{path} does not hold a 64-hex private key")
        return secret
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = even_y_secret(os.urandom(32).hex())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret
