"""relay.file_workers: small-file work in helper processes that die with relay."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import signal
from pathlib import Path

from relay.destinations.local import LocalDestination, LocalRule
from relay.errors import RetryableError, SourceVanished
from relay.file_workers import FileWorkers, _run_batch
from relay.hops import commit, write_small
from tests.helpers import RelayProc, drop, one_route_zone, wait_for


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _deliver_all(src: Path, out: Path, files: dict[str, bytes]) -> None:
    """Drop ``files`` (with sidecars) and wait until each has arrived, intact."""
    for name, data in files.items():
        drop(src, name, data)
    wait_for(lambda: all((out / f"{n}.sha256").exists() for n in files), 30,
             "every file delivered")
    for name, data in files.items():
        assert (out / name).read_bytes() == data


def test_helpers_write_the_small_files_and_die_with_relay_on_sigkill(tmp_path: Path) -> None:
    """A daemon with a local destination forks RELAY_FILE_WORKERS helpers; they, not the
    relay process, write the small files' bytes; killed with SIGKILL, relay takes them
    along (PR_SET_PDEATHSIG), so nothing it asked for lands after it is gone."""
    src, out, rules = one_route_zone(tmp_path)
    relay = RelayProc(tmp_path, rules, RELAY_FILE_WORKERS="3").start()
    try:
        relay.wait_started()
        assert relay.proc is not None
        helpers = _children(relay.proc.pid)
        assert len(helpers) == 3, helpers
        _deliver_all(src, out, {f"f{i}.bin": os.urandom(4096) for i in range(60)})
        # payloads and their sidecars went through the helpers' write()s
        assert sum(_written(p) for p in helpers) >= 60 * 4096
        relay.kill()
        wait_for(lambda: not any(_alive(p) for p in helpers), 10, "helpers gone with relay")
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.stop()


def test_no_helpers_with_file_workers_zero(tmp_path: Path) -> None:
    """RELAY_FILE_WORKERS=0: worker threads, as before; the files arrive the same."""
    src, out, rules = one_route_zone(tmp_path)
    relay = RelayProc(tmp_path, rules, RELAY_FILE_WORKERS="0").start()
    try:
        relay.wait_started()
        assert relay.proc is not None
        drop(src, "a.csv", b"a" * 5000)
        wait_for(lambda: (out / "a.csv.sha256").exists(), 20, "delivery")
        assert (out / "a.csv").read_bytes() == b"a" * 5000
        assert _children(relay.proc.pid) == []
    finally:
        relay.stop()


class _Unpicklable(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def _double(x: int) -> int:
    return 2 * x


def _vanish() -> None:
    raise SourceVanished("gone")


def _odd() -> None:
    raise _Unpicklable("a", "b")


def test_a_batch_gives_each_call_its_own_result_or_error() -> None:
    """In order, per call; an exception that could not cross back to relay arrives as a
    RetryableError that keeps its text."""
    out = _run_batch([(_double, (2,)), (_vanish, ()), (_odd, ()), (_double, (5,))])
    assert out[0] == (True, 4) and out[3] == (True, 10)
    assert not out[1][0] and isinstance(out[1][1], SourceVanished)
    assert not out[2][0] and isinstance(out[2][1], RetryableError)
    assert "_Unpicklable: a/b" in str(out[2][1])


def test_a_local_destination_writes_and_commits_through_a_helper(tmp_path: Path) -> None:
    """The scheduler's hop functions on a destination sent to a forked helper (as its
    rule): the bytes and digests are the same as on a thread, errors arrive as the relay
    errors they are."""
    out = tmp_path / "out"
    out.mkdir()
    data = os.urandom(10_000)
    (tmp_path / "s.bin").write_bytes(data)
    rule = LocalRule(name="o", url=f"file://{out}")
    dest = LocalDestination(rule)
    assert isinstance(pickle.loads(pickle.dumps(dest)), LocalDestination)
    workers = FileWorkers()
    workers.start(1)
    assert workers.active
    try:
        async def go() -> None:
            staged = await workers.run([
                (write_small, (dest, tmp_path / "s.bin", "s.bin", ".s.bin.tmp", ("md5",))),
                (write_small, (dest, tmp_path / "missing", "m.bin", ".m.bin.tmp", ()))])
            (ok, st), (ok2, err) = staged
            assert ok and st.sha256 == hashlib.sha256(data).hexdigest()
            assert st.digests["md5"] == hashlib.md5(data).hexdigest()
            assert not ok2 and isinstance(err, SourceVanished)
            [(ok3, published)] = await workers.run([
                (commit, (dest, st, [("s.bin.sha256", b"x\n")]))])
            assert ok3 and published is True

        asyncio.run(go())
    finally:
        workers.stop()
    assert (out / "s.bin").read_bytes() == data
    assert (out / "s.bin.sha256").read_bytes() == b"x\n"
    assert sorted(p.name for p in out.iterdir()) == ["s.bin", "s.bin.sha256"]

    workers.start(0)  # a pool that was stopped stays off with 0
    assert not workers.active


def test_a_helper_killed_under_relay_falls_back_to_threads(tmp_path: Path) -> None:
    """A helper dies (the OOM killer, a stray kill -9): the hop it would have run fails as
    retryable, relay logs file_workers_lost and goes on with threads; every file arrives
    once, intact."""
    src, out, rules = one_route_zone(tmp_path)
    relay = RelayProc(tmp_path, rules, RELAY_FILE_WORKERS="2", RELAY_RETRY_BASE="0.1",
                      RELAY_LOG_LEVEL="info").start()
    try:
        relay.wait_started()
        assert relay.proc is not None
        helpers = _children(relay.proc.pid)
        assert len(helpers) == 2
        drop(src, "before.bin", b"b" * 4096)
        wait_for(lambda: (out / "before.bin.sha256").exists(), 20, "first delivery")
        os.kill(helpers[0], signal.SIGKILL)
        files = {f"after{i}.bin": os.urandom(3000) for i in range(20)}
        _deliver_all(src, out, files)
        assert relay.logs().count('"file_workers_lost"') == 1
        # the other one too: a broken pool is taken down whole (by SIGTERM)
        wait_for(lambda: not any(_alive(p) for p in helpers), 10, "both helpers gone")
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["before.bin", "before.bin.sha256", *files, *(f"{n}.sha256" for n in files)])
    finally:
        assert relay.stop() == 0


def _dispositions() -> list[bool]:
    return [signal.getsignal(s) == signal.SIG_IGN
            for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)]


def test_helpers_ignore_the_signals_meant_for_relay() -> None:
    """A terminal's Ctrl-C or hang-up reaches the helpers too: they ignore them (relay
    decides when they stop); SIGTERM still ends them (the pool's own clean-up)."""
    workers = FileWorkers()
    workers.start(1)
    try:
        [(ok, ignored), (ok2, pid)] = asyncio.run(
            workers.run([(_dispositions, ()), (os.getpid, ())]))
    finally:
        workers.stop()
    assert ok and ignored == [True, True, False]
    assert ok2 and pid != os.getpid()


def test_a_hop_submitted_after_the_pool_is_gone_runs_on_a_thread() -> None:
    """A hop handed over just as the pool was lost (or stopped) still runs, in relay's own
    process, instead of failing."""
    workers = FileWorkers()
    workers.start(1)
    workers.stop()
    assert not workers.active
    [(ok, pid)] = asyncio.run(workers.run([(os.getpid, ())]))
    assert ok and pid == os.getpid()
