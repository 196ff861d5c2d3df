"""Readiness parsing and decisions (pure functions)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery import signal_body
from relay.readiness import (
    MalformedSignal,
    classify,
    gather,
    gather_batch,
    parse_digest,
    parse_manifest,
)
from relay.rules import ReadyRule
from tests.helpers import sha256

H = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize("body", [
    H, H + "\n", f"{H}  report.csv\n", f"{H} *report.csv\n", f"SHA256 (report.csv) = {H}\n",
    f"{H.upper()}  report.csv", f"{H}  ./report.csv\n",
    f"{'0' * 64}  other.csv\n{H}  report.csv\n",
])
def test_sidecar_formats_accepted(body: str) -> None:
    """Bare hex, GNU (text and binary mode), BSD and multi-line sums files all parse."""
    assert parse_digest(body, "sha256", "report.csv") == ("sha256", H)


@pytest.mark.parametrize(("name", "line"), [
    (" lead.csv", f"{H}   lead.csv"), ("trail.csv ", f"{H}  trail.csv "),
    ("*star.csv", f"{H}  *star.csv"), ("*star.csv", f"{H} **star.csv"),
    ("a\nb.csv", f"\\{H}  a\\nb.csv"), ("a\\b.csv", f"\\{H}  a\\\\b.csv"),
    ("a\rb.csv", f"\\{H}  a\\rb.csv"), ("a\nb.csv", f"\\SHA256 (a\\nb.csv) = {H}"),
    (" (x) = y ", f"SHA256 ( (x) = y ) = {H}"), ("tab\t.csv", f"{H}  tab\t.csv"),
    ("report.csv", f"{H}  report.csv\r"), ("report.csv", f"{H}  report.csv  "),
    ("report.csv", f"SHA256 (report.csv) = {H}\r"), ("a\x0bb", f"{H}  a\x0bb"),
])
def test_sidecar_names_read_verbatim_or_unescaped(name: str, line: str) -> None:
    """The name is the rest of the line as coreutils reads it (spaces, a leading '*'),
    escaped lines are unescaped; a CRLF ending or trailing blanks after a name still match."""
    assert parse_digest(line + "\n", "sha256", name) == ("sha256", H)


@pytest.mark.parametrize(("body", "why"), [
    ("", "empty"), ("zz" * 32, "not hexadecimal"), ("ab" * 10, "64 hex digits"),
    (f"{H}  other.csv\n", "no line names"), (f"MD5 (report.csv) = {H}", "declares md5"),
])
def test_malformed_sidecars_rejected(body: str, why: str) -> None:
    """Non-hex, wrong length, empty and wrong-file sidecars are malformed, with a reason."""
    with pytest.raises(MalformedSignal, match=why):
        parse_digest(body, "sha256", "report.csv")


def test_marker_digest_algorithm_inferred_from_length() -> None:
    """A digest in a marker names its algorithm by its length (md5/sha256/sha512)."""
    md5 = hashlib.md5(b"x").hexdigest()
    sha512 = hashlib.sha512(b"x").hexdigest()
    assert parse_digest(md5, None, "f") == ("md5", md5)
    assert parse_digest(f"{sha512}  f", None, "f") == ("sha512", sha512)


@given(st.binary(max_size=200))
def test_parse_digest_never_crashes(data: bytes) -> None:
    """Arbitrary sidecar bytes either parse to a valid digest or raise MalformedSignal."""
    text = data.decode("utf-8", "replace")
    try:
        algo, hexd = parse_digest(text, "sha256", "f")
    except MalformedSignal:
        return
    assert algo == "sha256" and len(hexd) == 64


def test_manifest_parses_and_rejects_garbage() -> None:
    """SHA256SUMS manifests map member names to digests; a line without a name is refused."""
    assert parse_manifest(f"{H}  a.csv\n# comment\n{H} *sub/b.csv\n") == {
        "a.csv": ("sha256", H), "sub/b.csv": ("sha256", H)}
    with pytest.raises(MalformedSignal):
        parse_manifest(H)


def test_manifest_reads_names_like_sha256sum_writes_them() -> None:
    """Manifest lines are read like sidecar lines: escaped names, leading blanks, CRLF."""
    text = f"\\{H}  sub/a\\nb.csv\r\n{H}   lead.csv\r\nSHA256 (x y.csv) = {H}\r\n"
    assert parse_manifest(text) == {"sub/a\nb.csv": ("sha256", H), " lead.csv": ("sha256", H),
                                    "x y.csv": ("sha256", H)}
    with pytest.raises(MalformedSignal, match="invalid escape"):
        parse_manifest(f"\\{H}  a\\tb.csv\n")


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


# -- any name: what sha256sum writes parses; what relay writes, sha256sum accepts ------

_any_name = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                    min_size=1, max_size=40).filter(
    lambda n: n not in (".", "..") and not n.startswith(".") and n != "-"
    and len(n.encode()) <= 200)


@settings(max_examples=150, deadline=None)
@given(name=_any_name, data=st.binary(max_size=32))
def test_real_sha256sum_sidecars_parse_for_any_name(name: str, data: bytes) -> None:
    """Whatever the file name, the line GNU `sha256sum` writes for it parses back to its
    digest (plain and --tag forms)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_bytes(data)
        for flags in ([], ["--tag"]):
            line = subprocess.run(["sha256sum", *flags, "--", name], cwd=d, check=True,
                                  capture_output=True).stdout.decode("utf-8", "surrogateescape")
            assert parse_digest(line, "sha256", name) == ("sha256", sha256(data)), line


