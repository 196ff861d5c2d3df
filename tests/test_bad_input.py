"""Bad input and local faults with file:// destinations (issue 4). Every case checks the
same three promises: a clear log event or journal state, the daemon keeps running, and
no file is lost (the source stays until a valid delivery, which then happens)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    RELAY,
    RelayProc,
    drop,
    relay_env,
    run_once,
    sha256,
    wait_for,
    write_rules,
)
from tests.observer import Observer

FAST_RETRY = {"RELAY_RETRY_BASE": "0.05", "RELAY_RETRY_CAP": "0.3",
              "RELAY_BREAKER_COOLDOWN": "0.3"}


# -- helpers -----------------------------------------------------------------------------


def events(text: str, event: str | None = None, file: str | None = None) -> list[dict[str, Any]]:
    """The JSON log objects in ``text`` (other lines skipped), filtered by event and file."""
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if event is not None and obj.get("event") != event:
            continue
        if file is not None and obj.get("file") != file:
            continue
        out.append(obj)
    return out


def status(tmp: Path, rules: Path) -> dict[str, Any]:
    res = subprocess.run([*RELAY, "status", "--json", "--limit", "1000"],
                         env=relay_env(tmp, rules), capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def listed(st: dict[str, Any], state: str) -> dict[str, dict[str, Any]]:
    return {it["file"]: it for it in st["lists"][state]}


def journal_row(tmp: Path, rel: str) -> tuple[str, str | None] | None:
    """(state, reason) of ``rel`` in the journal, read while relay may be running."""
    db = sqlite3.connect(tmp / "journal.sqlite3", timeout=10)
    try:
        row = db.execute("SELECT state, reason FROM files WHERE rel=?", (rel,)).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return None
    finally:
        db.close()
    return (row[0], row[1]) if row else None


def tree(root: Path) -> set[str]:
    """Every file below ``root`` (hidden ones included), as relative paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def alive(relay: RelayProc) -> bool:
    return relay.proc is not None and relay.proc.poll() is None


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted on ``path`` for the duration of the block."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


class NoDacRelay(RelayProc):
    """`relay run` as root but without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so file
    permissions apply to it as to any non-root service account."""

    PREFIX = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")

    def start(self) -> NoDacRelay:
        self._starts = self._count(b"relay_started")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*self.PREFIX, *RELAY, "run"], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self


