"""The error tree. Every exception relay raises on purpose derives from RelayError.

    RelayError
    ├── RulesError            invalid rules: carries every problem with file/line/field
    ├── UnsafePathError       a name or template would leave its root (traversal, NUL, …)
    ├── JournalError          the journal refused a state change relay does not make (a bug)
    └── TransferError         a delivery attempt failed
        ├── RetryableError    try again later (network drop, disk full, busy server)
        │   ├── DigestMismatch  the payload's bytes differ from its declared digest: wait
        │   ├── SourceVanished  the payload disappeared or became unreadable meanwhile
        │   ├── SourceChanged   the payload changed while it was copied: wait
        │   └── SignalFailed    the payload is in place; writing its downstream signal failed
        └── PermanentError    retrying cannot help (refused host key, bad credentials, …)

Backends translate library exceptions into this tree in one place each; the pipeline
decides retry / wait / fail from the type alone.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DigestMismatch",
    "JournalError",
    "PermanentError",
    "RelayError",
    "RetryableError",
    "RuleProblem",
    "RulesError",
    "SignalFailed",
    "SourceChanged",
    "SourceVanished",
    "TransferError",
    "UnsafePathError",
]


class RelayError(Exception):
    """Base of every error relay raises deliberately."""


@dataclass(frozen=True)
class RuleProblem:
    """One thing wrong in a rules file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"


class RulesError(RelayError):
    """The rules are invalid; ``problems`` lists each one with file, line and field."""

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UnsafePathError(RelayError):
    """A relative path or template result would escape its root or is not a valid name."""


class JournalError(RelayError):
    """A state change the journal does not allow (relay.states): a bug, reported as such
    instead of leaving a row in a state nothing reads."""


class TransferError(RelayError):
    """A delivery attempt failed."""


class RetryableError(TransferError):
    """The attempt failed for a reason that may go away: retry with backoff."""


class DigestMismatch(RetryableError):
    """The streamed digest differs from the declared one: the file is not complete yet."""

    def __init__(self, declared: str, computed: str) -> None:
        self.declared = declared
        self.computed = computed
        super().__init__(f"declared digest {declared} but content hashes to {computed}")


class SourceVanished(RetryableError):
    """The source payload is gone (or not readable) while we were about to send it."""


class SourceChanged(RetryableError):
    """The source changed while it was being copied: what was staged is thrown away."""


class SignalFailed(RetryableError):
    """The payload is in place under its final name; writing a downstream signal failed
    (what is left to redo is the signals only)."""


class PermanentError(TransferError):
    """Retrying cannot help without an operator (refused host key, bad login, …)."""
