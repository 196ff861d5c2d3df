"""Hostile world, SFTP (issue "Hostile world"): a real `relay run` to a real OpenSSH sshd
(tests/sshd_server.py), served from a local folder that observers watch directly on disk.

* A randomised SIGKILL crash loop — the torture loop of tests/test_torture.py, smaller,
  with two SFTP destinations (hidden temporaries, and a staging folder): kills also land
  during connect, probe and recovery. SFTP temporaries are kept after a kill so the next
  attempt can resume, so "no temporary left" is checked once everything is done.
* Network chaos: relay talks to sshd through tests/tcp_proxy.py's ChaosProxy, which at
  random cuts, stalls (forwards nothing, closes nothing) and slows (throttles) the
  connections, while relay forwards a bounded set of files, some several MB.

In both, every file must arrive exactly once and intact, no partial or early signal is ever
visible on the server, nothing is left behind, the journal is consistent and the daemon
keeps running. Each test prints a one-line summary with its counts.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.helpers import (
    RELAY,
    RelayProc,
    check_delivered,
    drop,
    leftovers,
    relay_env,
    sha256,
    wait_for,
    write_rules,
)
from tests.observer import BatchObserver, Observer, check_observers
from tests.producer import Producer
from tests.sshd_server import Sshd, sftp_dir, sshd  # noqa: F401
from tests.tcp_proxy import ChaosProxy, TcpProxy

pytestmark = pytest.mark.timeout(300)

MB = 1 << 20


def _count(log: str, event: str) -> int:
    """How many JSON log lines have this event."""
    n = 0
    for line in log.splitlines():
        if f'"{event}"' in line:
            try:
                n += json.loads(line).get("event") == event
            except ValueError:
                continue  # a line cut by SIGKILL
    return n


def _sftp_dest(sshd: Sshd, root: Path, known_hosts: Path | None = None,  # noqa: F811
               port: int | None = None, **extra: Any) -> tuple[str, dict[str, Any]]:
    url = f"sftp://{sshd.user}@127.0.0.1:{port or sshd.port}{root}"
    return url, {"identity": str(sshd.client_key),
                 "known_hosts": str(known_hosts or sshd.known_hosts), **extra}


def _journal_checks(journal: Path, deliveries: int) -> None:
    db = sqlite3.connect(journal)
    try:
        assert dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")) == {
            "delivered": deliveries}
        assert db.execute("SELECT COUNT(*) FROM history").fetchone()[0] == deliveries
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


# -- SIGKILL crash loop with SFTP destinations ---------------------------------------------

CRASH_FILES = 130
CRASH_BATCHES = 4
CRASH_KILLS = 15
CRASH_SIZES = [0, 1, 17, 4096, 65_536, 300_000, 1_500_000, 6_000_000]
CRASH_WEIGHTS = [3, 3, 10, 20, 25, 20, 12, 2]
CRASH_RATE = 3e6  # bytes/s to destination t


def sftp_torture(tmp_path: Path, sshd: Sshd, server_dir: Path,  # noqa: F811
                 proxy: TcpProxy, transport: str = "asyncssh") -> str:
    """The crash loop against real sshd (destination t through ``proxy``); returns a
    one-line summary."""
    rng = random.Random(int(os.environ.get("TORTURE_SEED", "20261124")))
    src = tmp_path / "in"
    src.mkdir()
    s, t = server_dir / "s", server_dir / "t"
    s.mkdir()
    t.mkdir()
    # Destination t goes through a throttling proxy: its transfers last long enough for
    # the journal to record progress before a kill, so restarts resume partials.
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_public_key}\n")
    dests, extra = {}, {}
    for name, root, port, more in (("s", s, None, {}),
                                   ("t", t, proxy.port, {"temp": "staging"})):
        dests[name], extra[name] = _sftp_dest(sshd, root, kh if port else None, port,
                                              connect_timeout="5s", login_timeout="5s",
                                              transport=transport, **more)
    rules = write_rules(tmp_path / "rules", source=src, dests=dests, extra_dest=extra)
    doc = yaml.safe_load((rules / "rules.yaml").read_text())
    doc["routes"] = [
        {"name": "batches", "source": "in", "match": "batch*/**", "to": ["s", "t"],
         "then": "delete"},
        {"name": "singles", "source": "in", "match": "**", "to": ["s", "t"],
         "then": "delete"}]
    (rules / "rules.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    producer = Producer(src, rng, files=CRASH_FILES, batches=CRASH_BATCHES,
                        sizes=CRASH_SIZES, weights=CRASH_WEIGHTS)
    expected = {rel: sha256(data) for rel, data in producer.files.items()}
    observers = [BatchObserver(root, expected, {d: list(ms) for d, ms in
                                                producer.batches.items()},
                               strict_markers=True) for root in (s, t)]
    for o in observers:
        o.interval = 0.005
        o.start()
    per_step = len(producer.todo) // CRASH_KILLS + 1
    kills = early_kills = 0
    started = time.monotonic()
    env = {"RELAY_RETRY_BASE": "0.05", "RELAY_RETRY_CAP": "0.5"}

    def sources() -> set[str]:
        return {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}

    try:
        while kills < CRASH_KILLS:
            producer.step(per_step)
            relay = RelayProc(tmp_path, rules, **env).start()
            if rng.random() < 0.25:  # during start-up: connect, probe, recovery
                time.sleep(rng.uniform(0.1, 1.0))
                early_kills += 1
            else:
                relay.wait_started(60)
                time.sleep(rng.uniform(0.0, 2.5))  # the kill instant is the thing under test
            relay.kill()
            kills += 1
        producer.finish()
        relay = RelayProc(tmp_path, rules, RELAY_RESCAN_INTERVAL="1", **env).start()
        try:
            relay.wait_started(60)
            wait_for(lambda: all((root / f"{rel}.sha256").exists()
                                 for root in (s, t) for rel in producer.files
                                 if not rel.startswith("batch"))
                     and all((root / d / "_SUCCESS").exists()
                             for root in (s, t) for d in producer.batches),
                     120, "every file at both SFTP destinations")
            wait_for(lambda: not sources(), 30, "post-actions")
            db = sqlite3.connect(tmp_path / "journal.sqlite3")
            wait_for(lambda: dict(db.execute("SELECT state, COUNT(*) FROM files GROUP BY "
                                             "state")) == {"done": CRASH_FILES + CRASH_BATCHES},
                     30, "every journal row done")
            db.close()
            assert relay.proc is not None and relay.proc.poll() is None
        except BaseException:
            print(relay.logs()[-6000:])
            raise
        finally:
            assert relay.stop() == 0
    finally:
        for o in observers:
            o.stop()
    elapsed = time.monotonic() - started
    check_observers(observers)
    for root in (s, t):
        check_delivered(root, producer.files)
        # Temporaries kept for resume are finished by the end; probe files never stay.
        assert leftovers(root) == [], leftovers(root)[:10]
        assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) in (
            [], [".relay-staging"])
    members = len(producer.files) - CRASH_BATCHES
    _journal_checks(tmp_path / "journal.sqlite3", 2 * members)
    st = subprocess.run([*RELAY, "status"], env=relay_env(tmp_path, rules),
                        capture_output=True, text=True, check=True)
    assert f"done={CRASH_FILES + CRASH_BATCHES}" in st.stdout
    log = relay.logs()
    return (f"sftp torture: {len(producer.files)} files "
            f"({sum(map(len, producer.files.values())) / 1e6:.0f} MB) x 2 SFTP destinations, "
            f"{kills} SIGKILLs ({early_kills} during start-up), "
            f"{_count(log, 'sftp_connected')} SSH logins, "
            f"{_count(log, 'transfer_resumed')} resumes, "
            f"{_count(log, 'transfer_resume_fallback')} resume fallbacks, "
            f"{_count(log, 'transfer_restarted')} restarts, "
            f"{_count(log, 'temp_swept')} temporaries swept, "
            f"{sum(o.polls for o in observers)} observer polls, {elapsed:.1f}s")


@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_sigkill_crash_loop_to_sftp(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                    sftp_dir: Path, transport: str) -> None:  # noqa: F811
    """Files of mixed sizes, signals and arrival orders, and batches, reach two SFTP
    destinations (hidden temporaries; a staging folder) exactly once and intact while
    relay is SIGKILLed at random instants — also while connecting, probing and
    recovering — with server-side observers that never see a partial, an early signal or
    a rewritten payload or _SUCCESS; at the end no temporary or probe file is left. On
    both SFTP transports (with openssh, each kill also takes relay's ssh processes)."""
    with TcpProxy(sshd.host, sshd.port, rate=CRASH_RATE) as proxy:
        print(transport, sftp_torture(tmp_path, sshd, sftp_dir, proxy, transport))


# -- network chaos between relay and sshd -------------------------------------------------

CHAOS_SMALL = 45
CHAOS_BIG = 15
CHAOS_WAVES = 6


@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_network_chaos_cuts_stalls_slowdowns(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                             sftp_dir: Path, transport: str) -> None:  # noqa: F811
    """`relay run` forwards 60 files (15 of 2-6 MB) to real sshd through a proxy that
    cuts, stalls and throttles the connections at random: every file arrives intact exactly
    once, no partial or early signal is ever visible on the server, no temporary is left,
    the daemon keeps running, and cut transfers resume. On both SFTP transports."""
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "4242")))
    files: dict[str, bytes] = {}
    for i in range(CHAOS_SMALL):
        files[f"small/f{i}.csv"] = rng.randbytes(rng.choice([0, 1000, 65_536, 300_000]))
    for i in range(CHAOS_BIG):
        files[f"big/b{i}.bin"] = rng.randbytes(rng.randint(2 * MB, 6 * MB))
    src = tmp_path / "landing"
    src.mkdir()
    started = time.monotonic()
    with ChaosProxy(sshd.host, sshd.port, seed=rng.randrange(1 << 30),
                    interval=(0.5, 2.0)) as proxy:
        kh = tmp_path / "kh"
        kh.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_public_key}\n")
        url, extra = _sftp_dest(sshd, sftp_dir, kh, proxy.port, connect_timeout="3s",
                                login_timeout="3s", keepalive_interval="1s",
                                transport=transport)
        rules = write_rules(tmp_path / "rules", source=src, dests={"p": url},
                            extra_dest={"p": extra}, route={"then": "delete"})
        observer = Observer(sftp_dir, {k: sha256(v) for k, v in files.items()},
                            interval=0.005)
        relay = RelayProc(tmp_path, rules, RELAY_RETRY_BASE="0.2", RELAY_RETRY_CAP="2",
                          RELAY_RETRY_MAX_ATTEMPTS="60", RELAY_BREAKER_COOLDOWN="1",
                          RELAY_PROGRESS_INTERVAL="2").start()
        try:
            relay.wait_started(60)
            observer.start()
            proxy.start_chaos()
            # Waves, each once the proxy has done two more things: faults keep landing on
            # transfers for the whole run, not only on the first seconds of it.
            names = list(files)
            for wave in range(CHAOS_WAVES):
                wait_for(lambda w=wave: len(proxy.actions) >= 2 * w, 60,  # type: ignore[misc]
                         f"chaos action {2 * wave}")
                for rel in names[wave::CHAOS_WAVES]:
                    drop(src, rel, files[rel])
            wait_for(lambda: all((sftp_dir / f"{rel}.sha256").exists() for rel in files),
                     150, "every file delivered through the chaos")
            proxy.stop_chaos()
            wait_for(lambda: not [p for p in src.rglob("*") if p.is_file()], 30,
                     "sources deleted")
            assert relay.proc is not None and relay.proc.poll() is None, "relay died"
        except BaseException:
            print(proxy.actions, relay.logs()[-6000:])
            raise
        finally:
            observer.stop()
            code = relay.stop()
        assert code == 0
    elapsed = time.monotonic() - started
    observer.check_once()
    assert observer.violations == [], observer.violations[:10]
    assert observer.polls > 100
    for rel, data in files.items():
        assert (sftp_dir / rel).read_bytes() == data, rel
        assert (sftp_dir / f"{rel}.sha256").read_text() == \
            f"{sha256(data)}  {PurePosixPath(rel).name}\n"
    assert leftovers(sftp_dir) == [], leftovers(sftp_dir)[:10]
    _journal_checks(tmp_path / "journal.sqlite3", len(files))
    log = relay.logs()
    resumes, fallbacks = _count(log, "transfer_resumed"), _count(log, "transfer_resume_fallback")
    assert proxy.cuts >= 1 and proxy.stalls >= 1 and proxy.slowdowns >= 1, proxy.actions
    assert _count(log, "delivery_retry_scheduled") >= 1
    assert _count(log, "sftp_connected") >= 2
    print(f"network chaos ({transport}): {len(files)} files "
          f"({sum(map(len, files.values())) / 1e6:.0f} MB), "
          f"{proxy.summary()}, {_count(log, 'sftp_connected')} SSH logins, "
          f"{_count(log, 'sftp_connection_stalled')} watchdog aborts, "
          f"{_count(log, 'delivery_retry_scheduled')} retries, {resumes} resumes, "
          f"{fallbacks} resume fallbacks, {_count(log, 'transfer_restarted')} restarts, "
          f"{proxy.bytes_up / sum(map(len, files.values())):.2f}x bytes up, {elapsed:.1f}s")
