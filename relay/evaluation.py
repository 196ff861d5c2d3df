"""Hints → evaluation: which paths to look at again, what their evidence says, and the
journal's record of each decision.

Filesystem hints only mark a path *dirty*; one evaluator task (:meth:`Evaluator.run`)
re-reads the evidence (:mod:`relay.readiness`) and records the verdict. A READY file is
handed to the job side through the small :class:`JobControl` interface; the engine wires
the two together.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol

from relay.journal import FileRow, Journal
from relay.logs import get_logger
from relay.metrics import METRICS
from relay.paths import compile_glob
from relay.readiness import Evidence, classify, gather, gather_batch
from relay.rules import Route, Rules, SourceRule
from relay.states import FileState, Verdict

__all__ = ["Evaluator", "JobControl", "Key", "is_ignored", "scan"]

log = get_logger()
Key = tuple[str, str, str]  # (source, kind "file"|"batch", rel)
_EVAL_BATCH = 32  # single files whose evidence one worker-thread hop reads
# A file gone from the source in one of these is forgotten (nothing was sent yet, or it can
# never be): its row goes.
_FORGETTABLE = (FileState.SEEN, FileState.WAITING, FileState.QUARANTINED)


def is_ignored(src: SourceRule, rel: str) -> bool:
    return any(compile_glob(g).match(rel) for g in src.ignore)


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


class JobControl(Protocol):
    """What the evaluator asks of the side that runs jobs."""

    def start(self, file_id: int) -> None:
        """Deliver this READY (or unfinished) file: now, or when a slot is free."""

    def busy(self, file_id: int) -> bool:
        """Is a job for this file running or queued?"""

    def defer(self, file_id: int, key: Key) -> None:
        """Look at ``key`` again when the file's job has ended."""


