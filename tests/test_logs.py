"""The process logger: calls below the configured level cost nothing and show nothing;
the others reach structlog (so capture_logs and reconfiguration still work)."""

from __future__ import annotations

import json

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
