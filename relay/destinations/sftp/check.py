"""What ``relay check`` can tell about an SFTP destination without connecting.

Its identity, known_hosts and named secrets must be readable; with ``transport: openssh``
the identity must not be readable by others (``ssh`` ignores such a key and the login is
then refused: a Kubernetes Secret mounted with its default 0644 does this), relay's user
needs a passwd entry (``ssh`` refuses to run without one), the ``ssh`` client must be
there, and the key must load with the reader the transport uses (keys.py).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from relay.destinations.base import CheckContext, Problem
from relay.destinations.sftp.rule import SftpRule
from relay.errors import RelayError

__all__ = ["check_problems", "login_file_problems"]


def _unreadable(path: Path) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"


def login_file_problems(rule: SftpRule, secrets_dir: Path | None) -> list[Problem]:
    """The login files' problems, as (field, message), read without loading the key."""
    out: list[Problem] = []
    if rule.identity is not None:
        if (why := _unreadable(rule.identity)) is not None:
            out.append(("identity", why))
        elif rule.transport == "openssh":
            st = rule.identity.stat()
            if st.st_uid == os.getuid() and st.st_mode & 0o077:
                out.append(("identity", f"{rule.identity} has mode "
                            f"{st.st_mode & 0o777:04o}; ssh ignores a private key others "
                            "may read (chmod 600; Kubernetes: the Secret volume's "
                            "defaultMode 0400)"))
    if rule.transport == "openssh":
        try:
            pwd.getpwuid(os.getuid())
        except KeyError:
            # OpenShift and some securityContexts run an arbitrary UID without one
            out.append(("transport", f"ssh needs a passwd entry for relay's user (uid "
                        f"{os.getuid()} has none): use transport: asyncssh, or an image "
                        "that adds the user"))
    known = rule.known_hosts or Path.home() / ".ssh" / "known_hosts"
    if (why := _unreadable(known)) is not None:
        out.append(("known_hosts", f"{why}: every host key would be refused"))
    for field in ("passphrase_secret", "password_secret"):
        name = getattr(rule, field)
        if name is None:
            continue
        if secrets_dir is None:
            out.append((field, f"secret {name!r} named but RELAY_SECRETS_DIR is not set"))
        elif (why := _unreadable(secrets_dir / name)) is not None:
            out.append((field, f"secret {name!r}: {why}"))
    return out


def check_problems(rule: SftpRule, ctx: CheckContext) -> list[Problem]:
    """Every problem found, as (field, message); the login-file problems first, and the
    key is loaded only when its files are readable."""
    out = login_file_problems(rule, ctx.secrets_dir)
    if out:
        return out
    if rule.transport == "openssh":
        from relay.destinations.sftp.openssh import asyncssh_compatible, ssh_binary

        try:
            ssh_binary()
            asyncssh_compatible()
        except RelayError as exc:
            return [("transport", str(exc))]
    if rule.identity is not None:
        from relay.destinations.sftp.keys import identity_problem  # imports asyncssh
        from relay.destinations.sftp.pool import read_secret

        try:
            passphrase = read_secret(ctx.secrets_dir, rule.passphrase_secret)
        except RelayError as exc:
            return [("passphrase_secret", str(exc))]
        why = identity_problem(rule, passphrase)
        if why is not None:
            return [("identity", why)]
    return []
