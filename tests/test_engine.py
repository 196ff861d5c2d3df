"""relay.engine, in-process: the lifecycle around jobs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.config import Settings
from relay.engine import Engine
from relay.journal import Journal
from relay.rules import load_rules
from tests.helpers import write_rules


def _engine(tmp_path: Path) -> tuple[Engine, Journal]:
    src = tmp_path / "in"
    src.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{tmp_path}/o"})
    cfg = Settings(rules=rules, journal=tmp_path / "j.sqlite3", metrics_addr="",
                   rescan_interval=0, log_level="error", log_format="json")
    journal = Journal(cfg.journal, cfg.journal_sync)
    return Engine(cfg, load_rules(rules), journal), journal


def test_until_idle_wakes_when_the_last_job_or_evaluation_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --once` ends when nothing is left: woken by the job's end and the evaluation's
    end, not by polling (the guard re-check is pushed to a minute here, so a missed wake-up
    fails the 5 s bound instead of passing late)."""
    monkeypatch.setattr("relay.engine._SETTLE_GUARD_S", 60.0)
    engine, journal = _engine(tmp_path)

    async def scenario() -> None:
        job_gate, eval_gate = asyncio.Event(), asyncio.Event()

        async def job(file_id: int) -> None:
            await job_gate.wait()

        async def evaluate_files(keys: list[tuple[str, str, str]]) -> None:
            await eval_gate.wait()

        monkeypatch.setattr(engine.runner, "_job", job)
        monkeypatch.setattr(engine.evaluator, "evaluate_files", evaluate_files)
        engine.runner._launch(1)
        engine.evaluator.look_again(("in", "file", "a.csv"))
        evaluator = asyncio.create_task(engine.evaluator.run())
        everything = asyncio.create_task(engine.until_idle())
        evaluations = asyncio.create_task(engine.until_idle(jobs_too=False))
        for _ in range(10):
            await asyncio.sleep(0)
        assert engine.evaluator.evaluating and not everything.done() \
            and not evaluations.done()
        eval_gate.set()
        await asyncio.wait_for(evaluations, 5)
        assert not everything.done()  # the job still runs
        job_gate.set()
        await asyncio.wait_for(everything, 5)
        assert engine.idle()
        engine.stop()
        await asyncio.wait_for(evaluator, 5)

    try:
        asyncio.run(scenario())
    finally:
        journal.close()
