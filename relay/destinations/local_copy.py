"""The bytes of a local staging: source → temporary, hashed on the way, in one pass.

By size: small files in one read/hash/write loop with a buffer sized to the file; large
ones copied by the kernel (copy_file_range) and hashed as read back from the temporary on
another core, or, where the kernel cannot copy between the two, read once and hashed
beside the write. Either way the digest is of the bytes the rename will publish. A large
copy pushes hashed windows to disk as it goes, so the closing fsync waits for the tail
only (:mod:`relay.writeback`).
"""

from __future__ import annotations

import errno
import os

from relay.destinations.base import Progress
from relay.errors import RetryableError
from relay.hashing import CHUNK, HashPipe, MultiHash
from relay.writeback import Writeback

__all__ = ["copy_hashed", "write_all"]

_PROGRESS_EVERY = 8 * CHUNK
_PIPE_FROM = 8 * CHUNK  # below this a helper thread costs more than it saves
_STEP = 4 * CHUNK  # = HashPipe's buffer size
_SMALL_BUF = 64 * 1024


class _NoKernelCopy(Exception):
    """copy_file_range is not available between these two files."""


def copy_hashed(fd_src: int, fd_dst: int, mh: MultiHash, progress: Progress,
                fsync: bool) -> tuple[int, dict[str, str]]:
    """Copy all of ``fd_src`` into ``fd_dst`` (both at offset 0), hashing the bytes on
    the way; fsync the copy when ``fsync``. Returns (bytes, digests)."""
    size = os.fstat(fd_src).st_size
    if size >= _PIPE_FROM:
        try:
            total, digests = _copy_in_kernel(fd_src, fd_dst, mh, progress, fsync)
        except _NoKernelCopy:
            total, digests = _copy_pipelined(fd_src, fd_dst, mh, progress, fsync)
    else:
        total, digests = _copy_simple(fd_src, fd_dst, mh, progress, size)
    if fsync:
        os.fsync(fd_dst)
    if os.fstat(fd_dst).st_size != total:
        raise RetryableError(f"size check failed: wrote {total} bytes, file has "
                             f"{os.fstat(fd_dst).st_size}")
    progress(total)
    return total, digests


def _writeback(fd: int, fsync: bool) -> Writeback | None:
    """Start writing hashed windows to disk during the copy (the fsync that follows
    then waits for the tail only); pointless when the route does not fsync."""
    return Writeback(fd) if fsync else None


class _Every:
    """Pass a copy's running total to ``progress`` once per _PROGRESS_EVERY bytes."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.next = progress, _PROGRESS_EVERY

    def __call__(self, total: int) -> None:
        if total >= self.next:
            self.progress(total)
            self.next = total + _PROGRESS_EVERY


def write_all(fd: int, chunk: memoryview) -> None:
    """os.write until all of ``chunk`` is written (a write may take less)."""
    written = 0
    while written < len(chunk):
        written += os.write(fd, chunk[written:])


def _copy_in_kernel(fd_src: int, fd_dst: int, mh: MultiHash, progress: Progress,
                    fsync: bool) -> tuple[int, dict[str, str]]:
    """Large files: the kernel copies (copy_file_range, no user-space write), and we
    hash *what landed in the temporary* — read back from the page cache, one step
    behind the copy, on another core. The digest therefore describes the destination
    bytes themselves, which is what the rename publishes."""
    pipe = HashPipe(mh, after=_writeback(fd_dst, fsync))
    total, report = 0, _Every(progress)
    try:
        while True:
            try:
                n = os.copy_file_range(fd_src, fd_dst, _STEP)
            except OSError as exc:
                if total == 0 and exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                                errno.EOPNOTSUPP):
                    raise _NoKernelCopy from exc
                raise
            if not n:
                break
            buf = pipe.take()
            got = os.preadv(fd_dst, [memoryview(buf)[:n]], total)
            if got != n:
                raise RetryableError(f"read back {got} of {n} bytes at offset {total}")
            pipe.give(buf, n)
            total += n
            report(total)
    finally:
        digests = pipe.close()
    return total, digests


def _copy_pipelined(fd_src: int, fd_dst: int, mh: MultiHash, progress: Progress,
                    fsync: bool) -> tuple[int, dict[str, str]]:
    """Large files: one read, and the hash overlapped with the write on another core."""
    pipe = HashPipe(mh, after=_writeback(fd_dst, fsync))
    total, report = 0, _Every(progress)
    try:
        while True:
            buf = pipe.take()
            n = os.readv(fd_src, [buf])
            if not n:
                pipe.give(buf, 0)
                break
            write_all(fd_dst, memoryview(buf)[:n])
            pipe.give(buf, n)
            total += n
            report(total)
    finally:
        digests = pipe.close()
    return total, digests


def _copy_simple(fd_src: int, fd_dst: int, mh: MultiHash, progress: Progress,
                 size_hint: int = CHUNK) -> tuple[int, dict[str, str]]:
    # bytearray(n) zero-fills: a 1 MiB buffer per 4 KiB file shows in a small-file run's
    # CPU profile. Size the buffer to the file (+1: the second read sees
    # EOF); a file that grows meanwhile is still read to its end, in more reads.
    buf = bytearray(min(CHUNK, max(size_hint + 1, _SMALL_BUF)))
    view = memoryview(buf)
    total, report = 0, _Every(progress)
    while True:
        n = os.readv(fd_src, [buf])
        if not n:
            break
        chunk = view[:n]
        mh.update(chunk)
        write_all(fd_dst, chunk)
        total += n
        report(total)
    return total, mh.hexdigests()
