"""deliver_to, driven directly: the order of side effects at the destination."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from relay.delivery import Member, RetryPolicy, deliver_to
from relay.destinations.memory import MemoryDestination, MemoryRule, Store, store
from relay.errors import RetryableError
from relay.journal import Journal
from relay.rules import Route

ROUTE = Route(name="r", source="in", to=("o",))
RETRY = RetryPolicy(0.1, 1.0, 3)


def _generation(journal: Journal, src: Path, dest: MemoryDestination, content: bytes,
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
        assert dest.store.files[rel] == data
    return hashlib.sha256(content).hexdigest()


def _order(st: Store, since: int) -> list[tuple[str, str]]:
    """The marker's and the members' renames, in the order they happened."""
    return [e for e in st.events[since:] if e[0] != "write"]


def test_a_redelivered_batch_takes_the_old_marker_down_before_any_member_changes(
        tmp_path: Path) -> None:
    """Generation 2 of a batch into a folder that still holds generation 1's _SUCCESS:
    the old marker is gone before the first member is renamed, and a new marker is
    written after the last one."""
    src = tmp_path / "in"
    src.mkdir()
    dest = MemoryDestination(MemoryRule(name="o", url="mem://batch-redelivery"))
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        _generation(journal, src, dest, b"one", first=True)
        assert _order(dest.store, 0) == [
            ("rename", "b/x.csv"), ("rename", "b/y.csv"), ("announce", "b/_SUCCESS")]
        since = len(dest.store.events)
        _generation(journal, src, dest, b"two", first=False)
        assert _order(dest.store, since) == [
            ("remove", "b/_SUCCESS"), ("rename", "b/x.csv"), ("rename", "b/y.csv"),
            ("announce", "b/_SUCCESS")]
        assert dest.store.files["b/_SUCCESS"] == b""
    finally:
        journal.close()
        store("batch-redelivery").files.clear()


class NoRoomForSignals(MemoryDestination):
    """Renames work; writing a signal fails as a full disk would, until ``room``."""

    room = False

    async def announce(self, target: str, data: bytes) -> None:
        if not self.room:
            raise RetryableError(f"writing signal {target}: disk full")
        await super().announce(target, data)


def test_a_signal_that_cannot_be_written_leaves_the_delivery_signalling(
        tmp_path: Path) -> None:
    """The payload renamed, its sidecar refused: the journal says 'signalling' at once (so
    `relay status` and the retry start from the signals), the payload is in place without
    a signal, and the retry writes the signal without touching the payload."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "p.csv").write_bytes(b"payload")
    dest = NoRoomForSignals(MemoryRule(name="o", url="mem://no-room"))
    files = dest.store.files
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
        assert files["p.csv"] == b"payload"
        assert "p.csv.sha256" not in files
        renames = [e for e in dest.store.events if e[0] == "rename"]
        dest.room = True
        assert asyncio.run(attempt()) == "delivered"
        assert [e for e in dest.store.events if e[0] == "rename"] == renames  # not again
        assert files["p.csv.sha256"] == \
            f"{hashlib.sha256(b'payload').hexdigest()}  p.csv\n".encode()
    finally:
        journal.close()
        files.clear()
