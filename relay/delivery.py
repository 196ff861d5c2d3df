"""Delivering one payload (or one batch) to one destination, journalled step by step.

    staging(tmp) → [stage: stream+hash → flush] → renaming(sha256) → [commit: rename]
    → signalling → [signals, batch marker last] → delivered (+ history row)

A single file goes from renaming to delivered with one ``commit`` call (rename, then its
signals); a batch journals signalling after its renames, durably before its marker.

The pipeline owns the source side: it opens the payload, the one hash its bytes pass and the
digest decision (:mod:`relay.payload`, through the scheduler :mod:`relay.hops`); a
backend writes the bytes it is handed and commits them.

A crash at any point leaves a journal state that says exactly what to redo
(:func:`recover`). The content identity is the sha256 computed while streaming; a
declared digest that differs sends the file back to waiting (DigestMismatch).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from relay.destinations.base import Destination, Resume, Staged
from relay.errors import (
    DigestMismatch,
    PermanentError,
    RetryableError,
    SignalFailed,
    SourceChanged,
    SourceVanished,
)
from relay.hops import Hops
from relay.journal import Delivery, FileRow, Journal
from relay.logs import get_logger
from relay.metrics import METRICS
from relay.rules import Route
from relay.signal_files import Declared
from relay.states import DeliveryState, Result

__all__ = ["Member", "Outcome", "RetryPolicy", "backoff", "deliver_to", "signal_body"]

log = get_logger()


@dataclass(frozen=True)
class Member:
    """One payload of a job: its source-relative path and what it must hash to."""

    rel: str
    declared: Declared | None


@dataclass
class Outcome:
    """How one destination's attempt ended."""

    state: Result
    error: str | None = None
    next_try_at: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How often a failing delivery is tried again: ``base`` seconds after the first
    failure, doubling up to ``cap``, at most ``max_attempts`` attempts in all."""

    base: float
    cap: float
    max_attempts: int


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(base/2, min(cap, base·2^(attempt-1)))."""
    high = min(cap, base * (2 ** max(0, attempt - 1)))
    return random.uniform(min(base / 2, high), high)


def signal_body(target: str, sha256: str) -> bytes:
    """GNU coreutils form, so ``sha256sum -c`` and relay itself both accept it: for a name
    with a backslash, newline or CR, coreutils' escaped form (``\\<hex>  a\\nb``), as
    ``sha256sum`` itself writes it. The name is written as the filesystem's bytes
    (os.fsencode), even when they are not UTF-8."""
    name = PurePosixPath(target).name
    escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    line = f"{sha256}  {name}" if escaped == name else f"\\{sha256}  {escaped}"
    return os.fsencode(line + "\n")


