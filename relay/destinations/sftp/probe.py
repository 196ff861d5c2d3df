"""What an SFTP server really does, found by trying it on throwaway hidden files.

Advertised extensions are not trusted: some servers list ``posix-rename@openssh.com`` and
then refuse it, some truncate a file on every open, some append whatever offset a write
names. The delivery path (resume, commit, flush) follows these answers.

Keys of the returned dict (all booleans unless stated):

- ``fsync``            fsync@openssh.com flushes a file to stable storage
- ``posix_rename``     posix-rename@openssh.com replaces an existing name atomically
- ``rename_replaces``  a plain SFTP rename replaces an existing name (most servers: no)
- ``hardlink``         hardlink@openssh.com works
- ``statvfs``          statvfs@openssh.com works; ``free_bytes`` (int) then says how much room
- ``truncates_on_open``  reopening a file for update emptied it
- ``offset_writes``    a write lands at the offset it names (not appended)
- ``resume``           both of the above allow resuming a partial upload
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["probe"]

_DATA = b"0123456789"
_PATCHED = b"01XY456789"


async def _works(op: Awaitable[Any], unsupported: Callable[[BaseException], bool]) -> bool:
    """True if ``op`` succeeds, False if the server refuses it; other errors propagate."""
    try:
        await op
    except Exception as exc:
        if unsupported(exc):
            return False
        raise
    return True


async def _put(sftp: Any, path: str, data: bytes) -> None:
    async with sftp.open(path, "wb") as f:
        await f.write(data, 0)


async def probe(sftp: Any, root: str, unsupported: Callable[[BaseException], bool],
                tag: str = "0") -> dict[str, object]:
    """Try each ability in ``root`` (an asyncssh SFTPClient ``sftp``) and report it.

    ``unsupported(exc)`` tells a refusal by the server (an SFTP status) from a failure of
    the connection, which propagates. Leaves nothing behind when it can still reach the
    server. The scratch names depend only on ``tag`` (one per destination), not on
    chance: a probe cut short by a crash or a lost connection leaves its files behind,
    and the next probe of that destination removes them first."""
    base = f"{root.rstrip('/') or ''}/.relay-probe-{tag}"
    a, b, c, link = (f"{base}.{x}" for x in "abcl")
    caps: dict[str, object] = {}
    for p in (a, b, c, link):
        await _works(sftp.remove(p), unsupported)  # "no such file" is the usual answer
    try:
        async with sftp.open(a, "wb") as f:
            await f.write(_DATA, 0)
            caps["fsync"] = await _works(f.fsync(), unsupported)
        size_after_open: int | None = None
        try:
            async with sftp.open(a, "r+b") as f:
                size_after_open = (await f.stat()).size
                await f.write(b"XY", 2)
        except Exception as exc:
            # Some servers refuse to write anywhere but at the end of a file they are
            # writing from the start (rclone serve sftp without a VFS cache: "Illegal
            # seek"): no resume there, but every other ability is still worth knowing.
            if not unsupported(exc):
                raise
            patched = False
        else:
            patched = True
        async with sftp.open(a, "rb") as f:
            got = await f.read()
        caps["truncates_on_open"] = size_after_open is not None and (
            size_after_open != len(_DATA))
        caps["offset_writes"] = patched and (got == _PATCHED or (size_after_open == 0 and
                                                                 got == b"\0\0XY"))
        caps["resume"] = bool(caps["offset_writes"]) and not caps["truncates_on_open"]
        await _put(sftp, b, b"old")
        caps["posix_rename"] = await _works(sftp.posix_rename(a, b), unsupported)
        if caps["posix_rename"]:
            async with sftp.open(b, "rb") as f:
                caps["posix_rename"] = await f.read() == got
            await _put(sftp, a, _DATA)
        await _put(sftp, c, b"old")
        caps["rename_replaces"] = await _works(sftp.rename(a, c), unsupported)
        caps["hardlink"] = await _works(sftp.link(c, link), unsupported)
        try:
            vfs = await sftp.statvfs(root)
        except Exception as exc:
            if not unsupported(exc):
                raise
            caps["statvfs"] = False
        else:
            caps["statvfs"] = True
            caps["free_bytes"] = int(vfs.bavail) * int(vfs.frsize or vfs.bsize)
    finally:
        for p in (a, b, c, link):
            with contextlib.suppress(Exception):
                await sftp.remove(p)
    return caps
