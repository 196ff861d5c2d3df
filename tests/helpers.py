"""Shared test helpers: rules files, a real `relay run` subprocess, polling with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import yaml

from relay.destinations.base import Destination, Resume, Staged
from relay.payload import Payload
from tests.tcp_proxy import TcpProxy

RELAY = [sys.executable, "-m", "relay.cli"]


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``pred`` until truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


async def until(pred: Callable[[], Any], timeout: float = 10.0) -> Any:
    """wait_for() inside an event loop: poll ``pred`` (without blocking the loop) until
    truthy or ``timeout`` seconds pass; returns the last value (the caller asserts it)."""
    deadline = time.monotonic() + timeout
    while not (value := pred()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return value


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop(root: Path, rel: str, data: bytes, signal_kind: str = "sha256") -> Path:
    """Write a payload and then its signal, the way a well-behaved producer does."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    if signal_kind == "sha256":
        Path(f"{p}.sha256").write_text(f"{sha256(data)}  {p.name}\n")
    elif signal_kind == "done":
        Path(f"{p}.done").write_text("")
    return p


def write_rules(dirpath: Path, *, source: Path, dests: dict[str, str],
                route: dict[str, Any] | None = None, ready: dict[str, Any] | None = None,
                extra_dest: dict[str, dict[str, Any]] | None = None) -> Path:
    """A one-source, one-route rules file in ``dirpath``; returns the rules directory."""
    dirpath.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "sources": [{"name": "in", "path": str(source), **({"ready": ready} if ready else {})}],
        "destinations": [{"name": n, "url": u, **(extra_dest or {}).get(n, {})}
                         for n, u in dests.items()],
        "routes": [{"name": "r", "source": "in", "to": list(dests), **(route or {})}],
    }
    (dirpath / "rules.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return dirpath


def relay_env(tmp: Path, rules: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RELAY_RULES": str(rules), "RELAY_JOURNAL": str(tmp / "journal.sqlite3"),
                "RELAY_METRICS_ADDR": "", "RELAY_LOG_FORMAT": "json",
                "RELAY_RESCAN_INTERVAL": "2", **extra})
    return env


def run_once(tmp: Path, rules: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAY, "run", "--once"], env=relay_env(tmp, rules, **extra),
                          capture_output=True, text=True, timeout=120)


class RelayProc:
    """A real `relay run` daemon in a subprocess; logs go to a file."""

    def __init__(self, tmp: Path, rules: Path, name: str = "relay", **extra: str) -> None:
        self.log_path = tmp / f"{name}.log"
        self.env = relay_env(tmp, rules, **extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProc:
        self._starts = self._count(b"relay_started")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*RELAY, "run"], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    def wait_started(self, timeout: float = 20) -> None:
        wait_for(lambda: self._count(b"relay_started") > self._starts or self._dead(),
                 timeout, "relay_started")
        assert not self._dead(), self.log_path.read_text()[-3000:]

    def _count(self, needle: bytes) -> int:
        return self.log_path.read_bytes().count(needle) if self.log_path.exists() else 0

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every log event called ``name`` so far, parsed (one JSON object a line)."""
        out = []
        for line in self.logs().splitlines():
            if f'"{name}"' in line:
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out


def one_route_zone(tmp_path: Path, **route: Any) -> tuple[Path, Path, Path]:
    """``in`` → one local destination ``out`` with one route (options in ``route``);
    returns (landing zone, destination, rules directory)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"o": f"file://{out}"},
                        route=dict(route) or None)
    return src, out, rules


def larger_than(path: Path, size: int) -> Callable[[], bool]:
    """A predicate for :func:`wait_for`: ``path`` exists and holds more than ``size`` bytes
    (e.g. a temporary that a copy is filling)."""
    def check() -> bool:
        try:
            return path.stat().st_size > size
        except FileNotFoundError:
            return False

    return check


def start_error(dest: Any) -> Exception:
    """What a destination's start() raised (closing it after); fails if it succeeded."""
    async def go() -> Exception:
        try:
            await dest.start()
        except Exception as exc:
            return exc
        finally:
            await dest.close()
        raise AssertionError("start() succeeded")

    return asyncio.run(go())


class Recorder:
    """A :class:`relay.destinations.base.Transfer` for driving a backend directly: it
    remembers the progress reports and checkpoints it was given."""

    def __init__(self, acked: int = 0, state: str | None = None,
                 on_progress: Callable[[int], Any] | None = None) -> None:
        self.resume = Resume(acked, state)
        self.reports: list[int] = []
        self.checkpoints: list[str] = []
        self._on_progress = on_progress

    def progress(self, acked: int) -> None:
        self.reports.append(acked)
        if self._on_progress is not None:
            self._on_progress(acked)

    async def checkpoint(self, state: str, acked: int) -> None:
        self.checkpoints.append(state)
        self.resume = Resume(acked, state)


