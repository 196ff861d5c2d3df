"""Hash while copying: one pass computes sha256 (the journal's content identity) and,
when a signal declared another algorithm, that one too."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["CHUNK", "MultiHash", "hash_file"]

CHUNK = 1024 * 1024  # 1 MiB: big enough that hashlib releases the GIL and syscalls amortise


class MultiHash:
    """Feed bytes once, get several digests."""

    def __init__(self, algos: Iterable[str] = ()) -> None:
        names = ["sha256", *[a for a in algos if a != "sha256"]]
        self._h = {a: hashlib.new(a) for a in names}

    def update(self, data: bytes | bytearray | memoryview) -> None:
        for h in self._h.values():
            h.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self._h.items()}

    def copy(self) -> MultiHash:
        new = MultiHash.__new__(MultiHash)
        new._h = {a: h.copy() for a, h in self._h.items()}
        return new


def hash_file(path: str, algos: Iterable[str] = (), limit: int | None = None) -> dict[str, str]:
    """Digests of ``path`` (its first ``limit`` bytes if given)."""
    mh = MultiHash(algos)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            want = CHUNK if left is None else min(CHUNK, left)
            n = f.readinto(view[:want])
            if not n:
                break
            mh.update(view[:n])
            if left is not None:
                left -= n
    return mh.hexdigests()
