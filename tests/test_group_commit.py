"""relay.group_commit: many transitions share a commit and an fsync; durable() means it."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import warnings
from pathlib import Path

import pytest

from relay.group_commit import GroupCommit


def _group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[GroupCommit, list[int]]:
    path = tmp_path / "g.sqlite3"
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(x INTEGER)")
    group = GroupCommit(db, path, full=True)
    syncs: list[int] = []
    real = group._sync_wal

    def counted() -> None:
        syncs.append(group._committed)
        real()

    monkeypatch.setattr(group, "_sync_wal", counted)
    return group, syncs


def test_concurrent_callers_share_one_commit_and_one_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten transitions written in one turn of the loop, ten durable() waiters: one COMMIT,
    one fsync of the WAL, and every waiter returns after it; a second reader sees all."""
    group, syncs = _group(tmp_path, monkeypatch)

    async def writer(i: int) -> None:
        with group.tx(atomic=False) as db:
            db.execute("INSERT INTO t VALUES (?)", (i,))
        await group.durable()

    async def scenario() -> None:
        await asyncio.gather(*(writer(i) for i in range(10)))

    asyncio.run(scenario())
    assert group._committed == 1 and syncs == [1]
    other = sqlite3.connect(str(tmp_path / "g.sqlite3"))
    assert other.execute("SELECT COUNT(*) FROM t").fetchone() == (10,)
    other.close()
    group.db.close()


def test_a_failed_fsync_fails_whoever_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """durable() raises when the fsync it waits for failed: the side effect it guards must
    not go ahead."""
    group, _ = _group(tmp_path, monkeypatch)

    def broken() -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(group, "_sync_wal", broken)

    async def scenario() -> None:
        with group.tx(atomic=False) as db:
            db.execute("INSERT INTO t VALUES (1)")
        await group.durable()

    with pytest.raises(OSError, match="Input/output"):
        asyncio.run(scenario())
    group.db.close()


def test_a_commit_whose_loop_ended_is_synced_at_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit made as its loop ends (its fsync queued, not run) warns of nothing, and
    commit_all() at close syncs it."""
    group, syncs = _group(tmp_path, monkeypatch)

    async def scenario() -> None:
        with group.tx(atomic=False) as db:
            db.execute("INSERT INTO t VALUES (1)")
        group._commit()  # the fsync is now queued on this loop, which ends at once

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(scenario())
        gc.collect()
    group.commit_all()
    assert group._synced == group._committed == 1 and syncs
    group.db.close()
