"""The durable journal: one SQLite database in WAL mode.

Every state change is committed *before* the side effect it allows, so after ``kill -9``
at any instant a restart knows what may have happened and finishes it exactly once.

Transactions are group-committed (:mod:`relay.group_commit`): before a side effect its
caller awaits ``journal.durable()``.

A file's (or batch's) life is a row of table ``files``; each payload member at each
destination a row of ``deliveries``. Their states and the moves between them are
:mod:`relay.states`; every state change here is one of those moves or a JournalError.

``history`` holds every (route, destination, member, sha256) ever delivered: the
idempotency key. Sending the same content to the same place again is a no-op.

File names are whatever bytes the filesystem holds. A name that is not UTF-8 reaches us as
a surrogate-escaped str (``os.fsdecode``), which SQLite cannot store as TEXT; such values
are stored as the original bytes (BLOB) and read back with ``os.fsdecode``. Every other
value stays TEXT, so a journal from a relay version that stored every name as TEXT reads
unchanged.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

from relay.errors import JournalError
from relay.group_commit import GROUP_WINDOW, GroupCommit
from relay.states import DeliveryState, FileState, sources_of

__all__ = ["Delivery", "FileRow", "Journal"]

@dataclass
class FileRow:
    """One file (or batch) of a source. Each field's SQL is its column's definition."""

    id: Annotated[int, "INTEGER PRIMARY KEY"]
    source: Annotated[str, "TEXT NOT NULL"]
    rel: Annotated[str, "TEXT NOT NULL"]
    kind: Annotated[str, "TEXT NOT NULL DEFAULT 'file'"]  # file | batch
    route: Annotated[str | None, "TEXT"]
    state: Annotated[FileState, "TEXT NOT NULL"]
    reason: Annotated[str | None, "TEXT"]
    signal: Annotated[str | None, "TEXT"]
    declared_algo: Annotated[str | None, "TEXT"]
    declared_digest: Annotated[str | None, "TEXT"]
    sha256: Annotated[str | None, "TEXT"]
    size: Annotated[int | None, "INTEGER"]
    fingerprint: Annotated[str | None, "TEXT"]
    generation: Annotated[int, "INTEGER NOT NULL DEFAULT 1"]
    first_seen: Annotated[float, "REAL NOT NULL"]
    waiting_since: Annotated[float | None, "REAL"]
    ready_at: Annotated[float | None, "REAL"]
    updated_at: Annotated[float, "REAL NOT NULL"]

    def __post_init__(self) -> None:
        self.state = FileState(self.state)


@dataclass
class Delivery:
    """One payload member of a file at one destination."""

    id: Annotated[int, "INTEGER PRIMARY KEY"]
    file_id: Annotated[int, "INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE"]
    member: Annotated[str, "TEXT NOT NULL"]
    destination: Annotated[str, "TEXT NOT NULL"]
    target: Annotated[str, "TEXT NOT NULL"]
    tmp: Annotated[str | None, "TEXT"]
    state: Annotated[DeliveryState, "TEXT NOT NULL"]
    sha256: Annotated[str | None, "TEXT"]
    size: Annotated[int | None, "INTEGER"]
    acked: Annotated[int, "INTEGER NOT NULL DEFAULT 0"]
    attempts: Annotated[int, "INTEGER NOT NULL DEFAULT 0"]
    fallbacks: Annotated[int, "INTEGER NOT NULL DEFAULT 0"]
    next_try_at: Annotated[float | None, "REAL"]
    last_error: Annotated[str | None, "TEXT"]
    updated_at: Annotated[float, "REAL NOT NULL"]
    # the backend's own resume record (e.g. an upload's parts); added to older journals
    resume_state: Annotated[str | None, "TEXT"]

    def __post_init__(self) -> None:
        self.state = DeliveryState(self.state)


def _columns(row_type: type) -> dict[str, str]:
    """A row type's columns and their SQL, in field order (the order rows are built in)."""
    hints = get_type_hints(row_type, include_extras=True)
    return {f.name: hints[f.name].__metadata__[0] for f in fields(row_type)}


