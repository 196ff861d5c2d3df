"""Local → SFTP benchmarks: relay against OpenSSH's own clients, same files, same run.

Starts its own loopback OpenSSH sshd (throwaway keys, internal-sftp; see
tests/sshd_server.py) and measures, for the same files:

- one large file with its sha256 sidecar: relay (`relay run --once`: the whole process,
  and the delivery alone from its log: file_ready → file_delivered, which is what a running
  daemon spends), `sftp -b` with default settings, `sftp -b -c aes128-gcm@openssh.com` (the
  cipher relay prefers), `sftp -b -f` (flush, as relay's fsync does; also with AES-GCM)
  and `scp`; MB/s and time ratio to `sftp` (< 1 means relay is faster);
- N small 4 KiB files, each with a sidecar: relay vs one `sftp -b` batch of the same puts,
  vs the same batch done atomically (put to a temporary, rename), vs the batch an operator
  would script to be as safe as relay (per file: `put -f` to a temporary, rename, then the
  sidecar), vs `scp -r`; files/s.
  Two more rows locate relay's limit: the same engine delivering to a local folder, and
  the SFTP backend alone (in this process, no journal), both with the same settings.

    python bench/bench_sftp.py                 # 1 GiB, 2,000 small files, 3 runs
    python bench/bench_sftp.py --quick         # seconds-long smoke run (used by the tests)

Prints a table and JSON; writes bench/results/sftp-<date>.json unless --no-save/--quick
(then `python bench/report.py --write` refreshes docs/performance.md). The numbers depend
on the machine: client and server share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_local import _default_concurrency  # noqa: E402
from results_file import save  # noqa: E402

from tests.sshd_server import Sshd, running_sshd  # noqa: E402

GCM = "aes128-gcm@openssh.com"
# relay's contenders: the same engine over each SFTP transport (rules: `transport`)
RELAYS = {"relay": "asyncssh", "relay openssh": "openssh"}
# and, for the large file, without the remote flush (`fsync: false`): what `sftp -b`
# without -f does, so the price of relay's fsync is visible beside it
NO_FSYNC = "relay openssh fsync: false"
LARGE_RELAYS = {**{r: (t, True) for r, t in RELAYS.items()}, NO_FSYNC: ("openssh", False)}


# The batch an operator would script to be as safe as relay, per file: put to a
# temporary with a flush (`put -f`, fsync@openssh.com), rename, then put the sidecar.
LIKE_FOR_LIKE = "sftp -b like for like"


def _ssh_opts(s: Sshd) -> list[str]:
    return ["-F", "/dev/null", "-i", str(s.client_key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "BatchMode=yes",
            "-P", str(s.port)]


def _timed(cmd: list[str], **kw: Any) -> float:
    kw.setdefault("stdout", subprocess.DEVNULL)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)
    return time.perf_counter() - t


def _sftp_batch(s: Sshd, batch: Path, *extra: str) -> float:
    return _timed(["sftp", "-q", *_ssh_opts(s), *extra, "-b", str(batch),
                   f"{s.user}@{s.host}"])


def _relay(s: Sshd, root: Path, src: Path, out: Path, concurrency: int,
           dest_concurrency: int, sync: str = "full", local: bool = False,
           transport: str = "asyncssh", fsync: bool = True
           ) -> tuple[float, list[dict[str, Any]], int]:
    """`relay run --once` to the sshd (or, ``local``, to a plain folder): (wall seconds,
    log events, peak RSS in bytes: the kernel's figure for the finished process, the
    largest of relay and the helpers and ssh processes it reaped)."""
    rules = root / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    dest = ({"name": "sshd", "url": f"file://{out}"} if local else
            {"name": "sshd", "url": s.url(out), "identity": str(s.client_key),
             "known_hosts": str(s.known_hosts), "concurrency": dest_concurrency,
             "transport": transport, "fsync": fsync})
    (rules / "r.yaml").write_text(yaml.safe_dump({
        "sources": [{"name": "in", "path": str(src)}],
        "destinations": [dest],
        "routes": [{"name": "r", "source": "in", "to": ["sshd"]}],
    }))
    env = dict(os.environ, RELAY_RULES=str(rules), RELAY_JOURNAL=str(root / "j.sqlite3"),
               RELAY_METRICS_ADDR="", RELAY_LOG_LEVEL="info", RELAY_LOG_FORMAT="json",
               RELAY_CONCURRENCY=str(concurrency), RELAY_JOURNAL_SYNC=sync)
    log = root / "relay.log"
    with open(log, "wb") as logf:  # a file, not a pipe: an unread pipe would stall relay
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "run", "--once"],
                                env=env, stdout=logf)
        _, status, usage = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"relay exited {proc.returncode}; see {log}")
    events = [json.loads(line) for line in log.read_text().splitlines()
              if line.startswith("{")]
    return secs, events, usage.ru_maxrss * 1024


def _span(events: list[dict[str, Any]], first: str, last: str) -> float:
    """Seconds from the first ``first`` event to the last ``last`` event."""
    ts = [dt.datetime.fromisoformat(e["timestamp"]) for e in events if e["event"] == first]
    te = [dt.datetime.fromisoformat(e["timestamp"]) for e in events if e["event"] == last]
    return (max(te) - min(ts)).total_seconds()


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes: relay, sshd, ssh, sftp;
    from /proc/stat, 10 ms ticks). With the cores known, what a contender costs per file
    bounds how fast it could go here at all."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_split() -> tuple[float, float]:
    """(client, machine) CPU seconds so far: this process with the children it has reaped
    (relay with its helpers and ssh processes, or sftp/scp with theirs), and the whole
    machine's busy time. The difference is the server side: sshd's processes (which the
    bench cannot time one by one: a session's processes are not all reaped by sshd's
    master) and the kernel's writeback."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system, _busy_cpu_s()


