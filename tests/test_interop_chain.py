"""A chain of hops that follow the same protocol: landing zone A → relay → an sshd's folder
B (SFTP) → a second relay watching B → C, with 50 mixed files (empty to 2 MiB, nested,
spaced and unicode names, sidecars and markers with digests), observers at B and C. Then independent
consumers check what arrived: ``sha256sum -c`` on relay's sidecars, ``rclone check``
against the source (locally and over SFTP) and ``rclone hashsum sha256`` over SFTP."""

from __future__ import annotations

import random
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.helpers import RelayProc, drop, sha256, wait_for, write_rules
from tests.observer import Observer
from tests.rclone_server import rclone, rclone_remote
from tests.sshd_server import Sshd, sftp_dir, sshd  # noqa: F401

pytestmark = pytest.mark.timeout(150)

SIGNALS = ("*.sha256", "*.done")


def mixed_files(n: int, seed: int) -> dict[str, bytes]:
    """``n`` payloads of mixed sizes and names, reproducible from ``seed``."""
    rnd = random.Random(seed)
    folders = ["", "reports/", "reports/2026/12/", "with space/", "ünï/cødé ✓/", "deep/a/b/c/"]
    sizes = [0, 1, 100, 4096, 65_536, 300_001, 2 * 1024 * 1024]
    return {f"{folders[i % len(folders)]}{'f' if i % 3 else 'Datei ü '}{i}.bin":
            rnd.randbytes(sizes[i % len(sizes)]) for i in range(n)}


def sidecars_by_folder(root: Path) -> dict[Path, list[str]]:
    found: dict[Path, list[str]] = defaultdict(list)
    for side in root.rglob("*.sha256"):
        found[side.parent].append(side.name)
    return found


@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_chain_a_relay_b_relay_c_and_consumers(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                               sftp_dir: Path,  # noqa: F811
                                               transport: str) -> None:
    """50 files dropped in A reach C through two relays and B, each exactly once per hop,
    byte-identical; neither observer ever sees a partial, a wrong content or a signal
    before its payload; sha256sum -c and rclone accept every delivered file."""
    files = mixed_files(50, seed=19)
    expected = {rel: sha256(data) for rel, data in files.items()}
    a, b, c = tmp_path / "A", sftp_dir, tmp_path / "C"
    a.mkdir()
    c.mkdir()
    rules1 = write_rules(tmp_path / "rules1", source=a, dests={"b": sshd.url(b)},
                         ready={"checksums": ["sha256"], "markers": [".done"]},
                         extra_dest={"b": {"identity": str(sshd.client_key),
                                           "known_hosts": str(sshd.known_hosts),
                                           "transport": transport}})
    rules2 = write_rules(tmp_path / "rules2", source=b, dests={"c": f"file://{c}"})
    (tmp_path / "r1").mkdir()
    (tmp_path / "r2").mkdir()
    hop1 = RelayProc(tmp_path / "r1", rules1, "hop1")
    hop2 = RelayProc(tmp_path / "r2", rules2, "hop2")
    observers = [Observer(b, expected), Observer(c, expected)]
    try:
        for relay in (hop1, hop2):
            relay.start()
        for relay in (hop1, hop2):
            relay.wait_started()
        for o in observers:
            o.start()
        for i, (rel, data) in enumerate(files.items()):
            payload = drop(a, rel, data, "none" if i % 4 == 0 else "sha256")
            if i % 4 == 0:  # a marker carrying its digest, the other kind of signal
                Path(f"{payload}.done").write_text(f"{sha256(data)}  {payload.name}\n")
        wait_for(lambda: all((c / f"{rel}.sha256").exists() for rel in files), 90,
                 "all 50 files at C")
    finally:
        for o in observers:
            o.stop()
        for relay in (hop1, hop2):
            relay.stop()
    for o in observers:
        assert o.violations == [] and o.polls > 10, (o.root, o.violations[:5])
    for rel, data in files.items():
        assert (b / rel).read_bytes() == data and (c / rel).read_bytes() == data, rel
    for relay in (hop1, hop2):
        assert Counter(e["file"] for e in relay.events("file_delivered")) == dict.fromkeys(
            files, 1), relay.log_path
    assert not [p for p in (*b.rglob(".*"), *c.rglob(".*"))], "temporaries left behind"

    # Consumers that know nothing of relay.
    for hop in (b, c):  # the sidecars relay wrote over SFTP and to a folder
        for folder, names in sidecars_by_folder(hop).items():
            res = subprocess.run(["sha256sum", "--check", "--strict", *sorted(names)],
                                 cwd=folder, capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
        assert sum(len(n) for n in sidecars_by_folder(hop).values()) == len(files)
    excludes = [arg for pattern in SIGNALS for arg in ("--exclude", pattern)]
    rclone("check", str(a), str(c), *excludes)
    # Over SFTP, rclone reads the files back (--download) rather than running md5sum or
    # sha256sum in a shell on the server, which a jailed partner account has no access to
    # (and which took ~0.25 s a file here, one command each).
    rclone("check", "--download", str(a), rclone_remote(sshd, b), *excludes)
    listed = rclone("hashsum", "sha256", "--download", rclone_remote(sshd, b),
                    *excludes).stdout
    got = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in listed.splitlines()}
    assert got == expected
    side_digests = {str((folder / n).relative_to(c))[: -len(".sha256")]:
                    (folder / n).read_text().split()[0]
                    for folder, names in sidecars_by_folder(c).items() for n in names}
    assert side_digests == expected
