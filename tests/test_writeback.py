"""Writeback: large local copies ask the kernel to write finished windows early."""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import os
from pathlib import Path

import pytest

import relay.destinations.local as local
import relay.destinations.local_copy as local_copy
import relay.writeback as writeback
from relay.destinations.local import LocalRule
from tests.helpers import write_to

MiB = 1024 * 1024


def test_windows_are_requested_once_each_and_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int, int]] = []

    def record(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((fd, offset, nbytes, flags))
        return 0

    monkeypatch.setattr(writeback, "_sync_file_range", record)
    wb = writeback.Writeback(7, window=64 * MiB)
    for written in (10, 64 * MiB, 100 * MiB, 130 * MiB, 131 * MiB):
        wb(written)
    assert calls == [(7, 0, 64 * MiB, 2), (7, 64 * MiB, 66 * MiB, 2)]


def test_the_libc_call_works_on_this_machine(tmp_path: Path) -> None:
    """The ctypes binding is real here (Linux, glibc): it returns 0 on a written range."""
    assert writeback._sync_file_range is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 8192)
        assert writeback._sync_file_range(fd, 0, 8192, 2) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("kernel_copy", [True, False])
@pytest.mark.parametrize("fsync", [True, False])
def test_large_local_copies_start_writeback_of_hashed_windows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool,
        fsync: bool) -> None:
    """Both large-file paths request each 1 MiB window (test size) of the temporary,
    only ranges already written, only when the route fsyncs; the bytes stay exact."""
    calls: list[tuple[int, int]] = []
    real = writeback._sync_file_range
    assert real is not None

    def record(fd: int, offset: int, nbytes: int, flags: int) -> int:
        assert os.fstat(fd).st_size >= offset + nbytes  # never beyond what was written
        calls.append((offset, nbytes))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(writeback, "_sync_file_range", record)
    monkeypatch.setattr(local_copy, "Writeback", functools.partial(writeback.Writeback,
                                                                   window=MiB))
    if not kernel_copy:
        def refuse(*_a: object, **_k: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    data = os.urandom(20 * MiB + 5)
    (tmp_path / "src").write_bytes(data)
    (tmp_path / "out").mkdir()
    dest = local.LocalDestination(LocalRule(name="o", url=f"file://{tmp_path / 'out'}",
                                                  fsync=fsync))

    async def go() -> str:
        staged = await write_to(dest, tmp_path / "src", "big.bin")
        assert await dest.commit(staged)
        return staged.sha256

    assert asyncio.run(go()) == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out" / "big.bin").read_bytes() == data
    if not fsync:
        assert calls == []
        return
    assert calls, "no writeback requested"
    offsets = [o for o, _ in calls]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert all(n >= MiB for _, n in calls)
    assert all(a + n == b for (a, n), b in zip(calls, offsets[1:], strict=False))