def _cpu_row(split: list[tuple[float, float]], per: float) -> dict[str, float]:
    """Median client and server (machine - client) CPU of a contender's runs / ``per``."""
    return {"client": round(statistics.median(c for c, _ in split) / per, 3),
            "server": round(statistics.median(m - c for c, m in split) / per, 3)}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def large(s: Sshd, work: Path, size: int, runs: int, conc: int,
          dest_conc: int) -> dict[str, Any]:
    src = work / "big-src"
    src.mkdir()
    payload = src / "big.bin"
    block = os.urandom(1 << 20)
    with open(payload, "wb") as f:
        for _ in range(max(1, size >> 20)):
            f.write(block if size >= 1 << 20 else block[:size])
    size = payload.stat().st_size
    digest = _digest(payload)
    sidecar = src / "big.bin.sha256"
    sidecar.write_text(f"{digest}  big.bin\n")
    names = [f"{r} ({what})" for r in LARGE_RELAYS
             for what in ("delivery", "verify + delivery", "--once, whole process")]
    names += ["sftp -b", "sftp -b (gcm)", "sftp -b -f (flush)", "sftp -b -f (flush, gcm)", "scp"]
    times: dict[str, list[float]] = {n: [] for n in names}
    contenders = [n for n in names if not n.startswith("relay") or "--once" in n]
    split: dict[str, list[tuple[float, float]]] = {n: [] for n in contenders}
    peak: dict[str, int] = {}  # relay's peak RSS over the rounds
    for i in range(runs):
        # Interleaved, so load changes hit every contender alike, in an order rotated each
        # round: the server's disk alternates fast and slow write turns
        # (docs/performance.md), and a fixed order would give one contender the slow turn
        # every time. sync first, so nobody pays for the previous contender's unflushed
        # writes (`sftp -b` does not fsync).
        for name in contenders[i % len(contenders):] + contenders[:i % len(contenders)]:
            os.sync()
            out = s.root / f"large-{i}-{contenders.index(name)}"
            out.mkdir()
            before = _cpu_split()
            if name.startswith("relay"):
                r = name.split(" (")[0]
                wall, events, rss = _relay(
                    s, work / f"relay-large-{i}-{contenders.index(name)}", src, out, conc,
                    dest_conc, transport=LARGE_RELAYS[r][0], fsync=LARGE_RELAYS[r][1])
                times[name].append(wall)
                peak[r] = max(peak.get(r, 0), rss)
                times[f"{r} (delivery)"].append(_span(events, "file_ready", "file_delivered"))
                times[f"{r} (verify + delivery)"].append(
                    _span(events, "file_seen", "file_delivered"))
                assert (out / "big.bin.sha256").exists(), "relay did not deliver"
            elif name == "scp":
                times[name].append(_timed(["scp", "-q", *_ssh_opts(s), str(payload),
                                           str(sidecar), f"{s.user}@{s.host}:{out}/"]))
            else:
                batch = work / "batch"
                batch.write_text(f"put {payload} {out}/big.bin\nput {sidecar} {out}/\n")
                extra = {"sftp -b": (), "sftp -b (gcm)": ("-c", GCM),
                         "sftp -b -f (flush)": ("-f",),
                         "sftp -b -f (flush, gcm)": ("-f", "-c", GCM)}[name]
                times[name].append(_sftp_batch(s, batch, *extra))
            after = _cpu_split()
            split[name].append((after[0] - before[0], after[1] - before[1]))
            assert (out / "big.bin").stat().st_size == size
            shutil.rmtree(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["sftp -b"]
    return {"size_bytes": size, "runs": runs, "median_s": {k: round(v, 3) for k, v in med.items()},
            "mb_s": {k: round(size / v / 1e6, 1) for k, v in med.items()},
            "ratio_to_sftp": {k: round(v / base, 3) for k, v in med.items()},
            "ratio_relay_delivery_to_sftp_gcm": {
                r: round(med[f"{r} (delivery)"] / med["sftp -b (gcm)"], 3)
                for r in LARGE_RELAYS},
            # like for like: the same cipher, and a flush on both sides (or on neither)
            "ratio_relay_delivery_to_sftp_same_cipher_and_flush": {
                r: round(med[f"{r} (delivery)"] / med["sftp -b -f (flush, gcm)" if flush
                                                       else "sftp -b (gcm)"], 3)
                for r, (_, flush) in LARGE_RELAYS.items()},
            # CPU seconds per GiB, client side (relay's whole process with its helpers and
            # ssh, start-up included; or sftp/scp and their ssh) and the rest of the
            # machine (sshd, the kernel's writeback)
            "cpu_s_per_gib": {k: _cpu_row(v, size / (1 << 30)) for k, v in split.items()},
            "relay_peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peak.items()},
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()}}


