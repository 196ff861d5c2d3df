"""The one place asyncssh and socket errors become relay errors (for destination.py).

A refused host key is a PermanentError (an operator must look at known_hosts, then
``relay retry``); a refused login and everything network-shaped are RetryableErrors, so a
partner fixing an account needs no operator on our side. Anything but an SFTP status
means the connection is gone: ``drop()`` is called so the next attempt reconnects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import asyncssh

from relay.destinations.sftp.rule import SftpRule
from relay.errors import PermanentError, RetryableError

__all__ = ["translate", "unsupported"]


def unsupported(exc: BaseException) -> bool:
    """A server refusal (SFTP status), as opposed to a broken connection."""
    return isinstance(exc, asyncssh.SFTPError) and not isinstance(
        exc, asyncssh.SFTPConnectionLost | asyncssh.SFTPNoConnection)


@contextlib.contextmanager
def translate(what: str, rule: SftpRule, user: str,
              drop: Callable[[], None]) -> Iterator[None]:
    """Raise what the block raised as a relay error that says ``what`` failed."""
    try:
        yield
    except asyncssh.HostKeyNotVerifiable as exc:
        raise PermanentError(
            f"{what}: host key refused ({exc.reason}); the key is unknown or changed "
            f"— check {rule.known_hosts or '~/.ssh/known_hosts'}, then "
            "`relay retry`") from exc
    except asyncssh.PermissionDenied as exc:
        raise RetryableError(f"{what}: login refused for {user} ({exc.reason}); "
                             "check identity/password") from exc
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        raise PermanentError(f"{what}: cannot load identity {rule.identity}: "
                             f"{exc}") from exc
    except asyncssh.SFTPError as exc:
        if not unsupported(exc):
            drop()
            raise RetryableError(f"{what}: connection lost ({exc.reason})") from exc
        raise RetryableError(f"{what}: {type(exc).__name__.removeprefix('SFTP')}: "
                             f"{exc.reason}") from exc
    except asyncssh.Error as exc:
        drop()
        raise RetryableError(f"{what}: {exc.reason}") from exc
    except (OSError, EOFError) as exc:  # TimeoutError is an OSError
        drop()
        if isinstance(exc, FileNotFoundError) and exc.filename:
            raise PermanentError(f"{what}: {exc.strerror}: {exc.filename}") from exc
        reason = "timed out" if isinstance(exc, TimeoutError) else (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
        if isinstance(exc, ConnectionResetError | ConnectionAbortedError |
                      BrokenPipeError | EOFError):
            reason = f"connection lost ({reason or type(exc).__name__})"
        raise RetryableError(f"{what}: {reason or type(exc).__name__}") from exc
