"""Signal files' contents (relay/signal_files.py): sidecar forms and names, marker digests,
manifests; real ``sha256sum`` output parses and relay's own sidecars pass ``sha256sum -c``."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.delivery import signal_body
from relay.signal_files import MalformedSignal, parse_digest, parse_manifest
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