def small(s: Sshd, work: Path, count: int, runs: int, conc: int,
          dest_conc: int) -> dict[str, Any]:
    src = work / "small-src"
    dirs = 10
    for i in range(count):
        data = os.urandom(4096)
        d = src / f"d{i % dirs}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.dat").write_bytes(data)
        (d / f"f{i}.dat.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  f{i}.dat\n")
    rels = [f"d{i % dirs}/f{i}.dat" for i in range(count)]
    names = [f"{r} ({what})" for r in RELAYS for what in ("delivery", "--once, whole process")]
    names += ["relay to file:// (engine alone)"]
    names += [f"SFTP backend alone, {t} (no engine)" for t in RELAYS.values()]
    names += ["sftp -b puts", "sftp -b put tmp + rename", LIKE_FOR_LIKE, "scp -r"]
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names if "(delivery)" not in n}
    split: dict[str, list[tuple[float, float]]] = {n: [] for n in cpu}
    peak: dict[str, int] = {}
    for i in range(runs):
        for name in [n for n in names if "(delivery)" not in n]:
            out = (work if "file://" in name else s.root) / f"small-{i}-{names.index(name)}"
            out.mkdir()
            busy = _busy_cpu_s()
            before = _cpu_split()
            if name.endswith("(--once, whole process)"):
                r = name.split(" (")[0]
                wall, events, rss = _relay(
                    s, work / f"relay-small-{i}-{r.replace(' ', '-')}", src, out, conc,
                    dest_conc, transport=RELAYS[r])
                times[name].append(wall)
                peak[r] = max(peak.get(r, 0), rss)
                times[f"{r} (delivery)"].append(_span(events, "file_ready", "file_delivered"))
            elif name.startswith("relay to file"):
                _, events, _rss = _relay(s, work / f"relay-local-{i}", src, out, conc,
                                         dest_conc, local=True)
                times[name].append(_span(events, "file_ready", "file_delivered"))
            elif name.startswith("SFTP backend"):
                transport = name.split(", ")[1].split()[0]
                times[name].append(asyncio.run(_backend(s, src, out, rels, dest_conc,
                                                        transport)))
            elif name == "scp -r":
                times[name].append(_timed(["scp", "-q", "-r", *_ssh_opts(s), f"{src}/.",
                                           f"{s.user}@{s.host}:{out}/"]))
            else:
                lines = [f"-mkdir {out}/d{d}" for d in range(dirs)]
                for rel in rels:
                    if name == LIKE_FOR_LIKE:
                        # as safe as relay: the payload flushed under a temporary name,
                        # renamed, and only then its sidecar
                        head, _, tail = rel.rpartition("/")
                        lines += [f"put -f {src}/{rel} {out}/{head}/.{tail}.tmp",
                                  f"rename {out}/{head}/.{tail}.tmp {out}/{rel}",
                                  f"put {src}/{rel}.sha256 {out}/{rel}.sha256"]
                        continue
                    for f in (rel, rel + ".sha256"):
                        if name == "sftp -b puts":
                            lines.append(f"put {src}/{f} {out}/{f}")
                        else:
                            head, _, tail = f.rpartition("/")
                            lines.append(f"put {src}/{f} {out}/{head}/.{tail}.tmp")
                            lines.append(f"rename {out}/{head}/.{tail}.tmp {out}/{f}")
                batch = work / "small-batch"
                batch.write_text("\n".join(lines) + "\n")
                times[name].append(_sftp_batch(s, batch))
            after = _cpu_split()
            cpu[name].append(_busy_cpu_s() - busy)
            split[name].append((after[0] - before[0], after[1] - before[1]))
            got = sum(1 for _ in out.rglob("*.dat"))
            assert got == count, (name, got, count)
            shutil.rmtree(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    fps = {k: round(count / v, 1) for k, v in med.items()}
    return {"files": count, "file_bytes": 4096, "runs": runs,
            "median_s": {k: round(v, 3) for k, v in med.items()}, "files_per_s": fps,
            "speedup_vs_sftp_puts": {k: round(v / fps["sftp -b puts"], 2)
                                     for k, v in fps.items()},
            "speedup_vs_like_for_like": {k: round(v / fps[LIKE_FOR_LIKE], 2)
                                         for k, v in fps.items()},
            "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            # the whole machine's busy CPU per file (ms) while each contender ran: relay's
            # include its start-up (~0.2 s of one core per run) and, for the engine-alone
            # and backend rows, only what that row runs
            "machine_cpu_ms_per_file": {k: round(1000 * statistics.median(v) / count, 3)
                                        for k, v in cpu.items()},
            # the same split by side: client (relay with its helpers and ssh, or sftp/scp
            # and their ssh; the backend row runs in this process) and the rest (sshd,
            # the kernel's writeback)
            "cpu_ms_per_file": {k: _cpu_row(v, count / 1000) for k, v in split.items()},
            "relay_peak_rss_mib": {k: round(v / 2**20, 1) for k, v in peak.items()},
            "cores": os.cpu_count()}


async def _backend(s: Sshd, src: Path, out: Path, rels: list[str], conc: int,
                   transport: str) -> float:
    """The SFTP destination in this process, no journal or engine: stage, commit and
    sidecar for every file, ``conc`` files at a time. Seconds."""
    from relay.destinations.base import Resume
    from relay.destinations.sftp.destination import SftpDestination
    from relay.destinations.sftp.rule import SftpRule
    from relay.hops import Hops
    from relay.logs import configure

    class Quiet:  # what the pipeline offers a write: nothing to resume, no journal
        resume = Resume()

        def progress(self, acked: int) -> None:
            pass

        async def checkpoint(self, state: str, acked: int) -> None:
            pass

    configure("warning", "json")

    dest = SftpDestination(SftpRule(
        name="sshd", url=s.url(out), identity=s.client_key, known_hosts=s.known_hosts,
        concurrency=conc, transport=transport))
    await dest.start()
    hops = Hops()
    slots = asyncio.Semaphore(conc)

    async def one(rel: str) -> None:
        async with slots:
            staged = await hops.write(dest, src / rel, None, rel, dest.temporary(rel), (),
                                      Quiet())
            assert await dest.commit(staged)
            await dest.announce(rel + ".sha256", f"{staged.digests['sha256']}  x\n".encode())

    t = time.perf_counter()
    try:
        await asyncio.gather(*(one(rel) for rel in rels))
        return time.perf_counter() - t
    finally:
        await dest.close()


def machine() -> dict[str, object]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "openssh": ssh,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--size-mib", type=int, default=1024, help="large file size (MiB)")
    ap.add_argument("--small", type=int, default=2000, help="number of 4 KiB files")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=_default_concurrency(),
                    help="RELAY_CONCURRENCY (default: as shipped)")
    ap.add_argument("--dest-concurrency", type=int, default=16,
                    help="the SFTP destination's concurrency")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to create files and run sshd (default: a temp dir in /var/tmp)")
    a = ap.parse_args()
    if a.quick:
        a.size_mib, a.small, a.runs = 4, 30, 1
    base = a.workdir or Path("/var/tmp")
    with tempfile.TemporaryDirectory(prefix="relay-bench-sftp-", dir=base) as tmp:
        work = Path(tmp)
        with running_sshd(work / "sshd") as s:
            result = {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                "relay_settings": {"RELAY_CONCURRENCY": a.concurrency,
                                   "destination_concurrency": a.dest_concurrency,
                                   "journal_sync": "full", "fsync": True},
                "large": large(s, work, a.size_mib << 20, a.runs, a.concurrency,
                               a.dest_concurrency),
                "small": small(s, work, a.small, a.runs, a.concurrency, a.dest_concurrency),
            }
    _table(result)
    print(json.dumps(result, indent=2))
    if not a.no_save and not a.quick:
        out = save("sftp", result)
        print(f"saved {out}")
    return 0


