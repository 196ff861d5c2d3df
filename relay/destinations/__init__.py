"""Destination backends, one table of them, and the few things relay asks of the table.

A backend is added by writing its module (its rule model, checks and
:class:`relay.destinations.base.Destination`, see base.py) and one line in ``BACKENDS``;
rules, ``relay check``, ``relay schema`` and the engine find it here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any, Union
from urllib.parse import urlsplit

from pydantic import Discriminator, Tag, TypeAdapter

from relay.destinations import local, memory, sftp
from relay.destinations.base import Backend, CheckContext, Destination, DestinationRule

__all__ = ["BACKENDS", "backend_of", "check_problems", "conflicts", "open_destination",
           "rule_adapter"]

BACKENDS: dict[str, Backend] = {b.scheme: b for b in (
    local.BACKEND,
    sftp.BACKEND,
    memory.BACKEND,
)}


def _scheme(value: Any) -> str | None:
    url = value.get("url") if isinstance(value, dict) else getattr(value, "url", None)
    if not isinstance(url, str):
        return None
    scheme = urlsplit(url).scheme
    return scheme if scheme in BACKENDS else None


@cache
def rule_adapter() -> TypeAdapter[Any]:
    """Validates one destination of a rules file with the model its URL's scheme picks."""
    choices = tuple(Annotated[b.rule, Tag(b.scheme)] for b in BACKENDS.values())
    schemes = ", ".join(f"{s}://" for s in BACKENDS)
    union: Any = Union[choices]  # noqa: UP007 (built from a tuple of types)
    return TypeAdapter(Annotated[union, Discriminator(
        _scheme, custom_error_type="unsupported_scheme",
        custom_error_message=f"unsupported scheme (one of {schemes})",
        custom_error_context={"schemes": schemes})])


def backend_of(rule: DestinationRule) -> Backend:
    return BACKENDS[rule.scheme]


def open_destination(rule: DestinationRule, secrets_dir: Path | None = None) -> Destination:
    """The backend's destination for ``rule``."""
    return backend_of(rule).open(rule, secrets_dir)


def conflicts(rule: DestinationRule, ctx: CheckContext) -> list[tuple[str, str]]:
    """What makes relay refuse to start with this destination."""
    return backend_of(rule).conflicts(rule, ctx)


def check_problems(rule: DestinationRule, ctx: CheckContext) -> list[tuple[str, str]]:
    """What ``relay check`` can tell about this destination without connecting."""
    return backend_of(rule).problems(rule, ctx)
