"""The rule model of an ``sftp://`` destination: its options and their checks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from relay.destinations.base import FolderRule
from relay.rule_fields import Duration

__all__ = ["SftpRule"]


class SftpRule(FolderRule):
    """``url: sftp://user@host:port/path`` (docs/sftp.md has every option)."""

    url: str = Field(json_schema_extra={"pattern": "^sftp://"})
    verify: Literal["none", "readback"] = "none"
    concurrency: int | None = Field(None, ge=1, le=64)
    transport: Literal["asyncssh", "openssh"] = Field(
        "asyncssh", description="asyncssh: SSH in-process; openssh: OpenSSH's ssh client "
        "carries the connection (faster; needs the ssh client).")
    identity: Path | None = None
    passphrase_secret: str | None = None
    password_secret: str | None = None
    known_hosts: Path | None = None
    connect_timeout: Duration = 15.0
    login_timeout: Duration = 30.0
    keepalive_interval: Duration = 15.0
    idle_timeout: Duration = Field(
        300.0, description="Close the pooled SSH connection after this long without a "
        "transfer (reopened by the next one); 0 keeps it open.")
    overwrite: Literal["replace", "fail"] = "replace"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not urlsplit(v).hostname:
            raise ValueError("sftp:// URL needs a host")
        return v

    @model_validator(mode="after")
    def _openssh(self) -> SftpRule:
        if self.transport == "openssh":
            if self.identity is None and not self.password_secret:
                raise ValueError("transport: openssh needs `identity` (a private key file) "
                                 "or `password_secret`")
            if self.passphrase_secret and self.identity is None:
                raise ValueError("passphrase_secret unlocks `identity`, which is not set")
        return self
