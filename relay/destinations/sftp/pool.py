"""One SFTP destination's pooled SSH session (destination.py's connection half).

Connected on first use over either transport (asyncssh's, or OpenSSH's ``ssh``:
openssh.py); the root is checked and the server probed once (probe.py); a lost
connection is dropped and the next operation reconnects; after ``idle_timeout`` without an
operation the connection is closed, so a partner's server does not hold relay's login (and,
with openssh, relay its ``ssh`` processes) while there is nothing to send. :meth:`Pool.op`
hands out a concurrency slot, the live session and its least busy channel, with library
errors translated (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh

from relay.destinations.sftp.errors import translate, unsupported
from relay.destinations.sftp.openssh import open_openssh
from relay.destinations.sftp.probe import probe
from relay.destinations.sftp.rule import SftpRule
from relay.destinations.sftp.session import (
    Link,
    Session,
    open_asyncssh,
    parse_sftp_url,
    wait_closed,
)
from relay.errors import PermanentError, RetryableError
from relay.logs import get_logger
from relay.metrics import METRICS

__all__ = ["DEFAULT_CONCURRENCY", "MAX_CHANNELS", "Pool", "read_secret"]

log = get_logger()

DEFAULT_CONCURRENCY = 8
# SFTP channels per connection, at most one per concurrent file. sftp-server answers one
# request at a time per channel, so one file's fsync would stall every other file on it;
# OpenSSH allows 10 sessions per connection (MaxSessions).
MAX_CHANNELS = 8


class Pool:
    """One destination's pooled SSH session and its concurrency slots."""

    def __init__(self, rule: SftpRule, secrets_dir: Path | None = None) -> None:
        self.name = rule.name
        self.rule = rule
        self.secrets_dir = secrets_dir
        self.user, self.host, self.port, self.root = parse_sftp_url(rule.url)
        self.capabilities: dict[str, object] = {}
        self.connections = 0  # successful logins so far (one per reconnect)
        self.session: Session | None = None
        self._closing: set[asyncio.Task[None]] = set()  # lost connections still closing
        self._connecting = asyncio.Lock()
        self._busy = 0  # operations holding a slot (start-up's connect included)
        self._idle_timer: asyncio.TimerHandle | None = None
        limit = rule.concurrency or DEFAULT_CONCURRENCY
        self._slots = asyncio.Semaphore(limit)
        self._channels = min(limit, MAX_CHANNELS)
        self._stall = max(rule.login_timeout, 2 * rule.keepalive_interval)
        # Stable across restarts, so a probe interrupted by a crash is cleaned up by the
        # next one (relay deliberately assumes one relay per destination, as temporaries
        # are deterministic too).
        self.probe_tag = hashlib.sha256(
            f"{self.name} {self.user} {self.root}".encode()).hexdigest()[:8]

    def _secret(self, name: str | None) -> str | None:
        return read_secret(self.secrets_dir, name)

    async def _connect(self) -> Session:
        started = time.monotonic()
        link: Link
        rule = self.rule
        passphrase = self._secret(rule.passphrase_secret)
        password = self._secret(rule.password_secret)
        if rule.transport == "openssh":
            link, channels = await open_openssh(rule, self.user, self.host, self.port,
                                                self._channels, self._stall,
                                                passphrase, password)
        else:
            with self.translate(f"connecting to {self.host}:{self.port}", None):
                link, channels = await open_asyncssh(rule, self.user, self.host, self.port,
                                                     self._channels, self._stall,
                                                     passphrase, password)
        session = Session(link, channels, self._stall)
        session.arm()
        self.connections += 1
        METRICS.sftp_logins.labels(self.name).inc()
        METRICS.sftp_connected.labels(self.name).set(1)
        log.info("sftp_connected", destination=self.name, host=self.host, port=self.port,
                 user=self.user, transport=self.rule.transport, cipher=link.cipher,
                 server=link.server, connection=self.connections,
                 channels=len(channels), channels_wanted=self._channels,
                 duration_ms=round((time.monotonic() - started) * 1000, 1))
        return session

    async def get(self) -> Session:
        """The pooled session: (re)connected, root checked, server probed once."""
        s = self.session
        if s is not None and s.ready and not s.link.is_closed():
            return s
        async with self._connecting:
            s = self.session
            if s is None or s.link.is_closed():
                self.drop(s)  # closed under us (the ssh master exited, say): collected
                s = self.session = await self._connect()
            if s.ready:
                return s
            sftp = s.channels[0]
            with self.translate(f"checking destination root {self.root}", s), s.request():
                try:
                    attrs = await sftp.stat(self.root)
                except asyncssh.SFTPNoSuchFile:
                    raise RetryableError(f"destination root {self.root} does not exist on "
                                         f"{self.host}") from None
                if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                    raise PermanentError(f"destination root {self.root} is not a directory")
                if not self.capabilities:
                    caps = await probe(sftp, self.root, unsupported, self.probe_tag)
                    caps.update(write_limit=sftp.limits.max_write_len,
                                read_limit=sftp.limits.max_read_len,
                                sftp_version=sftp.version, channels=len(s.channels),
                                server=s.link.server, cipher=s.link.cipher,
                                transport=self.rule.transport)
                    self.capabilities = caps
                    log.info("sftp_capabilities", destination=self.name, **caps)
            s.ready = True
            return s

    def translate(self, what: str, session: Session | None
                  ) -> contextlib.AbstractContextManager[None]:
        """Errors of the block as relay errors (errors.py); a lost connection drops
        ``session`` from the pool."""
        return translate(what, self.rule, self.user, lambda: self.drop(session))

    def _forget(self, session: Session, polite: bool = False) -> None:
        """Take the pooled session out of the pool and close it (the caller collects it)."""
        self.session = None
        METRICS.sftp_connected.labels(self.name).set(0)
        session.close(polite)

    def drop(self, session: Session | None, reason: str = "connection lost",
             polite: bool = False) -> None:
        if session is not None and session is self.session:
            self._forget(session, polite)
            # collect its processes in the background (close() waits for what is left)
            task = asyncio.ensure_future(wait_closed(session.link))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            log.info("sftp_disconnected", destination=self.name, host=self.host, reason=reason)

    @contextlib.contextmanager
    def _busy_while(self) -> Iterator[None]:
        """No idle close while this runs; the idle clock restarts when the last op ends."""
        self._busy += 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            yield
        finally:
            self._busy -= 1
            if self._busy == 0 and self.rule.idle_timeout > 0 and self.session is not None:
                self._idle_timer = asyncio.get_running_loop().call_later(
                    self.rule.idle_timeout, self._close_idle)

    def _close_idle(self) -> None:
        # A partner's server should not hold a login (and, with openssh, relay its ssh
        # processes) for a destination that has nothing to send.
        self._idle_timer = None
        if self._busy == 0:
            self.drop(self.session, reason=f"idle for {self.rule.idle_timeout:g} s",
                      polite=True)

    @contextlib.asynccontextmanager
    async def op(self, what: str) -> AsyncIterator[tuple[Session, asyncssh.SFTPClient]]:
        """A concurrency slot, a live session and its least busy channel; errors
        translated."""
        async with self._slots:
            with self._busy_while():
                s = await self.get()
                with self.translate(what, s), s.request(), s.lease() as sftp:
                    yield s, sftp

    async def start(self) -> None:
        async with self._slots:
            with self._busy_while():
                await self.get()

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        s = self.session
        if s is not None:
            self._forget(s)
            await wait_closed(s.link)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def read_secret(secrets_dir: Path | None, name: str | None) -> str | None:
    """The content of secret file ``name`` (trailing newline removed); None if no name."""
    if name is None:
        return None
    if secrets_dir is None:
        raise PermanentError(f"secret {name!r} named but RELAY_SECRETS_DIR is not set")
    try:
        return (secrets_dir / name).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise PermanentError(f"cannot read secret {name!r}: {exc.strerror}") from exc
