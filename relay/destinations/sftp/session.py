"""One pooled SSH connection to an SFTP server: its channels and the watchdog that bounds
every request; plus URL parsing.

The connection itself is a :class:`Link`: asyncssh's own (:class:`AsyncsshLink`), or an
OpenSSH ``ssh`` master process (``transport: openssh``, openssh.py). Either way the
channels are asyncssh ``SFTPClient`` objects, so everything above the link is the same."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote, urlsplit

import asyncssh

from relay.destinations.sftp.rule import SftpRule
from relay.logs import get_logger

__all__ = ["PREFERRED_CIPHERS", "AsyncsshLink", "EarlyFlush", "Link", "Session", "open_asyncssh",
           "parse_sftp_url", "wait_closed"]

log = get_logger()

# AES-GCM first: asyncssh's own first choice, chacha20-poly1305, costs it markedly more CPU
PREFERRED_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"


def parse_sftp_url(url: str) -> tuple[str, str, int, str]:
    """``sftp://user@host:port/abs/path`` → (user, host, port, root). As curl does, the path
    is absolute; ``/~/dir`` (or no path) is relative to the login folder."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    if path in ("", "/", "/~", "/~/"):
        root = "/" if path == "/" else "."
    elif path.startswith("/~/"):
        root = path[3:].rstrip("/")
    else:
        root = path.rstrip("/")
    return (unquote(parts.username) if parts.username else getpass.getuser(),
            parts.hostname or "", parts.port or 22, root)


class Link(Protocol):
    """An SSH connection as the session needs it."""

    host: str
    cipher: str | None
    server: str | None

    def abort(self) -> None:
        """Close at once; every outstanding request fails."""

    def close(self) -> None:
        """Close politely (an SSH disconnect the server logs as such), for an idle link."""

    def is_closed(self) -> bool: ...

    async def wait_closed(self) -> None: ...


class AsyncsshLink:
    """asyncssh's connection (``transport: asyncssh``, the default)."""

    def __init__(self, conn: asyncssh.SSHClientConnection, host: str) -> None:
        self.conn = conn
        self.host = host
        self.cipher: str | None = conn.get_extra_info("send_cipher")
        self.server: str | None = conn.get_extra_info("server_version")

    def abort(self) -> None:
        self.conn.abort()

    def close(self) -> None:
        self.conn.close()

    def is_closed(self) -> bool:
        return self.conn.is_closed()

    async def wait_closed(self) -> None:
        await self.conn.wait_closed()


async def open_asyncssh(rule: SftpRule, user: str, host: str, port: int,
                        channels: int, stall: float, passphrase: str | None,
                        password: str | None
                        ) -> tuple[AsyncsshLink, list[asyncssh.SFTPClient]]:
    """asyncssh's connection and up to ``channels`` SFTP channels over it (at least one).
    Library errors propagate: the caller translates them (errors.py)."""
    conn = await asyncio.wait_for(asyncssh.connect(
        host, port, username=user, config=[], agent_path=None,
        known_hosts=str(rule.known_hosts) if rule.known_hosts else (),
        client_keys=[str(rule.identity)] if rule.identity else [],
        passphrase=passphrase, password=password,
        connect_timeout=rule.connect_timeout + rule.login_timeout,
        login_timeout=rule.login_timeout, keepalive_interval=rule.keepalive_interval,
        keepalive_count_max=3, encryption_algs=PREFERRED_CIPHERS,
        compression_algs=None), rule.connect_timeout + rule.login_timeout + 5)
    try:
        first = await asyncio.wait_for(conn.start_sftp_client(), stall)
        # More channels are a bonus: a server may allow fewer sessions (MaxSessions).
        more = await asyncio.wait_for(asyncio.gather(
            *(conn.start_sftp_client() for _ in range(channels - 1)),
            return_exceptions=True), stall)
    except BaseException:
        conn.abort()
        raise
    return AsyncsshLink(conn, host), [
        first, *(c for c in more if isinstance(c, asyncssh.SFTPClient))]


