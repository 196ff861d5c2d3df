"""Structured logging, configured once. Modules call ``get_logger()`` and log fixed
``noun_verbed`` event names with stable keys (file, route, destination, bytes, sha256,
attempt, duration_ms, error)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import datetime
import json
import logging
import sys
import threading
from typing import Any, TextIO

import structlog

__all__ = ["configure", "flush", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


_threshold = logging.DEBUG  # the configured level: calls below it return at once
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
          logging.ERROR: "error", logging.CRITICAL: "critical"}


class _JsonLines:
    """The JSON lines of :func:`configure`'s processor chain, rendered without it.

    For a plain event (no ``exc_info``, JSON-native values, no bound context variables)
    the chain's output is known: the call's keys, then ``event``, ``level`` and
    ``timestamp``, as ``json.dumps`` writes them. Building that dict directly costs about
    half of what the chain does (structlog binds a logger and runs five processors per
    call), and a small file is logged five times at ``info``. Used only while structlog
    runs exactly the chain ``configure`` installed: ``capture_logs`` and any
    reconfiguration swap or refill it, and then every call goes through structlog."""

    def __init__(self, processors: list[Any], renderer: Any, writer: _LineWriter) -> None:
        self.processors, self.renderer, self.writer = processors, renderer, writer
        self.length = len(processors)

    def line(self, level: int, event: str, kw: dict[str, Any]) -> str | None:
        """The rendered line, or None when structlog must render this call."""
        name = _NAMES.get(level)
        if name is None or "exc_info" in kw or _context_bound():
            return None
        procs = structlog.get_config()["processors"]
        if procs is not self.processors or len(procs) != self.length \
                or procs[-1] is not self.renderer:
            return None
        d = dict(kw)
        d["event"] = event
        d["level"] = name
        d["timestamp"] = datetime.datetime.now(tz=datetime.UTC).isoformat() \
            .replace("+00:00", "Z")
        try:
            return json.dumps(d)  # no fallback: anything else is structlog's to render
        except (TypeError, ValueError):
            return None


def _context_bound() -> bool:
    """Has anything bound structlog context variables (merged into every line)?"""
    return any(v.name.startswith("structlog_") for v in contextvars.copy_context())


_json: _JsonLines | None = None


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Send one JSON object per line to stdout (or a console rendering on a TTY)."""
    global _threshold
    _threshold = _LEVELS[level]
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    global _json
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    factory = _LineWriter.factory(sys.stdout)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _json = None if use_console else _JsonLines(processors, renderer, factory())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LibraryRecords)]:
        root.removeHandler(old)  # configured again (in-process tests): one handler only
    root.addHandler(_LibraryRecords())
    # Warnings and up, as Python showed before: libraries are chatty at info and below.
    root.setLevel(max(logging.WARNING, _LEVELS[level]))


class _LineWriter:
    """Where rendered lines go: ``file``, written and flushed once per event-loop turn.

    A line logged on the event loop is buffered and a flush is scheduled for the next
    turn (``call_soon``), so the lines of every file handled in one turn cost one write
    instead of one each: a write is a system call, and on the loop thread every system
    call gives the GIL away to the worker threads (at ``info``, per-line writes would be a
    visible share of a small-file run). A line logged outside a loop (a library's thread, the CLI)
    flushes what is buffered and is written at once, so the order is kept. What a
    ``kill -9`` can lose is the lines of the turn it interrupts; the journal, not the log,
    is the record of what happened."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self._buf: list[str] = []
        self._lock = threading.Lock()
        self._flush_on: asyncio.AbstractEventLoop | None = None  # loop with a flush due

    @classmethod
    def factory(cls, file: TextIO) -> Any:
        global _WRITER
        if _WRITER is not None:
            _WRITER.flush()  # configured again: nothing written so far stays behind
        writer = _WRITER = cls(file)
        return lambda *args: writer

    def msg(self, message: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._buf.append(message)
            if loop is None:
                self._write()
            elif self._flush_on is not loop:  # (a flush due on a loop that ended: redo)
                self._flush_on = loop
                loop.call_soon(self.flush)

    # structlog calls the method named after the level
    log = debug = info = warning = warn = error = critical = exception = fatal = msg

    def flush(self) -> None:
        with self._lock:
            self._flush_on = None
            # From a loop callback, at exit or at a reconfiguration: with stdout gone (a
            # closed pipe) the lines cannot go anywhere, and raising here would only
            # produce more lines to write.
            with contextlib.suppress(OSError, ValueError):
                self._write()

    def _write(self) -> None:
        if self._buf:
            lines, self._buf = self._buf, []
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()


_WRITER: _LineWriter | None = None


def flush() -> None:
    """Write the log lines still buffered (at the end of a run; also at exit)."""
    if _WRITER is not None:
        _WRITER.flush()


atexit.register(flush)


class _LibraryRecords(logging.Handler):
    """Libraries (watchdog, asyncssh) log through the standard library. Without a handler
    Python prints their warnings to stderr as plain text, which breaks "one JSON object
    per line"; here each record becomes a ``library_logged`` event instead."""

    def emit(self, record: logging.LogRecord) -> None:
        # structlog knows the standard levels only; a library's own (e.g. 25) rounds down.
        level = min(max(record.levelno // 10 * 10, logging.DEBUG), logging.CRITICAL)
        try:
            get_logger().log(level, "library_logged", logger=record.name,
                             message=record.getMessage(), exc_info=record.exc_info or False)
        except Exception:
            self.handleError(record)


class _Logger:
    """The process logger. A call below the configured level returns before structlog
    builds anything: structlog's lazy proxy binds a new logger on *every* call (it must,
    so that ``capture_logs`` and reconfiguration take effect), which shows in the event
    loop's time in a small-file run logging at ``warning``. Calls at or above the level go
    to structlog."""

    def _at(self, level: int, event: str, kw: dict[str, Any]) -> None:
        if level >= _threshold:
            json_lines = _json
            if json_lines is not None:
                line = json_lines.line(level, event, kw)
                if line is not None:
                    json_lines.writer.msg(line)
                    return
            structlog.get_logger("relay").log(level, event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._at(logging.DEBUG, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._at(logging.INFO, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._at(logging.WARNING, event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._at(logging.ERROR, event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        kw.setdefault("exc_info", True)
        self._at(logging.ERROR, event, kw)

    def log(self, level: int, event: str, **kw: Any) -> None:
        self._at(level, event, kw)


_LOGGER = _Logger()


def get_logger() -> Any:
    """The process logger (info/warning/... like a structlog BoundLogger)."""
    return _LOGGER
