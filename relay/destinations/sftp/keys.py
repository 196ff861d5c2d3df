"""Can the transport load a destination's identity? Asked by `relay check`, without
connecting: a key in a format the transport cannot read, or a passphrase that does not
unlock it, would otherwise only show at the first delivery.

Each transport reads keys its own way: asyncssh reads PKCS#8 and unencrypted OpenSSH keys
(encrypted OpenSSH-format keys need the optional ``bcrypt``); OpenSSH's ``ssh`` reads its
own format but no PKCS#8 ed25519 key. So the check asks the reader that will be used:
asyncssh itself, or ``ssh-keygen -y`` (the same key loader as ``ssh``), which gets the
passphrase through the same askpass script as the transport, never on its command line.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import asyncssh

from relay.destinations.sftp.openssh_login import askpass_env
from relay.destinations.sftp.rule import SftpRule
from relay.errors import RelayError

__all__ = ["identity_problem"]


def identity_problem(rule: SftpRule, passphrase: str | None) -> str | None:
    """Why ``rule.identity`` cannot be used by the rule's transport; None if it loads (or
    there is no identity, or no ``ssh-keygen`` to ask)."""
    if rule.identity is None:
        return None
    if rule.transport == "openssh":
        return _ssh_problem(rule.identity, passphrase)
    try:
        asyncssh.read_private_key(str(rule.identity), passphrase)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        return f"asyncssh cannot load {rule.identity}: {exc}"
    except OSError:
        return None  # unreadable: reported by rules.login_file_problems
    return None


def _ssh_problem(identity: Path, passphrase: str | None) -> str | None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="relay-keycheck-") as tmp:
            # Without a passphrase_secret the script answers "": a prompt never waits, and
            # an encrypted key fails as "incorrect passphrase".
            env = askpass_env(tmp, passphrase if passphrase is not None else "", None)
            res = subprocess.run([keygen, "-y", "-f", str(identity)], env=env,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=30, start_new_session=True)
    except (OSError, RelayError, subprocess.TimeoutExpired) as exc:
        # e.g. no writable TMPDIR, which the transport needs too (its control socket)
        return f"ssh-keygen could not check {identity}: {exc}"
    if res.returncode == 0:
        return None
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    why = lines[-1] if lines else f"ssh-keygen exited with {res.returncode}"
    hint = ("; no passphrase_secret is set" if passphrase is None and "passphrase" in why
            else "")
    return f"ssh cannot load {identity}: {why}{hint}"
