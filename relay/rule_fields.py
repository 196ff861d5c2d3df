"""The building blocks every rule model is made of: a strict, frozen base model, names and
durations. Shared by :mod:`relay.rules` and the destination backends' own rule models
(``relay/destinations/*``), which is why it imports nothing else of relay's."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["NAME_PATTERN", "Duration", "Name", "Strict", "parse_duration"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """``30``, ``"30s"``, ``"15m"``, ``"24h"``, ``"2d"`` → seconds; None stays None."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 24h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


# A number of seconds, written as ``30``, ``30s``, ``15m``, ``24h`` or ``2d`` in a rules file.
Duration = Annotated[float, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Strict(BaseModel):
    """Unknown keys are errors (a typo must not be ignored) and rules never change once
    loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
