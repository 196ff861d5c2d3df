"""Failure policy: retries with backoff, the per-destination circuit breaker, `relay retry`,
and rules reload on SIGHUP."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import yaml

from relay.breaker import Breaker
from relay.delivery import backoff
from tests.helpers import (
    RELAY,
    RelayProc,
    alive,
    drop,
    events,
    journal_row,
    listed,
    relay_env,
    remount,
    run_once,
    status,
    tmpfs,
    wait_for,
    write_rules,
)


def test_backoff_grows_and_is_capped() -> None:
    """Backoff delays grow exponentially, stay within the cap and are jittered."""
    delays = [backoff(a, 1.0, 30.0) for a in range(1, 12)]
    assert all(0.5 <= d <= 30.0 for d in delays)
    assert max(backoff(10, 1.0, 30.0) for _ in range(50)) > 15
    assert len({backoff(3, 1.0, 30.0) for _ in range(20)}) > 1


def test_breaker_opens_half_opens_and_closes() -> None:
    """The breaker opens after N failures, lets one probe through after the cool-down,
    re-opens for longer if it fails and closes on success."""
    b = Breaker(threshold=3, base=10, cap=100)
    for _ in range(2):
        assert b.allow(0) and not b.record(False, 0)
    assert b.allow(0) and b.record(False, 0)  # third failure opens it
    assert not b.allow(5)
    assert b.allow(11) and not b.allow(11)  # one probe only
    b.record(False, 11)
    assert not b.allow(25) and b.allow(32)  # second opening lasts 20 s
    b.record(True, 32)
    assert b.allow(32) and not b.is_open


def test_dead_destination_does_not_stall_others_and_recovers(tmp_path: Path) -> None:
    """With one destination missing, the other still gets every file; the dead one is
    backed off as a whole, and catches up by itself once it comes back."""
    src, good, bad = tmp_path / "in", tmp_path / "good", tmp_path / "bad"
    src.mkdir()
    good.mkdir()
    rules = write_rules(tmp_path / "rules", source=src,
                        dests={"good": f"file://{good}", "bad": f"file://{bad}/missing"})
    relay = RelayProc(tmp_path, rules, RELAY_RETRY_BASE="0.05", RELAY_RETRY_CAP="0.5",
                      RELAY_BREAKER_THRESHOLD="3", RELAY_BREAKER_COOLDOWN="0.5").start()
    try:
        relay.wait_started()
        for i in range(8):
            drop(src, f"f{i}.csv", f"row {i}\n".encode())
        wait_for(lambda: all((good / f"f{i}.csv.sha256").exists() for i in range(8)), 20,
                 "all files at the healthy destination")
        wait_for(lambda: "destination_circuit_opened" in relay.logs(), 20, "circuit opened")
        (bad / "missing").mkdir(parents=True)
        wait_for(lambda: all((bad / "missing" / f"f{i}.csv.sha256").exists()
                             for i in range(8)), 30, "dead destination caught up")
        assert "destination_circuit_closed" in relay.logs()
    finally:
        assert relay.stop() == 0


def test_max_attempts_fail_then_relay_retry_requeues(tmp_path: Path) -> None:
    """After max attempts a file is failed (source untouched, listed by status); `relay
    retry` re-queues it and it is delivered once the cause is fixed."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"},
                        route={"retry": {"base": "10ms", "cap": "20ms", "max_attempts": 2},
                               "then": "delete"})
    drop(src, "x.csv", b"x")
    env = relay_env(tmp_path, rules)
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        wait_for(lambda: "file_failed" in relay.logs(), 20, "file failed")
    finally:
        relay.stop()
    st = json.loads(subprocess.run([*RELAY, "status", "--json"], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    failed = st["lists"]["failed"]
    assert [f["file"] for f in failed] == ["x.csv"]
    assert failed[0]["deliveries"][0]["attempt"] == 2
    assert (src / "x.csv").exists()
    out.mkdir()
    subprocess.run([*RELAY, "retry", "x.csv"], env=env, check=True, capture_output=True)
    assert run_once(tmp_path, rules).returncode == 0
    assert (out / "x.csv").read_bytes() == b"x" and not (src / "x.csv").exists()


def test_sighup_reloads_rules_and_rejects_invalid_edits(tmp_path: Path) -> None:
    """SIGHUP applies a valid edit (new route target) and rejects an invalid one while the
    old rules keep working."""
    src, a, b = tmp_path / "in", tmp_path / "a", tmp_path / "b"
    for p in (src, a, b):
        p.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"a": f"file://{a}"})
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        assert relay.proc is not None
        doc = yaml.safe_load((rules / "rules.yaml").read_text())
        doc["destinations"].append({"name": "b", "url": f"file://{b}"})
        doc["routes"][0]["to"] = ["b"]
        (rules / "rules.yaml").write_text(yaml.safe_dump(doc))
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "rules_reloaded" in relay.logs(), 10, "reload")
        drop(src, "one.csv", b"1")
        wait_for(lambda: (b / "one.csv.sha256").exists(), 10, "delivery under new rules")
        (rules / "rules.yaml").write_text("routes: [{name: broken}]\n")
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "rules_reload_rejected" in relay.logs(), 10, "rejected reload")
        drop(src, "two.csv", b"2")
        wait_for(lambda: (b / "two.csv.sha256").exists(), 10, "old rules still working")
    finally:
        assert relay.stop() == 0


def test_signal_write_failures_count_towards_max_attempts(tmp_path: Path) -> None:
    """With max_attempts 2, a destination that can never take the signal file makes the
    delivery fail after 2 attempts (journalled, listed by status)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"},
                        route={"retry": {"base": "10ms", "cap": "20ms", "max_attempts": 2}})
    with tmpfs(out, "size=1m,nr_inodes=2"):
        relay = RelayProc(tmp_path, rules, RELAY_BREAKER_THRESHOLD="1000").start()
        try:
            relay.wait_started()
            drop(src, "p.csv", b"p")
            wait_for(lambda: events(relay.logs(), "delivery_failed", "p.csv"), 15,
                     "delivery_failed after max attempts")
        finally:
            relay.stop()


def test_a_failed_destination_never_counts_as_delivered(tmp_path: Path) -> None:
    """Destination 'never' fails for good while 'late' is still retrying; when 'late'
    recovers the file is 'failed' (not 'done'), listed by status, and its source kept."""
    src, never, late = tmp_path / "in", tmp_path / "never", tmp_path / "late"
    src.mkdir()
    rules = write_rules(tmp_path / "rules", source=src,
                        dests={"never": f"file://{never}", "late": f"file://{late}"},
                        route={"then": "delete",
                               "retry": {"base": "50ms", "cap": "100ms", "max_attempts": 2}})
    with tmpfs(late, "size=1m,nr_inodes=2"):  # payload fits, its signal does not
        relay = RelayProc(tmp_path, rules, RELAY_BREAKER_THRESHOLD="100").start()
        try:
            relay.wait_started()
            drop(src, "x.bin", b"x")
            wait_for(lambda: events(relay.logs(), "delivery_failed", "x.bin"), 20,
                     "'never' failed")
            remount(late, "nr_inodes=16")
            wait_for(lambda: events(relay.logs(), "file_done", "x.bin")
                     or events(relay.logs(), "file_failed", "x.bin"), 20, "settled")
            assert alive(relay)
        finally:
            relay.stop()
        assert (src / "x.bin").exists(), "source deleted although 'never' has no copy"
        assert journal_row(tmp_path, "x.bin")[0] == "failed"  # type: ignore[index]
        assert "x.bin" in listed(status(tmp_path, rules), "failed")
