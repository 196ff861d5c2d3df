"""The job side of the engine: READY files become jobs, at most ``concurrency`` at a time,
each fanning out to its destinations (:func:`relay.delivery.deliver_to`), their outcomes
settled on the file's row, and the route's post-action applied once every destination has
the file. Jobs that must wait (a retry, a backed-off destination) are timers; files beyond
the concurrency wait in a queue of ids.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

from relay.breaker import Breaker
from relay.coalesce import Coalescer
from relay.config import Settings
from relay.delivery import Member, Outcome, RetryPolicy, deliver_to
from relay.destinations.base import NAME_MAX, Destination
from relay.errors import UnsafePathError
from relay.evaluation import Key, is_ignored
from relay.hashing import hash_file
from relay.hops import Hops
from relay.journal import Delivery, FileRow, Journal
from relay.logs import get_logger
from relay.metrics import METRICS
from relay.paths import render_template, safe_relpath
from relay.post_action import recheck_then_apply, source_paths
from relay.readiness import gather_batch
from relay.rules import Route, Rules, SourceRule
from relay.signal_files import Declared
from relay.states import DeliveryState, FileState, Result, Verdict

__all__ = ["JOB_STATES", "JobRunner"]

log = get_logger()
# A file in one of these has a job to run (or finish: the post-action of a delivered one).
JOB_STATES = (FileState.READY, FileState.DELIVERING, FileState.DELIVERED)


class JobRunner:
    """Runs the jobs the evaluator hands it (:class:`relay.evaluation.JobControl`: start,
    busy, defer). ``revisit(key)``: have the evaluator look at a file again (its evidence
    changed while its job ran); ``forget(source, rel)``: a file is done."""

    def __init__(self, settings: Settings, rules: Rules, journal: Journal,
                 dests: dict[str, Destination], hops: Hops, settled: asyncio.Event, *,
                 revisit: Callable[[Key], None], forget: Callable[[str, str], None],
                 once: bool = False) -> None:
        self.settings = settings
        self.rules = rules       # replaced as a whole when the rules are reloaded
        self.journal = journal
        self.dests = dests       # the engine's: a reload replaces entries in place
        self.hops = hops
        self.once = once
        self.jobs: dict[int, asyncio.Task[None]] = {}  # running, at most `concurrency`
        self.queued: dict[int, None] = {}  # ready, waiting for a free slot (in order)
        self.deferred: dict[int, Key] = {}  # look at these again when their job ends
        self.timers: dict[int, asyncio.TimerHandle] = {}  # jobs waiting for a retry
        self.failed = 0  # files that failed (or, under --once, still wait for a retry)
        self.suspect: set[int] = set()  # files that failed verification once
        self.breakers: dict[str, Breaker] = {}
        self._settled = settled  # set whenever a job ends
        self._revisit = revisit
        self._forget = forget
        self._stopping = False
        self._calls = Coalescer()  # the post-actions' file work (relay.coalesce)

    @property
    def idle(self) -> bool:
        """No job running or queued."""
        return not self.jobs and not self.queued

    def stop(self) -> None:
        """Start no more jobs; pending retries are dropped (the journal keeps them)."""
        self._stopping = True
        for timer in self.timers.values():
            timer.cancel()

    def busy(self, file_id: int) -> bool:
        return file_id in self.jobs or file_id in self.queued

    def defer(self, file_id: int, key: Key) -> None:
        self.deferred[file_id] = key

    def start(self, file_id: int) -> None:
        if file_id in self.jobs or file_id in self.queued or self._stopping:
            return
        timer = self.timers.pop(file_id, None)
        if timer:
            timer.cancel()
        if len(self.jobs) >= self.settings.concurrency:
            # A task per waiting file would cost a coroutine frame each: with 100,000 files
            # ready at start-up that is hundreds of MiB. A queue of ids costs a dict slot.
            self.queued[file_id] = None
            METRICS.jobs_queued.set(len(self.queued))
            return
        self._launch(file_id)

    def _launch(self, file_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self._job(file_id))
        self.jobs[file_id] = task
        METRICS.in_flight.set(len(self.jobs))

        def _done(_: asyncio.Task[None]) -> None:
            self.jobs.pop(file_id, None)
            key = self.deferred.pop(file_id, None)
            if key is not None and not self._stopping:
                self._revisit(key)
            while self.queued and len(self.jobs) < self.settings.concurrency \
                    and not self._stopping:
                next_id = next(iter(self.queued))
                del self.queued[next_id]
                self._launch(next_id)
            METRICS.in_flight.set(len(self.jobs))
            METRICS.jobs_queued.set(len(self.queued))
            self._settled.set()

        task.add_done_callback(_done)

    async def _job(self, file_id: int) -> None:
        row = self.journal.file_by_id(file_id)
        if row is None or row.state not in JOB_STATES:
            return
        try:
            await self._run_job(row)
        except Exception as exc:
            log.exception("job_crashed", file=row.rel, error=str(exc))
            self.journal.update_file(row.id, state=FileState.WAITING, reason=f"internal: {exc}")

    async def _run_job(self, row: FileRow) -> None:
        src = self.rules.source(row.source)
        route = self.rules.route(row.route or "")
        key: Key = (row.source, row.kind, row.rel)
        if route is None:
            self.journal.update_file(row.id, state=FileState.WAITING,
                                     reason="route no longer exists")
            return
        members = await self._members(row, src)
        if members is None:
            self.journal.update_file(row.id, state=FileState.WAITING, reason="evidence changed")
            self.deferred[row.id] = key
            return
        if row.state != FileState.DELIVERED and row.id in self.suspect and row.kind == "file" \
                and members[0].declared is not None:
            # It failed verification before and is probably still being written: check
            # by reading only, so we do not rewrite a destination temporary at every event.
            decl = members[0].declared
            try:
                digests = await asyncio.to_thread(hash_file, str(src.path / row.rel),
                                                  (decl.algo,))
            except OSError as exc:
                digests = {decl.algo: f"unreadable ({exc.strerror})"}
            if digests[decl.algo] != decl.hexdigest:
                self.journal.update_file(row.id, state=FileState.WAITING,
                                         reason=f"not complete yet: declared {decl.hexdigest} "
                                                f"but content hashes to {digests[decl.algo]}")
                self.deferred[row.id] = key
                return
        if row.state != FileState.DELIVERED:
            when = datetime.fromtimestamp(row.ready_at or time.time(), UTC)
            try:
                plan = [(m.rel, d, render_template(route.path, m.rel, source=src.name,
                                                   route=route.name, when=when))
                        for m in members for d in route.to]
                if row.kind == "file":
                    _fits_with_signals(plan[0][2], route)
                marker = None
                if row.kind == "batch":
                    mrel = safe_relpath(f"{row.rel}/{src.ready.directory_marker}")
                    marker = render_template(route.path, mrel, source=src.name,
                                             route=route.name, when=when)
            except UnsafePathError as exc:
                self.quarantine(row, route, f"unsafe destination path: {exc}")
                return
            planned = self.journal.plan_deliveries(row.id, plan)
            if row.state != FileState.DELIVERING:  # what plan_deliveries wrote
                row.reason = None
            row.state = FileState.DELIVERING
            retry = RetryPolicy(route.retry.base or self.settings.retry_base,
                                route.retry.cap or self.settings.retry_cap,
                                route.retry.max_attempts or self.settings.retry_max_attempts)
            if len(route.to) == 1:  # the usual case: no task to wrap one coroutine
                outcomes = [await self._to_dest(row, route, src, members, marker,
                                                route.to[0], retry, planned)]
            else:
                outcomes = await asyncio.gather(*(
                    self._to_dest(row, route, src, members, marker, d, retry, planned)
                    for d in route.to))
            if not self._settle(row, route, key, outcomes):
                return
        await self._post_action(row, src, route, members)

    async def _to_dest(self, row: FileRow, route: Route, src: SourceRule,
                       members: list[Member], marker: str | None, dname: str,
                       retry: RetryPolicy,
                       planned: list[Delivery] | None = None) -> Outcome:
        """``planned``: the file's delivery rows, when plan_deliveries has just made them."""
        rows = [d for d in (self.journal.deliveries(row.id) if planned is None else planned)
                if d.destination == dname]
        due = [d.next_try_at for d in rows if d.state == DeliveryState.RETRY_WAIT and d.next_try_at]
        if due and max(due) > time.time():
            return Outcome(Result.RETRY_WAIT, rows[0].last_error, max(due))
        breaker = self.breakers.setdefault(dname, Breaker(
            threshold=self.settings.breaker_threshold, base=self.settings.breaker_cooldown,
            cap=self.settings.retry_cap))
        if not breaker.allow():
            return Outcome(Result.RETRY_WAIT, f"destination {dname} backed off (circuit open)",
                           max(breaker.open_until, time.time() + 1.0))
        outcome = await deliver_to(self.journal, self.dests[dname], row, route, src.path,
                                   members, marker, retry, self.settings.progress_interval,
                                   rows, self.hops)
        if outcome.state in (Result.DELIVERED, Result.RETRY_WAIT, Result.FAILED):
            was_open = breaker.is_open
            if breaker.record(outcome.state == Result.DELIVERED):
                log.warning("destination_circuit_opened", destination=dname,
                            failures=breaker.failures, error=outcome.error,
                            retry_in_s=round(breaker.open_until - time.time(), 1))
            elif was_open and not breaker.is_open:
                log.info("destination_circuit_closed", destination=dname)
            METRICS.circuit_open.labels(dname).set(1 if breaker.is_open else 0)
        return outcome

    def _settle(self, row: FileRow, route: Route, key: Key, outcomes: list[Outcome]) -> bool:
        """Record the job's result on the file row; True when every destination has it."""
        states = {o.state for o in outcomes}
        j = self.journal
        if states == {Result.DELIVERED}:
            if route.then != "keep":
                # With 'keep', _finish writes 'done' in the same group transaction at
                # once (no await in between): 'delivered' would never be seen.
                j.update_file(row.id, state=FileState.DELIVERED, reason=None)
            if row.ready_at:
                METRICS.signal_latency.labels(route.name).observe(time.time() - row.ready_at)
            return True
        if Result.MISMATCH in states:
            self.suspect.add(row.id)
        if Result.MISMATCH in states or Result.VANISHED in states:
            why = next(o.error for o in outcomes if o.state in (Result.MISMATCH, Result.VANISHED))
            j.update_file(row.id, state=FileState.WAITING, reason=f"not complete yet: {why}",
                          sha256=None, waiting_since=row.waiting_since or time.time())
            log.info("file_waiting", file=row.rel, route=route.name, reason=why)
            self.deferred[row.id] = key
            return False
        if Result.RETRY_WAIT in states:
            when = min(o.next_try_at or time.time() for o in outcomes
                       if o.state == Result.RETRY_WAIT)
            j.update_file(row.id, state=FileState.DELIVERING,
                          reason=next(o.error for o in outcomes if o.state == Result.RETRY_WAIT))
            delay = max(0.0, when - time.time())
            self.timers[row.id] = asyncio.get_running_loop().call_later(
                delay, self.start, row.id)
            if self.once:
                self.failed += 1
            return False
        errors = "; ".join(o.error or "" for o in outcomes if o.state == Result.FAILED)
        j.update_file(row.id, state=FileState.FAILED, reason=errors)
        self.failed += 1
        log.error("file_failed", file=row.rel, route=route.name, error=errors)
        return False

    async def _members(self, row: FileRow, src: SourceRule) -> list[Member] | None:
        if row.kind == "batch" and row.state == FileState.DELIVERED:
            # Every destination has it; only the post-action is left, and it may have
            # removed members already (a crash mid-way): the journal says what they were.
            planned = {d.member for d in self.journal.deliveries(row.id)}
            return [Member(rel, None) for rel in sorted(planned)]
        if row.kind == "file":
            declared = (Declared(row.declared_algo, row.declared_digest, row.signal or "")
                        if row.declared_algo and row.declared_digest else None)
            return [Member(row.rel, declared)]
        bev = await asyncio.to_thread(gather_batch, src.path, row.rel, src.ready,
                                      lambda r: is_ignored(src, r))
        if bev.verdict != Verdict.READY:
            return None
        return [Member(rel, decl) for rel, decl in bev.members.items()
                if self.rules.match(src.name, rel) is not None or rel.endswith(
                    f"/{src.ready.manifest}") or rel == src.ready.manifest]

    def quarantine(self, row: FileRow, route: Route | None, reason: str) -> None:
        self.journal.update_file(row.id, state=FileState.QUARANTINED, reason=reason)
        METRICS.files_quarantined.labels(route.name if route else "-").inc()
        log.warning("file_quarantined", file=row.rel, source=row.source,
                    route=route.name if route else None, reason=reason)

    # -- the post-action ---------------------------------------------------------------------

    async def _post_action(self, row: FileRow, src: SourceRule, route: Route,
                           members: list[Member]) -> None:
        if route.then == "keep":
            # Nothing is done to the source, so there is nothing to re-check first (the
            # evidence read below only decides whether deleting/archiving is safe).
            self._finish(row, route)
            return
        paths = source_paths(row.kind, row.rel, src.ready, [m.rel for m in members])
        await self.journal.durable()  # 'delivered' (and history) before the source goes
        try:
            # One coalesced hop per file: re-read the evidence, then delete or archive.
            applied = await self._calls.run(
                recheck_then_apply, src.path, row.rel, src.ready,
                row.fingerprint if row.kind == "file" else None, paths, route.then)
        except OSError as exc:
            log.error("post_action_failed", file=row.rel, route=route.name, error=str(exc))
            self.journal.update_file(row.id, reason=f"post-action failed: {exc}")
            return
        if not applied:
            log.warning("post_action_skipped", file=row.rel, route=route.name,
                        reason="source changed after it was delivered")
            self._finish(row, route)
            self.deferred[row.id] = (row.source, row.kind, row.rel)
            return
        self._finish(row, route)

    def _finish(self, row: FileRow, route: Route) -> None:
        self.journal.update_file(row.id, state=FileState.DONE, reason=None)
        self.suspect.discard(row.id)
        self._forget(row.source, row.rel)
        log.info("file_done", file=row.rel, route=route.name, then=route.then,
                 sha256=row.sha256)


def _fits_with_signals(target: str, route: Route) -> None:
    """Refuse up front a payload whose downstream signal name cannot exist: placing the
    payload and then failing on its signal would leave it without a signal forever."""
    suffixes = [""]
    if route.signal in ("sha256", "both"):
        suffixes.append(".sha256")
    if route.signal in ("marker", "both"):
        suffixes.append(route.marker_suffix)
    name = os.fsencode(target.rpartition("/")[2])
    for suffix in suffixes:
        if len(name) + len(suffix.encode()) > NAME_MAX:
            raise UnsafePathError(f"{target}{suffix} is longer than {NAME_MAX} bytes, the "
                                  "longest name a filesystem takes")
