"""`relay run` (a real subprocess) delivering to a real OpenSSH sshd: content, signal-last
ordering seen by a server-side observer, pooled connections, refused host keys and logins,
and `relay check --probe`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault_sftp import FaultServer, fault_server
from tests.helpers import (
    RELAY,
    RelayProc,
    drop,
    relay_env,
    report_renders,
    sha256,
    wait_for,
    write_rules,
)
from tests.observer import Observer
from tests.sshd_server import Sshd, make_key, sftp_dir, sshd  # noqa: F401
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


def sftp_rules(tmp_path: Path, url: str, identity: Path, known_hosts: Path,
               route: dict[str, Any] | None = None, **dest: Any) -> tuple[Path, Path]:
    src = tmp_path / "landing"
    src.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"partner": url},
                        route=route, extra_dest={"partner": {
                            "identity": str(identity), "known_hosts": str(known_hosts),
                            "connect_timeout": "5s", "login_timeout": "5s", **dest}})
    return src, rules


@pytest.fixture
def faulty(tmp_path: Path, sshd: Sshd) -> Iterator[FaultServer]:  # noqa: F811
    with fault_server(tmp_path / "fault", sshd.client_key) as fs:
        yield fs


def test_relay_run_delivers_over_sftp_signal_last(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                  sftp_dir: Path) -> None:  # noqa: F811
    """Files of several sizes arrive byte-identical with sidecar and marker, and a
    server-side observer never sees a final name before its content is complete, nor a
    signal before its payload."""
    src, rules = sftp_rules(tmp_path, sshd.url(sftp_dir), sshd.client_key, sshd.known_hosts,
                            route={"signal": "both"})
    files = {"empty.bin": b"", "small.csv": b"a,b\n" * 100,
             "deep/er/big.bin": os.urandom(5 * 1024 * 1024 + 3),
             **{f"many/f{i}.dat": os.urandom(4096) for i in range(20)}}
    observer = Observer(sftp_dir, {k: sha256(v) for k, v in files.items()}, interval=0.002)
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        observer.start()
        for rel, data in files.items():
            drop(src, rel, data)
        wait_for(lambda: all((sftp_dir / f"{rel}.done").exists() for rel in files), 30,
                 "every file delivered with its marker")
    finally:
        observer.stop()
        relay.stop()
    assert observer.violations == [] and observer.polls > 10
    for rel, data in files.items():
        assert (sftp_dir / rel).read_bytes() == data
        name = rel.rsplit("/", 1)[-1]
        assert (sftp_dir / f"{rel}.sha256").read_text() == f"{sha256(data)}  {name}\n"
    assert not [p for p in sftp_dir.rglob(".*")], "temporaries or probe files left behind"
    assert len(relay.events("sftp_connected")) == 1
    assert relay.events("sftp_capabilities")[0]["posix_rename"] is True


def test_many_files_one_connection_and_concurrency(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                   faulty: FaultServer) -> None:
    """80 files go over the one pooled connection opened at start-up, with never more
    than the destination's concurrency (3) open at once on the server."""
    with TcpProxy(faulty.host, faulty.port) as proxy:
        kh = tmp_path / "kh"
        kh.write_text(faulty.known_hosts.read_text().replace(f":{faulty.port}",
                                                              f":{proxy.port}"))
        src, rules = sftp_rules(tmp_path, f"sftp://test@127.0.0.1:{proxy.port}/",
                                faulty.client_key, kh, concurrency=3)
        relay = RelayProc(tmp_path, rules, RELAY_CONCURRENCY="16").start()
        try:
            relay.wait_started()
            files = {f"d{i % 4}/f{i}.bin": os.urandom(4096 + i) for i in range(80)}
            for rel, data in files.items():
                drop(src, rel, data)
            wait_for(lambda: all((faulty.root / f"{r}.sha256").exists() for r in files), 30,
                     "80 deliveries")
        finally:
            relay.stop()
        assert proxy.connections == 1 and faulty.faults.connections == 1
    assert 1 < faulty.faults.max_open_files <= 3
    assert all((faulty.root / rel).read_bytes() == data for rel, data in files.items())


def test_bad_credentials_schedule_retries(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                          sftp_dir: Path) -> None:  # noqa: F811
    """A refused login is logged clearly and the delivery is retried on a schedule; relay
    keeps running and `status` shows the error."""
    make_key(tmp_path / "stranger")
    src, rules = sftp_rules(tmp_path, sshd.url(sftp_dir), tmp_path / "stranger",
                            sshd.known_hosts)
    relay = RelayProc(tmp_path, rules, RELAY_RETRY_BASE="0.2", RELAY_RETRY_CAP="1").start()
    try:
        relay.wait_started()
        assert "login refused" in relay.events("destination_unavailable")[0]["error"]
        drop(src, "f.bin", b"data")
        wait_for(lambda: len(relay.events("delivery_retry_scheduled")) >= 2, 30,
                 "two scheduled retries")
        assert relay.proc is not None and relay.proc.poll() is None
        status = subprocess.run([*RELAY, "status", "--json"], env=relay_env(tmp_path, rules),
                                capture_output=True, text=True, timeout=30, check=True)
    finally:
        relay.stop()
    retry = relay.events("delivery_retry_scheduled")[0]
    assert "login refused" in retry["error"] and retry["retry_in_s"] > 0
    delivering = json.loads(status.stdout)["lists"]["delivering"]
    assert "login refused" in delivering[0]["deliveries"][0]["error"]
    assert not (sftp_dir / "f.bin").exists()