async def write_to(dest: Destination, src: Path, target: str, algos: tuple[str, ...] = (),
                   acked: int = 0, progress: Callable[[int], Any] | None = None) -> Staged:
    """What the pipeline does to stage ``src`` at ``dest``: open it, have the backend
    write it to its temporary for ``target`` (resuming at ``acked`` if it can), and read
    the digests."""
    with Payload(src, algos) as payload:
        staged = await dest.write(payload, target, dest.temporary(target),
                                  Recorder(acked, on_progress=progress))
        staged.digests = payload.digests()
    return staged


def journal_acked(journal: Path) -> int:
    """The most bytes a delivery in ``staging`` has journalled as acknowledged (0: none)."""
    if not journal.exists():
        return 0
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT MAX(acked) FROM deliveries WHERE state = 'staging'").fetchone()
    return int(row[0] or 0)


def journal_delivery(journal: Path) -> tuple[str, int, int]:
    """(state, attempts, fallbacks) of the journal's one delivery."""
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT state, attempts, fallbacks FROM deliveries").fetchone()
    return str(row[0]), int(row[1]), int(row[2])


def run_cut_transfer(tmp_path: Path, proxy: TcpProxy, url: str, identity: Path,
                     kh: Path, out: Path, size: int,
                     before_cut: Callable[[], None] = lambda: None,
                     data: bytes | None = None, **dest: Any) -> tuple[bytes, RelayProc]:
    """Drop one file (``data``, or ``size`` random bytes) for `relay run` to the SFTP
    destination ``url``
    (more destination options in ``dest``), cut the connection right after the journal
    records progress, and wait until the file and its sidecar arrived in ``out``."""
    src = tmp_path / "landing"
    src.mkdir()
    rules = write_rules(tmp_path / "rules", source=src, dests={"p": url}, extra_dest={
        "p": {"identity": str(identity), "known_hosts": str(kh), "login_timeout": "5s",
              **dest}})
    relay = RelayProc(tmp_path, rules, RELAY_RETRY_BASE="0.1", RELAY_RETRY_CAP="0.5").start()
    try:
        relay.wait_started()
        data = os.urandom(size) if data is None else data
        drop(src, "big.bin", data)
        journal = tmp_path / "journal.sqlite3"
        wait_for(lambda: journal_acked(journal) > 0, 30, "acknowledged progress in the journal")
        before_cut()
        proxy.cut()
        wait_for(lambda: (out / "big.bin.sha256").exists(), 30, "delivery after the cut")
    except BaseException:
        print(relay.logs()[-4000:])
        raise
    finally:
        relay.stop()
    return data, relay


def bench_module(name: str) -> ModuleType:
    """A module of bench/, loaded from its file: bench/ is a folder of scripts, not a
    package (they import each other by bare name, run from that folder)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        assert spec is not None and spec.loader is not None
        sys.modules[key] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]


def report_renders(bench: str, data: dict[str, Any]) -> None:
    """bench/report.py renders every scenario of ``bench`` from ``data``, a result that
    bench printed: the documents' generator follows what the benches write."""
    report = bench_module("report")
    r = report.Result(f"{bench}-2026-01-01.json", bench, data)
    for s in report.SCENARIOS:
        if s.bench == bench:
            assert "- Reproduce: `" in s.render(r)
            if s.summary:
                assert len(s.summary(r)) == 5


def leftovers(root: Path) -> list[str]:
    """Hidden files and staging files left below ``root`` (none after a clean run)."""
    return [p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and (p.name.startswith(".") or ".relay-staging" in p.parts)]


def check_delivered(root: Path, files: dict[str, bytes]) -> None:
    """Every produced file at ``root`` with its content, and each single file's sidecar
    in the form relay writes."""
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, (root, rel)
        if not rel.startswith("batch"):
            assert (root / f"{rel}.sha256").read_text() == \
                f"{sha256(data)}  {PurePosixPath(rel).name}\n"


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
    key: str | bytes = rel
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8 can only be stored as bytes
        key = rel.encode("utf-8", "surrogateescape")
    db = sqlite3.connect(tmp / "journal.sqlite3", timeout=10)
    try:
        row = db.execute("SELECT state, reason FROM files WHERE rel=?", (key,)).fetchone()
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
