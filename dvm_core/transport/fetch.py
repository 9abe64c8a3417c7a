"""The one way a job downloads a file: a URL with a sha256, checked before it is trusted.

Datasets and model weights travel as URLs with their sha256 (often on public Blossom servers),
never inside Nostr events. `fetch` downloads one and returns the path of the verified file:

- only ``http`` and ``https``; the sha256 must be 64 hex digits;
- a cache keyed by sha256 (`cache_dir`): a hit returns at once, without any network. Files are
  written under a temporary name and renamed only after their hash matched, so a file under its
  final name is always complete and verified;
- a size limit enforced while downloading: a ``Content-Length`` above it is refused before the
  body is read, and the download stops as soon as the count of bytes received passes it;
- an overall time limit, and optionally a minimum speed (``min_bytes_per_s`` averaged over
  ``speed_window`` seconds) so a trickling server is dropped early;
- redirects followed by hand (at most `max_redirects`), each hop checked like the first;
- no requests to private, loopback, link-local, multicast, unspecified or reserved addresses
  (IPv4 and IPv6, including IPv4-mapped, 6to4 and NAT64 forms) unless `allow_private`: the host
  name is resolved first, every address it resolves to is checked, and the connection is then
  made to a checked address (the request carries the original ``Host`` and TLS server name), so
  a DNS answer that changes between the check and the connection cannot get around it.
  `allowed_hosts` exempts named hosts (a provider's own blob server on its LAN, tests);
- a non-2xx answer, an HTML page where data was expected, and a hash mismatch are errors with a
  message for the customer (`FetchError`); nothing is left behind.

Plugins call it through the job context; from a worker thread `fetch_sync` runs it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Collection

import httpx

__all__ = ["FetchError", "fetch", "fetch_sync", "sha256_file", "blocked_reason", "resolve_checked",
           "DEFAULT_USER_AGENT"]

DEFAULT_USER_AGENT = "dvm-worker/0.1 (+https://github.com/nostr-protocol/nips/blob/master/90.md)"
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_HTML_PREFIXES = (b"<!doctype html", b"<html")
_SNIFF_BYTES = 512
_PROGRESS_INTERVAL = 0.25
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")


class FetchError(Exception):
    """A download that failed or was refused; the message is meant for the customer."""


from dvm_core.datarefs import sha256_file  # noqa: E402  (re-exported: the one copy lives there)


# --- address checks ------------------------------------------------------------------------

def blocked_reason(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `address` may not be fetched from (e.g. ``"a loopback address"``), or None if it is a
    public address. IPv6 forms that embed an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, 6to4,
    NAT64 ``64:ff9b::/96``) are judged by the IPv4 address inside."""
    if isinstance(address, str):
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an IP address"
    else:
        ip = address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = None
        if ip.ipv4_mapped is not None:
            embedded = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            embedded = ip.sixtofour
        elif ip in _NAT64_WELL_KNOWN:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(embedded)
            return f"{inner} (inside the IPv6 address {ip})" if inner else None
        if ip in _NAT64_LOCAL or ip.is_site_local:
            return "a reserved address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_V4:
        return "a private address"  # carrier-grade NAT space
    if not ip.is_global:
        return "a non-public address"
    return None


async def resolve_checked(host: str, port: int, *, allow_private: bool = False,
                          allowed_hosts: Collection[str] = ()) -> list[str]:
    """Resolve `host` (an IP literal is taken as is, without any lookup) and check every
    address it resolves to. Returns the addresses (strings, in resolver order, no duplicates);
    raises FetchError if the name does not resolve or any address is not public (unless
    `allow_private`, or `host` is in `allowed_hosts`)."""
    host = host.strip("[]")
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchError(f"cannot resolve the host name {host!r}: {_gai_message(exc)}") from None
        addresses = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = str(sockaddr[0]).split("%", 1)[0]
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise FetchError(f"cannot resolve the host name {host!r}: no IPv4 or IPv6 address")
    exempt = allow_private or host.lower() in {h.lower().strip("[]") for h in allowed_hosts}
    if not exempt:
        for address in addresses:
            reason = blocked_reason(address)
            if reason:
                shown = host if host == address else f"{host} ({address})"
                raise FetchError(f"refusing to download from {shown}: {reason}; "
                                 "only public servers can be used")
    return addresses


def _gai_message(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror) and exc.args and len(exc.args) > 1:
        return str(exc.args[1])
    return str(exc) or type(exc).__name__


# --- the download --------------------------------------------------------------------------

def _short(url: httpx.URL) -> str:
    """The URL as shown in messages: no query string (it may hold a signature), capped length."""
    text = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"
    return text if len(text) <= 120 else text[:117] + "..."


