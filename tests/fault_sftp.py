"""An in-process SFTP server (asyncssh's server classes) that misbehaves on request.

It runs on its own event loop in a thread, so both in-process tests and a ``relay run``
subprocess can use it. Faults are switched on the shared :class:`Faults` object at any
time, e.g. after relay's first-connect probe has seen a well-behaved server:

- ``truncate_on_open``  every open for writing empties the file (like some appliances)
- ``ignore_offsets``    every write goes to the end of the file, whatever offset it names
- ``drop_after``        once this many more bytes have been written, stop answering and
                        abort the connection 0.1 s later
- ``no_posix_rename``   refuse posix-rename@openssh.com (SFTP "operation unsupported")
- ``stall``             never answer write requests (the connection itself stays up)

It also counts connections, open files (and the most open at once) and bytes written, and
accepts either the test client key or, if ``password`` is set, that password.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

__all__ = ["FaultServer", "Faults", "fault_server"]


@dataclass
class Faults:
    truncate_on_open: bool = False
    ignore_offsets: bool = False
    drop_after: int | None = None
    no_posix_rename: bool = False
    stall: bool = False
    password: str | None = None
    # observations
    connections: int = 0
    written: int = 0
    open_files: int = 0
    max_open_files: int = 0
    drops: int = 0


class _SFTP(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], faults: Faults,
                 root: Path) -> None:
        super().__init__(chan, chroot=str(root).encode())
        self.faults = faults

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if self.faults.truncate_on_open and pflags & asyncssh.FXF_WRITE:
            pflags |= asyncssh.FXF_TRUNC | asyncssh.FXF_CREAT
        f = super().open(path, pflags, attrs)
        self.faults.open_files += 1
        self.faults.max_open_files = max(self.faults.max_open_files, self.faults.open_files)
        return f

    def close(self, file_obj: object) -> Any:
        self.faults.open_files -= 1
        return super().close(file_obj)

    def write(self, file_obj: object, offset: int, data: bytes) -> Any:
        f = self.faults
        if f.stall:
            return _RELEASE.wait()  # answered only when the server shuts down
        if f.drop_after is not None:
            if len(data) > f.drop_after:
                # Stop answering, then drop the connection a moment later: the replies to
                # earlier writes reach the client first (an abort right away would reset
                # the connection before it read them), as in a real network outage.
                f.drop_after = None
                f.drops += 1
                asyncio.get_running_loop().call_later(0.1, self.connection.abort)
                return _RELEASE.wait()
            f.drop_after -= len(data)
        if f.ignore_offsets:
            file_obj.seek(0, 2)  # type: ignore[attr-defined]
            f.written += len(data)
            return file_obj.write(data)  # type: ignore[attr-defined]
        f.written += len(data)
        return super().write(file_obj, offset, data)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> Any:
        if self.faults.no_posix_rename:
            raise asyncssh.SFTPOpUnsupported("posix-rename disabled by fault injection")
        return super().posix_rename(oldpath, newpath)


class _Release:
    """Stalled requests wait here; set when the server stops so nothing is left pending."""

    def __init__(self) -> None:
        self.event: asyncio.Event | None = None

    async def wait(self) -> int:
        if self.event is None:
            self.event = asyncio.Event()
        await self.event.wait()
        raise asyncssh.SFTPFailure("server shutting down")


_RELEASE = _Release()


class _Server(asyncssh.SSHServer):
    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.faults.connections += 1

    def password_auth_supported(self) -> bool:
        return self.faults.password is not None

    def validate_password(self, username: str, password: str) -> bool:
        return password == self.faults.password


@dataclass
class FaultServer:
    host: str
    port: int
    root: Path
    faults: Faults
    known_hosts: Path
    client_key: Path

    def url(self, rel: str = "") -> str:
        """An sftp:// URL for a folder below the server's root ('/' is the root)."""
        return f"sftp://test@{self.host}:{self.port}/{rel}".rstrip("/")


@contextmanager
def fault_server(work: Path, client_key: Path, faults: Faults | None = None) -> Iterator[
        FaultServer]:
    """Serve ``work/root`` over SFTP on 127.0.0.1 (random port) from a helper thread."""
    faults = faults or Faults()
    root = work / "root"
    root.mkdir(parents=True, exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_pub = asyncssh.read_private_key(str(client_key)).export_public_key("openssh")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        server = await asyncssh.listen(
            "127.0.0.1", 0, server_host_keys=[host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(client_pub.decode()),
            server_factory=lambda: _Server(faults),
            sftp_factory=lambda chan: _SFTP(chan, faults, root), allow_scp=False)
        box["server"] = server
        box["port"] = server.get_port()
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve())
        loop.run_forever()

    thread = threading.Thread(target=run, name="fault-sftp", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("fault SFTP server did not start within 10 s")
    port = int(box["port"])
    known_hosts = work / "fault_known_hosts"
    known_hosts.write_text(
        f"[127.0.0.1]:{port} {host_key.export_public_key('openssh').decode()}")
    try:
        yield FaultServer("127.0.0.1", port, root, faults, known_hosts, client_key)
    finally:
        async def stop() -> None:
            if _RELEASE.event is not None:
                _RELEASE.event.set()
                _RELEASE.event = None
            box["server"].close()
            await box["server"].wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
