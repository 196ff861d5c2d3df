"""bench/report.py: the documents' performance tables come from the newest results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import bench_module

report = bench_module("report")
RESULTS = report.RESULTS


def test_the_documents_show_the_committed_results() -> None:
    """docs/performance.md and the README's summary are what the committed results render
    to: a rerun saved without `bench/report.py --write` fails here."""
    assert report.main(["--check"]) == 0


def _copy(src: str, dst: Path, **changes: object) -> None:
    data = json.loads((RESULTS / src).read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for key in path:
            node = node[key]
        node[last] = value
    dst.write_text(json.dumps(data))


def test_each_scenario_shows_its_newest_result_by_the_date_recorded(tmp_path: Path) -> None:
    """Of several results holding a scenario, the one the bench dated last is shown, whatever
    the file names say; another scenario keeps its own newest file."""
    _copy("scale-2026-11-30.json", tmp_path / "scale-2026-11-30.json")
    _copy("scale-2026-11-30.json", tmp_path / "scale-2026-12-05.json",
          date="2026-12-05T10:00:00+00:00", backlog__files_per_s=4321.0)
    _copy("scale-2026-11-30.json", tmp_path / "scale-2027-01-01.json",  # misnamed, older
          date="2026-11-01T10:00:00+00:00", backlog__files_per_s=1111.0)
    _copy("sftp-2026-12-01.json", tmp_path / "sftp-2026-12-01.json")
    blocks = report.blocks(report.load(tmp_path))
    assert "`bench/results/scale-2026-12-05.json`" in blocks["backlog"]
    assert "| 4,321 |" in blocks["backlog"] and "1,111" not in blocks["backlog"]
    assert "`bench/results/sftp-2026-12-01.json`" in blocks["sftp-large"]
    assert "No result of this scenario" in blocks["sftp-small"]  # that run had 200 files
    assert "4,321 files/s" in blocks["summary"]


def test_write_replaces_only_the_generated_blocks_and_check_notices(tmp_path: Path) -> None:
    """--check fails on a stale block; --write replaces what lies between its markers and
    leaves the prose around them as it was; then --check passes."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(RESULTS / "scale-2026-11-30.json", results)
    doc = tmp_path / "perf.md"
    prose_before, prose_after = "# Performance\n\nWhy it is so.\n\n", "\nMore prose.\n"
    doc.write_text(f"{prose_before}<!-- report:backlog -->\nstale numbers\n"
                   f"<!-- /report:backlog -->{prose_after}")
    assert report.main(["--check"], results, [doc]) == 1
    assert report.main(["--write"], results, [doc]) == 0
    text = doc.read_text()
    assert text.startswith(prose_before + "<!-- report:backlog -->\n")
    assert text.endswith("<!-- /report:backlog -->" + prose_after)
    assert "stale numbers" not in text and "| 100,000 |" in text
    assert report.main(["--check"], results, [doc]) == 0


def test_a_block_naming_no_scenario_is_an_error(tmp_path: Path) -> None:
    """A marker whose key no scenario renders is refused, not left stale for ever."""
    doc = tmp_path / "perf.md"
    doc.write_text("<!-- report:local-hugefiles -->\n<!-- /report:local-hugefiles -->\n")
    with pytest.raises(KeyError, match="local-hugefiles"):
        report.main(["--check"], tmp_path, [doc])


def test_a_result_says_where_it_came_from_and_how_to_rerun_it() -> None:
    """Each table names its file, its date and machine, and a command that reruns it (the
    one the bench recorded, when it did)."""
    results = report.load()
    blocks = report.blocks(results)
    assert "- Machine: 2 cores (Intel(R) Xeon(R) Processor)" in blocks["sftp-large"]
    assert ("- Reproduce: `.venv/bin/python bench/bench_scale.py --files 100000 --gib 4`"
            in blocks["backlog"])
    r = next(r for r in results if r.name == "scale-2026-11-30.json")
    recorded = report.Result(r.name, r.bench, {**r.data, "command": "python bench/x.py --y",
                                               "commit": "abc1234"})
    text = report.backlog(recorded)
    assert "- Reproduce: `python bench/x.py --y`" in text and "code at `abc1234`" in text
