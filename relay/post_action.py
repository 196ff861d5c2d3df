"""The post-action (``then: keep | delete | archive:DIR``), applied to a source once every
destination has its file: which source paths it touches, and the re-check before it does.

They run off the event loop (the engine's coalesced calls): plain functions on paths.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from relay.readiness import gather, through_symlink
from relay.rules import ReadyRule

__all__ = ["apply_then", "recheck_then_apply", "source_paths"]


def source_paths(kind: str, rel: str, ready: ReadyRule, members: list[str]) -> list[str]:
    """What the post-action moves: a file with its checksum sidecars and markers, or a
    batch's members, its manifest and, last, its directory marker."""
    if kind == "file":
        return [rel, *[f"{rel}.{a}" for a in ready.checksums],
                *[rel + s for s in ready.markers]]
    prefix = "" if rel == "." else rel + "/"
    paths = list(members)
    if ready.manifest:
        paths.append(prefix + ready.manifest)
    paths.append(prefix + str(ready.directory_marker))  # the marker goes last
    return paths


def recheck_then_apply(root: Path, rel: str, ready: ReadyRule, fingerprint: str | None,
                        paths: list[str], then: str) -> bool:
    """Apply ``then`` to ``paths`` unless the file at ``rel`` (with ``fingerprint``; None:
    a batch, nothing to re-check) changed after it was delivered: False, nothing touched."""
    if fingerprint is not None:
        ev = gather(root, rel, ready, False)
        if ev.fingerprint != fingerprint and ev.verdict != "gone" and (root / rel).exists():
            return False
    apply_then(root, paths, then)
    return True


def apply_then(root: Path, paths: list[str], then: str) -> None:
    """keep | delete | archive:DIR — applied to the payload and its signal files."""
    archive = Path(then.split(":", 1)[1]) if then.startswith("archive:") else None
    for rel in paths:
        p = root / rel
        if through_symlink(root, rel) is not None:
            raise OSError(f"refusing to touch {rel}: reached through a symlinked folder")
        if not os.path.lexists(p):
            continue
        if archive is None:
            os.unlink(p)
            continue
        dst = archive / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(p, dst)
        except OSError:
            shutil.move(str(p), str(dst))  # another filesystem: copy then delete
