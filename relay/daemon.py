"""The daemon around the engine: start-up, signals (SIGTERM/SIGINT stop, SIGHUP reloads
the rules), watchers, periodic rescans and deadlines, the HTTP endpoints, and a staged
shutdown — stop intake, let in-flight transfers finish until a deadline, then abandon
them to the journal (they resume on the next start)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterable

from relay.destinations import open_destination
from relay.destinations.base import Destination
from relay.engine import Engine
from relay.errors import RulesError, TransferError
from relay.logs import get_logger
from relay.metrics import METRICS, serve
from relay.rules import SourceRule, environment_problems, load_rules
from relay.states import FileState

__all__ = ["Daemon"]

log = get_logger()


class Daemon:
    """Runs one :class:`Engine` until stopped."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self._lost: dict[str, int] = {}  # overflows no rescan has answered yet, per source
        self._catching_up: set[str] = set()

    def _overflowed(self, source: str) -> None:
        """The watcher of ``source`` lost events (inotify queue overflow): rescan it now
        rather than at the next periodic rescan."""
        self._lost[source] = self._lost.get(source, 0) + 1
        self.e.evaluator.forget_event_order(source)
        if source not in self._catching_up and not self.e.stopping.is_set():
            self._catching_up.add(source)
            self.e.spawn(self._catch_up(source))

    def _watch(self, sources: Iterable[SourceRule], loop: asyncio.AbstractEventLoop) -> None:
        """Start one watcher per source (replacing any the engine had)."""
        from relay.watcher import SourceWatcher  # importing watchdog: `run --once` need not

        self.e.watchers = []
        for src in sources:
            w = SourceWatcher(src, loop, self.e.evaluator.hint, self._overflowed)
            w.start()
            self.e.watchers.append(w)

    async def _catch_up(self, source: str) -> None:
        """Rescan ``source``, and again while overflows keep coming: a scan that started
        before an overflow may have passed the paths whose events it lost. One pass at a
        time, each after the evaluator has worked through what the previous one found, so
        a producer that keeps overflowing the queue cannot keep relay rescanning instead
        of delivering (and the log gets one line per pass, not one per overflow)."""
        try:
            while self._lost.get(source) and not self.e.stopping.is_set():
                overflows = self._lost.pop(source)
                log.warning("watch_overflow", source=source, overflows=overflows,
                            note="filesystem events were lost; rescanning the source")
                src = next((s for s in self.e.rules.sources if s.name == source), None)
                if src is None:  # removed by a reload meanwhile
                    return
                await self.e.evaluator.scan(src)
                await self.e.until_idle(jobs_too=False)
        finally:
            self._catching_up.discard(source)

    async def _periodic(self) -> None:
        interval = self.e.settings.rescan_interval
        next_scan = time.monotonic() + interval if interval else None
        while not self.e.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.e.stopping.wait(), timeout=5.0)
            self._check_deadlines()
            self._journal_gauges()
            if next_scan is not None and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + interval
                for src in self.e.rules.sources:
                    await self.e.evaluator.scan(src)

    def _check_deadlines(self) -> None:
        now = time.time()
        for row in self.e.journal.files(FileState.WAITING):
            src = self.e.rules.source(row.source)
            deadline = src.ready.deadline
            if deadline and row.waiting_since and now - row.waiting_since > deadline:
                self.e.runner.quarantine(row, self.e.rules.route(row.route or ""),
                                 f"still waiting after {deadline:g}s: {row.reason}")

    def _journal_gauges(self) -> None:
        for state, n in self.e.journal.counts().items():
            METRICS.journal_files.labels(state).set(n)
        with contextlib.suppress(OSError):
            METRICS.journal_bytes.set(os.path.getsize(self.e.journal.path))

    def reload(self) -> None:
        """SIGHUP: load the rules again; an invalid edit is rejected and the old rules stay."""
        try:
            rules = load_rules(self.e.settings.rules)
            problems = environment_problems(rules)
            if problems:
                raise RulesError(problems)
        except RulesError as exc:
            log.error("rules_reload_rejected", error=str(exc), problems=len(exc.problems))
            return
        loop = asyncio.get_running_loop()
        old = self.e.rules
        self.e.rules = rules
        for d in rules.destinations:
            if d.name not in self.e.dests or self.e.dests[d.name].rule != d:
                previous = self.e.dests.get(d.name)
                self.e.dests[d.name] = open_destination(d, self.e.settings.secrets_dir)
                self.e.hops.forget(d.name)
                self.e.spawn(self._swap_destination(self.e.dests[d.name], previous))
        if {s for s in old.sources} != {s for s in rules.sources}:
            for w in self.e.watchers:
                w.stop()
            self._watch(rules.sources, loop)
        for src in rules.sources:
            self.e.spawn(self.e.evaluator.scan(src))
        log.info("rules_reloaded", sources=len(rules.sources),
                 destinations=len(rules.destinations), routes=len(rules.routes))

    async def _swap_destination(self, new: Destination, old: Destination | None) -> None:
        try:
            await new.start()
        except TransferError as exc:
            log.error("destination_unavailable", destination=new.name, error=str(exc))
        if old is not None:
            await old.close()

    async def run(self) -> int:
        """Run until stopped (or, for an engine made for `run --once`, until nothing is
        left to do). Returns the exit code: 0, or 1 if any file failed."""
        loop = asyncio.get_running_loop()
        once = self.e.once
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.e.stop)
        if not once:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        server = None
        if self.e.settings.metrics_addr and not once:
            server = serve(self.e.settings.metrics_addr, loop, self.e.ready)
        for dest in self.e.dests.values():
            try:
                await dest.start()
            except TransferError as exc:
                log.error("destination_unavailable", destination=dest.name, error=str(exc))
        await self.e.recover()
        if not once:
            self._watch(self.e.rules.sources, loop)
        for src in self.e.rules.sources:
            await self.e.evaluator.scan(src)
        log.info("relay_started", sources=len(self.e.rules.sources),
                 destinations=len(self.e.dests), routes=len(self.e.rules.routes), once=once)
        self.e.started = True
        evaluator = loop.create_task(self.e.evaluator.run())
        periodic = loop.create_task(self._periodic()) if not once else None
        if once:
            await self.e.until_idle()
            self.e.stop()
        await self.e.stopping.wait()
        await self._shutdown(evaluator, periodic)
        if server is not None:
            server.shutdown()
        return 1 if self.e.failed else 0

    async def _shutdown(self, *tasks: asyncio.Task[None] | None) -> None:
        for w in self.e.watchers:
            w.stop()
        if self.e.runner.jobs:
            log.info("relay_draining", in_flight=len(self.e.runner.jobs),
                     timeout_s=self.e.settings.shutdown_timeout)
            _, pending = await asyncio.wait(list(self.e.runner.jobs.values()),
                                            timeout=self.e.settings.shutdown_timeout)
            for job in pending:
                job.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
                log.warning("relay_abandoned", in_flight=len(pending),
                            note="journalled; resumed on next start")
        for task in tasks:
            if task is not None:
                task.cancel()
        for dest in self.e.dests.values():
            await dest.close()
        log.info("relay_stopped")
