"""Filesystem events → hints. watchdog runs in its own thread; each event is handed to
the event loop in exactly one place (``loop.call_soon_threadsafe``). Events never decide
readiness: they only say *which path to look at again*. The start-up scan and periodic
rescans (:func:`relay.evaluation.scan`) catch whatever the OS dropped (NFS); an inotify
queue overflow is reported to the loop too (``overflow``), so the source is rescanned at
once."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from relay.rules import SourceRule

__all__ = ["Hint", "SourceWatcher"]

# (source name, relative path, what happened: "file" | "created" | "closed" | "dir")
Hint = Callable[[str, str, str], None]


class _OverflowListener(logging.Handler):
    """watchdog (7.x) has no event for an inotify queue overflow: its shared inotify
    reader only logs it, once per overflow, then carries on without the lost events. This
    handler on that logger tells every registered watcher. (The inotify instance is shared
    by all sources, so one overflow loses events of any of them. The per-source record
    ``...reconciling recursive watches`` from ``inotify.py`` is the same overflow.)"""

    LOGGER = "watchdog.observers.inotify_c"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._lock = threading.Lock()
        self._callbacks: set[Callable[[], None]] = set()

    def add(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.add(callback)

    def discard(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.discard(callback)

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" not in record.getMessage().lower():
            return
        with self._lock:
            callbacks = tuple(self._callbacks)
        for callback in callbacks:
            callback()


_overflows = _OverflowListener()
logging.getLogger(_OverflowListener.LOGGER).addHandler(_overflows)
# Whatever level relay logs at, the overflow record must be created to be seen here.
logging.getLogger(_OverflowListener.LOGGER).setLevel(logging.WARNING)


class _Handler(FileSystemEventHandler):
    def __init__(self, source: SourceRule, root: str, deliver: Callable[[str, str], None]):
        self.source = source
        self.root = root
        self.deliver = deliver

    def _rel(self, path: str | bytes) -> str | None:
        p = os.fsdecode(path)
        rel = os.path.relpath(p, self.root)
        if rel.startswith("..") or rel == ".":
            return None
        return rel.replace(os.sep, "/")

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        # "closed" (close_write) means no new bytes: it must not make a marker stale;
        # "created" is told apart for the evaluator (a payload's creation is not a change
        # of its bytes).
        kind = "dir" if event.is_directory else event.event_type \
            if event.event_type in ("closed", "created") else "file"
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                rel = self._rel(path)
                if rel is not None:
                    self.deliver(rel, kind)


# Every event but opened / closed-without-writing, which say nothing about content
# (_Handler ignores them). Left out of the inotify mask they are not queued at all: relay
# reading its own landing zone (sidecars, payloads) would otherwise fill the kernel queue
# and, after an overflow, the rescan's reads would overflow it again.
_WANTED: list[type[FileSystemEvent]] = [
    FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent, FileMovedEvent,
    DirMovedEvent, FileDeletedEvent, DirDeletedEvent, FileClosedEvent]


class SourceWatcher:
    """Watches one source; ``hint(source, rel, kind)`` runs on the event loop, and
    ``overflow(source)`` when the OS dropped events (inotify queue overflow)."""

    def __init__(self, source: SourceRule, loop: asyncio.AbstractEventLoop, hint: Hint,
                 overflow: Callable[[str], None] | None = None):
        self.source = source
        self.root = str(source.path.absolute())
        observer: Any = (PollingObserver(timeout=source.poll_interval)
                         if source.watcher == "polling" else Observer())
        self._observer = observer

        def deliver(rel: str, kind: str) -> None:
            # The single thread → event-loop boundary (for events).
            loop.call_soon_threadsafe(hint, source.name, rel, kind)

        def lost() -> None:
            # ... and for the news that events were lost.
            if overflow is not None:
                loop.call_soon_threadsafe(overflow, source.name)

        self._lost = lost
        observer.schedule(_Handler(source, self.root, deliver), self.root,
                          recursive=source.recursive, event_filter=_WANTED)

    def start(self) -> None:
        if self.source.watcher != "polling":  # polling loses nothing: it compares snapshots
            _overflows.add(self._lost)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        _overflows.discard(self._lost)
        self._observer.stop()
        self._observer.join(timeout=5)

    @property
    def alive(self) -> bool:
        return bool(self._observer.is_alive())
