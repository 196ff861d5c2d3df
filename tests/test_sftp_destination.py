"""SftpDestination in-process against a real OpenSSH sshd (and, for faults the real server
cannot produce, the in-process fault server): delivery steps, probe, host keys, logins,
overwrite policy, pooling, concurrency and the stall watchdog.

Tests of the connection run on both transports (``transport: asyncssh`` and ``openssh``);
those marked ``transports("asyncssh")`` test what lies above it (or asyncssh's own password
and passphrase logins) and run once. openssh-only behaviour: test_sftp_openssh.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from structlog.testing import capture_logs

from relay.destinations import open_destination
from relay.destinations.base import Staged
from relay.destinations.sftp.destination import SftpDestination, parse_sftp_url
from relay.destinations.sftp.rule import SftpRule
from relay.destinations.sftp.session import wait_closed
from relay.errors import PermanentError, RetryableError, SourceVanished
from relay.metrics import METRICS
from tests.fault_sftp import FaultServer, fault_server
from tests.helpers import start_error, until, wait_for, write_to
from tests.sshd_server import Sshd, make_key, running_sshd, sftp_dir, sshd  # noqa: F401
from tests.tcp_proxy import TcpProxy, _open

pytestmark = pytest.mark.timeout(60)
TRANSPORTS = ("asyncssh", "openssh")
_current = {"transport": "asyncssh"}
once = pytest.mark.transports("asyncssh")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("transports")
    metafunc.parametrize("transport", marker.args if marker else TRANSPORTS, indirect=True)


@pytest.fixture(autouse=True)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """The SFTP transport rule_for() and fault_rule() use in this test."""
    _current["transport"] = request.param
    yield request.param
    _current["transport"] = "asyncssh"


def rule_for(server: Sshd, root: Path, **kw: Any) -> SftpRule:
    opts: dict[str, Any] = {"identity": server.client_key, "known_hosts": server.known_hosts,
                            "connect_timeout": 5, "login_timeout": 5, **_current}
    opts.update(kw)
    return SftpRule(name="partner", url=server.url(root), **opts)


def fault_rule(fs: FaultServer, rel: str = "", **kw: Any) -> SftpRule:
    opts: dict[str, Any] = {"identity": fs.client_key, "known_hosts": fs.known_hosts,
                            "connect_timeout": 5, "login_timeout": 5, **_current}
    opts.update(kw)
    return SftpRule(name="faulty", url=fs.url(rel), **opts)


@pytest.fixture
def faulty(tmp_path: Path, sshd: Sshd) -> Iterator[FaultServer]:  # noqa: F811
    with fault_server(tmp_path / "fault", sshd.client_key) as fs:
        yield fs


def payload(tmp_path: Path, size: int, name: str = "src.bin") -> tuple[Path, bytes]:
    data = os.urandom(size)
    p = tmp_path / name
    p.write_bytes(data)
    return p, data


async def deliver(dest: SftpDestination, src: Path, target: str) -> Any:
    staged = await write_to(dest, src, target)
    assert await dest.commit(staged)
    await dest.announce(target + ".sha256", f"{staged.digests['sha256']}\n".encode())
    return staged


def deliver_and_close(dest: Any, src: Path, target: str) -> None:
    """One delivery (see deliver()) on a fresh event loop; the destination closed after."""
    async def go() -> None:
        try:
            await deliver(dest, src, target)
        finally:
            await dest.close()

    asyncio.run(go())


@once
def test_url_parsing() -> None:
    """sftp:// URLs give user, host, port and an absolute root; /~/ means the login dir."""
    assert parse_sftp_url("sftp://bob@h.example:2222/in/box/") == ("bob", "h.example", 2222,
                                                                  "/in/box")
    assert parse_sftp_url("sftp://bob@h/~/in")[3] == "in"
    assert parse_sftp_url("sftp://bob@h")[2:] == (22, ".")


