"""Start the kernel's writeback of a file range early (Linux ``sync_file_range``).

A large copy leaves the whole file dirty in the page cache; the final fsync then writes
it all while we wait, and the kernel may throttle the copy once too many pages are dirty.
Asking for writeback of each completed window while the copy goes on overlaps the disk
writes with the copy, so the final fsync only waits for the tail. This only *starts*
writeback (no durability promise): the fsync before the rename is still what makes the
file durable. Not in the os module, so reached through libc; a no-op where missing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

__all__ = ["WINDOW", "Writeback"]

WINDOW = 64 * 1024 * 1024  # the fastest of the windows measured (32, 64, 256 MiB)
_SYNC_FILE_RANGE_WRITE = 2


def _libc_call() -> Callable[[int, int, int, int], int] | None:
    try:
        # The process's own symbols (libc among them): ctypes.util.find_library would
        # run ldconfig in a subprocess at every start-up.
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_call()


class Writeback:
    """Feed it the running count of bytes written to ``fd``; every ``window`` bytes it
    asks the kernel to start writing the finished window back. Errors are ignored: the
    fsync that follows reports any real I/O error."""

    def __init__(self, fd: int, window: int = WINDOW) -> None:
        self.fd = fd
        self.window = window
        self.started = 0  # bytes whose writeback has been requested

    def __call__(self, written: int) -> None:
        if _sync_file_range is None or written - self.started < self.window:
            return
        _sync_file_range(self.fd, self.started, written - self.started,
                         _SYNC_FILE_RANGE_WRITE)
        self.started = written

