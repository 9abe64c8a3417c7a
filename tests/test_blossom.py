"""Blossom: the embedded server (dvm_core.devtools.blobserver) and the client (dvm_core.transport.blossom), over
real HTTP on loopback.

The spec-only tests speak BUD-01/02/11 with raw httpx and Authorization headers built here by
hand from the spec (a signed kind-24242 event, its JSON base64-encoded after `Nostr `), so the
server is checked against the spec rather than against our own client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time

import httpx
import pytest
from aiohttp import web

from dvm_core.devtools.blobserver import start_blob_server
from dvm_core.protocol.blossom import (
    BlobDescriptor, BlossomAuthError, auth_header, build_auth_event, check_auth, parse_auth_header,
)
from dvm_core.transport.blossom import BlossomClient, BlossomError
from dvm_core.protocol.events import Keys, sign_event
from dvm_core.devtools.localnet import free_port, start_blob_server_process

pytestmark = pytest.mark.timeout(60)

MAX = 64 * 1024  # the small server's limit


def spec_header(keys: Keys, verb: str, *xs: str, kind: int = 24242, expires_in: int = 600,
                created_at: int | None = None, extra_tags=(), drop_expiration: bool = False) -> str:
    """An Authorization header made from the spec alone (BUD-11), not with dvm_core.protocol.blossom."""
    now = int(time.time())
    tags = [["t", verb]] + [["x", x] for x in xs] + [list(t) for t in extra_tags]
    if not drop_expiration:
        tags.append(["expiration", str(now + expires_in)])
    event = sign_event(keys, kind, f"{verb} blob", tags, created_at=created_at)
    return "Nostr " + base64.b64encode(json.dumps(event).encode()).decode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_files(server) -> tuple[list[str], list[str]]:
    return (sorted(p.name for p in (server.directory / "blobs").iterdir()),
            sorted(p.name for p in (server.directory / "tmp").iterdir()))


@pytest.fixture
async def server(tmp_path):
    s = await start_blob_server(tmp_path / "store", max_bytes=64 * 1024 * 1024)
    yield s
    await s.stop()


@pytest.fixture
async def small_server(tmp_path):
    s = await start_blob_server(tmp_path / "small", max_bytes=MAX)
    yield s
    await s.stop()


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


# --- (a) a client that speaks only the spec ------------------------------------------------


async def test_spec_client_upload_head_get_list_delete(server, http):
    keys = Keys.generate()
    body = os.urandom(200_000)
    digest = sha(body)
    r = await http.put(f"{server.url}/upload", content=body, headers={
        "Authorization": spec_header(keys, "upload", digest), "Content-Type": "text/csv"})
    assert r.status_code == 200, r.headers.get("X-Reason")
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    desc = r.json()
    assert set(desc) >= {"url", "sha256", "size", "type", "uploaded"}
    assert desc["sha256"] == digest and desc["size"] == len(body) and desc["type"] == "text/csv"
    assert desc["url"] == f"{server.url}/{digest}.csv"
    assert abs(desc["uploaded"] - time.time()) < 60

    for path in (digest, f"{digest}.csv", f"{digest}.pdf"):  # any extension is ignored
        h = await http.head(f"{server.url}/{path}")
        assert h.status_code == 200
        assert h.headers["Content-Length"] == str(len(body))
        assert h.headers["Content-Type"].startswith("text/csv")
        assert h.content == b""
    g = await http.get(desc["url"])
    assert g.status_code == 200 and g.content == body and sha(g.content) == digest
    assert g.headers["Content-Type"].startswith("text/csv")

    listed = (await http.get(f"{server.url}/list/{keys.public_key}")).json()
    assert listed == [desc]
    assert (await http.get(f"{server.url}/list/{Keys.generate().public_key}")).json() == []
    since = int(time.time()) + 3600
    assert (await http.get(f"{server.url}/list/{keys.public_key}", params={"since": since})).json() == []
    assert (await http.get(f"{server.url}/list/{keys.public_key}", params={"until": since})).json() == [desc]
    assert (await http.get(f"{server.url}/list/not-a-pubkey")).status_code == 400

    # CORS preflight, for browser clients
    pre = await http.options(f"{server.url}/upload")
    assert pre.status_code == 204 and "PUT" in pre.headers["Access-Control-Allow-Methods"]

    d = await http.delete(f"{server.url}/{digest}", headers={"Authorization": spec_header(keys, "delete", digest)})
    assert d.status_code == 200, d.headers.get("X-Reason")
    assert (await http.head(f"{server.url}/{digest}")).status_code == 404
    assert (await http.get(f"{server.url}/list/{keys.public_key}")).json() == []
    assert stored_files(server) == ([], [])


async def test_same_blob_two_uploaders(server, http):
    alice, bob = Keys.generate(), Keys.generate()
    body = b"shared dataset"
    digest = sha(body)
    for k in (alice, bob):
        r = await http.put(f"{server.url}/upload", content=body,
                           headers={"Authorization": spec_header(k, "upload", digest)})
        assert r.status_code == 200
        assert r.json()["type"] == "application/octet-stream"
    d = await http.delete(f"{server.url}/{digest}", headers={"Authorization": spec_header(alice, "delete", digest)})
    assert d.status_code == 200
    # Bob still claims it: it stays, in his list only.
    assert (await http.get(f"{server.url}/{digest}")).content == body
    assert (await http.get(f"{server.url}/list/{alice.public_key}")).json() == []
    assert [b["sha256"] for b in (await http.get(f"{server.url}/list/{bob.public_key}")).json()] == [digest]


async def test_blobs_survive_a_restart(tmp_path, http):
    keys = Keys.generate()
    s = await start_blob_server(tmp_path / "store")
    desc = (await http.put(f"{s.url}/upload", content=b"weights",
                           headers={"Authorization": spec_header(keys, "upload", sha(b"weights"))})).json()
    await s.stop()
    s = await start_blob_server(tmp_path / "store")
    try:
        assert (await http.get(f"{s.url}/{desc['sha256']}")).content == b"weights"
        assert (await http.get(f"{s.url}/list/{keys.public_key}")).json()[0]["sha256"] == desc["sha256"]
    finally:
        await s.stop()


# --- (b) BlossomClient ----------------------------------------------------------------------


async def test_client_round_trip(server, http, tmp_path):
    keys = Keys.generate()
    path = tmp_path / "data.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    path.write_bytes(data)
    async with BlossomClient([server.url], keys) as client:
        desc = await client.upload(path, "application/octet-stream")
        assert desc.sha256 == sha(data) and desc.size == len(data)
        assert desc.url.startswith(server.url + "/")
        assert (await http.get(desc.url)).content == data

        small = await client.upload(b"hello blossom", "text/plain")
        assert small.type == "text/plain" and small.sha256 == sha(b"hello blossom")

        assert await client.head(server.url, desc.sha256) is True
        listed = await client.list(server.url, keys.public_key)
        assert {d.sha256 for d in listed} == {desc.sha256, small.sha256}
        assert all(isinstance(d, BlobDescriptor) for d in listed)

        assert await client.delete(server.url, desc.sha256) is True
        assert await client.head(server.url, desc.sha256) is False
        assert await client.delete(server.url, desc.sha256) is False


# --- (c) fail-over --------------------------------------------------------------------------


async def _start_app(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def bad_servers(tmp_path):
    """Four servers an upload must fail on: down, 500, allow-list 403, a lying descriptor."""

    async def broken(request):
        await request.read()
        return web.json_response({"message": "disk on fire"}, status=500, headers={"X-Reason": "disk on fire"})

    async def liar(request):
        await request.read()
        return web.json_response({"url": "http://127.0.0.1/" + "0" * 64, "sha256": "0" * 64, "size": 1,
                                  "type": "text/plain", "uploaded": 1})

    down = f"http://127.0.0.1:{free_port()}"
    r500, url500 = await _start_app(broken)
    rlie, urllie = await _start_app(liar)
    private = await start_blob_server(tmp_path / "private", allowed_pubkeys=[Keys.generate().public_key])
    yield [down, url500, private.url, urllie]
    await private.stop()
    await r500.cleanup()
    await rlie.cleanup()


async def test_upload_falls_over_to_the_next_server(server, bad_servers, http):
    keys = Keys.generate()
    client = BlossomClient(bad_servers + [server.url], keys, timeout=10)  # no closing needed
    desc = await client.upload(b"a model", "application/octet-stream")
    assert desc.url.startswith(server.url)
    assert (await http.get(desc.url)).content == b"a model"


async def test_upload_fails_with_every_reason(bad_servers):
    async with BlossomClient(bad_servers, Keys.generate(), timeout=10) as client:
        with pytest.raises(BlossomError) as info:
            await client.upload(b"a model", "application/octet-stream")
    err = info.value
    assert [s for s, _ in err.failures] == bad_servers
    reasons = [r for _, r in err.failures]
    assert "ConnectError" in reasons[0]
    assert reasons[1] == "HTTP 500: disk on fire"
    assert reasons[2].startswith("HTTP 403") and "may not upload" in reasons[2]
    assert "sha256" in reasons[3]
    for server in bad_servers:
        assert server in str(err)


# --- (d) bad authorization --------------------------------------------------------------------


def _tamper_sig(header: str) -> str:
    event = json.loads(base64.b64decode(header.split(" ", 1)[1]))
    event["sig"] = ("0" if event["sig"][0] != "0" else "1") + event["sig"][1:]
    return "Nostr " + base64.b64encode(json.dumps(event).encode()).decode()


def _tamper_content(header: str) -> str:
    event = json.loads(base64.b64decode(header.split(" ", 1)[1]))
    event["content"] = "something else"
    return "Nostr " + base64.b64encode(json.dumps(event).encode()).decode()


BODY = b"the training set"
BODY_SHA = sha(BODY)

UPLOAD_CASES = {
    "no header": (None, "missing Authorization"),
    "other scheme": (lambda k: "Bearer abc", "scheme"),
    "garbage base64": (lambda k: "Nostr !!not*base64!!", "base64"),
    "not json": (lambda k: "Nostr " + base64.b64encode(b"hello").decode(), "JSON"),
    "bad signature": (lambda k: _tamper_sig(spec_header(k, "upload", BODY_SHA)), "signature"),
    "edited event": (lambda k: _tamper_content(spec_header(k, "upload", BODY_SHA)), "id does not match"),
    "wrong kind": (lambda k: spec_header(k, "upload", BODY_SHA, kind=27235), "kind 24242"),
    "wrong verb": (lambda k: spec_header(k, "delete", BODY_SHA), "not for 'upload'"),
    "expired": (lambda k: spec_header(k, "upload", BODY_SHA, expires_in=-5), "expired"),
    "no expiration": (lambda k: spec_header(k, "upload", BODY_SHA, drop_expiration=True), "no expiration"),
    "from the future": (lambda k: spec_header(k, "upload", BODY_SHA, created_at=int(time.time()) + 3600,
                                              expires_in=7200), "future"),
    "no x tag": (lambda k: spec_header(k, "upload"), "x tag"),
    "x for another blob": (lambda k: spec_header(k, "upload", sha(b"other")), "does not cover"),
    "another server": (lambda k: spec_header(k, "upload", BODY_SHA, extra_tags=[["server", "cdn.example.com"]]),
                       "another server"),
}


@pytest.mark.parametrize("case", list(UPLOAD_CASES))
async def test_bad_upload_authorization_is_refused(server, http, case):
    make, reason = UPLOAD_CASES[case]
    headers = {} if make is None else {"Authorization": make(Keys.generate())}
    r = await http.put(f"{server.url}/upload", content=BODY, headers=headers)
    assert r.status_code == 401
    assert reason in r.headers["X-Reason"]
    assert r.json()["message"] == r.headers["X-Reason"]
    assert (await http.head(f"{server.url}/{BODY_SHA}")).status_code == 404
    assert stored_files(server) == ([], [])


async def test_a_server_tag_naming_this_server_is_accepted(server, http):
    r = await http.put(f"{server.url}/upload", content=BODY, headers={
        "Authorization": spec_header(Keys.generate(), "upload", BODY_SHA, extra_tags=[["server", "127.0.0.1"]])})
    assert r.status_code == 200, r.headers.get("X-Reason")


async def test_bad_delete_authorization_is_refused(server, http):
    owner, other = Keys.generate(), Keys.generate()
    r = await http.put(f"{server.url}/upload", content=BODY,
                       headers={"Authorization": spec_header(owner, "upload", BODY_SHA)})
    assert r.status_code == 200
    url = f"{server.url}/{BODY_SHA}"
    cases = [
        (None, 401, "missing Authorization"),
        (spec_header(owner, "upload", BODY_SHA), 401, "not for 'delete'"),
        (spec_header(owner, "delete", sha(b"other")), 401, "does not cover"),
        (spec_header(owner, "delete"), 401, "does not cover"),
        (spec_header(owner, "delete", BODY_SHA, expires_in=-1), 401, "expired"),
        (spec_header(owner, "delete", BODY_SHA, extra_tags=[["server", "other.example"]]), 401, "another server"),
        (spec_header(other, "delete", BODY_SHA), 403, "only the uploader"),
    ]
    for header, status, reason in cases:
        d = await http.delete(url, headers={} if header is None else {"Authorization": header})
        assert (d.status_code, reason in d.headers.get("X-Reason", "")) == (status, True), (reason, d.headers)
    assert (await http.get(url)).content == BODY  # still there
    gone = sha(b"never uploaded")
    d = await http.delete(f"{server.url}/{gone}", headers={"Authorization": spec_header(owner, "delete", gone)})
    assert d.status_code == 404


# --- (e) size limit, (f) unknown blobs, (g) nothing partial is ever stored -------------------


async def test_too_large_with_content_length(small_server, http):
    body = os.urandom(MAX + 1)
    r = await http.put(f"{small_server.url}/upload", content=body,
                       headers={"Authorization": spec_header(Keys.generate(), "upload", sha(body))})
    assert r.status_code == 413 and "too large" in r.headers["X-Reason"]
    assert (await http.head(f"{small_server.url}/{sha(body)}")).status_code == 404
    assert stored_files(small_server) == ([], [])
    # exactly at the limit is fine
    body = body[:MAX]
    r = await http.put(f"{small_server.url}/upload", content=body,
                       headers={"Authorization": spec_header(Keys.generate(), "upload", sha(body))})
    assert r.status_code == 200 and r.json()["size"] == MAX


async def test_too_large_chunked(small_server, http):
    chunks = [os.urandom(16 * 1024) for _ in range(12)]  # 192 KiB, no Content-Length
    digest = sha(b"".join(chunks))

    async def body():
        for c in chunks:
            yield c

    r = await http.put(f"{small_server.url}/upload", content=body(),
                       headers={"Authorization": spec_header(Keys.generate(), "upload", digest)})
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in r.request.headers
    assert r.status_code == 413 and "too large" in r.headers["X-Reason"]
    assert (await http.head(f"{small_server.url}/{digest}")).status_code == 404
    assert stored_files(small_server) == ([], [])


async def test_unknown_blob_is_404(server, http):
    unknown = sha(b"nobody uploaded this")
    for path in (unknown, unknown + ".png"):
        g = await http.get(f"{server.url}/{path}")
        assert g.status_code == 404 and g.headers["X-Reason"] and g.json()["message"]
        assert (await http.head(f"{server.url}/{path}")).status_code == 404
    assert (await http.get(f"{server.url}/favicon.ico")).status_code == 404
    assert (await http.get(f"{server.url}/../index.sqlite3")).status_code == 404


async def test_rejected_uploads_leave_nothing(server, http):
    keys = Keys.generate()
    # An honest x tag for another body: read in full, then refused.
    r = await http.put(f"{server.url}/upload", content=b"poisoned",
                       headers={"Authorization": spec_header(keys, "upload", BODY_SHA)})
    assert r.status_code == 401 and "does not cover" in r.headers["X-Reason"]
    # A declared X-SHA-256 that the body does not match.
    r = await http.put(f"{server.url}/upload", content=b"poisoned", headers={
        "Authorization": spec_header(keys, "upload", BODY_SHA), "X-SHA-256": BODY_SHA})
    assert r.status_code == 409
    assert (await http.head(f"{server.url}/{BODY_SHA}")).status_code == 404
    assert (await http.head(f"{server.url}/{sha(b'poisoned')}")).status_code == 404
    assert stored_files(server) == ([], [])

    # A client that goes away half-way through its body.
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"PUT /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n"
                  f"Authorization: {spec_header(keys, 'upload', BODY_SHA)}\r\n\r\n").encode() + b"x" * 5000)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    for _ in range(50):
        if stored_files(server) == ([], []):
            break
        await asyncio.sleep(0.05)
    assert stored_files(server) == ([], [])


# --- the pure parts ------------------------------------------------------------------------


def test_auth_event_and_header():
    keys = Keys.generate()
    digest = sha(b"x")
    event = build_auth_event(keys, "upload", sha256s=[digest], server="https://CDN.example.com/path")
    assert event["kind"] == 24242
    assert ["t", "upload"] in event["tags"] and ["x", digest] in event["tags"]
    assert ["server", "cdn.example.com"] in event["tags"]
    header = auth_header(event)
    assert header.startswith("Nostr ")
    assert parse_auth_header(header) == event
    # base64url without padding (BUD-11's prose) is read as well
    token = base64.urlsafe_b64encode(json.dumps(event).encode()).decode().rstrip("=")
    assert parse_auth_header("Nostr " + token) == event
    now = time.time()
    check_auth(event, "upload", digest, now, servers=["cdn.example.com"])
    for args, kwargs, reason in [
        (("delete", digest, now), {}, "not for 'delete'"),
        (("upload", sha(b"y"), now), {}, "does not cover"),
        (("upload", digest, now + 301), {}, "expired"),
        (("upload", digest, now - 3600), {}, "future"),
        (("upload", digest, now), {"servers": ["other.example"]}, "another server"),
    ]:
        with pytest.raises(BlossomAuthError, match=reason):
            check_auth(event, *args, **kwargs)


def test_blob_descriptor_json():
    data = {"url": "https://cdn.example.com/" + "a" * 64 + ".pdf", "sha256": "a" * 64, "size": 3,
            "type": "application/pdf", "uploaded": 1725105921}
    assert BlobDescriptor.from_json(data).to_json() == data
    assert BlobDescriptor.from_json({**data, "type": None}).type == "application/octet-stream"
    for bad in ({**data, "sha256": "zz"}, {**data, "size": "3"}, {**data, "url": "ftp://x"}, []):
        with pytest.raises(ValueError):
            BlobDescriptor.from_json(bad)


# --- as a child process (localnet) -----------------------------------------------------------


async def test_blob_server_process(tmp_path):
    service = await asyncio.to_thread(start_blob_server_process, tmp_path / "proc")
    try:
        async with BlossomClient([service.url], Keys.generate()) as client:
            desc = await client.upload(b"from a child process", "text/plain")
            assert await client.head(service.url, desc.sha256)
    finally:
        service.stop()
    assert service.process.returncode == 0
    assert (tmp_path / "proc" / "blobs" / "blobs" / desc.sha256).read_bytes() == b"from a child process"


async def test_client_streams_files_from_disk(server, tmp_path):
    """A file is hashed and sent in chunks: memory stays far below its size."""
    import tracemalloc

    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(1024 * 1024))
    size = path.stat().st_size
    tracemalloc.start()
    try:
        async with BlossomClient([server.url], Keys.generate()) as client:
            desc = await client.upload(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert desc.size == size
    assert peak < size / 2, peak  # about 3 MiB: a chunk or two on each side
