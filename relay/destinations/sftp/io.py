"""Pipelined SFTP file I/O, independent of the SSH library.

The SFTP protocol answers each request separately, so a fast upload keeps several write
requests in flight: each at most the server's write limit (OpenSSH: 261120 bytes), at the
offset it belongs to. The source is read and hashed a block ahead on a worker thread
(hashlib releases the GIL), while the event loop encrypts and sends the previous block:
one pass over the data, memory bounded by ``max_inflight`` pieces plus two blocks.

Errors of the remote file object propagate unchanged: the caller (``destination.py``) translates
them, in one place, into the relay error tree.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from relay.hashing import MultiHash
from relay.payload import Payload

__all__ = ["AckTracker", "RemoteFile", "read_hash", "upload"]

READ_BLOCK = 4 * 1024 * 1024  # read-back request size (asyncssh splits it by the read limit)


class RemoteFile(Protocol):
    """What the pipeline needs of an open remote file (asyncssh's SFTPClientFile)."""

    def write(self, data: bytes, offset: int | None = ...) -> Awaitable[int]: ...

    def read(self, size: int = ..., offset: int | None = ...) -> Awaitable[bytes]: ...


class AckTracker:
    """The contiguous prefix the server has acknowledged, while replies may complete out
    of issue order. ``done`` is what a resumed attempt may rely on."""

    def __init__(self, start: int) -> None:
        self.done = start
        self._issued: deque[list[int]] = deque()  # [end, acknowledged?] in offset order

    def issue(self, end: int) -> list[int]:
        entry = [end, 0]
        self._issued.append(entry)
        return entry

    def ack(self, entry: list[int]) -> bool:
        """Mark one piece acknowledged; True if the contiguous prefix grew."""
        entry[1] = 1
        grew = False
        while self._issued and self._issued[0][1]:
            self.done = self._issued.popleft()[0]
            grew = True
        return grew


async def upload(f: RemoteFile, payload: Payload, start: int, *, write_len: int,
                 pieces_per_block: int, max_inflight: int, on_ack: Callable[[int], None],
                 heartbeat: Callable[[], None] = lambda: None) -> int:
    """Write ``payload`` from ``start`` to its end into ``f`` at the same offsets, every
    byte read passing the payload's hash in order. ``on_ack(n)`` gets the acknowledged
    prefix as it grows; ``heartbeat()`` is called whenever a source block was read (local
    progress). Returns the end offset. Raises whatever the remote file or the read raises;
    no write is left outstanding and no thread still reads the payload when it returns or
    raises."""
    if os.fstat(payload.fd).st_size - start <= write_len:
        # A small file: read inline and send one request; a thread hop would cost more.
        offset = start
        while data := payload.read(write_len, offset):
            await f.write(data, offset)
            offset += len(data)
            on_ack(offset)
        return offset
    block = write_len * pieces_per_block

    def read_and_hash(offset: int) -> bytes:
        return payload.read(block, offset)

    slots = asyncio.Semaphore(max_inflight)
    acks = AckTracker(start)
    failures: list[BaseException] = []
    pending: set[asyncio.Task[None]] = set()

    async def put(piece: bytes, offset: int, entry: list[int]) -> None:
        try:
            await f.write(piece, offset)
        except Exception as exc:  # kept, not raised: the sender loop raises the first one
            failures.append(exc)
            return
        finally:
            slots.release()
        if acks.ack(entry):
            on_ack(acks.done)

    offset = start
    ahead: asyncio.Future[bytes] = asyncio.ensure_future(asyncio.to_thread(read_and_hash, start))
    try:
        while True:
            data = await ahead
            heartbeat()
            if not data:
                break
            # Read (and hash) the next block on a thread while this one is being sent.
            ahead = asyncio.ensure_future(asyncio.to_thread(read_and_hash, offset + len(data)))
            view = memoryview(data)
            for i in range(0, len(data), write_len):
                await slots.acquire()
                if failures:
                    raise failures[0]
                # A view, not a copy: asyncssh only concatenates it into the packet.
                piece = cast(bytes, view[i:i + write_len])
                entry = acks.issue(offset + i + len(piece))
                task = asyncio.ensure_future(put(piece, offset + i, entry))
                pending.add(task)
                task.add_done_callback(pending.discard)
            offset += len(data)
        while pending and not failures:
            await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)
        if failures:
            raise failures[0]
        return offset
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(set(pending))
        await asyncio.wait([ahead])  # never return while a thread may still read it
        if not ahead.cancelled():
            ahead.exception()  # retrieved: a read error after a write error is not news


async def read_hash(f: RemoteFile, size: int, algos: tuple[str, ...] = (),
                    on_block: Callable[[], None] = lambda: None) -> dict[str, str]:
    """Digests of the first ``size`` bytes of remote ``f`` (read in parallel requests,
    hashed on a thread; ``on_block()`` after each block). Raises EOFError if the file is
    shorter."""
    mh = MultiHash(algos)
    offset = 0
    while offset < size:
        want = min(READ_BLOCK, size - offset)
        data = await f.read(want, offset)
        if not data:
            raise EOFError(f"remote file ends at {offset}, expected {size} bytes")
        on_block()
        await asyncio.to_thread(mh.update, data)
        offset += len(data)
    return mh.hexdigests()