def _parse_url(url: str | httpx.URL) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise FetchError(f"not a valid URL: {str(url)[:120]!r} ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        scheme = parsed.scheme or "none"
        raise FetchError(f"unsupported URL scheme {scheme!r}: only http and https URLs can be fetched")
    if not parsed.raw_host:
        raise FetchError(f"the URL {str(url)[:120]!r} has no host")
    return parsed


def _check_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
        raise FetchError(f"the sha256 {str(sha256)[:80]!r} is not 64 hex digits")
    return sha256.lower()


def _check_filename(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"bad file name {name!r}")
    return name


def _looks_like_html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    return text.startswith(_HTML_PREFIXES)


def _place(source: Path, final: Path) -> Path:
    """Make the verified `source` (in the cache) appear at `final`: a hard link when possible,
    else a copy; always through a temporary name and an atomic rename."""
    if source == final:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{secrets.token_hex(6)}.part"
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


async def fetch(url: str, sha256: str, dest_dir: Path, *, cache_dir: Path | None, max_bytes: int,
                timeout: float = 300, connect_timeout: float = 10,
                min_bytes_per_s: float | None = None, max_redirects: int = 5,
                allow_private: bool = False, expect_binary: bool = True,
                client: httpx.AsyncClient | None = None,
                allowed_hosts: Collection[str] = (), speed_window: float = 10.0,
                filename: str | None = None,
                on_progress: Callable[[int, int | None], None] | None = None,
                check_cancelled: Callable[[], None] | None = None) -> Path:
    """Download `url` into `dest_dir`, verify its sha256, and return the file's path.

    :param sha256: the expected hash (64 hex digits); the file is refused if it differs.
    :param dest_dir: where the file lands, as ``dest_dir/<filename or sha256>``.
    :param cache_dir: a shared cache keyed by sha256 (None: no cache). A file in the cache is
        linked (or copied) into `dest_dir` without any network. Cached files are made
        read-only, and so is the hard link in `dest_dir`: treat inputs as read-only.
    :param max_bytes: the largest file accepted (bytes).
    :param timeout: seconds for the whole download, name resolution and redirects included.
    :param connect_timeout: seconds to open each connection.
    :param min_bytes_per_s: refuse a server slower than this, averaged over `speed_window`
        seconds (a server silent for `speed_window` seconds is too slow as well).
    :param max_redirects: how many redirects to follow.
    :param allow_private: allow private, loopback and other non-public addresses (a trusted
        local server, tests).
    :param allowed_hosts: host names or IP literals exempt from the address check; a redirect
        to any other host is still checked.
    :param expect_binary: refuse an HTML page (``Content-Type: text/html`` or a body starting
        with ``<!doctype html`` / ``<html``), the usual sign of a wrong or expired link.
    :param client: an ``httpx.AsyncClient`` to use (its redirects setting is ignored); default:
        a fresh one that ignores proxy environment variables. Requests go to the checked IP
        address with the original ``Host`` header and TLS server name; a client of your own
        should not also be used for ``https://<IP address>`` URLs, whose pooled connections
        (verified for the address) could otherwise be picked for a pinned request.
    :param on_progress: called with ``(bytes received, total or None)``, at most 4 times a second.
    :param check_cancelled: called between chunks; whatever it raises (e.g. ``JobCancelled``)
        stops the download, and the partial file is removed.
    :raises FetchError: with a message for the customer.
    """
    sha256 = _check_sha256(sha256)
    start_url = _parse_url(url)
    if max_bytes <= 0:
        raise ValueError("max_bytes must be positive")
    name = _check_filename(filename) if filename is not None else sha256
    dest_dir = Path(dest_dir)
    final = dest_dir / name

    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cached = cache_dir / sha256
        if cached.is_file():
            return _place(cached, final)
        work_dir = cache_dir
    else:
        work_dir = dest_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    dest_dir.mkdir(parents=True, exist_ok=True)

    own_client = client is None
    if own_client:
        client = httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=_tls_context())
    tmp = work_dir / f".{sha256}.{secrets.token_hex(6)}.part"
    try:
        try:
            async with asyncio.timeout(timeout):
                await _download(
                    client, start_url, sha256, tmp, max_bytes=max_bytes,
                    connect_timeout=connect_timeout, read_timeout=(
                        min(timeout, speed_window) if min_bytes_per_s else timeout),
                    min_bytes_per_s=min_bytes_per_s, speed_window=speed_window,
                    max_redirects=max_redirects, allow_private=allow_private,
                    allowed_hosts=allowed_hosts, expect_binary=expect_binary,
                    on_progress=on_progress, check_cancelled=check_cancelled)
        except TimeoutError:
            raise FetchError(f"{_short(start_url)}: the download took longer than "
                             f"{timeout:g} s and was stopped") from None
        if cache_dir is not None:
            os.chmod(tmp, 0o444)
            os.replace(tmp, cache_dir / sha256)
            return _place(cache_dir / sha256, final)
        os.replace(tmp, final)
        return final
    finally:
        tmp.unlink(missing_ok=True)
        if own_client:
            await client.aclose()


