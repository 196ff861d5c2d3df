"""relay/destinations/sftp/check.py: what `relay check` tells about an SFTP destination's
login without connecting."""

from __future__ import annotations

import pwd
from pathlib import Path
from typing import Any

import pytest

from relay.destinations.sftp.check import login_file_problems
from relay.destinations.sftp.rule import SftpRule


def _problems(secrets_dir: Path | None, **dest: Any) -> list[str]:
    rule = SftpRule.model_validate({"name": "p", "url": "sftp://u@h/in", **dest})
    return [f"{field}: {message}" for field, message in login_file_problems(rule, secrets_dir)]


def test_login_files_must_be_readable_and_an_openssh_key_private(tmp_path: Path) -> None:
    """An unreadable identity or known_hosts, a secret named without RELAY_SECRETS_DIR or
    missing from it, and, for transport: openssh, a key others may read (ssh ignores it)
    are each named with their field; a destination whose files are all there passes."""
    key, kh, secrets = tmp_path / "id", tmp_path / "kh", tmp_path / "secrets"
    key.write_text("k")
    key.chmod(0o644)
    kh.write_text("")
    secrets.mkdir()
    (secrets / "pw").write_text("pw")
    common = {"known_hosts": str(kh)}

    assert _problems(secrets, identity=str(key), password_secret="pw", **common) == []
    [p] = _problems(secrets, identity=str(key), transport="openssh", **common)
    assert p.startswith("identity: ") and "0644" in p
    key.chmod(0o600)
    assert _problems(secrets, identity=str(key), transport="openssh", **common) == []
    [p] = _problems(secrets, identity=str(tmp_path / "nope"), **common)
    assert p.startswith("identity: ") and "nope" in p
    [p] = _problems(None, identity=str(key), passphrase_secret="pp", **common)
    assert p.startswith("passphrase_secret: ") and "RELAY_SECRETS_DIR is not set" in p
    [p] = _problems(secrets, identity=str(key), passphrase_secret="pp", **common)
    assert "secret 'pp'" in p and "No such file" in p
    [p] = _problems(secrets, identity=str(key), known_hosts=str(tmp_path / "nokh"))
    assert p.startswith("known_hosts: ") and "refused" in p


def test_a_uid_without_passwd_entry_is_a_problem_for_openssh_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh will not run for a UID without a passwd entry (OpenShift's arbitrary UIDs): a
    problem for transport: openssh, none for asyncssh."""

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    key, kh = tmp_path / "id", tmp_path / "kh"
    key.write_text("k")
    key.chmod(0o600)
    kh.write_text("")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for transport, want in (("openssh", 1), ("asyncssh", 0)):
        got = _problems(None, identity=str(key), known_hosts=str(kh), transport=transport)
        assert len(got) == want, got
        assert all(p.startswith("transport: ") and "passwd entry" in p for p in got)
