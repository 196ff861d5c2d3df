"""Crash safety: a real `relay run` killed with SIGKILL at many instants, restarted each
time. Afterwards every file is delivered exactly once, intact, with no temporaries."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

from tests.helpers import (
    RelayProc,
    drop,
    journal_row,
    one_route_zone,
    run_once,
    sha256,
    tree,
    wait_for,
    write_rules,
)
from tests.observer import Observer

KILLS = 12
FILES = 60


def test_sigkill_loop_exactly_once(tmp_path: Path) -> None:
    """SIGKILL at random instants during a batch of mixed-size files loses nothing,
    delivers nothing twice and leaves no partial or temporary visible."""
    rng = random.Random(7)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"},
                        route={"then": "delete"})
    files: dict[str, bytes] = {}
    for i in range(FILES):
        size = rng.choice([0, 1, 4096, 200_000, 3_000_000])
        files[f"d{i % 4}/f{i}.bin"] = rng.randbytes(size)
    obs = Observer(out, {n: sha256(d) for n, d in files.items()})
    obs.start()
    pending = list(files.items())
    kills = 0
    try:
        while kills < KILLS:
            # Producers keep dropping files while relay is being killed.
            for n, d in pending[: len(files) // KILLS + 1]:
                p = src / n
                p.parent.mkdir(exist_ok=True)
                p.write_bytes(d)
                (src / f"{n}.sha256").write_text(sha256(d))
            pending = pending[len(files) // KILLS + 1:]
            relay = RelayProc(tmp_path, rules).start()
            relay.wait_started()
            time.sleep(rng.uniform(0.0, 0.4))  # the kill instant is the thing under test
            relay.kill()
            kills += 1
        for n, d in pending:
            p = src / n
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(d)
            (src / f"{n}.sha256").write_text(sha256(d))
        res = run_once(tmp_path, rules)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr
        wait_for(lambda: all((out / f"{n}.sha256").exists() for n in files), 30, "all files")
    finally:
        obs.stop()
    obs.check_once()
    assert obs.violations == []
    for n, d in files.items():
        assert (out / n).read_bytes() == d, n
    leftovers = [p for p in out.rglob(".*")]
    assert leftovers == []
    assert [p for p in src.rglob("*") if p.is_file()] == []  # post-action ran exactly once
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    states = dict(db.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
    assert states == {"done": FILES}
    assert db.execute("SELECT COUNT(*) FROM history").fetchone()[0] == FILES
    assert kills == KILLS


# -- recovery edges: a kill during a batch post-action, or after a signal (bugs L, M) --


def test_interrupted_batch_post_action_is_finished_at_restart(tmp_path: Path) -> None:
    """A batch journalled 'delivered' whose sources were partly or wholly deleted (a kill
    during then: delete) ends 'done' at the next start with its remaining sources gone."""
    src, _out, rules = one_route_zone(tmp_path, then="delete")
    for case in ("all", "some"):
        b = src / case
        b.mkdir()
        members = {"part-0.csv": b"0", "part-1.csv": b"1"}
        for n, data in members.items():
            (b / n).write_bytes(data)
        (b / "SHA256SUMS").write_text("".join(f"{sha256(d)}  {n}\n" for n, d in members.items()))
        (b / "_SUCCESS").write_text("")
    keep = rules / "rules.yaml"
    keep.write_text(keep.read_text().replace("then: delete", "then: keep"))
    assert run_once(tmp_path, rules).returncode == 0
    keep.write_text(keep.read_text().replace("then: keep", "then: delete"))
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    with db:
        db.execute("UPDATE files SET state='delivered' WHERE kind='batch'")  # the kill
    db.close()
    for case, gone in (("all", ["part-0.csv", "part-1.csv", "SHA256SUMS", "_SUCCESS"]),
                       ("some", ["part-0.csv"])):
        for n in gone:
            (src / case / n).unlink()
    run_once(tmp_path, rules)
    assert journal_row(tmp_path, "all") == ("done", None)
    assert journal_row(tmp_path, "some") == ("done", None)
    assert tree(src) == set()


def test_recovered_signalling_does_not_rewrite_an_identical_signal(tmp_path: Path) -> None:
    """Recovery of a delivery journalled 'signalling' whose signal is already in place
    (identical bytes) leaves that signal file alone."""
    src, out, rules = one_route_zone(tmp_path)
    drop(src, "s.csv", b"s")
    assert run_once(tmp_path, rules).returncode == 0
    ino = (out / "s.csv.sha256").stat().st_ino
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    with db:  # as if killed right after put_signal
        db.execute("UPDATE deliveries SET state='signalling'")
        db.execute("UPDATE files SET state='delivering'")
    db.close()
    assert run_once(tmp_path, rules).returncode == 0
    assert journal_row(tmp_path, "s.csv") == ("done", None)
    assert (out / "s.csv.sha256").stat().st_ino == ino
