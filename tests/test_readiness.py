"""Readiness decisions: what each signal kind vouches for, and the reads behind them
(relay/readiness.py). What the signal files say: test_signal_files.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from relay.readiness import classify, gather, gather_batch
from relay.rules import ReadyRule

H = hashlib.sha256(b"x").hexdigest()
def test_classify_signal_files() -> None:
    """Sidecars, markers, directory markers and manifests are told apart from payloads."""
    r = ReadyRule()
    assert classify("a/x.csv.sha256", r) == ("sidecar", "a/x.csv")
    assert classify("a/x.csv.done", r) == ("marker", "a/x.csv")
    assert classify("a/_SUCCESS", r) == ("dirmarker", "a")
    assert classify("a/SHA256SUMS", r) == ("manifest", "a")
    assert classify("a/x.csv", r) == ("payload", "a/x.csv")


def test_payload_without_signal_waits(tmp_path: Path) -> None:
    """A payload with no sidecar or marker is never ready, however old or stable."""
    (tmp_path / "x").write_bytes(b"data")
    old = 1_000_000_000
    os.utime(tmp_path / "x", (old, old))
    ev = gather(tmp_path, "x", ReadyRule())
    assert ev.verdict == "waiting"


def test_marker_before_payload_does_not_vouch(tmp_path: Path) -> None:
    """An empty marker older than its payload's last change waits for a new marker."""
    (tmp_path / "x.done").write_text("")
    (tmp_path / "x").write_bytes(b"data")
    os.utime(tmp_path / "x.done", ns=(1_000, 1_000))
    assert gather(tmp_path, "x", ReadyRule()).verdict == "waiting"
    os.utime(tmp_path / "x.done")  # the producer writes the marker again
    assert gather(tmp_path, "x", ReadyRule()).verdict == "ready"
    # A marker strictly newer than the payload was written after its last change, even
    # when the watcher has not delivered the marker's own event yet (or lost it).
    assert gather(tmp_path, "x", ReadyRule(), marker_stale=True).verdict == "ready"
    # Same timestamp (one clock tick): the watcher's order decides.
    st = os.stat(tmp_path / "x")
    os.utime(tmp_path / "x.done", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert gather(tmp_path, "x", ReadyRule(), marker_stale=True).verdict == "waiting"
    assert gather(tmp_path, "x", ReadyRule(), marker_stale=False).verdict == "ready"
    assert gather(tmp_path, "x", ReadyRule()).verdict == "ready"  # no events: a tie vouches


def test_sidecar_without_payload_waits(tmp_path: Path) -> None:
    """A sidecar whose payload has not arrived keeps the file waiting."""
    (tmp_path / "x.sha256").write_text(H)
    ev = gather(tmp_path, "x", ReadyRule())
    assert ev.verdict == "waiting" and "payload missing" in ev.reason


def test_huge_sidecar_is_not_read_whole(tmp_path: Path) -> None:
    """A 'sidecar' far larger than any checksum file is malformed, not read into memory."""
    (tmp_path / "x").write_bytes(b"1")
    with open(tmp_path / "x.sha256", "wb") as f:
        f.truncate(3 * 1024**3)  # sparse 3 GiB
    ev = gather(tmp_path, "x", ReadyRule())
    assert ev.verdict == "invalid" and "larger than" in ev.reason


def test_symlink_payload_refused(tmp_path: Path) -> None:
    """A symlinked payload is never followed, even with a valid sidecar."""
    (tmp_path / "x").symlink_to("/etc/hostname")
    (tmp_path / "x.done").write_text("")
    assert gather(tmp_path, "x", ReadyRule()).verdict == "invalid"


def test_batch_with_manifest_lists_members(tmp_path: Path) -> None:
    """A _SUCCESS folder with a manifest waits for every listed member, then is ready."""
    d = tmp_path / "b"
    d.mkdir()
    (d / "SHA256SUMS").write_text(f"{H}  one\n{H}  two\n")
    (d / "_SUCCESS").write_text("")
    (d / "one").write_bytes(b"x")
    ev = gather_batch(tmp_path, "b", ReadyRule(), lambda r: False)
    assert ev.verdict == "waiting" and "b/two" in ev.reason
    (d / "two").write_bytes(b"x")
    ev = gather_batch(tmp_path, "b", ReadyRule(), lambda r: False)
    assert ev.verdict == "ready" and set(ev.members) == {"b/one", "b/two", "b/SHA256SUMS"}


def test_batch_manifest_traversal_refused(tmp_path: Path) -> None:
    """A manifest naming ../ paths makes the batch invalid instead of reading outside."""
    d = tmp_path / "b"
    d.mkdir()
    (d / "SHA256SUMS").write_text(f"{H}  ../../etc/passwd\n")
    (d / "_SUCCESS").write_text("")
    ev = gather_batch(tmp_path, "b", ReadyRule(), lambda r: False)
    assert ev.verdict == "invalid" and ".." in ev.reason


def test_a_sidecar_written_while_it_is_read_is_looked_at_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar read empty just after its creation, then written before the fingerprint
    is taken, must not be recorded as judged: the fingerprint of what we read differs from
    the one of the written file, so the next event makes relay decide again."""
    data = b"x" * 100
    (tmp_path / "p").write_bytes(data)
    sidecar = tmp_path / "p.sha256"
    sidecar.write_bytes(b"")
    inode = sidecar.stat().st_ino
    real_read = os.read

    def racing_read(fd: int, n: int) -> bytes:
        got = real_read(fd, n)
        if os.fstat(fd).st_ino == inode:
            with open(sidecar, "ab") as w:  # the producer writes now, after our read
                w.write(hashlib.sha256(data).hexdigest().encode())
        return got

    monkeypatch.setattr(os, "read", racing_read)
    first = gather(tmp_path, "p", ReadyRule())
    monkeypatch.undo()
    assert first.verdict == "invalid"  # it read an empty sidecar
    second = gather(tmp_path, "p", ReadyRule())
    assert second.verdict == "ready"
    assert second.fingerprint != first.fingerprint  # so the engine looks again


def test_signal_file_turned_fifo_after_its_stat_does_not_hang(tmp_path: Path) -> None:
    """Between gather's stat and its read a sidecar may be swapped for a FIFO: the read
    (O_NONBLOCK, then fstat) says "not a regular file" instead of blocking in open()."""
    from relay.readiness import _read_small
    from relay.signal_files import MalformedSignal

    os.mkfifo(tmp_path / "x.sha256")
    with pytest.raises(MalformedSignal, match="not a regular file"):
        _read_small(tmp_path / "x.sha256")


def test_symlinked_manifest_is_not_followed(tmp_path: Path) -> None:
    """A manifest that is a symlink makes its batch invalid (never read through)."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_bytes(b"x")
    (tmp_path / "elsewhere").write_text(f"{H}  x\n")
    (tmp_path / "b" / "SHA256SUMS").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "b" / "_SUCCESS").write_bytes(b"")
    ev = gather_batch(tmp_path, "b", ReadyRule(), lambda r: False)
    assert ev.verdict == "invalid" and "SHA256SUMS" in ev.reason, ev
