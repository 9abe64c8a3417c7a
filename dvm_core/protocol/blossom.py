"""Blossom (BUD-01, BUD-02, BUD-11): content-addressed blob storage over HTTP, authorised by
signed kind-24242 Nostr events.

Datasets and model weights never travel inside Nostr events: they are uploaded to Blossom
servers and referred to by URL and sha256. This module holds what a client and a server share,
pure: building, encoding and checking authorization events, and blob descriptors. The client is
`dvm_core.transport.blossom`; `dvm_core.devtools.blobserver` is the embedded server.

Authorization (BUD-11, formerly in BUD-01): a kind-24242 event with a `t` tag naming the verb
(`get`, `upload`, `list`, `delete`, `media`), a NIP-40 `expiration` tag, optional `x` tags (the
sha256 of the blobs it covers) and optional `server` tags (the domains it is valid on), sent as
`Authorization: Nostr <base64 of the event's JSON>`. We send standard padded base64, which every
server decodes, and accept both standard and URL-safe base64, padded or not.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from dvm_core.protocol.events import InvalidEvent, Keys, sign_event, verify_event

AUTH_KIND = 24242
VERBS = ("get", "upload", "list", "delete", "media")
# How far in the future an authorization's created_at may be (clock skew between machines).
CLOCK_SKEW = 60
# An Authorization header bigger than this is refused before decoding.
MAX_AUTH_HEADER = 16 * 1024
CHUNK = 1024 * 1024

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlossomAuthError(Exception):
    """An authorization event or header was refused; `reason` says why (for the X-Reason)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


# --- authorization events -----------------------------------------------------------------


def server_domain(server: str) -> str:
    """The lowercase host a `server` tag names: `https://cdn.example.com/` -> `cdn.example.com`.

    BUD-11 puts a bare domain in the tag; older BUD-01 examples put the full URL, so both are read.
    """
    server = server.strip()
    host = urlsplit(server).hostname if "://" in server else urlsplit("//" + server).hostname
    return (host or "").lower()


def build_auth_event(keys: Keys, verb: str, *, sha256s=(), content: str = "", expires_in: int = 300,
                     server: str | None = None, created_at: int | None = None) -> dict:
    """A signed kind-24242 authorization for `verb`, covering the blobs `sha256s` (the `x` tags),
    valid for `expires_in` seconds, and, with `server`, only on that server (a `server` tag with
    its domain; a URL is reduced to its host)."""
    if verb not in VERBS:
        raise ValueError(f"unknown Blossom verb {verb!r} (one of {', '.join(VERBS)})")
    if isinstance(sha256s, str):
        sha256s = (sha256s,)
    created_at = int(time.time()) if created_at is None else int(created_at)
    tags = [["t", verb]]
    for digest in sha256s:
        digest = digest.lower()
        if not is_sha256(digest):
            raise ValueError(f"not a sha256 hex digest: {digest[:70]!r}")
        tags.append(["x", digest])
    if server:
        domain = server_domain(server)
        if not domain:
            raise ValueError(f"no host in server {server!r}")
        tags.append(["server", domain])
    tags.append(["expiration", str(created_at + int(expires_in))])
    if not content:
        content = f"{verb.capitalize()} Blob" if len(sha256s) <= 1 else f"{verb.capitalize()} Blobs"
    return sign_event(keys, AUTH_KIND, content, tags, created_at=created_at)


def auth_header(event: dict) -> str:
    """The `Authorization` header value for `event`: `Nostr <base64 of its JSON>`."""
    raw = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    return "Nostr " + base64.b64encode(raw).decode("ascii")


def parse_auth_header(value: str | None) -> dict:
    """Decode an `Authorization: Nostr <base64>` header and verify the event's id and signature.

    Returns the event; raises BlossomAuthError. Only the encoding and the signature are checked
    here: what the event allows is `check_auth`'s business.
    """
    if not value:
        raise BlossomAuthError("missing Authorization header")
    if len(value) > MAX_AUTH_HEADER:
        raise BlossomAuthError("Authorization header too large")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "nostr":
        raise BlossomAuthError("Authorization scheme must be 'Nostr'")
    token = token.strip()
    if not token:
        raise BlossomAuthError("empty Nostr authorization")
    try:
        # Standard or URL-safe alphabet, padding optional (BUD-11 prose says base64url without
        # padding; its example and most clients send standard padded base64).
        token = token.rstrip("=").replace("-", "+").replace("_", "/")
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BlossomAuthError("authorization is not valid base64") from None
    try:
        event = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BlossomAuthError("authorization is not a JSON event") from None
    try:
        return verify_event(event)
    except InvalidEvent as exc:
        raise BlossomAuthError(f"authorization event rejected: {exc}") from None


