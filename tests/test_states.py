"""relay.states and the journal's enforcement of them: only the moves relay makes."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import JournalError
from relay.journal import Journal
from relay.states import DELIVERY_MOVES, FILE_MOVES, DeliveryState, FileState


def test_every_state_has_its_moves_written_down() -> None:
    """Each state of both machines appears in the table of moves, and every source of a
    move is a state of the same machine."""
    assert set(FILE_MOVES) == set(FileState)
    assert set(DELIVERY_MOVES) == set(DeliveryState)
    assert all(src in FileState for srcs in FILE_MOVES.values() for src in srcs)
    assert all(src in DeliveryState for srcs in DELIVERY_MOVES.values() for src in srcs)
    with pytest.raises(ValueError):
        FileState("delivred")


def test_the_journal_refuses_a_move_relay_does_not_make(tmp_path: Path) -> None:
    """A file that is done cannot go back to delivering, nor a delivered delivery to
    staging: the statement raises JournalError and the row keeps its state. Allowed moves
    pass, and a change to a row that is gone is no error."""
    j = Journal(tmp_path / "j.sqlite3")
    try:
        f = j.upsert_file("in", "a.csv", "file", route="r", state=FileState.READY)
        (d,) = j.plan_deliveries(f.id, [("a.csv", "o", "a.csv")]) or []
        j.update_delivery(d.id, state=DeliveryState.STAGING)
        j.mark_delivered(d, "aa")
        with pytest.raises(JournalError, match="delivered → staging"):
            j.update_delivery(d.id, state=DeliveryState.STAGING)
        j.update_file(f.id, state=FileState.DONE)
        with pytest.raises(JournalError, match="done → delivering"):
            j.update_file(f.id, state=FileState.DELIVERING)
        with pytest.raises(JournalError):
            j.plan_deliveries(f.id, [("a.csv", "o2", "a.csv")])
        assert (j.file_by_id(f.id) or f).state is FileState.DONE
        j.new_generation(f.id, state=FileState.SEEN)  # new content: allowed
        assert (j.file_by_id(f.id) or f).state is FileState.SEEN
        j.delete_file(f.id)
        j.update_file(f.id, state=FileState.WAITING)  # gone: nothing to refuse
    finally:
        j.close()
