"""The contract every destination backend must pass (relay/destinations/base.py).

One suite, parametrised over every backend: local folders, SFTP on both transports (a real
OpenSSH sshd), and the in-memory backend. A new backend is done when it passes here. Each
test drives the backend the way the pipeline does (relay.hops opens the payload and owns
the hash) or the whole pipeline (relay.delivery.deliver_to)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.delivery import Member, RetryPolicy, deliver_to, signal_body
from relay.destinations.base import Destination, Staged
from relay.destinations.local import LocalDestination, LocalRule
from relay.destinations.memory import MemoryDestination, MemoryRule, store
from relay.destinations.sftp.destination import SftpDestination
from relay.destinations.sftp.rule import SftpRule
from relay.errors import PermanentError, RelayError
from relay.hops import Hops
from relay.journal import Journal
from relay.rules import Route
from relay.signal_files import Declared
from tests.helpers import Recorder, until
from tests.sshd_server import Sshd, sshd  # noqa: F401

pytestmark = pytest.mark.timeout(120)
ROUTE = Route(name="r", source="in", to=("far",))
RETRY = RetryPolicy(0.05, 0.2, 3)


@dataclass
class Far:
    """The far side of one backend under test: how to make its destination, and how a
    consumer there would see the files."""

    kind: str
    make: Callable[[], Destination]
    files: Callable[[], dict[str, bytes]]    # visible final names → content
    names: Callable[[], set[str]]            # every name, hidden temporaries too
    put: Callable[[str, bytes], None]        # place a file there, as someone else would
    folder: Path | None = None               # where the files are on this machine, if they are
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def link_out(self, rel: str, outside: Path) -> None:
        """A symlink at ``rel`` pointing out of the root (backends with folders only)."""
        assert self.folder is not None
        (self.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(outside, self.folder / rel)


def _walk(root: Path, hidden: bool) -> dict[str, bytes]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        if not hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for fn in files:
            if fn.startswith(".") and not hidden:
                continue
            p = Path(dirpath) / fn
            try:
                out[p.relative_to(root).as_posix()] = p.read_bytes()
            except FileNotFoundError:  # renamed away between the listing and the read
                continue
    return out


def _folder_far(kind: str, root: Path, make: Callable[[], Destination]) -> Far:
    root.mkdir(parents=True, exist_ok=True)

    def put(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)

    return Far(kind, make, lambda: _walk(root, False), lambda: set(_walk(root, True)), put,
               root)


WITH_FOLDERS = ["local", "sftp-asyncssh", "sftp-openssh"]
ALL = [*WITH_FOLDERS, "memory"]


@pytest.fixture
def far(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Far]:
    kind: str = request.param
    if kind == "local":
        root = tmp_path / "far"
        yield _folder_far(kind, root, lambda: LocalDestination(
            LocalRule(name="far", url=f"file://{root}")))
    elif kind.startswith("sftp-"):
        server: Sshd = request.getfixturevalue("sshd")
        root = server.root / f"conformance-{request.node.name}"[:100]
        root = root.with_name("".join(c if c.isalnum() else "-" for c in root.name))
        import shutil
        shutil.rmtree(root, ignore_errors=True)
        yield _folder_far(kind, root, lambda: SftpDestination(SftpRule(
            name="far", url=server.url(root), identity=server.client_key,
            known_hosts=server.known_hosts, transport=kind.removeprefix("sftp-"),
            connect_timeout=5, login_timeout=5)))
        shutil.rmtree(root, ignore_errors=True)
    else:
        name = "".join(c if c.isalnum() else "-" for c in f"conformance-{request.node.name}")
        st = store(name)

        def put(rel: str, data: bytes) -> None:
            st.files[rel] = data

        yield Far(kind, lambda: MemoryDestination(MemoryRule(name="far", url=f"mem://{name}")),
                  st.visible, lambda: set(st.files), put)
        st.files.clear()
        st.events.clear()


def run(far: Far, scenario: Callable[[Destination], Any]) -> Any:
    """``scenario(dest)`` on a started destination, closed afterwards (one event loop)."""
    async def go() -> Any:
        dest = far.make()
        await dest.start()
        try:
            return await scenario(dest)
        finally:
            await dest.close()

    return asyncio.run(go())


async def deliver(dest: Destination, src: Path, target: str,
                  announcements: list[tuple[str, bytes]] | None = None) -> Staged:
    """Write then commit, as the pipeline does (with relay's own signal by default)."""
    hops = Hops()
    staged = await hops.write(dest, src, src.stat().st_size, target, dest.temporary(target),
                              (), Recorder())
    body = signal_body(target, staged.sha256)
    anns = [(target + ".sha256", body)] if announcements is None else announcements
    assert await hops.commit(dest, staged, anns)
    return staged


def source(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    p = tmp_path / "src" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the contract ----------------------------------------------------------------------

@pytest.mark.parametrize("far", ALL, indirect=True)
def test_round_trip(tmp_path: Path, far: Far) -> None:
    """A file arrives byte for byte with its sidecar; the digests are of every byte; no
    temporary is left behind."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = source(tmp_path, data)
    staged = run(far, lambda d: deliver(d, src, "f.bin"))
    assert staged.sha256 == sha(data) and staged.size == len(data)
    assert far.files() == {"f.bin": data, "f.bin.sha256": f"{sha(data)}  f.bin\n".encode()}
    assert far.names() == set(far.files())


@pytest.mark.parametrize("far", ALL, indirect=True)
def test_empty_file(tmp_path: Path, far: Far) -> None:
    """An empty payload is delivered as an empty file (not skipped, not an error)."""
    src = source(tmp_path, b"")
    staged = run(far, lambda d: deliver(d, src, "empty", []))
    assert staged.size == 0 and staged.sha256 == sha(b"")
    assert far.files() == {"empty": b""}


@pytest.mark.parametrize("far", ALL, indirect=True)
@pytest.mark.parametrize("target", ["with space/ä ö ü — 名前.csv", "line\nbreak.txt",
                                    "a/b/c/d/e/deep.bin"])
def test_awkward_names_and_nested_folders(tmp_path: Path, far: Far, target: str) -> None:
    """Names with spaces, unicode or a newline, and folders that do not exist yet, arrive
    under exactly that name."""
    src = source(tmp_path, b"payload")
    run(far, lambda d: deliver(d, src, target, []))
    assert far.files() == {target: b"payload"}


@pytest.mark.parametrize("far", ALL, indirect=True)
def test_replaces_an_existing_name(tmp_path: Path, far: Far) -> None:
    """New content under a name that exists replaces it (atomically where the backend
    says it can)."""
    far.put("r.csv", b"old content")
    src = source(tmp_path, b"new content")

    run(far, lambda d: deliver(d, src, "r.csv", []))
    assert far.files() == {"r.csv": b"new content"}


@pytest.mark.parametrize("far", ALL, indirect=True)
def test_the_temporary_never_shows_under_the_final_name(tmp_path: Path, far: Far) -> None:
    """After write and before commit, a consumer sees the old file (or none) under the
    final name; commit then shows the new one."""
    far.put("t.bin", b"old")
    data = os.urandom(1024 * 1024)
    src = source(tmp_path, data)

    async def scenario(dest: Destination) -> None:
        hops = Hops()
        staged = await hops.write(dest, src, len(data), "t.bin", dest.temporary("t.bin"), (),
                                  Recorder())
        assert far.files() == {"t.bin": b"old"}
        assert await hops.commit(dest, staged, [])

    run(far, scenario)
    assert far.files() == {"t.bin": data}


@pytest.mark.parametrize("far", ALL, indirect=True)
def test_announcements_come_after_the_payload(tmp_path: Path, far: Far) -> None:
    """A consumer polling while files are delivered never sees a sidecar before its
    payload, nor a payload with other content than its sidecar names."""
    files = {f"d/{i}.bin": os.urandom(20_000 + i * 50_000) for i in range(8)}
    for rel, data in files.items():
        source(tmp_path, data, rel)
    seen: list[str] = []
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            now = far.files()
            for name, content in now.items():
                if name.endswith(".sha256"):
                    payload = now.get(name.removesuffix(".sha256"))
                    if payload is None:
                        seen.append(f"{name} before its payload")
                    elif content.split()[0].decode() != sha(payload):
                        seen.append(f"{name} names other content")
                elif content != files.get(name):
                    seen.append(f"{name} visible with wrong content")

    watcher = threading.Thread(target=observe, daemon=True)
    watcher.start()
    try:
        run(far, lambda d: asyncio.gather(*(deliver(d, tmp_path / "src" / rel, rel)
                                             for rel in files)))
    finally:
        stop.set()
        watcher.join(10)
    assert seen == []
    assert {k: v for k, v in far.files().items() if not k.endswith(".sha256")} == files


def _pipeline(far: Far, tmp_path: Path, rel: str, declared: Declared | None) -> Any:
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        row = journal.upsert_file("in", rel, "file", route="r", state="ready")
        journal.plan_deliveries(row.id, [(rel, "far", rel)])
        row = journal.file_by_id(row.id) or row
        return run(far, lambda d: deliver_to(journal, d, row, ROUTE, tmp_path / "src",
                                             [Member(rel, declared)], None, RETRY, 60.0))
    finally:
        journal.close()


@pytest.mark.parametrize("far", ALL, indirect=True)
def test_a_digest_mismatch_leaves_nothing_behind(tmp_path: Path, far: Far) -> None:
    """A payload whose bytes differ from its declared digest is not delivered, and its
    temporary is gone: nothing at all is left at the destination."""
    source(tmp_path, b"the bytes as they are", "m.csv")
    outcome = _pipeline(far, tmp_path, "m.csv", Declared("sha256", sha(b"other"), "m.csv.sha256"))
    assert outcome.state == "mismatch"
    assert far.names() == set()


@pytest.mark.parametrize("far", ALL, indirect=True)
def test_a_redelivery_of_the_same_content_is_recognised(tmp_path: Path, far: Far) -> None:
    """has_identical: true only for a regular file holding exactly those bytes; the
    pipeline skips a second delivery of the same content to the same place."""
    source(tmp_path, b"once", "o.csv")
    assert _pipeline(far, tmp_path, "o.csv", None).state == "delivered"
    far.put("other", b"once!")

    async def scenario(dest: Destination) -> list[bool]:
        return [await dest.has_identical("o.csv", b"once"),
                await dest.has_identical("o.csv", b"onc"),
                await dest.has_identical("other", b"once"),
                await dest.has_identical("missing", b"once")]

    assert run(far, scenario) == [True, False, False, False]
    before = far.files()
    assert _pipeline(far, tmp_path, "o.csv", None).state == "delivered"  # skipped: same bytes
    assert far.files() == before


@pytest.mark.parametrize("far", ALL, indirect=True)
def test_an_interrupted_write_resumes_or_restarts_cleanly(tmp_path: Path, far: Far) -> None:
    """A write cut off mid-way, then written again with what it had acknowledged (or with
    a claim larger than what the destination holds): the file is exactly the source —
    resumed where the backend can prove the prefix, rewritten otherwise, never appended
    blindly."""
    data = os.urandom(24 * 1024 * 1024)
    src = source(tmp_path, data)

    async def scenario(dest: Destination) -> tuple[int, list[int], bool]:
        hops, tmp = Hops(), dest.temporary("big.bin")
        first = Recorder()
        task = asyncio.ensure_future(hops.write(dest, src, len(data), "big.bin", tmp, (),
                                                first))
        await until(lambda: any(n > 0 for n in first.reports) or task.done(), 30)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        acked = max(first.reports, default=0)
        kept = []
        for claim in (acked, acked + 4096, len(data) + 1):
            staged = await hops.write(dest, src, len(data), "big.bin", tmp, (),
                                      Recorder(claim))
            assert staged.sha256 == sha(data) and staged.size == len(data)
            kept.append(staged.resumed_from)
        assert await hops.commit(dest, staged, [])
        return acked, kept, dest.abilities.resumable

    acked, kept, resumable = run(far, scenario)
    assert far.files() == {"big.bin": data}
    assert far.names() == {"big.bin"}
    assert acked > 0
    # Resumed exactly where acknowledged, where the backend can prove it; a claim beyond
    # the source is never trusted; a backend that cannot resume always rewrites.
    assert kept == ([acked, acked + 4096, 0] if resumable else [0, 0, 0])


@pytest.mark.parametrize("far", ALL, indirect=True)
@pytest.mark.parametrize("target", ["../escape.bin", "/abs.bin"])
def test_a_path_that_would_leave_the_root_is_refused(tmp_path: Path, far: Far,
                                                     target: str) -> None:
    """The pipeline never renders such a target; if one reached a backend anyway, it
    refuses it and writes nothing."""
    src = source(tmp_path, b"x")

    async def scenario(dest: Destination) -> None:
        await deliver(dest, src, target, [])

    with pytest.raises(RelayError):
        run(far, scenario)
    assert far.names() == set()
    if far.folder is not None:
        assert not (far.folder.parent / "escape.bin").exists()


@pytest.mark.parametrize("far", WITH_FOLDERS, indirect=True)
def test_a_symlink_at_the_destination_is_refused(tmp_path: Path, far: Far) -> None:
    """A folder or file at the destination that is a symlink leading out of the root is
    never written through, and never taken for a delivered file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"x")
    far.link_out("linked", outside)
    far.link_out("lnk.csv", outside / "f")
    src = source(tmp_path, b"x")

    async def scenario(dest: Destination) -> bool:
        with pytest.raises(PermanentError):
            await deliver(dest, src, "linked/f.csv", [])
        return await dest.has_identical("lnk.csv", b"x")

    assert run(far, scenario) is False
    assert sorted(p.name for p in outside.iterdir()) == ["f"]
