"""Producers other than relay's test code writing into a watched landing zone through a
real sshd: OpenSSH's ``sftp`` (a ``put`` cut short, then ``reput``, sidecar last; and a
sidecar sent before its payload), and ``rclone copy`` (its ``.partial`` names, and
``--inplace``). relay, watching the landing zone, never forwards a file whose content
differs from its sidecar, and forwards each right one exactly once; an observer polls what
it delivers."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    RELAY,
    RelayProc,
    larger_than,
    relay_env,
    sha256,
    wait_for,
    write_rules,
)
from tests.observer import Observer
from tests.rclone_server import rclone, rclone_remote
from tests.sshd_server import Sshd, sftp_dir, sshd  # noqa: F401
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)

MB = 1 << 20


class Zone:
    """A landing folder on the sshd watched by `relay run`, forwarding to a local folder
    that an observer polls."""

    def __init__(self, tmp_path: Path, landing: Path, expected: dict[str, str]) -> None:
        self.landing = landing
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.rules = write_rules(tmp_path / "rules", source=landing,
                                 dests={"out": f"file://{self.out}"})
        self.tmp = tmp_path
        self.relay = RelayProc(tmp_path, self.rules)
        self.observer = Observer(self.out, expected, interval=0.005)

    def delivered(self) -> Counter[str]:
        """How often each file was delivered (``file_delivered`` events)."""
        return Counter(e["file"] for e in self.relay.events("file_delivered"))

    def status(self) -> dict[str, list[dict[str, object]]]:
        res = subprocess.run([*RELAY, "status", "--json"], env=relay_env(self.tmp, self.rules),
                             capture_output=True, text=True, timeout=30, check=True)
        lists: dict[str, list[dict[str, object]]] = json.loads(res.stdout)["lists"]
        return lists


MakeZone = Callable[[dict[str, str]], Zone]


@pytest.fixture
def zone_factory(tmp_path: Path, sftp_dir: Path  # noqa: F811
                 ) -> Iterator[Callable[[dict[str, str]], Zone]]:
    """Makes the test's one Zone (landing = the test's sftp_dir) with relay running and
    the observer expecting ``expected``; both stopped afterwards."""
    made: list[Zone] = []

    def make(expected: dict[str, str]) -> Zone:
        z = Zone(tmp_path, sftp_dir, expected)
        z.relay.start()
        z.relay.wait_started()
        z.observer.start()
        made.append(z)
        return z

    yield make
    for z in made:
        z.observer.stop()
        z.relay.stop()


def sftp_batch(server: Sshd, commands: str, port: int | None = None,
               known_hosts: Path | None = None) -> subprocess.Popen[str]:
    """OpenSSH's ``sftp -b -`` running ``commands`` against ``server`` (or through a proxy
    on ``port``, whose host key line is in ``known_hosts``)."""
    proc = subprocess.Popen(
        ["sftp", "-b", "-", "-P", str(port or server.port), "-i", str(server.client_key),
         "-o", f"UserKnownHostsFile={known_hosts or server.known_hosts}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
         f"{server.user}@{server.host}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdin is not None
    proc.stdin.write(commands)
    proc.stdin.close()
    return proc


def finished(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """(exit code, output) of an sftp_batch() once it has ended."""
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read()  # to EOF: sftp has exited or closed its output
    return proc.wait(60), out


def sidecar(path: Path, data: bytes) -> Path:
    side = Path(f"{path}.sha256")
    side.write_text(f"{sha256(data)}  {path.name}\n")
    return side


def proxied_known_hosts(tmp_path: Path, server: Sshd, proxy: TcpProxy) -> Path:
    kh = tmp_path / f"kh.{proxy.port}"
    kh.write_text(f"[127.0.0.1]:{proxy.port} {server.host_public_key}\n")
    return kh


def test_sftp_put_cut_then_reput_sidecar_last(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                              sftp_dir: Path,  # noqa: F811
                                              zone_factory: MakeZone) -> None:
    """OpenSSH sftp's ``put`` is cut mid-file (the partial sits under the final name, no
    sidecar); relay forwards nothing. ``reput`` finishes it, the sidecar follows: relay
    forwards it once, byte-identical."""
    data = os.urandom(6 * MB)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    side = sidecar(local, data)
    zone: Zone = zone_factory({"big.bin": sha256(data)})
    remote = sftp_dir / "big.bin"
    with TcpProxy(sshd.host, sshd.port, rate=2 * MB) as proxy:
        put = sftp_batch(sshd, f'put "{local}" "{remote}"\n', proxy.port,
                         proxied_known_hosts(tmp_path, sshd, proxy))
        wait_for(larger_than(remote, MB), 30, "the put under way")
        proxy.cut()
        code, out = finished(put)
    assert code != 0, out
    partial = remote.stat().st_size
    assert 0 < partial < len(data)
    code, out = finished(sftp_batch(sshd, f'reput "{local}" "{remote}"\n'
                                          f'put "{side}" "{remote}.sha256"\n'))
    assert code == 0, out
    wait_for(lambda: (zone.out / "big.bin.sha256").exists(), 30, "the delivery")
    assert (zone.out / "big.bin").read_bytes() == data
    assert zone.delivered() == {"big.bin": 1}
    assert zone.observer.violations == [] and zone.observer.polls > 10
    assert not [e for e in zone.relay.events("file_ready") if e["file"] != "big.bin"]


def test_sftp_sidecar_first_then_payload(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                         sftp_dir: Path,  # noqa: F811
                                         zone_factory: MakeZone) -> None:
    """A producer that sends the sidecar first and the payload after (slowly): relay
    waits while the content does not match the sidecar and forwards the file once, when
    it does."""
    data = os.urandom(4 * MB)
    local = tmp_path / "late.bin"
    local.write_bytes(data)
    side = sidecar(local, data)
    zone: Zone = zone_factory({"late.bin": sha256(data)})
    remote = sftp_dir / "late.bin"
    with TcpProxy(sshd.host, sshd.port, rate=2 * MB) as proxy:
        put = sftp_batch(sshd, f'put "{side}" "{remote}.sha256"\nput "{local}" "{remote}"\n',
                         proxy.port, proxied_known_hosts(tmp_path, sshd, proxy))
        wait_for(larger_than(remote, MB), 30, "the payload under way")
        wait_for(lambda: zone.relay.events("file_waiting"), 30, "relay waiting on it")
        assert not (zone.out / "late.bin").exists()
        code, out = finished(put)
    assert code == 0, out
    wait_for(lambda: (zone.out / "late.bin.sha256").exists(), 30, "the delivery")
    assert (zone.out / "late.bin").read_bytes() == data
    assert zone.delivered() == {"late.bin": 1}
    assert zone.observer.violations == [] and zone.observer.polls > 10


@pytest.mark.parametrize("mode", ["partial", "inplace"])
def test_rclone_copy_with_sidecars(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                   sftp_dir: Path, zone_factory: MakeZone,  # noqa: F811
                                   mode: str) -> None:
    """``rclone copy`` of files and their sidecars, four at a time (so a sidecar often
    lands before its payload): through its ``.partial`` names, or ``--inplace`` under the
    final names. Each right file is forwarded once; one whose sidecar does not match its
    content is never forwarded and waits with a digest mismatch; no ``.partial`` name is
    ever forwarded."""
    src = tmp_path / "produced"
    files = {"big.bin": os.urandom(3 * MB), "small.csv": b"a,b\n" * 500, "empty.dat": b"",
             "nested/deeper/ünï cødé.txt": "grüße\n".encode() * 1000,
             **{f"batch/f{i}.bin": os.urandom(64 * 1024 + i) for i in range(6)}}
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        sidecar(p, data)
    (src / "bad.bin").write_bytes(b"what was sent")
    sidecar(src / "bad.bin", b"what was meant")
    zone: Zone = zone_factory({rel: sha256(d) for rel, d in files.items()})
    flags = ["--inplace"] if mode == "inplace" else []
    rclone("copy", str(src), rclone_remote(sshd, sftp_dir), "--transfers", "4",
           "--bwlimit", "4M", *flags, timeout=90)
    wait_for(lambda: all((zone.out / f"{rel}.sha256").exists() for rel in files), 60,
             "every file delivered")
    for rel, data in files.items():
        assert (zone.out / rel).read_bytes() == data, rel
    # Log lines are written at the end of relay's loop turn: the last may trail the file.
    wait_for(lambda: set(zone.delivered()) >= set(files), 10, "every delivery logged")
    assert zone.delivered() == dict.fromkeys(files, 1)
    assert not (zone.out / "bad.bin").exists()
    waiting = {str(w["file"]): w for w in zone.status()["waiting"]}
    assert set(waiting) == {"bad.bin"}, waiting
    assert str(waiting["bad.bin"]["reason"]).startswith("not complete yet: declared ")
    assert zone.observer.violations == [] and zone.observer.polls > 10
    # rclone's own temporaries: seen, waited on (no signal), forgotten once renamed away
    partials = {e["file"] for e in zone.relay.events("file_seen")
                if str(e["file"]).endswith(".partial")}
    assert (len(partials) > 0) == (mode == "partial")
    wait_for(lambda: partials <= {e["file"] for e in zone.relay.events("file_forgotten")},
             10, "every .partial name forgotten")