@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_refused_host_key_fails_delivery(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                         sftp_dir: Path, case: str) -> None:  # noqa: F811
    """An unknown or changed host key is refused: the delivery fails permanently with a
    message naming known_hosts, nothing is uploaded, and relay keeps running."""
    kh = tmp_path / "known_hosts"
    if case == "unknown":
        kh.write_text("")
    else:
        other = make_key(tmp_path / "other").export_public_key("openssh").decode().split()
        kh.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    src, rules = sftp_rules(tmp_path, sshd.url(sftp_dir), sshd.client_key, kh)
    relay = RelayProc(tmp_path, rules).start()
    try:
        relay.wait_started()
        drop(src, "f.bin", b"data")
        wait_for(lambda: relay.events("delivery_failed"), 30, "delivery_failed")
        assert relay.proc is not None and relay.proc.poll() is None
    finally:
        relay.stop()
    failed = relay.events("delivery_failed")[0]
    assert failed["permanent"] is True
    assert "host key refused" in failed["error"] and str(kh) in failed["error"]
    assert list(sftp_dir.iterdir()) == []


def test_check_probe_shows_capabilities(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                        sftp_dir: Path) -> None:  # noqa: F811
    """`relay check --probe` connects and prints what the SFTP server supports."""
    _, rules = sftp_rules(tmp_path, sshd.url(sftp_dir), sshd.client_key, sshd.known_hosts)
    res = subprocess.run([*RELAY, "check", "--probe"], env=relay_env(tmp_path, rules),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(s for s in res.stdout.splitlines() if s.startswith("partner: ok "))
    caps = json.loads(line.removeprefix("partner: ok "))
    assert caps["posix_rename"] is True and caps["fsync"] is True and caps["resume"] is True


def test_bench_sftp_quick_runs_and_reports() -> None:
    """bench_sftp.py --quick starts its own sshd, reports every contender's numbers, and
    bench/report.py renders them."""
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_sftp.py"
    res = subprocess.run([sys.executable, str(script), "--quick", "--no-save"],
                         capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(res.stdout[res.stdout.index("\n{") + 1:])
    assert set(data["large"]["mb_s"]) >= {"relay (delivery)", "sftp -b", "scp"}
    assert data["large"]["ratio_to_sftp"]["sftp -b"] == 1.0
    assert data["small"]["files"] == 30 and data["small"]["files_per_s"]["relay (delivery)"] > 0
    assert data["small"]["speedup_vs_like_for_like"]["sftp -b like for like"] == 1.0
    report_renders("sftp", data)


@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_ctrl_c_in_a_terminal_drains_the_transfer(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                  sftp_dir: Path,  # noqa: F811
                                                  transport: str) -> None:
    """A terminal's Ctrl-C reaches relay's whole process group. relay drains on SIGINT;
    neither its helpers nor (transport: openssh) its ssh processes may die under the
    transfer it is draining: the file in flight is delivered by this run, relay exits 0."""
    data = os.urandom(3 * 1024 * 1024)
    with TcpProxy(sshd.host, sshd.port, rate=1.5e6) as proxy:  # ~2 s for the file
        kh = tmp_path / "kh"
        kh.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_public_key}\n")
        src, rules = sftp_rules(tmp_path, sshd.url(sftp_dir).replace(
            f":{sshd.port}/", f":{proxy.port}/"), sshd.client_key, kh, transport=transport)
        log = open(tmp_path / "relay.log", "wb")  # noqa: SIM115 - closed below
        # its own process group, as a shell gives a foreground job: the group is signalled
        proc = subprocess.Popen([*RELAY, "run"], env=relay_env(tmp_path, rules), stdout=log,
                                stderr=subprocess.STDOUT, process_group=0)
        try:
            drop(src, "big.bin", data)
            tmp = sftp_dir / ".big.bin.tmp"
            wait_for(lambda: tmp.exists() and tmp.stat().st_size > 256 * 1024, 20,
                     "the upload under way")
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            log.close()
    logs = (tmp_path / "relay.log").read_text()
    assert code == 0, logs[-3000:]
    assert (sftp_dir / "big.bin").read_bytes() == data, logs[-3000:]
    assert (sftp_dir / "big.bin.sha256").exists()
    assert "delivery_retry_scheduled" not in logs
