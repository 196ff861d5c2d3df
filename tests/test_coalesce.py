"""Coalescer: calls of one loop turn share thread hops, each keeps to_thread's semantics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from relay.coalesce import Coalescer


def test_calls_of_one_turn_share_hops_within_the_limits() -> None:
    """20 calls submitted together: hops of at most max_batch calls, at most max_parallel
    at once, every caller gets its own result, and calls run on worker threads."""
    c = Coalescer(max_batch=8, max_parallel=2)
    lock = threading.Lock()
    running = peak = 0
    threads: set[int] = set()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.add(threading.get_ident())
        time.sleep(0.002)  # long enough for the hops to overlap if the limit allowed it
        with lock:
            running -= 1
        return i * i

    async def go() -> list[int]:
        return await asyncio.gather(*(c.run(work, i) for i in range(20)))

    assert asyncio.run(go()) == [i * i for i in range(20)]
    assert c.hops == 3  # 8 + 8 + 4
    assert peak <= 2
    assert threading.get_ident() not in threads


def test_one_call_alone_is_one_hop_at_once() -> None:
    """A single call (a file arriving alone) does not wait for company."""
    c = Coalescer()

    async def go() -> float:
        t = time.perf_counter()
        assert await c.run(lambda: "x") == "x"
        return time.perf_counter() - t

    assert asyncio.run(go()) < 1.0
    assert c.hops == 1


def test_an_exception_reaches_its_own_caller_only() -> None:
    c = Coalescer(max_batch=8, max_parallel=1)

    def work(i: int) -> int:
        if i == 3:
            raise OSError(f"bad {i}")
        return i

    async def go() -> list[int | BaseException]:
        return await asyncio.gather(*(c.run(work, i) for i in range(6)),
                                    return_exceptions=True)

    out = asyncio.run(go())
    assert [x for x in out if not isinstance(x, BaseException)] == [0, 1, 2, 4, 5]
    assert isinstance(out[3], OSError) and str(out[3]) == "bad 3"
    assert c.hops == 1


class _Gate:
    """Calls that record their argument; call 0 signals ``started`` and then waits for
    ``release`` (so a test can act while it runs)."""

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, i: int) -> int:
        if i == 0:
            self.started.set()
            self.release.wait(5)
        self.ran.append(i)
        return i


def test_a_call_cancelled_before_its_hop_never_runs() -> None:
    """As with to_thread, whose queued work item is dropped when its caller goes."""
    c = Coalescer(max_batch=1, max_parallel=1)
    work = _Gate()
    ran, started, release = work.ran, work.started, work.release

    async def go() -> None:
        first = asyncio.ensure_future(c.run(work, 0))
        second = asyncio.ensure_future(c.run(work, 1))
        third = asyncio.ensure_future(c.run(work, 2))
        assert await asyncio.to_thread(started.wait, 5)  # first hop running, others queued
        second.cancel()
        release.set()
        assert await first == 0
        assert await third == 2
        with pytest.raises(asyncio.CancelledError):
            await second

    asyncio.run(go())
    assert ran == [0, 2]


def test_works_again_on_a_new_loop() -> None:
    """The CLI and the tests run several loops in turn: nothing left by one blocks the next."""
    c = Coalescer()

    async def go(n: int) -> list[int]:
        return await asyncio.gather(*(c.run(int, i) for i in range(n)))

    assert asyncio.run(go(3)) == [0, 1, 2]
    assert asyncio.run(go(2)) == [0, 1]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Coalescer(max_batch=0)


def test_a_cancelled_hop_skips_what_it_has_not_begun() -> None:
    """When the loop shuts down (the hop's task is cancelled), the call running finishes
    on its thread, the rest of the hop is skipped, and every caller is told."""
    c = Coalescer(max_batch=3, max_parallel=1)
    work = _Gate()
    ran, started, release = work.ran, work.started, work.release

    async def go() -> list[int | BaseException]:
        calls = [asyncio.ensure_future(c.run(work, i)) for i in range(3)]
        assert await asyncio.to_thread(started.wait, 5)
        (hop,) = c._tasks
        hop.cancel()
        out = await asyncio.gather(*calls, return_exceptions=True)
        release.set()
        return out

    out = asyncio.run(go())  # returns once the executor's threads are done
    assert all(isinstance(x, asyncio.CancelledError) for x in out), out
    assert ran == [0]


def test_a_hop_runs_elsewhere_when_offered_else_on_a_thread() -> None:
    """``elsewhere`` (relay.file_workers) gets a hop's calls and answers per call, in
    order; when it declines (None) the hop runs on a thread as usual."""
    seen: list[list[int]] = []
    accept = [True]

    def elsewhere(batch: list[Any]) -> Coroutine[Any, Any, list[tuple[bool, Any]]] | None:
        if not accept[0]:
            return None
        args = [a[0] for _, a, _ in batch]
        seen.append(args)

        async def answer() -> list[tuple[bool, Any]]:
            return [(False, ValueError(x)) if x == 3 else (True, -x) for x in args]
        return answer()

    c = Coalescer(max_batch=8, elsewhere=elsewhere)

    async def go() -> list[Any]:
        return await asyncio.gather(*(c.run(abs, i) for i in range(5)),
                                    return_exceptions=True)

    got = asyncio.run(go())
    assert seen == [[0, 1, 2, 3, 4]]
    assert got[:3] == [0, -1, -2] and got[4] == -4 and isinstance(got[3], ValueError)
    accept[0] = False
    assert asyncio.run(go()) == [0, 1, 2, 3, 4]  # abs() itself, on a thread
    assert seen == [[0, 1, 2, 3, 4]]