_TLS_CONTEXT = None


def _tls_context():
    """One TLS context for every client: building one loads the CA bundle, ≈ 37 ms of event-loop
    CPU per probed URL (a flood of requests starved the watchdog); shared, a client costs 0.2 ms.
    Verification is unchanged."""
    global _TLS_CONTEXT
    if _TLS_CONTEXT is None:
        import ssl

        import certifi
        _TLS_CONTEXT = ssl.create_default_context(cafile=certifi.where())
    return _TLS_CONTEXT


async def probe(url: str, *, max_bytes: int, timeout: float = 20, connect_timeout: float = 10,
                max_redirects: int = 5, allow_private: bool = False, expect_binary: bool = True,
                allowed_hosts: Collection[str] = ()) -> None:
    """Check, before any work or payment, what can be checked of `url` without downloading it:
    an allowed address, a server that answers 2xx after at most `max_redirects` redirects, not
    an HTML page, and an announced size within `max_bytes`. Only the headers are read.

    :raises FetchError: with a message for the customer.
    """
    start_url = _parse_url(url)
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=_tls_context()) as client:
        try:
            async with asyncio.timeout(timeout):
                await _download(client, start_url, "", Path(), max_bytes=max_bytes,
                                connect_timeout=connect_timeout, read_timeout=timeout,
                                min_bytes_per_s=None, speed_window=timeout,
                                max_redirects=max_redirects, allow_private=allow_private,
                                allowed_hosts=allowed_hosts, expect_binary=expect_binary,
                                on_progress=None, check_cancelled=None, headers_only=True)
        except TimeoutError:
            raise FetchError(f"{_short(start_url)}: the server did not answer within {timeout:g} s") from None


def fetch_sync(url: str, sha256: str, dest_dir: Path, **kwargs) -> Path:
    """`fetch` for code in a worker thread (a plugin's plain ``run``): same arguments."""
    return asyncio.run(fetch(url, sha256, dest_dir, **kwargs))


async def _download(client: httpx.AsyncClient, url: httpx.URL, sha256: str, tmp: Path, *,
                    max_bytes: int, connect_timeout: float, read_timeout: float,
                    min_bytes_per_s: float | None, speed_window: float, max_redirects: int,
                    allow_private: bool, allowed_hosts: Collection[str], expect_binary: bool,
                    on_progress, check_cancelled, headers_only: bool = False) -> None:
    first = url
    seen: list[str] = []
    for hop in range(max_redirects + 1):
        seen.append(str(url))
        response = await _open(client, url, connect_timeout=connect_timeout,
                               read_timeout=read_timeout, allow_private=allow_private,
                               allowed_hosts=allowed_hosts)
        try:
            if response.status_code in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"{_short(url)}: the server answered {response.status_code} "
                                     "(a redirect) without saying where to")
                try:
                    target = url.join(location.strip())
                except (httpx.InvalidURL, ValueError):
                    raise FetchError(f"{_short(url)}: the server redirected to an invalid URL "
                                     f"{location[:120]!r}") from None
                if target.scheme not in ("http", "https"):
                    raise FetchError(f"{_short(url)}: the server redirected to an unsupported "
                                     f"URL scheme {target.scheme!r}")
                if str(target) in seen:
                    raise FetchError(f"{_short(first)}: the redirects go round in a loop "
                                     f"(back to {_short(target)})")
                url = target
                continue
            if headers_only:
                _check_headers(response, url, max_bytes=max_bytes, expect_binary=expect_binary)
                return
            await _save_body(response, url, sha256, tmp, max_bytes=max_bytes,
                             min_bytes_per_s=min_bytes_per_s, speed_window=speed_window,
                             expect_binary=expect_binary, on_progress=on_progress,
                             check_cancelled=check_cancelled)
            return
        finally:
            await response.aclose()
    raise FetchError(f"{_short(first)}: more than {max_redirects} redirects")


