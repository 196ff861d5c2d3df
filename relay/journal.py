"""The durable journal: one SQLite database in WAL mode.

Every state change is committed *before* the side effect it allows, so after ``kill -9``
at any instant a restart knows what may have happened and finishes it exactly once.

Group commit. On the event loop, transitions are written into one open transaction
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

File (or batch) lifecycle, table ``files``::

    seen → waiting ⇄ ready → delivering → delivered → done
                  ↘ quarantined(reason)       ↘ failed(reason)

Per destination, table ``deliveries`` (one row per payload member and destination)::

    pending → staging(tmp, acked) → renaming(sha256) → signalling → delivered
        ↖ retry_wait(attempt, next_try_at, error) ↙        failed(error)

``history`` holds every (route, destination, member, sha256) ever delivered: the
idempotency key. Sending the same content to the same place again is a no-op.

File names are whatever bytes the filesystem holds. A name that is not UTF-8 reaches us as
a surrogate-escaped str (``os.fsdecode``), which SQLite cannot store as TEXT; such values
are stored as the original bytes (BLOB) and read back with ``os.fsdecode``. Every other
value stays TEXT, so databases written before this are read unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Delivery", "FileRow", "Journal"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files(
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    rel TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'file',
    route TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    signal TEXT,
    declared_algo TEXT,
    declared_digest TEXT,
    sha256 TEXT,
    size INTEGER,
    fingerprint TEXT,
    generation INTEGER NOT NULL DEFAULT 1,
    first_seen REAL NOT NULL,
    waiting_since REAL,
    ready_at REAL,
    updated_at REAL NOT NULL,
    UNIQUE(source, rel, kind)
);
CREATE INDEX IF NOT EXISTS files_state ON files(state);
CREATE TABLE IF NOT EXISTS deliveries(
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    member TEXT NOT NULL,
    destination TEXT NOT NULL,
    target TEXT NOT NULL,
    tmp TEXT,
    state TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    acked INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    fallbacks INTEGER NOT NULL DEFAULT 0,
    next_try_at REAL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE(file_id, member, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state);
CREATE TABLE IF NOT EXISTS history(
    route TEXT NOT NULL,
    destination TEXT NOT NULL,
    member TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    target TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY(route, destination, member, sha256)
);
"""

FILE_STATES = ("seen", "waiting", "ready", "delivering", "delivered", "done", "failed",
               "quarantined")
DELIVERY_STATES = ("pending", "staging", "renaming", "signalling", "retry_wait", "delivered",
                   "failed")


@dataclass
class FileRow:
    id: int
    source: str
    rel: str
    kind: str
    route: str | None
    state: str
    reason: str | None
    signal: str | None
    declared_algo: str | None
    declared_digest: str | None
    sha256: str | None
    size: int | None
    fingerprint: str | None
    generation: int
    first_seen: float
    waiting_since: float | None
    ready_at: float | None
    updated_at: float


@dataclass
class Delivery:
    id: int
    file_id: int
    member: str
    destination: str
    target: str
    tmp: str | None
    state: str
    sha256: str | None
    size: int | None
    acked: int
    attempts: int
    fallbacks: int
    next_try_at: float | None
    last_error: str | None
    updated_at: float


def _to_sql(value: object) -> object:
    """A str SQLite cannot hold as TEXT (lone surrogates: a name that is not UTF-8) is
    stored as its filesystem bytes. The choice depends only on the value, so a name is
    always stored, and looked up, in the same form."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value)
    return value


def _decoded(row: Any) -> tuple[Any, ...]:
    """A positional row with the bytes of non-UTF-8 names back as the str we use."""
    return tuple(os.fsdecode(v) if isinstance(v, bytes) else v for v in row)


def _adapt(parameters: Any) -> Any:
    if isinstance(parameters, Mapping):
        return {k: _to_sql(v) for k, v in parameters.items()}
    return tuple(_to_sql(v) for v in parameters)


class _Connection(sqlite3.Connection):
    """A connection that adapts every parameter with :func:`_to_sql`. Local to the
    journal (a process-wide ``sqlite3.register_adapter(str, ...)`` would change every
    other SQLite user in the process)."""

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return super().execute(sql, _adapt(parameters))

    def executemany(self, sql: str, seq: Any, /) -> sqlite3.Cursor:
        return super().executemany(sql, [_adapt(p) for p in seq])


# Explicit column lists in dataclass order, so rows are built positionally (cheaper than
# a dict per row) whatever the column order of an existing database file.
_FILE_COLS = ("id, source, rel, kind, route, state, reason, signal, declared_algo, "
              "declared_digest, sha256, size, fingerprint, generation, first_seen, "
              "waiting_since, ready_at, updated_at")
_DELIVERY_COLS = ("id, file_id, member, destination, target, tmp, state, sha256, size, acked, "
                  "attempts, fallbacks, next_try_at, last_error, updated_at")

# How long an open group transaction may wait for more transitions before it is
# committed anyway (only what no side effect waits for waits this long).
GROUP_WINDOW = 0.002


class Journal:
    """SQLite-backed state machine. Not thread-safe: use it from the event loop only."""

    def __init__(self, path: Path, sync: str = "full", window: float = GROUP_WINDOW) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.full = sync == "full"
        self.window = window
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                  factory=_Connection)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a COMMIT writes the WAL without fsync (enough for kill -9); for "full"
        # the WAL is fsynced by _sync_wal before any side effect (see the module doc).
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)
        self._wal = f"{path}-wal"
        self._open: asyncio.AbstractEventLoop | None = None  # loop of the open group tx
        self._flush_at: asyncio.Handle | None = None
        self._committed = 0  # group commits so far
        self._synced = 0     # group commits known to be on stable storage
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._syncer: asyncio.Task[None] | None = None
        self._dir_synced = False

    def close(self) -> None:
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
        self.db.close()

    @contextmanager
    def tx(self, atomic: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic group of writes. On the event loop it joins the open group
        transaction (see the module doc: ``durable()`` before any side effect it allows);
        elsewhere it is committed (and fsynced when ``full``) when the block ends.
        ``atomic=False`` is for a block of a single write statement, which SQLite keeps
        atomic by itself: no savepoint needed."""
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

    # -- group commit ----------------------------------------------------------------------

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
        if self._syncer is None and self._synced < self._committed:
            self._syncer = asyncio.get_running_loop().create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        try:
            while self._synced < self._committed:
                upto = self._committed  # every commit up to here has written its frames
                await asyncio.to_thread(self._sync_wal)
                self._synced = max(self._synced, upto)
                self._wake(self._synced)
        except BaseException as exc:
            # An fsync that failed proves nothing: fail everyone who waits for it.
            self._wake(self._synced, exc, beyond=True)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._syncer = None

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

    # -- files ---------------------------------------------------------------------------

    def get_file(self, source: str, rel: str, kind: str = "file") -> FileRow | None:
        row = self.db.execute(f"SELECT {_FILE_COLS} FROM files WHERE source=? AND rel=? "
                              "AND kind=?", (source, rel, kind)).fetchone()
        return FileRow(*_decoded(row)) if row else None

    def file_by_id(self, file_id: int) -> FileRow | None:
        row = self.db.execute(f"SELECT {_FILE_COLS} FROM files WHERE id=?",
                              (file_id,)).fetchone()
        return FileRow(*_decoded(row)) if row else None

    def files(self, *states: str) -> list[FileRow]:
        if states:
            marks = ",".join("?" * len(states))
            rows = self.db.execute(f"SELECT {_FILE_COLS} FROM files WHERE state IN ({marks}) "
                                   "ORDER BY id", states)
        else:
            rows = self.db.execute(f"SELECT {_FILE_COLS} FROM files ORDER BY id")
        return [FileRow(*_decoded(r)) for r in rows]

    def upsert_file(self, source: str, rel: str, kind: str, **fields: Any) -> FileRow:
        """Insert or update a file row; ``fields`` are column values. Returns the row."""
        now = time.time()
        fields["updated_at"] = now
        with self.tx(atomic=False) as db:  # one write: the SELECT only picks which
            cur = db.execute("SELECT id FROM files WHERE source=? AND rel=? AND kind=?",
                             (source, rel, kind)).fetchone()
            if cur is None:
                fields.setdefault("state", "seen")
                fields.setdefault("first_seen", now)
                cols = ["source", "rel", "kind", *fields]
                row = db.execute(f"INSERT INTO files({','.join(cols)}) VALUES "
                                 f"({','.join('?' * len(cols))}) RETURNING {_FILE_COLS}",
                                 (source, rel, kind, *fields.values())).fetchall()[0]
            else:
                sets = ",".join(f"{k}=?" for k in fields)
                row = db.execute(f"UPDATE files SET {sets} WHERE id=? RETURNING {_FILE_COLS}",
                                 (*fields.values(), cur["id"])).fetchall()[0]
        return FileRow(*_decoded(row))

    def update_file(self, file_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        sets = ",".join(f"{k}=?" for k in fields)
        with self.tx(atomic=False) as db:
            db.execute(f"UPDATE files SET {sets} WHERE id=?", (*fields.values(), file_id))

    def new_generation(self, file_id: int, **fields: Any) -> None:
        """New content under a known name: forget this file's per-destination rows (the
        ``history`` keeps what was delivered, for idempotency)."""
        fields["updated_at"] = time.time()
        sets = ",".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute("DELETE FROM deliveries WHERE file_id=?", (file_id,))
            db.execute(f"UPDATE files SET generation=generation+1, {sets} WHERE id=?",
                       (*fields.values(), file_id))

    def delete_file(self, file_id: int) -> None:
        with self.tx(atomic=False) as db:
            db.execute("DELETE FROM files WHERE id=?", (file_id,))

    # -- deliveries ------------------------------------------------------------------------

    def plan_deliveries(self, file_id: int, plan: list[tuple[str, str, str]]) -> None:
        """Create pending rows for (member, destination, target) not yet planned, and mark
        the file delivering — one transaction."""
        now = time.time()
        with self.tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO deliveries(file_id, member, destination, target, state,"
                " updated_at) VALUES (?,?,?,?, 'pending', ?)",
                [(file_id, m, d, t, now) for m, d, t in plan])
            db.execute("UPDATE files SET state='delivering', reason=NULL, updated_at=? "
                       "WHERE id=?", (now, file_id))

    def deliveries(self, file_id: int | None = None, *states: str) -> list[Delivery]:
        q, args = f"SELECT {_DELIVERY_COLS} FROM deliveries WHERE 1=1", list[object]()
        if file_id is not None:
            q += " AND file_id=?"
            args.append(file_id)
        if states:
            q += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        return [Delivery(*_decoded(r)) for r in self.db.execute(q + " ORDER BY id", args)]

    def update_delivery(self, delivery_id: int, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        sets = ",".join(f"{k}=?" for k in fields)
        with self.tx(atomic=False) as db:
            db.execute(f"UPDATE deliveries SET {sets} WHERE id=?", (*fields.values(), delivery_id))

    def mark_renaming(self, staged: list[tuple[int, str, int]]) -> None:
        """(delivery id, sha256, size) → 'renaming', all in one transaction. Committed
        before the renames it allows: after a crash, recovery finishes every rename."""
        if not staged:
            return
        now = time.time()
        with self.tx(atomic=len(staged) > 1) as db:  # one row: one statement, atomic
            db.executemany("UPDATE deliveries SET state='renaming', sha256=?, size=?, acked=?, "
                           "updated_at=? WHERE id=?",
                           [(sha, size, size, now, i) for i, sha, size in staged])

    def mark_delivered(self, d: Delivery, route: str, sha256: str) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE deliveries SET state='delivered', sha256=?, last_error=NULL, "
                       "next_try_at=NULL, updated_at=? WHERE id=?", (sha256, now, d.id))
            db.execute("INSERT OR IGNORE INTO history VALUES (?,?,?,?,?,?)",
                       (route, d.destination, d.member, sha256, d.target, now))

    def already_delivered(self, route: str, destination: str, member: str, sha256: str) -> bool:
        return self.db.execute(
            "SELECT 1 FROM history WHERE route=? AND destination=? AND member=? AND sha256=?",
            (route, destination, member, sha256)).fetchone() is not None

    # -- reporting -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM files GROUP BY state")
        return {r[0]: r[1] for r in rows}

    def delivery_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
        return {r[0]: r[1] for r in rows}

    def history_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM history").fetchone()[0])