@settings(max_examples=150, deadline=None)
@given(name=_any_name, data=st.binary(max_size=32))
def test_relays_own_sidecar_is_read_back_by_relay_and_by_sha256sum(name: str,
                                                                 data: bytes) -> None:
    """The sidecar relay writes downstream parses back (next hop) and passes
    `sha256sum -c` for any name, e.g. one with a newline."""
    h = sha256(data)
    body = signal_body(name, h)
    assert parse_digest(body.decode("utf-8", "surrogateescape"), "sha256", name) == (
        "sha256", h)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_bytes(data)
        (Path(d) / "SUMS").write_bytes(body)
        assert subprocess.run(["sha256sum", "-c", "--status", "SUMS"], cwd=d).returncode == 0


def test_a_sidecar_written_while_it_is_read_is_looked_at_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sidecar read empty just after its creation, then written before the fingerprint
    is taken, must not be recorded as judged: the fingerprint of what we read differs from
    the one of the written file, so the next event makes relay decide again."""
    import builtins

    import relay.readiness as readiness

    data = b"x" * 100
    (tmp_path / "p").write_bytes(data)
    sidecar = tmp_path / "p.sha256"
    sidecar.write_bytes(b"")
    real_open = builtins.open

    class WrittenDuringRead:
        def __init__(self, f: object) -> None:
            self.f = f

        def __enter__(self) -> WrittenDuringRead:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()  # type: ignore[attr-defined]

        def fileno(self) -> int:
            return int(self.f.fileno())  # type: ignore[attr-defined]

        def read(self, n: int) -> bytes:
            got = bytes(self.f.read(n))  # type: ignore[attr-defined]
            with real_open(sidecar, "ab") as w:  # the producer writes now
                w.write(hashlib.sha256(data).hexdigest().encode())
            return got

    def racing_open(path: object, mode: str = "r", *a: object, **k: object) -> object:
        f = real_open(path, mode, *a, **k)  # type: ignore[call-overload]
        return WrittenDuringRead(f) if str(path) == str(sidecar) else f

    monkeypatch.setattr(readiness, "open", racing_open, raising=False)
    first = gather(tmp_path, "p", ReadyRule())
    monkeypatch.undo()
    assert first.verdict == "invalid"  # it read an empty sidecar
    second = gather(tmp_path, "p", ReadyRule())
    assert second.verdict == "ready"
    assert second.fingerprint != first.fingerprint  # so the engine looks again
