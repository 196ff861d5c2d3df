"""relay.evaluation.Evaluator, alone: how hints become verdicts and jobs (the job side is
a recording stand-in for the engine)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from relay.evaluation import Evaluator, Key
from relay.journal import Journal
from relay.rules import load_rules
from relay.states import FileState
from tests.helpers import drop, until, write_rules


class Jobs:
    """A JobControl that records what the evaluator asks of it."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.running: set[int] = set()
        self.deferred: dict[int, Key] = {}

    def start(self, file_id: int) -> None:
        self.started.append(file_id)

    def busy(self, file_id: int) -> bool:
        return file_id in self.running

    def defer(self, file_id: int, key: Key) -> None:
        self.deferred[file_id] = key


def _evaluator(tmp_path: Path) -> tuple[Evaluator, Jobs, Journal, Path]:
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{tmp_path}/o"})
    journal = Journal(tmp_path / "j.sqlite3")
    jobs = Jobs()
    tasks: list[Coroutine[Any, Any, None]] = []
    return (Evaluator(load_rules(rules), journal, jobs, asyncio.Event(), tasks.append), jobs,
            journal, src)


def test_a_scan_keys_files_in_marked_folders_as_one_batch_checking_each_folder_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start-up scan: a file below a folder holding the directory marker (at any depth)
    belongs to that folder's batch, any other file is on its own. Each folder is looked up
    once per scan, not once per file and ancestor (that was an lstat on the event loop per
    file and per folder above it)."""
    evaluator, _, journal, src = _evaluator(tmp_path)
    files = ["loose.csv", "plain/a.csv", "plain/b.csv", "plain/deep/c.csv",
             "batch/x.csv", "batch/_SUCCESS", "batch/sub/y.csv", "batch/sub/z.csv",
             "plain/inner/_SUCCESS", "plain/inner/m.csv"]
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"data")
    looked_up: list[str] = []
    real_lexists = os.path.lexists

    def lexists(p: str | os.PathLike[str]) -> bool:
        looked_up.append(os.fspath(p))
        return real_lexists(p)

    monkeypatch.setattr("relay.evaluation.os.path.lexists", lexists)
    try:
        asyncio.run(evaluator.scan(evaluator.rules.source("in")))
    finally:
        journal.close()
    assert set(evaluator.dirty) == {
        ("in", "file", "loose.csv"), ("in", "file", "plain/a.csv"),
        ("in", "file", "plain/b.csv"), ("in", "file", "plain/deep/c.csv"),
        ("in", "batch", "batch"), ("in", "batch", "plain/inner")}
    # one lookup per folder: ., plain, plain/deep, batch, batch/sub, plain/inner
    assert sorted(looked_up) == sorted(set(looked_up)), looked_up
    assert len(looked_up) == 6, looked_up


def test_verdicts_are_journalled_and_a_ready_file_is_handed_to_the_job_side(
        tmp_path: Path) -> None:
    """A file with a matching sidecar is journalled ready and started once; one without a
    signal waits with its reason; a file whose job is running is deferred, not judged."""
    evaluator, jobs, journal, src = _evaluator(tmp_path)
    drop(src, "a.csv", b"alpha")
    (src / "b.csv").write_bytes(b"no signal yet")

    async def scenario() -> None:
        run = asyncio.create_task(evaluator.run())
        for rel in ("a.csv", "b.csv", "a.csv.sha256"):
            evaluator.hint("in", rel, "file")
        assert await until(lambda: evaluator.idle, 10)
        a = journal.get_file("in", "a.csv")
        assert a is not None and a.state is FileState.READY and jobs.started == [a.id]
        b = journal.get_file("in", "b.csv")
        assert b is not None and b.state is FileState.WAITING and b.reason
        jobs.running.add(a.id)
        evaluator.hint("in", "a.csv", "file")
        assert await until(lambda: evaluator.idle, 10)
        assert jobs.deferred == {a.id: ("in", "file", "a.csv")}
        assert jobs.started == [a.id]
        evaluator.stop()
        await asyncio.wait_for(run, 5)

    try:
        asyncio.run(scenario())
    finally:
        journal.close()


def test_a_payload_only_created_after_its_marker_is_judged_by_mtimes(tmp_path: Path) -> None:
    """Event order for empty markers: a payload "created" after its marker leaves the
    verdict to the mtimes (None: a new folder's contents are reported as created, in
    listing order, yet a payload created after its marker and written a moment later is
    also created first); a payload written after its marker makes it stale; a marker
    created afterwards is fresh again; a payload created before its marker does not
    make it stale."""
    evaluator, _, journal, _ = _evaluator(tmp_path)
    journal.close()
    stale = evaluator._marker_stale
    evaluator.hint("in", "d/f.csv.done", "created")
    evaluator.hint("in", "d/f.csv", "created")
    assert stale("in", "d/f.csv") is None
    evaluator.hint("in", "d/f.csv", "file")
    assert stale("in", "d/f.csv") is True
    evaluator.hint("in", "d/f.csv.done", "created")
    assert stale("in", "d/f.csv") is False
    evaluator.hint("in", "d/g.csv", "created")
    evaluator.hint("in", "d/g.csv.done", "created")
    assert stale("in", "d/g.csv") is False
