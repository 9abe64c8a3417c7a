"""NIP-04 wrapper: round trips against pynostr keys and normalised errors."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pynostr.key import PrivateKey

from dvm_core.protocol.nip04 import Nip04Error, decrypt_from, encrypt_to, looks_like_nip04

ALICE = PrivateKey(bytes.fromhex("11" * 32))
BOB = PrivateKey(bytes.fromhex("22" * 32))
IV = bytes(range(16))


def _raw_payload(plaintext_padded: bytes, iv: bytes = IV) -> str:
    """Build a NIP-04 payload from already-padded bytes, bypassing pynostr's padder."""
    key = ALICE.compute_shared_secret(BOB.public_key.hex())
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(plaintext_padded) + enc.finalize()
    return f"{base64.b64encode(ct).decode()}?iv={base64.b64encode(iv).decode()}"


def _pkcs7(data: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    return padder.update(data) + padder.finalize()


def _bob_decrypts(payload: str) -> str:
    return decrypt_from(BOB.hex(), ALICE.public_key.hex(), payload)


@pytest.mark.parametrize(
    "text",
    ["hello", "x" * 1000, "🍕🫃 emoji", "表ポあA鷗ŒéＢ逍Üßªąñ丂㐀𠀀", "( ͡° ͜ʖ ͡°)", '{"kind": 5100, "tags": []}'],
)
def test_round_trip_both_directions(text: str) -> None:
    to_bob = encrypt_to(ALICE.hex(), BOB.public_key.hex(), text)
    assert looks_like_nip04(to_bob)
    assert decrypt_from(BOB.hex(), ALICE.public_key.hex(), to_bob) == text

    to_alice = encrypt_to(BOB.hex(), ALICE.public_key.hex(), text)
    assert decrypt_from(ALICE.hex(), BOB.public_key.hex(), to_alice) == text


def test_interoperates_with_pynostr_directly() -> None:
    payload = ALICE.encrypt_message("from pynostr 🚀", BOB.public_key.hex())
    assert _bob_decrypts(payload) == "from pynostr 🚀"
    ours = encrypt_to(BOB.hex(), ALICE.public_key.hex(), "from dvm_core 🚀")
    assert ALICE.decrypt_message(ours, BOB.public_key.hex()) == "from dvm_core 🚀"


def test_raw_helper_matches_wrapper() -> None:
    assert _bob_decrypts(_raw_payload(_pkcs7("ok".encode()))) == "ok"


def test_looks_like_nip04() -> None:
    assert looks_like_nip04("abc?iv=def")
    assert not looks_like_nip04("AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    assert not looks_like_nip04("")


def test_error_is_value_error() -> None:
    assert issubclass(Nip04Error, ValueError)


GOOD = _raw_payload(_pkcs7(b"hello"))
GOOD_CT, GOOD_IV = GOOD.split("?iv=")


@pytest.mark.parametrize(
    "payload, match",
    [
        pytest.param(GOOD_CT, "missing '\\?iv='", id="missing-iv"),
        pytest.param("", "missing", id="empty"),
        pytest.param(f"{GOOD}?iv={GOOD_IV}", "exactly one", id="two-ivs"),
        pytest.param(f"{GOOD_CT}!!?iv={GOOD_IV}", "base64", id="bad-base64-content"),
        pytest.param(f"{GOOD_CT}?iv={GOOD_IV[:-2]}", "base64", id="bad-base64-iv-padding"),
        pytest.param(f"{GOOD_CT}?iv=%%%%", "base64", id="bad-base64-iv-chars"),
        pytest.param(f"{GOOD_CT}?iv={base64.b64encode(bytes(12)).decode()}", "iv must be 16", id="short-iv"),
        pytest.param(f"{GOOD_CT}?iv={base64.b64encode(bytes(32)).decode()}", "iv must be 16", id="long-iv"),
        pytest.param(f"?iv={GOOD_IV}", "multiple of 16", id="empty-ciphertext"),
        pytest.param(f"{base64.b64encode(bytes(20)).decode()}?iv={GOOD_IV}", "multiple of 16", id="partial-block"),
        pytest.param(_raw_payload(b"hello" + b"\x00" * 11), "padding", id="bad-padding-zero"),
        pytest.param(_raw_payload(b"hello" + b"\x11" * 11), "padding", id="bad-padding-too-long"),
        pytest.param(_raw_payload(_pkcs7(b"\xff\xfe\xfd")), "UTF-8", id="non-utf8"),
    ],
)
def test_malformed_payload_raises(payload: str, match: str) -> None:
    with pytest.raises(Nip04Error, match=match):
        _bob_decrypts(payload)


def test_non_str_payload() -> None:
    with pytest.raises(Nip04Error):
        _bob_decrypts(b"abc?iv=def")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sec, pub",
    [
        pytest.param("zz" * 32, "22" * 32, id="priv-not-hex"),
        pytest.param("11" * 31, "22" * 32, id="priv-short"),
        pytest.param("00" * 32, "22" * 32, id="priv-zero"),
        pytest.param("ff" * 32, "22" * 32, id="priv-over-n"),
        pytest.param("11" * 32, "ff" * 32, id="pub-not-on-curve"),
        pytest.param("11" * 32, "gg" * 32, id="pub-not-hex"),
        pytest.param("11" * 32, "", id="pub-empty"),
    ],
)
def test_bad_keys_raise(sec: str, pub: str) -> None:
    with pytest.raises(Nip04Error):
        encrypt_to(sec, pub, "hi")
    with pytest.raises(Nip04Error):
        decrypt_from(sec, pub, GOOD)


def test_unencodable_plaintext() -> None:
    with pytest.raises(Nip04Error, match="UTF-8"):
        encrypt_to(ALICE.hex(), BOB.public_key.hex(), "lone surrogate \ud800")
