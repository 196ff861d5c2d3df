"""The source side of a delivery: the payload opened once, and the one hash its bytes pass.

The pipeline (:mod:`relay.delivery`) opens the payload and reads the digests; a backend
writes the bytes it reads from here. Every byte of the payload must reach ``hash`` exactly
once, in order: :meth:`Payload.read` does that for the backends that stream (SFTP, object
stores); a backend that lets the kernel copy (local folders) feeds ``hash`` itself with the
bytes as they landed in its temporary. A resumed transfer hashes the prefix the destination
already holds with :meth:`Payload.hash_prefix` before it sends the rest, and
:meth:`Payload.restart` when it has to start from zero after all.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from relay.errors import SourceVanished
from relay.hashing import CHUNK, MultiHash

__all__ = ["Payload"]


class Payload:
    """An open source file (``O_NOFOLLOW``: a symlink is never read) and its hash.

    Raises :class:`SourceVanished` when the file cannot be opened or read: the file went
    away or became unreadable, which is not the destination's fault."""

    def __init__(self, path: Path, algos: tuple[str, ...] = ()) -> None:
        self.path = path
        self.algos = algos
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceVanished(f"cannot read source {path}: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        self.size = st.st_size  # at open; the copy reads to the end, whatever it is then
        self.hash = MultiHash(algos)

    def read(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset``, hashed. Calls must come in offset order,
        each starting where the previous one ended (the hash is a running one)."""
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as exc:
            raise SourceVanished(f"cannot read source at offset {offset}: "
                                 f"{exc.strerror}") from exc
        self.hash.update(data)
        return data

    def restart(self) -> None:
        """Forget what was hashed: the transfer starts again from byte 0."""
        self.hash = MultiHash(self.algos)

    def hash_prefix(self, length: int) -> None:
        """Hash the first ``length`` bytes (what a resumed destination already holds)
        without sending them anywhere. Blocking: call it on a worker thread."""
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        offset = 0
        while offset < length:
            try:
                n = os.preadv(self.fd, [view[:min(CHUNK, length - offset)]], offset)
            except OSError as exc:
                raise SourceVanished(f"cannot read source at offset {offset}: "
                                     f"{exc.strerror}") from exc
            if not n:
                raise SourceVanished(f"source has {offset} bytes, fewer than the {length} "
                                     "the destination holds")
            self.hash.update(view[:n])
            offset += n

    def digests(self) -> dict[str, str]:
        """sha256 (always) and each algorithm the signal declared, of what was hashed."""
        return self.hash.hexdigests()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Payload:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