def _table(name: str, row_type: type, *constraints: str) -> str:
    cols = [f"    {c} {sql}" for c, sql in _columns(row_type).items()]
    return f"CREATE TABLE IF NOT EXISTS {name}(\n" + ",\n".join(
        [*cols, *(f"    {c}" for c in constraints)]) + "\n);\n"


# Explicit column lists in dataclass order, so rows are built positionally (cheaper than
# a dict per row) whatever the column order of an existing database file.
_FILE_COLS = ", ".join(_columns(FileRow))
_DELIVERY_COLS = ", ".join(_columns(Delivery))

_SCHEMA = _table("files", FileRow, "UNIQUE(source, rel, kind)") + """
CREATE INDEX IF NOT EXISTS files_state ON files(state);
""" + _table("deliveries", Delivery, "UNIQUE(file_id, member, destination)") + """
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


def _allowed(column: str, state: str | None, kind: type[FileState] | type[DeliveryState]
             ) -> tuple[str, tuple[str, ...]]:
    """The condition that makes a state change conditional on a move relay makes:
    ('' and no parameters when no state is set)."""
    if state is None:
        return "", ()
    moves = sources_of(kind(state))
    return f" AND {column} IN ({','.join('?' * len(moves))})", moves


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

    def files(self, *states: FileState) -> list[FileRow]:
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
        existing one only the given fields (a state among them only as a move
        :mod:`relay.states` allows)."""
        now = time.time()
        fields["updated_at"] = now
        insert = {"state": FileState.SEEN, "first_seen": now, **fields}
        cols = ["source", "rel", "kind", *insert]
        sets = ",".join(f"{k}=excluded.{k}" for k in fields)
        where, moves = _allowed("files.state", fields.get("state"), FileState)
        with self.tx(atomic=False) as db:
            rows = db.execute(f"INSERT INTO files({','.join(cols)}) VALUES "
                              f"({','.join('?' * len(cols))}) ON CONFLICT(source, rel, kind) "
                              f"DO UPDATE SET {sets}{where} RETURNING {_FILE_COLS}",
                              (source, rel, kind, *insert.values(), *moves)).fetchall()
        if not rows:
            row = self.get_file(source, rel, kind)
            raise JournalError(f"file {source}:{rel}: {row.state if row else '?'} → "
                               f"{fields.get('state')} is not a move relay makes")
        return FileRow(*_decoded(rows[0]))

    def update_file(self, file_id: int, **fields: Any) -> None:
        """Set columns of a file; a new state only as a move :mod:`relay.states` allows
        (JournalError otherwise). A file that is gone is no error: nothing is set."""
        fields["updated_at"] = time.time()
        sets = ",".join(f"{k}=?" for k in fields)
        where, moves = _allowed("state", fields.get("state"), FileState)
        with self.tx(atomic=False) as db:
            cur = db.execute(f"UPDATE files SET {sets} WHERE id=?{where}",
                             (*fields.values(), file_id, *moves))
            if where and not cur.rowcount:
                self._refused("files", file_id, fields["state"])

    def new_generation(self, file_id: int, **fields: Any) -> None:
        """New content under a known name: forget this file's per-destination rows (the
        ``history`` keeps what was delivered, for idempotency)."""
        fields["updated_at"] = time.time()
        sets = ",".join(f"{k}=?" for k in fields)
        where, moves = _allowed("state", fields.get("state"), FileState)
        with self.tx() as db:
            db.execute("DELETE FROM deliveries WHERE file_id=?", (file_id,))
            cur = db.execute(f"UPDATE files SET generation=generation+1, {sets} WHERE id=?"
                             f"{where}", (*fields.values(), file_id, *moves))
            if where and not cur.rowcount:
                self._refused("files", file_id, fields["state"])

    def _refused(self, table: str, row_id: int, state: object) -> None:
        """A conditional state change matched no row: gone (no error), or not allowed."""
        row = self.db.execute(f"SELECT state FROM {table} WHERE id=?", (row_id,)).fetchone()
        if row is not None:
            raise JournalError(f"{table} row {row_id}: {row[0]} → {state} is not a move "
                               "relay makes")

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
            cur = db.execute(
                "UPDATE files SET reason=CASE WHEN state='delivering' THEN reason END,"
                " state='delivering', updated_at=? WHERE id=? AND state IN ('ready',"
                " 'delivering')", (now, file_id))
            if not cur.rowcount:
                self._refused("files", file_id, FileState.DELIVERING)
        if len(created) < len(plan):
            return None
        return [Delivery(*_decoded(r)) for r in created]

    def deliveries(self, file_id: int | None = None, *states: DeliveryState
                   ) -> list[Delivery]:
        q, args = f"SELECT {_DELIVERY_COLS} FROM deliveries WHERE 1=1", list[object]()
        if file_id is not None:
            q += " AND file_id=?"
            args.append(file_id)
        if states:
            q += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(states)
        return [Delivery(*_decoded(r)) for r in self.db.execute(q + " ORDER BY id", args)]

    def update_delivery(self, delivery_id: int, **fields: Any) -> None:
        """Set columns of a delivery; a new state only as a move :mod:`relay.states`
        allows (JournalError otherwise)."""
        fields["updated_at"] = time.time()
        sets = ",".join(f"{k}=?" for k in fields)
        where, moves = _allowed("state", fields.get("state"), DeliveryState)
        with self.tx(atomic=False) as db:
            cur = db.execute(f"UPDATE deliveries SET {sets} WHERE id=?{where}",
                             (*fields.values(), delivery_id, *moves))
            if where and not cur.rowcount:
                self._refused("deliveries", delivery_id, fields["state"])

    def mark_renaming(self, staged: list[tuple[int, str, str, int]]) -> None:
        """(delivery id, temporary, sha256, size) → 'renaming', all in one transaction.
        Committed before the renames it allows: after a crash, recovery finishes every
        rename (of the temporary the backend reported: an upload may have its own)."""
        if not staged:
            return
        now = time.time()
        with self.tx(atomic=len(staged) > 1) as db:  # one row: one statement, atomic
            cur = db.executemany(
                "UPDATE deliveries SET state='renaming', tmp=?, sha256=?, size=?, acked=?, "
                "updated_at=? WHERE id=? AND state IN ('staging', 'renaming')",
                [(tmp, sha, size, size, now, i) for i, tmp, sha, size in staged])
            if cur.rowcount != len(staged):
                for i, *_ in staged:
                    self._refused_unless(i, DeliveryState.RENAMING)

    def mark_delivered(self, d: Delivery, sha256: str) -> None:
        """'delivered'; the trigger adds the history row (under the file's route)."""
        where, moves = _allowed("state", DeliveryState.DELIVERED, DeliveryState)
        with self.tx(atomic=False) as db:  # one statement (and its trigger): atomic
            cur = db.execute("UPDATE deliveries SET state='delivered', sha256=?, "
                             f"last_error=NULL, next_try_at=NULL, updated_at=? WHERE id=?{where}",
                             (sha256, time.time(), d.id, *moves))
            if not cur.rowcount:
                self._refused("deliveries", d.id, DeliveryState.DELIVERED)
        d.state = DeliveryState.DELIVERED

    def _refused_unless(self, delivery_id: int, state: DeliveryState) -> None:
        row = self.db.execute("SELECT state FROM deliveries WHERE id=?",
                              (delivery_id,)).fetchone()
        if row is not None and row[0] != state:
            raise JournalError(f"deliveries row {delivery_id}: {row[0]} → {state} is not a "
                               "move relay makes")

    def requeue(self, file_id: int, reason: str) -> None:
        """`relay retry`: a failed or quarantined file back to waiting, to be evaluated
        afresh (its fingerprint forgotten); its deliveries that gave up or wait for a retry
        back to pending with their attempts forgotten."""
        now = time.time()
        with self.tx() as db:
            db.execute("UPDATE deliveries SET state='pending', attempts=0, next_try_at=NULL,"
                       " updated_at=? WHERE file_id=? AND state IN ('failed', 'retry_wait')",
                       (now, file_id))
        self.update_file(file_id, state=FileState.WAITING, reason=reason, fingerprint=None,
                         waiting_since=now)

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
