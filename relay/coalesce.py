"""Blocking calls made in the same turn of the event loop, run together on a worker thread.

Why: a 4 KiB delivery to a local folder is two short worker-thread hops (stage, publish)
and the event loop's journal writes in between. With one hop per call, many worker threads
return from syscalls all the time and take the GIL whenever the loop releases it inside
SQLite, and the loop then waits to get it back: a journal statement costs the loop several
times as much beside busy threads as alone. Coalescing the calls of all jobs that reached
the same step into a few hops (at most ``max_batch`` calls each, at most ``max_parallel``
hops at once, so that slow fsyncs still overlap) cuts the hops and the threads competing
for the GIL (docs/performance.md, "Small files"). Where nothing waits for a disk (tmpfs),
bigger hops on fewer threads would do better still; on a disk the fsyncs need several hops
in flight.

Each call keeps the semantics of ``asyncio.to_thread``: it runs exactly once (or not at
all if its caller was cancelled before its hop started), in the order submitted within a
hop, and its result or exception goes to its own caller only. With ``elsewhere`` a hop may
run in a helper process instead (relay/file_workers.py); there a cancelled hop's calls
all run, their results unread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["Coalescer", "Elsewhere"]

T = TypeVar("T")
_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]
# Runs a hop's calls somewhere else (relay.file_workers): their (ok, result-or-exception)
# in order, or None to have this hop run on a thread as usual.
Elsewhere = Callable[[list[_Call]],
                     "Coroutine[Any, Any, list[tuple[bool, Any]]] | None"]


class Coalescer:
    """Run blocking callables on worker threads, several per hop. Submit from the event
    loop only (it is not thread-safe); a new loop (tests, the CLI) starts afresh."""

    def __init__(self, max_batch: int = 8, max_parallel: int = 4,
                 elsewhere: Elsewhere | None = None) -> None:
        if max_batch < 1 or max_parallel < 1:
            raise ValueError("max_batch and max_parallel must be at least 1")
        self.max_batch = max_batch
        self.max_parallel = max_parallel
        self.elsewhere = elsewhere
        self.hops = 0  # thread hops so far (for tests and curiosity)
        self._queue: list[_Call] = []
        self._running = 0
        self._kick_pending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``await asyncio.to_thread(fn, *args)``, sharing a hop with the calls submitted
        in the same turn of the loop."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Whatever an earlier loop left queued or counted died with it.
            self._loop, self._queue, self._running, self._kick_pending = loop, [], 0, False
            self._tasks = set()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.append((fn, args, fut))
        if not self._kick_pending:
            # Start on the next turn: every job that is ready now adds its call first.
            self._kick_pending = True
            loop.call_soon(self._kick)
        return await fut

    def _kick(self) -> None:
        self._kick_pending = False
        while self._queue and self._running < self.max_parallel:
            batch = [c for c in self._queue[:self.max_batch] if not c[2].cancelled()]
            del self._queue[:self.max_batch]
            if not batch:
                continue
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._hop(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _hop(self, batch: list[_Call]) -> None:
        loop = self._loop
        stop = threading.Event()  # set if this task is cancelled: skip what has not begun

        def work() -> list[tuple[bool, Any]]:
            out: list[tuple[bool, Any]] = []
            for fn, args, _ in batch:
                if stop.is_set():
                    break  # the rest are cancelled, below
                try:
                    out.append((True, fn(*args)))
                except BaseException as exc:  # handed to its own caller, as to_thread does
                    out.append((False, exc))
            return out

        self.hops += 1
        away = self.elsewhere(batch) if self.elsewhere is not None else None
        try:
            results = await (away if away is not None else asyncio.to_thread(work))
        except BaseException as exc:
            # Cancelled (the loop is shutting down), or the executor refused the hop.
            stop.set()
            for _, _, fut in batch:
                if fut.done():
                    continue
                if isinstance(exc, Exception):
                    fut.set_exception(exc)
                else:
                    fut.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            if self._loop is loop:  # else run() has started afresh on another loop
                self._running -= 1
                if self._queue and not self._kick_pending:
                    self._kick()
        for (_, _, fut), (ok, value) in zip(batch, results, strict=True):
            if fut.done():  # its caller was cancelled meanwhile
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
