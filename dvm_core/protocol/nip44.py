"""NIP-44 version 2 payload encryption (pure protocol, no I/O).

NIP-44 v2 is the encryption scheme current Nostr clients use for DMs, NIP-90
encrypted job requests/results and similar payloads:

    shared_x         = x coordinate of ECDH(sec1, pub2)          (unhashed)
    conversation_key = HKDF-extract(salt="nip44-v2", ikm=shared_x)
    chacha_key | chacha_nonce | hmac_key
                     = HKDF-expand(conversation_key, info=nonce, L=76)
    padded           = u16be(len(plaintext)) | plaintext | zeros
    ciphertext       = ChaCha20(chacha_key, chacha_nonce, padded)
    mac              = HMAC-SHA256(hmac_key, nonce | ciphertext)
    payload          = base64(0x02 | nonce | ciphertext | mac)

Built on ``coincurve`` (secp256k1) and ``cryptography`` (ChaCha20, HKDF-expand).
Every failure raises :class:`Nip44Error`, a ``ValueError`` subclass, so callers
can handle untrusted input with a single ``except``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os

import coincurve
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "Nip44Error",
    "calc_padded_len",
    "decrypt",
    "decrypt_from",
    "encrypt",
    "encrypt_to",
    "get_conversation_key",
    "get_message_keys",
]

VERSION = 2
MIN_PLAINTEXT_SIZE = 1
MAX_PLAINTEXT_SIZE = 65535

_SALT = b"nip44-v2"
_NONCE_SIZE = 32
_MAC_SIZE = 32
_KEY_SIZE = 32
# Limits from the spec's decode_payload: base64 length of the smallest and
# largest possible payloads, and their decoded sizes.
_MIN_PAYLOAD_CHARS = 132
_MAX_PAYLOAD_CHARS = 87472
_MIN_DATA_SIZE = 99
_MAX_DATA_SIZE = 65603

# secp256k1 group order; private keys must lie in [1, n-1].
_CURVE_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class Nip44Error(ValueError):
    """Raised for any NIP-44 failure: bad keys, bad payload, bad MAC, bad length."""


def _hex32(value: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise Nip44Error(f"{what} must be a hex string, got {type(value).__name__}")
    if len(value) != 64:
        raise Nip44Error(f"{what} must be 64 hex characters, got {len(value)}")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise Nip44Error(f"{what} is not valid hex") from exc


def _check_key(conversation_key: bytes) -> None:
    if not isinstance(conversation_key, (bytes, bytearray)) or len(conversation_key) != _KEY_SIZE:
        raise Nip44Error("conversation key must be 32 bytes")


@functools.lru_cache(maxsize=1024)
def _conversation_key(private_key_hex: str, public_key_hex: str) -> bytes:
    # Cached because the ECDH multiplication dominates the cost of every
    # encrypt/decrypt, and a worker talks to the same few peers repeatedly.
    # Exceptions are not cached by lru_cache, so invalid input is re-checked.
    secret = _hex32(private_key_hex, "private key")
    if not 0 < int.from_bytes(secret, "big") < _CURVE_N:
        raise Nip44Error("private key is out of range (must be 1..n-1)")
    x_only = _hex32(public_key_hex, "public key")
    try:
        # Nostr keys are BIP-340 x-only, which by convention denote the even-Y point.
        point = coincurve.PublicKey(b"\x02" + x_only)
        shared = point.multiply(secret)
    except ValueError as exc:
        raise Nip44Error("public key is not a valid secp256k1 x coordinate") from exc
    # NIP-44 uses the raw x coordinate, not libsecp256k1's default hashed ECDH.
    shared_x = shared.format(compressed=True)[1:]
    # HKDF-extract is HMAC(salt, ikm); cryptography<44 has no public extract step.
    return hmac.new(_SALT, shared_x, hashlib.sha256).digest()


def get_conversation_key(private_key_hex: str, public_key_hex: str) -> bytes:
    """Return the 32-byte conversation key shared by ``private_key_hex`` and ``public_key_hex``.

    ``public_key_hex`` is a nostr x-only public key (64 hex chars). The result is
    symmetric: ``get_conversation_key(a, B) == get_conversation_key(b, A)``.
    """
    if isinstance(private_key_hex, str):
        private_key_hex = private_key_hex.lower()
    if isinstance(public_key_hex, str):
        public_key_hex = public_key_hex.lower()
    return _conversation_key(private_key_hex, public_key_hex)


def get_message_keys(conversation_key: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """Derive ``(chacha_key, chacha_nonce, hmac_key)`` for one message (internal, exposed for tests)."""
    _check_key(conversation_key)
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != _NONCE_SIZE:
        raise Nip44Error("nonce must be 32 bytes")
    keys = HKDFExpand(algorithm=hashes.SHA256(), length=76, info=bytes(nonce)).derive(
        bytes(conversation_key)
    )
    return keys[0:32], keys[32:44], keys[44:76]


def calc_padded_len(n: int) -> int:
    """Return the padded size for an ``n``-byte plaintext (excluding the 2-byte length prefix).

    Padding hides the exact message length: sizes round up to 32 bytes for
    short messages and to 1/8 of the next power of two for longer ones.
    """
    if n < 1:
        raise Nip44Error(f"plaintext length must be at least 1, got {n}")
    if n <= 32:
        return 32
    next_power = 1 << (n - 1).bit_length()
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((n - 1) // chunk + 1)


def _pad(plaintext: str) -> bytes:
    data = plaintext.encode("utf-8")
    length = len(data)
    if not MIN_PLAINTEXT_SIZE <= length <= MAX_PLAINTEXT_SIZE:
        raise Nip44Error(
            f"plaintext must be {MIN_PLAINTEXT_SIZE}..{MAX_PLAINTEXT_SIZE} bytes of UTF-8, got {length}"
        )
    return length.to_bytes(2, "big") + data + bytes(calc_padded_len(length) - length)


def _unpad(padded: bytes) -> str:
    length = int.from_bytes(padded[0:2], "big")
    data = padded[2 : 2 + length]
    if length == 0 or len(data) != length or len(padded) != 2 + calc_padded_len(length):
        raise Nip44Error("invalid padding")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Nip44Error("decrypted plaintext is not valid UTF-8") from exc


def _chacha20(key: bytes, nonce12: bytes, data: bytes) -> bytes:
    # cryptography's ChaCha20 takes a 16-byte nonce: a 4-byte little-endian block
    # counter followed by the 12-byte IETF nonce. NIP-44 starts the counter at 0.
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce12), mode=None)
    return cipher.encryptor().update(data)


def _hmac_aad(key: bytes, message: bytes, aad: bytes) -> bytes:
    # The nonce is authenticated along with the ciphertext so it cannot be swapped.
    return hmac.new(key, aad + message, hashlib.sha256).digest()


def encrypt(plaintext: str, conversation_key: bytes, nonce: bytes | None = None) -> str:
    """Encrypt ``plaintext`` (1..65535 UTF-8 bytes) and return the base64 payload.

    ``nonce`` should be left as ``None`` (32 random bytes); passing one is for
    test vectors only, since reusing a nonce with the same key breaks secrecy.
    """
    if not isinstance(plaintext, str):
        raise Nip44Error(f"plaintext must be a str, got {type(plaintext).__name__}")
    if nonce is None:
        nonce = os.urandom(_NONCE_SIZE)
    chacha_key, chacha_nonce, hmac_key = get_message_keys(conversation_key, nonce)
    ciphertext = _chacha20(chacha_key, chacha_nonce, _pad(plaintext))
    mac = _hmac_aad(hmac_key, ciphertext, bytes(nonce))
    return base64.b64encode(bytes([VERSION]) + bytes(nonce) + ciphertext + mac).decode("ascii")


def _decode_payload(payload: str) -> tuple[bytes, bytes, bytes]:
    if not isinstance(payload, str):
        raise Nip44Error(f"payload must be a str, got {type(payload).__name__}")
    plen = len(payload)
    if plen == 0:
        raise Nip44Error("invalid payload length 0 (empty payload)")
    # '#' is reserved by the spec to flag a future non-base64 encoding.
    if payload[0] == "#":
        raise Nip44Error("unknown encryption version")
    if not _MIN_PAYLOAD_CHARS <= plen <= _MAX_PAYLOAD_CHARS:
        raise Nip44Error(
            f"invalid payload length {plen} (must be {_MIN_PAYLOAD_CHARS}..{_MAX_PAYLOAD_CHARS} chars)"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise Nip44Error("invalid base64 in payload") from exc
    dlen = len(data)
    if not _MIN_DATA_SIZE <= dlen <= _MAX_DATA_SIZE:
        raise Nip44Error(
            f"invalid decoded payload size {dlen} (must be {_MIN_DATA_SIZE}..{_MAX_DATA_SIZE} bytes)"
        )
    if data[0] != VERSION:
        raise Nip44Error(f"unknown encryption version {data[0]}")
    nonce = data[1 : 1 + _NONCE_SIZE]
    ciphertext = data[1 + _NONCE_SIZE : dlen - _MAC_SIZE]
    mac = data[dlen - _MAC_SIZE :]
    return nonce, ciphertext, mac


def decrypt(payload: str, conversation_key: bytes) -> str:
    """Verify and decrypt a base64 NIP-44 v2 payload, returning the plaintext."""
    _check_key(conversation_key)
    nonce, ciphertext, mac = _decode_payload(payload)
    chacha_key, chacha_nonce, hmac_key = get_message_keys(conversation_key, nonce)
    expected = _hmac_aad(hmac_key, ciphertext, nonce)
    # Constant-time compare so timing does not leak how much of a forged MAC matched.
    if not hmac.compare_digest(expected, mac):
        raise Nip44Error("invalid MAC")
    return _unpad(_chacha20(chacha_key, chacha_nonce, ciphertext))


def encrypt_to(private_key_hex: str, public_key_hex: str, plaintext: str) -> str:
    """Encrypt ``plaintext`` from the holder of ``private_key_hex`` to ``public_key_hex``."""
    return encrypt(plaintext, get_conversation_key(private_key_hex, public_key_hex))


def decrypt_from(private_key_hex: str, public_key_hex: str, payload: str) -> str:
    """Decrypt a payload that ``public_key_hex`` sent to the holder of ``private_key_hex``."""
    return decrypt(payload, get_conversation_key(private_key_hex, public_key_hex))
