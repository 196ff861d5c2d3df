"""The benchmark scripts still run (tiny sizes), so bench/ never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import bench_module, report_renders

ROOT = Path(__file__).resolve().parent.parent


def test_bench_local_quick_runs_and_reports() -> None:
    """bench_local.py --quick completes, prints every scenario's numbers as JSON, and
    bench/report.py renders them."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_local.py"), "--quick",
                          "--no-save"], capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    assert data["large"]["mb_s"]["relay"] > 0
    assert data["small_full"]["files"] == 50 and data["small_full"]["files_per_s"] > 0
    assert data["latency"]["samples"] == 10 and data["latency"]["p50_ms"] > 0
    report_renders("local", data)


def test_bench_scale_quick_runs_and_reports() -> None:
    """bench_scale.py --quick delivers its backlog, reports times and peak RSS, and
    bench/report.py renders them."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--quick",
                          "--no-save"], capture_output=True, text=True, timeout=300, check=True)
    data = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    b = data["backlog"]
    assert b["files"] == 300
    assert 0 < b["first_delivery_s"] <= b["last_delivery_s"]
    assert b["peak_rss_mib"] > 10 and data["big"]["peak_rss_mib"] > 10
    report_renders("scale", data)


def test_a_second_result_of_the_same_day_never_overwrites_the_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results are committed: a second run the same day is saved beside the first."""
    results_file = bench_module("results_file")
    monkeypatch.setattr(results_file, "RESULTS", tmp_path)
    paths = [results_file.save("local", {"run": i}) for i in range(3)]
    assert [p.name.split("-", 1)[0] for p in paths] == ["local"] * 3
    assert len(set(paths)) == 3 and paths[1].stem.endswith("-2")
    assert paths[2].stem.endswith("-3")
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]


def test_a_saved_result_records_its_command_and_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A result records the command line that produced it and the commit it measured, which
    docs/performance.md shows beside its table."""
    results_file = bench_module("results_file")
    monkeypatch.setattr(results_file, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["/somewhere/bench/bench_scale.py", "--files", "20000"])
    data = json.loads(results_file.save("scale", {"backlog": {}}).read_text())
    assert data["command"] == ".venv/bin/python bench/bench_scale.py --files 20000"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert data["commit"].startswith(head) and data["backlog"] == {}
