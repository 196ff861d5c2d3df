"""Hash while copying: one pass computes sha256 (the journal's content identity) and,
when a signal declared another algorithm, that one too."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable

__all__ = ["CHUNK", "HashPipe", "MultiHash", "hash_file"]

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


def hash_file(path: str, algos: Iterable[str] = (), limit: int | None = None,
              progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Digests of ``path`` (its first ``limit`` bytes if given); ``progress(bytes so far)``
    after every chunk."""
    mh = MultiHash(algos)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = limit
    done = 0
    with open(path, "rb") as f:
        while left is None or left > 0:
            want = CHUNK if left is None else min(CHUNK, left)
            n = f.readinto(view[:want])
            if not n:
                break
            mh.update(view[:n])
            done += n
            if progress is not None:
                progress(done)
            if left is not None:
                left -= n
    return mh.hexdigests()


class HashPipe:
    """Hash on a helper thread while the caller writes the same buffers.

    The caller takes a free buffer (``take``), fills and writes it, then hands it over
    (``give``); the helper hashes it and returns it to the pool. hashlib and os.write both
    release the GIL, so on two cores hashing costs almost nothing on top of the copy. The
    order of ``give`` calls is the order of hashing.
    """

    def __init__(self, mh: MultiHash, buffers: int = 4, size: int = 4 * CHUNK,
                 after: Callable[[int], None] | None = None) -> None:
        """``after(bytes hashed so far)`` runs on the helper thread after each buffer."""
        self.mh = mh
        self._after = after
        self._done = 0
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(buffers):
            self._free.put(bytearray(size))
        self._todo: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relay-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, n = item
            try:
                if self._error is None:
                    self.mh.update(memoryview(buf)[:n])
                    self._done += n
                    if self._after is not None:
                        self._after(self._done)
            except BaseException as exc:  # surfaced by close()
                self._error = exc
            self._free.put(buf)

    def take(self) -> bytearray:
        return self._free.get()

    def give(self, buf: bytearray, n: int) -> None:
        self._todo.put((buf, n))

    def close(self) -> dict[str, str]:
        """Wait for every buffer to be hashed; the digests."""
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.mh.hexdigests()
