"""Encrypted blobs: artifacts and private datasets, encrypted before they go to a public server.

A file is encrypted with a fresh random 256-bit key, in chunks, so a file of any size is never
held in memory; the customer gets the key inside the (NIP-44 encrypted) job result and the blob's
URL and sha256 as usual. The construction is the STREAM online authenticated encryption of
Hoang, Reyhanitabar, Rogaway and Vizár (as in age and Tink) over AES-256-GCM: each chunk is
sealed on its own with a nonce made of a random per-file prefix, the chunk's number, and a flag
marking the last chunk, so truncation, reordering, removal or duplication of chunks, and data
appended after the end, are all detected.

Format, version 1 (all integers big-endian)
-------------------------------------------

The key is 32 random bytes, written as base64url without padding (43 characters, RFC 4648 §5);
64 hex digits are accepted as well.

::

    header (32 bytes):
        0   4   magic            ASCII "DVMB"
        4   1   version          0x01
        5   4   chunk_size       plaintext bytes per chunk, uint32, 1 ≤ chunk_size ≤ 16 MiB
                                 (encoders write 1 MiB = 0x00100000)
        9   7   nonce_prefix     random, fresh for each file
        16  16  key_check        first 16 bytes of HMAC-SHA256(key, header[0:16])
    then the chunks, one after another:
        chunk i = AES-256-GCM-Encrypt(key, nonce_i, plaintext_i, aad = header[0:32])
                = ciphertext_i (same length as plaintext_i) || tag_i (16 bytes)
        nonce_i = nonce_prefix (7) || i as uint32 (4) || last (1: 0x01 for the last chunk, else 0x00)

The plaintext is cut into chunks of exactly `chunk_size` bytes; the last chunk holds the rest,
1 to `chunk_size` bytes, and is the only one with last = 0x01. An empty plaintext is one empty
last chunk (the blob is then the header and a 16-byte tag). A plaintext whose length is a
multiple of `chunk_size` ends with a full chunk (no empty chunk after it). At most 2**32 chunks.

To decrypt: read the header; refuse an unknown magic or version (and a chunk size out of range);
compare key_check with HMAC-SHA256(key, header[0:16])[:16] (a mismatch means a wrong key); then
read records of chunk_size + 16 bytes. A record followed by end of file is the last chunk
(last = 0x01); every other record must be exactly chunk_size + 16 bytes. A record shorter than
16 bytes, an empty last chunk after other chunks, or any chunk failing authentication means the
blob is corrupt or truncated. Output written before an error must be discarded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import os
import secrets
import struct
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["BlobDecryptError", "encrypt_file", "decrypt_file", "encrypt_bytes", "decrypt_bytes",
           "generate_key", "MAGIC", "VERSION", "HEADER_SIZE", "TAG_SIZE", "DEFAULT_CHUNK_SIZE",
           "MAX_CHUNK_SIZE"]

MAGIC = b"DVMB"
VERSION = 1
HEADER_SIZE = 32
TAG_SIZE = 16
KEY_SIZE = 32
PREFIX_SIZE = 7
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
MAX_CHUNKS = 1 << 32


class BlobDecryptError(Exception):
    """A blob that cannot be decrypted: wrong key, corrupt or truncated, unknown format."""


# --- keys ----------------------------------------------------------------------------------

def generate_key() -> str:
    """A fresh random key, as 43 base64url characters (no padding)."""
    return _encode_key(secrets.token_bytes(KEY_SIZE))


def _encode_key(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_key(key: str) -> bytes:
    if isinstance(key, (bytes, bytearray)) and len(key) == KEY_SIZE:
        return bytes(key)
    if not isinstance(key, str):
        raise BlobDecryptError("the key must be a string")
    text = key.strip()
    raw = None
    if len(text) == 2 * KEY_SIZE:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None and len(text) == 43:
        try:
            raw = base64.urlsafe_b64decode(text + "=")
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != KEY_SIZE:
        raise BlobDecryptError("the key is not valid: expected 43 base64url characters "
                               "(or 64 hex digits) encoding 32 bytes")
    return raw


# --- the construction ----------------------------------------------------------------------

def _header(raw_key: bytes, chunk_size: int, prefix: bytes) -> bytes:
    first = MAGIC + bytes([VERSION]) + struct.pack(">I", chunk_size) + prefix
    return first + _key_check(raw_key, first)


def _key_check(raw_key: bytes, first16: bytes) -> bytes:
    return hmac.new(raw_key, first16, hashlib.sha256).digest()[:16]


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">I", index) + (b"\x01" if last else b"\x00")


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Read up to `n` bytes, fewer only at end of file."""
    parts = []
    left = n
    while left > 0:
        block = f.read(left)
        if not block:
            break
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def encrypt_stream(src: BinaryIO, dst: BinaryIO, key: str | None = None, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    """Encrypt everything readable from `src` into `dst`; return the key (a fresh one unless
    `key` is given: never give the same key for two different plaintexts if you can avoid it)."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1 to {MAX_CHUNK_SIZE}")
    raw_key = _decode_key(key) if key is not None else secrets.token_bytes(KEY_SIZE)
    prefix = secrets.token_bytes(PREFIX_SIZE)
    header = _header(raw_key, chunk_size, prefix)
    aead = AESGCM(raw_key)
    dst.write(header)
    index = 0
    current = _read_full(src, chunk_size)
    while True:
        following = _read_full(src, chunk_size) if len(current) == chunk_size else b""
        last = not following
        if index >= MAX_CHUNKS:
            raise ValueError("the file is too large for this chunk size")
        dst.write(aead.encrypt(_nonce(prefix, index, last), current, header))
        if last:
            break
        current = following
        index += 1
    return _encode_key(raw_key)


def decrypt_stream(src: BinaryIO, dst: BinaryIO, key: str) -> None:
    """Decrypt `src` into `dst`. On BlobDecryptError, what was written to `dst` must be
    discarded (`decrypt_file` does)."""
    raw_key = _decode_key(key)
    header = _read_full(src, HEADER_SIZE)
    if len(header) < 5 or header[:4] != MAGIC:
        raise BlobDecryptError("not an encrypted blob: the header is missing or wrong "
                               "(was the file encrypted by a DVM?)")
    if header[4] != VERSION:
        raise BlobDecryptError(f"unsupported encrypted blob format version {header[4]} "
                               f"(this DVM reads version {VERSION})")
    if len(header) < HEADER_SIZE:
        raise BlobDecryptError("corrupt or truncated encrypted blob: the header is cut short")
    chunk_size = struct.unpack(">I", header[5:9])[0]
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise BlobDecryptError(f"corrupt encrypted blob: chunk size {chunk_size} is out of range")
    if not hmac.compare_digest(_key_check(raw_key, header[:16]), header[16:32]):
        raise BlobDecryptError("wrong key for this encrypted blob (or its header was changed)")
    prefix = header[9:16]
    aead = AESGCM(raw_key)
    record_size = chunk_size + TAG_SIZE
    index = 0
    current = _read_full(src, record_size)
    while True:
        following = _read_full(src, record_size) if len(current) == record_size else b""
        last = not following
        if len(current) < TAG_SIZE or (last and index > 0 and len(current) == TAG_SIZE):
            raise BlobDecryptError(f"corrupt or truncated encrypted blob (chunk {index} is cut short)")
        if index >= MAX_CHUNKS:
            raise BlobDecryptError("corrupt encrypted blob: too many chunks")
        try:
            plain = aead.decrypt(_nonce(prefix, index, last), current, header)
        except InvalidTag:
            raise BlobDecryptError(
                f"corrupt or truncated encrypted blob: chunk {index} failed authentication "
                "(the data was changed, cut short, reordered or extended)") from None
        dst.write(plain)
        if last:
            return
        current = following
        index += 1


# --- files and bytes -----------------------------------------------------------------------

def encrypt_file(src: Path, dst: Path, *, key: str | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    """Encrypt the file `src` into `dst` (written under a temporary name, then renamed) and
    return the key: 43 base64url characters, fresh and random unless `key` is given."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.part"
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            result = encrypt_stream(fin, fout, key, chunk_size=chunk_size)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return result


def decrypt_file(src: Path, dst: Path, key: str) -> None:
    """Decrypt `src` into `dst`. The plaintext appears under `dst` only once every chunk has
    been authenticated; on error nothing is left there. Raises BlobDecryptError."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(6)}.part"
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            decrypt_stream(fin, fout, key)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def encrypt_bytes(data: bytes, *, key: str | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[bytes, str]:
    """Encrypt `data` in memory: ``(blob, key)``; same format as `encrypt_file`."""
    out = io.BytesIO()
    result = encrypt_stream(io.BytesIO(data), out, key, chunk_size=chunk_size)
    return out.getvalue(), result


def decrypt_bytes(blob: bytes, key: str) -> bytes:
    """Decrypt a blob in memory. Raises BlobDecryptError."""
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(blob), out, key)
    return out.getvalue()
