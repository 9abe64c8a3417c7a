"""References to data that travels outside events: a URL plus the sha256 of what it serves.

A job input of type `url` must say which bytes it means, so a provider can verify them and a
mirror can serve them:

- a Blossom URL names its blob by hash already: `https://blossom.example/<sha256>[.ext]`;
- any other URL carries the hash in its fragment: `https://host/data.npz#sha256=<hex>`.

A private dataset is encrypted before upload (see `blobcrypt.py`); its key rides in the same
fragment, `#sha256=<hex>&key=<key>`, which only ever appears inside an encrypted request (the
fragment is never sent to the server). The sha256 is the hash of the bytes as stored, that is
of the ciphertext for an encrypted blob. Pure but for `sha256_file`, which hashes a local file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .protocol.events import HEX64 as _HEX64


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """The sha256 of a file as 64 lowercase hex digits, read in chunks (any size of file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class DataRef:
    url: str               # what to GET (no fragment)
    sha256: str            # of the bytes the URL serves
    key: str | None = None  # blobcrypt key, when those bytes are encrypted

    def to_url(self) -> str:
        fragment = {"sha256": self.sha256}
        if self.key:
            fragment["key"] = self.key
        return f"{self.url}#{urlencode(fragment)}"


def parse_data_ref(text: str) -> DataRef:
    """Read a data URL; raises ValueError with a message for the customer."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"a data URL must be http:// or https://, got {text[:60]!r}")
    fragment = dict(parse_qsl(parts.fragment)) if parts.fragment else {}
    sha = fragment.get("sha256", "").lower()
    if not sha:
        last = parts.path.rsplit("/", 1)[-1].split(".", 1)[0].lower()
        if _HEX64.fullmatch(last):
            sha = last
    if not _HEX64.fullmatch(sha):
        raise ValueError("give the sha256 of the data: a Blossom URL (…/<sha256>) or "
                         "#sha256=<64 hex> at the end of the URL")
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
    return DataRef(url=url, sha256=sha, key=fragment.get("key") or None)
