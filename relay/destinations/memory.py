"""``mem://store/prefix`` destinations: files kept in this process's memory.

For tests of the pipeline and for trying rules out: what relay would deliver, where, in
which order, without a disk or a server. Everything is lost when the process ends, so the
journal's record of a delivery outlives the delivery itself — never use it for real data.

The store keeps temporaries beside the final names, as a folder would, so a test can tell
that a temporary never shows under the final name and that announcements come after their
payload (:attr:`Store.events` records every write, rename and removal in order).
"""

from __future__ import annotations

import asyncio
import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from relay.destinations.base import (
    Abilities,
    Backend,
    DestinationRule,
    Staged,
    Transfer,
    hidden_temporary,
)
from relay.errors import PermanentError, RetryableError, SignalFailed

if TYPE_CHECKING:
    from relay.payload import Payload

__all__ = ["BACKEND", "MemoryDestination", "MemoryRule", "Store", "store"]

_PIECE = 64 * 1024


class MemoryRule(DestinationRule):
    """``url: mem://NAME/prefix``: NAME picks the store (see :func:`store`)."""

    url: str = Field(json_schema_extra={"pattern": "^mem://"})

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not urlsplit(v).netloc:
            raise ValueError("mem:// URL needs a store name: mem://NAME/prefix")
        return v


@dataclass
class Store:
    """The files of one store: name → bytes, and what happened to them, in order."""

    files: dict[str, bytes] = field(default_factory=dict)
    events: list[tuple[str, str]] = field(default_factory=list)  # (what, name)

    def visible(self) -> dict[str, bytes]:
        """The files a consumer would list: no hidden temporaries."""
        files = dict(self.files)  # one step under the GIL: safe from another thread
        return {k: v for k, v in files.items() if not posixpath.basename(k).startswith(".")}


_STORES: dict[str, Store] = {}


def store(name: str) -> Store:
    """The store ``mem://name`` destinations write to (made on first use)."""
    return _STORES.setdefault(name, Store())


def _refuse_escape(rel: str) -> str:
    norm = posixpath.normpath(rel)
    if rel.startswith("/") or norm == ".." or norm.startswith("../") or "\0" in rel:
        raise PermanentError(f"{rel!r} would leave the destination root")
    return norm


class MemoryDestination:
    """A folder in memory. Every call yields to the loop once, as real I/O would."""

    abilities = Abilities()

    def __init__(self, rule: MemoryRule) -> None:
        self.name = rule.name
        self.rule = rule
        parts = urlsplit(rule.url)
        self.store = store(parts.netloc)
        self.prefix = parts.path.strip("/")

    def _key(self, rel: str) -> str:
        rel = _refuse_escape(rel)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    async def start(self) -> None:
        await asyncio.sleep(0)

    async def ping(self) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, object]:
        return {"files": len(self.store.files)}

    def temporary(self, target: str) -> str:
        return hidden_temporary(target)

    async def write(self, payload: Payload, target: str, tmp: str,
                    transfer: Transfer) -> Staged:
        key = self._key(tmp)
        self._key(target)
        chunks, offset = [], 0
        while data := payload.read(_PIECE, offset):
            chunks.append(data)
            offset += len(data)
            transfer.progress(offset)
            await asyncio.sleep(0)
        self.store.files[key] = b"".join(chunks)
        self.store.events.append(("write", key))
        return Staged(target=target, tmp=tmp, size=offset)

    async def commit(self, staged: Staged, announcements: Sequence[tuple[str, bytes]] = ()
                     ) -> bool:
        await asyncio.sleep(0)
        tmp, target = self._key(staged.tmp), self._key(staged.target)
        if tmp in self.store.files:
            self.store.files[target] = self.store.files.pop(tmp)
            self.store.events.append(("rename", target))
        elif target not in self.store.files or (
                staged.digests and hashlib.sha256(self.store.files[target]).hexdigest()
                != staged.sha256):
            return False
        try:
            for name, data in announcements:
                await self.announce(name, data)
        except RetryableError as exc:
            raise SignalFailed(str(exc)) from exc
        return True

    async def announce(self, target: str, data: bytes) -> None:
        await asyncio.sleep(0)
        key = self._key(target)
        self.store.files[key] = bytes(data)
        self.store.events.append(("announce", key))

    async def has_identical(self, target: str, data: bytes) -> bool:
        await asyncio.sleep(0)
        return self.store.files.get(self._key(target)) == data

    async def discard(self, tmp: str) -> None:
        await asyncio.sleep(0)
        key = self._key(tmp)
        if self.store.files.pop(key, None) is not None:
            self.store.events.append(("remove", key))


def _open(rule: MemoryRule, _secrets_dir: Path | None) -> MemoryDestination:
    return MemoryDestination(rule)


BACKEND = Backend(scheme="mem", rule=MemoryRule, open=_open,
                  summary="files kept in relay's memory, lost when it exits (tests, trials)")
