"""``file://`` destinations: a directory on a local (or mounted) filesystem.

Stream + hash into ``.X.tmp`` → fsync file → rename(2) → fsync directory. Library errors
(OSError) are translated here, once, into the relay error tree. The work is plain
blocking calls (:class:`relay.destinations.base.Blocking`): the scheduler
(:mod:`relay.hops`) runs small files' calls grouped, in helper processes or on threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator

from relay.destinations.base import (
    Abilities,
    Backend,
    CheckContext,
    FolderRule,
    Problem,
    Progress,
    Staged,
    Transfer,
)
from relay.destinations.local_copy import copy_hashed, write_all
from relay.errors import (
    PermanentError,
    RetryableError,
    SignalFailed,
    TransferError,
    UnsafePathError,
)

if TYPE_CHECKING:
    from relay.payload import Payload

__all__ = ["BACKEND", "LocalDestination", "LocalRule", "file_url_root"]


class LocalRule(FolderRule):
    """``url: file:///abs/dir`` (or ``file:relative/dir``, relative to the working folder)."""

    url: str = Field(json_schema_extra={"pattern": "^file:"})

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not urlsplit(v).path:
            raise ValueError("file:// URL needs a path")
        return v


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


_BUILT: dict[str, LocalDestination] = {}  # in a helper process: one per rule


def _rebuild(key: str) -> LocalDestination:
    """A destination sent to a helper process arrives as its rule: built once there."""
    dest = _BUILT.get(key)
    if dest is None:
        dest = _BUILT[key] = LocalDestination(LocalRule.model_validate_json(key))
    return dest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDestination:
    """A directory tree reached through the local filesystem."""

    abilities = Abilities()  # a local partial is cheap to rewrite: never resumed

    def __init__(self, rule: LocalRule) -> None:
        self.name = rule.name
        self.rule = rule
        self.root = file_url_root(rule.url).absolute()
        self._key = rule.model_dump_json()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Sent to a helper process (relay.file_workers) as its rule, rebuilt there once.
        return _rebuild, (self._key,)

    async def start(self) -> None:
        await self.ping()

    async def ping(self) -> None:
        with _translate(f"destination root {self.root}"):
            st = os.stat(self.root)
        if not stat.S_ISDIR(st.st_mode):
            raise PermanentError(f"destination root {self.root} is not a directory")

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"root": str(self.root), "writable": os.access(self.root, os.W_OK)}

    def temporary(self, target: str) -> str:
        return self.rule.temporary(target)

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
        """Create ``path`` as a new file. A leftover of that name (an earlier attempt's,
        perhaps still being written by a copy that was abandoned on its thread) is
        unlinked first, never reopened: each attempt writes an inode of its own. Its
        folder is made only when the open says it is missing (two stats fewer per file
        than asking first)."""
        flags = mode | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(3):
            try:
                return os.open(path, flags, 0o644)
            except FileNotFoundError:
                self._makedirs(path.parent)
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return os.open(path, flags, 0o644)

    # -- protocol ----------------------------------------------------------------------

    async def write(self, payload: Payload, target: str, tmp: str,
                    transfer: Transfer) -> Staged:
        # The copy runs on a thread, which cancelling this coroutine cannot stop: it is
        # told to stop at its next progress report (every few MiB) and awaited, so the
        # payload is never read after write has returned (its file descriptor number may
        # belong to another file by then).
        stop = threading.Event()

        def progress(acked: int) -> None:
            if stop.is_set():
                raise RetryableError(f"writing {tmp}: abandoned")
            transfer.progress(acked)

        copy = asyncio.ensure_future(asyncio.to_thread(self.write_blocking, payload, target,
                                                       tmp, progress))
        try:
            return await asyncio.shield(copy)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([copy])
            if not copy.cancelled():
                copy.exception()  # retrieved: the caller has gone
            raise

    def write_blocking(self, payload: Payload, target: str, tmp: str,
                       progress: Progress) -> Staged:
        tmp_path, target_path = self._paths(tmp, target)
        with _translate(f"staging {target}"):
            if target_path.parent != tmp_path.parent:
                self._makedirs(target_path.parent)  # a staging folder: the target's too
        try:
            with _translate(f"writing {tmp}"):
                fd_dst = self._create(tmp_path, os.O_RDWR)
                try:
                    size, _ = copy_hashed(payload.fd, fd_dst, payload.hash, progress,
                                          self.rule.fsync)
                finally:
                    os.close(fd_dst)
        except BaseException:
            # Best effort: when the write failed (read-only, name too long, ...) the
            # clean-up usually fails the same way, and its error must not hide the real one.
            with contextlib.suppress(TransferError):
                self._unlink(tmp_path)
            raise
        return Staged(target=target, tmp=tmp, size=size)

    async def commit(self, staged: Staged, announcements: Sequence[tuple[str, bytes]] = ()
                     ) -> bool:
        return await asyncio.to_thread(self.commit_blocking, staged, announcements)

    def commit_blocking(self, staged: Staged, announcements: Sequence[tuple[str, bytes]]
                        ) -> bool:
        if not self._rename_or_find(staged.tmp, staged.target):
            return False
        try:
            for name, data in announcements:
                # Beside the payload: its folder (and its temporaries') has just been
                # checked and exists.
                self._put_small(name, data, checked=True)
        except RetryableError as exc:
            raise SignalFailed(str(exc)) from exc
        return True

    def _rename_paths(self, src: Path, dst: Path, target: str) -> None:
        with _translate(f"renaming onto {target}"):
            os.rename(src, dst)
            if self.rule.fsync:
                _fsync_dir(dst.parent)
                if src.parent != dst.parent:
                    _fsync_dir(src.parent)

    def _rename_or_find(self, tmp: str, target: str) -> bool:
        """Rename at once (no exists() first); if the temporary is gone (renamed before a
        crash): whether the final name holds a file. Only relay writes its temporaries,
        and only the rename removes one without removing its journal row's file."""
        tmp_path, target_path = self._paths(tmp, target)
        try:
            self._rename_paths(tmp_path, target_path, target)
        except RetryableError as exc:
            if not isinstance(exc.__cause__, FileNotFoundError):
                raise
            return target_path.exists()
        return True

    async def announce(self, target: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_small, target, data)

    def _put_small(self, target: str, data: bytes, checked: bool = False) -> None:
        """Write ``target`` via its temporary. ``checked``: its folder and its temporary's
        were checked (inside the root) and made a moment ago."""
        tmp = self.rule.temporary(target)
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
        def _same() -> bool:
            try:
                fd = os.open(self._path(target), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except (OSError, PermanentError):
                return False
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return False
                return os.read(fd, len(data) + 1) == data
            except OSError:
                return False
            finally:
                os.close(fd)

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


def _conflicts(rule: LocalRule, ctx: CheckContext) -> list[Problem]:
    """A folder inside a source: relay would forward its own output."""
    root = file_url_root(rule.url).absolute().resolve()
    out: list[Problem] = []
    for s in ctx.sources:
        src = s.path.absolute().resolve()
        if root == src or src in root.parents:
            out.append(("url", f"{root} is inside source {s.name} ({src}): relay would "
                        "forward its own output"))
    return out


BACKEND = Backend(scheme="file", rule=LocalRule, open=lambda rule, _secrets: LocalDestination(rule),
                  conflicts=_conflicts, helpers=True,
                  summary="a folder on a local or mounted filesystem")
