"""NIP-04 legacy DM encryption (pure protocol, no I/O).

NIP-04 is deprecated in favour of NIP-44 but many NIP-90 clients still send
encrypted job requests with it, so a worker must be able to read and answer
them. Payloads look like ``base64(AES-256-CBC(ciphertext)) + "?iv=" + base64(iv)``
with the key being the unhashed ECDH x coordinate.

The cryptography itself is delegated to pynostr's ``PrivateKey.encrypt_message``
/ ``decrypt_message``. This module adds strict validation in front of it,
because pynostr decodes base64 leniently (silently dropping junk characters),
ignores anything after a second ``?iv=``, and raises a mix of ``IndexError``,
``binascii.Error``, ``ValueError`` and ``UnicodeDecodeError``. Every failure
here is a :class:`Nip04Error` instead.
"""

from __future__ import annotations

import base64
import binascii

import coincurve
from pynostr.key import PrivateKey

__all__ = ["Nip04Error", "decrypt_from", "encrypt_to", "looks_like_nip04"]

_IV_SEPARATOR = "?iv="
_IV_SIZE = 16
_BLOCK_SIZE = 16


class Nip04Error(ValueError):
    """Raised for any NIP-04 failure: bad keys or a malformed/undecryptable payload."""


def looks_like_nip04(payload: str) -> bool:
    """Return True if ``payload`` has the NIP-04 shape (NIP-44 base64 never contains ``?``)."""
    return isinstance(payload, str) and _IV_SEPARATOR in payload


def _private_key(private_key_hex: str) -> PrivateKey:
    if not isinstance(private_key_hex, str) or len(private_key_hex) != 64:
        raise Nip04Error("private key must be 64 hex characters")
    try:
        return PrivateKey(bytes.fromhex(private_key_hex))
    except ValueError as exc:
        # Covers both non-hex input and scalars coincurve rejects (0, >= n).
        raise Nip04Error("private key is not a valid secp256k1 secret") from exc


def _public_key(public_key_hex: str) -> str:
    if not isinstance(public_key_hex, str) or len(public_key_hex) != 64:
        raise Nip04Error("public key must be 64 hex characters")
    try:
        # Validate up front: pynostr would raise a bare ValueError deep inside ECDH.
        coincurve.PublicKey(b"\x02" + bytes.fromhex(public_key_hex))
    except ValueError as exc:
        raise Nip04Error("public key is not a valid secp256k1 x coordinate") from exc
    return public_key_hex.lower()


def _strict_b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Nip04Error(f"invalid base64 in NIP-04 {what}") from exc


def encrypt_to(private_key_hex: str, public_key_hex: str, plaintext: str) -> str:
    """Encrypt ``plaintext`` from ``private_key_hex`` to ``public_key_hex`` as a NIP-04 payload."""
    if not isinstance(plaintext, str):
        raise Nip04Error(f"plaintext must be a str, got {type(plaintext).__name__}")
    key = _private_key(private_key_hex)
    pub = _public_key(public_key_hex)
    try:
        return key.encrypt_message(plaintext, pub)
    except UnicodeEncodeError as exc:
        # Lone surrogates in a Python str cannot be encoded to UTF-8.
        raise Nip04Error("plaintext is not encodable as UTF-8") from exc


def decrypt_from(private_key_hex: str, public_key_hex: str, payload: str) -> str:
    """Decrypt a NIP-04 ``payload`` that ``public_key_hex`` sent to ``private_key_hex``.

    A wrong key usually shows up as "bad padding" or "not valid UTF-8"; NIP-04
    has no MAC, so about 1 in 256 wrong-key attempts yields garbage text instead.
    """
    if not isinstance(payload, str):
        raise Nip04Error(f"payload must be a str, got {type(payload).__name__}")
    parts = payload.split(_IV_SEPARATOR)
    if len(parts) != 2:
        raise Nip04Error(
            "NIP-04 payload must contain exactly one '?iv=' separator"
            if len(parts) > 2
            else "NIP-04 payload is missing '?iv='"
        )
    content_b64, iv_b64 = parts
    ciphertext = _strict_b64(content_b64, "ciphertext")
    iv = _strict_b64(iv_b64, "iv")
    if len(iv) != _IV_SIZE:
        raise Nip04Error(f"NIP-04 iv must be {_IV_SIZE} bytes, got {len(iv)}")
    if not ciphertext or len(ciphertext) % _BLOCK_SIZE:
        raise Nip04Error(
            f"NIP-04 ciphertext must be a non-empty multiple of {_BLOCK_SIZE} bytes, got {len(ciphertext)}"
        )
    key = _private_key(private_key_hex)
    pub = _public_key(public_key_hex)
    try:
        return key.decrypt_message(payload, pub)
    except UnicodeDecodeError as exc:
        raise Nip04Error("decrypted NIP-04 plaintext is not valid UTF-8") from exc
    except ValueError as exc:
        # cryptography's PKCS7 unpadder raises ValueError("Invalid padding bytes.").
        raise Nip04Error("bad padding in NIP-04 ciphertext (wrong key or corrupted payload)") from exc
