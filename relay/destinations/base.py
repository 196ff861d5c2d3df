"""The destination contract: what every backend provides, what it may declare, and how it
is registered.

A backend is a module (or package) under ``relay/destinations/`` that owns its URL scheme,
its rule model, what ``relay check`` can tell about it without connecting, and its
implementation of :class:`Destination`. It registers itself with one :class:`Backend`
record in the table of :mod:`relay.destinations`; nothing outside ``relay/destinations/``
names a scheme or a backend's option.

The pipeline (:mod:`relay.delivery`) drives one payload to one destination in this order,
each step journalled before the side effect it allows:

1. ``write``    — stream the payload (opened and hashed by the pipeline:
                  :class:`relay.payload.Payload`) to a temporary the consumer cannot see,
                  flush it and check its size. Resumes a partial only when the backend can
                  prove it holds what relay sent; otherwise it starts again from zero.
2. (the pipeline compares the digests with the declared ones, and journals ``renaming``)
3. ``commit``   — make the temporary the content of the final name in one atomic step
                  (rename; for an object store, complete the upload), then write the
                  downstream announcements (sidecar, marker), each itself atomically.
4. ``announce`` — write one small file atomically (a batch's marker, after every member).

``discard`` removes a temporary (or a batch's old marker) and must not fail when it is
already gone. Backends raise only :class:`relay.errors.RetryableError` or
:class:`relay.errors.PermanentError` (and :class:`relay.errors.SourceVanished` from the
payload); each translates its library's exceptions in one place.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from pydantic import Field

from relay.rule_fields import Name, Strict

if TYPE_CHECKING:
    from relay.payload import Payload

__all__ = [
    "NAME_MAX",
    "Abilities",
    "Backend",
    "Blocking",
    "CheckContext",
    "Destination",
    "DestinationRule",
    "FolderRule",
    "Problem",
    "Progress",
    "Resume",
    "Staged",
    "Transfer",
    "hidden_temporary",
]

NAME_MAX = 255  # bytes in one path component, on Linux filesystems and OpenSSH servers
Progress = Callable[[int], None]  # called with the number of bytes acknowledged so far


# -- rules ---------------------------------------------------------------------------------

class DestinationRule(Strict):
    """What every destination has. Each backend's rule model extends it with its own
    options; the URL's scheme chooses the model (and the backend)."""

    name: Name
    url: str

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme


class FolderRule(DestinationRule):
    """Options of backends that write a temporary file beside (or near) the final name and
    rename it: local folders, SFTP."""

    temp: Literal["hidden", "staging"] = Field(
        "hidden", description="hidden: '.X.tmp' beside the final name; staging: a folder "
        "under the destination root (same filesystem), for consumers that trip on any name.")
    staging_dir: str = ".relay-staging"
    fsync: bool = True

    def temporary(self, target: str, suffix: str = ".tmp") -> str:
        """The temporary of ``target`` these options ask for (:func:`hidden_temporary`)."""
        return hidden_temporary(target, self.staging_dir if self.temp == "staging" else None,
                                suffix)


def hidden_temporary(target: str, staging_dir: str | None = None, suffix: str = ".tmp"
                     ) -> str:
    """Deterministic temporary for ``target``: ``dir/.name.tmp``, or a flat name inside
    ``staging_dir``. Deterministic so a restart finds (and resumes or removes) it."""
    if staging_dir is not None:
        head, name = staging_dir, target.replace("%", "%25").replace("/", "%2F")
        tmp = f"{name}{suffix}"
    else:
        head, _, name = target.rpartition("/")
        tmp = f".{name}{suffix}"
    if len(os.fsencode(tmp)) > NAME_MAX:
        # '.X.tmp' of a 251..255-byte name cannot exist; a digest of the target keeps the
        # temporary deterministic (restarts still find it) and short.
        tmp = f".relay-{hashlib.sha256(os.fsencode(target)).hexdigest()[:32]}{suffix}"
    return f"{head}/{tmp}" if head else tmp


# -- what a backend can do -----------------------------------------------------------------

@dataclass(frozen=True)
class Abilities:
    """What a destination can do, declared by its backend (and, where a server decides,
    refined by ``start``'s probe). The pipeline reads these; it never guesses."""

    resume_offset: bool = False      # a partial temporary is continued at an acknowledged byte
    resume_parts: bool = False       # an upload in parts is continued with its next part
    atomic_replace: bool = True      # commit replaces an existing final name in one step
    server_checksum: bool = False    # the server verifies a checksum sent with the bytes
    conditional_create: bool = False  # the server refuses to replace a name (overwrite: fail)

    @property
    def resumable(self) -> bool:
        """An interrupted write is worth keeping for the next attempt."""
        return self.resume_offset or self.resume_parts


