"""Progress for operators: transfer_progress log events, in-flight progress in
`relay status`, and the TTY progress bar of long CLI commands."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

from relay.journal import Journal
from relay.progressbar import ProgressBar
from tests.helpers import RELAY, drop, relay_env, run_once, write_rules


def test_transfer_progress_events_carry_percent_rate_and_eta(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"})
    size = 48 * 2**20
    drop(src, "big.bin", os.urandom(size))
    res = run_once(tmp_path, rules, RELAY_PROGRESS_INTERVAL="0.000001")
    assert res.returncode == 0, res.stdout[-2000:]
    events = [json.loads(line) for line in res.stdout.splitlines()
              if '"transfer_progress"' in line]
    assert events, "no transfer_progress event"
    for e in events:
        assert e["total"] == size
        assert 0 <= e["percent"] <= 100
        assert e["rate_mb_s"] >= 0
    last = events[-1]
    assert (last["bytes"], last["percent"], last["eta_s"]) == (size, 100.0, 0.0)


def test_status_shows_in_flight_transfers_with_their_progress(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    rules = write_rules(tmp_path / "rules", source=tmp_path / "in",
                        dests={"o": f"file://{tmp_path / 'out'}"})
    j = Journal(tmp_path / "journal.sqlite3")
    row = j.upsert_file("in", "big.bin", "file", route="r", state="delivering")
    j.plan_deliveries(row.id, [("big.bin", "o", "big.bin")])
    d = j.deliveries(row.id)[0]
    j.update_delivery(d.id, state="staging", acked=250_000_000, size=1_000_000_000,
                      attempts=1)
    j.close()
    env = relay_env(tmp_path, rules)
    res = subprocess.run([*RELAY, "status", "--json"], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    (item,) = json.loads(res.stdout)["lists"]["delivering"]
    (dl,) = item["deliveries"]
    assert (dl["state"], dl["acked"], dl["size"], dl["percent"]) == (
        "staging", 250_000_000, 1_000_000_000, 25.0)
    text = subprocess.run([*RELAY, "status"], env=env, capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "250,000,000 of 1,000,000,000 bytes (25.0%)" in text, text


def test_progress_bar_draws_only_on_a_tty() -> None:
    quiet = io.StringIO()
    bar = ProgressBar(100, "hashing x", stream=quiet)
    bar.update(50)
    bar.close()
    assert quiet.getvalue() == "", "no carriage returns in a file or a pipe"
    shown = io.StringIO()
    bar = ProgressBar(200, "hashing x", stream=shown, force=True)
    bar.update(200)
    assert "[" + "#" * ProgressBar.WIDTH + "]" in shown.getvalue()
    assert "100.0%" in shown.getvalue()
    assert "25.0%" in bar.render(50, 1.0) and "ETA" in bar.render(50, 1.0)