def _tag_values(event: dict, name: str) -> list[str]:
    return [t[1] for t in event.get("tags", []) if len(t) >= 2 and t[0] == name]


def check_auth(event: dict, verb: str, sha256: str | None = None, now: float | None = None, *,
               require_x: bool = False, servers=None, skew: int = CLOCK_SKEW) -> dict:
    """Check that a (signature-verified) authorization event allows `verb`, in BUD-11's order:
    kind 24242; `created_at` not in the future (beyond `skew` seconds); an `expiration` in the
    future; a `t` tag equal to `verb`; with `sha256`, an `x` tag equal to it; with `require_x`,
    at least one `x` tag; with `servers` (the domains or URLs of this server), a `server` tag,
    if the event has any, naming one of them. Returns the event; raises BlossomAuthError.
    """
    now = time.time() if now is None else now
    if event.get("kind") != AUTH_KIND:
        raise BlossomAuthError(f"authorization must be kind {AUTH_KIND}, not {event.get('kind')!r}")
    created_at = event.get("created_at")
    if not isinstance(created_at, int) or created_at > now + skew:
        raise BlossomAuthError("authorization created_at is in the future")
    expirations = _tag_values(event, "expiration")
    if not expirations:
        raise BlossomAuthError("authorization has no expiration tag")
    try:
        expiration = int(expirations[0])
    except ValueError:
        raise BlossomAuthError("authorization expiration is not a unix timestamp") from None
    if expiration <= now:
        raise BlossomAuthError("authorization has expired")
    verbs = _tag_values(event, "t")
    if verb not in verbs:
        found = ", ".join(repr(v) for v in verbs) or "none"
        raise BlossomAuthError(f"authorization is not for {verb!r} (t tag: {found})")
    hashes = [x.lower() for x in _tag_values(event, "x")]
    if require_x and not hashes:
        raise BlossomAuthError(f"authorization for {verb!r} must name the blob in an x tag")
    if sha256 is not None and sha256.lower() not in hashes:
        raise BlossomAuthError(f"authorization does not cover blob {sha256} (no matching x tag)")
    scoped = {server_domain(s) for s in _tag_values(event, "server")}
    if servers is not None and scoped:
        mine = {server_domain(s) for s in servers} - {""}
        if not scoped & mine:
            raise BlossomAuthError("authorization is for another server (server tag)")
    return event


# --- blob descriptors ---------------------------------------------------------------------


@dataclass
class BlobDescriptor:
    """BUD-02 blob descriptor: where a blob is, its sha256, size, MIME type, upload time."""

    url: str
    sha256: str
    size: int
    type: str = "application/octet-stream"
    uploaded: int = 0

    @classmethod
    def from_json(cls, data: object) -> "BlobDescriptor":
        """Read a descriptor as a server sent it; raises ValueError if it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("blob descriptor is not a JSON object")
        url, digest, size = data.get("url"), data.get("sha256"), data.get("size")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError("blob descriptor has no http(s) url")
        if not isinstance(digest, str) or not is_sha256(digest.lower()):
            raise ValueError("blob descriptor has no valid sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("blob descriptor has no valid size")
        mime = data.get("type")
        uploaded = data.get("uploaded")
        return cls(
            url=url, sha256=digest.lower(), size=size,
            type=mime if isinstance(mime, str) and mime else "application/octet-stream",
            uploaded=uploaded if isinstance(uploaded, int) and not isinstance(uploaded, bool) else 0,
        )

    def to_json(self) -> dict:
        return {"url": self.url, "sha256": self.sha256, "size": self.size, "type": self.type,
                "uploaded": self.uploaded}