async def deliver_to(
    journal: Journal,
    dest: Destination,
    row: FileRow,
    route: Route,
    src_root: Path,
    members: list[Member],
    batch_marker: str | None,
    retry: RetryPolicy,
    progress_interval: float,
    rows: list[Delivery] | None = None,
    hops: Hops | None = None,
) -> Outcome:
    """Bring every member of ``row`` to ``dest``. Never raises TransferError: the outcome
    (and the journal) say what happened. ``rows``: this destination's delivery rows of
    ``row``, if the caller has just read them."""
    by_member = {m.rel: m for m in members}
    hops = hops or Hops()
    if rows is None:
        rows = [d for d in journal.deliveries(row.id) if d.destination == dest.name]
    gave_up = [d for d in rows if d.state == DeliveryState.FAILED]
    if gave_up:
        # This destination gave up on (a member of) this generation: that is never
        # "delivered", whatever the other destinations do (only `relay retry` resets it).
        return Outcome(Result.FAILED, gave_up[0].last_error or "failed earlier")
    todo = [d for d in rows if d.state != DeliveryState.DELIVERED]
    if not todo:
        return Outcome(Result.DELIVERED)
    # Rows already past staging when we start: a retry, or recovery after a crash. Their
    # signals may be in place already ('signalling' is not flushed before they are written).
    resumed = {d.id for d in todo
               if d.state in (DeliveryState.RENAMING, DeliveryState.SIGNALLING)}
    for d in todo:
        if d.id in resumed:
            # Resuming after the bytes were staged (a retry or a restart) is an attempt
            # too: without counting it, a step that always fails would retry forever.
            d.attempts += 1
            journal.update_delivery(d.id, attempts=d.attempts)
    current: Delivery | None = None
    staged: list[tuple[Delivery, Staged]] = []
    try:
        # 1. stage every member not staged yet. A batch is staged whole, then every member
        #    is journalled 'renaming' in ONE transaction: all-or-none even across a crash.
        for d in todo:
            if d.id in resumed:
                continue
            current = d
            m = by_member[d.member]
            st = await _stage_one(journal, dest, hops, row, route, src_root, d, m,
                                  progress_interval)
            if st is not None:
                staged.append((d, st))
        journal.mark_renaming([(d.id, st.tmp, st.sha256, st.size) for d, st in staged])
        for d, st in staged:  # the rows in memory follow the journal (no re-reads)
            d.state, d.tmp, d.sha256, d.size, d.acked = (
                DeliveryState.RENAMING, st.tmp, st.sha256, st.size, st.size)
        staged = []
        await journal.durable()  # 'renaming' must survive anything once we rename
        done: list[Delivery] = []
        published: set[int] = set()
        if batch_marker is None:
            # 2+3 for single files just staged: rename, then signals, in one backend call
            # (one worker hop for local folders). A crash in between leaves 'renaming',
            # whose recovery (rename if the temporary is still there, then signals that
            # are not already identical) is the same as 'signalling''s.
            for d in todo:
                if d.state != DeliveryState.RENAMING or d.id in resumed:
                    continue
                current = d
                assert d.sha256 is not None
                try:
                    published_ok = await hops.commit(dest, _staged(d),
                                                     _signals(route, d.target, d.sha256))
                except SignalFailed:
                    # The payload is in place: what is left is the signals (status, retry).
                    journal.update_delivery(d.id, state=DeliveryState.SIGNALLING)
                    d.state = DeliveryState.SIGNALLING
                    raise
                if not published_ok:
                    _restage(journal, d)
                    raise RetryableError(f"temporary {d.tmp} vanished before rename")
                published.add(d.id)
                done.append(d)
        if batch_marker is not None and any(d.state == DeliveryState.RENAMING for d in todo):
            # This generation's marker is written only after its last rename, so a marker
            # there now is an earlier generation's (or a stranger's): take it down before
            # any member is replaced, so no consumer trusts a mix of old and new members,
            # and so the new marker is a new file (a new event for downstream watchers).
            await dest.discard(batch_marker)
        # 2. rename every (other) staged member onto its final name
        for d in todo:
            if d.state != DeliveryState.RENAMING or d.id in published:
                continue
            current = d
            if not await hops.commit(dest, _staged(d), ()):
                _restage(journal, d)
                raise RetryableError(f"temporary {d.tmp} vanished before rename")
            journal.update_delivery(d.id, state=DeliveryState.SIGNALLING)
            d.state = DeliveryState.SIGNALLING
        # 3. downstream signals: per file, then the batch marker last
        for d in todo:
            if d.state != DeliveryState.SIGNALLING:
                continue
            current = d
            assert d.sha256 is not None
            if batch_marker is None:
                for target, body in _signals(route, d.target, d.sha256):
                    await _put_signal(dest, target, body, d.id in resumed)
            done.append(d)
        if batch_marker is not None and done:
            # Every member 'signalling' before the marker exists: a marker found while a
            # member is still 'renaming' is then surely an earlier generation's (above).
            await journal.durable()
            await _put_signal(dest, batch_marker, b"", bool(resumed))
        for d in done:
            assert d.sha256 is not None
            journal.mark_delivered(d, d.sha256)
            METRICS.files_delivered.labels(route.name, dest.name).inc()
            METRICS.bytes_delivered.labels(route.name, dest.name).inc(d.size or 0)
            log.info("file_delivered", file=d.member, route=route.name,
                     destination=dest.name, target=d.target, bytes=d.size, sha256=d.sha256)
        return Outcome(Result.DELIVERED)
    except (DigestMismatch, SourceChanged) as exc:
        if isinstance(exc, DigestMismatch):
            METRICS.digest_mismatches.labels(route.name).inc()
        for _, st in staged:  # members of a batch staged before the bad one
            await dest.discard(st.tmp)
        for d in journal.deliveries(row.id, DeliveryState.STAGING):
            if d.destination == dest.name:
                journal.update_delivery(d.id, state=DeliveryState.PENDING, acked=0)
        return Outcome(Result.MISMATCH, str(exc))
    except SourceVanished as exc:
        if current is not None:
            journal.update_delivery(current.id, state=DeliveryState.PENDING,
                                    last_error=str(exc))
        return Outcome(Result.VANISHED, str(exc))
    except PermanentError as exc:
        if current is not None:
            journal.update_delivery(current.id, state=DeliveryState.FAILED,
                                    last_error=str(exc))
        METRICS.files_failed.labels(route.name, dest.name).inc()
        log.error("delivery_failed", file=row.rel, route=route.name, destination=dest.name,
                  error=str(exc), permanent=True)
        return Outcome(Result.FAILED, str(exc))
    except RetryableError as exc:
        return _retry_or_fail(journal, dest, row, route, current, str(exc), retry)