def test_stage_commit_signal_roundtrip(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                       sftp_dir: Path) -> None:  # noqa: F811
    """A file lands byte-identical under nested new folders, its sidecar after it, and no
    temporary or probe file is left behind."""
    src, data = payload(tmp_path, 3 * 261120 + 12345)
    dest = open_destination(rule_for(sshd, sftp_dir))
    assert isinstance(dest, SftpDestination) and dest.abilities.resume_offset
    seen: list[int] = []

    async def go() -> Any:
        try:
            staged = await write_to(dest, src, "a/b/c.bin", ("md5",), progress=seen.append)
            assert not (sftp_dir / "a/b/c.bin").exists()
            assert (sftp_dir / "a/b/.c.bin.tmp").read_bytes() == data
            assert await dest.commit(staged)
            await dest.announce("a/b/c.bin.sha256", b"sig\n")
            return staged
        finally:
            await dest.close()

    staged = asyncio.run(go())
    assert staged.size == len(data) and staged.extra["fsynced"] is True
    assert staged.digests == {"sha256": hashlib.sha256(data).hexdigest(),
                              "md5": hashlib.md5(data).hexdigest()}
    assert seen[-1] == len(data) and seen == sorted(seen)
    assert (sftp_dir / "a/b/c.bin").read_bytes() == data
    assert (sftp_dir / "a/b/c.bin.sha256").read_bytes() == b"sig\n"
    assert sorted(p.name for p in sftp_dir.rglob("*")) == ["a", "b", "c.bin", "c.bin.sha256"]


def test_ipv6_server(tmp_path: Path) -> None:
    """``sftp://user@[::1]:PORT/path``: the bracketed literal reaches the connection (and,
    with openssh, ``ssh``) without its brackets, and the host key is looked up under
    ``[::1]:PORT`` as OpenSSH writes it."""
    src, data = payload(tmp_path, 300_000)
    with running_sshd(tmp_path / "sshd6", host="::1") as server6:
        assert server6.url("/x").startswith(f"sftp://{server6.user}@[::1]:")
        dest = open_destination(rule_for(server6, server6.root))
        assert isinstance(dest, SftpDestination)

        deliver_and_close(dest, src, "six.bin")
        assert (server6.root / "six.bin").read_bytes() == data
        assert server6.logins() == 1


