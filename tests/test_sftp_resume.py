"""Resuming interrupted SFTP uploads: continue at the acknowledged offset when the partial
is proven, otherwise delete it, restart from zero and count the fallback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from relay.destinations.base import Staged
from relay.destinations.sftp.destination import SftpDestination
from relay.destinations.sftp.rule import SftpRule
from relay.errors import RetryableError
from tests.fault_sftp import FaultServer, fault_server
from tests.helpers import journal_delivery, run_cut_transfer, sha256, write_to
from tests.sshd_server import Sshd, sftp_dir, sshd  # noqa: F401
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20


@pytest.fixture
def faulty(tmp_path: Path, sshd: Sshd) -> Iterator[FaultServer]:  # noqa: F811
    with fault_server(tmp_path / "fault", sshd.client_key) as fs:
        yield fs


def fault_rule(fs: FaultServer, **kw: Any) -> SftpRule:
    return SftpRule(name="faulty", url=fs.url(), identity=fs.client_key,
                           known_hosts=fs.known_hosts, connect_timeout=5, login_timeout=5,
                           **kw)


def interrupted(dest: SftpDestination, fs: FaultServer, src: Path, cut: int) -> int:
    """Start an upload, let the server drop the connection after ``cut`` bytes; return the
    acknowledged byte count the pipeline would have journalled."""
    acks: list[int] = [0]

    async def go() -> None:
        await dest.start()
        fs.faults.drop_after = cut
        with pytest.raises(RetryableError):
            await write_to(dest, src, "big.bin", (), progress=acks.append)
        await dest.close()

    asyncio.run(go())
    assert fs.faults.drops == 1 and 0 < acks[-1] <= cut
    return acks[-1]


def again(dest: SftpDestination, src: Path, acked: int) -> Staged:
    async def go() -> Staged:
        try:
            staged = await write_to(dest, src, "big.bin", (), acked=acked)
            assert await dest.commit(staged)
            return staged
        finally:
            await dest.close()

    return asyncio.run(go())


def test_resume_continues_at_acknowledged_offset(tmp_path: Path, faulty: FaultServer) -> None:
    """After a drop, the next attempt reopens the temporary, sends only the rest, and the
    result (and the digest, rebuilt from the source prefix) is exact."""
    data = os.urandom(6 * MB + 777)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    dest = SftpDestination(fault_rule(faulty))
    acked = interrupted(dest, faulty, src, 3 * MB)
    before = faulty.faults.written
    with capture_logs() as logs:
        staged = again(dest, src, acked)
    assert staged.resumed_from == acked and staged.fallbacks == 0
    assert staged.digests["sha256"] == hashlib.sha256(data).hexdigest()
    assert faulty.faults.written - before == len(data) - acked
    assert (faulty.root / "big.bin").read_bytes() == data
    assert any(e["event"] == "transfer_resumed" for e in logs)


@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_resume_through_cutting_proxy_to_real_sshd(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                   sftp_dir: Path,  # noqa: F811
                                                   transport: str) -> None:
    """A TCP connection to OpenSSH cut mid-file: the file completes byte-identical and
    the bytes sent in total stay under 1.15x its size (on both transports: with openssh,
    more is in flight in pipes and ssh's buffers at the cut)."""
    data = os.urandom(48 * MB)  # what was in flight at the cut (<= 4 MiB) is sent twice
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    with TcpProxy(sshd.host, sshd.port, cut_after=30 * MB) as proxy:
        kh = tmp_path / "kh"
        kh.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_public_key}\n")
        rule = SftpRule(name="p", url=f"sftp://{sshd.user}@127.0.0.1:{proxy.port}"
                               f"{sftp_dir}", identity=sshd.client_key, known_hosts=kh,
                               transport=transport)
        dest = SftpDestination(rule)
        acks: list[int] = [0]

        async def first() -> None:
            try:
                with pytest.raises(RetryableError):
                    await write_to(dest, src, "big.bin", (), progress=acks.append)
            finally:
                await dest.close()  # the lost connection's sockets and processes collected

        asyncio.run(first())
        assert proxy.cuts == 1 and acks[-1] > 20 * MB
        staged = again(dest, src, acks[-1])
        assert proxy.connections == 2
        assert proxy.bytes_up < 1.15 * len(data), proxy.bytes_up / len(data)
    assert staged.resumed_from == acks[-1] and staged.fallbacks == 0
    assert (sftp_dir / "big.bin").read_bytes() == data


