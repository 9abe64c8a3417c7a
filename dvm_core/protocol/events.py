"""Nostr events (NIP-01): ids, signatures, keys. Pure: no I/O.

Events are plain dicts with the seven NIP-01 fields, exactly as they travel on the wire.
pynostr supplies the key encodings (hex, nsec/npub); signing and verifying go straight to
coincurve because the worker does both for every event it sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass

import coincurve
from pynostr.key import PrivateKey, PublicKey

# fullmatch, never match: "$" also matches before a trailing newline
HEX64 = re.compile(r"[0-9a-f]{64}")   # ids, keys, hashes (used with fullmatch)
_HEX64 = HEX64
_HEX128 = re.compile(r"[0-9a-f]{128}")


class InvalidEvent(ValueError):
    """An event that is malformed, or whose id or signature does not check out."""


@dataclass(frozen=True)
class Keys:
    """A Nostr key pair; `private_key` and `public_key` are lowercase hex (x-only public key)."""

    private_key: str
    public_key: str

    @classmethod
    def generate(cls) -> "Keys":
        return cls.from_secret(os.urandom(32).hex())

    @classmethod
    def from_secret(cls, secret: str) -> "Keys":
        """Accept an `nsec1…` string or 64 hex characters."""
        secret = secret.strip()
        if secret.startswith("nsec1"):
            try:
                sk = PrivateKey.from_nsec(secret)
            except Exception:  # pynostr fails with assorted types on a mistyped bech32 string
                raise ValueError("not a valid nsec1… key (mistyped?)") from None
        elif _HEX64.fullmatch(secret.lower()):
            sk = PrivateKey.from_hex(secret.lower())
        else:
            raise ValueError("a private key must be an nsec1… string or 64 hex characters")
        return cls(private_key=sk.hex(), public_key=sk.public_key.hex())

    @property
    def npub(self) -> str:
        return PublicKey.from_hex(self.public_key).bech32()

    @property
    def nsec(self) -> str:
        return PrivateKey.from_hex(self.private_key).bech32()

    def __repr__(self) -> str:  # never show the secret, even by accident in a log or traceback
        return f"Keys(npub={self.npub})"


def parse_public_key(value: str) -> str:
    """Return a hex public key from an `npub1…` string or 64 hex characters."""
    value = value.strip()
    if value.startswith("npub1"):
        try:
            return PublicKey.from_npub(value).hex()
        except Exception:
            raise ValueError(f"not a valid npub: {value[:20]!r}") from None
    if _HEX64.fullmatch(value.lower()):
        return value.lower()
    raise ValueError(f"not a public key: {value[:20]!r}")


def serialize_for_id(pubkey: str, created_at: int, kind: int, tags: list, content: str) -> bytes:
    return json.dumps(
        [0, pubkey, created_at, kind, tags, content], separators=(",", ":"), ensure_ascii=False
    ).encode()


def compute_event_id(pubkey: str, created_at: int, kind: int, tags: list, content: str) -> str:
    return hashlib.sha256(serialize_for_id(pubkey, created_at, kind, tags, content)).hexdigest()


def sign_event(
    keys: Keys, kind: int, content: str = "", tags: list[list[str]] | None = None,
    created_at: int | None = None,
) -> dict:
    """Build and sign an event; returns the wire dict."""
    tags = [list(map(str, t)) for t in (tags or [])]
    created_at = int(time.time()) if created_at is None else int(created_at)
    event_id = compute_event_id(keys.public_key, created_at, kind, tags, content)
    sig = _private_key(keys.private_key).sign_schnorr(bytes.fromhex(event_id))
    return {
        "id": event_id, "pubkey": keys.public_key, "created_at": created_at, "kind": kind,
        "tags": tags, "content": content, "sig": sig.hex(),
    }


def verify_event(event: object) -> dict:
    """Check an event's shape, that its id is the hash of its fields, and its signature.

    Returns the event; raises InvalidEvent with the reason. The id on the wire is compared with
    the one computed, so an event cannot be relabelled under another id.
    """
    if not isinstance(event, dict):
        raise InvalidEvent("event is not a JSON object")
    for field, typ in (("id", str), ("pubkey", str), ("created_at", int), ("kind", int),
                       ("tags", list), ("content", str), ("sig", str)):
        value = event.get(field)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise InvalidEvent(f"field {field!r} missing or not a {typ.__name__}")
    if not _HEX64.fullmatch(event["id"]) or not _HEX64.fullmatch(event["pubkey"]):
        raise InvalidEvent("id and pubkey must be 64 lowercase hex characters")
    if not _HEX128.fullmatch(event["sig"]):
        raise InvalidEvent("sig must be 128 lowercase hex characters")
    for tag in event["tags"]:
        if not isinstance(tag, list) or not all(isinstance(x, str) for x in tag):
            raise InvalidEvent("every tag must be a list of strings")
    try:
        expected = compute_event_id(
            event["pubkey"], event["created_at"], event["kind"], event["tags"], event["content"]
        )
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: not valid UTF-8 text
        raise InvalidEvent("event text is not valid Unicode") from None
    if expected != event["id"]:
        raise InvalidEvent("id does not match the event's content")
    try:
        ok = coincurve.PublicKeyXOnly(bytes.fromhex(event["pubkey"])).verify(
            bytes.fromhex(event["sig"]), bytes.fromhex(event["id"])
        )
    except (ValueError, TypeError) as exc:
        raise InvalidEvent(f"bad public key or signature: {exc}") from None
    if not ok:
        raise InvalidEvent("invalid signature")
    return event


_key_cache: dict[str, coincurve.PrivateKey] = {}


def _private_key(hex_key: str) -> coincurve.PrivateKey:
    key = _key_cache.get(hex_key)
    if key is None:
        key = _key_cache[hex_key] = coincurve.PrivateKey(bytes.fromhex(hex_key))
    return key