@pytest.fixture
def zone(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"})
    return src, out, rules


# -- malformed sidecars ------------------------------------------------------------------

DATA = b"id,total\n1,2\n"
MALFORMED = {
    "not_hex": ("z" * 64, "not hexadecimal"),
    "wrong_length": (sha256(DATA)[:63], "must have 64 hex digits"),
    "empty": ("", "empty"),
    "names_other_file": (f"{sha256(DATA)}  other.csv", "no line names 'f.csv'"),
    "bsd_names_other_file": (f"SHA256 (other.csv) = {sha256(DATA)}", "no line names"),
    "wrong_algo_in_bsd_line": (f"MD5 (f.csv) = {hashlib.md5(DATA).hexdigest()}", "declares md5"),
    "binary_garbage": ("\udcff\udcfe\x00\x01", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_sidecar_waits_with_reason_then_delivers_once_fixed(
        tmp_path: Path, zone: tuple[Path, Path, Path], case: str) -> None:
    """A malformed sidecar leaves the file waiting (invalid, with the reason) and the
    source untouched; a corrected sidecar then releases it."""
    src, out, rules = zone
    body, why = MALFORMED[case]
    (src / "f.csv").write_bytes(DATA)
    (src / "f.csv.sha256").write_bytes(body.encode("utf-8", "surrogateescape"))
    res = run_once(tmp_path, rules)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    waiting = events(res.stdout, "file_waiting", "f.csv")
    assert waiting and waiting[-1]["invalid"] is True and why in waiting[-1]["reason"], waiting
    st = listed(status(tmp_path, rules), "waiting")
    assert why in st["f.csv"]["reason"]
    assert tree(out) == set() and (src / "f.csv").read_bytes() == DATA
    (src / "f.csv.sha256").write_text(f"{sha256(DATA)}  f.csv\n")
    res = run_once(tmp_path, rules)
    assert res.returncode == 0, res.stdout[-2000:]
    assert (out / "f.csv").read_bytes() == DATA
    assert journal_row(tmp_path, "f.csv") == ("done", None)


def test_multi_gigabyte_sparse_sidecar_is_never_read_whole(
        tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """A 3 GiB (sparse) "sidecar" is refused after reading at most 64 KiB: the process
    reads well under a megabyte while judging it, keeps running, and the file waits."""
    src, out, rules = zone
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        assert relay.proc is not None

        def rchar() -> int:
            for line in Path(f"/proc/{relay.proc.pid}/io").read_text().splitlines():
                if line.startswith("rchar:"):
                    return int(line.split()[1])
            raise AssertionError("no rchar")

        before = rchar()
        (src / "h.bin").write_bytes(b"h")
        with open(src / "h.bin.sha256", "wb") as f:
            f.write(f"{sha256(b'h')}  h.bin\n".encode())
            f.truncate(3 * 2**30)
        wait_for(lambda: events(relay.logs(), "file_waiting", "h.bin"), 20, "file_waiting")
        for _ in range(3):  # more events on the huge file: each re-check stays small
            os.utime(src / "h.bin.sha256")
        wait_for(lambda: journal_row(tmp_path, "h.bin") is not None, 10, "journal row")
        ev = events(relay.logs(), "file_waiting", "h.bin")[-1]
        assert ev["invalid"] is True and "larger than 65536 bytes" in ev["reason"]
        assert rchar() - before < 2**20
        assert alive(relay) and tree(out) == set()
        os.truncate(src / "h.bin.sha256", 0)
        (src / "h.bin.sha256").write_text(sha256(b"h"))
        wait_for(lambda: (out / "h.bin.sha256").exists(), 20, "delivery once the sidecar is sane")
        assert (out / "h.bin").read_bytes() == b"h"
    finally:
        assert relay.stop() == 0


# -- a signal whose payload never comes; a payload that changes after its signal -------


def test_signal_without_payload_is_quarantined_and_a_late_payload_still_goes(
        tmp_path: Path) -> None:
    """A sidecar (or a marker with a digest) whose payload never comes waits, is
    quarantined after the deadline with the reason, and a payload arriving afterwards is
    still delivered."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"},
                        ready={"deadline": "1s"})
    late = {"s.bin": b"via sidecar", "m.bin": b"via marker with digest"}
    (src / "s.bin.sha256").write_text(sha256(late["s.bin"]))
    (src / "m.bin.done").write_text(f"{sha256(late['m.bin'])}  m.bin\n")
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        for name in late:
            wait_for(lambda n=name: events(relay.logs(), "file_quarantined", n), 30,
                     f"{name} quarantined")
        q = listed(status(tmp_path, rules), "quarantined")
        assert "payload missing" in q["s.bin"]["reason"]
        assert "payload missing" in q["m.bin"]["reason"]
        assert alive(relay) and tree(out) == set()
        for name, data in late.items():
            (src / name).write_bytes(data)
        wait_for(lambda: all((out / f"{n}.sha256").exists() for n in late), 30,
                 "late payloads delivered")
        for name, data in late.items():
            assert (out / name).read_bytes() == data
            assert journal_row(tmp_path, name) == ("done", None)
    finally:
        assert relay.stop() == 0


def test_payload_replaced_or_truncated_after_delivery_is_held_back(
        tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """New bytes under a delivered name with the old sidecar (replaced, then truncated)
    are not forwarded: the destination keeps the complete first version, relay logs
    file_changed and waits, and a matching sidecar releases the new version."""
    src, out, rules = zone
    v1, v2 = b"version one\n" * 1000, b"version two\n" * 1200
    obs = Observer(out, {"r.csv": sha256(v1)})
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        obs.start()
        drop(src, "r.csv", v1)
        wait_for(lambda: (out / "r.csv.sha256").exists(), 20, "first delivery")
        tmp = src / ".r.csv.part"
        tmp.write_bytes(v2)
        os.replace(tmp, src / "r.csv")  # replaced, sidecar still declares v1
        wait_for(lambda: events(relay.logs(), "file_changed", "r.csv"), 20, "file_changed")
        wait_for(lambda: (journal_row(tmp_path, "r.csv") or ("",))[0] == "waiting", 20,
                 "waiting after the replacement")
        os.truncate(src / "r.csv", 100)  # and truncated
        wait_for(lambda: "hashes to" in str(journal_row(tmp_path, "r.csv")), 20,
                 "mismatch after truncation")
        assert (out / "r.csv").read_bytes() == v1 and alive(relay)
        obs.stop()  # until here the destination may only ever show v1
        (src / "r.csv").write_bytes(v2)
        (src / "r.csv.sha256").write_text(sha256(v2))
        wait_for(lambda: (out / "r.csv").read_bytes() == v2
                 and (out / "r.csv.sha256").read_text().startswith(sha256(v2)), 20,
                 "second version delivered")
    finally:
        obs.stop()
        assert relay.stop() == 0
    assert obs.violations == []


def test_payload_truncated_while_being_copied_is_not_delivered(
        tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """A payload (with a sidecar) truncated in the middle of its copy is caught by the
    streamed digest: the temporary is discarded, the file waits, nothing partial shows."""
    src, out, rules = zone
    size = 768 * 2**20
    zeros = bytes(2**20)
    h = hashlib.sha256()
    for _ in range(size // len(zeros)):
        h.update(zeros)
    with open(src / "t.bin", "wb") as f:
        f.truncate(size)
    obs = Observer(out, {"t.bin": h.hexdigest()})
    obs.start()
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()

        def copying() -> bool:
            try:
                return (out / ".t.bin.tmp").stat().st_size > 64 * 2**20
            except FileNotFoundError:
                return False

        (src / "t.bin.sha256").write_text(h.hexdigest())
        wait_for(copying, 30, "copy under way")
        os.truncate(src / "t.bin", 1000)
        wait_for(lambda: "hashes to" in str(journal_row(tmp_path, "t.bin")), 30,
                 "digest mismatch recorded")
        wait_for(lambda: not (out / ".t.bin.tmp").exists(), 10, "temporary discarded")
        assert not (out / "t.bin").exists() and alive(relay)
        assert journal_row(tmp_path, "t.bin")[0] == "waiting"  # type: ignore[index]
    finally:
        obs.stop()
        assert relay.stop() == 0
    assert obs.violations == []


# -- names -------------------------------------------------------------------------------

AWKWARD = ["with spaces in it.csv", "-rf --no-preserve-root.csv", "--.csv", "-",
           "line\nbreak.csv", "tab\there.csv", "back\\slash.csv", "quote'\"s.csv",
           "ünïcødé ✓ 名前.csv", "semi;colon $(echo x) `y`.csv", "trailing dot.",
           "sub dir/nested -x.csv"]


def test_awkward_names_are_delivered_byte_for_byte(
        tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """Names with spaces, newlines, tabs, leading dashes, quotes, shell metacharacters and
    non-ASCII letters are delivered under the same name with the same bytes."""
    src, out, rules = zone
    files = {n: f"content of {n!r}\n".encode() for n in AWKWARD}
    for n, data in files.items():
        p = src / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        Path(f"{p}.sha256").write_text(sha256(data))  # bare hex: no name to parse
    res = run_once(tmp_path, rules)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert tree(out) == set(files) | {f"{n}.sha256" for n in files}
    for n, data in files.items():
        assert (out / n).read_bytes() == data, n
        assert (out / f"{n}.sha256").read_text().startswith(sha256(data)), n
        assert journal_row(tmp_path, n) == ("done", None), n


@pytest.mark.parametrize("name", ["-rf x y.csv", "a  b.csv", "in space .csv", "--.csv"])
def test_coreutils_sidecars_for_names_with_spaces_and_dashes(
        tmp_path: Path, zone: tuple[Path, Path, Path], name: str) -> None:
    """`sha256sum` run by the producer on names with inner spaces or leading dashes
    yields a sidecar relay accepts."""
    src, out, rules = zone
    (src / name).write_bytes(b"dash")
    with open(src / f"{name}.sha256", "wb") as sidecar:
        subprocess.run(["sha256sum", "--", name], cwd=src, check=True, stdout=sidecar)
    res = run_once(tmp_path, rules)
    assert res.returncode == 0
    assert (out / name).read_bytes() == b"dash"
