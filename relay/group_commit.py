"""Group commit for one SQLite connection in WAL mode.

On the event loop, transitions are written into one open transaction
(each method atomic inside it, via a savepoint) that is committed a few milliseconds
later, or at once when a caller needs it: before a side effect, the caller does
``await journal.durable()``, which commits everything written so far and, with
``sync="full"``, waits until the write-ahead log is fsynced (one fsync, on a worker
thread, serves every waiter that arrived meanwhile). Why this is as safe as one
synchronous transaction per transition:

* One connection, one open transaction at a time, committed in program order: what a
  ``kill -9`` leaves committed is always the state after some *prefix* of the
  transitions, exactly as if the process had been killed when that prefix ended.
* A side effect is only started after ``durable()``: its enabling transition is in that
  prefix. A side effect that is not preceded by ``durable()`` must be one that recovery
  redoes or tolerates from the earlier state (rewriting a signal, removing a temporary).
* The connection runs ``synchronous=NORMAL``: a COMMIT has written its WAL frames to the
  OS, which survives the process. For ``full`` (power loss too) we fsync the ``-wal``
  file ourselves before ``durable()`` returns, covering every commit made before the
  fsync started; SQLite still syncs the WAL before and the database after each
  checkpoint, as in FULL. Transitions not followed by ``durable()`` are fsynced by the
  same background syncer a moment later.

Outside an event loop (the CLI's ``retry``, tests) every transaction commits at once, as
before, and is fsynced when ``sync="full"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

__all__ = ["GROUP_WINDOW", "GroupCommit"]

# How long an open group transaction may wait for more transitions before it is
# committed anyway (only what no side effect waits for waits this long).
GROUP_WINDOW = 0.002


class GroupCommit:
    """Transactions and durability for ``db`` (autocommit mode, WAL, synchronous=NORMAL),
    the database file at ``path``; ``full``: fsync the WAL before :meth:`durable` returns."""

    def __init__(self, db: sqlite3.Connection, path: Path, full: bool,
                 window: float = GROUP_WINDOW) -> None:
        self.db = db
        self.path = path
        self.full = full
        self.window = window
        self._wal = f"{path}-wal"
        self._open: asyncio.AbstractEventLoop | None = None  # loop of the open group tx
        self._flush_at: asyncio.Handle | None = None
        self._committed = 0  # group commits so far
        self._synced = 0     # group commits known to be on stable storage
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._syncer: asyncio.Future[None] | None = None
        self._dir_synced = False
        # The open group as a context manager for one statement: nothing around the block.
        self._joined = contextlib.nullcontext(db)

    def commit_all(self) -> None:
        """Commit what is open and, with ``full``, fsync it (at close: no loop needed)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._open is not None:
            self._open = None
            self.db.execute("COMMIT")
            self._committed += 1
        if self.full and self._synced < self._committed:
            self._sync_wal()
            self._synced = self._committed

    def tx(self, atomic: bool = True) -> AbstractContextManager[sqlite3.Connection]:
        """One atomic group of writes. On the event loop it joins the open group
        transaction (see the module doc: ``durable()`` before any side effect it allows);
        elsewhere it is committed (and fsynced when ``full``) when the block ends.
        ``atomic=False`` is for a block of a single write statement, which SQLite keeps
        atomic by itself: no savepoint needed."""
        if not atomic and self._open is not None:
            # The usual case on a busy loop: joining the open group needs nothing done
            # before or after the block, so skip the generator machinery (several per file).
            try:
                if self._open is asyncio.get_running_loop():
                    return self._joined
            except RuntimeError:
                pass
        return self._tx(atomic)

    @contextmanager
    def _tx(self, atomic: bool) -> Iterator[sqlite3.Connection]:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._open is not None and self._open is not loop:
            self._commit()  # left open by a loop that is gone: commit it, in order
        if loop is None:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            if self.full:
                self._sync_wal()
            return
        if self._open is None:
            self.db.execute("BEGIN IMMEDIATE")
            self._open = loop
            self._flush_at = loop.call_later(self.window, self._commit_later)
        if not atomic:
            yield self.db
            return
        self.db.execute("SAVEPOINT w")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK TO w")
            self.db.execute("RELEASE w")
            raise
        self.db.execute("RELEASE w")

    async def durable(self) -> None:
        """Return once every transition written so far is committed (and, with
        ``sync="full"``, on stable storage). Await it before each side effect that a
        transition allows. Concurrent callers share one commit and one fsync."""
        if self._open is None and self._synced >= self._committed:
            return
        loop = asyncio.get_running_loop()
        if self._open is not None and self._open is not loop:
            self._commit()
        target = self._committed + (1 if self._open is not None else 0)
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, fut))
        if self._open is not None:
            # Commit on the next turn of the loop, so that every coroutine that is
            # ready now adds its transitions to the same commit.
            if self._flush_at is not None:
                self._flush_at.cancel()
            self._flush_at = loop.call_soon(self._commit_later)
        else:
            self._start_sync()
        await fut

    def _commit_later(self) -> None:
        # A loop callback: the waiters have the error; the next write opens a new tx.
        with contextlib.suppress(sqlite3.Error):
            self._commit()

    def _commit(self) -> None:
        """Commit the open group transaction (on the loop thread: no fsync here)."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self._open is None:
            return
        self._open = None
        try:
            self.db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            # What waited for this commit must not go ahead with its side effects.
            self._wake(self._committed, exc, beyond=True)
            raise
        self._committed += 1
        if self.full:
            self._start_sync()
        else:
            self._synced = self._committed
            self._wake(self._synced)

    def _start_sync(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a group left open by an ended loop, committed outside one
            if self._synced < self._committed:
                self._sync_wal()
                self._synced = self._committed
            return
        if self._syncer is not None and self._syncer.get_loop() is not loop:
            self._syncer = None  # left behind by a loop that has ended (tests, the CLI)
        if self._syncer is None and self._synced < self._committed:
            self._sync_next(loop)

    def _sync_next(self, loop: asyncio.AbstractEventLoop) -> None:
        """fsync the WAL on a worker thread, covering every commit made so far; again when
        more commits came meanwhile. A future with a callback, not a task: a loop that
        ends before it runs leaves no coroutine behind (the commits stay unsynced until
        the journal is closed, which syncs them)."""
        upto = self._committed  # every commit up to here has written its frames
        try:
            fut = loop.run_in_executor(None, self._sync_wal)
        except RuntimeError:  # the loop is shutting its executor down: sync here
            self._sync_wal()
            self._synced = max(self._synced, upto)
            self._wake(self._synced)
            return
        self._syncer = fut

        def done(f: asyncio.Future[None]) -> None:
            self._syncer = None
            exc: BaseException | None = (asyncio.CancelledError() if f.cancelled()
                                         else f.exception())
            if exc is not None:
                # An fsync that failed proves nothing: fail everyone who waits for it.
                self._wake(self._synced, exc, beyond=True)
                return
            self._synced = max(self._synced, upto)
            self._wake(self._synced)
            if self._synced < self._committed and not loop.is_closed():
                self._sync_next(loop)

        fut.add_done_callback(done)

    def _wake(self, upto: int, exc: BaseException | None = None,
              beyond: bool = False) -> None:
        """Resolve the waiters whose commit is ``<= upto`` (or, with ``beyond``, fail the
        ones whose commit is ``> upto`` with ``exc``)."""
        keep = []
        for target, fut in self._waiters:
            if fut.done():
                continue
            if beyond and target > upto:
                fut.set_exception(exc if exc is not None else RuntimeError("commit failed"))
            elif not beyond and target <= upto:
                fut.set_result(None)
            else:
                keep.append((target, fut))
        self._waiters = keep

    def _sync_wal(self) -> None:
        """fsync the write-ahead log (and, once, the folder that holds it, as the WAL
        file may have been created by this process). fsync is per file, not per
        descriptor: it flushes every frame SQLite wrote before it was called."""
        try:
            fd = os.open(self._wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # no WAL (nothing written, or checkpointed and removed): nothing to sync
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not self._dir_synced:
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._dir_synced = True
