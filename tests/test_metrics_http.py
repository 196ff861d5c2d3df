"""/metrics, /healthz and /readyz scraped over HTTP from a real `relay run` while files flow."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path

from tests.helpers import RelayProc, drop, wait_for, write_rules


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
