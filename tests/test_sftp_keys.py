"""relay/destinations/sftp/keys.py: `relay check` asks the reader each transport uses
whether it can load the identity, with the passphrase from the secret — the key formats
the two transports read differ, and a wrong passphrase should show before a delivery."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh
import pytest

from relay.destinations.sftp.keys import identity_problem
from relay.destinations.sftp.rule import SftpRule
from tests.helpers import RELAY, relay_env, write_rules
from tests.sshd_server import make_key

pytestmark = pytest.mark.timeout(60)


def _rule(key: Path, transport: str) -> SftpRule:
    return SftpRule(name="p", url="sftp://u@h/in", identity=key,  # type: ignore[arg-type]
                           transport=transport)


def _keys(tmp_path: Path) -> dict[str, Path]:
    """The same ed25519 key: plain OpenSSH, OpenSSH encrypted by ssh-keygen, PKCS#8
    encrypted by asyncssh (all mode 0600, as ssh wants)."""
    key = make_key(tmp_path / "plain")
    (tmp_path / "plain").chmod(0o600)
    enc = tmp_path / "enc"
    enc.write_bytes((tmp_path / "plain").read_bytes())
    enc.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", "s3cret", "-f", str(enc)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)
    key.write_private_key(str(tmp_path / "pkcs8"), "pkcs8-pem", passphrase="s3cret")
    (tmp_path / "pkcs8").chmod(0o600)
    return {"plain": tmp_path / "plain", "enc": enc, "pkcs8": tmp_path / "pkcs8"}


def test_openssh_asks_ssh_keygen(tmp_path: Path) -> None:
    """ssh reads its own format, with or without a passphrase, but no PKCS#8 ed25519 key;
    a wrong or missing passphrase is named."""
    keys = _keys(tmp_path)
    assert identity_problem(_rule(keys["plain"], "openssh"), None) is None
    assert identity_problem(_rule(keys["enc"], "openssh"), "s3cret") is None
    wrong = identity_problem(_rule(keys["enc"], "openssh"), "wrong")
    assert wrong is not None and "passphrase" in wrong, wrong
    missing = identity_problem(_rule(keys["enc"], "openssh"), None)
    assert missing is not None and "no passphrase_secret" in missing, missing
    pkcs8 = identity_problem(_rule(keys["pkcs8"], "openssh"), "s3cret")
    assert pkcs8 is not None and "invalid format" in pkcs8, pkcs8


def test_asyncssh_asks_asyncssh(tmp_path: Path) -> None:
    """asyncssh reads PKCS#8 with its passphrase and plain OpenSSH keys; an encrypted
    OpenSSH-format key needs bcrypt, which relay does not install: named."""
    keys = _keys(tmp_path)
    assert identity_problem(_rule(keys["plain"], "asyncssh"), None) is None
    assert identity_problem(_rule(keys["pkcs8"], "asyncssh"), "s3cret") is None
    wrong = identity_problem(_rule(keys["pkcs8"], "asyncssh"), "wrong")
    assert wrong is not None and "asyncssh cannot load" in wrong, wrong
    with pytest.raises(ImportError):
        import bcrypt  # noqa: F401  (if it were installed, the next check would not hold)
    enc = identity_problem(_rule(keys["enc"], "asyncssh"), "s3cret")
    assert enc is not None and "bcrypt" in enc, enc


def test_relay_check_reports_a_key_the_transport_cannot_load(tmp_path: Path) -> None:
    """`relay check` fails on a PKCS#8 key with transport: openssh, naming the field, and
    passes with the same key on asyncssh (which reads it)."""
    keys = _keys(tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "kh").write_text("")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pp").write_text("s3cret\n")
    for transport, code in (("openssh", 1), ("asyncssh", 0)):
        rules = write_rules(tmp_path / f"rules-{transport}", source=tmp_path / "in",
                            dests={"partner": "sftp://u@h.example/in"},
                            extra_dest={"partner": {
                                "transport": transport, "identity": str(keys["pkcs8"]),
                                "passphrase_secret": "pp",
                                "known_hosts": str(tmp_path / "kh")}})
        res = subprocess.run([*RELAY, "check"],
                             env=relay_env(tmp_path, rules, RELAY_SECRETS_DIR=str(secrets)),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == code, (transport, res.stdout + res.stderr)
        if code:
            assert "destinations[partner].identity" in res.stderr
            assert "invalid format" in res.stderr, res.stderr
    assert asyncssh.read_private_key(str(keys["pkcs8"]), "s3cret") is not None
