"""The A→B→C race and chained relays: nothing downstream ever sees a partial file."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from tests.helpers import RelayProc, sha256, wait_for, write_rules
from tests.observer import Observer

SIZE = 64 * 1024 * 1024
PART = 1024 * 1024


def _content(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def multipart_write(path: Path, data: bytes, threads: int = 4) -> None:
    """Write like a multipart downloader: final size first, then parts out of order from
    several threads (the file has its final size long before its final bytes)."""
    with open(path, "wb") as f:
        f.truncate(len(data))
    parts = list(range(0, len(data), PART))
    random.Random(len(data)).shuffle(parts)
    chunks = [parts[i::threads] for i in range(threads)]

    def worker(offsets: list[int]) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for off in offsets:
                os.pwrite(fd, data[off: off + PART], off)
        finally:
            os.close(fd)

    ts = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, out = tmp_path / "b-landing", tmp_path / "c"
    src.mkdir()
    out.mkdir()
    return src, out, write_rules(tmp_path / "rules", source=src, dests={"c": f"file://{out}"})


def test_multipart_writer_sidecar_last(tmp_path: Path) -> None:
    """A 64 MiB file written out of order by 4 threads (size first) then its sidecar:
    the observer at C never sees a wrong byte, and C gets the exact content."""
    src, out, rules = _setup(tmp_path)
    data = _content(1)
    obs = Observer(out, {"big.bin": sha256(data)})
    relay = RelayProc(tmp_path, rules).start()
    obs.start()
    try:
        relay.wait_started()
        multipart_write(src / "big.bin", data)
        (src / "big.bin.sha256").write_text(f"{sha256(data)}  big.bin\n")
        wait_for(lambda: (out / "big.bin.sha256").exists(), 60, "delivery to C")
    finally:
        obs.stop()
        relay.stop()
    obs.check_once()
    assert obs.violations == []
    assert obs.polls > 10
    assert sha256((out / "big.bin").read_bytes()) == sha256(data)


def test_multipart_writer_sidecar_first(tmp_path: Path) -> None:
    """The producer writes the sidecar *first*: relay keeps finding a mismatch while the
    parts land, never exposes the file, and delivers it once the bytes match."""
    src, out, rules = _setup(tmp_path)
    data = _content(2)
    obs = Observer(out, {"big.bin": sha256(data)})
    relay = RelayProc(tmp_path, rules).start()
    obs.start()
    try:
        relay.wait_started()
        (src / "big.bin.sha256").write_text(f"{sha256(data)}  big.bin\n")
        multipart_write(src / "big.bin", data)
        wait_for(lambda: (out / "big.bin.sha256").exists(), 90, "delivery to C")
    finally:
        obs.stop()
        relay.stop()
    obs.check_once()
    assert obs.violations == []
    assert sha256((out / "big.bin").read_bytes()) == sha256(data)


def test_chained_relays_far_end_never_sees_partial(tmp_path: Path) -> None:
    """Relay 1 forwards into relay 2's landing zone; the far end sees only whole files."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for p in (a, b, c):
        p.mkdir()
    r1 = write_rules(tmp_path / "r1", source=a, dests={"b": f"file://{b}"})
    r2 = write_rules(tmp_path / "r2", source=b, dests={"c": f"file://{c}"})
    files = {f"f{i}.bin": _content(10 + i, (i + 1) * 3 * 1024 * 1024 + i) for i in range(6)}
    obs = Observer(c, {n: sha256(d) for n, d in files.items()})
    (tmp_path / "j1").mkdir()
    (tmp_path / "j2").mkdir()
    one = RelayProc(tmp_path / "j1", r1, name="one").start()
    two = RelayProc(tmp_path / "j2", r2, name="two").start()
    obs.start()
    try:
        one.wait_started()
        two.wait_started()
        for n, d in files.items():
            multipart_write(a / n, d, threads=3)
            (a / f"{n}.sha256").write_text(sha256(d))
        wait_for(lambda: all((c / f"{n}.sha256").exists() for n in files), 90, "far end")
    finally:
        obs.stop()
        one.stop()
        two.stop()
    obs.check_once()
    assert obs.violations == []
    for n, d in files.items():
        assert (c / n).read_bytes() == d
