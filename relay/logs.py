"""Structured logging, configured once. Modules call ``get_logger()`` and log fixed
``noun_verbed`` event names with stable keys (file, route, destination, bytes, sha256,
attempt, duration_ms, error)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


_threshold = logging.DEBUG  # the configured level: calls below it return at once


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Send one JSON object per line to stdout (or a console rendering on a TTY)."""
    global _threshold
    _threshold = _LEVELS[level]
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LibraryRecords)]:
        root.removeHandler(old)  # configured again (in-process tests): one handler only
    root.addHandler(_LibraryRecords())
    # Warnings and up, as Python showed before: libraries are chatty at info and below.
    root.setLevel(max(logging.WARNING, _LEVELS[level]))


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
    so that ``capture_logs`` and reconfiguration take effect), which was ~3% of the event
    loop's time in a small-file run logging at ``warning``. Calls at or above the level go
    to structlog as before."""

    def _at(self, level: int, event: str, kw: dict[str, Any]) -> None:
        if level >= _threshold:
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
