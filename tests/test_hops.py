"""relay.hops: where a destination's blocking work runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.destinations.local import LocalDestination, LocalRule
from relay.destinations.memory import MemoryDestination, MemoryRule, store
from relay.hops import SMALL, Hops
from tests.helpers import Recorder


def test_small_files_share_hops_and_a_large_one_gets_its_own(tmp_path: Path) -> None:
    """Eight small files written and committed together: one grouped hop per step, not one
    per file; a large one is written by the backend's own call (it would hold its
    hop-mates for seconds) and reports its progress as it goes."""
    (tmp_path / "out").mkdir()
    srcs = []
    for i in range(8):
        p = tmp_path / f"s{i}"
        p.write_bytes(b"%d" % i * 100)
        srcs.append(p)
    big = tmp_path / "big"
    big.write_bytes(b"b" * (SMALL + 1))
    dest = LocalDestination(LocalRule(name="o", url=f"file://{tmp_path / 'out'}"))
    hops = Hops()

    async def go() -> Recorder:
        staged = await asyncio.gather(*(
            hops.write(dest, p, p.stat().st_size, f"d/{p.name}", f"d/.{p.name}.tmp", (),
                       Recorder()) for p in srcs))
        group = hops._groups["o"]
        assert group is not None and group.hops == 1
        ok = await asyncio.gather(*(hops.commit(dest, s, [(s.target + ".ok", b"")])
                                    for s in staged))
        assert ok == [True] * 8
        assert group.hops == 2
        rec = Recorder()
        st = await hops.write(dest, big, big.stat().st_size, "d/big", "d/.big.tmp", (), rec)
        assert group.hops == 2 and st.size == SMALL + 1 and rec.reports[-1] == SMALL + 1
        return rec

    asyncio.run(go())
    for p in srcs:
        assert (tmp_path / "out/d" / p.name).read_bytes() == p.read_bytes()
        assert (tmp_path / "out/d" / f"{p.name}.ok").exists()


def test_a_backend_that_is_not_blocking_is_awaited_directly(tmp_path: Path) -> None:
    """No hop for an async backend: its own write and commit run on the loop, and the
    digests are the pipeline's, of every byte written."""
    (tmp_path / "p").write_bytes(b"hello")
    dest = MemoryDestination(MemoryRule(name="m", url="mem://hops"))
    hops = Hops()

    async def go() -> None:
        st = await hops.write(dest, tmp_path / "p", 5, "p", ".p.tmp", ("md5",), Recorder())
        assert st.digests["md5"] == "5d41402abc4b2a76b9719d911017c592"
        assert await hops.commit(dest, st, [("p.sha256", b"x")])

    try:
        asyncio.run(go())
        assert hops._groups == {"m": None}
        assert store("hops").visible() == {"p": b"hello", "p.sha256": b"x"}
    finally:
        store("hops").files.clear()