def _table(r: dict[str, Any]) -> None:
    lg, sm = r["large"], r["small"]
    print(f"\nmachine: {r['machine']}")
    print(f"relay: {r['relay_settings']}")
    mib = lg["size_bytes"] >> 20
    print(f"\n{'large: ' + str(mib) + ' MiB + sidecar':<52} {'median':>9} {'MB/s':>8} "
          f"{'time / sftp':>12} {'CPU s/GiB client+rest':>22}")
    for k, v in lg["median_s"].items():
        c = lg["cpu_s_per_gib"].get(k)
        side = f"{c['client']:.2f} + {c['server']:.2f}" if c else ""
        print(f"  {k:<50} {v:>8.3f}s {lg['mb_s'][k]:>8} {lg['ratio_to_sftp'][k]:>11}x "
              f"{side:>22}")
    for r, ratio in lg["ratio_relay_delivery_to_sftp_gcm"].items():
        label = f"{r} (delivery) / sftp -b (gcm)"
        print(f"  {label:<50} {'':>9} {'':>8} {ratio:>11}x")
    for r, ratio in lg["ratio_relay_delivery_to_sftp_same_cipher_and_flush"].items():
        label = f"{r} / sftp, same cipher and flush"
        print(f"  {label:<50} {'':>9} {'':>8} {ratio:>11}x")
    for r, mib in lg["relay_peak_rss_mib"].items():
        print(f"  {r + ': peak RSS (largest process)':<50} {mib:>8} MiB")
    print(f"\n{'small: ' + str(sm['files']) + ' x 4 KiB + sidecar':<52} {'median':>9} "
          f"{'files/s':>8} {'vs sftp -b':>12} {'vs like4like':>12} {'CPU ms/file':>12} "
          f"{'client+rest':>14}")
    for k, v in sm["median_s"].items():
        cpu = sm["machine_cpu_ms_per_file"].get(k)
        c = sm["cpu_ms_per_file"].get(k)
        side = f"{c['client']:.2f} + {c['server']:.2f}" if c else ""
        print(f"  {k:<50} {v:>8.3f}s {sm['files_per_s'][k]:>8} "
              f"{sm['speedup_vs_sftp_puts'][k]:>11}x "
              f"{sm['speedup_vs_like_for_like'][k]:>11}x {'' if cpu is None else cpu:>12} "
              f"{side:>14}")
    for r, mib in sm["relay_peak_rss_mib"].items():
        print(f"  {r + ': peak RSS (largest process)':<50} {mib:>8} MiB")


if __name__ == "__main__":
    sys.exit(main())
