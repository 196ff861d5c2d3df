"""``sftp://user@host:port/path`` destinations over asyncssh's SFTP client (with
pool.py, session.py, errors.py, openssh.py and keys.py, the only
modules importing it). The connection is pooled in pool.py; the SSH connection under
it is asyncssh's or, with ``transport: openssh``, OpenSSH's ``ssh`` (openssh.py).

One pooled SSH connection per destination carries up to 8 SFTP channels (never more than
``rule.concurrency``; fewer if the server refuses more sessions); up to ``rule.concurrency``
files move over it at once, each as pipelined write requests on the least busy channel.
On first connect the server is probed
(:mod:`relay.destinations.sftp.probe`) and the delivery path uses what it found:

    write:  upload to the hidden temporary, hashing as it goes → fsync@openssh.com
            → size check → optional read-back digest
    commit: posix-rename@openssh.com onto the final name (without it: plain rename, and
            if the name exists, ``overwrite: fail`` refuses while ``replace`` removes then
            renames, logging a warning; never silently), then the announcements

Resume: with ``acked`` > 0 the temporary is reopened without truncation, its size checked
against ``acked`` (and its prefix digest with ``verify: readback``) and the upload continues
at ``acked``. Anything unproven — no temporary, a short one, a server that truncates on
open or ignores offsets — deletes the partial, restarts from zero and counts a fallback.

Every wait on the network is bounded: asyncssh's connect/login timeouts and keepalives,
plus a watchdog that aborts the connection when an operation has waited on the server for
``max(login_timeout, 2 * keepalive_interval)`` seconds without any reply (more during an
fsync, which may flush a large file at a slow disk's pace). Library exceptions are translated
once, in errors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from relay.destinations.base import Abilities, Progress, Staged, Transfer
from relay.destinations.sftp.errors import unsupported
from relay.destinations.sftp.io import read_hash, upload
from relay.destinations.sftp.pool import Pool
from relay.destinations.sftp.rule import SftpRule
from relay.destinations.sftp.session import (
    EarlyFlush,
    Session,
    parse_sftp_url,
)
from relay.errors import PermanentError, RetryableError, SignalFailed, UnsafePathError
from relay.logs import get_logger
from relay.payload import Payload

__all__ = ["SftpDestination", "parse_sftp_url"]

log = get_logger()

MAX_INFLIGHT = 16      # write requests in flight per file (OpenSSH's window is 2 MiB)
MAX_WRITE = 256 * 1024  # even if a server allows more: finer acknowledgements to resume from
FSYNC_FLOOR = 20e6  # bytes/s a server's disk flushes at least: extra watchdog patience
PIECES_PER_BLOCK = 8   # source read + hashed per thread hop: 8 x the write limit (2 MiB)


class SftpDestination:
    """A folder on an SFTP server, reached over one pooled SSH connection (pool.py)."""

    def __init__(self, rule: SftpRule, secrets_dir: Path | None = None) -> None:
        self.name = rule.name
        self.rule = rule
        self.pool = Pool(rule, secrets_dir)
        self.root = self.pool.root

    @property
    def capabilities(self) -> dict[str, object]:
        """What the server offers (the probe's findings), once connected."""
        return self.pool.capabilities

    @property
    def abilities(self) -> Abilities:
        """Resume and atomic replace as the probe found them; before the first connection,
        what most servers do (the write re-checks before it resumes)."""
        caps = self.pool.capabilities
        return Abilities(resume_offset=bool(caps.get("resume", True)),
                         atomic_replace=bool(caps.get("posix_rename", True)))

    def describe(self) -> dict[str, object]:
        return dict(self.pool.capabilities)

    def temporary(self, target: str) -> str:
        return self.rule.temporary(target)

    @property
    def connections(self) -> int:
        """Successful logins so far (one per reconnect)."""
        return self.pool.connections

    def _path(self, rel: str) -> str:
        """``rel`` under the root. The pipeline only renders safe relative names; one that
        would leave the root anyway is refused here too."""
        norm = posixpath.normpath(rel)
        if rel.startswith("/") or norm == ".." or norm.startswith("../") or "\0" in rel:
            raise PermanentError(str(UnsafePathError(f"{rel!r} would leave the destination "
                                                     f"root {self.root}")))
        return posixpath.join(self.root, norm)

    async def _makedirs(self, s: Session, sftp: asyncssh.SFTPClient, d: str) -> None:
        """Create missing folders below the root (never the root itself), checking each
        folder on the way once per connection: one that is a symlink must resolve inside
        the root (the server would follow it out of it)."""
        if d in s.dirs or d == self.root or not d.startswith(self.root.rstrip("/") + "/"):
            return
        parent = posixpath.dirname(d)
        if parent not in ("", d):
            await self._makedirs(s, sftp, parent)
        try:
            attrs = await sftp.lstat(d)
        except asyncssh.SFTPNoSuchFile:
            try:
                await sftp.mkdir(d)
            except asyncssh.SFTPError:
                attrs = await sftp.lstat(d)  # made by a concurrent upload; else this raises
            else:
                s.dirs.add(d)
                return
        if attrs.type == asyncssh.FILEXFER_TYPE_SYMLINK:
            if s.real_root is None:
                s.real_root = await sftp.realpath(self.root)
            real = await sftp.realpath(d)
            if real != s.real_root and not real.startswith(s.real_root.rstrip("/") + "/"):
                raise PermanentError(str(UnsafePathError(
                    f"{d} is a symlink to {real}, outside the destination root")))
        s.dirs.add(d)

    # -- protocol ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        async with self.pool.op(f"checking destination root {self.root}") as (_, sftp):
            await sftp.stat(self.root)

    async def write(self, payload: Payload, target: str, tmp: str,
                    transfer: Transfer) -> Staged:
        async with self.pool.op(f"uploading {target}") as (s, sftp):
            await self._makedirs(s, sftp, posixpath.dirname(self._path(tmp)))
            await self._makedirs(s, sftp, posixpath.dirname(self._path(target)))
            return await self._write(s, sftp, payload, tmp, target, transfer.resume.acked,
                                     transfer.progress)

    async def _write(self, s: Session, sftp: asyncssh.SFTPClient, payload: Payload,
                     tmp: str, target: str, acked: int, progress: Progress) -> Staged:
        path = self._path(tmp)
        fallbacks = 0
        start, why = ((await self._resume_point(s, sftp, payload, path, acked)) if acked
                      else (0, None))
        while True:
            if why is not None:
                fallbacks += 1
                log.warning("transfer_resume_fallback", destination=self.name, tmp=tmp,
                            acked=acked, reason=why)
            elif start:
                log.info("transfer_resumed", destination=self.name, tmp=tmp,
                         resumed_from=start)
            payload.restart()
            if start:
                with s.idle():
                    await asyncio.to_thread(payload.hash_prefix, start)
            total, size, fsynced, early = await self._upload(s, sftp, payload, path, start,
                                                             progress)
            if total >= 0 and size == total:
                break
            if not start:
                raise RetryableError(f"size check failed: sent {total} bytes, {tmp} has {size}")
            # The server did not keep the prefix, or did not write where we asked: start
            # over from zero (counted); never keep a doubtful file.
            why = ("server truncated the temporary on open" if total < 0 else
                   f"size {size} after resuming, expected {total}: write offsets ignored")
            start = 0
        if self.rule.verify == "readback":
            sent = payload.hash.copy().hexdigests()["sha256"]
            async with sftp.open(path, "rb") as f:
                remote = await read_hash(f, total, on_block=s.touch)
            if remote["sha256"] != sent:
                await sftp.remove(path)
                raise RetryableError(f"read-back digest of {tmp} is {remote['sha256']}, "
                                     f"sent {sent}: corrupted in transit")
        progress(total)
        return Staged(target=target, tmp=tmp, size=total, resumed_from=start,
                      fallbacks=fallbacks,
                      extra={"fsynced": fsynced, "verified": self.rule.verify,
                             "early_flushes": early})

    async def _resume_point(self, s: Session, sftp: asyncssh.SFTPClient, payload: Payload,
                            path: str, acked: int) -> tuple[int, str | None]:
        """(offset to continue from, None) or (0, why resuming is not safe). A partial
        that cannot be trusted is removed here."""
        src_size = os.fstat(payload.fd).st_size
        why: str | None = None
        try:
            size = (await sftp.stat(path)).size or 0
        except asyncssh.SFTPNoSuchFile:
            log.info("transfer_restarted", destination=self.name, path=path, acked=acked,
                     reason="temporary is gone")
            return 0, None
        if not self.capabilities.get("resume", False):
            why = "server truncates on open or ignores write offsets (probe)"
        elif size < acked:
            why = f"temporary holds {size} bytes, {acked} were acknowledged"
        elif acked > src_size:
            why = f"source now has {src_size} bytes, fewer than the {acked} acknowledged"
        elif self.rule.verify == "readback":
            async with sftp.open(path, "rb") as f:
                remote = await read_hash(f, acked, on_block=s.touch)
            with s.idle():
                await asyncio.to_thread(payload.hash_prefix, acked)
            local = payload.hash.hexdigests()["sha256"]
            payload.restart()  # _write hashes the prefix it keeps again, from zero
            if remote["sha256"] != local:
                why = "prefix digest differs from the source"
        if why is not None:
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await sftp.remove(path)
            return 0, why
        return acked, None

    async def _upload(self, s: Session, sftp: asyncssh.SFTPClient, payload: Payload,
                      path: str, start: int, progress: Progress
                      ) -> tuple[int, int, bool, int]:
        """Stream payload[start:] into ``path`` (truncating unless resuming), flush it, and
        return (end offset, remote size, fsynced, early flushes); end is -1 if a resumed
        partial was truncated on open."""
        fsynced = bool(self.rule.fsync and self.capabilities.get("fsync"))
        early = EarlyFlush(s, sftp, path) if (
            fsynced and os.fstat(payload.fd).st_size - start >= 2 * EarlyFlush.window) else None

        def on_ack(n: int) -> None:
            s.touch()
            progress(n)
            if early is not None:
                early.acked(n)

        async with (await (sftp.open(path, "r+b", block_size=0) if start else
                           self._create(sftp, path, block_size=0))) as f:
            if start and ((await f.stat()).size or 0) < start:
                return -1, 0, False, 0
            write_len = min(sftp.limits.max_write_len, MAX_WRITE)
            try:
                total = await upload(f, payload, start, write_len=write_len,
                                     pieces_per_block=PIECES_PER_BLOCK,
                                     max_inflight=MAX_INFLIGHT, on_ack=on_ack,
                                     heartbeat=s.touch)
            finally:
                if early is not None:
                    with s.patience(EarlyFlush.window / FSYNC_FLOOR):
                        await early.close()
            if fsynced:
                # The server writes back everything dirty: allow for a slow disk.
                with s.patience((total - start) / FSYNC_FLOOR):
                    await f.fsync()
            size = (await f.stat()).size or 0
        return total, size, fsynced, len(early.flushed) if early else 0

    @staticmethod
    async def _create(sftp: asyncssh.SFTPClient, path: str,
                      block_size: int = -1) -> asyncssh.SFTPClientFile:
        """Open the temporary ``path`` for writing from empty. A server that may not
        overwrite files (ProFTPD's default ``AllowOverwrite off``) refuses to truncate a
        temporary an earlier attempt left behind — every retry would fail the same way.
        The name is relay's own, and its content is about to be thrown away anyway: it is
        removed and the open tried once more. Other refusals raise as they are."""
        try:
            return await sftp.open(path, "wb", block_size=block_size)
        except asyncssh.SFTPError as exc:
            if not unsupported(exc):
                raise
            try:
                await sftp.remove(path)
            except asyncssh.SFTPError:
                raise exc from None  # nothing of ours there: the open's refusal stands
        return await sftp.open(path, "wb", block_size=block_size)

    async def _rename(self, sftp: asyncssh.SFTPClient, tmp: str, target: str) -> None:
        src, dst = self._path(tmp), self._path(target)
        if self.capabilities.get("posix_rename"):
            await sftp.posix_rename(src, dst)
            return
        try:
            await sftp.rename(src, dst)
            return
        except asyncssh.SFTPError:
            # Replace by remove + rename only when that is what failed: our temporary is
            # there and so is an old file (removing it for a missing temporary would lose
            # it). A server may report "exists" before it looks for the source.
            if not await sftp.exists(src):
                raise asyncssh.SFTPNoSuchFile(f"{tmp} does not exist") from None
            if not await sftp.exists(dst):
                raise
        if self.rule.overwrite == "fail":
            raise PermanentError(f"{target} exists and the server cannot replace it "
                                 "atomically (no posix-rename); overwrite: fail")
        log.warning("sftp_replace_nonatomic", destination=self.name, target=target,
                    reason="server lacks posix-rename: removing the old file, then renaming")
        await sftp.remove(dst)
        await sftp.rename(src, dst)

    async def _rename_or_find(self, sftp: asyncssh.SFTPClient, tmp: str, target: str
                              ) -> bool:
        """Rename at once (no exists() round trip first); if the temporary is gone
        (renamed before a crash): whether the final name holds a file."""
        try:
            await self._rename(sftp, tmp, target)
        except asyncssh.SFTPNoSuchFile:
            return bool(await sftp.exists(self._path(target)))
        return True

    async def commit(self, staged: Staged, announcements: Sequence[tuple[str, bytes]] = ()
                     ) -> bool:
        async with self.pool.op(f"renaming onto {staged.target}") as (_, sftp):
            if not await self._rename_or_find(sftp, staged.tmp, staged.target):
                return False
        try:
            for name, data in announcements:
                await self.announce(name, data)
        except RetryableError as exc:
            raise SignalFailed(str(exc)) from exc
        return True

    async def announce(self, target: str, data: bytes) -> None:
        tmp = self.rule.temporary(target)
        async with self.pool.op(f"writing signal {target}") as (s, sftp):
            await self._makedirs(s, sftp, posixpath.dirname(self._path(tmp)))
            await self._makedirs(s, sftp, posixpath.dirname(self._path(target)))
            async with await self._create(sftp, self._path(tmp)) as f:
                await f.write(data, 0)
                if self.rule.fsync and self.capabilities.get("fsync"):
                    await f.fsync()
            await self._rename(sftp, tmp, target)

    async def has_identical(self, target: str, data: bytes) -> bool:
        """Is ``target`` already a regular file holding exactly ``data``? Recovery asks
        before rewriting a signal written just before a crash: a rewrite is a new file
        (new inode, second rename) that would wake downstream watchers twice. A server
        refusal means "no" (the signal is then written); a lost connection raises."""
        path = self._path(target)
        async with self.pool.op(f"reading {target}") as (_, sftp):
            try:
                attrs = await sftp.lstat(path)
                if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR or attrs.size != len(data):
                    return False
                async with sftp.open(path, "rb") as f:
                    got: bytes | str = await f.read(len(data) + 1, 0)  # bytes in "rb"
                return got == data
            except asyncssh.SFTPError as exc:
                if unsupported(exc):
                    return False
                raise

    async def discard(self, tmp: str) -> None:
        async with self.pool.op(f"removing {tmp}") as (_, sftp):
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await sftp.remove(self._path(tmp))