def _retry_or_fail(journal: Journal, dest: Destination, row: FileRow, route: Route,
                   d: Delivery | None, error: str, retry: RetryPolicy) -> Outcome:
    if d is None:
        return Outcome(Result.RETRY_WAIT, error, time.time() + retry.base)
    fresh = next(x for x in journal.deliveries(row.id) if x.id == d.id)
    if fresh.attempts >= retry.max_attempts:
        journal.update_delivery(d.id, state=DeliveryState.FAILED, last_error=error,
                                next_try_at=None)
        METRICS.files_failed.labels(route.name, dest.name).inc()
        log.error("delivery_failed", file=d.member, route=route.name, destination=dest.name,
                  attempt=fresh.attempts, error=error)
        return Outcome(Result.FAILED, error)
    delay = backoff(fresh.attempts, retry.base, retry.cap)
    next_try = time.time() + delay
    # Past the rename (or maybe past it): what is left stays what it was; else wait.
    state = (fresh.state if fresh.state in (DeliveryState.RENAMING, DeliveryState.SIGNALLING)
             else DeliveryState.RETRY_WAIT)
    journal.update_delivery(d.id, state=state, last_error=error, next_try_at=next_try)
    METRICS.retries.labels(dest.name).inc()
    log.warning("delivery_retry_scheduled", file=d.member, route=route.name,
                destination=dest.name, attempt=fresh.attempts, error=error,
                retry_in_s=round(delay, 3))
    return Outcome(Result.RETRY_WAIT, error, next_try)


def _staged(d: Delivery) -> Staged:
    """A delivery journalled 'renaming' (or later) as the backend's commit needs it."""
    assert d.tmp is not None and d.sha256 is not None
    return Staged(target=d.target, tmp=d.tmp, size=d.size or 0, digests={"sha256": d.sha256})


def _restage(journal: Journal, d: Delivery) -> None:
    """Neither the temporary nor the final name holds what was staged (an object store's
    upload that a crash lost, a temporary removed by someone else): send it again."""
    journal.update_delivery(d.id, state=DeliveryState.PENDING, acked=0, resume_state=None)
    d.state, d.acked, d.resume_state = DeliveryState.PENDING, 0, None


class _Transfer:
    """What one write may tell the pipeline: progress, and resume records to journal."""

    def __init__(self, journal: Journal, d: Delivery, progress: Callable[[int], None]
                 ) -> None:
        self.resume = Resume(d.acked, d.resume_state)
        self.progress = progress
        self._journal, self._d = journal, d

    async def checkpoint(self, state: str, acked: int) -> None:
        self._journal.update_delivery(self._d.id, resume_state=state, acked=acked)
        self._d.resume_state, self._d.acked = state, acked
        await self._journal.durable()


