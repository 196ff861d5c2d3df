"""Read-only views of the journal for operators: ``status``, ``explain``; and ``retry``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from relay.config import Settings
from relay.evaluation import is_ignored
from relay.hashing import hash_file
from relay.journal import Journal
from relay.progressbar import ProgressBar
from relay.readiness import classify, gather
from relay.rules import Rules
from relay.states import DeliveryState, FileState

__all__ = ["explain", "retry", "status"]


def _open(settings: Settings) -> Journal:
    return Journal(settings.journal, settings.journal_sync)


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def status(settings: Settings, as_json: bool = False, limit: int = 20) -> int:
    j = _open(settings)
    try:
        data: dict[str, Any] = {"files": j.counts(), "deliveries": j.delivery_counts(),
                                "delivered_total": j.history_count(), "lists": {}}
        for state in (FileState.WAITING, FileState.READY, FileState.DELIVERING, FileState.FAILED,
                      FileState.QUARANTINED):
            rows = j.files(state)[:limit]
            items = []
            for r in rows:
                ds = [d for d in j.deliveries(r.id) if d.state != DeliveryState.DELIVERED]
                items.append({
                    "file": r.rel, "source": r.source, "route": r.route, "kind": r.kind,
                    "reason": r.reason, "since": r.waiting_since or r.updated_at,
                    "deliveries": [{"destination": d.destination, "state": d.state,
                                    "attempt": d.attempts, "next_try_at": d.next_try_at,
                                    "acked": d.acked, "size": d.size,
                                    "percent": _percent(d.acked, d.size)
                                    if d.state == DeliveryState.STAGING else None,
                                    "error": d.last_error} for d in ds],
                })
            data["lists"][state] = items
    finally:
        j.close()
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    counts = data["files"]
    print("files: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    print(f"delivered (all time): {data['delivered_total']}")
    for state, items in data["lists"].items():
        if not items:
            continue
        print(f"\n{state}:")
        for it in items:
            print(f"  {it['source']}:{it['file']}  ({_age(it['since'])})  {it['reason'] or ''}")
            for d in it["deliveries"]:
                nxt = (f", next try in {max(0, d['next_try_at'] - time.time()):.0f}s"
                       if d["next_try_at"] else "")
                moved = (f", {d['acked']:,} of {d['size']:,} bytes ({d['percent']}%)"
                         if d["percent"] is not None else
                         f", acked {d['acked']}" if d["acked"] else "")
                print(f"    → {d['destination']}: {d['state']} attempt {d['attempt']}"
                      f"{nxt}{moved}"
                      f"{'  ' + d['error'] if d['error'] else ''}")
    return 0


def _percent(acked: int, size: int | None) -> float | None:
    return round(100 * acked / size, 1) if size else None


def _locate(rules: Rules, path: str) -> tuple[str, str] | None:
    p = Path(path)
    if p.is_absolute() or p.exists():
        full = p.absolute()
        for s in rules.sources:
            root = s.path.absolute()
            if full == root or root in full.parents:
                return s.name, full.relative_to(root).as_posix()
        return None
    if len(rules.sources) == 1:
        return rules.sources[0].name, path
    return None


def explain(settings: Settings, rules: Rules, path: str, do_hash: bool = False) -> int:
    loc = _locate(rules, path)
    if loc is None:
        print(f"{path}: not inside any source ({', '.join(str(s.path) for s in rules.sources)})")
        return 1
    source, rel = loc
    src = rules.source(source)
    kind_, payload = classify(rel, src.ready)
    print(f"file:     {payload}  (source {source}, {src.path})")
    if kind_ != "payload":
        print(f"note:     {rel} is a {kind_} signal; explaining the payload it speaks for")
    if is_ignored(src, payload):
        print(f"ignored:  matches the source's ignore globs {list(src.ignore)}")
        return 0
    route = rules.match(source, payload)
    if route is None:
        print(f"route:    none — no route of source {source} matches; it will never be sent")
        return 0
    print(f"route:    {route.name} → {', '.join(route.to)} (path {route.path!r}, "
          f"signal {route.signal}, then {route.then})")
    ev = gather(src.path, payload, src.ready)
    print(f"evidence: {ev.verdict} — {ev.reason}")
    if ev.declared:
        print(f"declared: {ev.declared.algo} {ev.declared.hexdigest} "
              f"(from {ev.declared.evidence_file})")
        if do_hash and (src.path / payload).is_file():
            full = src.path / payload
            bar = ProgressBar(full.stat().st_size, f"hashing {payload}")
            try:
                computed = hash_file(str(full), (ev.declared.algo,),
                                     progress=bar.update)[ev.declared.algo]
            finally:
                bar.close()
            verdict = "MATCH" if computed == ev.declared.hexdigest else "MISMATCH"
            print(f"computed: {ev.declared.algo} {computed} → {verdict}")
    for n in ev.notes:
        print(f"note:     {n}")
    j = _open(settings)
    try:
        row = j.get_file(source, payload)
        if row is None:
            print("journal:  no record yet (relay has not seen it, or it is still unrouted)")
            return 0
        print(f"journal:  {row.state}" + (f" — {row.reason}" if row.reason else "")
              + f" (generation {row.generation}, first seen {_age(row.first_seen)} ago)")
        if row.sha256:
            print(f"content:  sha256 {row.sha256}, {row.size} bytes")
        for d in j.deliveries(row.id):
            extra = f", last error: {d.last_error}" if d.last_error else ""
            print(f"  → {d.destination}: {d.state} as {d.target} (attempt {d.attempts}{extra})")
    finally:
        j.close()
    return 0


def retry(settings: Settings, paths: list[str]) -> int:
    j = _open(settings)
    n = 0
    try:
        for row in j.files(FileState.FAILED, FileState.QUARANTINED):
            if paths and row.rel not in paths:
                continue
            j.requeue(row.id, "re-queued by relay retry")
            n += 1
    finally:
        j.close()
    print(f"re-queued {n} file(s); a running relay picks them up on its next rescan")
    return 0
