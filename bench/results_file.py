"""Where a benchmark saves its JSON: ``bench/results/<name>-<date>.json``, or with ``-2``,
``-3``… when a run of the same day is already there (results are committed: a second run
must never overwrite the first). ``<name>`` is the bench (``local``, ``scale``, ``sftp``);
bench_local.py adds the scenarios it ran when it ran only some (``local-small-latency``).

Each result also records the command line that produced it and the commit of the code it
measured (``-dirty`` when the checkout had changes), so bench/report.py can say how to
reproduce it."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _command() -> str:
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f".venv/bin/python bench/{Path(sys.argv[0]).name} {args}".rstrip()


def _commit() -> str | None:
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *args],
                              capture_output=True, text=True)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None  # not a git checkout (an unpacked release): nothing to record
        dirty = git("diff", "--quiet", "HEAD", "--").returncode != 0
    except OSError:
        return None  # no git
    return head.stdout.strip() + ("-dirty" if dirty else "")


def save(name: str, result: Mapping[str, Any]) -> Path:
    stem = f"{name}-{dt.date.today().isoformat()}"
    path, n = RESULTS / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = RESULTS / f"{stem}-{n}.json"
    record = {"command": _command(), **({"commit": c} if (c := _commit()) else {}), **result}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
