"""Command line: ``relay run | check | explain | status | retry | schema``.

Settings are built once here (environment + flags) and passed down as typed objects.
Exit codes: 0 ok, 1 something failed (``run --once``) or check found problems,
2 usage/config errors.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import sys
import time
from pathlib import Path

from relay import __version__
from relay.config import Settings, load_settings
from relay.errors import RelayError, RuleProblem, RulesError
from relay.logs import configure, get_logger
from relay.rules import (
    Rules,
    destination_problems,
    environment_problems,
    load_rules,
    rules_json_schema,
)

__all__ = ["entry", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay",
        description="Forward files from landing zones only when a checksum sidecar or "
                    "completion marker proves they are complete; deliver atomically, once.")
    p.add_argument("--version", action="version", version=f"relay {__version__}")
    p.add_argument("--rules", type=Path, help="rules directory or file (env RELAY_RULES)")
    p.add_argument("--journal", type=Path, help="journal database (env RELAY_JOURNAL)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon",
                         description="Watch every source and forward ready files. SIGTERM/"
                                     "SIGINT stop gracefully; in-flight work is finished or "
                                     "left resumable.")
    run.add_argument("--once", action="store_true",
                     help="process everything ready now, then exit (1 if anything failed)")
    chk = sub.add_parser("check", help="validate the rules",
                         description="Validate rules files; print every problem with file, "
                                     "line and field. Exit 1 on any problem.")
    chk.add_argument("--probe", action="store_true",
                     help="also connect to every destination and report what it supports")
    exp = sub.add_parser("explain", help="why is (or isn't) this file forwarded?",
                         description="Show the route a file takes, the readiness evidence "
                                     "(signal, declared vs computed digest) and its journal "
                                     "state, deliveries and last error.")
    exp.add_argument("path", help="path of the payload (absolute, or relative to its source)")
    exp.add_argument("--hash", action="store_true",
                     help="also hash the payload now and compare with the declared digest")
    st = sub.add_parser("status", help="what the journal holds",
                        description="Counts by state and the files waiting, in flight, "
                                    "failed or quarantined.")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--limit", type=int, default=20, help="rows per list (default 20)")
    rt = sub.add_parser("retry", help="re-queue failed or quarantined files",
                        description="Put failed/quarantined files (all, or those named) back "
                                    "to be evaluated on the next start or rescan.")
    rt.add_argument("paths", nargs="*", help="source-relative paths; none = all")
    sub.add_parser("schema", help="print the JSON Schema of rules files",
                   description="Print the JSON Schema of a rules file, for editors.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(rules=args.rules, journal=args.journal)
    except Exception as exc:  # pydantic ValidationError: name the variable
        print(f"relay: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.command == "schema":
        print(json.dumps(rules_json_schema(), indent=2))
        return 0
    if isinstance(sys.stdout, io.TextIOWrapper):
        # File names that are not UTF-8 are surrogate-escaped strs: print them as the
        # bytes they are (what Python does in the POSIX locale) instead of crashing
        # `status`, `explain` or the console log renderer.
        sys.stdout.reconfigure(errors="surrogateescape")
    configure(settings.log_level, settings.log_format)
    try:
        if args.command == "check":
            return _check(settings, args.probe)
        rules = _load_or_report(settings)
        if rules is None:
            return 2
        if args.command == "run":
            return _run(settings, rules, args.once)
        if args.command == "status":
            from relay.report import status

            return status(settings, as_json=args.json, limit=args.limit)
        if args.command == "explain":
            from relay.report import explain

            return explain(settings, rules, args.path, do_hash=args.hash)
        if args.command == "retry":
            from relay.report import retry

            return retry(settings, args.paths)
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    return 2


def _load_or_report(settings: Settings) -> Rules | None:
    try:
        rules = load_rules(settings.rules)
    except RulesError as exc:
        _print_problems(exc.problems)
        return None
    problems = environment_problems(rules)
    if problems:
        _print_problems(problems)
        return None
    return rules


def _print_problems(problems: list[RuleProblem]) -> None:
    print(f"relay: {len(problems)} problem(s) in the rules:", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)


def _check(settings: Settings, probe: bool) -> int:
    rules = _load_or_report(settings)
    if rules is None:
        return 1
    problems = destination_problems(rules, settings.secrets_dir)
    if problems:
        _print_problems(problems)
        return 1
    print(f"ok: {len(rules.sources)} source(s), {len(rules.destinations)} destination(s), "
          f"{len(rules.routes)} route(s) in {', '.join(rules.files)}")
    if probe:
        return asyncio.run(_probe(settings, rules))
    return 0


async def _probe(settings: Settings, rules: Rules) -> int:
    from relay.destinations import open_destination

    bad = 0
    for rule in rules.destinations:
        dest = open_destination(rule, settings.secrets_dir)
        try:
            await dest.start()
            print(f"{rule.name}: ok {json.dumps(dest.describe(), default=str)}")
        except RelayError as exc:
            bad += 1
            print(f"{rule.name}: FAILED {exc}")
        finally:
            await dest.close()
    return 1 if bad else 0


def _run(settings: Settings, rules: Rules, once: bool) -> int:
    from relay.daemon import Daemon
    from relay.destinations import backend_of
    from relay.engine import Engine
    from relay.file_workers import WORKERS
    from relay.journal import Journal
    from relay.metrics import unread

    if once or not settings.metrics_addr:
        unread()  # nothing serves them: not even prometheus-client is imported
    # What imports and set-up made lives as long as the process: out of the collector's
    # sight, full collections do not walk it again and again, and the helpers forked below
    # keep sharing its pages (a collection writes to every object it visits).
    gc.freeze()
    if any(backend_of(d).helpers for d in rules.destinations):
        # Forked first: before the journal, the event loop or any thread exist.
        WORKERS.start(settings.file_workers)
    try:
        journal = Journal(settings.journal, settings.journal_sync)
        started = time.monotonic()
        try:
            code = asyncio.run(Daemon(Engine(settings, rules, journal, once=once)).run())
        finally:
            journal.close()
    finally:
        WORKERS.stop()
    get_logger().info("relay_exit", code=code,
                      duration_ms=round((time.monotonic() - started) * 1000, 1))
    return code


def entry() -> None:
    """The process's entry point (the ``relay`` script, ``python -m relay.cli``)."""
    code = main()
    # The interpreter's teardown runs the cycle collector over every object the imports and
    # the command made, a noticeable part of a short `relay run --once`. Frozen objects are
    # skipped, and the process is about to end anyway.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
