"""A/B of the small-file path: this checkout against another commit, interleaved.

On a shared VM the same run drifts by 10 to 20% within minutes, so two benchmark runs made
one after the other cannot show a 10% change. This runs ``relay run --once`` over the
same N small files (4 KiB + sha256 sidecar, local → local) alternately with the code of
``--base`` (a git worktree) and with this checkout, in pairs whose order alternates, and
reports each side's median and the median of the per-pair ratios.

    python bench/ab_small.py --base HEAD~3                 # 4,000 files, 4 pairs
    python bench/ab_small.py --base v0.1 --files 10000 --pairs 6 --then delete

Outputs of every run are kept until the end (see bench_local.py: removing 10,000 files
slows the next run on ext4). Prints a table and JSON; saves nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_local import _env, _rules, small_files

REPO = Path(__file__).resolve().parent.parent


def _run(code: Path, work: Path, template: Path, then: str, tag: str) -> float:
    """One `relay run --once` with the relay package of the checkout at ``code``."""
    root = work / tag
    src, out = root / "src", root / "out"
    root.mkdir()
    out.mkdir()
    if then == "keep":
        src = template  # only read: every run shares it
    else:
        shutil.copytree(template, src)  # the post-action removes what it delivered
    # PYTHONPATH: the checkout's relay comes ahead of any installed one
    env = _env(root, _rules(root, src, out, then), PYTHONPATH=str(code))
    os.sync()
    t = time.perf_counter()
    # cwd=root: `-m` puts the working directory first on sys.path, so not this checkout.
    subprocess.run([sys.executable, "-m", "relay.cli", "run", "--once"], env=env, cwd=root,
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git commit to compare against")
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--then", default="keep", choices=["keep", "delete"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-ab-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        base = work / "base-code"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                        str(base), a.base], check=True)
        try:
            template = work / "template"
            small_files(template, a.files)
            times: dict[str, list[float]] = {"base": [], "this": []}
            for i in range(a.pairs):
                order = ["base", "this"] if i % 2 == 0 else ["this", "base"]
                for side in order:
                    code = base if side == "base" else REPO
                    times[side].append(_run(code, work, template, a.then, f"{side}-{i}"))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(base)], check=False)
    ratios = [t / b for t, b in zip(times["this"], times["base"], strict=True)]
    result = {
        "base": a.base, "files": a.files, "pairs": a.pairs, "then": a.then,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "files_per_s_median": {k: round(a.files / statistics.median(v), 1)
                               for k, v in times.items()},
        "ratio_this_to_base_per_pair": [round(r, 3) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 3),
    }
    for side in ("base", "this"):
        print(f"{side:>5}: {result['files_per_s_median'][side]:>8} files/s  "
              f"(runs {result['seconds'][side]} s)")
    print(f"this / base, time per pair: {result['ratio_this_to_base_per_pair']} "
          f"→ median {result['ratio_median']}")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
