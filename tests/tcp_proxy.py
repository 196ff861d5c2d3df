"""A loopback TCP proxy that counts what it forwards and can cut a connection.

    with TcpProxy("127.0.0.1", sshd.port, cut_after=10_000_000) as proxy:
        ... connect to proxy.port ...
        proxy.connections, proxy.bytes_up

``cut_after``: abort the first connection (both sides, no FIN) once that many bytes went
client → server through it; later connections pass untouched. ``cut()``: abort every open
connection now (e.g. right after the journal recorded progress). ``rate``: forward client →
server at most this many bytes per second, so a transfer lasts long enough to be cut in the
middle. Runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import TracebackType

__all__ = ["TcpProxy"]

_CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, cut_after: int | None = None,
                 rate: float | None = None) -> None:
        self.target = (target_host, target_port)
        self.cut_after = cut_after
        self.rate = rate
        self.host = "127.0.0.1"
        self.port = 0
        self.connections = 0
        self.cuts = 0
        self.bytes_up = 0    # client → server, every connection
        self.bytes_down = 0  # server → client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> None:
        """Abort every open connection (both sides) now; later ones pass untouched."""
        def _abort() -> None:
            if self._writers:
                self.cuts += 1
            for w in list(self._writers):
                w.transport.abort()

        self._loop.call_soon_threadsafe(_abort)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        self._writers.update((cw, sw))
        cut = self.cut_after if first else None

        def abort_both() -> None:
            cw.transport.abort()
            sw.transport.abort()

        async def up() -> None:
            sent, free_at = 0, time.monotonic()
            while data := await cr.read(_CHUNK):
                if cut is not None and sent + len(data) >= cut:
                    sw.write(data[:cut - sent])
                    self.bytes_up += cut - sent
                    await sw.drain()
                    self.cuts += 1
                    abort_both()
                    return
                sw.write(data)
                sent += len(data)
                self.bytes_up += len(data)
                await sw.drain()
                if self.rate:  # a rate limit (no idle credit), not synchronisation
                    free_at = max(free_at, time.monotonic()) + len(data) / self.rate
                    await asyncio.sleep(max(0.0, free_at - time.monotonic()))
            sw.close()

        async def down() -> None:
            while data := await sr.read(_CHUNK):
                cw.write(data)
                self.bytes_down += len(data)
                await cw.drain()
            cw.close()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.IncompleteReadError):
            abort_both()
        finally:
            self._writers.difference_update((cw, sw))
