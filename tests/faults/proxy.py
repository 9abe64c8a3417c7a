"""A loopback TCP proxy in front of a real service that can drop one answer on the floor.

`drop_answer_to(b"POST /v1/swap")`: the next request that starts so is passed on to the service,
which acts on it, and its answer is read and thrown away; the client sees its connection closed.
That is a mint whose response is lost after it performed the swap.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class DroppingProxy:
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.server: asyncio.AbstractServer | None = None
        self.url = ""
        self._armed: bytes | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.dropped = 0

    async def start(self) -> "DroppingProxy":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self.server.wait_closed()

    def drop_answer_to(self, request_start: bytes) -> None:
        self._armed = request_start

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        drop = asyncio.Event()
        self._writers |= {writer, up_writer}

        async def client_to_upstream():
            try:
                while data := await reader.read(65536):
                    if self._armed is not None and data.startswith(self._armed):
                        self._armed = None
                        drop.set()
                    up_writer.write(data)
                    await up_writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                up_writer.close()

        async def upstream_to_client():
            try:
                while data := await up_reader.read(65536):
                    if drop.is_set():
                        # The service answered: it has acted. The client never hears it.
                        self.dropped += 1
                        writer.transport.abort()
                        return
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        try:
            await asyncio.gather(client_to_upstream(), upstream_to_client())
        finally:
            self._writers -= {writer, up_writer}


class CuttingProxy:
    """A loopback TCP proxy in front of a service (a relay: `ws://` URLs) whose every
    connection can be cut at once, as a flaky network or a relay behind a restarting load
    balancer does it. `cut_all()` aborts both ends of each connection (no close handshake);
    `flap(every)` does so every `every` seconds until `stop_flapping()`. New connections are
    passed on as before."""

    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.scheme = parts.scheme
        self.upstream = (parts.hostname, parts.port)
        self.server: asyncio.AbstractServer | None = None
        self.url = ""
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flapping: asyncio.Task | None = None
        self.connections = 0   # accepted so far
        self.cuts = 0          # connections cut

    async def start(self) -> "CuttingProxy":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.url = f"{self.scheme}://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def cut_all(self) -> int:
        pairs, self._pairs = self._pairs, set()
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        self.cuts += len(pairs)
        return len(pairs)

    def flap(self, every: float) -> None:
        async def loop():
            while True:
                await asyncio.sleep(every)
                self.cut_all()
        self._flapping = asyncio.create_task(loop())

    async def stop_flapping(self) -> None:
        if self._flapping is not None:
            self._flapping.cancel()
            try:
                await self._flapping
            except asyncio.CancelledError:
                pass
            self._flapping = None

    async def close(self) -> None:
        await self.stop_flapping()
        if self.server is not None:
            self.server.close()
            self.cut_all()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        self.connections += 1

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()   # an end closed by its side is passed on as a close, not a cut

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
