"""Where a benchmark saves its JSON: ``bench/results/<name>-<date>.json``, or with ``-2``,
``-3``… when a run of the same day is already there (results are committed: a second run
must never overwrite the first)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, result: Mapping[str, Any]) -> Path:
    stem = f"{name}-{dt.date.today().isoformat()}"
    path, n = RESULTS / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = RESULTS / f"{stem}-{n}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
