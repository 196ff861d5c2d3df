"""A one-line progress bar for CLI commands that take a while, drawn only on a TTY.

Logs are for machines; this is for the person at the terminal. Redirected output stays
clean (no carriage returns in files or pipes).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """``bar.update(done)`` as work advances, ``bar.close()`` at the end."""

    WIDTH = 30

    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 force: bool = False) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn < 0.1 and done < self.total:
            return  # at most ten redraws a second
        self._drawn = now
        self.stream.write("\r" + self.render(done, now - self.started))
        self.stream.flush()

    def render(self, done: int, elapsed: float) -> str:
        frac = min(1.0, done / self.total) if self.total else 1.0
        filled = int(frac * self.WIDTH)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"ETA {(self.total - done) / rate:4.0f}s" if rate and done < self.total else ""
        return (f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{frac * 100:5.1f}% {rate / 1e6:7.1f} MB/s {eta}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (len(self.label) + self.WIDTH + 40) + "\r")
            self.stream.flush()
