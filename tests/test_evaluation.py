"""relay.evaluation, driven in-process: how a scan turns paths into work."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relay.config import Settings
from relay.engine import Engine
from relay.journal import Journal
from relay.rules import load_rules
from tests.helpers import write_rules


def test_a_scan_keys_files_in_marked_folders_as_one_batch_checking_each_folder_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start-up scan: a file below a folder holding the directory marker (at any depth)
    belongs to that folder's batch, any other file is on its own. Each folder is looked up
    once per scan, not once per file and ancestor (that was an lstat on the event loop per
    file and per folder above it)."""
    src = tmp_path / "in"
    files = ["loose.csv", "plain/a.csv", "plain/b.csv", "plain/deep/c.csv",
             "batch/x.csv", "batch/_SUCCESS", "batch/sub/y.csv", "batch/sub/z.csv",
             "plain/inner/_SUCCESS", "plain/inner/m.csv"]
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"data")
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{tmp_path}/o"})
    cfg = Settings(rules=rules, journal=tmp_path / "j.sqlite3", metrics_addr="",
                   rescan_interval=0, log_level="error", log_format="json")
    journal = Journal(cfg.journal, cfg.journal_sync)
    looked_up: list[str] = []
    real_lexists = os.path.lexists

    def lexists(p: str | os.PathLike[str]) -> bool:
        looked_up.append(os.fspath(p))
        return real_lexists(p)

    monkeypatch.setattr("relay.evaluation.os.path.lexists", lexists)
    try:
        engine = Engine(cfg, load_rules(rules), journal)
        asyncio.run(engine._scan(engine.rules.source("in")))
    finally:
        journal.close()
    assert set(engine.dirty) == {
        ("in", "file", "loose.csv"), ("in", "file", "plain/a.csv"),
        ("in", "file", "plain/b.csv"), ("in", "file", "plain/deep/c.csv"),
        ("in", "batch", "batch"), ("in", "batch", "plain/inner")}
    # one lookup per folder: ., plain, plain/deep, batch, batch/sub, plain/inner
    assert sorted(looked_up) == sorted(set(looked_up)), looked_up
    assert len(looked_up) == 6, looked_up
