"""The journal stores file names losslessly, whatever their bytes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from relay.journal import Journal

NOT_UTF8 = b"caf\xe9.csv".decode("utf-8", "surrogateescape")  # what os.fsdecode gives


def test_a_name_that_is_not_utf8_round_trips_as_its_bytes(tmp_path: Path) -> None:
    """A surrogate-escaped name is stored as its original bytes (BLOB), found again by the
    same str, and read back as that str; UTF-8 names stay TEXT."""
    j = Journal(tmp_path / "j.sqlite3")
    try:
        row = j.upsert_file("in", NOT_UTF8, "file", route="r", state="waiting",
                            reason=f"malformed sidecar {NOT_UTF8}.sha256: empty")
        assert row.rel == NOT_UTF8 and row.reason is not None and NOT_UTF8 in row.reason
        assert j.get_file("in", NOT_UTF8) == row
        j.plan_deliveries(row.id, [(NOT_UTF8, "o", f"out/{NOT_UTF8}")])
        [d] = j.deliveries(row.id)
        assert (d.member, d.target) == (NOT_UTF8, f"out/{NOT_UTF8}")
        j.mark_delivered(d, "r", "0" * 64)
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
