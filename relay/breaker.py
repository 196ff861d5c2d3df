"""Per-destination circuit breaker: one dead partner must not stall the others.

After ``threshold`` consecutive failed attempts the destination is *open* for a cool-down
(doubling up to ``cap``); jobs for it wait without touching it. When the cool-down ends
one attempt is let through (*half-open*): success closes the breaker, failure re-opens it
for longer. Digest mismatches and vanished sources are not the destination's fault and
do not count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Breaker"]


@dataclass
class Breaker:
    threshold: int = 5
    base: float = 5.0
    cap: float = 300.0
    failures: int = 0
    opened: int = 0
    open_until: float = 0.0
    probing: bool = False

    def allow(self, now: float | None = None) -> bool:
        """May an attempt go to the destination now?"""
        now = time.time() if now is None else now
        if self.failures < self.threshold:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True  # half-open: exactly one attempt
        return True

    def record(self, ok: bool, now: float | None = None) -> bool:
        """Record an attempt's result; True if this call opened the breaker."""
        now = time.time() if now is None else now
        self.probing = False
        if ok:
            self.failures = self.opened = 0
            self.open_until = 0.0
            return False
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened += 1
            self.open_until = now + min(self.cap, self.base * 2 ** (self.opened - 1))
            return True
        return False

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold
