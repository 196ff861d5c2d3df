"""Torture suite, local destinations (issue 4).

* A randomised crash loop bigger than test_crash.py: a few hundred files of mixed sizes,
  signals and arrival orders (sidecar first with the payload still being written, batches
  with manifests), two destinations (hidden temporaries and a staging folder) each watched
  by an Observer, and a real `relay run` killed with SIGKILL at random instants — also
  during start-up and recovery. At the end every file is at every destination exactly
  once, intact, no temporary is left, the sources are gone and the journal is consistent.
* Hypothesis: sidecar parsing never fails in an unexpected way, names round-trip through
  the signal relay writes, and any order of arrival of payload chunks and signals, with
  relay passes (in-process `run --once`) at any point, never shows a partial downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import structlog
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Settings
from relay.daemon import Daemon
from relay.delivery import signal_body
from relay.engine import Engine
from relay.journal import Journal
from relay.logs import configure
from relay.rules import load_rules
from relay.signal_files import DIGEST_LENGTHS, MalformedSignal, parse_digest, parse_manifest
from tests.helpers import (
    RELAY,
    RelayProc,
    check_delivered,
    leftovers,
    relay_env,
    sha256,
    wait_for,
    write_rules,
)
from tests.observer import BatchObserver, check_observers
from tests.producer import Producer

# -- the crash loop ----------------------------------------------------------------------

FILES = 300
BATCHES = 6
KILLS = 30


def torture(tmp_path: Path, batch_then: str = "keep", strict_markers: bool = False) -> str:
    """The crash loop; returns a one-line summary. Batches use ``batch_then`` as their
    post-action, single files ``delete``."""
    rng = random.Random(int(os.environ.get("TORTURE_SEED", "20261123")))
    src, a, b = tmp_path / "in", tmp_path / "a", tmp_path / "b"
    for p in (src, a, b):
        p.mkdir()
    rules = write_rules(tmp_path / "rules", source=src,
                        dests={"a": f"file://{a}", "b": f"file://{b}"},
                        extra_dest={"b": {"temp": "staging"}})
    doc = yaml.safe_load((rules / "rules.yaml").read_text())
    doc["routes"] = [
        {"name": "batches", "source": "in", "match": "batch*/**", "to": ["a", "b"],
         "then": batch_then},
        {"name": "singles", "source": "in", "match": "**", "to": ["a", "b"],
         "then": "delete"}]
    (rules / "rules.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    producer = Producer(src, rng)
    expected = {rel: sha256(data) for rel, data in producer.files.items()}
    observers = [BatchObserver(root, expected, {d: list(ms) for d, ms in
                                                producer.batches.items()}, strict_markers)
                 for root in (a, b)]
    for o in observers:
        o.start()
    per_step = len(producer.todo) // KILLS + 1
    kills = early_kills = 0
    started = time.monotonic()
    kept = {rel for rel in producer.files if rel.startswith("batch")} \
        if batch_then == "keep" else set()

    def sources() -> set[str]:
        return {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}

    try:
        while kills < KILLS:
            producer.step(per_step)
            relay = RelayProc(tmp_path, rules, RELAY_RETRY_BASE="0.05",
                              RELAY_RETRY_CAP="0.2").start()
            if rng.random() < 0.2:  # kill during start-up / recovery
                time.sleep(rng.uniform(0.05, 0.5))
                early_kills += 1
            else:
                relay.wait_started()
                time.sleep(rng.uniform(0.0, 0.8))  # the kill instant is the thing under test
            relay.kill()
            kills += 1
        producer.finish()
        relay = RelayProc(tmp_path, rules, RELAY_RESCAN_INTERVAL="1").start()
        try:
            relay.wait_started()
            wait_for(lambda: all((root / f"{rel}.sha256").exists()
                                 for root in (a, b) for rel in producer.files
                                 if not rel.startswith("batch"))
                     and all((root / d / "_SUCCESS").exists()
                             for root in (a, b) for d in producer.batches),
                     90, "every file at both destinations")
            wait_for(lambda: sources() == kept, 30, "post-actions")
            db = sqlite3.connect(tmp_path / "journal.sqlite3")
            wait_for(lambda: dict(db.execute("SELECT state, COUNT(*) FROM files GROUP BY "
                                             "state")) == {"done": FILES + BATCHES}, 20,
                     "every journal row done")
            db.close()
            assert relay.proc is not None and relay.proc.poll() is None
        finally:
            assert relay.stop() == 0
    finally:
        for o in observers:
            o.stop()
    elapsed = time.monotonic() - started
    check_observers(observers)
    for root in (a, b):
        check_delivered(root, producer.files)
        assert leftovers(root) == []
    for rel in kept:
        assert (src / rel).read_bytes() == producer.files[rel]
    members = len(producer.files) - BATCHES  # every payload, member and manifest
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    assert dict(db.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")) == {
        "delivered": 2 * members}
    assert db.execute("SELECT COUNT(*) FROM history").fetchone()[0] == 2 * members
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    st = subprocess.run([*RELAY, "status"], env=relay_env(tmp_path, rules),
                        capture_output=True, text=True, check=True)
    assert f"done={FILES + BATCHES}" in st.stdout
    return (f"torture: {len(producer.files)} files "
            f"({sum(map(len, producer.files.values())) / 1e6:.0f} MB) x 2 destinations, "
            f"{kills} SIGKILLs ({early_kills} during start-up), "
            f"{sum(o.polls for o in observers)} observer polls, "
            f"{sum(len(o.marker_rewrites) for o in observers)} _SUCCESS rewrites, "
            f"{elapsed:.1f}s")


def test_sigkill_torture_many_files_two_destinations(tmp_path: Path) -> None:
    """A few hundred files of mixed sizes, signals and arrival orders reach two
    destinations exactly once and intact while relay is SIGKILLed at random instants
    (also during start-up), with observers that never see a partial or early signal.
    Batches are deleted from the landing zone after delivery (a kill can land in the middle
    of that), and a downstream _SUCCESS must never be rewritten."""
    print(torture(tmp_path, batch_then="delete", strict_markers=True))


# -- hypothesis: parsers and names -------------------------------------------------------

HEX = "0123456789abcdefABCDEF"
_hexes = st.one_of(
    st.sampled_from(sorted(DIGEST_LENGTHS.values())).flatmap(
        lambda n: st.text(HEX, min_size=n, max_size=n)),
    st.text(HEX, max_size=140),
    st.text(max_size=70))
_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                 min_size=1, max_size=40)
_lines = st.one_of(
    _hexes,
    st.tuples(_hexes, st.sampled_from(["  ", " *", " ", "\t"]), _names).map("".join),
    st.tuples(st.sampled_from(["SHA256", "SHA512", "MD5", "SHA2-256", "SHA1", "sha256"]),
              _names, _hexes).map(lambda t: f"{t[0]} ({t[1]}) = {t[2]}"),
    st.text(max_size=80))
_bodies = st.lists(_lines, max_size=4).map("\n".join)


@given(body=_bodies, algo=st.sampled_from([None, "sha256", "sha512", "md5"]), name=_names)
def test_sidecar_parser_accepts_only_well_formed_digests(body: str, algo: str | None,
                                                         name: str) -> None:
    """Any sidecar text either parses to a digest of exactly the right length for its
    algorithm, or is refused as malformed; nothing else can happen."""
    try:
        a, h = parse_digest(body, algo, name)
    except MalformedSignal:
        return
    assert algo is None or a == algo
    assert len(h) == DIGEST_LENGTHS[a] and set(h) <= set("0123456789abcdef")
    assert h in body.lower()


@given(body=_bodies)
def test_manifest_parser_accepts_only_well_formed_lines(body: str) -> None:
    """Any manifest text either parses to names with well-formed digests or is refused."""
    try:
        listed = parse_manifest(body)
    except MalformedSignal:
        return
    assert listed
    for _name, (a, h) in listed.items():
        assert len(h) == DIGEST_LENGTHS[a]


# Names relay's sidecar parsing handles today: no line breaks of any kind, no backslash,
# no leading '*' and no surrounding white space (see tests/pending_bugs.py for the rest).
_plain_names = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
                  blacklist_characters="/\\\x85\x1c\x1d\x1e\x1f"),
    min_size=1, max_size=60).filter(
        lambda n: n == n.strip() and not n.startswith("*") and n not in (".", ".."))


@given(name=_plain_names, data=st.binary(max_size=64))
def test_names_round_trip_through_the_signals_relay_reads_and_writes(name: str,
                                                                     data: bytes) -> None:
    """For ordinary names (spaces, dashes, any script), the coreutils and BSD lines a
    producer writes and the sidecar relay writes downstream all parse back to the digest."""
    h = sha256(data)
    for body in (f"{h}  {name}\n", f"{h} *{name}\n", f"SHA256 ({name}) = {h}\n",
                 signal_body(f"some/dir/{name}", h).decode()):
        assert parse_digest(body, "sha256", name) == ("sha256", h), body
        assert parse_digest(body, None, name) == ("sha256", h), body


# -- hypothesis: orders of arrival, in-process relay passes ------------------------------


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    old = structlog.get_config()
    configure("error", "json")
    try:
        yield
    finally:
        structlog.configure(**old)


def _relay_pass(root: Path) -> None:
    """One in-process `relay run --once` over ``root``."""
    cfg = Settings(rules=root / "rules", journal=root / "journal.sqlite3", metrics_addr="",
                   rescan_interval=0, journal_sync="normal", log_level="error",
                   log_format="json", retry_base=0.01, retry_cap=0.02)
    journal = Journal(cfg.journal, cfg.journal_sync)
    try:
        asyncio.run(Daemon(Engine(cfg, load_rules(cfg.rules), journal, once=True)).run())
    finally:
        journal.close()


SIGNAL_KINDS = ["bare", "gnu", "bsd", "sha512", "md5", "done_digest", "done_empty"]


@st.composite
def _arrivals(draw: st.DrawFn) -> tuple[bytes, list[bytes], bytes, str, list[str], list[bool]]:
    data = draw(st.binary(max_size=5000))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    chunks = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    junk = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=100)))
    kind = draw(st.sampled_from(SIGNAL_KINDS))
    actions = [f"chunk{i}" for i in range(len(chunks))]
    # An empty marker vouches for whatever is there when it is written, so a producer
    # writes it last; every other signal can come at any point, even before the junk.
    at = len(actions) if kind == "done_empty" else draw(st.integers(0, len(actions)))
    actions.insert(at, "signal")
    if junk:
        actions.insert(draw(st.integers(0, actions.index("chunk0"))), "junk")
    passes = draw(st.lists(st.booleans(), min_size=len(actions), max_size=len(actions)))
    return data, chunks, junk, kind, actions, passes


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=_arrivals())
def test_any_order_of_arrival_never_shows_a_partial(case: tuple[
        bytes, list[bytes], bytes, str, list[str], list[bool]]) -> None:
    """Payload chunks, a stale junk version and the signal arrive in any order, with relay
    passes at any point: downstream only ever holds the complete payload (signal after
    it), and once everything has arrived it is delivered exactly once."""
    data, chunks, junk, kind, actions, passes = case
    import tempfile

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as t, _quiet_logs():
        root = Path(t)
        src, out = root / "in", root / "out"
        src.mkdir()
        out.mkdir()
        write_rules(root / "rules", source=src, dests={"o": f"file://{out}"},
                    extra_dest={"o": {"fsync": False}})
        p = src / "p.dat"
        h = sha256(data)
        bodies = {"bare": (".sha256", h), "gnu": (".sha256", f"{h}  p.dat\n"),
                  "bsd": (".sha256", f"SHA256 (p.dat) = {h}"),
                  "sha512": (".sha512", hashlib.sha512(data).hexdigest()),
                  "md5": (".md5", f"{hashlib.md5(data).hexdigest()} *p.dat"),
                  "done_digest": (".done", f"{h}  p.dat\n"), "done_empty": (".done", "")}
        suffix, body = bodies[kind]
        for action, run in zip(actions, passes, strict=True):
            if action == "junk":
                p.write_bytes(junk)
            elif action == "signal":
                Path(f"{p}{suffix}").write_text(body)
            else:
                i = int(action[5:])
                with open(p, "wb" if i == 0 else "ab") as f:
                    f.write(chunks[i])
            if run:
                _relay_pass(root)
                if (out / "p.dat.sha256").exists():
                    assert (out / "p.dat").exists()
                if (out / "p.dat").exists():
                    assert (out / "p.dat").read_bytes() == data, (actions, passes)
        _relay_pass(root)
        _relay_pass(root)  # a second pass over a finished file is a no-op
        assert (out / "p.dat").read_bytes() == data, (actions, passes)
        assert (out / "p.dat.sha256").read_text() == f"{h}  p.dat\n"
        db = sqlite3.connect(root / "journal.sqlite3")
        assert db.execute("SELECT COUNT(*) FROM history").fetchone()[0] == 1
        assert db.execute("SELECT state FROM files").fetchall() == [("done",)]
        db.close()
