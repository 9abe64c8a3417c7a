"""The Blossom client (BUD-01, BUD-02): upload to, and manage blobs on, Blossom servers.

What a client and a server share (authorization events, blob descriptors) is in
`dvm_core.protocol.blossom`; `dvm_core.devtools.blobserver` is the embedded server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from dvm_core.protocol.blossom import CHUNK, BlobDescriptor, auth_header, build_auth_event
from dvm_core.protocol.events import Keys


class BlossomError(Exception):
    """A Blossom operation failed. `failures` holds (server, reason) for each server tried."""

    def __init__(self, message: str, failures: list[tuple[str, str]] | None = None):
        self.failures = list(failures or [])
        if self.failures:
            message += ": " + "; ".join(f"{server}: {reason}" for server, reason in self.failures)
        super().__init__(message)


# --- the client -----------------------------------------------------------------------------


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


def _failure_reason(response: httpx.Response) -> str:
    reason = response.headers.get("X-Reason") or response.headers.get("Blossom-Upload-Message")
    if not reason:
        try:
            body = response.json()
            reason = body.get("message") if isinstance(body, dict) else None
        except ValueError:
            reason = None
    if not reason:
        reason = response.text[:200].strip() if response.text else response.reason_phrase
    return f"HTTP {response.status_code}: {reason}"


def _found(response: httpx.Response, what: str, server: str) -> bool:
    """A HEAD or DELETE of one blob: True if done, False if the server has no such blob."""
    if response.status_code == 404:
        return False
    if response.is_success:
        return True
    raise BlossomError(f"{what} failed", [(server, _failure_reason(response))])


class BlossomClient:
    """Upload to, and manage blobs on, Blossom servers, signing BUD-11 authorizations with `keys`.

    Holds no open connections between calls (each operation has its own HTTP client), so it
    needs no closing; `async with` and `close()` are there for symmetry.
    """

    def __init__(self, servers: list[str], keys: Keys, timeout: float = 60):
        self.servers = [s.rstrip("/") for s in servers]
        self.keys = keys
        self.timeout = timeout

    def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> "BlossomClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _auth(self, verb: str, server: str, sha256s=()) -> dict[str, str]:
        event = build_auth_event(self.keys, verb, sha256s=sha256s, server=server)
        return {"Authorization": auth_header(event)}

    async def upload(self, path_or_bytes: str | os.PathLike | bytes,
                     content_type: str = "application/octet-stream") -> BlobDescriptor:
        """Upload a blob to the first server that takes it, trying each in order (see
        `upload_to`)."""
        return (await self.upload_to(path_or_bytes, content_type))[1]

    async def upload_to(self, path_or_bytes: str | os.PathLike | bytes,
                        content_type: str = "application/octet-stream") -> tuple[str, BlobDescriptor]:
        """Upload a blob to the first server that takes it, trying each in order; that server
        (as configured, which the descriptor's URL need not name) and the descriptor.

        A file is hashed first and then streamed from disk, never held in memory. A server
        fails if it cannot be reached, answers an error, or returns a descriptor whose sha256
        or size is not what was sent; the next is tried. If every server fails, BlossomError
        lists each one's reason.
        """
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            data = bytes(path_or_bytes)
            path = None
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
        else:
            data = None
            path = Path(path_or_bytes)
            digest, size = await asyncio.to_thread(_hash_file, path)
        if not self.servers:
            raise BlossomError("no Blossom servers configured")
        failures: list[tuple[str, str]] = []
        async with self._http() as http:
            for server in self.servers:
                result = await self._upload_one(http, server, data, path, digest, size, content_type)
                if isinstance(result, BlobDescriptor):
                    return server, result
                failures.append((server, result))
        raise BlossomError(f"upload of {digest} failed on every server", failures)

    async def _upload_one(self, http: httpx.AsyncClient, server: str, data: bytes | None,
                          path: Path | None, digest: str, size: int,
                          content_type: str) -> BlobDescriptor | str:
        """The descriptor, or why `server` failed."""
        headers = {**self._auth("upload", server, [digest]), "Content-Type": content_type,
                   "Content-Length": str(size), "X-SHA-256": digest}
        content = data if data is not None else _file_chunks(path)
        try:
            response = await http.put(f"{server}/upload", content=content, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}".rstrip(": ")
        finally:
            if data is None:
                await content.aclose()  # the file, when the server stopped reading early
        if not response.is_success:
            return _failure_reason(response)
        try:
            descriptor = BlobDescriptor.from_json(response.json())
        except ValueError as exc:
            return f"bad blob descriptor: {exc}"
        if descriptor.sha256 != digest:
            return f"descriptor sha256 {descriptor.sha256} is not the {digest} sent"
        if descriptor.size != size:
            return f"descriptor size {descriptor.size} is not the {size} bytes sent"
        if digest not in descriptor.url:
            return f"descriptor url {descriptor.url!r} does not name the blob"
        return descriptor

    async def head(self, server: str, sha256: str) -> bool:
        """Whether `server` has the blob (HEAD /<sha256>: 200 yes, 404 no, else BlossomError)."""
        server = server.rstrip("/")
        try:
            async with self._http() as http:
                response = await http.head(f"{server}/{sha256}")
        except httpx.HTTPError as exc:
            raise BlossomError(f"HEAD {sha256} failed", [(server, f"{type(exc).__name__}: {exc}")]) from exc
        return _found(response, f"HEAD {sha256}", server)

    async def list(self, server: str, pubkey: str, *, since: int | None = None,
                   until: int | None = None) -> list[BlobDescriptor]:
        """The blobs `pubkey` uploaded to `server` (GET /list/<pubkey>)."""
        server = server.rstrip("/")
        params = {k: str(v) for k, v in (("since", since), ("until", until)) if v is not None}
        try:
            async with self._http() as http:
                response = await http.get(f"{server}/list/{pubkey}", params=params,
                                          headers=self._auth("list", server))
        except httpx.HTTPError as exc:
            raise BlossomError("list failed", [(server, f"{type(exc).__name__}: {exc}")]) from exc
        if not response.is_success:
            raise BlossomError("list failed", [(server, _failure_reason(response))])
        try:
            items = response.json()
            if not isinstance(items, list):
                raise ValueError("not a JSON array")
            return [BlobDescriptor.from_json(item) for item in items]
        except ValueError as exc:
            raise BlossomError("list failed", [(server, f"bad answer: {exc}")]) from None

    async def delete(self, server: str, sha256: str) -> bool:
        """Delete our blob from `server`: True if deleted, False if the server did not have it.

        The authorization names the blob and this server only, so it cannot be replayed to
        delete the blob elsewhere.
        """
        server = server.rstrip("/")
        try:
            async with self._http() as http:
                response = await http.delete(f"{server}/{sha256}",
                                             headers=self._auth("delete", server, [sha256]))
        except httpx.HTTPError as exc:
            raise BlossomError(f"delete of {sha256} failed", [(server, f"{type(exc).__name__}: {exc}")]) from exc
        return _found(response, f"delete of {sha256}", server)
