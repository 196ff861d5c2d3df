"""ProFTPD's ``mod_sftp`` on 127.0.0.1 for the interoperability tests: an SSH and SFTP
implementation of its own (neither OpenSSH's nor Go's), as many partners run it.

Debian packages it in two parts: ``proftpd-core`` (the daemon) and ``proftpd-mod-crypto``
(``mod_sftp.so``); ``bash scripts/test`` installs both when they are missing. The server
runs in the foreground (``proftpd -n``) with a configuration of its own: ProFTPD's defaults
— in particular ``AllowOverwrite off``, so an existing file cannot be opened for writing,
only replaced by a rename — unless ``allow_overwrite`` is set; public-key logins only, for
the local user (root in CI: ``RootLogin on``), with the throwaway client key in the RFC 4716
form mod_sftp reads. Use it as a context manager::

    with running_proftpd(tmp_path / "proftpd") as server:   # a tests.sshd_server.Sshd
        server.url(server.root)   # sftp://root@127.0.0.1:PORT/abs/path

Fails (RuntimeError) when ProFTPD or mod_sftp is missing or the server does not answer:
never skips.
"""

from __future__ import annotations

import contextlib
import getpass
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd_server import Sshd, make_key, start_on_free_port, stop_process_group

__all__ = ["PROFTPD", "proftpd_overwrite_sftp", "proftpd_sftp", "running_proftpd"]

PROFTPD = Path(os.environ.get("RELAY_TEST_PROFTPD", "/usr/sbin/proftpd"))
MOD_SFTP = Path("/usr/lib/proftpd/mod_sftp.so")
MISSING = (f"ProFTPD with mod_sftp not found ({PROFTPD}, {MOD_SFTP}): install Debian's "
           "proftpd-core and proftpd-mod-crypto (bash scripts/test does it for you)")


def _config(work: Path, port: int, allow_overwrite: bool) -> Path:
    conf = work / "proftpd.conf"
    conf.write_text("\n".join([
        "ServerType standalone",
        'ServerName "relay-test"',
        "DefaultAddress 127.0.0.1",
        "SocketBindTight on",
        f"Port {port}",
        "UseIPv6 off",
        "User nobody",
        "Group nogroup",
        f"PidFile {work / 'proftpd.pid'}",
        f"ScoreboardFile {work / 'proftpd.scoreboard'}",
        "DelayTable none",
        "WtmpLog off",
        "UseReverseDNS off",
        "RootLogin on",
        "UseFtpUsers off",
        "RequireValidShell off",
        "AuthOrder mod_auth_unix.c",
        *(["AllowOverwrite on"] if allow_overwrite else []),
        f"ModulePath {MOD_SFTP.parent}",
        "LoadModule mod_sftp.c",
        f"SystemLog {work / 'system.log'}",
        "<IfModule mod_sftp.c>",
        "  SFTPEngine on",
        f"  SFTPLog {work / 'sftp.log'}",
        f"  SFTPHostKey {work / 'host_ed25519'}",
        "  SFTPAuthMethods publickey",
        f"  SFTPAuthorizedUserKeys file:{work / 'authorized_keys'}",
        "</IfModule>",
        "",
    ]))
    return conf


@contextlib.contextmanager
def running_proftpd(work: Path, allow_overwrite: bool = False) -> Iterator[Sshd]:
    """Start ProFTPD with mod_sftp on 127.0.0.1 with fresh keys under ``work`` (uploads
    into ``work/root``); stop it and its session processes on exit."""
    if not (PROFTPD.exists() and MOD_SFTP.exists()):
        raise RuntimeError(MISSING)
    work.mkdir(parents=True, exist_ok=True)
    host_key = make_key(work / "host_ed25519", "relay-test-host")
    client_key = make_key(work / "id_ed25519", "relay-test-client")
    (work / "authorized_keys").write_bytes(client_key.export_public_key("rfc4716"))
    pub = host_key.export_public_key("openssh").decode().split()
    root = work / "root"
    root.mkdir(exist_ok=True)
    log = work / "proftpd.out"
    proc, port = start_on_free_port("proftpd", lambda port: [
        str(PROFTPD), "-n", "-c", str(_config(work, port, allow_overwrite))], log)
    known_hosts = work / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    try:
        yield Sshd("127.0.0.1", port, getpass.getuser(), work / "id_ed25519", known_hosts,
                   f"{pub[0]} {pub[1]}", root, work, work / "sftp.log", proc.pid)
    finally:
        stop_process_group(proc)


def _serve(work: Path, allow_overwrite: bool) -> Iterator[Sshd]:
    try:
        with running_proftpd(work, allow_overwrite) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def proftpd_sftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """ProFTPD's mod_sftp with ProFTPD's defaults (AllowOverwrite off), for the session."""
    yield from _serve(tmp_path_factory.mktemp("proftpd"), allow_overwrite=False)


@pytest.fixture(scope="session")
def proftpd_overwrite_sftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """ProFTPD's mod_sftp with ``AllowOverwrite on`` (Debian's packaged configuration)."""
    yield from _serve(tmp_path_factory.mktemp("proftpd-overwrite"), allow_overwrite=True)
