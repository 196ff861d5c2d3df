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


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Send one JSON object per line to stdout (or a console rendering on a TTY)."""
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


def get_logger() -> Any:
    """The process logger (a structlog BoundLogger)."""
    return structlog.get_logger("relay")
