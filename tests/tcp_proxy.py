"""A loopback TCP proxy that counts what it forwards and can cut a connection.

    with TcpProxy("127.0.0.1", sshd.port, cut_after=10_000_000) as proxy:
        ... connect to proxy.port ...
        proxy.connections, proxy.bytes_up

``cut_after``: abort the first connection (both sides, no FIN) once that many bytes went
client → server through it; later connections pass untouched. ``cut()``: abort every open
connection now (e.g. right after the journal recorded progress). ``rate``: forward client →
server at most this many bytes per second, so a transfer lasts long enough to be cut in the
middle. Runs its own event loop in a thread.

``ChaosProxy`` (below) injects network faults at random while relay runs: cuts, stalls
(nothing forwarded, nothing closed) and slowdowns (throttled bandwidth).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from types import TracebackType
from typing import Self

__all__ = ["ChaosProxy", "TcpProxy"]

_CHUNK = 64 * 1024


def _open(t: asyncio.BaseTransport) -> bool:
    sock = t.get_extra_info("socket")
    return sock is not None and sock.fileno() != -1


class _ServerThread:
    """A server on 127.0.0.1 (a free port) with its own event loop in a thread, as a
    context manager. Subclasses bind in ``_start`` and close everything in ``_stop``."""

    host = "127.0.0.1"

    def __init__(self, name: str) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        # Every TCP transport the proxy made, to abort whatever is left when it stops: a
        # transport closing gracefully (data still buffered for a peer that stopped
        # reading) or set up while the proxy stopped would outlive the loop otherwise.
        self._transports: list[asyncio.WriteTransport] = []

    async def _abort_all(self) -> None:
        for t in self._transports:
            t.abort()
        # abort() closes the socket in a callback it schedules: let those run (bounded)
        for _ in range(100):
            if not any(_open(t) for t in self._transports):
                break
            await asyncio.sleep(0)

    def __enter__(self) -> Self:
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

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


class TcpProxy(_ServerThread):
    def __init__(self, target_host: str, target_port: int, *, cut_after: int | None = None,
                 rate: float | None = None) -> None:
        super().__init__("tcp-proxy")
        self.target = (target_host, target_port)
        self.cut_after = cut_after
        self.rate = rate
        self.connections = 0
        self.cuts = 0
        self.bytes_up = 0    # client → server, every connection
        self.bytes_down = 0  # server → client
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    def cut(self) -> None:
        """Abort every open connection (both sides) now; later ones pass untouched."""
        def _abort() -> None:
            if self._writers:
                self.cuts += 1
            for w in list(self._writers):
                w.transport.abort()

        self._loop.call_soon_threadsafe(_abort)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        # Handlers first (a cancelled one aborts both its sides), then every transport
        # left, also of a connection whose handler never started.
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._abort_all()
        await self._server.wait_closed()

    def _accepted(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        # Registered before the handler runs: a task cancelled before its first step
        # never runs its own cleanup.
        self._writers.add(cw)
        self._transports.append(cw.transport)
        task = asyncio.ensure_future(self._handle(cr, cw))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            await self._forward(cr, cw)
        finally:
            self._writers.discard(cw)

    async def _forward(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        except asyncio.CancelledError:
            cw.transport.abort()
            raise
        self._transports.append(sw.transport)
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
        except asyncio.CancelledError:
            abort_both()
            raise
        finally:
            self._writers.difference_update((cw, sw))


# -- chaos ---------------------------------------------------------------------------------

_TICK = 0.02  # seconds between throttled writes


class _Side(asyncio.Protocol):
    """One TCP leg of a proxied connection (client or server side)."""

    def __init__(self, conn: _ChaosConn) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.proxy._transports.append(transport)
        if self.conn.closed:
            # cut (or the proxy stopped) between accept and now: abort() found no
            # transport to close, and nobody else would ever close this one
            transport.abort()
            return
        self.conn.wake.set()

    def data_received(self, data: bytes) -> None:
        self.conn.received(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.conn.changed(self)
        return True  # half-close: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.changed(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _ChaosConn:
    """A client connection and its server leg, pumped by one task that honours the
    proxy's stall and throttle."""

    def __init__(self, proxy: ChaosProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.server = _Side(self)
        self.up = bytearray()    # client → server, not forwarded yet
        self.down = bytearray()  # server → client
        self.wake = asyncio.Event()
        self.doomed = False      # a side went away during a stall
        self.closed = False

    def received(self, side: _Side, data: bytes) -> None:
        (self.up if side is self.client else self.down).extend(data)
        self.wake.set()

    def changed(self, side: _Side) -> None:
        if not self.proxy.flowing.is_set():
            # A peer that gave up while the path was black-holed: what was in the path is
            # lost and the other end will be reset when the path comes back.
            self.doomed = True
        self.wake.set()

    def abort(self) -> None:
        self.closed = True
        self.client.abort()
        self.server.abort()
        self.wake.set()

    async def run(self) -> None:
        p = self.proxy
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: self.server, *p.target)
        except OSError:
            self.abort()
            return
        sent_eof = {"up": False, "down": False}
        try:
            while not self.closed:
                await p.flowing.wait()
                if self.doomed or self.client.lost or self.server.lost:
                    if self.doomed:
                        p.stall_resets += 1
                    self.abort()
                    return
                moved = False
                for key, q, src, dst in (("up", self.up, self.client, self.server),
                                         ("down", self.down, self.server, self.client)):
                    assert dst.transport is not None
                    if q:
                        n = len(q) if p.rate is None else max(1, int(p.rate * _TICK))
                        chunk = bytes(q[:n])
                        del q[:n]
                        dst.transport.write(chunk)
                        if key == "up":
                            p.bytes_up += len(chunk)
                        else:
                            p.bytes_down += len(chunk)
                        moved = True
                    elif src.eof and not sent_eof[key]:
                        sent_eof[key] = True
                        if dst.transport.can_write_eof():
                            dst.transport.write_eof()
                if all(sent_eof.values()):
                    for side in (self.client, self.server):
                        if side.transport is not None:
                            side.transport.close()
                    return
                if p.rate is not None and moved:
                    await asyncio.sleep(_TICK)  # a bandwidth limit, not synchronisation
                elif not moved:
                    self.wake.clear()
                    await self.wake.wait()
        finally:
            p.conns.discard(self)


