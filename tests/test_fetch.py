"""The safe downloader against a real HTTP server on loopback (http.server in a thread)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import http.server
import ipaddress
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from dvm_core.transport import fetch as fetch_module
from dvm_core.transport.fetch import FetchError, blocked_reason, fetch, fetch_sync, resolve_checked, sha256_file

GOOD = os.urandom(200_000)
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
HTML = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
CHUNKED_TOTAL = 64 << 20


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "application/octet-stream",
             headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send(status, b"", headers={"Location": location})

    def do_GET(self):  # noqa: C901 - one route table
        self.server.requests.append(self.path)
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        try:
            if path == "/good":
                self.send(200, GOOD)
            elif path.startswith("/hops/"):  # /hops/N: N more redirects, then the file
                left = int(path.rsplit("/", 1)[1])
                self.redirect(f"/hops/{left - 1}" if left > 0 else "/good")
            elif path == "/relative":
                self.redirect("good", 301)
            elif path == "/loop/a":
                self.redirect("/loop/b", 307)
            elif path == "/loop/b":
                self.redirect("/loop/a", 308)
            elif path == "/to":
                self.redirect(query["url"][0])
            elif path == "/no-location":
                self.send(302)
            elif path == "/html":
                self.send(200, HTML, "text/html; charset=utf-8")
            elif path == "/html-as-binary":
                self.send(200, b"\n  " + HTML, "application/octet-stream")
            elif path.startswith("/status/"):
                code = int(path.rsplit("/", 1)[1])
                self.send(code, b"<html>error page</html>", "text/html")
            elif path == "/big-length":
                self.send_response(200)
                self.send_header("Content-Length", str(10 ** 9))
                self.end_headers()
                self.wfile.write(b"\0" * 1000)
                self.close_connection = True
            elif path == "/lie-short":  # says 10 bytes, sends 100 000
                self.send_response(200)
                self.send_header("Content-Length", "10")
                self.end_headers()
                self.wfile.write(GOOD[:100_000])
                self.close_connection = True
            elif path == "/lie-long":  # says 200 000 bytes, sends 1000 and hangs up
                self.send_response(200)
                self.send_header("Content-Length", str(len(GOOD)))
                self.end_headers()
                self.wfile.write(GOOD[:1000])
                self.close_connection = True
            elif path == "/chunked":
                self.chunked(CHUNKED_TOTAL)
            elif path == "/trickle":  # 10 bytes every 50 ms, for ever (5 s)
                self.send_response(200)
                self.send_header("Content-Length", str(len(GOOD)))
                self.end_headers()
                for i in range(100):
                    self.wfile.write(GOOD[i * 10:(i + 1) * 10])
                    self.wfile.flush()
                    time.sleep(0.05)
                self.close_connection = True
            elif path == "/stall":  # headers, then nothing
                self.send_response(200)
                self.send_header("Content-Length", str(len(GOOD)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(3)
                self.close_connection = True
            else:
                self.send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def chunked(self, total: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\1" * 65536
        try:
            while self.server.sent < total:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                self.server.sent += len(block)
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self.server.chunked_done.set()


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address=("127.0.0.1", 0), ssl_context: ssl.SSLContext | None = None):
        super().__init__(address, Handler)
        self.ssl_context = ssl_context
        self.requests: list[str] = []
        self.sent = 0
        self.chunked_done = threading.Event()

    def get_request(self):
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, addr

    @property
    def port(self) -> int:
        return self.server_address[1]


def start(server: Server) -> Server:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


@pytest.fixture
def server():
    srv = start(Server())
    srv.base = f"http://127.0.0.1:{srv.port}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def no_network(monkeypatch):
    """A tripwire: any HTTP request (and so any connection) fails the test."""
    attempts = []

    async def send(self, request, **kwargs):
        attempts.append(str(request.url))
        raise AssertionError(f"a request was sent to {request.url}")

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    return attempts


def get(url, dest: Path, sha=GOOD_SHA, **kwargs):
    kwargs.setdefault("cache_dir", None)
    kwargs.setdefault("max_bytes", 10_000_000)
    kwargs.setdefault("allow_private", True)
    return fetch(url, sha, dest, **kwargs)


def leftovers(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs if d.exists() for p in d.rglob("*"))


# --- good downloads ------------------------------------------------------------------------

async def test_good_file(server, tmp_path):
    seen = []
    path = await get(f"{server.base}/good", tmp_path / "job", on_progress=lambda n, t: seen.append((n, t)))
    assert path == tmp_path / "job" / GOOD_SHA
    assert path.read_bytes() == GOOD and sha256_file(path) == GOOD_SHA
    assert seen[-1] == (len(GOOD), len(GOOD))
    assert leftovers(tmp_path / "job") == [GOOD_SHA]


async def test_uppercase_sha_and_filename(server, tmp_path):
    path = await get(f"{server.base}/good", tmp_path, sha=GOOD_SHA.upper(), filename="weights.bin")
    assert path == tmp_path / "weights.bin" and path.read_bytes() == GOOD


async def test_redirect_chain_and_relative_redirect(server, tmp_path):
    path = await get(f"{server.base}/hops/4", tmp_path)  # 5 redirects: the limit
    assert path.read_bytes() == GOOD
    assert server.requests == ["/hops/4", "/hops/3", "/hops/2", "/hops/1", "/hops/0", "/good"]
    assert (await get(f"{server.base}/relative", tmp_path / "r")).read_bytes() == GOOD


async def test_too_many_redirects(server, tmp_path):
    with pytest.raises(FetchError, match="more than 5 redirects"):
        await get(f"{server.base}/hops/5", tmp_path)
    with pytest.raises(FetchError, match="more than 1 redirects"):
        await get(f"{server.base}/hops/1", tmp_path, max_redirects=1)
    assert leftovers(tmp_path) == []


async def test_redirect_loop(server, tmp_path):
    with pytest.raises(FetchError, match="loop"):
        await get(f"{server.base}/loop/a", tmp_path)
    assert server.requests == ["/loop/a", "/loop/b"]


async def test_bad_redirects(server, tmp_path):
    with pytest.raises(FetchError, match="unsupported URL scheme 'file'"):
        await get(f"{server.base}/to?url=file:///etc/passwd", tmp_path)
    with pytest.raises(FetchError, match="without saying where"):
        await get(f"{server.base}/no-location", tmp_path)


async def test_cache_hit_without_network(server, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = await get(f"{server.base}/good", tmp_path / "job1", cache_dir=cache)
    assert (cache / GOOD_SHA).read_bytes() == GOOD
    assert os.stat(cache / GOOD_SHA).st_mode & 0o222 == 0  # read-only
    assert leftovers(cache) == [GOOD_SHA]
    server.shutdown()
    calls = []
    monkeypatch.setattr(httpx.AsyncClient, "send", lambda *a, **k: calls.append(a))

    async def no_dns(*args, **kwargs):
        raise AssertionError("no lookup on a cache hit")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", no_dns)
    started = time.monotonic()
    second = await fetch("https://blossom.example/" + GOOD_SHA, GOOD_SHA, tmp_path / "job2",
                         cache_dir=cache, max_bytes=10)
    assert time.monotonic() - started < 0.5
    assert calls == [] and second == tmp_path / "job2" / GOOD_SHA and second.read_bytes() == GOOD
    assert first.read_bytes() == GOOD


async def test_fetch_sync_from_a_thread(server, tmp_path):
    path = await asyncio.to_thread(fetch_sync, f"{server.base}/good", GOOD_SHA, tmp_path,
                                   cache_dir=None, max_bytes=10_000_000, allow_private=True)
    assert path.read_bytes() == GOOD


# --- refused content -----------------------------------------------------------------------

async def test_sha_mismatch_leaves_no_file(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(FetchError) as info:
        await get(f"{server.base}/good", tmp_path / "job", sha=wrong, cache_dir=tmp_path / "cache")
    assert wrong in str(info.value) and GOOD_SHA in str(info.value)
    assert leftovers(tmp_path / "job", tmp_path / "cache") == []


@pytest.mark.parametrize("route", ["/html", "/html-as-binary"])
async def test_html_page_instead_of_data(server, tmp_path, route):
    with pytest.raises(FetchError, match="got an HTML page, not the data: check the URL"):
        await get(f"{server.base}{route}", tmp_path)
    assert leftovers(tmp_path) == []
    html_sha = hashlib.sha256(HTML).hexdigest()
    path = await get(f"{server.base}/html", tmp_path, sha=html_sha, expect_binary=False)
    assert path.read_bytes() == HTML


@pytest.mark.parametrize("code", [404, 500, 403])
async def test_error_status(server, tmp_path, code):
    with pytest.raises(FetchError, match=f"answered {code}"):
        await get(f"{server.base}/status/{code}", tmp_path)
    assert leftovers(tmp_path) == []


async def test_content_length_above_limit_refused_early(server, tmp_path):
    started = time.monotonic()
    with pytest.raises(FetchError, match="is 1000000000 bytes, more than the 10000000 bytes allowed"):
        await get(f"{server.base}/big-length", tmp_path)
    assert time.monotonic() - started < 2
    assert leftovers(tmp_path) == []


async def test_chunked_oversize_stops_early(server, tmp_path):
    with pytest.raises(FetchError, match="larger than the 1048576 bytes allowed"):
        await get(f"{server.base}/chunked", tmp_path, max_bytes=1 << 20)
    assert await asyncio.to_thread(server.chunked_done.wait, 5)
    assert server.sent < CHUNKED_TOTAL // 4, f"the server sent {server.sent} bytes"
    assert leftovers(tmp_path) == []


async def test_lying_content_length(server, tmp_path):
    with pytest.raises(FetchError, match="sha256 is"):  # only the first 10 bytes are taken
        await get(f"{server.base}/lie-short", tmp_path)
    with pytest.raises(FetchError, match="closed before the whole file arrived"):
        await get(f"{server.base}/lie-long", tmp_path)
    assert leftovers(tmp_path) == []


# --- time ----------------------------------------------------------------------------------

async def test_too_slow(server, tmp_path):
    started = time.monotonic()
    with pytest.raises(FetchError, match="too slow .*bytes/s"):
        await get(f"{server.base}/trickle", tmp_path, min_bytes_per_s=10_000, speed_window=0.5)
    assert time.monotonic() - started < 2
    with pytest.raises(FetchError, match="too slow \\(no data for 0.5 s\\)"):
        await get(f"{server.base}/stall", tmp_path, min_bytes_per_s=10_000, speed_window=0.5)
    assert leftovers(tmp_path) == []


async def test_overall_timeout(server, tmp_path):
    started = time.monotonic()
    with pytest.raises(FetchError, match="longer than 0.8 s"):
        await get(f"{server.base}/trickle", tmp_path, timeout=0.8)
    assert time.monotonic() - started < 2
    assert leftovers(tmp_path) == []


async def test_cancelled_midway_removes_the_partial_file(server, tmp_path):
    class Stop(Exception):
        pass

    def check():
        raise Stop()

    with pytest.raises(Stop):
        await get(f"{server.base}/chunked", tmp_path, check_cancelled=check)
    assert leftovers(tmp_path) == []


# --- addresses -----------------------------------------------------------------------------

@pytest.mark.parametrize("url,reason", [
    ("http://127.0.0.1:9/x", "loopback"),
    ("http://localhost:9/x", "loopback"),
    ("http://[::1]:9/x", "loopback"),
    ("http://[::ffff:127.0.0.1]/x", "loopback"),
    ("http://[::ffff:10.1.2.3]/x", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://10.0.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://240.0.0.1/", "private|reserved"),
    ("http://100.64.0.1/", "private"),
    ("http://2130706433/", "loopback"),  # 127.0.0.1 as one number
    ("https://127.1/", "loopback"),
])
async def test_private_addresses_refused_without_connecting(tmp_path, no_network, url, reason):
    with pytest.raises(FetchError, match=f"refusing to download from .*({reason}).*only public servers"):
        await fetch(url, GOOD_SHA, tmp_path, cache_dir=None, max_bytes=100)
    assert no_network == []
    assert leftovers(tmp_path) == []


async def test_redirect_to_loopback_refused(server, tmp_path):
    """The first hop's host is allowed by name; the redirect target (also on loopback, named
    differently) is checked on its own and refused before any request goes to it."""
    target = f"http://localhost:{server.port}/good"
    with pytest.raises(FetchError, match="refusing to download from localhost \\(127.0.0.1\\): a loopback"):
        await fetch(f"{server.base}/to?url={target}", GOOD_SHA, tmp_path, cache_dir=None,
                    max_bytes=10_000_000, allowed_hosts={"127.0.0.1"})
    assert len(server.requests) == 1 and server.requests[0].startswith("/to?url=")
    path = await fetch(f"{server.base}/good", GOOD_SHA, tmp_path, cache_dir=None,
                       max_bytes=10_000_000, allowed_hosts={"127.0.0.1"})
    assert path.read_bytes() == GOOD


async def test_redirect_to_metadata_address_refused(server, tmp_path):
    with pytest.raises(FetchError, match="169.254.169.254: a link-local address"):
        await fetch(f"{server.base}/to?url=http://169.254.169.254/latest/meta-data/", GOOD_SHA, tmp_path,
                    cache_dir=None, max_bytes=10_000_000, allowed_hosts={"127.0.0.1"})
    assert len(server.requests) == 1


async def test_every_resolved_address_is_checked(monkeypatch):
    async def fake_getaddrinfo(host, port, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:192.168.0.5", port, 0, 0))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(FetchError, match=r"public\.example \(::ffff:192\.168\.0\.5\): a private"):
        await resolve_checked("public.example", 443)
    assert await resolve_checked("public.example", 443, allow_private=True) == [
        "93.184.216.34", "::ffff:192.168.0.5"]


async def test_unresolvable_host(tmp_path):
    with pytest.raises(FetchError, match="cannot resolve the host name 'no-such-host.invalid'"):
        await fetch("http://no-such-host.invalid/x", GOOD_SHA, tmp_path, cache_dir=None, max_bytes=100)


@pytest.mark.parametrize("address,blocked", [
    ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False),
    ("2002:0808:0808::1", False),            # 6to4 of 8.8.8.8
    ("2002:c0a8:0001::1", True),             # 6to4 of 192.168.0.1
    ("64:ff9b::0a00:0001", True),            # NAT64 of 10.0.0.1
    ("64:ff9b::0808:0808", False),           # NAT64 of 8.8.8.8
    ("::ffff:8.8.8.8", False), ("::ffff:169.254.169.254", True),
    ("fec0::1", True), ("ff02::1", True), ("198.18.0.1", True), ("255.255.255.255", True),
    ("192.0.2.1", True), ("fe80::1%eth0", True),
])
def test_blocked_reason(address, blocked):
    assert (blocked_reason(address) is not None) is blocked, blocked_reason(address)
    assert blocked_reason(ipaddress.ip_address(address.split("%")[0])) == blocked_reason(address)


# --- bad requests --------------------------------------------------------------------------

@pytest.mark.parametrize("url,sha,match", [
    ("ftp://example.com/x", GOOD_SHA, "unsupported URL scheme 'ftp'"),
    ("file:///etc/passwd", GOOD_SHA, "unsupported URL scheme 'file'"),
    ("https://example.com/x", "abc", "not 64 hex digits"),
    ("https://example.com/x", "g" * 64, "not 64 hex digits"),
    ("http:///x", GOOD_SHA, "has no host"),
], ids=["ftp", "file", "short-sha", "non-hex-sha", "no-host"])   # GOOD is random: ids of its own (xdist)
async def test_bad_arguments(tmp_path, no_network, url, sha, match):
    with pytest.raises(FetchError, match=match):
        await fetch(url, sha, tmp_path, cache_dir=None, max_bytes=100)
    assert no_network == []


# --- TLS: the connection is pinned to the checked address, TLS still names the host ---------

def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_pinned_to_checked_address(tmp_path):
    cert, key = self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    srv = start(Server(ssl_context=server_ctx))
    try:
        client_ctx = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(verify=client_ctx) as client:
            # The certificate names only "localhost" (no IP): it verifies only because the
            # connection to 127.0.0.1 still sends and checks the host name.
            path = await fetch(f"https://localhost:{srv.port}/good", GOOD_SHA, tmp_path / "dl",
                               cache_dir=None, max_bytes=10_000_000, client=client,
                               allowed_hosts={"localhost"})
            assert path.read_bytes() == GOOD
            with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(f"https://127.0.0.1:{srv.port}/good", GOOD_SHA, tmp_path / "dl2",
                            cache_dir=None, max_bytes=10_000_000, client=client, allow_private=True)
        assert srv.requests == ["/good"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_module_exports():
    assert callable(fetch_module.fetch) and issubclass(FetchError, Exception)
