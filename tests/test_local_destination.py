"""LocalDestination: every copy path yields the exact bytes and their digests."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

import pytest

from relay.destinations.local import LocalDestination, LocalRule
from relay.errors import RetryableError
from tests.helpers import write_to


def _stage(dest: LocalDestination, src: Path, target: str) -> dict[str, str]:
    async def go() -> dict[str, str]:
        staged = await write_to(dest, src, target, ("md5",))
        assert (dest.root / staged.tmp).exists() and not (dest.root / target).exists()
        assert await dest.commit(staged)
        return staged.digests

    return asyncio.run(go())


@pytest.mark.parametrize("size", [0, 1, 5_000_000, 9 * 1024 * 1024 + 7])
@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_paths_are_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
                              kernel_copy: bool) -> None:
    """Small, large, in-kernel and fallback copies all produce identical bytes and digests."""
    if not kernel_copy:
        def refuse(*_a: object, **_k: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    (tmp_path / "out").mkdir()
    dest = LocalDestination(LocalRule(name="o", url=f"file://{tmp_path / 'out'}"))
    digests = _stage(dest, tmp_path / "src", "a/b/f.bin")
    assert (tmp_path / "out/a/b/f.bin").read_bytes() == data
    assert digests == {"sha256": hashlib.sha256(data).hexdigest(),
                       "md5": hashlib.md5(data).hexdigest()}
    assert [p.name for p in (tmp_path / "out/a/b").iterdir()] == ["f.bin"]


def test_symlink_escape_in_destination_refused(tmp_path: Path) -> None:
    """A folder inside the destination that links outside it is never written through."""
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "sub").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "src").write_bytes(b"x")
    dest = LocalDestination(LocalRule(name="o", url=f"file://{tmp_path / 'out'}"))
    with pytest.raises(Exception, match="outside"):
        _stage(dest, tmp_path / "src", "sub/f")
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("via_link", [False, True])
def test_folder_check_agrees_with_realpath(tmp_path: Path, via_link: bool) -> None:
    """The lstat walk that checks a destination folder gives the same answer as comparing
    realpaths, for links inside and outside the root, '..', files in the way, missing
    folders, and a root that is itself reached through a symlink."""
    root = tmp_path / "out"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "in_link").symlink_to(root / "a")
    (root / "out_link").symlink_to(tmp_path / "elsewhere")
    (root / "a" / "up").symlink_to(tmp_path)
    (root / "file").write_text("x")
    (tmp_path / "root_link").symlink_to(root)
    url_root = tmp_path / "root_link" if via_link else root
    dest = LocalDestination(LocalRule(name="o", url=f"file://{url_root}"))
    for rel in ["x", "a/x", "a/b/x", "in_link/x", "out_link/x", "a/up/x", "a/up/out/x",
                "new/dir/x", "file/x", "a/../x", "a/../../x", "in_link/../x"]:
        folder = (dest.root / rel).parent
        assert dest._inside(folder) == dest._inside_slow(folder), rel


def test_missing_root_is_retryable_not_created(tmp_path: Path) -> None:
    """A missing destination root (unmounted volume) is an error, never silently created."""
    (tmp_path / "src").write_bytes(b"x")
    dest = LocalDestination(LocalRule(name="o", url=f"file://{tmp_path / 'gone'}"))
    with pytest.raises(RetryableError, match="does not exist"):
        _stage(dest, tmp_path / "src", "f")
    assert not (tmp_path / "gone").exists()
