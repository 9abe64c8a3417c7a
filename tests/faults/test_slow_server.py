"""A customer's data server that sends one byte a second: the download is stopped at the
worker's `download_timeout`, the customer gets a clear error (and, for a paid job, the money
back), and while the bytes trickle in the worker stays free to work: its event loop answers
on time and systemd's watchdog keeps being fed.

The server answers the headers at once (so the job passes the look at its inputs before
payment) and then sends the body one byte a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time

import pytest

from dvm_core.customer.client import JobFailed, result_json
from dvm_core.protocol.events import Keys
from dvm_core.protocol.nip90 import JobInput

from ..conftest import WorkerProcess
from ..paying import PRICE, claim_nutzaps, paid_worker, provider_balance

KIND = 5790
DOWNLOAD_TIMEOUT = 1.5
BODY = b"one slow byte at a time " * 8


class TricklingServer:
    """HTTP on loopback: headers at once, then the body one byte every `interval` seconds."""

    def __init__(self, body: bytes = BODY, interval: float = 1.0):
        self.body, self.interval = body, interval
        self.sha256 = hashlib.sha256(body).hexdigest()
        self.bytes_sent = 0
        self.requests = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def start(self) -> "TricklingServer":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/data.txt#sha256={self.sha256}"
        return self

    async def close(self) -> None:
        self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(self.body))
            await writer.drain()
            for i in range(len(self.body)):
                await asyncio.sleep(self.interval)
                writer.write(self.body[i:i + 1])
                await writer.drain()
                self.bytes_sent += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


class LoopLag:
    """How late the event loop wakes a task that sleeps `step` seconds, at worst."""

    def __init__(self, step: float = 0.05):
        self.step = step
        self.worst = 0.0
        self.samples = 0
        self._task: asyncio.Task | None = None

    def start(self) -> "LoopLag":
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self.step)
            self.worst = max(self.worst, time.monotonic() - started - self.step)
            self.samples += 1

    async def stop(self) -> float:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        return self.worst


@pytest.fixture
async def trickling():
    server = await TricklingServer().start()
    yield server
    await server.close()


def expected_error(server: TricklingServer) -> str:
    return (f"could not fetch an input after 3 tries: {server.url.split('#')[0]}: the download took "
            f"longer than {DOWNLOAD_TIMEOUT:g} s and was stopped")


async def test_a_byte_a_second_times_out_with_a_clear_error_a_refund_and_a_free_loop(
        workers, mint, funded, trickling):
    worker = await paid_worker(workers, mint, download_timeout=DOWNLOAD_TIMEOUT, allow_private_urls=True)
    before = await funded.wallet.total_balance()
    token = await funded.wallet.send(PRICE, mint=mint.url)
    lag = LoopLag().start()
    started = time.monotonic()
    request = await funded.submit(KIND, [JobInput(trickling.url, "url")], {},
                                  provider=worker.keys.public_key, cashu=token)
    with pytest.raises(JobFailed) as failed:
        await funded.result(request, timeout=60)
    took = time.monotonic() - started
    worst = await lag.stop()

    message = failed.value.feedback.message
    assert message == expected_error(trickling) + f"; your {PRICE} sat were refunded as a nutzap"
    assert trickling.requests >= 4          # the look before payment, then 3 tries
    assert trickling.bytes_sent >= 1        # bytes did come: slow, not dead
    assert took < 3 * DOWNLOAD_TIMEOUT + 2 + 4 + 10   # 3 tries, 2 s and 4 s apart, and the rest
    assert lag.samples > took / 0.1, lag.samples
    assert worst < 0.5, f"the event loop was {worst:.3f} s late during the slow download"

    assert await claim_nutzaps(funded, PRICE) == PRICE
    assert await funded.wallet.total_balance() == before
    assert await provider_balance(worker) == 0
    assert worker.store.get_job(request["id"]).state == "failed"
    assert worker.store.payment_for_job(request["id"])["state"] == "refunded"
    # Still up and working.
    done = await funded.submit(KIND, [JobInput("after the slow one", "text")], {},
                               provider=worker.keys.public_key,
                               cashu=await funded.wallet.send(PRICE, mint=mint.url))
    assert result_json(await funded.result(done, timeout=30))["words"] == 4
    print(f"failed after {took:.1f} s; loop late by {worst * 1000:.0f} ms at worst "
          f"({lag.samples} samples)")


class NotifyListener:
    """What systemd would get on `$NOTIFY_SOCKET`: each datagram with the time it came."""

    def __init__(self):
        self.path = f"/tmp/dvm-notify-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            self.got.append((time.monotonic(), data.decode(errors="replace")))

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.got if m.startswith("WATCHDOG=1") and since <= t <= until]

    async def wait_for(self, prefix: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(m.startswith(prefix) for _, m in self.got):
            assert time.monotonic() < deadline, f"no {prefix} from the worker: {self.got[-5:]}"
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        os.unlink(self.path)


async def test_dvm_run_keeps_feeding_the_watchdog_while_a_download_trickles(
        tmp_path, relay, customer, trickling):
    """`dvm run` under a watchdog of 0.4 s (a ping every 0.2 s, the loop's own timer): the
    pings keep their pace all through the slow download, the status they carry says the job
    is running, and the customer gets the error."""
    listener = NotifyListener()
    keys = Keys.generate()
    proc = WorkerProcess(tmp_path, relay.url, keys, download_timeout=DOWNLOAD_TIMEOUT,
                         allow_private_urls=True)
    proc.start(env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "400000"})
    try:
        await listener.wait_for("READY=1")
        started = time.monotonic()
        request = await customer.submit(KIND, [JobInput(trickling.url, "url")], {},
                                        provider=keys.public_key)
        with pytest.raises(JobFailed) as failed:
            await customer.result(request, timeout=60)
        ended = time.monotonic()
        assert failed.value.feedback.message == expected_error(trickling)
        assert trickling.bytes_sent >= 1

        pings = listener.pings(started, ended)
        gaps = [b - a for (a, _), (b, _) in zip(pings, pings[1:])]
        assert len(pings) >= (ended - started) / 0.2 * 0.6, (len(pings), ended - started)
        assert max(gaps) < 0.2 + 0.5, f"the watchdog went {max(gaps):.2f} s without a ping"
        assert any("running 1" in m for _, m in pings), pings[-3:]
        assert proc.proc.poll() is None     # still up
        print(f"{len(pings)} pings in {ended - started:.1f} s, longest gap {max(gaps):.3f} s")
    finally:
        proc.stop()
        listener.close()
