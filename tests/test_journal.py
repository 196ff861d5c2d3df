"""The journal: group commit (what another process can see, when, and what a failure
does), and file names stored losslessly whatever their bytes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from relay.journal import Journal


def _states(path: Path) -> dict[str, str]:
    """The files table as another process sees it (committed rows only)."""
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT rel, state FROM files").fetchall())
    finally:
        db.close()


def test_on_the_loop_writes_are_committed_by_durable(tmp_path: Path) -> None:
    """Inside the event loop a transition joins the open group transaction: it is not
    committed until durable() (or the group window) commits it, and then it is."""
    path = tmp_path / "j.sqlite3"
    j = Journal(path, "full", window=60.0)  # only durable() may commit here

    async def go() -> None:
        j.upsert_file("in", "a", "file", state="seen")
        assert j.get_file("in", "a") is not None  # the loop sees its own writes
        assert _states(path) == {}
        await j.durable()
        assert _states(path) == {"a": "seen"}
        await j.durable()  # nothing pending: returns at once

    asyncio.run(go())
    j.close()


def test_group_window_commits_without_a_waiter(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path, "normal", window=0.01)

    async def go() -> None:
        j.upsert_file("in", "a", "file", state="seen")
        assert _states(path) == {}  # not committed by the write itself
        # Nothing awaits durable(): the window's own timer commits it, while the loop runs.
        deadline = time.monotonic() + 10
        while _states(path) != {"a": "seen"}:
            assert time.monotonic() < deadline, "the group window never committed"
            await asyncio.sleep(0.005)

    asyncio.run(go())
    j.close()


def test_outside_a_loop_every_write_commits_at_once(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path, "full")
    row = j.upsert_file("in", "a", "file", state="seen")
    j.update_file(row.id, state="waiting")
    assert _states(path) == {"a": "waiting"}
    j.close()


def test_close_commits_what_the_loop_left_open(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    j = Journal(path, "full", window=60.0)

    async def go() -> None:
        j.upsert_file("in", "a", "file", state="seen")

    asyncio.run(go())
    assert _states(path) == {}
    j.close()
    assert _states(path) == {"a": "seen"}


def test_concurrent_waiters_share_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty coroutines that each write and wait share a handful of WAL fsyncs, and
    none returns before an fsync that started after its write."""
    j = Journal(tmp_path / "j.sqlite3", "full")
    syncs: list[int] = []
    real = j._sync_wal

    def counting() -> None:
        syncs.append(j._committed)
        real()

    monkeypatch.setattr(j, "_sync_wal", counting)

    async def one(i: int) -> None:
        j.upsert_file("in", f"f{i}", "file", state="seen")
        await j.durable()
        assert j._synced >= 1 and syncs  # an fsync covered our commit

    async def go() -> None:
        await asyncio.gather(*(one(i) for i in range(20)))

    asyncio.run(go())
    assert 1 <= len(syncs) <= 3
    assert len(_states(tmp_path / "j.sqlite3")) == 20
    j.close()