async def _stage_one(journal: Journal, dest: Destination, hops: Hops, row: FileRow,
                     route: Route, src_root: Path, d: Delivery, m: Member,
                     progress_interval: float) -> Staged | None:
    """Stage one member; None if the same content was already delivered there."""
    tmp = dest.temporary(d.target)
    before = _identity(src_root / m.rel)
    total = before[1] if before else None  # for progress (status, logs) until staged
    journal.update_delivery(d.id, state=DeliveryState.STAGING, tmp=tmp,
                            attempts=d.attempts + 1,
                            next_try_at=None, size=total)
    d.state, d.tmp, d.attempts = DeliveryState.STAGING, tmp, d.attempts + 1
    algos = (m.declared.algo,) if m.declared else ()
    started = time.monotonic()
    last_log = [started]
    last_ack = [started]
    loop = asyncio.get_running_loop()

    def record(acked: int) -> None:
        # Best effort: progress bookkeeping must never kill a copy.
        with contextlib.suppress(Exception):
            journal.update_delivery(d.id, acked=acked)

    def progress(acked: int) -> None:
        """May run on a worker thread (local copies) or the loop (SFTP)."""
        now = time.monotonic()
        if now - last_ack[0] >= 1.0:
            # Journal the acknowledged byte count (at most once a second) so a resumed
            # attempt knows which prefix the destination already holds.
            last_ack[0] = now
            loop.call_soon_threadsafe(record, acked)
        if now - last_log[0] >= progress_interval:
            last_log[0] = now
            rate = acked / max(now - started, 1e-6)
            pct = round(100 * acked / total, 1) if total else None
            eta = round((total - acked) / rate, 1) if total and rate > 0 else None
            log.info("transfer_progress", file=m.rel, destination=dest.name, bytes=acked,
                     total=total, percent=pct, rate_mb_s=round(rate / 1e6, 1), eta_s=eta)

    await journal.durable()  # 'staging' (the temporary to sweep, the attempt) comes first
    staged = await hops.write(dest, src_root / m.rel, total, d.target, tmp, algos,
                              _Transfer(journal, d, progress))
    if m.declared is None:
        # Written, truncated or replaced while we copied it? With a declared digest the
        # hash check below catches that; an empty marker vouches for nothing but the
        # bytes as they were, so what we staged may be neither the old nor the new file.
        after = _identity(src_root / m.rel)
        if before != after or (after and after[1] != staged.size):
            await dest.discard(staged.tmp)
            raise SourceChanged(f"{m.rel} changed while it was being copied "
                                f"({staged.size} bytes read)")
    if staged.fallbacks:
        METRICS.resume_fallbacks.labels(dest.name).inc(staged.fallbacks)
        journal.update_delivery(d.id, fallbacks=d.fallbacks + staged.fallbacks)
    sha = staged.digests["sha256"]
    expected = m.declared.hexdigest if m.declared else None
    computed = staged.digests[m.declared.algo] if m.declared else None
    if expected is not None and computed != expected:
        await dest.discard(staged.tmp)
        raise DigestMismatch(expected, computed or "")
    if row.kind == "file" and row.sha256 and row.sha256 != sha:
        # Another destination already took this generation with other bytes: the file
        # changed between streams. Never fan out two versions under one generation.
        await dest.discard(staged.tmp)
        raise DigestMismatch(row.sha256, sha)
    if row.kind == "file" and not row.sha256:
        # The journal's copy is written by a trigger when this delivery is journalled
        # 'renaming' (or 'delivered' below), before anything is published.
        row.sha256 = sha
    if journal.already_delivered(route.name, dest.name, m.rel, sha):
        await dest.discard(staged.tmp)
        journal.mark_delivered(d, sha)
        METRICS.duplicates.labels(route.name, dest.name).inc()
        log.info("delivery_skipped_duplicate", file=m.rel, route=route.name,
                 destination=dest.name, sha256=sha)
        return None
    METRICS.transfer_seconds.labels(dest.name).observe(time.monotonic() - started)
    log.info("file_staged", file=m.rel, destination=dest.name, tmp=staged.tmp,
             bytes=staged.size, sha256=sha, resumed_from=staged.resumed_from,
             duration_ms=round((time.monotonic() - started) * 1000, 1))
    return staged


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _signals(route: Route, target: str, sha256: str) -> list[tuple[str, bytes]]:
    """The downstream signal files of ``target``: (name, content), in writing order."""
    body = signal_body(target, sha256)
    out = []
    if route.signal in ("sha256", "both"):
        out.append((target + ".sha256", body))
    if route.signal in ("marker", "both"):
        out.append((target + route.marker_suffix, body))
    return out


async def _put_signal(dest: Destination, target: str, body: bytes, resumed: bool) -> None:
    """Write a downstream signal. When resuming after a crash, one already in place with
    the same bytes is left alone: rewriting it would wake downstream watchers twice."""
    if resumed and await dest.has_identical(target, body):
        return
    await dest.announce(target, body)
