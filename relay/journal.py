"""The durable journal: one SQLite database in WAL mode.

Every state change is committed *before* the side effect it allows, so after ``kill -9``
at any instant a restart knows what may have happened and finishes it exactly once.

Transactions are group-committed (:mod:`relay.group_commit`): before a side effect its
caller awaits ``journal.durable()``.

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

import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.group_commit import GROUP_WINDOW, GroupCommit

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
    resume_state TEXT,
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
-- The history row is written by the same statement that marks a delivery delivered:
-- atomic without a savepoint, and one statement fewer per file.
CREATE TRIGGER IF NOT EXISTS history_on_delivered AFTER UPDATE OF state ON deliveries
WHEN NEW.state = 'delivered' AND NEW.sha256 IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO history
        SELECT f.route, NEW.destination, NEW.member, NEW.sha256, NEW.target, NEW.updated_at
        FROM files f WHERE f.id = NEW.file_id AND f.route IS NOT NULL;
END;
-- A single file's content identity is recorded with its first staged delivery, by the
-- statement that journals it 'renaming' (or 'delivered', for a duplicate skipped): before
-- any rename, as the guard against fanning out two versions needs, without a statement.
CREATE TRIGGER IF NOT EXISTS file_sha256_on_staged AFTER UPDATE OF state ON deliveries
WHEN NEW.state IN ('renaming', 'delivered') AND NEW.sha256 IS NOT NULL
BEGIN
    UPDATE files SET sha256 = NEW.sha256, size = NEW.size, updated_at = NEW.updated_at
        WHERE id = NEW.file_id AND kind = 'file' AND sha256 IS NULL;
END;
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
    resume_state: str | None  # the backend's own resume record (e.g. an upload's parts)


def _to_sql(value: object) -> object:
    """A str SQLite cannot hold as TEXT (lone surrogates: a name that is not UTF-8) is
    stored as its filesystem bytes. The choice depends only on the value, so a name is
    always stored, and looked up, in the same form."""
    if isinstance(value, str) and not value.isascii():  # ASCII is UTF-8: skip the encode
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value)
    return value


def _decoded(row: Any) -> tuple[Any, ...]:
    """A positional row with the bytes of non-UTF-8 names back as the str we use."""
    for v in row:  # a plain loop: most rows hold no bytes, and this runs for every row
        if isinstance(v, bytes):
            return tuple(os.fsdecode(v) if isinstance(v, bytes) else v for v in row)
    return tuple(row)


def _adapt(parameters: Any) -> Any:
    if isinstance(parameters, Mapping):
        return {k: _to_sql(v) for k, v in parameters.items()}
    for v in parameters:  # the common case: nothing to change, no new tuple
        if isinstance(v, str) and not v.isascii():
            return tuple(_to_sql(v) for v in parameters)
    return parameters


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
                  "attempts, fallbacks, next_try_at, last_error, updated_at, resume_state")


class Journal(GroupCommit):
    """SQLite-backed state machine. Not thread-safe: use it from the event loop only."""

    def __init__(self, path: Path, sync: str = "full", window: float = GROUP_WINDOW) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
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
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(deliveries)")}
        if "resume_state" not in columns:  # a journal written before backends had one
            self.db.execute("ALTER TABLE deliveries ADD COLUMN resume_state TEXT")
        super().__init__(self.db, path, sync == "full", window)

    def close(self) -> None:
        self.commit_all()
        self.db.close()

    # -- files ---------------------------------------------------------------------------

    def get_file(self, source: str, rel: str, kind: str = "file") -> FileRow | None:
        row = self.db.execute(f"SELECT {_FILE_COLS} FROM files WHERE source=? AND rel=? "
                              "AND kind=?", (source, rel, kind)).fetchone()
        return FileRow(*_decoded(row)) if row else None

    def get_files(self, source: str, rels: list[str], kind: str = "file"
                  ) -> dict[str, FileRow]:
        """:meth:`get_file` for many names of one source, in one statement."""
        out: dict[str, FileRow] = {}
        for i in range(0, len(rels), 500):
            part = rels[i:i + 500]
            rows = self.db.execute(
                f"SELECT {_FILE_COLS} FROM files WHERE source=? AND kind=? AND rel IN "
                f"({','.join('?' * len(part))})", (source, kind, *part))
            for r in rows:
                row = FileRow(*_decoded(r))
                out[row.rel] = row
        return out

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
        """Insert or update a file row; ``fields`` are column values. Returns the row.
        One statement: a new row gets state 'seen' and first_seen unless given; an
        existing one only the given fields."""
        now = time.time()
        fields["updated_at"] = now
        insert = {"state": "seen", "first_seen": now, **fields}
        cols = ["source", "rel", "kind", *insert]
        sets = ",".join(f"{k}=excluded.{k}" for k in fields)
        with self.tx(atomic=False) as db:
            row = db.execute(f"INSERT INTO files({','.join(cols)}) VALUES "
                             f"({','.join('?' * len(cols))}) ON CONFLICT(source, rel, kind) "
                             f"DO UPDATE SET {sets} RETURNING {_FILE_COLS}",
                             (source, rel, kind, *insert.values())).fetchall()[0]
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

    def plan_deliveries(self, file_id: int, plan: list[tuple[str, str, str]]
                        ) -> list[Delivery] | None:
        """Create pending rows for (member, destination, target) not yet planned, and mark
        the file delivering. Returns the file's delivery rows when every one was created
        now (a first attempt: the caller need not read them back), else None."""
        now = time.time()
        created = []
        # No savepoint: either write alone is a state recovery handles (the rows are
        # planned again, idempotently, for a file still 'ready').
        with self.tx(atomic=False) as db:
            for m, d, t in plan:
                created += db.execute(
                    "INSERT INTO deliveries(file_id, member, destination, target, state,"
                    " updated_at) VALUES (?,?,?,?, 'pending', ?) ON CONFLICT DO NOTHING"
                    f" RETURNING {_DELIVERY_COLS}", (file_id, m, d, t, now)).fetchall()
            # The readiness reason goes; a retry's reason ("disk full") stays visible in
            # `relay status` while the next attempt runs.
            db.execute("UPDATE files SET reason=CASE WHEN state='delivering' THEN reason END,"
                       " state='delivering', updated_at=? WHERE id=?", (now, file_id))
        if len(created) < len(plan):
            return None
        return [Delivery(*_decoded(r)) for r in created]

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

    def mark_renaming(self, staged: list[tuple[int, str, str, int]]) -> None:
        """(delivery id, temporary, sha256, size) → 'renaming', all in one transaction.
        Committed before the renames it allows: after a crash, recovery finishes every
        rename (of the temporary the backend reported: an upload may have its own)."""
        if not staged:
            return
        now = time.time()
        with self.tx(atomic=len(staged) > 1) as db:  # one row: one statement, atomic
            db.executemany("UPDATE deliveries SET state='renaming', tmp=?, sha256=?, size=?, "
                           "acked=?, updated_at=? WHERE id=?",
                           [(tmp, sha, size, size, now, i) for i, tmp, sha, size in staged])

    def mark_delivered(self, d: Delivery, sha256: str) -> None:
        """'delivered'; the trigger adds the history row (under the file's route)."""
        with self.tx(atomic=False) as db:  # one statement (and its trigger): atomic
            db.execute("UPDATE deliveries SET state='delivered', sha256=?, last_error=NULL, "
                       "next_try_at=NULL, updated_at=? WHERE id=?", (sha256, time.time(), d.id))
        d.state = "delivered"

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
