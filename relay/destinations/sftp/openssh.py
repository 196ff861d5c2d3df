"""``transport: openssh``: the SSH connection is OpenSSH's ``ssh`` client, SFTP is asyncssh's.

asyncssh's transport encrypts and frames every packet in Python, on the event loop's core;
OpenSSH's ``ssh`` does it in C in a process of its own (the other core). So relay starts one
``ssh`` master per destination (``-M -N``: the one SSH connection, authenticated once) and
one multiplexed ``ssh -s sftp`` per channel; each channel's stdin/stdout (one end of a
socket pair) carries the SFTP protocol, spoken by asyncssh's own SFTP client
(``SFTPClientHandler``) through the small reader/writer adapters below. Everything above
the channels — pipelining, resume, probe, the watchdog — is the same code as with
asyncssh's transport.

How ``ssh`` logs in is openssh_login.py's: what it is told (the rule, nothing else),
the askpass script that answers its prompts from the secrets (never a terminal), and what
its stderr means when it gives up (a refused host key permanent, a refused login
retryable, like the asyncssh transport).

The processes die with relay (``PR_SET_PDEATHSIG``), so a ``kill -9`` of relay leaves no
SSH connection behind; they run in a session of their own, so the signals a terminal sends
relay's process group (Ctrl-C, on which relay drains over them) do not reach them.
Relies on asyncssh internals (``SFTPClientHandler``'s constructor and its reader/writer
calls); the test suite runs the SFTP backend tests on both transports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import inspect
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from typing import Any

import asyncssh
from asyncssh.logging import logger as ssh_logger
from asyncssh.sftp import SFTPClientHandler

from relay.destinations.sftp.openssh_login import askpass_env, refusal, ssh_options
from relay.destinations.sftp.rule import SftpRule
from relay.destinations.sftp.session import wait_closed
from relay.errors import PermanentError, RetryableError
from relay.logs import get_logger

__all__ = ["OpensshLink", "asyncssh_compatible", "open_openssh", "ssh_binary"]

log = get_logger()

SOCKET_BUFFER = 4 << 20  # per channel and direction: bulk writes in few loop turns
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def ssh_binary() -> str:
    ssh = shutil.which("ssh")
    if ssh is None:
        raise PermanentError("transport: openssh needs OpenSSH's ssh client on PATH "
                             "(Debian: apt-get install openssh-client)")
    return ssh


# What this module calls SFTPClientHandler with (asyncssh 2.22 to 2.24; 2.21 and older
# took no utf8_decode_errors and had no request_limits()).
_HANDLER_ARGS = ["self", "loop", "utf8_decode_errors", "reader", "writer", "sftp_version"]


def asyncssh_compatible() -> None:
    """Raise PermanentError when the installed asyncssh's SFTP client internals are not the
    ones this transport drives: a clear refusal instead of a TypeError on every connect."""
    params = inspect.signature(SFTPClientHandler.__init__).parameters
    extra = list(params.values())[len(_HANDLER_ARGS):]
    if list(params)[:len(_HANDLER_ARGS)] != _HANDLER_ARGS \
            or any(p.default is inspect.Parameter.empty for p in extra) \
            or not all(hasattr(SFTPClientHandler, m)
                       for m in ("start", "recv_packets", "request_limits")):
        raise PermanentError(
            f"transport: openssh drives asyncssh's SFTP client internals, and asyncssh "
            f"{asyncssh.__version__}'s differ from those it was built for (2.22 to 2.24); "
            "use transport: asyncssh, or install asyncssh 2.22 to 2.24")


class _Proc:
    """An ``ssh`` process and the tail of its stderr."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        assert proc.stderr is not None
        self._drain = asyncio.ensure_future(self._read(proc.stderr))
        # Signals go through a pidfd, not proc.kill(): Popen.send_signal() first polls,
        # and that waitpid reaps a child that has just exited before asyncio's watcher
        # does, which then logs "Unknown child process" and reports 255. A pidfd names
        # this process only, so it cannot signal a recycled PID either.
        self._pidfd: int | None = None
        with contextlib.suppress(OSError):  # no pidfd (kernel < 5.3): os.kill below
            self._pidfd = os.pidfd_open(proc.pid)
            weakref.finalize(self, os.close, self._pidfd)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, sig)
                else:
                    os.kill(self.proc.pid, sig)

    async def wait(self) -> int:
        rc = await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain, 1)
        return rc

    def errors(self) -> list[str]:
        return [ln for ln in self.lines if not ln.startswith("debug")]


async def _spawn(*args: str, stdio: socket.socket | None = None,
                 env: dict[str, str] | None = None) -> _Proc:
    fd = stdio.fileno() if stdio is not None else subprocess.DEVNULL
    try:
        # A session of its own: a terminal's Ctrl-C or hang-up goes to relay's whole
        # process group, and relay drains on it, over these very processes (it ends them
        # when it closes; PR_SET_PDEATHSIG if it dies). No controlling terminal either, so
        # ssh can never prompt on one.
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=fd, stdout=fd, stderr=subprocess.PIPE, preexec_fn=_die_with_parent,
            start_new_session=True, env=env)
    except OSError as exc:  # no processes or memory left, say: try again later
        raise RetryableError(f"cannot start ssh: {exc.strerror or exc}") from exc
    return _Proc(proc)


