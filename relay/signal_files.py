"""Signal files' contents: checksum sidecars (GNU ``sha256sum`` and BSD ``SHA256 (x) = …``
forms), digests inside completion markers, and ``SHA256SUMS`` manifests. Pure parsers: what
a file declares, or :class:`MalformedSignal` saying why it cannot be trusted. Reading the
files, and deciding readiness from them, is :mod:`relay.readiness`."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DIGEST_LENGTHS",
    "MAX_SIGNAL_BYTES",
    "Declared",
    "MalformedSignal",
    "parse_digest",
    "parse_manifest",
]

DIGEST_LENGTHS = {"md5": 32, "sha256": 64, "sha512": 128}
_BY_LENGTH = {v: k for k, v in DIGEST_LENGTHS.items()}
MAX_SIGNAL_BYTES = 64 * 1024  # a "sidecar" larger than this is malformed, never read whole
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_BSD = re.compile(r"^(MD5|SHA256|SHA512|SHA2-256|SHA2-512)\s*\((.*)\)\s*=\s*([0-9a-fA-F]+)\s*$",
                  re.DOTALL)
_GNU = re.compile(r"(\S+)[ \t](.*)", re.DOTALL)  # digest, one blank, [type flag] name
_UNESCAPE = {"\\": "\\", "n": "\n", "r": "\r"}  # coreutils: \\, \n, \r in escaped names
_BSD_ALGO = {"MD5": "md5", "SHA256": "sha256", "SHA512": "sha512",
             "SHA2-256": "sha256", "SHA2-512": "sha512"}


class MalformedSignal(ValueError):
    """A sidecar, marker or manifest whose content cannot be trusted."""


@dataclass(frozen=True)
class Declared:
    """A digest some evidence file (sidecar, marker, manifest) declares for a payload."""

    algo: str
    hexdigest: str
    evidence_file: str  # relative path of the sidecar, marker or manifest that declared it


def _check_hex(algo: str | None, hexd: str) -> tuple[str, str]:
    if not _HEX.match(hexd):
        raise MalformedSignal(f"digest is not hexadecimal: {hexd[:80]!r}")
    if algo is None:
        algo = _BY_LENGTH.get(len(hexd))
        if algo is None:
            raise MalformedSignal(f"digest of {len(hexd)} hex digits matches no known algorithm")
    elif len(hexd) != DIGEST_LENGTHS[algo]:
        raise MalformedSignal(
            f"{algo} digest must have {DIGEST_LENGTHS[algo]} hex digits, got {len(hexd)}")
    return algo, hexd.lower()


def _unescape(name: str) -> str | None:
    """Undo coreutils' escaping of a name (None if an escape is not one it writes)."""
    out, it = [], iter(name)
    for c in it:
        if c == "\\":
            c = _UNESCAPE.get(next(it, ""), "")
            if not c:
                return None
        out.append(c)
    return "".join(out)


def _parse_line(line: str) -> tuple[str | None, str, str | None] | None:
    """One checksum line → (algo if the line names it, digest text, named file or None
    for a bare digest); None for an escaped line with an invalid escape.

    As GNU coreutils writes and reads them: the name is the rest of the line verbatim
    (leading/trailing spaces, a leading '*'), after one blank and the text/binary flag
    (' ' or '*'); a line starting with a backslash has ``\\``, ``\n``, ``\r`` escaped in
    its name. A trailing CR is a CRLF line ending: coreutils escapes a CR in a name.
    """
    ln = line.removesuffix("\r").lstrip(" \t")
    escaped = ln.startswith("\\")
    if escaped:
        ln = ln[1:]
    if m := _BSD.match(ln):
        algo, name, hexd = _BSD_ALGO[m.group(1)], m.group(2), m.group(3)
    elif len(ln.split()) == 1:
        return None, ln.strip(), None
    elif m := _GNU.match(ln):
        algo, hexd, rest = None, m.group(1), m.group(2)
        # "<hex> name" (one blank: BSD reversed) has no flag; coreutils reads it so too.
        name = rest[1:] if len(rest) > 1 and rest[0] in " *" else rest
    else:
        return None, ln.strip(), None  # not a checksum line: refused as not hexadecimal
    if escaped:
        unescaped = _unescape(name)
        if unescaped is None:
            return None
        name = unescaped
    return algo, hexd, name


def parse_digest(text: str, algo: str | None, payload_name: str) -> tuple[str, str]:
    """Parse a sidecar/marker body into ``(algo, hexdigest)`` for ``payload_name``.

    Accepts bare hex, GNU coreutils (``<hex>  name`` / ``<hex> *name``, and the escaped
    ``\\<hex>  na\\nme`` form) and BSD (``SHA256 (name) = <hex>``, also escaped) lines —
    whatever ``sha256sum`` / ``sha256sum --tag`` write, for any name. ``algo`` None infers
    it from the digest length. A multi-line file must contain a line naming the payload.
    Raises MalformedSignal.
    """
    # Lines end at LF only: a name may hold any other control character unescaped.
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        raise MalformedSignal("empty")
    candidates = [c for c in map(_parse_line, lines) if c is not None]
    if len(candidates) == 1 and candidates[0][2] is None:
        a, h, _ = candidates[0]
        return _check_hex(algo or a, h)
    # Exact names first; then a line whose name differs only by trailing blanks a producer
    # left (tolerated: the digest is verified anyway).
    for exact in (True, False):
        for a2, h2, named in candidates:
            base = None if named is None else named.rsplit("/", 1)[-1]
            if base is not None and (base if exact else base.rstrip(" \t")) == payload_name:
                if a2 and algo and a2 != algo:
                    raise MalformedSignal(f"declares {a2} in a .{algo} sidecar")
                return _check_hex(algo or a2, h2)
    names = [n for _, _, n in candidates if n]
    raise MalformedSignal(f"no line names {payload_name!r} (names: {names[:3]})")


def parse_manifest(text: str) -> dict[str, tuple[str, str]]:
    """``SHA256SUMS``-style manifest → ``{relative member path: (algo, hex)}``, with the
    lines read like :func:`parse_digest` reads them.

    Member names are returned as written; the caller checks them with safe_relpath.
    """
    out: dict[str, tuple[str, str]] = {}
    for ln in text.split("\n"):
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        parsed = _parse_line(ln)
        if parsed is None:
            raise MalformedSignal(f"manifest line with an invalid escape: {ln[:80]!r}")
        algo, hexd, name = parsed
        if not name:
            raise MalformedSignal(f"manifest line without a file name: {ln[:80]!r}")
        out[name] = _check_hex(algo, hexd)
    if not out:
        raise MalformedSignal("manifest lists no files")
    return out
