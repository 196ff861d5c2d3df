"""The tables of docs/performance.md and the README's summary, rendered from bench/results.

Each scenario's table comes from the newest result file (by the date its bench recorded)
that holds the scenario, so the documents follow a rerun without hand edits:

    python bench/report.py            # print every scenario's block (Markdown)
    python bench/report.py --write    # refresh the generated blocks of the documents
    python bench/report.py --check    # exit 1 if a generated block is out of date

A generated block sits between ``<!-- report:KEY -->`` and ``<!-- /report:KEY -->`` in
docs/performance.md or README.md; what lies outside the markers is prose, left alone.
"""

# The documents write ratios with a multiplication sign and "none" as an en dash: so does
# this file, which renders them.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCUMENTS = (ROOT / "docs" / "performance.md", ROOT / "README.md")
PY = ".venv/bin/python"
GIB = 1 << 30

# <bench>[-<scenarios>]-<date>[-n].json, as bench/results_file.py names them
_NAME = re.compile(r"(?P<bench>[a-z]+)(?:-[a-z0-9]+)*?-\d{4}-\d{2}-\d{2}(?:-\d+)?\.json")
_BLOCK = re.compile(r"(<!-- report:(?P<key>[a-z0-9-]+) -->\n)(.*?)(<!-- /report:(?P=key) -->)",
                    re.S)


@dataclass(frozen=True)
class Result:
    """One result file: which bench wrote it, and what it recorded."""

    name: str
    bench: str
    data: dict[str, Any]

    @property
    def date(self) -> str:
        return str(self.data.get("date", ""))


def load(results: Path = RESULTS) -> list[Result]:
    """Every result file in ``results`` whose name says which bench wrote it."""
    out = []
    for path in sorted(results.glob("*.json")):
        m = _NAME.fullmatch(path.name)
        if m:
            out.append(Result(path.name, m["bench"], json.loads(path.read_text())))
    return out


# -- formatting ------------------------------------------------------------------------

def _x(v: float) -> str:
    return f"{v:.2f}×"


def _s(v: float) -> str:
    return f"{v:.2f} s"


def _n(v: float) -> str:
    return f"{v:,.0f}"


def _ms(v: float) -> str:
    return f"{v:.2f} ms"


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n % GIB == 0 else f"{n >> 20} MiB"


