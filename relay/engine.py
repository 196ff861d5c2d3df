"""The engine: the evaluator (:mod:`relay.evaluation`: hints → evidence → verdicts) and the
job runner (:mod:`relay.jobs`: READY files → deliveries → post-action) wired together
over one journal and one set of destinations, and what the daemon asks of them as a whole:
recovery after a crash, "is there anything left to do", readiness, stop.

One asyncio loop owns the journal; the evaluator hands READY files to the runner, the
runner hands files whose evidence changed meanwhile back to the evaluator.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from relay.config import Settings
from relay.destinations import open_destination
from relay.destinations.base import Destination
from relay.errors import TransferError
from relay.evaluation import Evaluator
from relay.hops import Hops
from relay.jobs import JOB_STATES, JobRunner
from relay.journal import Journal
from relay.logs import get_logger
from relay.rules import Rules
from relay.states import DeliveryState

if TYPE_CHECKING:  # watchdog is imported only where watchers start (not in `run --once`)
    from relay.watcher import SourceWatcher

__all__ = ["Engine"]

log = get_logger()
_SETTLE_GUARD_S = 1.0  # until_idle re-checks at least this often, whatever it is told


class Engine:
    """The evaluator and the job runner over one journal and one set of destinations."""

    def __init__(self, settings: Settings, rules: Rules, journal: Journal,
                 once: bool = False) -> None:
        """``once``: `relay run --once` — a delivery that must wait for a retry counts as
        a failure of the run (its exit code), since no retry will come in this process."""
        self.once = once
        self.settings = settings
        self._rules = rules
        self.journal = journal
        self.dests: dict[str, Destination] = {
            d.name: open_destination(d, settings.secrets_dir) for d in rules.destinations}
        self.hops = Hops()  # where the destinations' blocking work runs
        self.watchers: list[SourceWatcher] = []
        self.stopping = asyncio.Event()
        # Set whenever a job ends or an evaluation pass ends: what waits for relay to have
        # nothing left to do (`run --once`, an overflow catch-up) re-checks then.
        self.settled = asyncio.Event()
        self.started = False
        self._bg: set[asyncio.Task[None]] = set()
        self.runner = JobRunner(settings, rules, journal, self.dests, self.hops, self.settled,
                                revisit=self._revisit, forget=self._forget, once=once)
        self.evaluator = Evaluator(rules, journal, self.runner, self.settled, self.spawn)

    def _revisit(self, key: tuple[str, str, str]) -> None:
        self.evaluator.look_again(key)

    def _forget(self, source: str, rel: str) -> None:
        self.evaluator.forget(source, rel)

    @property
    def rules(self) -> Rules:
        return self._rules

    @rules.setter
    def rules(self, rules: Rules) -> None:
        """A reload: both sides work by the new rules from their next step."""
        self._rules = self.evaluator.rules = self.runner.rules = rules

    @property
    def failed(self) -> int:
        return self.runner.failed

    def idle(self, jobs_too: bool = True) -> bool:
        """Nothing to evaluate (and, with ``jobs_too``, nothing delivering or waiting to)."""
        return self.evaluator.idle and (not jobs_too or self.runner.idle)

    async def until_idle(self, jobs_too: bool = True) -> None:
        """Return once :meth:`idle` (or relay is stopping). Woken by :attr:`settled`; the
        timeout only guards against a state change that forgot to set it."""
        while not self.idle(jobs_too) and not self.stopping.is_set():
            self.settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.settled.wait(), _SETTLE_GUARD_S)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background coroutine, keeping a reference so it is not collected."""
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # -- lifecycle -----------------------------------------------------------------------

    async def recover(self) -> None:
        """After a crash: sweep partial temporaries, then resume unfinished jobs."""
        for d in self.journal.deliveries(None, DeliveryState.STAGING):
            dest = self.dests.get(d.destination)
            if dest is None:
                continue
            if d.tmp and not dest.abilities.resumable:
                try:
                    await dest.discard(d.tmp)
                    log.info("temp_swept", destination=d.destination, tmp=d.tmp)
                except TransferError as exc:
                    log.warning("temp_sweep_failed", destination=d.destination, tmp=d.tmp,
                                error=str(exc))
                self.journal.update_delivery(d.id, state=DeliveryState.PENDING, acked=0)
            else:
                self.journal.update_delivery(d.id, state=DeliveryState.PENDING)
        for row in self.journal.files(*JOB_STATES):
            self.runner.start(row.id)

    def ready(self) -> tuple[bool, str]:
        if not self.started:
            return False, "starting"
        dead = [w.source.name for w in self.watchers if not w.alive]
        if dead:
            return False, f"watcher stopped: {', '.join(dead)}"
        return True, "ready"

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("relay_stopping")
            self.stopping.set()
            self.evaluator.stop()
            self.runner.stop()
