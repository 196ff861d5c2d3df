"""``file://`` destinations: a directory on a local (or mounted) filesystem.

Stream + hash into ``.X.tmp`` → fsync file → rename(2) → fsync directory. Library errors
(OSError) are translated here, once, into the relay error tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from relay.coalesce import Coalescer
from relay.destinations.base import Progress, Staged, temp_name
from relay.destinations.local_copy import copy_hashed, write_all
from relay.errors import (
    PermanentError,
    RetryableError,
    SignalFailed,
    SourceVanished,
    TransferError,
    UnsafePathError,
)
from relay.file_workers import WORKERS
from relay.hashing import MultiHash
from relay.rules import DestinationRule

__all__ = ["LocalDestination", "file_url_root"]

# Sources up to this size are staged in coalesced hops (relay.coalesce): a few ms of work
# at most, so a batch-mate waits little; larger ones get a thread hop of their own.
_COALESCE_UP_TO = 256 * 1024


def file_url_root(url: str) -> Path:
    """``file:///abs/dir`` → /abs/dir; ``file:relative/dir`` → relative/dir (to the CWD)."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost"):
        path = parts.netloc + path  # file://./out → ./out
    return Path(path)


@contextmanager
def _translate(what: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise RetryableError(f"{what}: {exc.strerror}: {exc.filename}") from exc
    except OSError as exc:
        reason = {errno.ENOSPC: "disk full", errno.EDQUOT: "quota exceeded",
                  errno.EACCES: "permission denied", errno.EROFS: "read-only filesystem"
                  }.get(exc.errno or 0, exc.strerror or str(exc))
        raise RetryableError(f"{what}: {reason}") from exc


def _no_progress(_: int) -> None:
    return None


def _rebuild(key: str) -> LocalDestination:
    """In a helper process: the destination of this rule (its JSON)."""
    return LocalDestination(DestinationRule.model_validate_json(key))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDestination:
    """A directory tree reached through the local filesystem."""

    def __init__(self, rule: DestinationRule) -> None:
        self.name = rule.name
        self.rule = rule
        self.root = file_url_root(rule.url).absolute()
        # Small files' hops run in a helper process when relay started some
        # (relay/file_workers.py), else on threads; the key rebuilds us there.
        self._calls = Coalescer(elsewhere=self._elsewhere)
        self._key = rule.model_dump_json()

    def _elsewhere(self, batch: list[Any]
                   ) -> Coroutine[Any, Any, list[tuple[bool, Any]]] | None:
        if not WORKERS.active or any(getattr(fn, "__self__", None) is not self
                                     for fn, _, _ in batch):
            return None
        return WORKERS.run(self._key, _rebuild, [(fn.__name__, args) for fn, args, _ in batch])

    async def start(self) -> None:
        with _translate(f"destination root {self.root}"):
            st = os.stat(self.root)
        if not os.path.isdir(self.root):
            raise PermanentError(f"destination root {self.root} is not a directory ({st})")

    async def close(self) -> None:
        return None

    # -- helpers ---------------------------------------------------------------------

    def _path(self, rel: str) -> Path:
        """Join ``rel`` under the root, refusing to pass through symlinks that leave it."""
        return self._paths(rel)[0]

    def _paths(self, *rels: str) -> list[Path]:
        """:meth:`_path` for several names at once; each distinct folder is checked once
        (a temporary and its final name usually share theirs)."""
        checked: set[Path] = set()
        out = []
        for rel in rels:
            full = self.root / rel
            if full.parent not in checked:
                if not self._inside(full.parent):
                    raise PermanentError(str(UnsafePathError(
                        f"{rel} resolves outside {self.root}")))
                checked.add(full.parent)
            out.append(full)
        return out

    def _inside(self, folder: Path) -> bool:
        """Does ``folder`` (below the root) resolve to a place under the resolved root?

        realpath() of both costs an lstat per component from ``/`` down, with Python in
        between holding the GIL, for every name. The answer can only differ from "yes"
        if a component *below* the root is a symlink (or ``..``), so walk those with
        lstat and fall back to comparing realpaths only when one is: the same check,
        the same moment, a fraction of the work."""
        parts = folder.parts[len(self.root.parts):]
        if folder.parts[:len(self.root.parts)] != self.root.parts:
            return self._inside_slow(folder)
        cur = self.root
        for part in parts:
            if part in ("..", "."):
                return self._inside_slow(folder)
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                return True  # nothing below exists yet, so nothing below can be a link
            except OSError:
                return self._inside_slow(folder)
            if not stat.S_ISDIR(st.st_mode):
                return self._inside_slow(folder)  # a symlink (or a file in the way)
        return True

    def _inside_slow(self, folder: Path) -> bool:
        real_root = os.path.realpath(self.root)
        real_parent = os.path.realpath(folder)
        return os.path.commonpath([real_root, real_parent]) == real_root

    def _makedirs(self, d: Path) -> None:
        """Create folders below the root. The root itself is never created: a missing
        root usually means an unmounted volume, and writing into the mount point would
        hide files from the consumer."""
        if not self.root.is_dir():
            raise RetryableError(f"destination root {self.root} does not exist")
        missing = []
        while not d.exists():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            try:
                os.mkdir(m)
            except FileExistsError:
                continue
            if self.rule.fsync:
                _fsync_dir(m.parent)

    def _create(self, path: Path, mode: int) -> int:
        """Open ``path`` created and truncated. Its folder is made only when the open
        says it is missing (two stats fewer per file than asking first)."""
        flags = mode | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o644)
        except FileNotFoundError:
            self._makedirs(path.parent)
        return os.open(path, flags, 0o644)

    # -- protocol ----------------------------------------------------------------------

    async def stage(self, src: Path, target: str, algos: tuple[str, ...], acked: int,
                    progress: Progress) -> Staged:
        try:
            small = os.stat(src).st_size <= _COALESCE_UP_TO
        except OSError:
            small = True  # _stage says what is wrong, in the relay error tree
        if small:
            # No progress callback on the way (it may not cross to a helper process): a
            # small copy reports once, when it is done.
            staged = await self._calls.run(self._stage_small, src, target, algos, acked)
            progress(staged.size)
            return staged
        return await asyncio.to_thread(self._stage, src, target, algos, acked, progress)

    def _stage_small(self, src: Path, target: str, algos: tuple[str, ...], acked: int
                     ) -> Staged:
        return self._stage(src, target, algos, acked, _no_progress)

    def _stage(self, src: Path, target: str, algos: tuple[str, ...], acked: int,
               progress: Progress) -> Staged:
        tmp = temp_name(self.rule, target)
        tmp_path, target_path = self._paths(tmp, target)
        fallbacks = 0
        with _translate(f"staging {target}"):
            if target_path.parent != tmp_path.parent:
                self._makedirs(target_path.parent)  # a staging folder: the target's too
            if acked and tmp_path.exists():
                # A local partial is cheap to rewrite; never trust or append to it.
                fallbacks = 1
        try:
            fd_src = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceVanished(f"cannot read source {src}: {exc.strerror}") from exc
        try:
            with _translate(f"writing {tmp}"):
                fd_dst = self._create(tmp_path, os.O_RDWR)
                try:
                    size = copy_hashed(fd_src, fd_dst, MultiHash(algos), progress,
                                       self.rule.fsync)
                finally:
                    os.close(fd_dst)
        except BaseException:
            # Best effort: when the write failed (read-only, name too long, ...) the
            # clean-up usually fails the same way, and its error must not hide the real one.
            with contextlib.suppress(TransferError):
                self._unlink(tmp_path)
            raise
        finally:
            os.close(fd_src)
        size_, digests = size
        return Staged(target=target, tmp=tmp, size=size_, digests=digests, fallbacks=fallbacks)

    async def commit(self, staged: Staged) -> None:
        await asyncio.to_thread(self._rename, staged.tmp, staged.target)

    def _rename(self, tmp: str, target: str) -> None:
        src, dst = self._paths(tmp, target)
        self._rename_paths(src, dst, target)

    def _rename_paths(self, src: Path, dst: Path, target: str) -> None:
        with _translate(f"renaming onto {target}"):
            os.rename(src, dst)
            if self.rule.fsync:
                _fsync_dir(dst.parent)
                if src.parent != dst.parent:
                    _fsync_dir(src.parent)

    def _commit(self, tmp: str, target: str) -> bool:
        """Rename at once (no exists() first); if the temporary is gone (renamed before a
        crash, or removed): whether the final name holds a file."""
        tmp_path, target_path = self._paths(tmp, target)
        try:
            self._rename_paths(tmp_path, target_path, target)
        except RetryableError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            return target_path.exists()
        return True

    async def finish_commit(self, target: str, tmp: str) -> bool:
        return await asyncio.to_thread(self._commit, tmp, target)

    async def put_signal(self, target: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_small, target, data)

    async def publish(self, target: str, tmp: str, signals: list[tuple[str, bytes]]) -> bool:
        return await self._calls.run(self._publish, target, tmp, signals)

    def _publish(self, target: str, tmp: str, signals: list[tuple[str, bytes]]) -> bool:
        if not self._commit(tmp, target):
            return False
        try:
            for name, data in signals:
                # Beside the payload: its folder (and its temporaries') has just been
                # checked and exists.
                self._put_small(name, data, checked=True)
        except RetryableError as exc:
            raise SignalFailed(str(exc)) from exc
        return True

    def _put_small(self, target: str, data: bytes, checked: bool = False) -> None:
        """Write ``target`` via its temporary. ``checked``: its folder and its temporary's
        were checked (inside the root) and made a moment ago."""
        tmp = temp_name(self.rule, target)
        tmp_path, target_path = ((self.root / tmp, self.root / target) if checked
                                 else self._paths(tmp, target))
        with _translate(f"writing signal {target}"):
            if target_path.parent != tmp_path.parent and not checked:
                self._makedirs(target_path.parent)
            fd = self._create(tmp_path, os.O_WRONLY)
            try:
                write_all(fd, memoryview(data))
                if self.rule.fsync:
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_path)  # a full disk must not keep a half-written signal
                raise
            finally:
                os.close(fd)
        self._rename_paths(tmp_path, target_path, target)

    async def has_identical(self, target: str, data: bytes) -> bool:
        """Is ``target`` already a regular file holding exactly ``data``?"""
        def _same() -> bool:
            try:
                with open(self._path(target), "rb") as f:
                    return f.read(len(data) + 1) == data
            except OSError:
                return False

        return await asyncio.to_thread(_same)

    async def discard(self, tmp: str) -> None:
        await asyncio.to_thread(self._unlink, self._path(tmp))

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RetryableError(f"cannot remove temporary {path}: {exc.strerror}") from exc
