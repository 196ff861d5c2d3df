"""Process settings: ``RELAY_*`` environment variables and secret files.

This is the only module that reads the environment. Rules (what to forward where)
live in YAML and are loaded by :mod:`relay.rules`; settings say how the process runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "load_settings"]


class Settings(BaseSettings):
    """How the relay process runs. Every field is ``RELAY_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore")

    rules: Path = Field(Path("rules"), description="Rules directory (every *.yaml in it) or file.")
    journal: Path = Field(Path(".relay/journal.sqlite3"), description="SQLite journal path.")
    journal_sync: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode. 'normal' survives process crashes (kill -9) but "
        "may forget the last transitions on power loss; 'full' survives both.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto = console on a TTY, JSON lines otherwise."
    )
    metrics_addr: str = Field(
        "127.0.0.1:9464", description="host:port for /metrics, /healthz, /readyz; '' disables."
    )
    concurrency: int = Field(48, ge=1, le=256, description="Deliveries in flight at once.")
    file_workers: int = Field(
        4, ge=0, le=64, description="Helper processes for small files to local folders "
        "(0: worker threads instead).")
    rescan_interval: float = Field(
        60.0, ge=0, description="Seconds between full rescans of every source (0 = never)."
    )
    retry_base: float = Field(1.0, gt=0, description="First retry delay, seconds.")
    retry_cap: float = Field(300.0, gt=0, description="Longest retry delay, seconds.")
    retry_max_attempts: int = Field(20, ge=1, description="Attempts before a delivery fails.")
    breaker_threshold: int = Field(
        5, ge=1, description="Consecutive failed attempts that back a destination off.")
    breaker_cooldown: float = Field(
        5.0, gt=0, description="First back-off of a failing destination, seconds (doubles).")
    progress_interval: float = Field(10.0, gt=0, description="Seconds between progress logs.")
    shutdown_timeout: float = Field(
        20.0, ge=0, description="On SIGTERM, wait this long for transfers before abandoning."
    )
    secrets_dir: Path | None = Field(
        None, description="Directory of secret files (passphrases, passwords) named in rules."
    )


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, then apply non-None ``overrides`` (CLI flags)."""
    secrets = os.environ.get("RELAY_SECRETS_DIR")
    kwargs: dict[str, Any] = {}
    if secrets and Path(secrets).is_dir():
        kwargs["_secrets_dir"] = secrets
    settings = Settings(**kwargs)
    clean = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=clean) if clean else settings
