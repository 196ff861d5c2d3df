"""The journal's state machines, as types: every state a file or a delivery can be in, and
the moves between them that relay makes. Written once here; the journal refuses any other
move (:meth:`relay.journal.Journal.update_file`, ``update_delivery``), so a misspelt state
is a type error and an unplanned transition is an error at the statement that tries it,
not a row nobody reads.

A file (or batch), table ``files``::

    seen → waiting ⇄ ready → delivering → delivered → done → (new content) seen
                  ↘ quarantined          ↘ failed            (relay retry) → waiting

One payload member at one destination, table ``deliveries``::

    pending → staging → renaming → signalling → delivered
        ↖ retry_wait ↙      ↘ (temporary lost) pending     failed → (relay retry) pending
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DELIVERY_MOVES", "FILE_MOVES", "DeliveryState", "FileState", "Result", "Verdict",
           "sources_of"]


class FileState(StrEnum):
    SEEN = "seen"                # recorded, not evaluated yet
    WAITING = "waiting"          # its evidence does not vouch for it (yet): reason says why
    READY = "ready"              # its evidence vouches for it: a job will deliver it
    DELIVERING = "delivering"    # deliveries planned; some destination does not have it yet
    DELIVERED = "delivered"      # every destination has it; the post-action is left
    DONE = "done"                # delivered and post-action applied
    FAILED = "failed"            # a destination gave up (relay retry puts it back)
    QUARANTINED = "quarantined"  # never deliverable as it is (reason says why)


class DeliveryState(StrEnum):
    PENDING = "pending"          # planned, nothing sent (or a failed attempt cleaned up)
    STAGING = "staging"          # being written to its temporary
    RENAMING = "renaming"        # staged and flushed: the rename may have happened
    SIGNALLING = "signalling"    # renamed: its downstream signals may be in place
    RETRY_WAIT = "retry_wait"    # an attempt failed; next_try_at says when to try again
    DELIVERED = "delivered"      # in place with its signals (a history row remembers it)
    FAILED = "failed"            # given up (attempts exhausted, or a permanent error)


class Result(StrEnum):
    """How one destination's attempt at a job ended (not journalled as such)."""

    DELIVERED = "delivered"
    RETRY_WAIT = "retry_wait"
    FAILED = "failed"
    MISMATCH = "mismatch"    # the content differs from its declared digest
    VANISHED = "vanished"    # the source went away


class Verdict(StrEnum):
    """What a payload's (or batch's) evidence says (relay.readiness)."""

    READY = "ready"
    WAITING = "waiting"
    INVALID = "invalid"  # evidence that can never vouch as it is (malformed, a symlink)
    GONE = "gone"        # payload and evidence are gone


F, D = FileState, DeliveryState

# Where each state may be entered from. A row is inserted as SEEN, WAITING or READY (files)
# or PENDING (deliveries), and leaves by being deleted; those are not moves.
FILE_MOVES: dict[FileState, frozenset[FileState]] = {
    F.SEEN: frozenset({F.DONE, F.FAILED, F.QUARANTINED}),  # new content under the name
    F.WAITING: frozenset({F.SEEN, F.WAITING, F.READY, F.DELIVERING, F.DELIVERED, F.FAILED,
                          F.QUARANTINED}),  # not ready after all; or `relay retry`
    F.READY: frozenset({F.SEEN, F.WAITING, F.READY}),
    F.DELIVERING: frozenset({F.READY, F.DELIVERING}),
    F.DELIVERED: frozenset({F.DELIVERING}),
    F.DONE: frozenset({F.DELIVERING, F.DELIVERED}),  # DELIVERING: `then: keep` goes at once
    F.FAILED: frozenset({F.DELIVERING}),
    F.QUARANTINED: frozenset({F.WAITING, F.READY, F.DELIVERING}),
}

DELIVERY_MOVES: dict[DeliveryState, frozenset[DeliveryState]] = {
    D.PENDING: frozenset({D.STAGING, D.RENAMING, D.RETRY_WAIT, D.FAILED}),
    D.STAGING: frozenset({D.PENDING, D.STAGING, D.RETRY_WAIT}),  # STAGING: after a crash
    D.RENAMING: frozenset({D.STAGING, D.RENAMING}),
    D.SIGNALLING: frozenset({D.RENAMING, D.SIGNALLING}),
    D.RETRY_WAIT: frozenset({D.PENDING, D.STAGING, D.RETRY_WAIT}),
    D.DELIVERED: frozenset({D.STAGING, D.RENAMING, D.SIGNALLING}),  # STAGING: a duplicate
    D.FAILED: frozenset({D.PENDING, D.STAGING, D.RENAMING, D.SIGNALLING, D.RETRY_WAIT}),
}


def sources_of(state: FileState | DeliveryState) -> tuple[str, ...]:
    """The states ``state`` may be entered from, as the journal's SQL compares them."""
    moves = FILE_MOVES if isinstance(state, FileState) else DELIVERY_MOVES
    return tuple(sorted(moves[state]))  # type: ignore[index]