def test_fallback_when_server_truncates_on_open(tmp_path: Path, faulty: FaultServer) -> None:
    """A server that empties the file on reopen is caught; the upload restarts from zero,
    the fallback is counted and the result is still exact."""
    data = os.urandom(4 * MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    dest = SftpDestination(fault_rule(faulty))
    acked = interrupted(dest, faulty, src, 2 * MB)
    faulty.faults.truncate_on_open = True  # after the probe saw a well-behaved server
    with capture_logs() as logs:
        staged = again(dest, src, acked)
    assert staged.fallbacks == 1 and staged.resumed_from == 0
    assert (faulty.root / "big.bin").read_bytes() == data
    reasons = [e["reason"] for e in logs if e["event"] == "transfer_resume_fallback"]
    assert reasons == ["server truncated the temporary on open"]


def test_fallback_when_server_ignores_offsets(tmp_path: Path, faulty: FaultServer) -> None:
    """A server that appends instead of writing at the offset is caught by the size check;
    the upload restarts from zero (counted) and never keeps the garbled file."""
    data = os.urandom(4 * MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    dest = SftpDestination(fault_rule(faulty))
    acked = interrupted(dest, faulty, src, 3 * MB)
    faulty.faults.ignore_offsets = True
    staged = again(dest, src, acked // 2)  # the journal lags: the partial holds more
    assert staged.fallbacks == 1 and staged.resumed_from == 0
    assert (faulty.root / "big.bin").read_bytes() == data


def test_probe_disables_resume_on_a_truncating_server(tmp_path: Path,
                                                      faulty: FaultServer) -> None:
    """When the first-connect probe finds a truncating server, a resume is not even tried:
    the partial is deleted and the fallback counted."""
    faulty.faults.truncate_on_open = True
    data = os.urandom(2 * MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    dest = SftpDestination(fault_rule(faulty))
    acked = interrupted(dest, faulty, src, MB)
    assert dest.capabilities["resume"] is False
    assert dest.capabilities["truncates_on_open"] is True
    with capture_logs() as logs:
        staged = again(dest, src, acked)
    assert staged.fallbacks == 1 and (faulty.root / "big.bin").read_bytes() == data
    assert "probe" in next(e["reason"] for e in logs
                           if e["event"] == "transfer_resume_fallback")


def test_short_or_missing_temporary(tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """A temporary shorter than the acknowledged count is a fallback; a missing one simply
    restarts (nothing stale to delete)."""
    data = os.urandom(MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    (sftp_dir / ".big.bin.tmp").write_bytes(data[:1000])
    rule = SftpRule(name="p", url=sshd.url(sftp_dir), identity=sshd.client_key,
                           known_hosts=sshd.known_hosts)
    staged = again(SftpDestination(rule), src, 5000)
    assert staged.fallbacks == 1 and (sftp_dir / "big.bin").read_bytes() == data
    staged = again(SftpDestination(rule), src, 5000)
    assert staged.fallbacks == 0 and staged.resumed_from == 0


def test_readback_prefix_mismatch_falls_back(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                             sftp_dir: Path) -> None:  # noqa: F811
    """With verify: readback a partial whose prefix differs from the source is discarded;
    a matching one is resumed."""
    data = os.urandom(2 * MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    rule = SftpRule(name="p", url=sshd.url(sftp_dir), identity=sshd.client_key,
                           known_hosts=sshd.known_hosts, verify="readback")
    bad = bytearray(data[:MB])
    bad[12345] ^= 0xFF
    (sftp_dir / ".big.bin.tmp").write_bytes(bytes(bad))
    staged = again(SftpDestination(rule), src, MB)
    assert staged.fallbacks == 1 and (sftp_dir / "big.bin").read_bytes() == data
    (sftp_dir / ".big.bin.tmp").write_bytes(data[:MB])
    staged = again(SftpDestination(rule), src, MB)
    assert staged.fallbacks == 0 and staged.resumed_from == MB
    assert (sftp_dir / "big.bin").read_bytes() == data


# -- through `relay run` ---------------------------------------------------------------------


def test_relay_run_resumes_after_cut(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                     sftp_dir: Path) -> None:  # noqa: F811
    """`relay run` to real sshd: the connection is cut mid-file; the retry resumes from the
    journalled offset, bytes sent stay under 1.15x the size and the result is exact."""
    size = 24 * MB
    with TcpProxy(sshd.host, sshd.port, rate=12 * MB) as proxy:
        kh = tmp_path / "kh"
        kh.write_text(f"[127.0.0.1]:{proxy.port} {sshd.host_public_key}\n")
        url = f"sftp://{sshd.user}@127.0.0.1:{proxy.port}{sftp_dir}"
        data, relay = run_cut_transfer(tmp_path, proxy, url, sshd.client_key, kh, sftp_dir,
                                        size)
        assert proxy.cuts == 1 and proxy.connections == 2
        assert proxy.bytes_up < 1.15 * size, proxy.bytes_up / size
    assert (sftp_dir / "big.bin").read_bytes() == data
    assert (sftp_dir / "big.bin.sha256").read_text() == f"{sha256(data)}  big.bin\n"
    assert "transfer_resumed" in relay.logs()
    assert journal_delivery(tmp_path / "journal.sqlite3") == ("delivered", 2, 0)


def test_relay_run_counts_fallback(tmp_path: Path, faulty: FaultServer) -> None:
    """`relay run` against a server that starts truncating on open after the probe: the
    retry cannot resume, restarts from zero, and the journal counts one fallback."""
    size = 8 * MB
    with TcpProxy(faulty.host, faulty.port, rate=8 * MB) as proxy:
        kh = tmp_path / "kh"
        kh.write_text(faulty.known_hosts.read_text().replace(f":{faulty.port}",
                                                              f":{proxy.port}"))
        url = f"sftp://test@127.0.0.1:{proxy.port}/"

        def truncate_from_now_on() -> None:
            faulty.faults.truncate_on_open = True

        data, relay = run_cut_transfer(tmp_path, proxy, url, faulty.client_key, kh,
                                        faulty.root, size, truncate_from_now_on)
    assert (faulty.root / "big.bin").read_bytes() == data
    assert "transfer_resume_fallback" in relay.logs(), relay.logs()[-6000:]
    assert journal_delivery(tmp_path / "journal.sqlite3") == ("delivered", 2, 1)