def _rounds(n: int) -> str:
    return "1 round" if n == 1 else f"{n} rounds"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """A Markdown table; ``align`` has an ``l`` or ``r`` per column (default: the first
    column left, the others, numbers, right)."""
    align = align or "l" + "r" * (len(head) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [head, rule, *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def _verdict(value: float, op: str, goal: float) -> str:
    """"met" or "not met", judged on the value as the tables print it (2 decimals)."""
    value = round(value, 2)
    ok = value <= goal if op == "≤" else value >= goal
    return "met" if ok else "not met"


def _machine(r: Result) -> str:
    m = r.data.get("machine", {})
    parts = [f"{m.get('cores', '?')} cores ({m.get('cpu', '?')})", f"Linux {m.get('kernel', '?')}",
             f"Python {m.get('python', '?')}"]
    if "openssh" in m:
        parts.append(str(m["openssh"]))
    return ", ".join(parts)


def _load_at_start(r: Result) -> float | None:
    d = r.data
    for la in (d.get("loadavg_before"), d.get("loadavg_at_start"),
               d.get("machine", {}).get("loadavg_at_start")):
        if la:
            return float(la[0])
    return None


def _run(r: Result, command: str) -> str:
    """Where a table's numbers come from: the file, when, on what, and how to rerun it."""
    when = r.date[:16].replace("T", " ") + " UTC"
    load = _load_at_start(r)
    extra = "" if load is None else f", load average {load:.2f} at the start"
    if "commit" in r.data:
        extra += f", code at `{r.data['commit']}`"
    lines = [f"Result: `bench/results/{r.name}`, {when}{extra}", f"Machine: {_machine(r)}"]
    if "note" in r.data:
        lines.append(f"Recorded with the run: {r.data['note']}")
    lines.append(f"Reproduce: `{r.data.get('command', command)}`")
    return "".join(f"- {line}\n" for line in lines) + "\n"


# -- local → local (bench_local.py) -----------------------------------------------------

_LOCAL = {"relay": "`relay run --once` (whole process)",
          "relay daemon": "relay daemon (sidecar written → downstream sidecar written)",
          "openssl+cp+sync": "`openssl dgst -sha256` + `cp` + `sync`",
          "cp+sync": "`cp` + `sync`"}
_LOCAL_SHORT = {"relay": "`run --once`", "relay daemon": "daemon",
                "openssl+cp+sync": "`openssl` + `cp` + `sync`", "cp+sync": "`cp` + `sync`"}


def _ratio_name(key: str) -> str:
    a, _, b = key.partition(" / ")
    return f"{_LOCAL_SHORT.get(a, a)} / {_LOCAL_SHORT.get(b, b)}"


def _local_large_cmd(r: Result) -> str:
    lg = r.data["large"]
    return (f"{PY} bench/bench_local.py --only large --size-mib {lg['size_bytes'] >> 20} "
            f"--runs {lg['runs']}")


def local_large(r: Result) -> str:
    lg = r.data["large"]
    rows = [[_LOCAL.get(k, k), _s(med), _s(lg["best_s"][k]), _n(lg["mb_s"][k]),
             ", ".join(f"{x:.2f}" for x in lg["all_s"][k])] for k, med in lg["median_s"].items()]
    same = lg.get("ratios_per_round_same_turn_median", {})
    ratios = [[_ratio_name(k), _x(v), _x(lg["ratios_best"][k]),
               _x(same[k]) if k in same else "–"] for k, v in lg["ratios_median"].items()]
    d, once = lg["ratios_median"], "relay / openssl+cp+sync"
    b = lg["ratios_best"]
    targets = [
        ("the daemon ≤ 0.8× the time of `openssl` + `cp` + `sync`",
         d["relay daemon / openssl+cp+sync"], b["relay daemon / openssl+cp+sync"], 0.8),
        ("the daemon ≤ 1.2× the time of `cp` + `sync`",
         d["relay daemon / cp+sync"], b["relay daemon / cp+sync"], 1.2),
        ("`relay run --once` ≤ 0.8× the time of `openssl` + `cp` + `sync`", d[once], b[once], 0.8),
    ]
    lines = "".join(f"- {what}: {_x(med)} (best rounds {_x(best)}), {_verdict(med, '≤', goal)}\n"
                    for what, med, best, goal in targets)
    return (_run(r, _local_large_cmd(r))
            + f"{_size(lg['size_bytes'])} with a sha256 sidecar, {_rounds(lg['runs'])}, the "
            "order of contenders rotated each round:\n\n"
            + _table(["contender", "median", "best", "MB/s (median)", "rounds, s"], rows, "lrrrl")
            + "\n" + _table(["time ratio", "median", "best rounds",
                             "same disk turn (median of rounds)"], ratios)
            + "\nTargets, on the medians:\n\n" + lines)


def _local_small_cmd(r: Result) -> str:
    s = r.data["small_full"]
    return (f"{PY} bench/bench_local.py --only small --small {s['files']} "
            f"--repeat {len(s['runs_files_per_s'])}")


def local_small(r: Result) -> str:
    rows = []
    for key in ("small_full", "small_normal"):
        s = r.data.get(key)
        if s:
            rows.append([f"`{s['journal_sync']}`", _n(s["files_per_s"]),
                         ", ".join(_n(x) for x in s["runs_files_per_s"]),
                         _ms(s["cpu_us_per_file"] / 1000)])
    s = r.data["small_full"]
    conc = f", `RELAY_CONCURRENCY` {s['concurrency']}" if "concurrency" in s else ""
    cpu = s["cpu_us_per_file"] / 1000
    return (_run(r, _local_small_cmd(r))
            + f"{s['files']:,} files of 4 KiB, each with a sha256 sidecar, in 10 folders; "
            f"`relay run --once`, medians of {len(s['runs_files_per_s'])} runs{conc}:\n\n"
            + _table(["`RELAY_JOURNAL_SYNC`", "files/s", "runs, files/s",
                      "CPU per file, relay's process"], rows)
            + "\nTargets (journal `full`):\n\n"
            f"- ≥ 1,000 files/s: {_n(s['files_per_s'])}, "
            f"{_verdict(s['files_per_s'], '≥', 1000)}\n"
            f"- relay's CPU per file ≤ 0.5 ms: {_ms(cpu)}, {_verdict(cpu, '≤', 0.5)}\n")


def _latency_cmd(r: Result) -> str:
    return f"{PY} bench/bench_local.py --only latency --latency {r.data['latency']['samples']}"


def latency(r: Result) -> str:
    la = r.data["latency"]
    return (_run(r, _latency_cmd(r))
            + f"{la['samples']} files of 4 KiB arriving one by one at a running daemon, from "
            "the sidecar written to the downstream sidecar written:\n\n"
            + _table(["samples", "p50", "p99", "max"],
                     [[str(la["samples"]), _ms(la["p50_ms"]), _ms(la["p99_ms"]),
                       _ms(la["max_ms"])]], "rrrr")
            + f"\nTargets: p50 ≤ 20 ms, {_verdict(la['p50_ms'], '≤', 20)}; p99 ≤ 100 ms, "
            f"{_verdict(la['p99_ms'], '≤', 100)}.\n")


# -- scale (bench_scale.py) -------------------------------------------------------------

def _scale_cmd(r: Result) -> str:
    return (f"{PY} bench/bench_scale.py --files {r.data['backlog']['files']} "
            f"--gib {r.data['big']['size_gib']:g}")


def backlog(r: Result) -> str:
    b = r.data["backlog"]
    return (_run(r, _scale_cmd(r))
            + f"{b['files']:,} files of 4 KiB with sidecars already waiting when "
            "`relay run --once` starts (logging at `info`):\n\n"
            + _table(["files", "first delivery", "last delivery", "files/s",
                      "peak RSS, relay's process"],
                     [[_n(b["files"]), _s(b["first_delivery_s"]), _s(b["last_delivery_s"]),
                       _n(b["files_per_s"]), f"{b['peak_rss_mib']:.0f} MiB"]], "rrrrr")
            + f"\nTarget: peak RSS < 150 MiB, {_verdict(b['peak_rss_mib'], '≤', 150)}.\n")


def big_local(r: Result) -> str:
    g = r.data["big"]
    return (_run(r, _scale_cmd(r))
            + f"One sparse file of {g['size_gib']:g} GiB (data at both ends) with its sidecar, "
            "local → local, one `relay run --once`:\n\n"
            + _table(["size", "time", "MB/s", "peak RSS, relay's process"],
                     [[f"{g['size_gib']:g} GiB", _s(g["total_s"]), _n(g["mb_s"]),
                       f"{g['peak_rss_mib']:.0f} MiB"]], "rrrr")
            + f"\nTarget: peak RSS < 150 MiB, {_verdict(g['peak_rss_mib'], '≤', 150)}.\n")


# -- local → SFTP (bench_sftp.py) -------------------------------------------------------

_RELAY = {"relay": "relay, asyncssh", "relay openssh": "relay, openssh",
          "relay openssh fsync: false": "relay, openssh, `fsync: false`"}
TRANSPORTS = ("relay", "relay openssh")  # relay as shipped (fsync on) over each transport
_WHAT = {"delivery": "delivery", "verify + delivery": "seen → delivered",
         "--once, whole process": "`relay run --once`"}
_TOOLS = {"sftp -b": "`sftp -b`", "sftp -b (gcm)": "`sftp -b -c aes128-gcm@openssh.com`",
          "sftp -b -f (flush)": "`sftp -b -f`",
          "sftp -b -f (flush, gcm)": "`sftp -b -f -c aes128-gcm@openssh.com`",
          "scp": "`scp`", "sftp -b puts": "`sftp -b`: puts",
          "sftp -b put tmp + rename": "`sftp -b`: put to a temporary, rename",
          "sftp -b like for like": "`sftp -b`, as safe as relay: `put -f` to a temporary, "
                                   "rename, then the sidecar",
          "scp -r": "`scp -r`"}


def _sftp_label(key: str) -> str:
    name, _, what = key.partition(" (")
    if name in _RELAY:
        what = what.removesuffix(")")
        return f"{_RELAY[name]}: {_WHAT.get(what, what)}"
    return _TOOLS.get(key, key)


def _sftp_cmd(r: Result) -> str:
    d = r.data
    return (f"{PY} bench/bench_sftp.py --size-mib {d['large']['size_bytes'] >> 20} "
            f"--small {d['small']['files']} --runs {d['large']['runs']}")


def _settings(r: Result) -> str:
    s = r.data.get("relay_settings", {})
    if not s:
        return ""
    return (f" relay: `RELAY_CONCURRENCY` {s['RELAY_CONCURRENCY']}, the destination's "
            f"`concurrency` {s['destination_concurrency']}, journal `{s['journal_sync']}`.")


def _sftp_large_table(lg: dict[str, Any]) -> str:
    cpu = lg.get("cpu_s_per_gib", {})
    rows = []
    for k, med in lg["median_s"].items():
        if k.endswith("(verify + delivery)"):
            continue  # with a sidecar the same as the delivery: the hash is the copy's
        c = cpu.get(k)
        rows.append([_sftp_label(k), _s(med), _n(lg["mb_s"][k]), _x(lg["ratio_to_sftp"][k]),
                     f"{c['client']:.2f} + {c['server']:.2f}" if c else ""])
    return _table(["contender", "median", "MB/s", "time / `sftp -b`",
                   "CPU s per GiB, client + rest"], rows)


def _per_transport(ratios: dict[str, float]) -> str:
    return ", ".join(f"{_RELAY.get(k, k).removeprefix('relay, ')} {_x(v)}"
                     for k, v in ratios.items())


def sftp_large(r: Result) -> str:
    lg = r.data["large"]
    d = lg["ratio_to_sftp"]
    gcm = {k: v for k, v in lg["ratio_relay_delivery_to_sftp_gcm"].items() if k in TRANSPORTS}
    flush = lg.get("ratio_relay_delivery_to_sftp_same_cipher_and_flush")
    plain = {k: d[f"{k} (delivery)"] for k in TRANSPORTS if f"{k} (delivery)" in d}
    lines = [f"- ≤ 1.0× the time of `sftp -b` with its defaults: {_per_transport(plain)}, "
             f"{_verdict(min(plain.values()), '≤', 1.0)}",
             f"- ≤ 1.15× the time of `sftp -b` with the same cipher (AES-GCM): "
             f"{_per_transport(gcm)}, {_verdict(min(gcm.values()), '≤', 1.15)}"]
    if flush:
        lines.append(f"- like for like (the same cipher, and a flush on both sides or on "
                     f"neither): {_per_transport(flush)}")
    return (_run(r, _sftp_cmd(r))
            + f"{_size(lg['size_bytes'])} with its sidecar to a loopback OpenSSH sshd, "
            f"{_rounds(lg['runs'])}, the order of contenders rotated each round; relay's "
            "*delivery* is file ready → downstream sidecar written (what a running daemon "
            "spends), including the hash, the remote fsync and the rename." + _settings(r)
            + " CPU: *client* is relay with its helpers and `ssh` processes (or `sftp`/`scp` "
            "with theirs), *rest* is the rest of the machine (sshd, the kernel's writeback)."
            "\n\n" + _sftp_large_table(lg) + "\nTargets, relay's delivery:\n\n"
            + "\n".join(lines) + "\n")


def sftp_small(r: Result) -> str:
    sm = r.data["small"]
    like = sm.get("speedup_vs_like_for_like")  # results from before the contender lack it
    rows = [[_sftp_label(k), _s(med), _n(sm["files_per_s"][k]),
             _x(sm["speedup_vs_sftp_puts"][k])] + ([_x(like[k])] if like else [])
            for k, med in sm["median_s"].items()]
    sp = sm["speedup_vs_sftp_puts"]
    whole = [k for k in TRANSPORTS if f"{k} (--once, whole process)" in sp]
    mine = {k: sp[f"{k} (--once, whole process)"] for k in whole}
    head = ["contender", "median", "files/s", "files/s / `sftp -b` puts"]
    if like:
        head.append("files/s / like for like")
        mine_like = {k: like[f"{k} (--once, whole process)"] for k in whole}
        targets = (f"\nTargets, as a whole `relay run --once`: ≥ 1.0× the files/s of the "
                   f"plain `sftp -b` batch: {_per_transport(mine)}, "
                   f"{_verdict(max(mine.values()), '≥', 1.0)}; ≥ 1.5× the like-for-like "
                   f"batch's: {_per_transport(mine_like)}, "
                   f"{_verdict(max(mine_like.values()), '≥', 1.5)}.")
    else:
        targets = (f"\nTarget: ≥ 1.5× the files/s of the `sftp -b` batch, as a whole `relay "
                   f"run --once`: {_per_transport(mine)}, "
                   f"{_verdict(max(mine.values()), '≥', 1.5)}.")
    return (_run(r, _sftp_cmd(r))
            + f"{sm['files']:,} files of 4 KiB, each with a sidecar, to a loopback OpenSSH "
            f"sshd, {_rounds(sm['runs'])}." + _settings(r)
            + " The engine-alone row delivers the same files to a local folder; the "
            "backend-alone rows run relay's SFTP destination without journal or engine.\n\n"
            + _table(head, rows) + targets + "\n")


def sftp_cpu(r: Result) -> str:
    sm = r.data["small"]
    cpu, machine = sm["cpu_ms_per_file"], sm.get("machine_cpu_ms_per_file", {})
    rows = [[_sftp_label(k), _ms(c["client"]), _ms(c["server"]),
             _ms(machine[k]) if k in machine else ""] for k, c in cpu.items()]
    mine = {k: cpu[f"{k} (--once, whole process)"]["client"] for k in TRANSPORTS
            if f"{k} (--once, whole process)" in cpu}
    return (_run(r, _sftp_cmd(r))
            + f"CPU per file of the {sm['files']:,}-file run above, by side: *client* is relay "
            "with its helpers and `ssh` processes, start-up included (or `sftp`/`scp` with "
            "theirs; the backend-alone rows run in the bench's process), *rest* is the rest "
            f"of the machine (sshd, the kernel). {sm.get('cores', 2)} cores give "
            f"{1000 * sm.get('cores', 2) / sm['files_per_s']['sftp -b puts'] / 1.5:.2f} ms of "
            "CPU per file in all at 1.5× the `sftp -b` batch's files/s.\n\n"
            + _table(["contender", "client", "rest", "whole machine"], rows)
            + f"\nTarget: relay's own CPU per small file ≤ 1.0 ms: {_per_ms(mine)}, "
            f"{_verdict(min(mine.values()), '≤', 1.0)}.\n")


def _per_ms(values: dict[str, float]) -> str:
    return ", ".join(f"{_RELAY.get(k, k).removeprefix('relay, ')} {_ms(v)}"
                     for k, v in values.items())


def sftp_huge(r: Result) -> str:
    lg = r.data["large"]
    rss = lg.get("relay_peak_rss_mib", {})
    peak = "".join(f"- {_RELAY.get(k, k)}: {v:.0f} MiB\n" for k, v in rss.items())
    return (_run(r, _sftp_cmd(r))
            + f"{_size(lg['size_bytes'])} with its sidecar to a loopback OpenSSH sshd, "
            f"{_rounds(lg['runs'])}.\n\n" + _sftp_large_table(lg)
            + "\nrelay's peak RSS (the largest of relay, its helpers and its `ssh` processes), "
            f"target < 150 MiB, {_verdict(max(rss.values(), default=0), '≤', 150)}:\n\n"
            + peak)


# -- scenarios ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """A table of docs/performance.md: which results hold it, how it renders, and its row
    of the summary (scenario, relay, the alternative, ratio, target)."""

    key: str
    bench: str
    holds: Callable[[dict[str, Any]], bool]
    render: Callable[[Result], str]
    summary: Callable[[Result], list[str]] | None = None


def _sum_local_large(r: Result) -> list[str]:
    lg = r.data["large"]
    return [f"{_size(lg['size_bytes'])} file, local → local, relay daemon",
            f"{_n(lg['mb_s']['relay daemon'])} MB/s",
            f"`openssl` + `cp` + `sync` {_n(lg['mb_s']['openssl+cp+sync'])} MB/s",
            _x(lg["ratios_median"]["relay daemon / openssl+cp+sync"]) + " the time",
            "≤ 0.8×"]


def _sum_local_small(r: Result) -> list[str]:
    s = r.data["small_full"]
    return [f"{s['files']:,} small files, local → local", f"{_n(s['files_per_s'])} files/s",
            "–", "–", "≥ 1,000 files/s"]


def _sum_latency(r: Result) -> list[str]:
    la = r.data["latency"]
    return ["signal latency, one file at a time",
            f"p50 {la['p50_ms']:.1f} ms, p99 {la['p99_ms']:.1f} ms", "–", "–", "≤ 20 / ≤ 100 ms"]


def _sum_backlog(r: Result) -> list[str]:
    b = r.data["backlog"]
    return [f"{b['files']:,} files waiting at start-up",
            f"first after {b['first_delivery_s']:.1f} s, {_n(b['files_per_s'])} files/s, "
            f"{b['peak_rss_mib']:.0f} MiB", "–", "–", "RSS < 150 MiB"]


def _sum_big_local(r: Result) -> list[str]:
    g = r.data["big"]
    return [f"{g['size_gib']:g} GiB file, local → local", f"{_n(g['mb_s'])} MB/s, "
            f"{g['peak_rss_mib']:.0f} MiB", "–", "–", "RSS < 150 MiB"]


def _sum_sftp_large(r: Result) -> list[str]:
    lg = r.data["large"]
    k = "relay openssh (delivery)" if "relay openssh (delivery)" in lg["mb_s"] else \
        "relay (delivery)"
    return [f"{_size(lg['size_bytes'])} file → SFTP, `transport: openssh`",
            f"{_n(lg['mb_s'][k])} MB/s", f"`sftp -b` {_n(lg['mb_s']['sftp -b'])} MB/s",
            _x(lg["ratio_to_sftp"][k]) + " the time", "≤ 1.0×"]


def _sum_sftp_small(r: Result) -> list[str]:
    sm = r.data["small"]
    k = "relay openssh (--once, whole process)"
    if k not in sm["files_per_s"]:
        k = "relay (--once, whole process)"
    return [f"{sm['files']:,} small files → SFTP, `transport: openssh`",
            f"{_n(sm['files_per_s'][k])} files/s",
            f"`sftp -b` {_n(sm['files_per_s']['sftp -b puts'])} files/s",
            _x(sm["speedup_vs_sftp_puts"][k]) + " the files/s", "≥ 1.5×"]


def _sum_sftp_cpu(r: Result) -> list[str]:
    cpu = r.data["small"]["cpu_ms_per_file"]
    k = "relay openssh (--once, whole process)"
    if k not in cpu:
        k = "relay (--once, whole process)"
    mine, theirs = cpu[k]["client"], cpu["sftp -b puts"]["client"]
    return ["CPU per small file → SFTP, client side, `transport: openssh`", _ms(mine),
            f"`sftp -b` {_ms(theirs)}", _x(mine / theirs) + " the CPU", "≤ 1.0 ms"]


def _sum_sftp_huge(r: Result) -> list[str]:
    lg = r.data["large"]
    rss = lg["relay_peak_rss_mib"]
    return [f"{_size(lg['size_bytes'])} file → SFTP, peak RSS",
            ", ".join(f"{_RELAY.get(k, k).removeprefix('relay, ')} {v:.0f} MiB"
                      for k, v in rss.items() if k in TRANSPORTS), "–", "–", "< 150 MiB"]


def _is_sftp_small(d: dict[str, Any]) -> bool:
    return "small" in d and d["small"]["files"] >= 1000


SCENARIOS = (
    Scenario("local-large", "local", lambda d: "large" in d, local_large, _sum_local_large),
    Scenario("local-small", "local",
             lambda d: "small_full" in d and d["small_full"]["files"] >= 1000, local_small,
             _sum_local_small),
    Scenario("latency", "local", lambda d: "latency" in d, latency, _sum_latency),
    Scenario("backlog", "scale", lambda d: "backlog" in d, backlog, _sum_backlog),
    Scenario("big-local", "scale", lambda d: "big" in d, big_local, _sum_big_local),
    Scenario("sftp-large", "sftp",
             lambda d: "large" in d and d["large"]["size_bytes"] == GIB, sftp_large,
             _sum_sftp_large),
    Scenario("sftp-small", "sftp", _is_sftp_small, sftp_small, _sum_sftp_small),
    Scenario("sftp-cpu", "sftp", lambda d: _is_sftp_small(d) and "cpu_ms_per_file" in d["small"],
             sftp_cpu, _sum_sftp_cpu),
    Scenario("sftp-huge", "sftp",
             lambda d: "large" in d and d["large"]["size_bytes"] >= 4 * GIB, sftp_huge,
             _sum_sftp_huge),
)


def newest(results: Iterable[Result], s: Scenario) -> Result | None:
    """The most recent result (by the date its bench recorded) that holds ``s``."""
    held = [r for r in results if r.bench == s.bench and s.holds(r.data)]
    return max(held, key=lambda r: (r.date, r.name), default=None)


def _peak_rss(chosen: dict[str, Result | None]) -> str:
    rows = []
    for key, what, get in (
            ("backlog", "100,000-file backlog, local", lambda d: {"relay": d["backlog"]}),
            ("big-local", "4 GiB file, local", lambda d: {"relay": d["big"]}),
            ("sftp-huge", "4 GiB file → SFTP", lambda d: d["large"]["relay_peak_rss_mib"]),
            ("sftp-small", "small files → SFTP",
             lambda d: d["small"].get("relay_peak_rss_mib", {}))):
        r = chosen.get(key)
        if r is None:
            continue
        for k, v in get(r.data).items():
            mib = v["peak_rss_mib"] if isinstance(v, dict) else v
            rows.append([what, _RELAY.get(k, k) if key.startswith("sftp") else "relay",
                         f"{mib:.0f} MiB", f"`{r.name}`"])
    return _table(["scenario", "relay", "peak RSS", "result"], rows, "llrl")


def blocks(results: Sequence[Result]) -> dict[str, str]:
    """Every generated block, by key: one per scenario, ``peak-rss`` and ``summary``."""
    chosen = {s.key: newest(results, s) for s in SCENARIOS}
    out: dict[str, str] = {}
    rows = []
    for s in SCENARIOS:
        r = chosen[s.key]
        if r is None:
            out[s.key] = f"No result of this scenario in bench/results yet (bench: {s.bench}).\n"
            continue
        out[s.key] = s.render(r)
        if s.summary:
            rows.append(s.summary(r))
    out["peak-rss"] = _peak_rss(chosen)
    used = sorted({r.name: r for r in chosen.values() if r is not None}.values(),
                  key=lambda r: r.date)
    out["summary"] = _table(["scenario", "relay", "alternative, same run",
                             "relay / alternative", "target"], rows, "lllll")
    if used:
        machines = sorted({_machine(r).split(", OpenSSH")[0] for r in used})
        first, last = used[0].date[:10], used[-1].date[:10]
        when = first if first == last else f"{first} to {last}"
        out["summary"] += f"\nMeasured {when} on {'; '.join(machines)}.\n"
    return out


def refresh(text: str, generated: dict[str, str]) -> str:
    """``text`` with every generated block replaced by its current rendering."""
    def sub(m: re.Match[str]) -> str:
        key = m["key"]
        if key not in generated:
            raise KeyError(f"unknown report block {key!r}")
        return m.group(1) + generated[key] + m.group(4)

    return _BLOCK.sub(sub, text)


def main(argv: Sequence[str] | None = None, results: Path = RESULTS,
         documents: Sequence[Path] = DOCUMENTS) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="refresh the documents' blocks")
    mode.add_argument("--check", action="store_true", help="exit 1 if a block is out of date")
    a = ap.parse_args(argv)
    generated = blocks(load(results))
    if not (a.write or a.check):
        for key, text in generated.items():
            print(f"<!-- report:{key} -->\n{text}<!-- /report:{key} -->\n")
        return 0
    stale = []
    for doc in documents:
        old = doc.read_text()
        new = refresh(old, generated)
        if new != old:
            stale.append(doc)
            if a.write:
                doc.write_text(new)
    for doc in stale:
        print(f"{'refreshed' if a.write else 'out of date'}: {doc}")
    if a.check and stale:
        print("run: python bench/report.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
