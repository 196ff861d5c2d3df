"""Readiness: is a payload provably complete? Signals only — never size, mtime age or timers.

* checksum sidecar ``X.sha256`` / ``X.sha512`` / ``X.md5`` — READY iff X hashes to it
  (the hash is checked while streaming the copy; a mismatch sends the file back to waiting);
* completion marker ``X.done`` (suffixes configurable) — READY when present; a digest in
  it is verified like a sidecar;
* directory marker ``_SUCCESS`` — the whole directory is one batch, verified member by
  member against an optional ``SHA256SUMS`` manifest.

A marker written *before* its payload does not vouch for it: if the payload changed after
the marker was last written, relay waits for the marker to be written again. That check
only ever withholds readiness; it never grants it.

What evidence files (sidecars, markers, manifests) say is parsed in
:mod:`relay.signal_files`; :func:`decide` is pure;
:func:`gather` does the small reads.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from relay.rules import ReadyRule
from relay.signal_files import (
    MAX_SIGNAL_BYTES,
    Declared,
    MalformedSignal,
    parse_digest,
    parse_manifest,
)
from relay.states import Verdict

__all__ = [
    "Evidence",
    "SignalKind",
    "classify",
    "decide",
    "gather",
    "gather_batch",
    "through_symlink",
]

SignalKind = Literal["payload", "sidecar", "marker", "dirmarker", "manifest"]


def classify(rel: str, ready: ReadyRule) -> tuple[SignalKind, str]:
    """What ``rel`` is, and the payload (or batch directory) it speaks for."""
    p = PurePosixPath(rel)
    if ready.directory_marker and p.name == ready.directory_marker:
        return "dirmarker", str(p.parent)
    if ready.manifest and ready.directory_marker and p.name == ready.manifest:
        return "manifest", str(p.parent)
    for algo in ready.checksums:
        if rel.endswith("." + algo) and len(p.name) > len(algo) + 1:
            return "sidecar", rel[: -len(algo) - 1]
    for suffix in ready.markers:
        if rel.endswith(suffix) and len(p.name) > len(suffix):
            return "marker", rel[: -len(suffix)]
    return "payload", rel


@dataclass
class Evidence:
    """Why a payload is (not) ready: what ``relay explain`` shows."""

    rel: str
    verdict: Verdict
    reason: str
    evidence_file: str | None = None  # the sidecar or marker the verdict rests on
    declared: Declared | None = None
    size: int | None = None
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)
    stale: bool = False  # waiting only because the marker predates the payload's change


def _read_small(path: Path, stats: list[str] | None = None) -> str:
    """Read an evidence file (at most MAX_SIGNAL_BYTES). Its fingerprint, appended to
    ``stats``, is taken *before* reading: it may then be older than the bytes we read
    (harmless: the next look sees a new fingerprint and decides again), never newer.
    Taken after, a write landing between the read and the fstat (a sidecar read empty
    just after its creation, then written) would be recorded as already judged, and the
    file would wait forever as "malformed sidecar: empty"."""
    # os.open, not open(): four syscalls instead of seven (no isatty ioctl, no lseek, no
    # second read for EOF), each one a wait for the GIL on a busy relay. O_NONBLOCK: a
    # FIFO swapped in after the caller's stat must not hang this thread in open().
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MalformedSignal("not a regular file")
        if stats is not None:
            stats.append(_fp(st))
        # A regular file's read returns all it is asked for unless the file ends first.
        data = os.read(fd, MAX_SIGNAL_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SIGNAL_BYTES:
        raise MalformedSignal(f"larger than {MAX_SIGNAL_BYTES} bytes; not a checksum file")
    # Decoded the way the watcher decodes file names (os.fsdecode: surrogateescape), so a
    # name that is not UTF-8 compares equal to the payload's own name. Bytes that are not
    # text at all are refused later, as a digest that is not hexadecimal.
    return os.fsdecode(data)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return None  # e.g. the sidecar name of a 250-byte payload: it cannot exist
        raise


def through_symlink(root: Path, rel: str) -> str | None:
    """The first folder on the way from ``root`` to ``rel`` that is a symlink, if any.
    Following one could leave the landing zone (and then: delete would delete there)."""
    parts = rel.split("/")[:-1]
    for i in range(len(parts)):
        sub = "/".join(parts[: i + 1])
        if os.path.islink(root / sub):
            return sub
    return None


def _fp(st: os.stat_result | None) -> str:
    return "-" if st is None else f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def decide(
    rel: str,
    payload: os.stat_result | None,
    sidecars: list[tuple[str, str, str | Exception]],
    markers: list[tuple[str, os.stat_result, str | Exception]],
    marker_stale: bool | None,
) -> Evidence:
    """Pure decision for one payload.

    ``sidecars``: (sidecar rel, algo, body or read error); ``markers``: (marker rel, stat,
    body or read error); ``marker_stale``: True/False when the watcher saw the order of the
    last payload change and the last marker write (True: payload after marker), None when it
    saw neither (start-up): then an empty marker older (mtime) than the payload waits.
    Events win over mtimes because rewriting an empty marker does not always bump its mtime
    (ext4 skips it for a truncate to the same size).
    """
    name = PurePosixPath(rel).name
    if payload is not None and not stat.S_ISREG(payload.st_mode):
        kind = "a symlink" if stat.S_ISLNK(payload.st_mode) else "not a regular file"
        return Evidence(rel, Verdict.INVALID, f"payload is {kind}; never followed")
    notes: list[str] = []
    for sig, algo, body in sidecars:
        if isinstance(body, Exception):
            return Evidence(rel, Verdict.INVALID, f"malformed sidecar {sig}: {body}",
                            evidence_file=sig)
        try:
            a, h = parse_digest(body, algo, name)
        except MalformedSignal as exc:
            return Evidence(rel, Verdict.INVALID, f"malformed sidecar {sig}: {exc}",
                            evidence_file=sig, notes=notes)
        ev_decl = Declared(a, h, sig)
        if payload is None:
            return Evidence(rel, Verdict.WAITING, f"sidecar {sig} present, payload missing",
                            evidence_file=sig, declared=ev_decl, notes=notes)
        return Evidence(rel, Verdict.READY, f"sidecar {sig} declares {a}", evidence_file=sig,
                        declared=ev_decl, size=payload.st_size, notes=notes)
    for sig, mst, body in markers:
        if isinstance(body, Exception):
            return Evidence(rel, Verdict.INVALID, f"marker {sig}: {body}", evidence_file=sig)
        if payload is None:
            return Evidence(rel, Verdict.WAITING, f"marker {sig} present, payload missing",
                            evidence_file=sig, notes=notes)
        declared = None
        if body.strip():
            try:
                a, h = parse_digest(body, None, name)
            except MalformedSignal as exc:
                return Evidence(rel, Verdict.INVALID, f"malformed digest in marker {sig}: {exc}",
                                evidence_file=sig)
            declared = Declared(a, h, sig)
        elif _stale(marker_stale, payload.st_mtime_ns, mst.st_mtime_ns):
            # The payload changed after the (empty) marker was written: the marker
            # cannot vouch for these bytes. Only a rewrite of the marker can.
            return Evidence(rel, Verdict.WAITING,
                            f"payload changed after marker {sig}; waiting for a new marker",
                            evidence_file=sig, notes=notes, stale=True)
        return Evidence(rel, Verdict.READY, f"marker {sig}" + (" with digest" if declared else ""),
                        evidence_file=sig, declared=declared, size=payload.st_size, notes=notes)
    if payload is None:
        return Evidence(rel, Verdict.GONE, "payload and evidence are gone")
    return Evidence(rel, Verdict.WAITING, "no sidecar or marker yet", size=payload.st_size,
                    notes=notes)


def _stale(events: bool | None, payload_mtime: int, marker_mtime: int) -> bool:
    """Does an empty marker predate the payload's last change?

    Watcher events decide when they saw both files, except that a marker strictly newer
    than the payload (mtimes only move forward) was written after the payload's last
    change even if its own event has not arrived yet, or was lost in a queue overflow.
    Events saying "fresh" win over mtimes: rewriting an empty marker by truncation does
    not always bump its mtime (ext4). With no events, the mtimes decide.
    """
    if events is None:
        return payload_mtime > marker_mtime
    return events and payload_mtime >= marker_mtime


def gather(root: Path, rel: str, ready: ReadyRule,
           marker_stale: bool | None = None) -> Evidence:
    """Read the payload's stat and its evidence files under ``root``, then :func:`decide`."""
    link = through_symlink(root, rel)
    if link is not None:
        return Evidence(rel, Verdict.INVALID, f"reached through symlinked folder {link}; "
                        "never followed", fingerprint=f"link:{link}")
    pst = _stat(root / rel)
    sidecars: list[tuple[str, str, str | Exception]] = []
    fps = [_fp(pst)]
    for algo in ready.checksums:
        sig = f"{rel}.{algo}"
        sst = _stat(root / sig)
        if sst is None:
            continue
        try:
            if not stat.S_ISREG(sst.st_mode):
                raise MalformedSignal("not a regular file")
            sidecars.append((sig, algo, _read_small(root / sig, fps)))
        except (OSError, MalformedSignal) as exc:
            fps.append(_fp(sst))
            sidecars.append((sig, algo, MalformedSignal(str(exc))))
    markers: list[tuple[str, os.stat_result, str | Exception]] = []
    for suffix in ready.markers:
        sig = f"{rel}{suffix}"
        mst = _stat(root / sig)
        if mst is None:
            continue
        try:
            if not stat.S_ISREG(mst.st_mode):
                raise MalformedSignal("not a regular file")
            markers.append((sig, mst, _read_small(root / sig, fps)))
        except (OSError, MalformedSignal) as exc:
            fps.append(_fp(mst))
            markers.append((sig, mst, MalformedSignal(str(exc))))
    ev = decide(rel, pst, sidecars, markers, marker_stale)
    if ev.stale:
        # Same files, different verdict once the marker's own events arrive: the
        # fingerprint must differ, or the later (ready) evidence looks like no change.
        fps.append("stale")
    ev.fingerprint = "|".join(fps)
    return ev


