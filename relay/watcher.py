"""Filesystem events → hints. watchdog runs in its own thread; each event is handed to
the event loop in exactly one place (``loop.call_soon_threadsafe``). Events never decide
readiness: they only say *which path to look at again*. The start-up scan and periodic
rescans (:func:`scan`) catch whatever the OS dropped (inotify overflow, NFS)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from relay.rules import SourceRule

__all__ = ["Hint", "SourceWatcher", "scan"]

# (source name, relative path, what happened: "file" | "closed" | "dir")
Hint = Callable[[str, str, str], None]


def scan(root: Path, recursive: bool = True, below: str = "") -> Iterator[str]:
    """Every regular file under ``root`` (or ``root/below``), as a relative POSIX path.
    Symlinks are reported (readiness refuses them) but never followed."""
    start = root / below if below else root
    for dirpath, dirnames, filenames in os.walk(start, followlinks=False):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for fn in sorted(filenames):
            yield prefix + fn
        if not recursive:
            break


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
        # "closed" (close_write) means no new bytes: it must not make a marker stale.
        kind = "dir" if event.is_directory else "closed" if event.event_type == "closed" \
            else "file"
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if path:
                rel = self._rel(path)
                if rel is not None:
                    self.deliver(rel, kind)


class SourceWatcher:
    """Watches one source; ``hint(source, rel, kind)`` runs on the event loop."""

    def __init__(self, source: SourceRule, loop: asyncio.AbstractEventLoop, hint: Hint):
        self.source = source
        self.root = str(source.path.absolute())
        observer: Any = (PollingObserver(timeout=source.poll_interval)
                         if source.watcher == "polling" else Observer())
        self._observer = observer

        def deliver(rel: str, kind: str) -> None:
            # The single thread → event-loop boundary.
            loop.call_soon_threadsafe(hint, source.name, rel, kind)

        observer.schedule(_Handler(source, self.root, deliver), self.root,
                          recursive=source.recursive)

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)

    @property
    def alive(self) -> bool:
        return bool(self._observer.is_alive())