async def _open(client: httpx.AsyncClient, url: httpx.URL, *, connect_timeout: float,
                read_timeout: float, allow_private: bool,
                allowed_hosts: Collection[str]) -> httpx.Response:
    """Send the GET for `url` to one of the checked addresses of its host (the first that
    accepts the connection) and return the streaming response."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = await resolve_checked(host, port, allow_private=allow_private,
                                      allowed_hosts=allowed_hosts)
    headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity",
               "User-Agent": DEFAULT_USER_AGENT, "Accept": "*/*"}
    extensions = {}
    if url.scheme == "https" and not _is_ip_literal(host):
        # The connection goes to the checked address; TLS still names (and verifies) the host.
        # The connection pool knows it by the address alone, so it must not be reused for
        # another host name at that address: one request per TLS connection.
        extensions["sni_hostname"] = host
        headers["Connection"] = "close"
    timeouts = httpx.Timeout(read_timeout, connect=connect_timeout)
    last: Exception | None = None
    for address in addresses:
        request = client.build_request("GET", url.copy_with(host=address), headers=headers,
                                       extensions=extensions, timeout=timeouts)
        try:
            return await client.send(request, stream=True, follow_redirects=False)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            last = exc
        except httpx.TimeoutException:
            raise FetchError(f"{_short(url)}: the server did not answer within {read_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"{_short(url)}: {_describe(exc)}") from None
    what = "timed out" if isinstance(last, httpx.ConnectTimeout) else _describe(last)
    raise FetchError(f"{_short(url)}: cannot connect to the server ({what})")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no address"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_headers(response: httpx.Response, url: httpx.URL, *, max_bytes: int,
                   expect_binary: bool) -> int | None:
    """What the status line and headers alone can refuse; returns the announced size."""
    status = response.status_code
    if not 200 <= status < 300 or status == 206:
        reason = response.reason_phrase or ""
        raise FetchError(f"{_short(url)}: the server answered {status} {reason}".rstrip()
                         + (" (no file there)" if status in (404, 410) else ""))
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if expect_binary and content_type in ("text/html", "application/xhtml+xml"):
        raise FetchError(f"{_short(url)}: got an HTML page, not the data: check the URL")
    total: int | None = None
    length = response.headers.get("content-length")
    if length is not None and "content-encoding" not in response.headers:
        try:
            total = int(length)
        except ValueError:
            total = None
        if total is not None and total > max_bytes:
            raise FetchError(f"{_short(url)}: the file is {total} bytes, more than the "
                             f"{max_bytes} bytes allowed")
    return total


async def _save_body(response: httpx.Response, url: httpx.URL, sha256: str, tmp: Path, *,
                     max_bytes: int, min_bytes_per_s: float | None, speed_window: float,
                     expect_binary: bool, on_progress, check_cancelled) -> None:
    total = _check_headers(response, url, max_bytes=max_bytes, expect_binary=expect_binary)

    digest = hashlib.sha256()
    received = 0
    head = b""
    sniffing = expect_binary
    window_start = time.monotonic()
    window_bytes = 0
    last_progress = 0.0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        try:
            async for chunk in response.aiter_bytes():
                if not chunk:
                    continue
                received += len(chunk)
                if received > max_bytes:
                    raise FetchError(f"{_short(url)}: the file is larger than the {max_bytes} "
                                     "bytes allowed (download stopped)")
                if sniffing:
                    head += chunk[:_SNIFF_BYTES]
                    if len(head.lstrip()) >= 16 or len(head) >= _SNIFF_BYTES:
                        if _looks_like_html(head):
                            raise FetchError(f"{_short(url)}: got an HTML page, not the data: "
                                             "check the URL")
                        sniffing = False
                digest.update(chunk)
                out.write(chunk)
                now = time.monotonic()
                if min_bytes_per_s:
                    window_bytes += len(chunk)
                    elapsed = now - window_start
                    if elapsed >= speed_window:
                        rate = window_bytes / elapsed
                        if rate < min_bytes_per_s:
                            raise FetchError(f"{_short(url)}: the server is too slow ({rate:.0f} "
                                             f"bytes/s, at least {min_bytes_per_s:.0f} needed)")
                        window_start, window_bytes = now, 0
                if on_progress is not None and now - last_progress >= _PROGRESS_INTERVAL:
                    last_progress = now
                    on_progress(received, total)
                if check_cancelled is not None:
                    check_cancelled()
        except httpx.ReadTimeout:
            if min_bytes_per_s:
                raise FetchError(f"{_short(url)}: the server is too slow (no data for "
                                 f"{speed_window:g} s)") from None
            raise FetchError(f"{_short(url)}: the server stopped sending data") from None
        except httpx.RemoteProtocolError as exc:
            raise FetchError(f"{_short(url)}: the connection closed before the whole file arrived "
                             f"({received} bytes received; {exc})") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"{_short(url)}: the download failed after {received} bytes "
                             f"({_describe(exc)})") from None
    if sniffing and expect_binary and _looks_like_html(head):
        raise FetchError(f"{_short(url)}: got an HTML page, not the data: check the URL")
    if total is not None and received != total:
        raise FetchError(f"{_short(url)}: the connection closed before the whole file arrived "
                         f"({received} of {total} bytes)")
    if on_progress is not None:
        on_progress(received, total)
    actual = digest.hexdigest()
    if actual != sha256:
        raise FetchError(f"{_short(url)}: the file's sha256 is {actual}, not the expected "
                         f"{sha256}: the URL serves different data, or the hash is wrong")