def test_a_failed_fsync_fails_the_waiters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A side effect must not go ahead when its transition is not known to be durable."""
    j = Journal(tmp_path / "j.sqlite3", "full")

    def broken() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(j, "_sync_wal", broken)

    async def go() -> None:
        j.upsert_file("in", "a", "file", state="seen")
        with pytest.raises(OSError):
            await j.durable()

    asyncio.run(go())
    monkeypatch.undo()
    j.close()


def test_a_failing_method_rolls_back_only_itself(tmp_path: Path) -> None:
    """Each method is atomic inside the group transaction: one that fails midway leaves
    neither half behind, and the other transitions of the group still commit."""
    path = tmp_path / "j.sqlite3"
    j = Journal(path, "normal", window=60.0)

    async def go() -> None:
        row = j.upsert_file("in", "a", "file", state="seen")
        # the second statement violates NOT NULL after the first one ran
        with pytest.raises(sqlite3.IntegrityError), j.tx() as db:
            db.execute("UPDATE files SET state='ready' WHERE id=?", (row.id,))
            db.execute("INSERT INTO files(source, rel, kind, state, first_seen, "
                       "updated_at) VALUES ('in', 'b', 'file', NULL, 0, 0)")
        j.update_file(row.id, reason="kept")
        await j.durable()

    asyncio.run(go())
    db = sqlite3.connect(path)
    assert db.execute("SELECT rel, state, reason FROM files").fetchall() == [
        ("a", "seen", "kept")]
    db.close()
    j.close()


class _FailingCommit:
    """A connection whose COMMIT fails (disk I/O error), everything else passes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self._db.execute(sql, *args)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_a_failed_group_commit_fails_its_waiter(tmp_path: Path) -> None:
    """A COMMIT that fails (disk I/O error) rolls the group back and fails whoever waits
    for it: the side effect that waited does not happen, and nothing half-written stays."""
    path = tmp_path / "j.sqlite3"
    j = Journal(path, "normal", window=60.0)

    async def go() -> None:
        row = j.upsert_file("in", "a", "file", state="seen")
        await j.durable()
        j.update_file(row.id, state="ready")
        real = j.db
        j.db = _FailingCommit(real)  # type: ignore[assignment]
        with pytest.raises(sqlite3.OperationalError):
            await j.durable()
        j.db = real
        assert _states(path) == {"a": "seen"}
        assert j.get_file("in", "a").state == "seen"  # type: ignore[union-attr]
        j.update_file(row.id, state="waiting")  # the next write opens a new group
        await j.durable()
        assert _states(path) == {"a": "waiting"}

    asyncio.run(go())
    j.close()


# -- names that are not UTF-8 ----------------------------------------------------------

NOT_UTF8 = b"caf\xe9.csv".decode("utf-8", "surrogateescape")  # what os.fsdecode gives


def test_a_name_that_is_not_utf8_round_trips_as_its_bytes(tmp_path: Path) -> None:
    """A surrogate-escaped name is stored as its original bytes (BLOB), found again by the
    same str, and read back as that str; UTF-8 names stay TEXT."""
    j = Journal(tmp_path / "j.sqlite3")
    try:
        row = j.upsert_file("in", NOT_UTF8, "file", route="r", state="ready",
                            reason=f"malformed sidecar {NOT_UTF8}.sha256: empty")
        assert row.rel == NOT_UTF8 and row.reason is not None and NOT_UTF8 in row.reason
        assert j.get_file("in", NOT_UTF8) == row
        j.plan_deliveries(row.id, [(NOT_UTF8, "o", f"out/{NOT_UTF8}")])
        [d] = j.deliveries(row.id)
        assert (d.member, d.target) == (NOT_UTF8, f"out/{NOT_UTF8}")
        j.update_delivery(d.id, state="staging")
        j.mark_delivered(d, "0" * 64)
        assert j.already_delivered("r", "o", NOT_UTF8, "0" * 64)
        j.upsert_file("in", "café.csv", "file", route="r")
        stored = j.db.execute("SELECT rel, typeof(rel) FROM files ORDER BY id").fetchall()
        assert [tuple(r) for r in stored] == [(b"caf\xe9.csv", "blob"), ("café.csv", "text")]
    finally:
        j.close()


def test_a_journal_written_before_names_were_adapted_is_read_unchanged(tmp_path: Path) -> None:
    """Rows written as plain TEXT (every journal so far) are found and read as before."""
    path = tmp_path / "j.sqlite3"
    Journal(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT INTO files(source, rel, kind, state, first_seen, updated_at) "
                   "VALUES ('in', 'ünï.csv', 'file', 'done', 1, 1)")
    db.close()
    j = Journal(path)
    try:
        row = j.get_file("in", "ünï.csv")
        assert row is not None and row.state == "done"
        assert [r.rel for r in j.files("done")] == ["ünï.csv"]
    finally:
        j.close()


