"""Helper processes for the small-file work of local destinations.

Why processes: the local backend's work per small file is a dozen short syscalls, and with
worker *threads* each of them is a turn of the GIL, which the event loop then waits to get
back (relay/coalesce.py). The kernel's side of those hand-offs — futex waits and wake-ups,
context switches — is a large share of a small-file run's CPU. A helper process has a GIL
of its own: the loop hands it a hop of up to eight calls through a pipe and gets their
results back, and no thread of the main process competes with the loop meanwhile
(docs/performance.md, "Small files").

The pool is forked once, before the event loop, the journal and any thread exist (``start``),
so every child is a copy of a single-threaded process: no lock can be held across the
fork. A child only runs the scheduler's hop functions (relay/hops.py) on destinations
rebuilt from their rules; it dies with relay: ``PR_SET_PDEATHSIG`` makes the kernel
kill it when relay exits, even by SIGKILL, so nothing a dead relay asked for can land after
its successor has started recovery (a call in progress at that moment finishes its current
syscall, as a thread's would). SIGINT and SIGHUP are ignored in the children: a terminal's
Ctrl-C or hang-up reaches the whole process group, and stopping or reloading is relay's
decision. SIGTERM is not: the pool's own clean-up uses it, and a service manager that
signals every process of the service (systemd's default) stops the helpers at once — relay
then drains on threads and the helpers' unfinished calls are retried (``run``).

Large files never come here: one call streams for seconds and needs progress reports; they
keep a thread of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import pickle
import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from relay.errors import RetryableError
from relay.logs import get_logger

__all__ = ["WORKERS", "Call", "FileWorkers"]

log = get_logger()

_PR_SET_PDEATHSIG = 1


def _child_init() -> None:
    # Not on Linux (no prctl): the pool's own clean-up at relay's exit still applies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


Call = tuple[Callable[..., Any], tuple[Any, ...]]  # a function importable by name, its args


def _run_batch(calls: list[Call]) -> list[tuple[bool, Any]]:
    """In a child: each call's result or exception, in order. The functions are the
    scheduler's (relay.hops); a destination among the arguments arrives as its rule and is
    rebuilt once per child (see its ``__reduce__``)."""
    out: list[tuple[bool, Any]] = []
    for fn, args in calls:
        try:
            out.append((True, fn(*args)))
        except Exception as exc:
            try:
                pickle.loads(pickle.dumps(exc))  # some only fail when rebuilt
            except Exception:  # it must cross the pipe: keep its text, in the relay tree
                exc = RetryableError(f"{type(exc).__name__}: {exc}")
            out.append((False, exc))
    return out


class FileWorkers:
    """A pool of helper processes, or none (then callers use their threads)."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    @property
    def active(self) -> bool:
        return self._pool is not None

    def start(self, count: int) -> None:
        """Fork ``count`` helpers now (call before any thread or event loop exists). A
        platform without fork, or a failure to fork, leaves the pool off: relay then works
        as it did without it, on threads."""
        if count < 1 or self._pool is not None:
            return
        if "fork" not in multiprocessing.get_all_start_methods():
            return
        pool = concurrent.futures.ProcessPoolExecutor(
            count, mp_context=multiprocessing.get_context("fork"), initializer=_child_init)
        try:
            # fork-context pools fork every child at the first submit: do it here, now.
            pool.submit(int).result(timeout=30)
        except Exception as exc:
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("file_workers_unavailable", error=str(exc) or type(exc).__name__,
                        fallback="threads")
            return
        self._pool = pool
        log.info("file_workers_started", count=count)

    async def run(self, calls: list[Call]) -> list[tuple[bool, Any]]:
        """Run ``calls`` (function, arguments) in one helper, in order — or on a thread,
        when the pool was lost since the caller saw it active."""
        pool = self._pool
        if pool is None:
            return await asyncio.to_thread(_run_batch, calls)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, _run_batch, calls)
        except BrokenProcessPool as exc:
            # A helper died (OOM killer, a stray kill): what its calls did is unknown, so
            # they fail as retryable — the retry takes it from what the journal says, as
            # after a crash. The pool is gone; a new fork would copy a threaded process,
            # so the rest of this run works on threads.
            if self._pool is pool:
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                log.error("file_workers_lost", error=str(exc) or type(exc).__name__,
                          fallback="threads")
            return [(False, RetryableError(f"file helper process died: {exc}"))] * len(calls)

    def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


WORKERS = FileWorkers()
