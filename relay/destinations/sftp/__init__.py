"""``sftp://`` destinations (docs/sftp.md).

Importing the package is cheap: asyncssh is imported by the modules that speak SFTP
(``destination``, ``pool``, ``session``, ``errors``, ``openssh``, ``keys``), only when an
SFTP destination is opened or checked."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from relay.destinations.base import Backend, CheckContext, Problem
from relay.destinations.sftp.rule import SftpRule

if TYPE_CHECKING:
    from relay.destinations.sftp.destination import SftpDestination

__all__ = ["BACKEND", "SftpRule"]


def _open(rule: SftpRule, secrets_dir: Path | None) -> SftpDestination:
    from relay.destinations.sftp.destination import SftpDestination

    return SftpDestination(rule, secrets_dir)


def _problems(rule: SftpRule, ctx: CheckContext) -> list[Problem]:
    from relay.destinations.sftp.check import check_problems

    return check_problems(rule, ctx)


BACKEND = Backend(scheme="sftp", rule=SftpRule, open=_open, problems=_problems,
                  summary="a folder on an SFTP server (OpenSSH and others)")