@dataclass
class Session:
    """One SSH connection, its SFTP channels and the watchdog bounding every request."""

    link: Link
    channels: list[asyncssh.SFTPClient]
    stall: float
    load: list[int] = field(default_factory=list)
    busy: int = 0       # operations waiting on the server
    last: float = field(default_factory=time.monotonic)
    extra: float = 0.0  # more patience while a long request (fsync) is outstanding
    dirs: set[str] = field(default_factory=set)  # folders made or checked on the way
    real_root: str | None = None  # the root with its symlinks resolved, once asked
    ready: bool = False  # root checked and server probed
    _timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.stall / 4, self._check)

    def _check(self) -> None:
        # wait_for() cannot interrupt a request stuck in the library; aborting the
        # connection fails every outstanding request at once, exactly on time.
        if self.busy and time.monotonic() - self.last > self.stall + self.extra:
            log.warning("sftp_connection_stalled", host=self.link.host,
                        stalled_s=round(time.monotonic() - self.last, 1))
            self.link.abort()
            return
        self.arm()

    def touch(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def lease(self) -> Iterator[asyncssh.SFTPClient]:
        """The least busy channel, for one operation."""
        if len(self.load) != len(self.channels):
            self.load = [0] * len(self.channels)
        i = min(range(len(self.channels)), key=self.load.__getitem__)
        self.load[i] += 1
        try:
            yield self.channels[i]
        finally:
            self.load[i] -= 1

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """An operation waiting on the server (replies call touch())."""
        if not self.busy:
            self.last = time.monotonic()
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self.last = time.monotonic()

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Local work inside an operation (hashing a prefix): not a wait on the server."""
        self.busy -= 1
        try:
            yield
        finally:
            self.busy += 1
            self.last = time.monotonic()

    @contextlib.contextmanager
    def patience(self, seconds: float) -> Iterator[None]:
        self.extra += seconds
        try:
            yield
        finally:
            self.extra -= seconds

    def close(self, polite: bool = False) -> None:
        """Abort the link, or with ``polite`` (nothing in flight) close it politely."""
        if self._timer is not None:
            self._timer.cancel()
        if polite:
            self.link.close()
        else:
            self.link.abort()


async def wait_closed(link: Link) -> None:
    """Until an aborted connection is closed (its processes collected), at most 5 s."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(link.wait_closed(), 5)


class EarlyFlush:
    """For a large upload, fsync what the server has acknowledged so far, every ``window``
    bytes, through a second handle on another channel: sftp-server answers one request at a
    time per channel, so an fsync among the writes would stall them, while on another
    channel it runs beside them. The final fsync then waits for the tail only (the local
    backend does the same with sync_file_range). Best effort: a failure here is ignored;
    the final fsync on the upload's own handle is what counts."""

    window = 128 * 1024 * 1024

    def __init__(self, s: Session, busy: asyncssh.SFTPClient, path: str) -> None:
        others = [c for c in s.channels if c is not busy]
        self._sftp = others[0] if others else None
        self._path = path
        self._next = self.window
        self._task: asyncio.Task[None] | None = None
        self._file: asyncssh.SFTPClientFile | None = None
        self.flushed: list[int] = []  # acknowledged offsets flushed (counted in Staged)

    def acked(self, n: int) -> None:
        if self._sftp is None or n < self._next or (self._task and not self._task.done()):
            return
        self._next = n + self.window
        self._task = asyncio.ensure_future(self._flush(n))

    async def _flush(self, n: int) -> None:
        assert self._sftp is not None
        with contextlib.suppress(asyncssh.Error, OSError):
            if self._file is None:
                self._file = await self._sftp.open(self._path, "rb")
            await self._file.fsync()
            self.flushed.append(n)

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncssh.Error, OSError):
                await self._task
        if self._file is not None:
            with contextlib.suppress(asyncssh.Error, OSError):
                await self._file.close()
