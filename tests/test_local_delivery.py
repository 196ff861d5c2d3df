"""End-to-end behaviour of `relay run` with local destinations: signals, batches,
mismatches, idempotency and post-actions."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

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


@pytest.fixture
def zone(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, out = tmp_path / "landing", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"out": f"file://{out}"})
    return src, out, rules


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("algo", ["sha256", "sha512", "md5"])
@pytest.mark.parametrize("form", ["bare", "gnu", "gnu_binary", "bsd"])
def test_each_sidecar_algorithm_and_form(tmp_path: Path, zone: tuple[Path, Path, Path],
                                         algo: str, form: str) -> None:
    """Every sidecar algorithm in every accepted form releases a matching payload."""
    src, out, rules = zone
    data = b"payload " * 1000
    h = hashlib.new(algo, data).hexdigest()
    body = {"bare": h, "gnu": f"{h}  f.bin", "gnu_binary": f"{h} *f.bin",
            "bsd": f"{algo.upper()} (f.bin) = {h}"}[form]
    (src / "f.bin").write_bytes(data)
    (src / f"f.bin.{algo}").write_text(body + "\n")
    res = run_once(tmp_path, rules)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / "f.bin").read_bytes() == data
    assert (out / "f.bin.sha256").read_text() == f"{sha256(data)}  f.bin\n"


def test_marker_releases_and_marker_digest_is_verified(tmp_path: Path,
                                                       zone: tuple[Path, Path, Path]) -> None:
    """An empty .done releases its payload; a .done with a wrong digest holds it back."""
    src, out, rules = zone
    drop(src, "a.csv", b"a", "done")
    (src / "b.csv").write_bytes(b"b")
    (src / "b.csv.done").write_text(f"{sha256(b'not b')}  b.csv\n")
    res = run_once(tmp_path, rules)
    assert res.returncode == 0, res.stderr
    assert _files(out) == {"a.csv", "a.csv.sha256"}


def test_no_signal_no_delivery(tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """A payload without any signal is never forwarded, and `status` says why."""
    src, out, rules = zone
    (src / "lonely.csv").write_bytes(b"x" * 100)
    assert run_once(tmp_path, rules).returncode == 0
    assert _files(out) == set()
    import subprocess

    from tests.helpers import RELAY, relay_env

    st = subprocess.run([*RELAY, "status", "--json"], env=relay_env(tmp_path, rules),
                        capture_output=True, text=True, check=True)
    waiting = json.loads(st.stdout)["lists"]["waiting"]
    assert waiting[0]["file"] == "lonely.csv" and "no sidecar" in waiting[0]["reason"]


def test_digest_mismatch_waits_then_fix_delivers(tmp_path: Path,
                                                 zone: tuple[Path, Path, Path]) -> None:
    """A payload that does not match its sidecar waits; once it matches, it is delivered."""
    src, out, rules = zone
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        (src / "x.bin").write_bytes(b"partial")
        (src / "x.bin.sha256").write_text(sha256(b"partial-and-complete"))
        wait_for(lambda: "digest" in relay.logs(), 20, "digest mismatch logged")
        assert not (out / "x.bin").exists()
        (src / "x.bin").write_bytes(b"partial-and-complete")
        wait_for(lambda: (out / "x.bin.sha256").exists(), 20, "delivery after fix")
        assert (out / "x.bin").read_bytes() == b"partial-and-complete"
    finally:
        assert relay.stop() == 0


def test_marker_before_payload_waits_for_new_marker(tmp_path: Path,
                                                    zone: tuple[Path, Path, Path]) -> None:
    """A marker that existed before its payload was written does not release it."""
    src, out, rules = zone
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        (src / "m.bin.done").write_text("")
        wait_for(lambda: "payload missing" in relay.logs(), 20, "marker seen first")
        (src / "m.bin").write_bytes(b"m" * 10_000)
        wait_for(lambda: "waiting for a new marker" in relay.logs(), 20, "stale marker noticed")
        assert not (out / "m.bin").exists()
        (src / "m.bin.done").write_text("")  # written again, after the payload
        wait_for(lambda: (out / "m.bin.sha256").exists(), 20, "delivery after new marker")
        assert (out / "m.bin").read_bytes() == b"m" * 10_000
    finally:
        relay.stop()


def test_batch_all_or_none_marker_last(tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """A _SUCCESS folder with a manifest goes all-or-none, its marker written last."""
    src, out, rules = zone
    d = src / "batch1"
    d.mkdir()
    members = {f"part-{i}.csv": bytes([65 + i]) * (1000 + i) for i in range(5)}
    for n, data in members.items():
        (d / n).write_bytes(data)
    manifest = "".join(f"{sha256(data)}  {n}\n" for n, data in members.items())
    (d / "SHA256SUMS").write_text(manifest.replace(sha256(members["part-4.csv"]), "0" * 64))
    (d / "_SUCCESS").write_text("")
    assert run_once(tmp_path, rules).returncode == 0
    assert _files(out) == set(), "a batch with one bad member must deliver nothing"
    (d / "SHA256SUMS").write_text(manifest)
    assert run_once(tmp_path, rules).returncode == 0
    got = _files(out)
    assert got == {f"batch1/{n}" for n in members} | {"batch1/SHA256SUMS", "batch1/_SUCCESS"}
    mtimes = {n: (out / n).stat().st_mtime_ns for n in got}
    assert max(mtimes.values()) == mtimes["batch1/_SUCCESS"]
    for n, data in members.items():
        assert (out / "batch1" / n).read_bytes() == data


def test_redrop_same_content_is_noop_new_content_is_delivered(
        tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """Same name + same content is not sent again; same name + new content is."""
    src, out, rules = zone
    drop(src, "r.csv", b"v1")
    assert run_once(tmp_path, rules).returncode == 0
    first = (out / "r.csv").stat().st_ino
    drop(src, "r.csv", b"v1")  # rewritten with the same bytes (new mtime, new sidecar)
    res = run_once(tmp_path, rules)
    assert "delivery_skipped_duplicate" in res.stdout
    assert (out / "r.csv").stat().st_ino == first
    drop(src, "r.csv", b"v2")
    assert run_once(tmp_path, rules).returncode == 0
    assert (out / "r.csv").read_bytes() == b"v2"


def test_fan_out_and_delete_after_all(tmp_path: Path) -> None:
    """With two destinations, the source is deleted only after both have the file."""
    src, a, b = tmp_path / "in", tmp_path / "a", tmp_path / "b"
    for p in (src, a, b):
        p.mkdir()
    rules = write_rules(tmp_path / "rules", source=src,
                        dests={"a": f"file://{a}", "b": f"file://{b}"},
                        route={"then": "delete", "signal": "both"})
    drop(src, "sub/f.dat", b"fan")
    assert run_once(tmp_path, rules).returncode == 0
    for root in (a, b):
        assert (root / "sub/f.dat").read_bytes() == b"fan"
        assert (root / "sub/f.dat.done").exists() and (root / "sub/f.dat.sha256").exists()
    assert _files(src) == set()


def test_archive_post_action_and_template(tmp_path: Path) -> None:
    """then: archive moves payload and signals; the path template reshapes the target."""
    src, out, arc = tmp_path / "in", tmp_path / "out", tmp_path / "arc"
    for p in (src, out):
        p.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"},
                        route={"then": f"archive:{arc}", "path": "{source}/{stem}.{ext}",
                               "match": "**/*.csv"})
    drop(src, "deep/er/x.csv", b"x")
    drop(src, "skip.txt", b"not routed")
    assert run_once(tmp_path, rules).returncode == 0
    assert (out / "in/x.csv").read_bytes() == b"x"
    assert _files(arc) == {"deep/er/x.csv", "deep/er/x.csv.sha256"}
    assert _files(src) == {"skip.txt", "skip.txt.sha256"}


def test_invalid_rules_refuse_to_start(tmp_path: Path) -> None:
    """`relay run` refuses invalid rules and names file and line; `relay check` too."""
    import subprocess

    from tests.helpers import RELAY, relay_env

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        "sources: [{name: in, path: /nonexistent}]\nroutes:\n  - name: r\n    source: in\n"
        "    to: [x]\n    path: '../../etc/{name}'\n")
    for cmd in (["run", "--once"], ["check"]):
        res = subprocess.run([*RELAY, *cmd], env=relay_env(tmp_path, tmp_path / "rules"),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0
        assert "r.yaml:6: routes[0].path" in res.stderr, res.stderr


def test_marker_written_before_payload_is_closed_still_vouches(
        tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """A producer that writes the marker after its last write but before closing the
    payload is served: closing adds no bytes, so it does not make the marker stale."""
    src, out, rules = zone
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        with open(src / "c.bin", "wb") as f:
            f.write(b"c" * 50_000)
            f.flush()
            (src / "c.bin.done").write_text("")
        wait_for(lambda: (out / "c.bin.sha256").exists(), 20, "delivery")
        assert (out / "c.bin").read_bytes() == b"c" * 50_000
    finally:
        relay.stop()


def test_post_action_skips_a_source_that_changed_after_delivery(tmp_path: Path) -> None:
    """delete/archive re-reads the evidence first (in its coalesced hop): a payload
    rewritten since it was delivered is left alone, one that is unchanged (or gone) is
    deleted with its signal files."""
    from relay.post_action import recheck_then_apply
    from relay.readiness import gather
    from relay.rules import ReadyRule

    ready = ReadyRule()
    drop(tmp_path, "f.bin", b"first")
    paths = ["f.bin", "f.bin.sha256"]
    delivered = gather(tmp_path, "f.bin", ready, False).fingerprint
    (tmp_path / "f.bin").write_bytes(b"second, longer")  # rewritten after delivery
    assert recheck_then_apply(tmp_path, "f.bin", ready, delivered, paths, "delete") is False
    assert _files(tmp_path) == {"f.bin", "f.bin.sha256"}
    now = gather(tmp_path, "f.bin", ready, False).fingerprint
    assert recheck_then_apply(tmp_path, "f.bin", ready, now, paths, "delete") is True
    assert _files(tmp_path) == set()
    # A batch (no fingerprint) is not re-checked here: its members were gathered by the job.
    drop(tmp_path, "g.bin", b"g")
    assert recheck_then_apply(tmp_path, "g.bin", ready, None, ["g.bin", "g.bin.sha256"],
                               f"archive:{tmp_path / 'arch'}") is True
    assert _files(tmp_path) == {"arch/g.bin", "arch/g.bin.sha256"}


def test_sigterm_during_once_stops_gracefully_and_the_rest_follows(
        tmp_path: Path, zone: tuple[Path, Path, Path]) -> None:
    """`relay run --once` told to stop while files still wait for a slot: it exits (it used
    to wait for a queue the stopped evaluator would never drain), leaves nothing partial,
    and the next run delivers the rest — each file once."""
    src, out, rules = zone
    files = {f"f{i:04d}.bin": os.urandom(2048) for i in range(1500)}
    for rel, data in files.items():
        drop(src, rel, data)
    log = tmp_path / "once.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*RELAY, "run", "--once"], stdout=logf, stderr=subprocess.STDOUT,
                                env=relay_env(tmp_path, rules, RELAY_CONCURRENCY="2",
                                              RELAY_FILE_WORKERS="0"))
        try:
            wait_for(lambda: log.read_bytes().count(b'"file_done"') >= 20, 60, "deliveries")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, log.read_text()[-2000:]
    first = {p.name for p in out.iterdir() if not p.name.endswith(".sha256")}
    assert 20 <= len(first) < len(files)  # stopped part-way
    for name in first:  # nothing partial: each payload whole, its signal beside it
        assert (out / name).read_bytes() == files[name]
        assert (out / f"{name}.sha256").exists()
    done = run_once(tmp_path, rules)
    assert done.returncode == 0, done.stdout[-2000:]
    assert done.stdout.count('"file_delivered"') == len(files) - len(first)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*files, *(f"{n}.sha256" for n in files)])
    assert all((out / n).read_bytes() == d for n, d in files.items())
