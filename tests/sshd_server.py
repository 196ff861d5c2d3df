"""A real OpenSSH ``sshd`` on 127.0.0.1 for the SFTP tests (and the SFTP benchmark).

Each run gets a random free port and throwaway ed25519 host and client keys; the server
speaks ``internal-sftp`` and logs connections verbosely, so tests can count logins. Use the
``sshd`` fixture (session scope) and ``sftp_dir`` (a fresh upload folder per test):

    from tests.sshd_server import sftp_dir, sshd  # noqa: F401

When ``/usr/sbin/sshd`` is missing the fixture FAILS (never skips): install Debian's
``openssh-server`` (``bash scripts/test`` does it for you).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

__all__ = ["SSHD", "Sshd", "free_port", "make_key", "running_sshd", "server_dir", "sftp_dir",
           "sftp_mkdir", "sshd", "start_on_free_port", "stop_process_group",
           "wait_banner"]

SSHD = Path(os.environ.get("RELAY_TEST_SSHD", "/usr/sbin/sshd"))
MISSING = (f"OpenSSH server not found at {SSHD}: install Debian's openssh-server "
           "(apt-get install -y openssh-server) to run the SFTP tests")


@dataclass(frozen=True)
class Sshd:
    """Where the test server listens and the keys that open it."""

    host: str
    port: int
    user: str
    client_key: Path      # authorised private key (OpenSSH format, no passphrase)
    known_hosts: Path     # holds this server's host key under [host]:port
    host_public_key: str  # "ssh-ed25519 AAAA..."
    root: Path            # a folder the tests may upload into
    workdir: Path
    log: Path
    pid: int
    served: Path | None = None  # the local folder that is "/" to the server's clients
    #                             (a chroot, rclone's served folder); None: the real "/"

    def url(self, path: Path | str) -> str:
        """``sftp://user@127.0.0.1:PORT/abs/path`` (``[::1]`` on IPv6) for a folder here."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"sftp://{self.user}@{host}:{self.port}{self.server_path(path)}"

    def server_path(self, path: Path | str) -> str:
        """The absolute path the server's clients use for the local ``path``."""
        local = Path(path).absolute()
        if self.served is None:
            return local.as_posix()
        rel = local.relative_to(self.served).as_posix()
        return "/" if rel == "." else f"/{rel}"

    def logins(self) -> int:
        """How many sessions the server has accepted so far (from its verbose log)."""
        return self.log.read_text(errors="replace").count("Accepted publickey for ")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def make_key(path: Path, comment: str = "relay-test") -> asyncssh.SSHKey:
    """Write a new ed25519 private key to ``path`` (mode 0600) and ``path.pub``."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    key.write_public_key(str(path) + ".pub")
    return key


def _banner(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def wait_banner(proc: subprocess.Popen[bytes], host: str, port: int, timeout: float) -> bool:
    """Wait until the server ``proc`` greets with an SSH banner on ``host:port``: True;
    False if it exited first or ``timeout`` seconds passed (the caller tells which)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if _banner(host, port):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling a server that is starting up, with a deadline
    return False


def start_on_free_port(name: str, command: Callable[[int], list[str]], log: Path,
                       host: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], int]:
    """Start the SSH server ``command(port)`` for a free port on ``host``, in a session of
    its own with its output appended to ``log``, and return it and the port once it greets
    with a banner. A port taken between free_port() and its bind is tried again (5 times).

    Raises RuntimeError, with the log's tail, if it exits or stays silent for 10 s."""
    for _ in range(5):
        port = free_port(host)
        with open(log, "ab") as logf:
            proc = subprocess.Popen(command(port), stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        if wait_banner(proc, host, port, 10):
            return proc, port
        tail = log.read_text(errors="replace")[-2000:]
        if proc.poll() is None:
            stop_process_group(proc)
            raise RuntimeError(f"{name} did not answer on port {port} within 10 s; "
                               f"log:\n{tail}")
        if "address already in use" not in tail.lower():
            raise RuntimeError(f"{name} exited with {proc.returncode}; log:\n{tail}")
    raise RuntimeError(f"{name} could not bind a free port in 5 tries")


def _config(work: Path, host: str, port: int, extra: str) -> Path:
    conf = work / "sshd_config"
    conf.write_text("\n".join([
        f"ListenAddress {host}",
        f"Port {port}",
        f"HostKey {work / 'host_ed25519'}",
        f"PidFile {work / 'sshd.pid'}",
        f"AuthorizedKeysFile {work / 'authorized_keys'}",
        "StrictModes no",
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "MaxStartups 64:30:128",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
        extra,
        "",
    ]))
    return conf


@contextlib.contextmanager
def running_sshd(work: Path, extra_config: str = "", host: str = "127.0.0.1"
                 ) -> Iterator[Sshd]:
    """Start sshd on ``host`` (loopback: 127.0.0.1 or ::1) with fresh keys under ``work``;
    stop it (and its session children) on exit.

    Fails (RuntimeError) if sshd is missing or does not answer within 10 s."""
    if not SSHD.exists():
        raise RuntimeError(MISSING)
    work.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
    host_key = make_key(work / "host_ed25519", "relay-test-host")
    client_key = make_key(work / "id_ed25519", "relay-test-client")
    (work / "authorized_keys").write_text(
        client_key.export_public_key("openssh").decode())
    pub = host_key.export_public_key("openssh").decode().split()
    host_public = f"{pub[0]} {pub[1]}"
    root = work / "root"
    root.mkdir(exist_ok=True)
    log = work / "sshd.log"
    proc, port = start_on_free_port(
        "sshd", lambda port: [str(SSHD), "-D", "-e", "-f",
                              str(_config(work, host, port, extra_config))], log, host)
    known_hosts = work / "known_hosts"
    known_hosts.write_text(f"[{host}]:{port} {host_public}\n")
    try:
        yield Sshd(host, port, getpass.getuser(), work / "id_ed25519", known_hosts,
                   host_public, root, work, log, proc.pid)
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server we started (in a session of its own) and the per-connection
    children in its process group: SIGTERM, then SIGKILL after 5 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real OpenSSH sshd on 127.0.0.1 for the whole test session."""
    if not SSHD.exists():
        pytest.fail(MISSING, pytrace=False)
    work = tmp_path_factory.mktemp("sshd")
    try:
        with running_sshd(work) as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def sftp_mkdir(server: Sshd, path: Path) -> None:
    """Make the folder ``path`` (local) through the server itself, as its SFTP user: the
    server then knows it (rclone caches listings) and it belongs to that user."""
    async def go() -> None:
        async with asyncssh.connect(server.host, server.port, username=server.user,
                                    client_keys=[str(server.client_key)],
                                    known_hosts=str(server.known_hosts)) as conn, \
                conn.start_sftp_client() as sftp:
            await sftp.mkdir(server.server_path(path))

    asyncio.run(asyncio.wait_for(go(), 20))


def server_dir(server: Sshd, request: pytest.FixtureRequest) -> Path:
    """An empty folder named after the test in ``server.root``, made through the server
    (:func:`sftp_mkdir`) unless it is this machine's own sshd."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:80]
    d = server.root / name
    shutil.rmtree(d, ignore_errors=True)
    if server.served is None and server.user == getpass.getuser():
        d.mkdir()
    else:
        sftp_mkdir(server, d)
    return d


@pytest.fixture
def sftp_dir(sshd: Sshd, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty folder on the test server for one test; removed afterwards."""
    d = server_dir(sshd, request)
    yield d
    shutil.rmtree(d, ignore_errors=True)