class Evaluator:
    """Hints → evidence → the journal's verdict, one evaluation at a time."""

    def __init__(self, rules: Rules, journal: Journal, jobs: JobControl,
                 settled: asyncio.Event, spawn: Callable[[Coroutine[Any, Any, None]], None]
                 ) -> None:
        self.rules = rules      # replaced as a whole when the rules are reloaded
        self.journal = journal
        self.jobs = jobs
        self.settled = settled  # set whenever an evaluation pass ends
        self.spawn = spawn      # runs a background coroutine (a folder's scan)
        self.dirty: dict[Key, None] = {}  # what to look at again, in order
        self.evaluating = False
        # The order the watcher saw payloads and markers change in (see _marker_stale).
        self.seq = 0
        self.payload_seq: dict[tuple[str, str], int] = {}
        self.marker_seq: dict[tuple[str, str], int] = {}
        # payloads whose last event was their creation, with no write seen since
        self.only_created: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._gathered_at = 0.0
        self._last_reason: dict[int, str] = {}

    @property
    def idle(self) -> bool:
        """Nothing to look at and nothing being looked at."""
        return not self.dirty and not self.evaluating

    def look_again(self, key: Key) -> None:
        """Evaluate ``key`` again (its job has ended, or the evidence was stale)."""
        if not self._stopping:
            self.dirty[key] = None
            self._wake.set()

    def forget(self, source: str, rel: str) -> None:
        """A file is done: the event order seen for it no longer matters."""
        self.payload_seq.pop((source, rel), None)
        self.marker_seq.pop((source, rel), None)
        self.only_created.discard((source, rel))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    # -- hints ---------------------------------------------------------------------------

    def hint(self, source: str, rel: str, kind: str, from_event: bool = True,
             marked: dict[str, bool] | None = None) -> None:
        """Something happened at ``rel``: look at whatever it speaks for again.
        ``marked``: folders already checked for a directory marker in this turn of the
        loop (a scan passes one for all its files)."""
        src = self.rules.source(source)
        if kind == "dir":
            self.spawn(self.scan(src, rel))
            return
        if is_ignored(src, rel):
            return
        what, target = classify(rel, src.ready)
        # The order of events tells whether an empty marker was written after its payload's
        # last change. For a marker, being created is being written. A payload's "created"
        # alone says less: for a folder made a moment ago, the watcher reports what it finds
        # inside as "created" in listing order (a marker listed before its payload), after
        # the fact. So a payload whose only event after its marker is its creation is
        # judged by the mtimes (see _marker_stale); its writes, truncations and renames
        # ("file") count in event order.
        if from_event and kind in ("file", "created"):
            self.seq += 1
            if what == "payload":
                self.payload_seq[(source, target)] = self.seq
                if kind == "created":
                    self.only_created.add((source, target))
                else:
                    self.only_created.discard((source, target))
            elif what == "marker":
                self.marker_seq[(source, target)] = self.seq
        if what in ("dirmarker", "manifest"):
            key: Key = (source, "batch", target)
        else:
            batch_dir = self._batch_dir(src, target, marked)
            key = (source, "batch", batch_dir) if batch_dir is not None else (source, "file",
                                                                              target)
        self.dirty[key] = None
        METRICS.queue_depth.set(len(self.dirty))
        self._wake.set()

    def _batch_dir(self, src: SourceRule, rel: str,
                   marked: dict[str, bool] | None = None) -> str | None:
        marker = src.ready.directory_marker
        if not marker:
            return None
        parts = rel.split("/")[:-1]
        while True:
            d = "/".join(parts)
            has = marked.get(d) if marked is not None else None
            if has is None:
                has = os.path.lexists(src.path / d / marker if d else src.path / marker)
                if marked is not None:
                    marked[d] = has
            if has:
                return d or "."
            if not parts:
                return None
            parts.pop()

    def _marker_stale(self, source: str, rel: str) -> bool | None:
        """Did the watcher see the payload change after the marker was last written?
        None when it saw neither (e.g. both were there at start-up), or when all it saw of
        the payload after the marker is its creation (the mtimes tell: a payload created
        after its marker and written later is newer; one listed after its marker in a new
        folder is not)."""
        p = self.payload_seq.get((source, rel))
        m = self.marker_seq.get((source, rel))
        if p is None and m is None:
            return None
        if p is not None and (source, rel) in self.only_created and p > (m or -1):
            return None
        return (p or -1) > (m or -1)

    def forget_event_order(self, source: str) -> None:
        """Events of ``source`` were lost: the order we saw is incomplete (a marker's own
        event may be among the lost ones), so judge its markers by mtimes again."""
        for seqs in (self.payload_seq, self.marker_seq):
            for key in [k for k in seqs if k[0] == source]:
                del seqs[key]
        self.only_created = {k for k in self.only_created if k[0] != source}

    async def scan(self, src: SourceRule, below: str = "") -> None:
        """Hint every file of ``src`` (below ``below``), as a start-up scan does."""
        try:
            rels = await asyncio.to_thread(lambda: list(scan(src.path, src.recursive, below)))
        except OSError as exc:
            log.error("source_scan_failed", source=src.name, error=str(exc))
            return
        # Without an await in between, a folder's marker is looked for once, not once
        # per file and per ancestor (an lstat on the loop each: 4 per file at start-up).
        marked: dict[str, bool] = {}
        for rel in rels:
            self.hint(src.name, rel, "file", from_event=False, marked=marked)

    # -- evaluation ----------------------------------------------------------------------

    async def run(self) -> None:
        """The evaluator task: evaluate what is dirty, until stopped."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            while self.dirty and not self._stopping:
                key = next(iter(self.dirty))
                del self.dirty[key]
                if key[1] == "file":
                    # Take the next single files too: their evidence is read in one
                    # worker-thread hop (see evaluate_files).
                    keys = [key]
                    for k in self.dirty:
                        if len(keys) >= _EVAL_BATCH:
                            break
                        if k[1] == "file":
                            keys.append(k)
                    for k in keys[1:]:
                        del self.dirty[k]
                METRICS.queue_depth.set(len(self.dirty))
                self.evaluating = True
                try:
                    if key[1] == "file":
                        await self.evaluate_files(keys)
                    else:
                        await self.evaluate(key)
                except Exception as exc:  # one bad file must never stop the engine
                    log.exception("evaluation_failed", file=key[2], error=str(exc))
                finally:
                    self.evaluating = False
                    self.settled.set()

    async def evaluate_files(self, keys: list[Key]) -> None:
        """:meth:`evaluate` for single files, their evidence gathered in one worker-thread
        hop instead of one each. Each decision is the same as evaluate() would record:
        ``_gathered_at`` is taken before any of them is read, so the "evidence is stale"
        check in _apply only gets more careful, and the decisions are applied one after
        the other on the loop, with no await in between (no job moves meanwhile)."""
        if len(keys) == 1:
            await self.evaluate(keys[0])
            return
        self._gathered_at = time.time()
        todo = []
        for key in keys:
            source, _, rel = key
            try:
                route = self.rules.match(source, rel)
                src = self.rules.source(source)
            except Exception as exc:  # e.g. a source gone with a reload: this file only
                log.exception("evaluation_failed", file=rel, error=str(exc))
                continue
            if route is None:
                log.debug("file_unrouted", file=rel, source=source)
                continue
            todo.append((key, src, route, self._marker_stale(source, rel)))

        def gather_all() -> list[Evidence | Exception]:
            out: list[Evidence | Exception] = []
            for (_, _, rel), src, _, stale in todo:
                try:
                    out.append(gather(src.path, rel, src.ready, stale))
                except Exception as exc:  # reported per file below, as evaluate() would
                    out.append(exc)
            return out

        evidence = await asyncio.to_thread(gather_all)
        # The rows of all of them in one statement per source, read after the last await:
        # nothing else runs until every decision below is applied, so each is exactly the
        # row _apply would have read itself.
        rows: dict[str, dict[str, FileRow]] = {}
        for name in {src.name for _, src, _, _ in todo}:
            rows[name] = self.journal.get_files(
                name, [key[2] for key, src, _, _ in todo if src.name == name])
        for (key, src, route, _), ev in zip(todo, evidence, strict=True):
            if isinstance(ev, Exception):
                log.error("evaluation_failed", file=key[2], error=str(ev))
                continue
            try:
                self._apply(src, route, key, ev, rows[src.name].get(key[2]))
            except Exception as exc:  # one bad file must never stop the others
                log.exception("evaluation_failed", file=key[2], error=str(exc))

    async def evaluate(self, key: Key) -> None:
        source, kind, rel = key
        src = self.rules.source(source)
        self._gathered_at = time.time()
        if kind == "file":
            route = self.rules.match(source, rel)
            if route is None:
                log.debug("file_unrouted", file=rel, source=source)
                return
            ev = await asyncio.to_thread(gather, src.path, rel, src.ready,
                                         self._marker_stale(source, rel))
            self._apply(src, route, key, ev, self.journal.get_file(source, rel, kind))
            return
        bev = await asyncio.to_thread(gather_batch, src.path, rel, src.ready,
                                      lambda r: is_ignored(src, r))
        routes = {self.rules.match(source, m) for m in bev.members}
        routes.discard(None)
        if len(routes) > 1:
            bev.verdict, bev.reason = Verdict.INVALID, "batch members match different routes"
        route = next(iter(routes)) if routes else self.rules.match(
            source, f"{rel}/{src.ready.directory_marker}")
        if route is None:
            log.debug("batch_unrouted", file=rel, source=source)
            return
        ev = Evidence(rel, bev.verdict, bev.reason, fingerprint=bev.fingerprint,
                      evidence_file=f"{rel}/{src.ready.directory_marker}")
        self._apply(src, route, key, ev, self.journal.get_file(source, rel, kind))

    def _write(self, row: FileRow | None, key: Key, source: str, **fields: Any) -> int:
        """Record a verdict: update ``row``, or insert the file with it. Its id."""
        if row is not None:
            self.journal.update_file(row.id, **fields)
            return row.id
        _, kind, rel = key
        return self.journal.upsert_file(source, rel, kind, **fields).id

    def _apply(self, src: SourceRule, route: Route, key: Key, ev: Evidence,
               row: FileRow | None) -> None:
        """Record what ``ev`` says of a file. ``row``: the file's journal row (None: there
        is none), read after the caller's last await, so nothing has moved it since."""
        if ev.verdict == Verdict.GONE:
            self._gone(src, key, ev, row)
            return
        if row is None:
            # Inserted below with its first verdict: one write, not 'seen' then another.
            METRICS.files_seen.labels(route.name).inc()
            log.info("file_seen", file=key[2], source=src.name, route=route.name, kind=key[1])
        elif self.jobs.busy(row.id):
            self.jobs.defer(row.id, key)  # look again when the running job ends
            return
        elif row.updated_at > self._gathered_at:
            # A job moved this file on while we were reading: the evidence is stale.
            self.look_again(key)
            return
        else:
            known = self._for_known(src, route, key, ev, row)
            if known is None:
                return
            row = known
        if ev.verdict in (Verdict.WAITING, Verdict.INVALID):
            self._waiting(src, route, key, ev, row)
        else:
            self._ready(src, route, key, ev, row)

    def _gone(self, src: SourceRule, key: Key, ev: Evidence, row: FileRow | None) -> None:
        """The payload (or batch) is no longer there: forget a file nothing was done for."""
        if row is not None and row.state in _FORGETTABLE and not self.jobs.busy(row.id):
            self.journal.delete_file(row.id)
            log.info("file_forgotten", file=key[2], source=src.name, reason=ev.reason)

    def _for_known(self, src: SourceRule, route: Route, key: Key, ev: Evidence,
                   row: FileRow) -> FileRow | None:
        """What a file's state makes of new evidence: the row to record it on, or None
        when there is nothing to record."""
        if row.fingerprint == ev.fingerprint and row.state != FileState.SEEN:
            # Nothing changed since the last verdict; a file on its way goes on.
            if row.state in (FileState.READY, FileState.DELIVERING, FileState.DELIVERED):
                self.jobs.start(row.id)
            return None
        match row.state:
            case FileState.DONE if ev.verdict != Verdict.READY:
                # Signals or payload going away (our own post-action, a consumer tidying
                # up) is not new content. Only a new, valid signal starts a generation.
                return None
            case FileState.DONE | FileState.FAILED | FileState.QUARANTINED:
                return self._new_generation(src, route, key, row)
            case FileState.DELIVERING | FileState.DELIVERED:
                # Past the point of no return: the job finishes what the journal says.
                self.jobs.start(row.id)
                return None
            case _:  # seen, waiting, ready: the new evidence replaces the old
                return row

    def _new_generation(self, src: SourceRule, route: Route, key: Key,
                        row: FileRow) -> FileRow:
        """New content under a name relay has finished with: it starts over as seen."""
        self.journal.new_generation(row.id, state=FileState.SEEN, route=route.name,
                                    sha256=None, size=None, reason=None,
                                    waiting_since=None, ready_at=None)
        log.info("file_changed", file=key[2], source=src.name, route=route.name,
                 previous_state=row.state)
        return self.journal.file_by_id(row.id) or row

    def _waiting(self, src: SourceRule, route: Route, key: Key, ev: Evidence,
                 row: FileRow | None) -> None:
        """Not ready (yet), or invalid evidence: record why, log it when the reason is new."""
        file_id = self._write(row, key, src.name, state=FileState.WAITING, reason=ev.reason,
                              fingerprint=ev.fingerprint, signal=ev.evidence_file, route=route.name,
                              waiting_since=(row.waiting_since if row else None) or time.time())
        if self._last_reason.get(file_id) != ev.reason:
            self._last_reason[file_id] = ev.reason
            log.info("file_waiting", file=key[2], source=src.name, route=route.name,
                     reason=ev.reason, invalid=ev.verdict == Verdict.INVALID)

    def _ready(self, src: SourceRule, route: Route, key: Key, ev: Evidence,
               row: FileRow | None) -> None:
        """Ready: record the evidence (the declared digest the copy must match) and start
        its job."""
        declared = ev.declared
        file_id = self._write(row, key, src.name, state=FileState.READY, reason=ev.reason,
                              fingerprint=ev.fingerprint, signal=ev.evidence_file, route=route.name,
                              ready_at=time.time(),
                              declared_algo=declared.algo if declared else None,
                              declared_digest=declared.hexdigest if declared else None)
        self._last_reason.pop(file_id, None)
        METRICS.files_ready.labels(route.name).inc()
        log.info("file_ready", file=key[2], source=src.name, route=route.name,
                 signal=ev.evidence_file, declared=declared.hexdigest if declared else None)
        self.jobs.start(file_id)
