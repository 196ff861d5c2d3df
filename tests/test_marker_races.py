"""Empty completion markers against payloads still changing: relay must never deliver
bytes the marker did not vouch for, and never stall a well-behaved producer."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import RelayProc, drop, journal_row, larger_than, one_route_zone, wait_for


def test_payload_truncated_during_a_marker_copy_is_not_delivered(tmp_path: Path) -> None:
    """A payload released by an empty .done and truncated in the middle of its copy is
    not delivered (the source changed under the copy: back to waiting)."""
    src, out, rules = one_route_zone(tmp_path)
    size = 768 * 2**20
    with open(src / "t.bin", "wb") as f:
        f.truncate(size)
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()

        (src / "t.bin.done").write_text("")
        wait_for(larger_than(out / ".t.bin.tmp", 64 * 2**20), 30, "copy under way")
        os.truncate(src / "t.bin", 1000)
        wait_for(lambda: journal_row(tmp_path, "t.bin")[0] in  # type: ignore[index]
                 ("waiting", "done"), 30, "settled")
        assert not (out / "t.bin").exists(), (
            f"delivered {(out / 't.bin').stat().st_size} bytes: a partial of the "
            f"{size}-byte file the marker vouched for")
    finally:
        relay.stop()


def test_payload_then_empty_marker_is_never_stuck(tmp_path: Path) -> None:
    """Fifty 1 MB payloads each followed by an empty marker are all delivered."""
    src, out, rules = one_route_zone(tmp_path)
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        for i in range(50):
            drop(src, f"m{i}.bin", os.urandom(1_000_000), "done")
        wait_for(lambda: all((out / f"m{i}.bin.sha256").exists() for i in range(50)), 30,
                 "every file: stuck ones say 'waiting for a new marker'")
    finally:
        relay.stop()


def test_payload_and_empty_marker_in_a_folder_made_a_moment_ago_are_delivered(
        tmp_path: Path) -> None:
    """Sixty new folders, each given a payload and then an empty marker at once: every
    payload is delivered. The watcher lists what a new folder already holds as "created"
    events in listing order (the marker before its payload), and a payload's creation
    must not count as a change after its marker (it left 44 of 60 waiting for a new
    marker forever)."""
    src, out, rules = one_route_zone(tmp_path)
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        for i in range(60):
            drop(src, f"new{i}/sub/f.csv", os.urandom(5000), "done")
        wait_for(lambda: all((out / f"new{i}/sub/f.csv.sha256").exists() for i in range(60)),
                 30, "every file: stuck ones say 'payload changed after marker'")
    finally:
        relay.stop()