def test_empty_file_and_replace(tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """An empty payload is delivered, and a newer version atomically replaces the old."""
    src = tmp_path / "e"
    src.write_bytes(b"")
    dest = SftpDestination(rule_for(sshd, sftp_dir))

    async def go() -> None:
        try:
            await deliver(dest, src, "e")
            assert (sftp_dir / "e").read_bytes() == b""
            src.write_bytes(b"v2")
            await deliver(dest, src, "e")
        finally:
            await dest.close()

    asyncio.run(go())
    assert (sftp_dir / "e").read_bytes() == b"v2"


def test_probe_reports_openssh_capabilities(sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """start() probes OpenSSH: posix-rename, fsync, statvfs, hardlink, offset writes, limits."""
    dest = SftpDestination(rule_for(sshd, sftp_dir))

    async def go() -> dict[str, object]:
        try:
            await dest.start()
            return dest.capabilities
        finally:
            await dest.close()

    caps = asyncio.run(go())
    assert caps["posix_rename"] is True and caps["fsync"] is True
    assert caps["statvfs"] is True and caps["hardlink"] is True
    assert caps["offset_writes"] is True and caps["truncates_on_open"] is False
    assert caps["resume"] is True and caps["rename_replaces"] is False
    assert caps["write_limit"] == 261120 and caps["cipher"] == "aes128-gcm@openssh.com"
    assert list(sftp_dir.iterdir()) == []


def test_unknown_host_key_refused(tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """A server whose key is not in known_hosts is refused with a clear, permanent error."""
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    exc = start_error(SftpDestination(rule_for(sshd, sftp_dir, known_hosts=kh)))
    assert isinstance(exc, PermanentError)
    assert "host key refused" in str(exc) and str(kh) in str(exc)


def test_changed_host_key_refused(tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """A server presenting a different key than known_hosts records is refused."""
    other = make_key(tmp_path / "other").export_public_key("openssh").decode().split()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    exc = start_error(SftpDestination(rule_for(sshd, sftp_dir, known_hosts=kh)))
    assert isinstance(exc, PermanentError) and "host key refused" in str(exc)


def test_bad_key_is_a_retryable_login_error(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                            sftp_dir: Path) -> None:  # noqa: F811
    """An identity the server does not accept gives a retryable 'login refused' error."""
    make_key(tmp_path / "stranger")
    exc = start_error(SftpDestination(rule_for(sshd, sftp_dir, identity=tmp_path / "stranger")))
    assert isinstance(exc, RetryableError) and "login refused" in str(exc)


def test_missing_identity_and_secret_are_permanent(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                   sftp_dir: Path) -> None:  # noqa: F811
    """A missing identity file or secret is a configuration error, reported as such."""
    exc = start_error(SftpDestination(rule_for(sshd, sftp_dir, identity=tmp_path / "nope")))
    assert isinstance(exc, PermanentError) and "nope" in str(exc)
    exc = start_error(SftpDestination(rule_for(sshd, sftp_dir, passphrase_secret="pp"),
                                       tmp_path))
    assert isinstance(exc, PermanentError) and "'pp'" in str(exc)


def test_passphrase_protected_identity(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                      sftp_dir: Path) -> None:  # noqa: F811
    """An encrypted identity is unlocked with the passphrase from the secrets folder."""
    key = asyncssh.read_private_key(str(sshd.client_key))
    if _current["transport"] == "asyncssh":
        # PKCS#8: encrypted OpenSSH-format keys need the optional bcrypt package (docs/sftp.md)
        key.write_private_key(str(tmp_path / "id_enc"), "pkcs8-pem", passphrase="s3cret")
    else:  # ssh reads no PKCS#8 ed25519 key: OpenSSH's own format, encrypted by ssh-keygen
        key.write_private_key(str(tmp_path / "id_enc"), "openssh")
        (tmp_path / "id_enc").chmod(0o600)  # ssh ignores a key others may read
        subprocess.run(["ssh-keygen", "-q", "-p", "-N", "s3cret", "-f", str(tmp_path / "id_enc")],
                       check=True, stdin=subprocess.DEVNULL, capture_output=True)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pp").write_text("s3cret\n")
    dest = SftpDestination(rule_for(sshd, sftp_dir, identity=tmp_path / "id_enc",
                                    passphrase_secret="pp"), secrets)
    src, data = payload(tmp_path, 1000)

    deliver_and_close(dest, src, "f")
    assert (sftp_dir / "f").read_bytes() == data
    # A wrong passphrase is a configuration error: retrying cannot fix it.
    (secrets / "pp").write_text("wrong\n")
    exc = start_error(SftpDestination(rule_for(sshd, sftp_dir, identity=tmp_path / "id_enc",
                                               passphrase_secret="pp"), secrets))
    assert isinstance(exc, PermanentError) and "id_enc" in str(exc), exc


def test_password_login_from_secret(tmp_path: Path, faulty: FaultServer) -> None:
    """Password authentication reads the password from the named secret file (trailing
    newline removed; quotes, $, backslashes, spaces and a leading dash kept as they are:
    with openssh the password passes through a shell script)."""
    password = """-p w$HOME'"\\n`x`%s"""
    faulty.faults.password = password
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pw").write_text(password + "\n")
    dest = SftpDestination(fault_rule(faulty, identity=None, password_secret="pw"), secrets)
    src, data = payload(tmp_path, 5000)

    deliver_and_close(dest, src, "p.bin")
    assert (faulty.root / "p.bin").read_bytes() == data
    (secrets / "pw").write_text("wrong")
    exc = start_error(SftpDestination(fault_rule(faulty, identity=None, password_secret="pw"),
                                       secrets))
    assert isinstance(exc, RetryableError) and "login refused" in str(exc)


def test_missing_root_is_not_created(tmp_path: Path, sshd: Sshd) -> None:  # noqa: F811
    """A destination root that does not exist is reported, never created."""
    root = sshd.root / "absent-root"
    exc = start_error(SftpDestination(rule_for(sshd, root)))
    assert isinstance(exc, RetryableError) and "does not exist" in str(exc)
    assert not root.exists()


@once
def test_vanished_source(tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """A source that disappeared before staging raises SourceVanished."""
    dest = SftpDestination(rule_for(sshd, sftp_dir))

    async def go() -> None:
        try:
            await write_to(dest, tmp_path / "gone", "x")
        finally:
            await dest.close()

    with pytest.raises(SourceVanished):
        asyncio.run(go())


def test_readback_verify_and_discard(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                     sftp_dir: Path) -> None:  # noqa: F811
    """verify: readback hashes the remote temporary; discard removes it, twice without error."""
    src, data = payload(tmp_path, 600_000)
    dest = SftpDestination(rule_for(sshd, sftp_dir, verify="readback"))

    async def go() -> Any:
        try:
            staged = await write_to(dest, src, "r.bin")
            assert (sftp_dir / ".r.bin.tmp").read_bytes() == data
            await dest.discard(staged.tmp)
            await dest.discard(staged.tmp)
            return staged
        finally:
            await dest.close()

    staged = asyncio.run(go())
    assert staged.extra["verified"] == "readback"
    assert not (sftp_dir / ".r.bin.tmp").exists()


@once
def test_commit_after_crash(tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """commit renames a leftover temporary, and reports an already-renamed file."""
    (sftp_dir / ".f.tmp").write_bytes(b"done")
    dest = SftpDestination(rule_for(sshd, sftp_dir))

    async def go() -> tuple[bool, bool, bool]:
        try:
            first = await dest.commit(Staged("f", ".f.tmp", 4))
            again = await dest.commit(Staged("f", ".f.tmp", 4))
            neither = await dest.commit(Staged("g", ".g.tmp", 4))
            return first, again, neither
        finally:
            await dest.close()

    assert asyncio.run(go()) == (True, True, False)
    assert (sftp_dir / "f").read_bytes() == b"done"


@once
def test_staging_folder_temp(tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """temp: staging uploads into the staging folder, then renames across into place."""
    src, data = payload(tmp_path, 70_000)
    dest = SftpDestination(rule_for(sshd, sftp_dir, temp="staging"))

    async def go() -> Any:
        try:
            staged = await write_to(dest, src, "d/s.bin")
            assert staged.tmp == ".relay-staging/d%2Fs.bin.tmp"
            assert (sftp_dir / staged.tmp).exists()
            assert await dest.commit(staged)
        finally:
            await dest.close()

    asyncio.run(go())
    assert (sftp_dir / "d/s.bin").read_bytes() == data


@once
def test_without_posix_rename_replace_warns(tmp_path: Path, faulty: FaultServer) -> None:
    """Without posix-rename, 'overwrite: replace' removes then renames — with a warning."""
    faulty.faults.no_posix_rename = True
    (faulty.root / "t").write_bytes(b"old")
    src, data = payload(tmp_path, 3000)
    dest = SftpDestination(fault_rule(faulty))

    async def go() -> None:
        try:
            await deliver(dest, src, "t")
            await deliver(dest, src, "new")
        finally:
            await dest.close()

    with capture_logs() as logs:
        asyncio.run(go())
    assert dest.capabilities["posix_rename"] is False
    assert (faulty.root / "t").read_bytes() == data and (faulty.root / "new").exists()
    warned = [e for e in logs if e["event"] == "sftp_replace_nonatomic"]
    assert [e["target"] for e in warned] == ["t"]  # a new name needs no removal


@once
def test_without_posix_rename_fail_policy_keeps_old(tmp_path: Path,
                                                    faulty: FaultServer) -> None:
    """Without posix-rename, 'overwrite: fail' refuses to replace and keeps the old file."""
    faulty.faults.no_posix_rename = True
    (faulty.root / "t").write_bytes(b"old")
    src, _ = payload(tmp_path, 3000)
    dest = SftpDestination(fault_rule(faulty, overwrite="fail"))

    with pytest.raises(PermanentError, match="overwrite: fail"):
        deliver_and_close(dest, src, "t")
    assert (faulty.root / "t").read_bytes() == b"old"


@once
@pytest.mark.parametrize("posix", [True, False])
def test_a_missing_temporary_never_costs_the_file_in_place(
        faulty: FaultServer, posix: bool) -> None:
    """commit renames at once; when the temporary is gone it reports whether the final
    name holds a file, and never removes it — also without posix-rename, where replacing
    means removing the old file first."""
    faulty.faults.no_posix_rename = not posix
    (faulty.root / "t").write_bytes(b"in place")
    dest = SftpDestination(fault_rule(faulty))

    async def go() -> tuple[bool, bool, bool]:
        try:
            return (await dest.commit(Staged("t", ".t.tmp", 8), [("t.sha256", b"x  t\n")]),
                    await dest.commit(Staged("t", ".t.tmp", 8)),
                    await dest.commit(Staged("u", ".u.tmp", 8)))
        finally:
            await dest.close()

    assert asyncio.run(go()) == (True, True, False)
    assert (faulty.root / "t").read_bytes() == b"in place"
    assert (faulty.root / "t.sha256").read_bytes() == b"x  t\n"
    assert not (faulty.root / "u").exists()


def test_concurrency_limit_honoured(tmp_path: Path, faulty: FaultServer) -> None:
    """With concurrency 3, never more than 3 files are open on the server at once, and all
    40 go over one connection."""
    dest = SftpDestination(fault_rule(faulty, concurrency=3))
    srcs = [payload(tmp_path, 50_000 + i, f"s{i}") for i in range(40)]

    async def go() -> None:
        try:
            await asyncio.gather(*(deliver(dest, p, f"out/{p.name}") for p, _ in srcs))
        finally:
            await dest.close()

    asyncio.run(go())
    assert faulty.faults.max_open_files == 3
    assert faulty.faults.connections == 1 and dest.connections == 1
    for p, data in srcs:
        assert (faulty.root / "out" / p.name).read_bytes() == data


def _proxied_rule(tmp_path: Path, sshd: Sshd, proxy: TcpProxy, root: Path,  # noqa: F811
                  **kw: Any) -> SftpRule:
    kh = tmp_path / "kh"
    kh.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_public_key}\n")
    opts: dict[str, Any] = {"name": "p", "identity": sshd.client_key, "known_hosts": kh,
                            **_current, **kw}
    return SftpRule(url=f"sftp://{sshd.user}@127.0.0.1:{proxy.port}{root}", **opts)


def test_many_files_share_one_pooled_connection(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                sftp_dir: Path) -> None:  # noqa: F811
    """60 concurrent deliveries to real sshd use one TCP connection and one login."""
    srcs = [payload(tmp_path, 4096, f"s{i}") for i in range(60)]
    logins = sshd.logins()
    with TcpProxy(sshd.host, sshd.port) as proxy:
        dest = SftpDestination(_proxied_rule(tmp_path, sshd, proxy, sftp_dir))

        async def go() -> None:
            try:
                await asyncio.gather(*(deliver(dest, p, p.name) for p, _ in srcs))
            finally:
                await dest.close()

        asyncio.run(go())
        assert proxy.connections == 1
    assert sshd.logins() == logins + 1
    assert all((sftp_dir / p.name).read_bytes() == d for p, d in srcs)


def test_idle_connection_is_closed_then_reopened(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                 sftp_dir: Path) -> None:  # noqa: F811
    """``idle_timeout``: after that long without a transfer the pooled connection is closed
    (the TCP connection ends; with openssh its processes too) and logged; the next delivery
    logs in again. An operation that lasts longer than the timeout is never cut."""
    src, data = payload(tmp_path, 5000)
    logins = sshd.logins()
    name = f"idle-{_current['transport']}"

    def connected() -> float:  # relay_sftp_connected{destination=name}
        return float(METRICS.registry.get_sample_value(
            "relay_sftp_connected", {"destination": name}) or 0)

    def logins_metric() -> float:
        return float(METRICS.registry.get_sample_value(
            "relay_sftp_logins_total", {"destination": name}) or 0)

    def disconnects() -> int:  # SSH disconnects sshd has logged (a polite close)
        return sshd.log.read_text(errors="replace").count("Received disconnect from")

    logins_before = logins_metric()
    polite = disconnects()
    with TcpProxy(sshd.host, sshd.port) as proxy:
        dest = SftpDestination(_proxied_rule(tmp_path, sshd, proxy, sftp_dir, name=name,
                                             idle_timeout=0.3))

        async def go() -> list[dict[str, Any]]:
            with capture_logs() as logs:
                try:
                    await deliver(dest, src, "one")
                    first = dest.pool.session
                    assert first is not None
                    assert connected() == 1 and logins_metric() == logins_before + 1
                    link = first.link
                    # busy: an operation held three timeouts long keeps the connection
                    async with dest.pool.op("holding"):
                        await asyncio.sleep(0.9)
                        assert dest.pool.session is first and not link.is_closed()
                    # asyncssh finishes a polite close a loop turn after close(): a
                    # poll that wakes in the turn the idle timer fires sees it open
                    await until(lambda: dest.pool.session is None and link.is_closed())
                    assert dest.pool.session is None and link.is_closed()
                    assert connected() == 0
                    await wait_closed(link)  # its processes collected (openssh)
                    # closed politely: the server logs an SSH disconnect, not a reset
                    await until(lambda: disconnects() > polite, 30)
                    assert disconnects() == polite + 1
                    await deliver(dest, src, "two")
                    assert connected() == 1 and logins_metric() == logins_before + 2
                finally:
                    await dest.close()
            assert connected() == 0
            return logs

        logs = asyncio.run(go())
        wait_for(lambda: not any(_open(t) for t in proxy._transports),
                 what="the proxy's connections to close")
        assert proxy.connections == 2
    assert sshd.logins() == logins + 2
    assert (sftp_dir / "one").read_bytes() == data == (sftp_dir / "two").read_bytes()
    idle = [e for e in logs if e["event"] == "sftp_disconnected"]
    assert [e["reason"] for e in idle] == ["idle for 0.3 s"], idle


@once
def test_idle_timeout_zero_keeps_the_connection(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                sftp_dir: Path) -> None:  # noqa: F811
    """``idle_timeout: 0`` never closes it; durations parse like the other timeouts."""
    assert SftpRule(name="p", url="sftp://u@h/x", idle_timeout="5m").idle_timeout == 300
    assert SftpRule(name="p", url="sftp://u@h/x").idle_timeout == 300
    src, _ = payload(tmp_path, 100)
    dest = SftpDestination(rule_for(sshd, sftp_dir, idle_timeout=0))

    async def go() -> None:
        try:
            await deliver(dest, src, "kept")
            assert dest.pool._idle_timer is None and dest.pool.session is not None
        finally:
            await dest.close()

    asyncio.run(go())


def test_reconnects_after_connection_loss(tmp_path: Path, faulty: FaultServer) -> None:
    """A dropped connection fails the attempt retryably; the next one reconnects."""
    src, data = payload(tmp_path, 2_000_000)
    dest = SftpDestination(fault_rule(faulty))

    async def go() -> None:
        try:
            await dest.start()
            faulty.faults.drop_after = 500_000
            with pytest.raises(RetryableError) as lost:
                await write_to(dest, src, "r.bin")
            assert "connection lost" in str(lost.value).lower()
            await deliver(dest, src, "r.bin")
        finally:
            await dest.close()

    asyncio.run(go())
    assert (faulty.root / "r.bin").read_bytes() == data
    assert faulty.faults.drops == 1 and dest.connections == 2


def test_stalled_server_is_aborted_by_watchdog(tmp_path: Path, faulty: FaultServer) -> None:
    """A server that stops answering (connection still up) is cut off after the stall
    timeout, not waited on forever."""
    src, _ = payload(tmp_path, 100_000)
    dest = SftpDestination(fault_rule(faulty, login_timeout=1, keepalive_interval=0.25))

    async def go() -> float:
        try:
            await dest.start()
            faulty.faults.stall = True
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(RetryableError):
                await write_to(dest, src, "s.bin")
            return loop.time() - t0
        finally:
            await dest.close()

    with capture_logs() as logs:
        took = asyncio.run(go())
    assert 0.9 < took < 5
    assert any(e["event"] == "sftp_connection_stalled" for e in logs)


@once
def test_recovery_leaves_an_identical_signal_alone(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                   sftp_dir: Path) -> None:  # noqa: F811
    """After a crash between writing a downstream signal (or a batch's empty _SUCCESS) and
    journalling it, recovery finds it in place with the same bytes and does not rewrite it
    (a rewrite is a second file for downstream watchers); other bytes are rewritten.
    Found by the SFTP crash loop (tests/test_hostile_sftp.py)."""
    from relay.delivery import _put_signal

    dest = SftpDestination(rule_for(sshd, sftp_dir))
    (sftp_dir / "b").mkdir()
    (sftp_dir / "b" / "_SUCCESS").write_bytes(b"")
    (sftp_dir / "x.sha256").write_bytes(b"abc  x\n")
    (sftp_dir / "d.sha256").mkdir()

    async def go() -> list[bool]:
        try:
            got = [await dest.has_identical(t, d) for t, d in (
                ("b/_SUCCESS", b""), ("x.sha256", b"abc  x\n"), ("x.sha256", b"abd  x\n"),
                ("x.sha256", b"abc"), ("missing", b""), ("d.sha256", b""))]
            await _put_signal(dest, "b/_SUCCESS", b"", True)
            await _put_signal(dest, "x.sha256", b"abc  x\n", True)
            await _put_signal(dest, "y.sha256", b"new\n", True)
            return got
        finally:
            await dest.close()

    inodes = {p: (sftp_dir / p).stat().st_ino for p in ("b/_SUCCESS", "x.sha256")}
    assert asyncio.run(go()) == [True, True, False, False, False, False]
    assert {p: (sftp_dir / p).stat().st_ino for p in inodes} == inodes
    assert (sftp_dir / "y.sha256").read_bytes() == b"new\n"


@once
def test_probe_cut_short_is_cleaned_up_by_the_next_one(sshd: Sshd,  # noqa: F811
                                                       sftp_dir: Path) -> None:  # noqa: F811
    """A probe interrupted by a crash (or a lost connection) leaves its scratch files; they
    have names fixed per destination, so the next start's probe removes them. Found by
    the SFTP crash loop: random names stayed in the partner's folder for ever."""
    async def probe_once() -> None:
        dest = SftpDestination(rule_for(sshd, sftp_dir))
        try:
            await dest.start()
        finally:
            await dest.close()

    asyncio.run(probe_once())
    tag = SftpDestination(rule_for(sshd, sftp_dir)).pool.probe_tag
    for x in "abcl":  # what a probe killed at its worst moment leaves behind
        (sftp_dir / f".relay-probe-{tag}.{x}").write_bytes(b"0123456789")
    asyncio.run(probe_once())
    assert [p.name for p in sftp_dir.iterdir()] == []


def test_large_upload_is_flushed_early_beside_the_writes(
        tmp_path: Path, sshd: Sshd, sftp_dir: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each EarlyFlush.window acknowledged is fsynced through a second handle on another
    channel while the writes go on, so the final fsync waits for the tail only; a failing
    early flush changes nothing (the final fsync counts); none without fsync."""
    from relay.destinations.sftp.session import EarlyFlush

    monkeypatch.setattr(EarlyFlush, "window", 1 << 20)
    src, data = payload(tmp_path, 6 << 20)

    async def stage(dest: SftpDestination, target: str) -> Any:
        try:
            staged = await write_to(dest, src, target)
            assert await dest.commit(staged)
            return staged
        finally:
            await dest.close()

    staged = asyncio.run(stage(SftpDestination(rule_for(sshd, sftp_dir)), "a.bin"))
    # One flush at a time: how many fit in 6 MiB depends on the disk (2-5 seen; 1 in CI)
    assert staged.extra["fsynced"] and staged.extra["early_flushes"] >= 1, staged.extra
    assert (sftp_dir / "a.bin").read_bytes() == data
    off = asyncio.run(stage(SftpDestination(rule_for(sshd, sftp_dir, fsync=False)), "b.bin"))
    assert off.extra["early_flushes"] == 0 and not off.extra["fsynced"]

    real_init = EarlyFlush.__init__

    def broken(self: Any, *args: Any) -> None:
        real_init(self, *args)
        self._path += ".missing"  # the open on the second channel fails

    monkeypatch.setattr(EarlyFlush, "__init__", broken)
    failed = asyncio.run(stage(SftpDestination(rule_for(sshd, sftp_dir)), "c.bin"))
    assert failed.extra["fsynced"] and failed.extra["early_flushes"] == 0
    assert (sftp_dir / "c.bin").read_bytes() == data
