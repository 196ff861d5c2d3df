"""/metrics, /healthz and /readyz scraped over HTTP from a real `relay run` while files flow."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from relay.metrics import _OnFirstUse
from tests.helpers import RelayProc, drop, relay_env, wait_for, write_rules

RELAY_PY = [sys.executable]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_and_health_while_files_flow(tmp_path: Path) -> None:
    """Counters for seen/ready/delivered/bytes move as files are delivered; probes answer."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"})
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    relay = RelayProc(tmp_path, rules, RELAY_METRICS_ADDR=f"127.0.0.1:{port}").start()
    try:
        relay.wait_started()
        assert _get(base + "/healthz")[0] == 200
        wait_for(lambda: _get(base + "/readyz")[0] == 200, 10, "readyz 200")
        before = _get(base + "/metrics")[1]
        assert _metric(before, "relay_files_delivered_total") == 0
        for i in range(5):
            drop(src, f"m{i}.bin", b"x" * (1000 * (i + 1)))
        (src / "waiting.bin").write_bytes(b"no signal")
        wait_for(lambda: _metric(_get(base + "/metrics")[1], "relay_files_delivered_total",
                                 destination="o") == 5, 20, "5 deliveries counted")
        text = _get(base + "/metrics")[1]
        assert _metric(text, "relay_bytes_delivered_total", route="r") == 15000
        assert _metric(text, "relay_files_seen_total", route="r") == 6
        assert _metric(text, "relay_files_ready_total", route="r") == 5
        assert re.search(r'relay_transfer_duration_seconds_count\{destination="o"\} 5', text)
        assert _get(base + "/nope")[0] == 404
    finally:
        assert relay.stop() == 0


def test_metrics_are_built_on_first_use_and_not_at_all_when_nothing_serves_them(
        tmp_path: Path) -> None:
    """The registry appears when first used; after ``unread()`` (a process nothing can
    scrape) updates are taken and dropped, and prometheus-client is never imported —
    `relay run --once` imports neither it nor watchdog (~28 ms of start-up)."""
    used = _OnFirstUse()
    assert "registry" not in vars(used)
    used.files_seen.labels("r").inc()
    used.unread()  # too late: already in use, stays real
    used.files_seen.labels("r").inc()
    assert used.registry.get_sample_value("relay_files_seen_total", {"route": "r"}) == 2
    with pytest.raises(AttributeError):
        _ = used.no_such_metric

    dropped = _OnFirstUse()
    dropped.unread()
    dropped.files_seen.labels("r").inc()
    dropped.transfer_seconds.labels("d").observe(0.5)
    dropped.queue_depth.set(3)
    dropped.in_flight.dec()
    assert "registry" not in vars(dropped)

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    drop(src, "a.csv", b"x")
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"})
    once = subprocess.run([*RELAY_PY, "-X", "importtime", "-m", "relay.cli", "run", "--once"],
                          env=relay_env(tmp_path, rules), capture_output=True, text=True,
                          timeout=60)
    assert once.returncode == 0, once.stdout[-2000:]
    assert (out / "a.csv").read_bytes() == b"x"
    imported = {line.rsplit("|", 1)[1].strip() for line in once.stderr.splitlines()
                if line.startswith("import time:")}
    assert "relay.engine" in imported  # the probe works
    assert not {m for m in imported if m.startswith(("prometheus_client", "watchdog"))}
