"""Official NIP-44 v2 test vectors (paulmillr/nip44) plus a few API checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from dvm_core.protocol.nip44 import (
    Nip44Error,
    calc_padded_len,
    decrypt,
    decrypt_from,
    encrypt,
    encrypt_to,
    get_conversation_key,
    get_message_keys,
)

# A copy of the official vectors travels with the project (tests/vectors/README.md says where from).
VECTORS_PATH = Path(__file__).resolve().parent / "vectors" / "nip44.vectors.json"
VECTORS_SHA256 = "269ed0f69e4c192512cc779e78c555090cebc7c785b609e338a62afc3ce25040"


def _load_vectors() -> dict[str, Any]:
    # Fail at collection rather than skip: a missing vector file must not look like a pass.
    if not VECTORS_PATH.is_file():
        raise FileNotFoundError(f"NIP-44 test vectors not found at {VECTORS_PATH}")
    raw = VECTORS_PATH.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VECTORS_SHA256:
        raise AssertionError(f"unexpected sha256 {digest} for {VECTORS_PATH}")
    return json.loads(raw)["v2"]


V2 = _load_vectors()
VALID = V2["valid"]
INVALID = V2["invalid"]


def _ids(vectors: list[Any], key: str | None = None) -> list[str]:
    return [f"{i}-{v[key]}" if key and isinstance(v, dict) and key in v else str(i) for i, v in enumerate(vectors)]


def test_vector_file_checksum() -> None:
    digest = hashlib.sha256(VECTORS_PATH.read_bytes()).hexdigest()
    assert digest == VECTORS_SHA256


@pytest.mark.parametrize("vec", VALID["get_conversation_key"], ids=_ids(VALID["get_conversation_key"]))
def test_get_conversation_key(vec: dict[str, str]) -> None:
    assert get_conversation_key(vec["sec1"], vec["pub2"]).hex() == vec["conversation_key"]


@pytest.mark.parametrize(
    "vec", VALID["get_message_keys"]["keys"], ids=_ids(VALID["get_message_keys"]["keys"])
)
def test_get_message_keys(vec: dict[str, str]) -> None:
    conversation_key = bytes.fromhex(VALID["get_message_keys"]["conversation_key"])
    chacha_key, chacha_nonce, hmac_key = get_message_keys(conversation_key, bytes.fromhex(vec["nonce"]))
    assert chacha_key.hex() == vec["chacha_key"]
    assert chacha_nonce.hex() == vec["chacha_nonce"]
    assert hmac_key.hex() == vec["hmac_key"]


@pytest.mark.parametrize("vec", VALID["calc_padded_len"], ids=[str(v[0]) for v in VALID["calc_padded_len"]])
def test_calc_padded_len(vec: list[int]) -> None:
    unpadded, padded = vec
    assert calc_padded_len(unpadded) == padded


@pytest.mark.parametrize("vec", VALID["encrypt_decrypt"], ids=_ids(VALID["encrypt_decrypt"]))
def test_encrypt_decrypt(vec: dict[str, str]) -> None:
    conversation_key = bytes.fromhex(vec["conversation_key"])
    # The vector's conversation key must be derivable from either side.
    pub2 = _xonly(vec["sec2"])
    pub1 = _xonly(vec["sec1"])
    assert get_conversation_key(vec["sec1"], pub2) == conversation_key
    assert get_conversation_key(vec["sec2"], pub1) == conversation_key

    payload = encrypt(vec["plaintext"], conversation_key, bytes.fromhex(vec["nonce"]))
    assert payload == vec["payload"]
    assert decrypt(vec["payload"], conversation_key) == vec["plaintext"]
    assert decrypt_from(vec["sec2"], pub1, payload) == vec["plaintext"]


@pytest.mark.parametrize("vec", VALID["encrypt_decrypt_long_msg"], ids=_ids(VALID["encrypt_decrypt_long_msg"], "pattern"))
def test_encrypt_decrypt_long_msg(vec: dict[str, Any]) -> None:
    conversation_key = bytes.fromhex(vec["conversation_key"])
    plaintext = vec["pattern"] * vec["repeat"]
    assert hashlib.sha256(plaintext.encode("utf-8")).hexdigest() == vec["plaintext_sha256"]

    payload = encrypt(plaintext, conversation_key, bytes.fromhex(vec["nonce"]))
    assert hashlib.sha256(payload.encode("ascii")).hexdigest() == vec["payload_sha256"]
    assert decrypt(payload, conversation_key) == plaintext


@pytest.mark.parametrize("length", INVALID["encrypt_msg_lengths"], ids=[str(n) for n in INVALID["encrypt_msg_lengths"]])
def test_invalid_encrypt_msg_lengths(length: int) -> None:
    with pytest.raises(Nip44Error):
        encrypt("a" * length, bytes(32), bytes(32))


@pytest.mark.parametrize("vec", INVALID["get_conversation_key"], ids=_ids(INVALID["get_conversation_key"], "note"))
def test_invalid_get_conversation_key(vec: dict[str, str]) -> None:
    with pytest.raises(Nip44Error):
        get_conversation_key(vec["sec1"], vec["pub2"])


@pytest.mark.parametrize("vec", INVALID["decrypt"], ids=_ids(INVALID["decrypt"], "note"))
def test_invalid_decrypt(vec: dict[str, str]) -> None:
    # Each note names the failure class ("invalid MAC", "invalid padding", ...);
    # check we reject for that reason, not merely reject.
    keyword = next(k for k in ("version", "base64", "MAC", "padding", "length") if k in vec["note"])
    with pytest.raises(Nip44Error, match=keyword):
        decrypt(vec["payload"], bytes.fromhex(vec["conversation_key"]))


# --- API behaviour beyond the vectors -------------------------------------------------


def _xonly(sec_hex: str) -> str:
    import coincurve

    return coincurve.PrivateKey(bytes.fromhex(sec_hex)).public_key.format(compressed=True)[1:].hex()


def test_encrypt_to_decrypt_from_round_trip_random_nonce() -> None:
    sec1, sec2 = "11" * 32, "22" * 32
    pub1, pub2 = _xonly(sec1), _xonly(sec2)
    payload = encrypt_to(sec1, pub2, "hello DVM 🤖")
    assert payload != encrypt_to(sec1, pub2, "hello DVM 🤖")  # fresh nonce each time
    assert decrypt_from(sec2, pub1, payload) == "hello DVM 🤖"


def test_nip44_error_is_value_error() -> None:
    assert issubclass(Nip44Error, ValueError)


@pytest.mark.parametrize(
    "sec, pub",
    [("zz" * 32, "11" * 32), ("11" * 31, "11" * 32), ("11" * 32, "11" * 33), ("11" * 32, "gg" * 32)],
)
def test_malformed_hex_keys(sec: str, pub: str) -> None:
    with pytest.raises(Nip44Error):
        get_conversation_key(sec, pub)


def test_tampered_payload_fails_mac() -> None:
    key = bytes(range(32))
    payload = bytearray(encrypt("secret", key).encode())
    payload[60] = ord("A") if payload[60] != ord("A") else ord("B")
    with pytest.raises(Nip44Error, match="MAC"):
        decrypt(payload.decode(), key)


def test_bad_conversation_key_and_nonce_sizes() -> None:
    with pytest.raises(Nip44Error):
        encrypt("x", bytes(31))
    with pytest.raises(Nip44Error):
        encrypt("x", bytes(32), bytes(16))