class ChaosProxy(_ServerThread):
    """A loopback TCP proxy that, while chaos runs, at random instants cuts every open
    connection (abort both sides), stalls them (forwards nothing in either direction for
    a while, without closing; a side that gives up meanwhile gets the other side reset
    when the path comes back, like a black hole that swallowed the packets in flight), or
    slows them (throttles each direction to a random bandwidth for a while).

        with ChaosProxy("127.0.0.1", sshd.port, seed=1) as proxy:
            proxy.start_chaos()
            ...
            proxy.stop_chaos()   # back to a clean path
            proxy.cuts, proxy.stalls, proxy.slowdowns

    The first three actions are a cut, a long stall and a slowdown, so each kind happens
    in any run that lasts a few intervals; the rest are drawn with ``weights``.
    """

    def __init__(self, target_host: str, target_port: int, *, seed: int = 0,
                 interval: tuple[float, float] = (1.0, 3.0),
                 stall_for: tuple[float, float] = (0.5, 8.0),
                 slow_for: tuple[float, float] = (2.0, 6.0),
                 slow_rate: tuple[float, float] = (100e3, 2e6),
                 weights: tuple[float, float, float] = (1, 1, 1)) -> None:
        super().__init__("chaos-proxy")
        self.target = (target_host, target_port)
        self.rng = random.Random(seed)
        self.interval, self.stall_for, self.slow_for = interval, stall_for, slow_for
        self.slow_rate, self.weights = slow_rate, weights
        self.connections = 0
        self.cuts = 0            # cut actions that aborted at least one connection
        self.connections_cut = 0
        self.stalls = 0
        self.stalled_s = 0.0
        self.stall_resets = 0    # connections reset at the end of a stall
        self.slowdowns = 0
        self.slowed_s = 0.0
        self.bytes_up = 0
        self.bytes_down = 0
        self.actions: list[str] = []
        self.rate: float | None = None
        self._rates: list[float] = []
        self.conns: set[_ChaosConn] = set()
        self._chaos: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slows: set[asyncio.Future[None]] = set()
        self.flowing = asyncio.Event()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_chaos()
        super().__exit__(t, e, tb)

    async def _start(self) -> None:
        self.flowing.set()
        self._server = await self._loop.create_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for c in list(self.conns):
            c.abort()
        # A server leg still connecting is cancelled; _abort_all() closes what is left.
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._abort_all()
        await self._server.wait_closed()

    def _accept(self) -> _Side:
        conn = _ChaosConn(self)
        self.conns.add(conn)
        self.connections += 1
        task = self._loop.create_task(conn.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn.client

    # -- actions (run on the proxy's loop) -------------------------------------------

    def _cut(self) -> None:
        live = [c for c in self.conns if not c.closed]
        if live:
            self.cuts += 1
            self.connections_cut += len(live)
        for c in live:
            c.abort()

    async def _stall(self, seconds: float) -> None:
        self.stalls += 1
        self.flowing.clear()
        try:
            await asyncio.sleep(seconds)  # the fault's duration, not synchronisation
        finally:
            self.stalled_s += seconds
            self.flowing.set()

    async def _slow(self, rate: float, seconds: float) -> None:
        # Runs alongside later actions (a cut during a slowdown hits a file mid-way);
        # overlapping slowdowns throttle to the slowest of them.
        self.slowdowns += 1
        self._rates.append(rate)
        self.rate = min(self._rates)
        try:
            await asyncio.sleep(seconds)  # the fault's duration
        finally:
            self.slowed_s += seconds
            self._rates.remove(rate)
            self.rate = min(self._rates) if self._rates else None

    async def _chaos_loop(self) -> None:
        forced = ["cut", "stall", "slow"]
        while True:
            await asyncio.sleep(self.rng.uniform(*self.interval))
            kind = forced.pop(0) if forced else self.rng.choices(
                ["cut", "stall", "slow"], self.weights)[0]
            if kind == "cut":
                self._cut()
                self.actions.append("cut")
            elif kind == "stall":
                # The first stall is long enough to trip relay's watchdog; later ones
                # are drawn (short ones must pass without anyone noticing).
                seconds = (self.stall_for[1] if len(self.actions) == 1
                           else self.rng.uniform(*self.stall_for))
                self.actions.append(f"stall {seconds:.1f}s")
                await self._stall(seconds)
            else:
                rate = self.rng.uniform(*self.slow_rate)
                seconds = self.rng.uniform(*self.slow_for)
                self.actions.append(f"slow {rate / 1e3:.0f} kB/s {seconds:.1f}s")
                slow = asyncio.ensure_future(self._slow(rate, seconds))
                self._slows.add(slow)
                slow.add_done_callback(self._slows.discard)

    def start_chaos(self) -> None:
        def go() -> None:
            self._chaos = self._loop.create_task(self._chaos_loop())

        self._loop.call_soon_threadsafe(go)

    def stop_chaos(self) -> None:
        """Stop injecting faults; an ongoing stall or slowdown ends now."""
        async def halt() -> None:
            for task in [self._chaos, *self._slows]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._chaos = None

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(halt(), self._loop).result(10)

    def cut(self) -> None:
        """Abort every open connection now."""
        self._loop.call_soon_threadsafe(self._cut)

    def summary(self) -> str:
        return (f"{self.connections} connections, {self.cuts} cuts "
                f"({self.connections_cut} connections), {self.stalls} stalls "
                f"({self.stalled_s:.1f}s, {self.stall_resets} resets), {self.slowdowns} "
                f"slowdowns ({self.slowed_s:.1f}s)")