class _Channel:
    """What ``SFTPClientHandler`` calls on ``writer.channel``."""

    def __init__(self, p: _Proc, stream: asyncio.StreamWriter) -> None:
        self._p = p
        self._stream = stream

    def is_closing(self) -> bool:
        return self._stream.is_closing()

    async def wait_closed(self) -> None:
        await self._p.proc.wait()


class _Reader:
    """SSHReader's part that the SFTP client uses: readexactly, logger, extra info."""

    def __init__(self, stream: asyncio.StreamReader, server: str | None) -> None:
        self._stdout = stream
        self._server = server
        self.logger = ssh_logger

    async def readexactly(self, n: int) -> bytes:
        return await self._stdout.readexactly(n)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._server if name == "server_version" and self._server else default


class _Writer:
    """SSHWriter's part that the SFTP client uses. Writes are not awaited, as with asyncssh:
    the uploader bounds what is in flight (16 requests per file)."""

    def __init__(self, p: _Proc, stream: asyncio.StreamWriter) -> None:
        self._stdin = stream
        self._p = p
        self.channel = _Channel(p, stream)

    def write(self, data: bytes) -> None:
        self._stdin.write(data)

    def write_eof(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.write_eof()

    def close(self) -> None:
        self._stdin.close()
        self._p.kill()


class OpensshLink:
    """The ``ssh`` master and its channel processes, as a session's link."""

    def __init__(self, host: str, master: _Proc, sockdir: str) -> None:
        self.host = host
        self.cipher: str | None = None
        self.server: str | None = None
        self.master = master
        self.channels: list[_Proc] = []
        self._sockdir = sockdir
        self._closed = False
        self._polite = False  # closed with SIGTERM (close()), not SIGKILL (abort())
        self._tasks: list[asyncio.Task[None]] = []  # each channel's SFTP reader
        self._socks: list[socket.socket] = []  # our end of each channel's socket pair
        self._streams: list[asyncio.StreamWriter] = []  # ... once asyncio wraps it
        for line in master.lines:
            self._note(line)

    def _note(self, line: str) -> None:
        # "debug1: kex: client->server cipher: aes128-gcm@openssh.com MAC: ..."
        if "client->server cipher:" in line:
            self.cipher = line.split("cipher:", 1)[1].split()[0]
        # "debug1: Remote protocol version 2.0, remote software version OpenSSH_9.2p1 ..."
        elif "remote software version " in line:
            self.server = "SSH-2.0-" + line.split("remote software version ", 1)[1]

    def abort(self) -> None:
        # Killed processes close their sockets: each channel's reader task sees EOF and fails
        # every outstanding request (cancelling the readers instead would leave them
        # waiting for ever).
        self._closed = True
        for p in (*self.channels, self.master):
            p.kill()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def close(self) -> None:
        # SIGTERM: ssh sends the server an SSH disconnect ("disconnected by user") before it
        # exits, where SIGKILL leaves it a reset connection to log. wait_closed() kills
        # whatever has not exited after a moment.
        self._closed = True
        self._polite = True
        for p in (*self.channels, self.master):
            p.kill(signal.SIGTERM)

    def is_closed(self) -> bool:
        return self._closed or self.master.proc.returncode is not None

    async def wait_closed(self) -> None:
        if self._polite:
            procs = [asyncio.ensure_future(p.wait()) for p in (*self.channels, self.master)]
            _, late = await asyncio.wait(procs, timeout=2)
            if late:
                self.abort()
        for p in (*self.channels, self.master):
            await p.wait()
        # Each reader sees EOF from its killed process and asyncssh's cleanup closes its
        # channel. A channel cancelled before its reader started (a stalled open) has no
        # one to close it: close every socket here, so none is left for the garbage
        # collector when the event loop ends.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1)
        for w in self._streams:
            w.transport.abort()
        for w in self._streams:
            with contextlib.suppress(Exception):
                await w.wait_closed()
        for sock in self._socks:
            sock.close()  # a no-op for one its transport has closed

    async def reap(self) -> None:
        """Abort and collect the processes (they die at once): a process left to the end
        of the event loop leaves its transport to the garbage collector."""
        self.abort()
        await wait_closed(self)


SOCKDIR_PREFIX = "relay-ssh-"
_swept = False


def _remove_dead_socket_dirs() -> None:
    """Remove the control-socket folders that relays killed with ``kill -9`` left in the
    temporary folder: this user's ``relay-ssh-*`` folders whose socket nobody listens on
    (the master that made it is gone). A folder without a socket may be a login under
    way in another relay, and stays. Once per process: a killed relay leaves one folder
    per connection it had."""
    global _swept
    if _swept:
        return
    _swept = True
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(SOCKDIR_PREFIX)]
    except OSError:
        return
    for name in names:
        folder = os.path.join(tmp, name)
        sock = os.path.join(folder, "c")
        try:
            if os.lstat(folder).st_uid != os.getuid() or not os.path.exists(sock):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(sock)  # a live master answers: its folder stays
        except ConnectionRefusedError:
            shutil.rmtree(folder, ignore_errors=True)
            log.debug("ssh_socket_dir_removed", folder=folder)
        except OSError:
            continue


