"""The process logger: calls below the configured level cost nothing and show nothing;
the others reach structlog (so capture_logs and reconfiguration still work)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import structlog
from structlog.testing import capture_logs

from relay import logs
from relay.logs import configure, get_logger


def test_only_calls_at_or_above_the_level_are_written(
        capsys: pytest.CaptureFixture[str]) -> None:
    old, threshold = structlog.get_config(), logs._threshold
    try:
        configure("warning", "json")
        log = get_logger()
        log.debug("quiet_debug", n=1)
        log.info("quiet_info", n=2)
        log.warning("loud_warning", n=3)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("loud_exception", n=4)
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [(x["event"], x["level"], x["n"]) for x in lines] == [
            ("loud_warning", "warning", 3), ("loud_exception", "error", 4)]
        assert "ValueError: boom" in lines[1]["exception"]

        configure("debug", "json")
        with capture_logs() as seen:
            log.debug("now_seen", n=5)
        assert seen == [{"event": "now_seen", "log_level": "debug", "n": 5}]
    finally:  # what other tests configured (this one's stdout is pytest's, closed soon)
        structlog.configure(**old)
        logs._threshold = threshold


def test_lines_logged_on_the_loop_are_written_once_per_turn_in_order() -> None:
    """On the event loop, lines wait for the end of the loop's turn and go out in one
    write; a line from outside a loop writes what waits first, then itself."""

    class File:
        def __init__(self) -> None:
            self.writes: list[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            pass

    f = File()
    w = logs._LineWriter(f)  # type: ignore[arg-type]

    async def turn() -> None:
        w.msg("a")
        w.msg("b")
        assert f.writes == []  # not yet: the turn has not ended
        await asyncio.sleep(0)  # one turn later
        assert f.writes == ["a\nb\n"]
        w.msg("c")
        w.msg("d")

    asyncio.run(turn())
    assert f.writes == ["a\nb\n", "c\nd\n"]  # nothing left behind when the loop ends

    async def then_a_thread() -> None:
        w.msg("e")
        t = threading.Thread(target=w.msg, args=("from a thread",))
        t.start()
        t.join()

    asyncio.run(then_a_thread())
    assert f.writes[2:] == ["e\nfrom a thread\n"]


def test_a_loop_that_ends_before_its_flush_loses_nothing() -> None:
    """A loop closed before the turn that would have written its lines: the next line,
    on another loop or none, and flush() at exit write them, in order."""

    class File:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    f = File()
    w = logs._LineWriter(f)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()

    def log_and_leave() -> None:
        w.msg("x")
        loop.stop()  # the flush scheduled by msg() is in the next batch: never run

    loop.call_soon(log_and_leave)
    loop.run_forever()
    loop.close()
    assert f.text == ""

    async def again() -> None:
        w.msg("y")

    asyncio.run(again())
    assert f.text == "x\ny\n"
    w.msg("z")  # outside any loop: at once
    assert f.text == "x\ny\nz\n"


def test_a_closed_stdout_drops_the_turns_lines_without_an_error_storm() -> None:
    """The loop's flush cannot write (the reader closed the pipe): the lines are dropped
    and nothing is raised into the loop (whose error report would be one more line)."""

    class Closed:
        def write(self, text: str) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

    w = logs._LineWriter(Closed())  # type: ignore[arg-type]
    errors: list[object] = []

    async def turn() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
        w.msg("lost")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(turn())
    assert errors == []
    assert w._buf == []


def test_plain_events_are_rendered_as_the_processor_chain_renders_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The JSON lines relay renders itself are the ones structlog's chain would write:
    same keys in the same order, same values (only the timestamp differs, by when);
    calls the shortcut cannot render (a value JSON does not know, bound context
    variables, capture_logs) go through structlog and still arrive."""
    from pathlib import Path

    from relay.states import FileState

    old, threshold = structlog.get_config(), logs._threshold
    calls: list[tuple[str, dict[str, object]]] = [
        ("file_ready", {"file": "a b/ü.csv", "signal": None, "declared": "ab" * 32}),
        ("file_staged", {"bytes": 4096, "duration_ms": 1.25, "ok": True, "n": [1, "x"]}),
        ("state_named", {"state": FileState.READY, "nested": {"k": [None, 2.5]}}),
        ("odd_value", {"path": Path("/x y"), "then": "keep"}),
        ("no_keys", {}),
    ]
    try:
        configure("info", "json")
        log = get_logger()
        for event, kw in calls:
            log.info(event, **kw)
        ours = capsys.readouterr().out.splitlines()
        shortcut, logs._json = logs._json, None  # every call through structlog
        for event, kw in calls:
            log.info(event, **kw)
        theirs = capsys.readouterr().out.splitlines()
        logs._json = shortcut
        assert len(ours) == len(theirs) == len(calls)
        for a, b in zip(ours, theirs, strict=True):
            da, db = json.loads(a), json.loads(b)
            assert da.pop("timestamp")[:4] == db.pop("timestamp")[:4]
            assert list(da.items()) == list(db.items())
            assert a.split('"timestamp"')[0] == b.split('"timestamp"')[0]
        assert json.loads(ours[3])["path"] == repr(Path("/x y"))  # structlog rendered it

        structlog.contextvars.bind_contextvars(request="r1")
        try:
            log.info("with_context", n=1)
        finally:
            structlog.contextvars.clear_contextvars()
        assert json.loads(capsys.readouterr().out)["request"] == "r1"
        with capture_logs() as seen:
            log.info("captured", n=2)
        assert seen == [{"event": "captured", "log_level": "info", "n": 2}]
        assert capsys.readouterr().out == ""
        log.info("after_capture", n=3)
        assert json.loads(capsys.readouterr().out)["event"] == "after_capture"
    finally:
        structlog.configure(**old)
        logs._threshold = threshold
