"""relay's SFTP backend against servers other than OpenSSH's defaults, on both transports:
``rclone serve sftp`` (Go's pkg/sftp over rclone's VFS), ProFTPD's mod_sftp (an SSH and
SFTP implementation of its own; ProFTPD's default ``AllowOverwrite off``, and ``on``), and
OpenSSH jailing a non-root user (``ChrootDirectory`` + ``ForceCommand internal-sftp``, also
with posix-rename and fsync refused). What the probe finds, round trips with replace, odd
names and nested folders, a temporary left by an earlier attempt, and a cut mid-upload
through `relay run`: relay does there what docs/sftp.md promises for what the server lacks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.destinations.sftp.destination import SftpDestination
from relay.destinations.sftp.rule import SftpRule
from relay.errors import PermanentError
from tests.chroot_sshd import chroot_restricted_sftp, chroot_sftp  # noqa: F401
from tests.helpers import journal_delivery, run_cut_transfer, sha256, write_to
from tests.observer import Observer
from tests.proftpd_server import proftpd_overwrite_sftp, proftpd_sftp  # noqa: F401
from tests.rclone_server import rclone_sftp  # noqa: F401
from tests.sshd_server import Sshd, server_dir
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(90)

MB = 1 << 20
TRANSPORTS = ("asyncssh", "openssh")

# What each server really does (the probe's findings, as docs/sftp.md records them).
OPENSSH = {"fsync": True, "posix_rename": True, "rename_replaces": False, "hardlink": True,
           "statvfs": True, "truncates_on_open": False, "offset_writes": True,
           "resume": True, "write_limit": 261120}
PROFTPD = {"fsync": True, "posix_rename": True, "rename_replaces": False, "hardlink": True,
           "statvfs": True, "truncates_on_open": False, "offset_writes": False,
           "resume": False, "write_limit": 16384}
EXPECTED: dict[str, tuple[str, dict[str, object]]] = {
    # fixture: (server banner prefix, capabilities)
    "rclone_sftp": ("SSH-2.0-rclone/", {
        "fsync": False, "posix_rename": True, "rename_replaces": True, "hardlink": False,
        "statvfs": True, "truncates_on_open": False, "offset_writes": False,
        "resume": False, "write_limit": 16384}),
    "proftpd_sftp": ("SSH-2.0-mod_sftp", PROFTPD),
    "proftpd_overwrite_sftp": ("SSH-2.0-mod_sftp", {**PROFTPD, "offset_writes": True,
                                                    "resume": True}),
    "chroot_sftp": ("SSH-2.0-OpenSSH_", OPENSSH),
    "chroot_restricted_sftp": ("SSH-2.0-OpenSSH_", {**OPENSSH, "fsync": False,
                                                    "posix_rename": False}),
}
SERVERS = ("rclone_sftp", "proftpd_sftp", "chroot_sftp", "chroot_restricted_sftp")


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Sshd:
    """The server a parametrised test names (its session fixture)."""
    value: Sshd = request.getfixturevalue(request.param)
    return value


@pytest.fixture
def folder(server: Sshd, request: pytest.FixtureRequest) -> Path:
    """An empty folder on that server for this test."""
    return server_dir(server, request)


def each(servers: tuple[str, ...] = SERVERS,
         transports: tuple[str, ...] = TRANSPORTS) -> Any:
    return pytest.mark.parametrize(("server", "transport"),
                                   [(s, t) for s in servers for t in transports],
                                   indirect=["server"])


def rule(server: Sshd, folder: Path, transport: str, **kw: Any) -> SftpRule:
    opts: dict[str, Any] = {"identity": server.client_key, "known_hosts": server.known_hosts,
                            "connect_timeout": 5, "login_timeout": 5, "transport": transport,
                            **kw}
    return SftpRule(name="partner", url=server.url(folder), **opts)


def expected(request: pytest.FixtureRequest) -> dict[str, object]:
    return EXPECTED[request.node.callspec.params["server"]][1]


async def deliver(dest: SftpDestination, src: Path, target: str) -> Any:
    """Stage, commit and write the sidecar (GNU form) the way the pipeline does."""
    staged = await write_to(dest, src, target)
    name = target.rsplit("/", 1)[-1]
    assert await dest.commit(staged, [(f"{target}.sha256",
                                       f"{staged.digests['sha256']}  {name}\n".encode())])
    return staged


@each(tuple(EXPECTED))
def test_probe_finds_what_the_server_does(server: Sshd, folder: Path, transport: str,
                                          request: pytest.FixtureRequest) -> None:
    """The probe reports each server's real abilities (offset writes refused by rclone
    without a VFS cache and by ProFTPD without AllowOverwrite, no fsync on rclone, what
    internal-sftp -P denies) and leaves nothing behind."""
    dest = SftpDestination(rule(server, folder, transport))

    async def go() -> dict[str, object]:
        try:
            await dest.start()
            return dest.capabilities
        finally:
            await dest.close()

    caps = asyncio.run(go())
    banner, want = EXPECTED[request.node.callspec.params["server"]]
    assert {k: caps[k] for k in want} == want
    assert str(caps["server"]).startswith(banner) and caps["transport"] == transport
    assert list(folder.iterdir()) == []


@each()
def test_round_trip_replace_odd_names_nested(tmp_path: Path, server: Sshd, folder: Path,
                                             transport: str,
                                             request: pytest.FixtureRequest) -> None:
    """Empty, large, unicode-and-space-named and deeply nested files arrive byte-identical
    with their sidecars, a new version replaces the old one (atomically with posix-rename,
    else remove-then-rename with a warning), fsync is used exactly where the server has it,
    and no temporary is left behind."""
    want = expected(request)
    files = {"empty.dat": b"", "plain.bin": os.urandom(700_000),
             "with space/ünïcödé ✓ name.txt": "Grüße, 世界\n".encode() * 300,
             "a/b/c/d/deep.csv": b"x,y\n" * 5000}
    v2 = os.urandom(300_001)
    dest = SftpDestination(rule(server, folder, transport))
    fsynced: list[object] = []

    async def go() -> None:
        try:
            for i, (rel, data) in enumerate(files.items()):
                src = tmp_path / f"src{i}"
                src.write_bytes(data)
                fsynced.append((await deliver(dest, src, rel)).extra["fsynced"])
            (tmp_path / "v2").write_bytes(v2)
            await deliver(dest, tmp_path / "v2", "plain.bin")
        finally:
            await dest.close()

    with capture_logs() as logs:
        asyncio.run(go())
    for rel, data in {**files, "plain.bin": v2}.items():
        assert (folder / rel).read_bytes() == data, rel
        name = rel.rsplit("/", 1)[-1]
        assert (folder / f"{rel}.sha256").read_text() == f"{sha256(data)}  {name}\n"
    assert fsynced == [want["fsync"]] * len(files)
    assert [p for p in folder.rglob(".*")] == []
    warned = [e["target"] for e in logs if e["event"] == "sftp_replace_nonatomic"]
    assert warned == ([] if want["posix_rename"] else ["plain.bin", "plain.bin.sha256"])


@each(("chroot_restricted_sftp",))
def test_without_posix_rename_overwrite_fail_keeps_the_old_file(
        tmp_path: Path, server: Sshd, folder: Path, transport: str) -> None:
    """Where the server refuses posix-rename, ``overwrite: fail`` refuses to replace a
    delivered file (permanently, saying why) and the old file stays whole."""
    dest = SftpDestination(rule(server, folder, transport, overwrite="fail"))
    src = tmp_path / "src"

    async def go() -> None:
        try:
            src.write_bytes(b"v1")
            await deliver(dest, src, "f.txt")
            src.write_bytes(b"v2")
            staged = await write_to(dest, src, "f.txt")
            with pytest.raises(PermanentError, match="overwrite: fail"):
                await dest.commit(staged)
        finally:
            await dest.close()

    asyncio.run(go())
    assert (folder / "f.txt").read_bytes() == b"v1"


@each(tuple(EXPECTED), ("asyncssh",))
def test_a_temporary_left_by_an_earlier_attempt_is_written_afresh(
        tmp_path: Path, server: Sshd, folder: Path, transport: str) -> None:
    """A restart from zero (nothing journalled as acknowledged) over a temporary an
    earlier attempt left behind delivers the file, also where the server may not open an
    existing file for writing (ProFTPD's AllowOverwrite off refused every retry)."""
    st = folder.stat()
    for stale in (folder / ".f.bin.tmp", folder / ".f.bin.sha256.tmp"):
        stale.write_bytes(b"left by an attempt that was cut")
        os.chown(stale, st.st_uid, st.st_gid)
    data = os.urandom(100_000)
    (tmp_path / "src").write_bytes(data)
    dest = SftpDestination(rule(server, folder, transport))

    async def go() -> None:
        try:
            await deliver(dest, tmp_path / "src", "f.bin")
        finally:
            await dest.close()

    asyncio.run(go())
    assert (folder / "f.bin").read_bytes() == data
    assert (folder / "f.bin.sha256").read_text() == f"{sha256(data)}  f.bin\n"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# chroot_restricted_sftp resumes like chroot_sftp; what it lacks is shown above
@each(("rclone_sftp", "proftpd_sftp", "proftpd_overwrite_sftp", "chroot_sftp"))
def test_relay_run_cut_mid_upload_delivers_the_file_once(
        tmp_path: Path, server: Sshd, folder: Path, transport: str,
        request: pytest.FixtureRequest) -> None:
    """`relay run` with the connection cut mid-upload: the retry resumes where the server
    can write at an offset and restarts from zero (one fallback, journalled) where it
    cannot; either way an observer on the server never sees a partial or a signal before
    its file, and the file arrives exactly once."""
    want = expected(request)
    size = 3 * MB
    with TcpProxy(server.host, server.port, rate=2 * MB) as proxy:
        kh = tmp_path / "kh"
        kh.write_text(f"[127.0.0.1]:{proxy.port} {server.host_public_key}\n")
        url = server.url(folder).replace(f":{server.port}/", f":{proxy.port}/")
        data = os.urandom(size)
        observer = Observer(folder, {"big.bin": sha256(data)}, interval=0.005)
        observer.start()
        try:
            _, relay = run_cut_transfer(tmp_path, proxy, url, server.client_key, kh, folder,
                                        size, data=data, transport=transport)
        finally:
            observer.stop()
        assert proxy.cuts == 1 and proxy.connections == 2
    assert (folder / "big.bin").read_bytes() == data
    assert (folder / "big.bin.sha256").read_text() == f"{sha256(data)}  big.bin\n"
    logs = relay.logs()
    if want["resume"]:
        assert "transfer_resumed" in logs and proxy.bytes_up < 1.5 * size
        assert journal_delivery(tmp_path / "journal.sqlite3") == ("delivered", 2, 0)
    else:
        assert "server truncates on open or ignores write offsets (probe)" in logs
        assert journal_delivery(tmp_path / "journal.sqlite3") == ("delivered", 2, 1)
    assert observer.violations == [] and observer.polls > 10
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