async def open_openssh(rule: SftpRule, user: str, host: str, port: int,
                       channels: int, stall: float, passphrase: str | None = None,
                       password: str | None = None
                       ) -> tuple[OpensshLink, list[asyncssh.SFTPClient]]:
    """Start the master, wait until it has logged in, then open up to ``channels`` SFTP
    channels over it (at least one, or raise). ``passphrase`` unlocks the identity,
    ``password`` answers a password login."""
    what = f"connecting to {host}:{port}"
    asyncssh_compatible()
    ssh = ssh_binary()
    if rule.identity is None and password is None:
        raise PermanentError("transport: openssh needs `identity` (a private key file) or "
                             "`password_secret`")
    if rule.identity is not None:
        try:
            with open(rule.identity, "rb"):
                pass
        except OSError as exc:
            raise PermanentError(f"{what}: cannot read identity {rule.identity}: "
                                 f"{exc.strerror}") from exc
    opts = ssh_options(rule, port)
    _remove_dead_socket_dirs()
    try:
        sockdir = tempfile.mkdtemp(prefix=SOCKDIR_PREFIX)  # short: sun_path holds 108 bytes
    except OSError as exc:
        raise RetryableError(f"{what}: cannot make a folder for ssh's control socket: "
                             f"{exc.strerror or exc} (transport: openssh needs a writable "
                             "TMPDIR or /tmp)") from exc
    sock = os.path.join(sockdir, "c")
    try:
        master = await _spawn(ssh, *opts, "-v", "-M", "-S", sock, "-o", "ControlPersist=no",
                              "-N", "--", f"{user}@{host}",
                              env=askpass_env(sockdir, passphrase, password))
    except BaseException:
        shutil.rmtree(sockdir, ignore_errors=True)
        raise
    link = OpensshLink(host, master, sockdir)
    try:
        deadline = time.monotonic() + rule.connect_timeout + rule.login_timeout
        # The master listens on its socket only once it has logged in.
        while not os.path.exists(sock):
            if master.proc.returncode is not None:
                raise refusal(what, rule, user, master, await master.wait())
            if time.monotonic() > deadline:
                raise RetryableError(f"{what}: timed out")
            await asyncio.sleep(0.005)
        for line in master.lines:
            link._note(line)
        try:
            opened = await asyncio.wait_for(asyncio.gather(
                *(_channel(link, ssh, opts, sock, user, host) for _ in range(channels)),
                return_exceptions=True), stall)
        except TimeoutError:
            raise RetryableError(f"{what}: logged in, but no SFTP channel answered within "
                                 f"{stall:g} s") from None
    except Exception:
        await link.reap()
        raise
    except BaseException:  # cancelled: no more awaiting
        link.abort()
        raise
    clients = [c for c in opened if isinstance(c, asyncssh.SFTPClient)]
    if not clients:  # more channels are a bonus (MaxSessions); none is a failure
        await link.reap()
        errs = [e for e in opened if isinstance(e, BaseException)]
        raise RetryableError(f"{what}: no SFTP channel opened ({errs[0] if errs else '?'})")
    return link, clients


async def _channel(link: OpensshLink, ssh: str, opts: list[str], sock: str, user: str,
                   host: str) -> asyncssh.SFTPClient:
    # A socket pair, not pipes: a socket wakes its writer when a third of its buffer is
    # free, a pipe whenever a page is, so bulk writes take far fewer loop turns.
    ours, theirs = socket.socketpair()
    link._socks.append(ours)
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        # If the master cannot open the session (the server's MaxSessions), ssh would fall
        # back to a connection (and login) of its own: a proxy that fails forbids that.
        p = await _spawn(ssh, *opts, "-S", sock, "-o", "ControlMaster=no",
                         "-o", "ProxyCommand=false", "-s", "--", f"{user}@{host}", "sftp",
                         stdio=theirs)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    link.channels.append(p)
    stream_r, stream_w = await asyncio.open_unix_connection(sock=ours, limit=SOCKET_BUFFER)
    link._streams.append(stream_w)
    # duck-typed stand-ins for asyncssh's SSHReader/SSHWriter
    reader: Any = _Reader(stream_r, link.server)
    writer: Any = _Writer(p, stream_w)
    handler = SFTPClientHandler(asyncio.get_running_loop(), "strict", reader, writer, 3)
    try:
        await handler.start()
    except (asyncssh.Error, OSError, EOFError) as exc:
        lines = p.errors()
        writer.close()  # our end of the socket pair, and the process
        raise RetryableError(lines[-1] if lines else str(exc)) from exc
    link._tasks.append(asyncio.ensure_future(handler.recv_packets()))
    await handler.request_limits()
    return asyncssh.SFTPClient(handler, "utf-8", "strict")
