"""An embedded Blossom server (BUD-01 retrieval, BUD-02 upload/list/delete, BUD-11 authorization)
on aiohttp, storing blobs on disk.

Layout of `directory`:

    blobs/<sha256>     the blobs, each verified before it lands here (atomic rename)
    tmp/               uploads in progress; emptied at start, never served
    index.sqlite3      sizes, MIME types, and who uploaded what, when

An upload is streamed to `tmp/` while its sha256 and size are computed; it is moved into
`blobs/` only once the hash matches the `x` tag of the uploader's authorization (and the
`X-SHA-256` header, when sent) and the size is within the limit. A rejected or interrupted
upload leaves nothing behind. Several pubkeys may upload the same blob; a delete removes the
deleter's claim, and the blob goes once nobody claims it.

Errors are answered with the status, an `X-Reason` header and a JSON `{"message": ...}` body.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import mimetypes
import os
import re
import secrets
import signal
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from dvm_core.protocol.blossom import (
    BlobDescriptor, BlossomAuthError, _tag_values, check_auth, is_sha256, parse_auth_header,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 * 1024**3
DEFAULT_PORT = 24242
CHUNK = 1024 * 1024
_BLOB_NAME = re.compile(r"([0-9a-fA-F]{64})(\.[A-Za-z0-9]{1,16})?")
_MIME = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}"
                   r"(\s*;\s*[A-Za-z0-9!#$&^_.+-]{1,64}=(\"[^\"\\\r\n]{0,64}\"|[A-Za-z0-9!#$&^_.+-]{1,64}))*")
from dvm_core.protocol.events import HEX64 as _HEX64  # noqa: E402
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "*",
}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Headers": "Authorization, *",
    "Access-Control-Allow-Methods": "GET, HEAD, PUT, DELETE",
    "Access-Control-Max-Age": "86400",
}


class BlobStore:
    """Blobs on disk named by sha256, with an SQLite index of their metadata and uploaders."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.blobs = self.directory / "blobs"
        self.tmp = self.directory / "tmp"
        for d in (self.directory, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # uploads cut short by a crash: never complete
            leftover.unlink(missing_ok=True)
        self.db = sqlite3.connect(self.directory / "index.sqlite3", isolation_level=None)
        self.db.executescript("""
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS blobs (
                sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, type TEXT NOT NULL,
                uploaded INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS uploads (
                sha256 TEXT NOT NULL, pubkey TEXT NOT NULL, uploaded INTEGER NOT NULL,
                PRIMARY KEY (sha256, pubkey));
            CREATE INDEX IF NOT EXISTS uploads_by_pubkey ON uploads (pubkey, uploaded);
        """)

    def close(self) -> None:
        self.db.close()

    def path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def get(self, sha256: str) -> tuple[int, str, int] | None:
        """(size, type, uploaded) of a stored blob, or None."""
        row = self.db.execute("SELECT size, type, uploaded FROM blobs WHERE sha256 = ?",
                              (sha256,)).fetchone()
        if row is None or not self.path(sha256).is_file():
            return None
        return row

    def new_temp(self) -> Path:
        return self.tmp / f"{secrets.token_hex(16)}.part"

    def install(self, temp: Path, sha256: str, size: int, mime: str, pubkey: str) -> int:
        """Move a verified upload into the store and record `pubkey` as an uploader; returns the
        upload time. Called with no await in between, so it is atomic on the event loop."""
        now = int(time.time())
        row = self.db.execute("SELECT uploaded FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        if row is not None and self.path(sha256).is_file():
            temp.unlink(missing_ok=True)
        else:
            os.replace(temp, self.path(sha256))
            self.db.execute("INSERT OR REPLACE INTO blobs (sha256, size, type, uploaded) "
                            "VALUES (?, ?, ?, ?)", (sha256, size, mime, now))
        self.db.execute("INSERT OR IGNORE INTO uploads (sha256, pubkey, uploaded) VALUES (?, ?, ?)",
                        (sha256, pubkey, now))
        return self.db.execute("SELECT uploaded FROM uploads WHERE sha256 = ? AND pubkey = ?",
                               (sha256, pubkey)).fetchone()[0]

    def uploaders(self, sha256: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT pubkey FROM uploads WHERE sha256 = ?", (sha256,))}

    def remove(self, sha256: str, pubkey: str) -> bool:
        """Drop `pubkey`'s claim on the blob; the blob itself goes once nobody claims it.
        Returns whether the blob was removed from disk."""
        self.db.execute("DELETE FROM uploads WHERE sha256 = ? AND pubkey = ?", (sha256, pubkey))
        if self.uploaders(sha256):
            return False
        self.db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
        self.path(sha256).unlink(missing_ok=True)
        return True

    def list(self, pubkey: str, since: int | None = None, until: int | None = None):
        """(sha256, size, type, uploaded) of `pubkey`'s blobs, newest first."""
        query = ("SELECT b.sha256, b.size, b.type, u.uploaded FROM uploads u "
                 "JOIN blobs b ON b.sha256 = u.sha256 WHERE u.pubkey = ?")
        args: list = [pubkey]
        if since is not None:
            query += " AND u.uploaded >= ?"
            args.append(since)
        if until is not None:
            query += " AND u.uploaded <= ?"
            args.append(until)
        return self.db.execute(query + " ORDER BY u.uploaded DESC, b.sha256", args).fetchall()


def _error(status: int, reason: str) -> web.Response:
    header = reason.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")[:500]
    return web.json_response({"message": reason}, status=status, headers={"X-Reason": header})


def _extension(mime: str) -> str:
    essence = mime.split(";", 1)[0].strip().lower()
    return mimetypes.guess_extension(essence) or ".bin"


def _parse_blob_name(name: str) -> str | None:
    m = _BLOB_NAME.fullmatch(name)
    return m.group(1).lower() if m else None


@dataclass
class BlobServer:
    """A running embedded Blossom server: `url` is where it answers; `await stop()` ends it."""

    store: BlobStore
    max_bytes: int
    allowed_pubkeys: frozenset[str] | None
    public_url: str | None
    url: str = ""
    host: str = ""
    _runner: web.AppRunner | None = field(default=None, repr=False)

    @property
    def directory(self) -> Path:
        return self.store.directory

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            self.store.close()

    # --- helpers --------------------------------------------------------------------------

    def _base_url(self, request: web.Request) -> str:
        if self.public_url:
            return self.public_url
        if _is_wildcard(self.host):
            return f"{request.scheme}://{request.host}"
        return self.url

    def _names(self, request: web.Request) -> set[str]:
        """The names a `server` tag may give for this server."""
        names = {urlsplit(self.url).hostname or ""}
        if self.public_url:
            names.add(urlsplit(self.public_url).hostname or "")
        if _is_loopback(self.host):
            names.add("localhost")
        if _is_wildcard(self.host) and not self.public_url:
            # We do not know our public name: take the one the client used (set public_url
            # to stop a token scoped to another server being replayed here under its name).
            names.add(request.url.host or "")
        return {n.lower() for n in names if n}

    def _authorize(self, request: web.Request, verb: str, sha256: str | None = None, *,
                   require_x: bool = False) -> dict:
        event = parse_auth_header(request.headers.get("Authorization"))
        return check_auth(event, verb, sha256, require_x=require_x, servers=self._names(request))

    def _descriptor(self, request: web.Request, sha256: str, size: int, mime: str,
                    uploaded: int) -> dict:
        url = f"{self._base_url(request).rstrip('/')}/{sha256}{_extension(mime)}"
        return BlobDescriptor(url, sha256, size, mime, uploaded).to_json()

    # --- handlers -------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text="Blossom server (BUD-01, BUD-02)\n")

    async def get_blob(self, request: web.Request) -> web.StreamResponse:
        sha256 = _parse_blob_name(request.match_info["name"])
        if sha256 is None:
            return _error(404, "not found (expected /<sha256>[.ext])")
        meta = self.store.get(sha256)
        if meta is None:
            return _error(404, "blob not found")
        _, mime, _ = meta
        return web.FileResponse(self.store.path(sha256), headers={
            "Content-Type": mime, "Cache-Control": "public, max-age=31536000, immutable",
        })

    async def upload(self, request: web.Request) -> web.Response:
        try:
            event = self._authorize(request, "upload", require_x=True)
        except BlossomAuthError as exc:
            return _error(401, exc.reason)
        pubkey = event["pubkey"]
        if self.allowed_pubkeys is not None and pubkey not in self.allowed_pubkeys:
            return _error(403, "this pubkey may not upload to this server")
        covered = {x.lower() for x in _tag_values(event, "x")}
        declared = request.headers.get("X-SHA-256")
        if declared is not None:
            declared = declared.strip().lower()
            if not is_sha256(declared):
                return _error(400, "X-SHA-256 is not a sha256 hex digest")
            if declared not in covered:
                return _error(401, f"authorization does not cover blob {declared} (no matching x tag)")
        if request.content_length is not None and request.content_length > self.max_bytes:
            return _error(413, f"blob too large: {request.content_length} bytes, "
                               f"the limit is {self.max_bytes}")
        raw_type = request.headers.get("Content-Type", "").strip()
        mime = raw_type if raw_type and _MIME.fullmatch(raw_type) else "application/octet-stream"

        temp = self.store.new_temp()
        digest, size = hashlib.sha256(), 0
        try:
            with open(temp, "wb") as f:
                async for chunk in request.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        return _error(413, f"blob too large: the limit is {self.max_bytes} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                await asyncio.to_thread(_flush_sync, f)
            sha256 = digest.hexdigest()
            if declared is not None and sha256 != declared:
                return _error(409, f"body sha256 {sha256} is not the X-SHA-256 {declared}")
            if sha256 not in covered:
                return _error(401, f"authorization does not cover blob {sha256} (no matching x tag)")
            uploaded = self.store.install(temp, sha256, size, mime, pubkey)
        except OSError as exc:
            log.exception("blob upload failed")
            return _error(507 if getattr(exc, "errno", None) == 28 else 500,
                          f"could not store the blob: {exc.strerror or exc}")
        finally:
            temp.unlink(missing_ok=True)  # gone already when installed
        size, mime, _ = self.store.get(sha256) or (size, mime, uploaded)
        log.info("blob stored", extra={"sha256": sha256, "size": size, "pubkey": pubkey})
        return web.json_response(self._descriptor(request, sha256, size, mime, uploaded), headers=CORS)

    async def list_blobs(self, request: web.Request) -> web.Response:
        pubkey = request.match_info["pubkey"].lower()
        if not _HEX64.fullmatch(pubkey):
            return _error(400, "pubkey must be 64 hex characters")
        bounds = {}
        for name in ("since", "until"):
            value = request.query.get(name)
            if value is not None:
                try:
                    bounds[name] = int(value)
                except ValueError:
                    return _error(400, f"{name} must be a unix timestamp")
        rows = self.store.list(pubkey, bounds.get("since"), bounds.get("until"))
        return web.json_response([self._descriptor(request, *row) for row in rows])

    async def delete(self, request: web.Request) -> web.Response:
        sha256 = _parse_blob_name(request.match_info["name"])
        if sha256 is None:
            return _error(404, "not found (expected /<sha256>)")
        try:
            event = self._authorize(request, "delete", sha256)
        except BlossomAuthError as exc:
            return _error(401, exc.reason)
        if self.store.get(sha256) is None:
            return _error(404, "blob not found")
        if event["pubkey"] not in self.store.uploaders(sha256):
            return _error(403, "only the uploader may delete this blob")
        self.store.remove(sha256, event["pubkey"])
        return web.json_response({"message": "deleted", "sha256": sha256})


def _flush_sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def _cors_and_errors(request: web.Request, handler):
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=PREFLIGHT)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    for name, value in CORS.items():
        response.headers.setdefault(name, value)
    return response


def make_app(server: BlobServer) -> web.Application:
    app = web.Application(middlewares=[_cors_and_errors])
    app.router.add_get("/", server.index)
    app.router.add_put("/upload", server.upload)
    app.router.add_get("/list/{pubkey}", server.list_blobs)
    app.router.add_get("/{name}", server.get_blob)  # HEAD too
    app.router.add_delete("/{name}", server.delete)
    return app


async def start_blob_server(directory: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                            max_bytes: int = DEFAULT_MAX_BYTES,
                            allowed_pubkeys: Iterable[str] | None = None,
                            public_url: str | None = None) -> BlobServer:
    """Start a Blossom server storing blobs in `directory`; returns once it listens.

    `port=0` picks a free port (see `.url`). `max_bytes` caps a blob's size (413 beyond it);
    `allowed_pubkeys`, if given, are the only hex pubkeys that may upload (403 for others);
    `public_url` is the base of the URLs in blob descriptors (default: the address it listens
    on) and the name it answers to in `server` tags.
    """
    allowed = None if allowed_pubkeys is None else frozenset(p.lower() for p in allowed_pubkeys)
    server = BlobServer(store=BlobStore(directory), max_bytes=int(max_bytes), allowed_pubkeys=allowed,
                        public_url=public_url.rstrip("/") if public_url else None, host=host)
    runner = web.AppRunner(make_app(server), shutdown_timeout=5.0, lingering_time=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        server.store.close()
        raise
    server._runner = runner
    bound_port = runner.addresses[0][1]
    shown = host if host and not _is_wildcard(host) else "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    server.url = f"http://{shown}:{bound_port}"
    return server


def serve(directory: str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
          max_bytes: int = DEFAULT_MAX_BYTES, allowed_pubkeys: Iterable[str] | None = None,
          public_url: str | None = None) -> None:
    """Run a Blossom server until SIGINT or SIGTERM (for `dvm blobs serve`)."""

    async def main() -> None:
        server = await start_blob_server(directory, host, port, max_bytes=max_bytes,
                                         allowed_pubkeys=allowed_pubkeys, public_url=public_url)
        print(f"Blossom server on {server.url} (blobs in {Path(directory).resolve()})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())
