"""Encrypted blobs: round trips, and every kind of tampering refused with a clear error."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dvm_core.transport.blobcrypt import (DEFAULT_CHUNK_SIZE, HEADER_SIZE, TAG_SIZE, BlobDecryptError,
                                decrypt_bytes, decrypt_file, encrypt_bytes, encrypt_file)

CHUNK = 64  # small chunks keep multi-chunk cases small


def records(blob: bytes, chunk_size: int = CHUNK) -> list[bytes]:
    body = blob[HEADER_SIZE:]
    size = chunk_size + TAG_SIZE
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [0, 1, 100, DEFAULT_CHUNK_SIZE, 3 * DEFAULT_CHUNK_SIZE + 7])
def test_file_round_trip(tmp_path, size):
    data = os.urandom(size)
    src, enc, out = tmp_path / "plain", tmp_path / "blob", tmp_path / "out"
    src.write_bytes(data)
    key = encrypt_file(src, enc)
    assert len(key) == 43 and "=" not in key
    assert len(base64.urlsafe_b64decode(key + "=")) == 32
    chunks = max(1, -(-size // DEFAULT_CHUNK_SIZE))
    assert enc.stat().st_size == HEADER_SIZE + size + TAG_SIZE * chunks
    decrypt_file(enc, out, key)
    assert out.read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 3])
def test_bytes_round_trip_chunk_edges(size):
    data = os.urandom(size)
    blob, key = encrypt_bytes(data, chunk_size=CHUNK)
    assert decrypt_bytes(blob, key) == data
    # exactly n full chunks: no empty chunk after them
    expected_chunks = max(1, -(-size // CHUNK))
    assert len(records(blob)) == expected_chunks


def test_fresh_key_and_nonce_each_time():
    blob1, key1 = encrypt_bytes(b"same data")
    blob2, key2 = encrypt_bytes(b"same data")
    assert key1 != key2 and blob1 != blob2


def test_hex_key_accepted():
    blob, key = encrypt_bytes(b"hello")
    hex_key = base64.urlsafe_b64decode(key + "=").hex()
    assert decrypt_bytes(blob, hex_key) == b"hello"


def test_format_matches_the_documented_spec():
    """An independent decoder written from the module docstring."""
    data = os.urandom(3 * CHUNK + 5)
    blob, key = encrypt_bytes(data, chunk_size=CHUNK)
    raw = base64.urlsafe_b64decode(key + "=")
    header = blob[:32]
    assert header[:4] == b"DVMB" and header[4] == 1
    assert struct.unpack(">I", header[5:9])[0] == CHUNK
    assert header[16:32] == hmac.new(raw, header[:16], hashlib.sha256).digest()[:16]
    prefix = header[9:16]
    recs = records(blob)
    plain = b""
    for i, rec in enumerate(recs):
        nonce = prefix + struct.pack(">I", i) + (b"\x01" if i == len(recs) - 1 else b"\x00")
        plain += AESGCM(raw).decrypt(nonce, rec, header)
    assert plain == data


def test_wrong_key():
    blob, _ = encrypt_bytes(b"secret dataset")
    _, other = encrypt_bytes(b"")
    with pytest.raises(BlobDecryptError, match="wrong key"):
        decrypt_bytes(blob, other)


def test_malformed_key():
    blob, _ = encrypt_bytes(b"x")
    with pytest.raises(BlobDecryptError, match="key is not valid"):
        decrypt_bytes(blob, "not-a-key")


@pytest.mark.parametrize("where", ["first chunk", "middle chunk", "last tag", "chunk size"])
def test_flipped_byte(where):
    blob, key = encrypt_bytes(os.urandom(3 * CHUNK + 10), chunk_size=CHUNK)
    position = {"first chunk": HEADER_SIZE + 3, "middle chunk": HEADER_SIZE + CHUNK + TAG_SIZE + 5,
                "last tag": len(blob) - 1, "chunk size": 8}[where]
    tampered = bytearray(blob)
    tampered[position] ^= 0x01
    with pytest.raises(BlobDecryptError, match="corrupt|wrong key"):
        decrypt_bytes(bytes(tampered), key)


@pytest.mark.parametrize("cut", [1, TAG_SIZE, CHUNK + TAG_SIZE - 10, "boundary", "header"])
def test_truncated(cut):
    blob, key = encrypt_bytes(os.urandom(3 * CHUNK + 10), chunk_size=CHUNK)
    if cut == "boundary":  # drop the whole last chunk: what is left ends on a chunk boundary
        short = blob[:HEADER_SIZE + 3 * (CHUNK + TAG_SIZE)]
    elif cut == "header":
        short = blob[:20]
    else:
        short = blob[:-cut]
    with pytest.raises(BlobDecryptError, match="corrupt or truncated"):
        decrypt_bytes(short, key)


def test_truncated_file_leaves_no_output(tmp_path):
    src, enc, out = tmp_path / "plain", tmp_path / "blob", tmp_path / "out"
    src.write_bytes(os.urandom(3 * CHUNK))
    key = encrypt_file(src, enc, chunk_size=CHUNK)
    enc.write_bytes(enc.read_bytes()[:-(CHUNK + TAG_SIZE)])
    with pytest.raises(BlobDecryptError, match="truncated"):
        decrypt_file(enc, out, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "plain"]


def test_reordered_and_removed_chunks():
    blob, key = encrypt_bytes(os.urandom(4 * CHUNK), chunk_size=CHUNK)
    header, recs = blob[:HEADER_SIZE], records(blob)
    assert len(recs) == 4
    swapped = header + recs[1] + recs[0] + recs[2] + recs[3]
    removed = header + recs[0] + recs[2] + recs[3]
    duplicated = header + recs[0] + recs[0] + recs[1] + recs[2] + recs[3]
    for bad in (swapped, removed, duplicated):
        with pytest.raises(BlobDecryptError, match="chunk \\d+ failed authentication"):
            decrypt_bytes(bad, key)


@pytest.mark.parametrize("size", [10, CHUNK, 2 * CHUNK])
@pytest.mark.parametrize("garbage", [b"x", os.urandom(TAG_SIZE), os.urandom(CHUNK + TAG_SIZE)],
                         ids=["one-byte", "a-tag", "a-chunk-and-tag"])   # same ids in every process (xdist)
def test_appended_garbage(size, garbage):
    blob, key = encrypt_bytes(os.urandom(size), chunk_size=CHUNK)
    with pytest.raises(BlobDecryptError, match="corrupt"):
        decrypt_bytes(blob + garbage, key)


def test_appended_empty_last_chunk_refused():
    """Even a correctly sealed empty last chunk after full chunks is refused (never written)."""
    data = os.urandom(2 * CHUNK)
    blob, key = encrypt_bytes(data, chunk_size=CHUNK)
    raw = base64.urlsafe_b64decode(key + "=")
    header, recs = blob[:HEADER_SIZE], records(blob)
    prefix = header[9:16]
    reseal = [AESGCM(raw).encrypt(prefix + struct.pack(">I", i) + b"\x00", data[i * CHUNK:(i + 1) * CHUNK], header)
              for i in range(2)]
    empty_last = AESGCM(raw).encrypt(prefix + struct.pack(">I", 2) + b"\x01", b"", header)
    with pytest.raises(BlobDecryptError, match="cut short"):
        decrypt_bytes(header + b"".join(reseal) + empty_last, key)
    assert len(recs) == 2


def test_version_changed():
    blob, key = encrypt_bytes(b"data")
    for version in (0, 2, 255):
        tampered = blob[:4] + bytes([version]) + blob[5:]
        with pytest.raises(BlobDecryptError, match=f"unsupported .*version {version}"):
            decrypt_bytes(tampered, key)


def test_not_a_blob():
    _, key = encrypt_bytes(b"")
    with pytest.raises(BlobDecryptError, match="not an encrypted blob"):
        decrypt_bytes(b"PK\x03\x04 a zip file, not a blob", key)
    with pytest.raises(BlobDecryptError, match="not an encrypted blob"):
        decrypt_bytes(b"", key)
