"""An OpenSSH sshd that jails a non-root user, the way partners usually offer SFTP:
``ChrootDirectory`` plus ``ForceCommand internal-sftp`` in a ``Match User`` block.

sshd insists that every component of the chroot's path is owned by root and writable by
no one else, which no folder under /tmp (mode 1777) can be: the server's files live in a
fresh folder under /var/lib/relay-tests (removed afterwards). The jail's root belongs to
root; the user may write only into ``upload/`` inside it, so relay's URL is
``sftp://relay-sftp@127.0.0.1:PORT/upload``. The user (no password, no shell) is created
when missing; that, and the chroot, need root — as the tests have in CI. Fails
(RuntimeError) when it cannot set this up: never skips.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.sshd_server import Sshd, running_sshd

__all__ = ["JAIL_USER", "chroot_restricted_sftp", "chroot_sftp", "running_chroot_sshd"]

JAIL_USER = "relay-sftp"
BASE = Path("/var/lib/relay-tests")


def ensure_user(name: str = JAIL_USER) -> pwd.struct_passwd:
    """The jailed account: created when missing (idempotent), with "*" as its password
    field so sshd without PAM does not take it for a locked account ("!")."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    res = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/",
                          "--shell", "/usr/sbin/nologin", "--password", "*", name],
                         capture_output=True, text=True, timeout=30)
    if res.returncode not in (0, 9):  # 9: made meanwhile by a concurrent run
        raise RuntimeError(f"cannot create the user {name}: {res.stderr.strip()}")
    return pwd.getpwnam(name)


@contextlib.contextmanager
def running_chroot_sshd(denied: str = "") -> Iterator[Sshd]:
    """Start sshd jailing :data:`JAIL_USER` into a fresh chroot (the returned ``root`` is
    its writable ``upload/`` folder, ``served`` the jail); remove it all on exit.
    ``denied``: SFTP requests internal-sftp refuses (its ``-P``, e.g. ``posix-rename``)."""
    if os.geteuid() != 0:
        raise RuntimeError("the chroot sshd needs root (useradd, ChrootDirectory)")
    user = ensure_user()
    BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(BASE, 0o755)
    work = Path(tempfile.mkdtemp(dir=BASE))
    try:
        os.chmod(work, 0o755)  # sshd reads the user's authorized_keys as the user
        jail = work / "jail"
        upload = jail / "upload"
        upload.mkdir(parents=True)
        os.chmod(jail, 0o755)
        os.chown(upload, user.pw_uid, user.pw_gid)
        extra = "\n".join([f"Match User {JAIL_USER}", f"    ChrootDirectory {jail}",
                           "    ForceCommand internal-sftp" + (f" -P {denied}" if denied
                                                                else ""),
                           "    AllowTcpForwarding no", "    X11Forwarding no"])
        with running_sshd(work, extra) as server:
            os.chmod(work / "authorized_keys", 0o644)
            yield replace(server, user=JAIL_USER, root=upload, served=jail)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve(denied: str) -> Iterator[Sshd]:
    try:
        with running_chroot_sshd(denied) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def chroot_sftp() -> Iterator[Sshd]:
    """The jailing sshd with internal-sftp's defaults, for the whole test session."""
    yield from _serve("")


@pytest.fixture(scope="session")
def chroot_restricted_sftp() -> Iterator[Sshd]:
    """The jailing sshd with posix-rename and fsync refused, as some partners lock it."""
    yield from _serve("posix-rename,fsync")