@dataclass
class Staged:
    """A fully written, flushed temporary, ready to be committed. Rebuilt from the journal
    when a commit is resumed after a crash (then ``extra`` is empty)."""

    target: str            # final relative path under the destination root
    tmp: str               # the temporary: a hidden name, or an object store's upload
    size: int
    digests: dict[str, str] = field(default_factory=dict)  # the pipeline's, set after write
    resumed_from: int = 0  # bytes kept from an earlier attempt
    fallbacks: int = 0     # partials discarded because resume could not be proven
    extra: dict[str, object] = field(default_factory=dict)  # facts for the log line

    @property
    def sha256(self) -> str:
        return self.digests["sha256"]


@dataclass
class Resume:
    """What an earlier attempt left, as far as relay knows."""

    acked: int = 0            # bytes the destination acknowledged (0: start fresh)
    state: str | None = None  # the backend's own record (e.g. an upload id and its parts)


class Transfer(Protocol):
    """What the pipeline offers a backend during one ``write``."""

    resume: Resume

    def progress(self, acked: int) -> None:
        """The destination has acknowledged ``acked`` bytes (any thread may call it)."""

    async def checkpoint(self, state: str, acked: int) -> None:
        """Journal the backend's resume record, durably, before anything depends on it
        (call it on the event loop). The next attempt finds it in ``resume.state``."""


@runtime_checkable
class Destination(Protocol):
    """What every backend provides."""

    @property
    def name(self) -> str: ...

    @property
    def rule(self) -> DestinationRule: ...

    @property
    def abilities(self) -> Abilities: ...

    async def start(self) -> None:
        """Check the root is usable (connect, log in, probe). Raises TransferError."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    def describe(self) -> dict[str, object]:
        """What ``relay check --probe`` prints about it once started."""

    def temporary(self, target: str) -> str:
        """The temporary ``write`` will use for ``target``: journalled before it is made,
        so that recovery finds it. Deterministic."""

    async def write(self, payload: Payload, target: str, tmp: str,
                    transfer: Transfer) -> Staged:
        """Stream ``payload`` to temporary ``tmp`` (see the module doc), feeding every byte
        to ``payload.hash`` once, in order. ``transfer.resume`` says what an earlier
        attempt left. Never returns or raises (cancelled included) while a thread of its
        own still reads the payload."""

    async def commit(self, staged: Staged, announcements: Sequence[tuple[str, bytes]] = ()
                     ) -> bool:
        """Make ``staged.tmp`` the final ``staged.target`` atomically, then write each
        (name, content) of ``announcements`` in order, as :meth:`announce` does. Repeating
        it after a crash is safe: if the temporary is gone, whether ``target`` already
        holds this content (``staged.sha256``, as far as the backend can tell). False, with
        nothing written, if neither holds it. Raises :class:`relay.errors.SignalFailed`
        when the payload is in place and an announcement failed."""

    async def announce(self, target: str, data: bytes) -> None:
        """Write a small file at ``target`` atomically (temporary + rename, or one PUT)."""

    async def has_identical(self, target: str, data: bytes) -> bool:
        """Is ``target`` already a regular file holding exactly ``data``? (Recovery asks
        before rewriting an announcement, so downstream watchers are not woken twice.)
        Never follows a symlink."""

    async def discard(self, tmp: str) -> None:
        """Remove a temporary (or an earlier generation's batch marker); no error if it
        does not exist."""

    async def ping(self) -> None:
        """Does the destination answer now? A cheap check (a stat of the root), for a
        destination that is backed off. Raises TransferError when it does not."""


@runtime_checkable
class Blocking(Protocol):
    """Optional: a backend whose file work is plain blocking calls. The scheduler
    (:mod:`relay.hops`) runs them where it sees fit — grouped on worker threads, or in
    helper processes that rebuild the destination from its rule."""

    def write_blocking(self, payload: Payload, target: str, tmp: str,
                       progress: Progress) -> Staged:
        """``write``, blocking (a resumed partial is always rewritten)."""

    def commit_blocking(self, staged: Staged, announcements: Sequence[tuple[str, bytes]]
                        ) -> bool:
        """``commit``, blocking."""


# -- registration --------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckContext:
    """What a backend's checks may look at besides its own rule."""

    sources: Sequence[Any]          # the rules' SourceRule models (path, name)
    secrets_dir: Path | None = None


Problem = tuple[str, str]  # (the rule's field, what is wrong)


@dataclass(frozen=True)
class Backend:
    """One backend's entry in the table of :mod:`relay.destinations`.

    ``open`` may import heavy libraries (asyncssh, boto3): it runs only when a destination
    of this scheme is used. ``conflicts`` runs at every start (problems that make relay
    refuse to run, e.g. a folder inside a source); ``problems`` only in ``relay check``
    (what can be told without connecting: unreadable keys, a missing tool). ``helpers``:
    its small files' work may run in relay's helper processes (:mod:`relay.file_workers`).
    """

    scheme: str
    rule: type[DestinationRule]
    open: Callable[[Any, Path | None], Destination]
    summary: str
    conflicts: Callable[[Any, CheckContext], list[Problem]] = lambda rule, ctx: []
    problems: Callable[[Any, CheckContext], list[Problem]] = lambda rule, ctx: []
    helpers: bool = False
