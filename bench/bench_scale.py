"""Scale and memory: relay started on a landing zone that already holds many files, and
relay's peak memory on a very large file.

Scenarios:
  backlog  N files of 4 KiB with sidecars already waiting when `relay run --once` starts:
           time to the first delivery, to the last, and peak RSS of the relay process.
  big      one sparse file of G GiB (with its sidecar) delivered local → local: peak RSS.

    python bench/bench_scale.py                  # 100,000 files, 4 GiB
    python bench/bench_scale.py --files 20000    # a smaller backlog
    python bench/bench_scale.py --quick          # seconds-long smoke run (used by the tests)

Peak RSS is the kernel's own figure for the finished child (``wait4`` → ``ru_maxrss``), so
nothing is sampled and nothing is missed. Prints a table and JSON; writes
bench/results/scale-<date>.json unless --no-save or --quick (then `python bench/report.py
--write` refreshes docs/performance.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_local import _env, _rules, machine  # noqa: E402
from results_file import save  # noqa: E402


def _run_measured(root: Path, rules: Path, **extra: str) -> tuple[float, int, Path]:
    """`relay run --once` with JSON logs at info level to a file; (seconds, peak RSS in
    bytes, log path)."""
    log = root / "relay.log"
    env = _env(root, rules, RELAY_LOG_LEVEL="info", RELAY_LOG_FORMAT="json", **extra)
    t = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "run", "--once"],
                                env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"relay exited {proc.returncode}; see {log}")
    return elapsed, usage.ru_maxrss * 1024, log


def _event_times(log: Path, event: str) -> list[float]:
    out = []
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            if f'"{event}"' in line:
                ts = json.loads(line)["timestamp"]
                out.append(dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
    return out


def backlog(work: Path, files: int) -> dict[str, object]:
    src, out = work / "backlog-in", work / "backlog-out"
    src.mkdir()
    out.mkdir()
    payload = os.urandom(4096)
    line = f"{hashlib.sha256(payload).hexdigest()}  "
    for i in range(files):
        d = src / f"d{i % 100:02d}"
        if i < 100:
            d.mkdir()
        (d / f"f{i}.csv").write_bytes(payload)
        (d / f"f{i}.csv.sha256").write_text(f"{line}f{i}.csv\n")
    rules = _rules(work, src, out)
    start = time.time()
    # RELAY_CONCURRENCY as shipped: the figure is for the defaults an operator gets.
    elapsed, rss, log = _run_measured(work, rules)
    delivered = _event_times(log, "file_delivered")
    if len(delivered) != files:
        raise SystemExit(f"backlog: {len(delivered)} of {files} delivered; see {log}")
    return {"files": files, "total_s": round(elapsed, 2),
            "first_delivery_s": round(min(delivered) - start, 2),
            "last_delivery_s": round(max(delivered) - start, 2),
            "files_per_s": round(files / elapsed, 1),
            "peak_rss_mib": round(rss / 2**20, 1)}


def big(work: Path, gib: float) -> dict[str, object]:
    src, out = work / "big-in", work / "big-out"
    src.mkdir()
    out.mkdir()
    size = int(gib * 2**30)
    p = src / "big.bin"
    with open(p, "wb") as f:  # sparse, with data at both ends and past 4 GiB
        f.write(os.urandom(1 << 20))
        f.truncate(size)
        f.seek(size - (1 << 20))
        f.write(os.urandom(1 << 20))
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    (src / "big.bin.sha256").write_text(f"{h.hexdigest()}  big.bin\n")
    rules = _rules(work, src, out)
    elapsed, rss, _ = _run_measured(work, rules)
    if (out / "big.bin").stat().st_size != size:
        raise SystemExit("big: delivered size differs")
    os.unlink(out / "big.bin")  # do not keep GiBs around
    return {"size_gib": gib, "total_s": round(elapsed, 2),
            "mb_s": round(size / elapsed / 1e6, 1), "peak_rss_mib": round(rss / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        a.files, a.gib = 300, 0.01
    with tempfile.TemporaryDirectory(prefix="relay-scale-",
                                     dir=a.workdir or Path("/var/tmp")) as tmp:
        work = Path(tmp)
        (work / "b").mkdir()
        (work / "g").mkdir()
        result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "machine": machine(), "loadavg_at_start": os.getloadavg(),
                  "backlog": backlog(work / "b", a.files), "big": big(work / "g", a.gib)}
    b, g = result["backlog"], result["big"]
    assert isinstance(b, dict) and isinstance(g, dict)
    print(f"\n{'scenario':<48} {'result':>20}")
    print(f"{'backlog ' + str(b['files']) + ' files: first delivery':<48} "
          f"{b['first_delivery_s']:>18} s")
    print(f"{'backlog: last delivery':<48} {b['last_delivery_s']:>18} s")
    print(f"{'backlog: throughput':<48} {b['files_per_s']:>12} files/s")
    print(f"{'backlog: peak RSS':<48} {b['peak_rss_mib']:>16} MiB")
    print(f"{'big ' + str(g['size_gib']) + ' GiB sparse: time':<48} {g['total_s']:>18} s")
    print(f"{'big: peak RSS':<48} {g['peak_rss_mib']:>16} MiB")
    print(json.dumps(result, indent=2))
    if not a.no_save and not a.quick:
        path = save("scale", result)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