def test_a_retry_keeps_its_reason_visible_while_the_next_attempt_runs(tmp_path: Path) -> None:
    """Planning the first attempt drops the readiness reason; planning a retry keeps the
    last error ("disk full") for `relay status` until the attempt ends."""
    j = Journal(tmp_path / "j.sqlite3")
    try:
        row = j.upsert_file("in", "a.csv", "file", route="r", state="ready",
                            reason="sidecar a.csv.sha256")
        j.plan_deliveries(row.id, [("a.csv", "o", "a.csv")])
        first = j.file_by_id(row.id)
        assert first is not None and (first.state, first.reason) == ("delivering", None)
        j.update_file(row.id, reason="staging a.csv: disk full")
        j.plan_deliveries(row.id, [("a.csv", "o", "a.csv")])
        again = j.file_by_id(row.id)
        assert again is not None
        assert (again.state, again.reason) == ("delivering", "staging a.csv: disk full")
    finally:
        j.close()


def test_planning_returns_the_rows_only_when_it_made_them_all(tmp_path: Path) -> None:
    """A first attempt gets its new rows back (no read); when any row existed already (a
    retry, a restart) the caller is told to read them, since they carry state."""
    j = Journal(tmp_path / "j.sqlite3")
    try:
        row = j.upsert_file("in", "a.csv", "file", route="r", state="ready")
        plan = [("a.csv", "o1", "a.csv"), ("a.csv", "o2", "x/a.csv")]
        made = j.plan_deliveries(row.id, plan)
        assert made is not None
        assert [(d.member, d.destination, d.target, d.state) for d in made] == [
            ("a.csv", "o1", "a.csv", "pending"), ("a.csv", "o2", "x/a.csv", "pending")]
        assert made == j.deliveries(row.id)
        j.update_delivery(made[0].id, state="retry_wait", attempts=1)
        assert j.plan_deliveries(row.id, plan) is None
        assert [d.state for d in j.deliveries(row.id)] == ["retry_wait", "pending"]
    finally:
        j.close()


def test_a_files_digest_is_journalled_with_its_first_staged_delivery(tmp_path: Path) -> None:
    """files.sha256 (the guard against fanning out two versions of one generation) is
    written by the statement that journals a delivery 'renaming', or 'delivered' for a
    skipped duplicate; never over a digest already there, never for a batch."""
    j = Journal(tmp_path / "j.sqlite3")
    try:
        f = j.upsert_file("in", "a.csv", "file", route="r", state="ready")
        d1, d2 = j.plan_deliveries(f.id, [("a.csv", "o1", "a.csv"),
                                           ("a.csv", "o2", "a.csv")]) or []
        j.update_delivery(d1.id, state="staging", size=7)
        assert (j.file_by_id(f.id) or f).sha256 is None
        j.mark_renaming([(d1.id, ".a.csv.tmp", "aa", 7)])
        after = j.file_by_id(f.id)
        assert after is not None and (after.sha256, after.size) == ("aa", 7)
        j.update_delivery(d2.id, state="staging")
        j.mark_delivered(d2, "bb")  # a later one never overwrites it
        assert (j.file_by_id(f.id) or f).sha256 == "aa"

        g = j.upsert_file("in", "b.csv", "file", route="r", state="ready")
        (dup,) = j.plan_deliveries(g.id, [("b.csv", "o1", "b.csv")]) or []
        j.update_delivery(dup.id, state="staging")
        j.mark_delivered(dup, "cc")  # the same content was delivered before: skipped
        assert (j.file_by_id(g.id) or g).sha256 == "cc"

        b = j.upsert_file("in", "d", "batch", route="r", state="ready")
        (m,) = j.plan_deliveries(b.id, [("d/x", "o1", "d/x")]) or []
        j.update_delivery(m.id, state="staging")
        j.mark_renaming([(m.id, "d/.x.tmp", "dd", 1)])
        assert (j.file_by_id(b.id) or b).sha256 is None
    finally:
        j.close()
