"""deliver_to, driven directly: the order of side effects at the destination."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from relay.delivery import Member, deliver_to
from relay.destinations.local import LocalDestination
from relay.errors import RetryableError
from relay.journal import Journal
from relay.rules import DestinationRule, Route

ROUTE = Route(name="r", source="in", to=("o",))
RETRY = (0.1, 1.0, 3)


class Recording(LocalDestination):
    """Notes, at every rename of a member, whether the batch marker is visible."""

    def __init__(self, rule: DestinationRule, marker: str) -> None:
        super().__init__(rule)
        self.marker = marker
        self.marker_seen_at_rename: list[str] = []

    async def finish_commit(self, target: str, tmp: str) -> bool:
        if (self.root / self.marker).exists():
            self.marker_seen_at_rename.append(target)
        return await super().finish_commit(target, tmp)


def _generation(journal: Journal, src: Path, dest: Recording, content: bytes,
                first: bool) -> str:
    members = {"b/x.csv": content + b"x", "b/y.csv": content + b"y"}
    for rel, data in members.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    row = journal.upsert_file("in", "b", "batch", route="r", state="ready")
    if not first:
        journal.new_generation(row.id, state="ready")
    journal.plan_deliveries(row.id, [(m, "o", m) for m in members])
    row = journal.file_by_id(row.id) or row
    outcome = asyncio.run(deliver_to(
        journal, dest, row, ROUTE, src, [Member(m, None) for m in members], "b/_SUCCESS",
        RETRY, 60.0))
    assert outcome.state == "delivered", outcome
    for rel, data in members.items():
        assert (dest.root / rel).read_bytes() == data
    return hashlib.sha256(content).hexdigest()


def test_a_redelivered_batch_takes_the_old_marker_down_before_any_member_changes(
        tmp_path: Path) -> None:
    """Generation 2 of a batch into a folder that still holds generation 1's _SUCCESS:
    the old marker is gone before the first member is renamed, and a new marker (a new
    file, so downstream watchers see a new event) is written after the last one."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    dest = Recording(DestinationRule(name="o", url=f"file://{out}"), "b/_SUCCESS")
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        _generation(journal, src, dest, b"one", first=True)
        first_marker = (out / "b/_SUCCESS").stat().st_ino
        assert dest.marker_seen_at_rename == []
        # Keep the old marker's inode busy, so a new marker cannot reuse its number.
        with open(out / "b/_SUCCESS", "rb"):
            _generation(journal, src, dest, b"two", first=False)
            assert dest.marker_seen_at_rename == [], "old _SUCCESS visible during renames"
            assert (out / "b/_SUCCESS").stat().st_ino != first_marker
        assert (out / "b/_SUCCESS").read_bytes() == b""
    finally:
        journal.close()


class NoRoomForSignals(LocalDestination):
    """Renames work; writing a signal fails as a full disk would, until ``room``."""

    room = False

    def _put_small(self, target: str, data: bytes, checked: bool = False) -> None:
        if not self.room:
            raise RetryableError(f"writing signal {target}: disk full")
        super()._put_small(target, data, checked)


def test_a_signal_that_cannot_be_written_leaves_the_delivery_signalling(
        tmp_path: Path) -> None:
    """The payload renamed, its sidecar refused: the journal says 'signalling' at once (so
    `relay status` and the retry start from the signals), the payload is in place without
    a signal, and the retry writes the signal without touching the payload."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "p.csv").write_bytes(b"payload")
    dest = NoRoomForSignals(DestinationRule(name="o", url=f"file://{out}"))
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        row = journal.upsert_file("in", "p.csv", "file", route="r", state="ready")
        journal.plan_deliveries(row.id, [("p.csv", "o", "p.csv")])

        async def attempt() -> str:
            outcome = await deliver_to(journal, dest, row, ROUTE, src,
                                       [Member("p.csv", None)], None, RETRY, 60.0)
            return outcome.state

        assert asyncio.run(attempt()) == "retry_wait"
        [d] = journal.deliveries(row.id)
        assert d.state == "signalling" and d.last_error is not None
        assert "disk full" in d.last_error
        assert (out / "p.csv").read_bytes() == b"payload"
        assert not (out / "p.csv.sha256").exists()
        inode = (out / "p.csv").stat().st_ino
        dest.room = True
        assert asyncio.run(attempt()) == "delivered"
        assert (out / "p.csv").stat().st_ino == inode
        assert (out / "p.csv.sha256").read_text() == \
            f"{hashlib.sha256(b'payload').hexdigest()}  p.csv\n"
    finally:
        journal.close()
