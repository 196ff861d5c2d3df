"""Safe relative paths, glob matching and destination path templates.

Everything here is pure. A relative path that could leave its root (``..``, absolute,
NUL, empty segments that hide one) raises :class:`UnsafePathError`; callers never join
an unchecked name onto a root.
"""

from __future__ import annotations

import re
import string
from datetime import datetime
from functools import lru_cache
from pathlib import PurePosixPath

from relay.errors import UnsafePathError

__all__ = [
    "TEMPLATE_FIELDS",
    "check_template",
    "compile_glob",
    "render_template",
    "safe_relpath",
]

TEMPLATE_FIELDS = frozenset(
    {"path", "name", "stem", "suffix", "ext", "dir", "source", "route",
     "year", "month", "day", "hour"}
)
_MAX_COMPONENT = 255


def safe_relpath(rel: str) -> str:
    """Normalise ``rel`` to ``a/b/c`` or raise UnsafePathError if it is unsafe.

    Empty and ``.`` segments are dropped (so ``{dir}/{name}`` with an empty dir works);
    ``..``, absolute paths, NUL bytes and over-long components are refused.
    """
    if "\x00" in rel:
        raise UnsafePathError(f"NUL byte in path {rel!r}")
    if rel.startswith("/"):
        raise UnsafePathError(f"absolute path {rel!r}")
    parts = []
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UnsafePathError(f"'..' in path {rel!r}")
        if len(part.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT:
            raise UnsafePathError(f"path component longer than 255 bytes in {rel!r}")
        parts.append(part)
    if not parts:
        raise UnsafePathError(f"empty path {rel!r}")
    return "/".join(parts)


def _fields(template: str) -> list[str]:
    out = []
    for _literal, field, spec, conv in string.Formatter().parse(template):
        if field is None:
            continue
        if spec or conv:
            raise UnsafePathError(f"format specs/conversions are not allowed: {{{field}}}")
        out.append(field)
    return out


def check_template(template: str) -> None:
    """Raise UnsafePathError if ``template`` names unknown fields or is absolute."""
    try:
        fields = _fields(template)
    except ValueError as exc:
        raise UnsafePathError(f"malformed template {template!r}: {exc}") from None
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
    if unknown:
        raise UnsafePathError(
            f"unknown template field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(TEMPLATE_FIELDS))}"
        )
    if template.startswith("/"):
        raise UnsafePathError("template must be relative to the destination root")
    if ".." in template.split("/"):
        raise UnsafePathError("template must not contain '..'")


class _TemplateValues(dict[str, str]):
    """The fields of a destination template, each worked out only when the template
    uses it (the default ``{path}`` needs none of the others)."""

    def __init__(self, rel: str, source: str, route: str, when: datetime) -> None:
        super().__init__(path=rel, source=source, route=route)
        self.rel, self.when = rel, when

    def __missing__(self, key: str) -> str:
        if key in ("year", "month", "day", "hour"):
            value = getattr(self.when, key)
            return f"{value:04d}" if key == "year" else f"{value:02d}"
        p = PurePosixPath(self.rel)
        if key == "name":
            return p.name
        if key == "stem":
            return p.stem
        if key == "suffix":
            return p.suffix
        if key == "ext":
            return p.suffix[1:]
        if key == "dir":
            return str(p.parent) if str(p.parent) != "." else ""
        raise KeyError(key)


def render_template(template: str, rel: str, *, source: str, route: str, when: datetime) -> str:
    """Render the destination path of source-relative ``rel``; the result is safe_relpath'd."""
    values = _TemplateValues(rel, source, route, when)
    # Empty fields (e.g. {dir} at the top level) may leave a leading "/"; the template
    # itself was checked to be relative, so the result is relative too.
    return safe_relpath(template.format_map(values).lstrip("/"))


@lru_cache(maxsize=512)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Translate a glob to a regex over ``/``-separated relative paths.

    ``*`` and ``?`` stay within one segment, ``**`` spans segments (``a/**/b`` also
    matches ``a/b``), ``[...]`` is a character class.
    """
    i, n, out = 0, len(pattern), []
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)
