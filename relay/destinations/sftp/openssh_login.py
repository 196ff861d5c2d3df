"""How ``transport: openssh`` has ``ssh`` log in; the processes are openssh.py's.

What ``ssh`` is told: no user or system config (``-F /dev/null``), only the rule's identity
(no agent, no ``~/.ssh/id_*``), only the rule's known_hosts (``StrictHostKeyChecking=yes``),
keepalives and timeouts from the rule, AES-GCM first. No prompt ever reaches a terminal:
without secrets ``BatchMode`` forbids them; with a ``passphrase_secret`` or
``password_secret`` the master's prompts go to a small askpass script (``SSH_ASKPASS``,
forced), which answers from the master's environment, once. Errors before the SFTP
session starts are read from ``ssh``'s stderr (:func:`refusal`): a refused host key is
permanent, a refused login retryable, like the asyncssh transport.
"""

from __future__ import annotations

import collections
import math
import os
from pathlib import Path
from typing import Protocol

from relay.destinations.sftp.rule import SftpRule
from relay.destinations.sftp.session import PREFERRED_CIPHERS
from relay.errors import PermanentError, RetryableError

__all__ = ["ASKPASS", "SshStderr", "askpass_env", "refusal", "ssh_options"]


def ssh_options(rule: SftpRule, port: int) -> list[str]:
    """Everything ``ssh`` needs from the rule, and nothing from the environment."""
    known = rule.known_hosts or Path.home() / ".ssh" / "known_hosts"
    # ssh takes whole seconds: round up, so a sub-second interval does not become 0 (off)
    keepalive = math.ceil(rule.keepalive_interval) if rule.keepalive_interval > 0 else 0
    key = (["-i", str(rule.identity)] if rule.identity is not None
           else ["-o", "PubkeyAuthentication=no"])
    password = "yes" if rule.password_secret else "no"
    # With a secret, prompts are allowed but go to the askpass script (open_openssh), and
    # only once: a wrong secret fails the login instead of being asked for again.
    batch = "no" if rule.password_secret or rule.passphrase_secret else "yes"
    return [
        "-F", "/dev/null", "-p", str(port),
        *key, "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no",
        "-o", f"BatchMode={batch}", "-o", "NumberOfPasswordPrompts=1",
        "-o", f"PasswordAuthentication={password}",
        "-o", f"KbdInteractiveAuthentication={password}", "-o", "HostbasedAuthentication=no",
        "-o", f"ConnectTimeout={max(1, math.ceil(rule.connect_timeout))}",
        "-o", f"ServerAliveInterval={keepalive}", "-o", "ServerAliveCountMax=3",
        "-o", f"Ciphers={PREFERRED_CIPHERS}", "-o", "Compression=no",
        "-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", "ClearAllForwardings=yes",
    ]


class SshStderr(Protocol):
    """What an ``ssh`` process printed: every line, and those that are not debug output."""

    lines: collections.deque[str]

    def errors(self) -> list[str]: ...


def refusal(what: str, rule: SftpRule, user: str, p: SshStderr, rc: int) -> Exception:
    """The error ``ssh`` reported before the connection was up, as a relay error."""
    lines = p.errors()
    text = "\n".join(lines)
    last = lines[-1] if lines else f"ssh exited with {rc}"
    if "ssh_askpass:" in text:  # e.g. "ssh_askpass: exec(/tmp/...): Permission denied"
        return PermanentError(f"{what}: ssh could not run relay's askpass script ({last}); "
                              "TMPDIR must be a folder where files may be executed")
    if "Host key verification failed" in text or "HOST IDENTIFICATION HAS CHANGED" in text:
        return PermanentError(
            f"{what}: host key refused ({last}); the key is unknown or changed — check "
            f"{rule.known_hosts or '~/.ssh/known_hosts'}, then `relay retry`")
    if "No user exists for uid" in text:  # ssh needs a passwd entry for relay's UID
        return PermanentError(f"{what}: {last} (ssh needs a passwd entry for relay's user)")
    # ssh goes on without a key it cannot load, so "Permission denied" follows. A key that
    # is not a key ("invalid format", "error in libcrypto") or is encrypted is permanent
    # (as with asyncssh); one with a too open mode can be fixed in place, so that stays a
    # retryable refused login.
    key_line = next((ln for ln in lines if ln.startswith("Load key")), "")
    if key_line and "bad permissions" not in key_line:
        return PermanentError(f"{what}: cannot load identity {rule.identity}: {key_line}")
    if "Permission denied" in text and rule.passphrase_secret \
            and any(ln.startswith("debug1: Server accepts key") for ln in p.lines):
        # The server would take the key, yet the login failed: ssh could not unlock it.
        return PermanentError(f"{what}: cannot unlock identity {rule.identity} with "
                              f"passphrase_secret {rule.passphrase_secret!r} (wrong "
                              "passphrase?)")
    if "Permission denied" in text:
        # ssh names a key it would not use (bad permissions, unreadable) on an earlier line
        return RetryableError(f"{what}: login refused for {user} ({'; '.join(lines[-3:])}); "
                              "check identity")
    return RetryableError(f"{what}: {last}")


# ssh runs SSH_ASKPASS with the prompt as $1 and reads the answer's first line. The
# secrets are in the master's environment (as private as the secret files: only relay's
# user and root can read /proc/PID/environ), never in this file or on a command line;
# printf is a shell builtin. A prompt without its secret is refused (exit 1).
ASKPASS = """#!/bin/sh
case "$1" in
  "Enter passphrase"*) [ -n "${RELAY_SSH_PASSPHRASE+set}" ] || exit 1
                       printf '%s\\n' "$RELAY_SSH_PASSPHRASE" ;;
  *) [ -n "${RELAY_SSH_PASSWORD+set}" ] || exit 1
     printf '%s\\n' "$RELAY_SSH_PASSWORD" ;;
esac
"""


def askpass_env(sockdir: str, passphrase: str | None,
                password: str | None) -> dict[str, str] | None:
    """The master's environment when a secret answers ssh's prompts (else None: inherit)."""
    if passphrase is None and password is None:
        return None
    script = os.path.join(sockdir, "askpass")
    try:
        fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(ASKPASS)
    except OSError as exc:  # a full TMPDIR, say
        raise RetryableError(f"cannot write ssh's askpass script: {exc.strerror or exc}") from exc
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_SSH_")}
    env.update(SSH_ASKPASS=script, SSH_ASKPASS_REQUIRE="force")  # OpenSSH >= 8.4
    # Older ssh ignores SSH_ASKPASS_REQUIRE and asks askpass only without a terminal (the
    # master has none: a session of its own) and with DISPLAY set. Nothing else reads it:
    # X11 forwarding is off.
    env.setdefault("DISPLAY", ":0")
    if passphrase is not None:
        env["RELAY_SSH_PASSPHRASE"] = passphrase
    if password is not None:
        env["RELAY_SSH_PASSWORD"] = password
    return env
