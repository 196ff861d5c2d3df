"""The destination contract. One Protocol; one module per backend; optional abilities are
reported by the backend, not guessed by the pipeline.

Delivery of one payload is driven by the pipeline in this order, each step journalled
before the side effect it allows:

1. ``stage``   — stream the source once to the temporary name, hashing as it goes, flush
                 it to stable storage and check the size. Idempotent: staging again
                 restarts (or resumes, if the backend can prove the prefix) the temp.
2. ``commit``  — atomically rename the temporary onto the final name.
3. ``put_signal`` — write a small downstream signal file (itself via temp + rename).

``discard`` removes a temporary and must not fail if it is already gone. Backends raise
only :class:`relay.errors.RetryableError` or :class:`relay.errors.PermanentError`; they
translate their library's exceptions in one place.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from relay.rules import DestinationRule

__all__ = ["Destination", "Progress", "Staged", "open_destination", "temp_name"]

NAME_MAX = 255  # bytes in one path component, on Linux filesystems and OpenSSH servers
Progress = Callable[[int], None]  # called with the number of bytes acknowledged so far


@dataclass
class Staged:
    """A fully written, flushed temporary, ready to be committed."""

    target: str            # final relative path under the destination root
    tmp: str               # relative path of the temporary
    size: int
    digests: dict[str, str]
    resumed_from: int = 0  # bytes kept from an earlier attempt
    fallbacks: int = 0     # stale partials discarded because resume could not be proven
    extra: dict[str, object] = field(default_factory=dict)


def temp_name(rule: DestinationRule, target: str, suffix: str = ".tmp") -> str:
    """Deterministic temporary for ``target``: ``dir/.name.tmp``, or a flat name inside the
    staging folder. Deterministic so a restart finds (and resumes or removes) it."""
    if rule.temp == "staging":
        head, name = str(rule.staging_dir), target.replace("%", "%25").replace("/", "%2F")
        tmp = f"{name}{suffix}"
    else:
        head, _, name = target.rpartition("/")
        tmp = f".{name}{suffix}"
    if len(os.fsencode(tmp)) > NAME_MAX:
        # '.X.tmp' of a 251..255-byte name cannot exist; a digest of the target keeps the
        # temporary deterministic (restarts still find it) and short.
        tmp = f".relay-{hashlib.sha256(os.fsencode(target)).hexdigest()[:32]}{suffix}"
    return f"{head}/{tmp}" if head else tmp


@runtime_checkable
class Destination(Protocol):
    """What every backend provides."""

    name: str
    rule: DestinationRule

    async def start(self) -> None:
        """Check the root is usable (connect, log in, probe). Raises TransferError."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def stage(self, src: Path, target: str, algos: tuple[str, ...], acked: int,
                    progress: Progress) -> Staged:
        """Stream ``src`` to the temporary of ``target`` (see module doc). ``acked`` is the
        byte count an earlier attempt had acknowledged (0 = start fresh)."""

    async def commit(self, staged: Staged) -> None:
        """Atomically rename the temporary onto the final name."""

    async def finish_commit(self, target: str, tmp: str) -> bool:
        """After a crash between journalling 'renaming' and the rename: rename ``tmp`` if
        it still exists. True if the final name now holds the file."""

    async def put_signal(self, target: str, data: bytes) -> None:
        """Write a small file at ``target`` via temporary name + atomic rename."""

    async def publish(self, target: str, tmp: str, signals: list[tuple[str, bytes]]) -> bool:
        """``finish_commit`` then ``put_signal`` for each (name, content) in order, as
        one call (local folders: one worker hop). False, with nothing written, if
        neither ``tmp`` nor ``target`` exists."""

    async def has_identical(self, target: str, data: bytes) -> bool:
        """Is ``target`` already a regular file holding exactly ``data``? (Recovery asks
        before rewriting a signal, so downstream watchers are not woken twice.)"""

    async def discard(self, tmp: str) -> None:
        """Remove a temporary (or an earlier generation's batch marker); no error if it
        does not exist."""


def open_destination(rule: DestinationRule, secrets_dir: Path | None = None) -> Destination:
    """The backend for ``rule.url``'s scheme."""
    if rule.scheme == "file":
        from relay.destinations.local import LocalDestination

        return LocalDestination(rule)
    if rule.scheme == "sftp":
        from relay.destinations.sftp.destination import SftpDestination

        return SftpDestination(rule, secrets_dir)
    raise ValueError(f"no backend for {rule.url}")
