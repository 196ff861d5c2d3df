"""Where a destination's blocking work runs: the scheduler between the pipeline and the
backends that do their file work as plain blocking calls
(:class:`relay.destinations.base.Blocking`, e.g. local folders).

A small payload's write, and every commit, is queued as one call of a grouped hop
(:mod:`relay.coalesce`): the calls that reach the same step in one turn of the loop share a
worker thread, or run in one of relay's helper processes (:mod:`relay.file_workers`) when
the backend allows it and relay started them. The source is opened there, by the functions
below, which are the pipeline's own: the backend only writes the bytes it is handed. A large
payload gets the backend's own ``write`` (a thread of its own, with progress reports).
Backends that are not blocking (SFTP, object stores) are awaited directly.
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from relay.coalesce import Coalescer
from relay.destinations import backend_of
from relay.destinations.base import Blocking, Destination, Staged, Transfer
from relay.file_workers import WORKERS
from relay.payload import Payload

__all__ = ["SMALL", "Hops"]

# Payloads up to this size are written in grouped hops: a few ms of work at most, so a
# hop-mate waits little; a larger one gets a thread of its own.
SMALL = 256 * 1024


def _no_progress(_: int) -> None:
    return None


def write_small(dest: Blocking, path: Path, target: str, tmp: str, algos: tuple[str, ...]
                ) -> Staged:
    """In a hop: open the payload, have the backend write it, read the digests."""
    with Payload(path, algos) as payload:
        staged = dest.write_blocking(payload, target, tmp, _no_progress)
        staged.digests = payload.digests()
    return staged


def commit(dest: Blocking, staged: Staged, announcements: Sequence[tuple[str, bytes]]
           ) -> bool:
    """In a hop: the backend's commit."""
    return dest.commit_blocking(staged, announcements)


class Hops:
    """One coalescer per blocking destination; the helper processes for those whose
    backend allows them."""

    def __init__(self) -> None:
        # None for a destination that is not blocking (decided once per destination: a
        # runtime Protocol check costs microseconds, and this is asked twice per file).
        self._groups: dict[str, Coalescer | None] = {}

    def _group(self, dest: Destination) -> Coalescer | None:
        if dest.name in self._groups:
            return self._groups[dest.name]
        group = None
        if isinstance(dest, Blocking):
            helpers = backend_of(dest.rule).helpers

            def elsewhere(batch: list[Any]
                          ) -> Coroutine[Any, Any, list[tuple[bool, Any]]] | None:
                if not helpers or not WORKERS.active:
                    return None
                return WORKERS.run([(fn, args) for fn, args, _ in batch])

            group = Coalescer(elsewhere=elsewhere)
        self._groups[dest.name] = group
        return group

    def forget(self, name: str) -> None:
        """``name`` was replaced (a rules reload): decide again for its new destination."""
        self._groups.pop(name, None)

    async def write(self, dest: Destination, path: Path, size: int | None, target: str,
                    tmp: str, algos: tuple[str, ...], transfer: Transfer) -> Staged:
        """Stream ``path`` to ``dest``'s temporary ``tmp``; the Staged carries the
        digests of every byte written. ``size``: the payload's size when last seen."""
        group = self._group(dest)
        if group is not None and (size is None or size <= SMALL):
            # A small copy reports its progress once, when it is done (a callback cannot
            # cross to a helper process).
            staged = await group.run(write_small, dest, path, target, tmp, algos)
            transfer.progress(staged.size)
            return staged
        with Payload(path, algos) as payload:
            staged = await dest.write(payload, target, tmp, transfer)
            staged.digests = payload.digests()
        return staged

    async def commit(self, dest: Destination, staged: Staged,
                     announcements: Sequence[tuple[str, bytes]]) -> bool:
        """``dest.commit``, in a grouped hop for blocking backends."""
        group = self._group(dest)
        if group is not None:
            return await group.run(commit, dest, staged, announcements)
        return await dest.commit(staged, announcements)