@dataclass
class BatchEvidence:
    """A directory batch: its members and the digests they must have."""

    directory: str
    verdict: Verdict
    reason: str
    members: dict[str, Declared | None] = field(default_factory=dict)
    fingerprint: str = ""


def gather_batch(root: Path, directory: str, ready: ReadyRule, ignored: object) -> BatchEvidence:
    """Evidence for the batch in ``directory`` (relative; '.' for the source root).

    ``ignored`` is a callable(rel) -> bool for names never considered (hidden files).
    """
    from relay.errors import UnsafePathError
    from relay.paths import safe_relpath

    assert ready.directory_marker
    is_ignored = ignored if callable(ignored) else (lambda _r: False)
    prefix = "" if directory in ("", ".") else directory + "/"
    marker_rel = prefix + ready.directory_marker
    mst = _stat(root / marker_rel)
    if mst is None:
        return BatchEvidence(directory, Verdict.GONE, "directory marker is gone")
    fps = [_fp(mst)]
    members: dict[str, Declared | None] = {}
    manifest_rel = prefix + ready.manifest if ready.manifest else None
    if manifest_rel and _stat(root / manifest_rel) is not None:
        try:
            listed = parse_manifest(_read_small(root / manifest_rel))
        except (OSError, MalformedSignal) as exc:
            return BatchEvidence(directory, Verdict.INVALID, f"manifest {manifest_rel}: {exc}")
        for name, (algo, hexd) in sorted(listed.items()):
            try:
                member = safe_relpath(prefix + safe_relpath(name))
            except UnsafePathError as exc:
                return BatchEvidence(directory, Verdict.INVALID, f"manifest {manifest_rel}: {exc}")
            link = through_symlink(root, member)
            if link is not None:
                return BatchEvidence(directory, Verdict.INVALID, f"manifest {manifest_rel}: member "
                                     f"{member} is reached through symlinked folder {link}; "
                                     "never followed")
            st = _stat(root / member)
            if st is None:
                return BatchEvidence(directory, Verdict.WAITING, f"member {member} not present yet")
            if not stat.S_ISREG(st.st_mode):
                return BatchEvidence(directory, Verdict.INVALID, f"member {member} is not a file")
            fps.append(_fp(st))
            members[member] = Declared(algo, hexd, manifest_rel)
        members[manifest_rel] = None
        fps.append(_fp(_stat(root / manifest_rel)))
    else:
        base = root / directory if directory not in ("", ".") else root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for fn in sorted(filenames):
                full = Path(dirpath) / fn
                rel = full.relative_to(root).as_posix()
                if rel == marker_rel or is_ignored(rel):
                    continue
                st = _stat(full)
                if st is None or not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_mtime_ns > mst.st_mtime_ns:
                    return BatchEvidence(directory, Verdict.WAITING,
                                         f"member {rel} changed after {marker_rel}")
                fps.append(_fp(st))
                members[rel] = None
    if not members:
        return BatchEvidence(directory, Verdict.WAITING, "directory marker present, no members")
    return BatchEvidence(directory, Verdict.READY, f"directory marker {marker_rel}", members,
                         "|".join(fps))
