"""``transport: openssh`` (relay/destinations/sftp/openssh.py): what differs from the asyncssh
transport. The shared behaviour (delivery, probe, host keys, logins, drops, stalls) is
tested on both transports in test_sftp_destination.py."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from relay.destinations.sftp import openssh as sftp_openssh
from relay.destinations.sftp.destination import SftpDestination
from relay.destinations.sftp.openssh import OpensshLink, _spawn
from relay.destinations.sftp.openssh_login import ssh_options
from relay.destinations.sftp.rule import SftpRule
from relay.errors import PermanentError, RetryableError
from tests.helpers import start_error, write_to
from tests.sshd_server import Sshd, make_key, sftp_dir, sshd  # noqa: F401

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


def rule(server: Sshd, root: Path, **kw: object) -> SftpRule:
    opts: dict[str, object] = {"identity": server.client_key,
                               "known_hosts": server.known_hosts, "transport": "openssh",
                               "connect_timeout": 5, "login_timeout": 5}
    opts.update(kw)
    return SftpRule(name="partner", url=server.url(root), **opts)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: only its parent has not collected it yet
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def _wait_gone(pids: list[int], seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def test_rule_needs_a_way_to_log_in(tmp_path: Path) -> None:
    """Neither identity nor password, or a passphrase without a key to unlock, is a rules
    error at load time; a password alone is enough."""
    base = {"name": "p", "url": "sftp://u@h/in", "transport": "openssh"}
    with pytest.raises(ValidationError, match="needs `identity`"):
        SftpRule(**base)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="passphrase_secret unlocks `identity`"):
        SftpRule(**base, password_secret="pw", passphrase_secret="pp")  # type: ignore[arg-type]
    assert SftpRule(**base, password_secret="pw").identity is None  # type: ignore[arg-type]
    SftpRule(**base, identity=tmp_path / "k", passphrase_secret="pp")  # type: ignore[arg-type]


def test_ssh_is_told_everything_and_reads_nothing_else(tmp_path: Path) -> None:
    """No ssh config, agent or default keys; strict host keys from the rule's file only;
    keepalives and the connect timeout from the rule; AES-GCM preferred."""
    opts = ssh_options(SftpRule(
        name="p", url="sftp://u@h:2222/in", transport="openssh", identity=tmp_path / "k",
        known_hosts=tmp_path / "kh", keepalive_interval=7, connect_timeout=3), 2222)
    joined = " ".join(opts)
    assert opts[:2] == ["-F", "/dev/null"] and opts[2:4] == ["-p", "2222"]
    for want in ("IdentitiesOnly=yes", "IdentityAgent=none", "StrictHostKeyChecking=yes",
                 f"UserKnownHostsFile={tmp_path / 'kh'}", "GlobalKnownHostsFile=/dev/null",
                 "BatchMode=yes", "PasswordAuthentication=no", "ServerAliveInterval=7",
                 "ServerAliveCountMax=3", "ConnectTimeout=3",
                 "Ciphers=^aes128-gcm@openssh.com"):
        assert want in joined, want
    assert opts[opts.index("-i"):opts.index("-i") + 2] == ["-i", str(tmp_path / "k")]
    assert "PasswordAuthentication=no" in opts and "KbdInteractiveAuthentication=no" in opts


def test_secrets_allow_one_prompt_and_stay_off_the_command_line(tmp_path: Path) -> None:
    """With a secret, ssh may prompt (its askpass answers), once; a password alone turns
    key authentication off (no default keys); the secrets' names, not values, are in the
    rule, and nothing of them is in ssh's arguments."""
    base: dict[str, Any] = {"name": "p", "url": "sftp://u@h:2222/in", "transport": "openssh"}
    opts = ssh_options(SftpRule(**base, identity=tmp_path / "k",
                                       passphrase_secret="pp"), 2222)
    assert "BatchMode=no" in opts and "NumberOfPasswordPrompts=1" in opts
    assert "PasswordAuthentication=no" in opts and "-i" in opts
    opts = ssh_options(SftpRule(**base, password_secret="pw"), 2222)
    assert "BatchMode=no" in opts and "PasswordAuthentication=yes" in opts
    assert "KbdInteractiveAuthentication=yes" in opts
    assert "-i" not in opts and "PubkeyAuthentication=no" in opts


def _encrypted_key(tmp_path: Path, server: Sshd, passphrase: str) -> Path:
    key = tmp_path / "id_enc"
    key.write_bytes(server.client_key.read_bytes())
    key.chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-p", "-N", passphrase, "-f", str(key)], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)
    return key


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e]
    return {k.decode(): v.decode() for k, v in pairs}


def test_passphrase_reaches_only_the_master_and_never_argv(
        tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """An encrypted key is unlocked through the askpass script; the passphrase is in the
    master's environment only: not in any ssh's arguments, not in the channels' (which
    never log in), not in the script."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pp").write_text("s3cret-pp\n")
    key = _encrypted_key(tmp_path, sshd, "s3cret-pp")
    dest = SftpDestination(rule(sshd, sftp_dir, identity=key, passphrase_secret="pp",
                                concurrency=2), secrets)

    async def go() -> None:
        try:
            await dest.start()
            assert dest.pool.session is not None
            link = dest.pool.session.link
            assert isinstance(link, OpensshLink)
            env = _environ(link.master.proc.pid)
            assert env["RELAY_SSH_PASSPHRASE"] == "s3cret-pp"
            assert env["SSH_ASKPASS_REQUIRE"] == "force" and "DISPLAY" in env
            assert os.getsid(link.master.proc.pid) == link.master.proc.pid  # no terminal
            for p in (link.master, *link.channels):
                with open(f"/proc/{p.proc.pid}/cmdline", "rb") as f:
                    assert b"s3cret" not in f.read()
            for p in link.channels:
                assert "RELAY_SSH_PASSPHRASE" not in _environ(p.proc.pid)
            assert "s3cret" not in (Path(link._sockdir) / "askpass").read_text()
        finally:
            await dest.close()

    asyncio.run(go())


def test_askpass_that_cannot_run_is_a_permanent_error(
        tmp_path: Path, sshd: Sshd, sftp_dir: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A TMPDIR mounted noexec stops ssh from running the askpass script (EACCES, as with
    the mode below): a permanent error that says what to change, not a login retry."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pp").write_text("s3cret-pp\n")
    key = _encrypted_key(tmp_path, sshd, "s3cret-pp")
    real = sftp_openssh.askpass_env

    def not_executable(sockdir: str, *secret: str | None) -> dict[str, str] | None:
        env = real(sockdir, *secret)
        os.chmod(os.path.join(sockdir, "askpass"), 0o600)
        return env

    monkeypatch.setattr(sftp_openssh, "askpass_env", not_executable)
    exc = start_error(SftpDestination(rule(sshd, sftp_dir, identity=key,
                                           passphrase_secret="pp"), secrets))
    assert isinstance(exc, PermanentError) and "TMPDIR" in str(exc), exc


def test_missing_ssh_client_is_a_permanent_error(tmp_path: Path, sshd: Sshd,  # noqa: F811
                                                 sftp_dir: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without OpenSSH's client on PATH the delivery fails permanently, saying what to
    install."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    dest = SftpDestination(rule(sshd, sftp_dir))

    async def go() -> None:
        try:
            await dest.start()
        finally:
            await dest.close()

    with pytest.raises(PermanentError, match="openssh-client"):
        asyncio.run(go())


def test_one_master_its_channels_and_nothing_left_after_close(
        tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """One ssh master (one login) carries every channel; close() ends all the processes
    and removes the control socket's folder."""
    dest = SftpDestination(rule(sshd, sftp_dir, concurrency=4))
    logins = sshd.logins()

    async def go() -> tuple[list[int], str]:
        try:
            await dest.start()
            assert dest.pool.session is not None
            link = dest.pool.session.link
            assert isinstance(link, OpensshLink)
            assert len(link.channels) == 4 and len(dest.pool.session.channels) == 4
            pids = [p.proc.pid for p in (link.master, *link.channels)]
            assert _ssh_children() >= set(pids)
            return pids, link._sockdir
        finally:
            await dest.close()

    pids, sockdir = asyncio.run(go())
    assert sshd.logins() == logins + 1
    assert _wait_gone(pids) == []
    assert not os.path.exists(sockdir)


def test_close_leaves_no_channel_socket_to_the_garbage_collector(
        sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """When close() returns, our end of every channel's socket pair is closed — not left
    for asyncssh's reader task to close on a later loop turn, which never comes when the
    event loop ends first (an "unclosed socket" ResourceWarning, failing some later test)."""
    dest = SftpDestination(rule(sshd, sftp_dir, concurrency=4))

    async def go() -> list[bool]:
        await dest.start()
        assert dest.pool.session is not None
        writers = [c._handler._writer._stdin for c in dest.pool.session.channels]
        assert len(writers) == 4
        await dest.close()
        return [w.transport.is_closing() and w.transport._sock is None for w in writers]

    for _ in range(3):
        assert asyncio.run(go()) == [True] * 4


def test_a_channel_cut_short_leaves_no_socket_open(sshd: Sshd, sftp_dir: Path,  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that never answers SFTP's init: the channels are cancelled at the stall
    bound, before their reader tasks exist, so no asyncssh cleanup would ever close our end
    of their socket pairs. The link closes them itself when it is collected."""
    import relay.destinations.sftp.openssh as mod

    made: list[socket.socket] = []

    class Recording:  # the socket module as sftp_openssh sees it, recording its pairs
        def __getattr__(self, name: str) -> Any:
            return getattr(socket, name)

        def socketpair(self, *a: Any) -> tuple[socket.socket, socket.socket]:
            pair = socket.socketpair(*a)
            made.append(pair[0])
            return pair

    async def never(self: Any) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(mod, "socket", Recording())
    monkeypatch.setattr(mod.SFTPClientHandler, "start", never)
    exc = start_error(SftpDestination(rule(sshd, sftp_dir, concurrency=2, login_timeout=0.5,
                                           keepalive_interval=0.2)))
    assert isinstance(exc, RetryableError), repr(exc)
    assert len(made) == 2
    assert [s.fileno() for s in made] == [-1, -1]  # closed, not left to the collector


CHILD = """
import asyncio, sys
from pathlib import Path
from typing import Any
from relay.destinations.sftp.destination import SftpDestination
from relay.logs import configure
from relay.destinations.sftp.rule import SftpRule

async def main():
    configure("warning", "json")
    rule = SftpRule(name="p", url=sys.argv[1], identity=Path(sys.argv[2]),
                           known_hosts=Path(sys.argv[3]), transport="openssh")
    dest = SftpDestination(rule)
    await dest.start()
    link = dest.pool.session.link
    print(" ".join(str(p.proc.pid) for p in (link.master, *link.channels)), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.parametrize("where", ["mkdtemp", "spawn"])
def test_no_room_for_the_control_socket_or_process_is_retryable(
        sshd: Sshd, sftp_dir: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        where: str, tmp_path: Path) -> None:
    """A control-socket folder that cannot be made (read-only or full /tmp) or an ssh that
    cannot be started (no processes left) is a retryable connect error naming what failed,
    not an internal error of the job."""
    import relay.destinations.sftp.openssh as mod

    def refuse(*_: Any, **__: Any) -> Any:
        raise OSError(30 if where == "mkdtemp" else 11,
                      "Read-only file system" if where == "mkdtemp"
                      else "Resource temporarily unavailable")

    if where == "mkdtemp":
        monkeypatch.setattr(mod.tempfile, "mkdtemp", refuse)
    else:
        monkeypatch.setattr(mod.asyncio, "create_subprocess_exec", refuse)
    # A temporary folder of its own: other relays on this machine make and remove theirs
    # in /tmp meanwhile (and ssh never starts here, so no socket needs a short path).
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    exc = start_error(SftpDestination(rule(sshd, sftp_dir)))
    assert isinstance(exc, RetryableError), repr(exc)
    want = "control socket" if where == "mkdtemp" else "cannot start ssh"
    assert want in str(exc) and ("Read-only" in str(exc) or "unavailable" in str(exc)), exc
    assert list(private.iterdir()) == []  # none left


def test_ssh_processes_die_with_a_sigkilled_relay(sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """kill -9 of relay leaves no ssh process (and so no SSH connection) behind: they are
    started with PR_SET_PDEATHSIG."""
    with subprocess.Popen([sys.executable, "-c", CHILD, sshd.url(sftp_dir),
                           str(sshd.client_key), str(sshd.known_hosts)],
                          stdout=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 9 and all(_alive(p) for p in pids)  # master + 8 channels
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert _wait_gone(pids) == []
        finally:
            proc.kill()


def test_sub_second_keepalive_is_not_turned_off(tmp_path: Path) -> None:
    """ssh takes whole seconds: 0.25 s becomes 1 s, not 0 (which would disable it)."""
    opts = ssh_options(SftpRule(
        name="p", url="sftp://u@h/in", transport="openssh", identity=tmp_path / "k",
        keepalive_interval=0.25, connect_timeout=0.5), 22)
    assert "ServerAliveInterval=1" in opts and "ConnectTimeout=1" in opts
    off = ssh_options(SftpRule(name="p", url="sftp://u@h/in", transport="openssh",
                                      identity=tmp_path / "k", keepalive_interval=0), 22)
    assert "ServerAliveInterval=0" in off


def _start_failure(r: SftpRule) -> tuple[Exception, float]:
    """start_error() and how long it took."""
    t0 = time.monotonic()
    exc = start_error(SftpDestination(r))
    return exc, time.monotonic() - t0


def test_nothing_listening_is_retryable(sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """A closed port fails at once, retryably, with ssh's own reason."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before ssh tries it
    r = rule(sshd, sftp_dir).model_copy(
        update={"url": f"sftp://{sshd.user}@127.0.0.1:{port}{sftp_dir}"})
    exc, took = _start_failure(r)
    assert isinstance(exc, RetryableError) and "Connection refused" in str(exc), exc
    assert took < 5


def test_silent_server_times_out(sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """A server that accepts the TCP connection and never says a word: the attempt fails
    retryably within connect_timeout + login_timeout, and no ssh process stays."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = rule(sshd, sftp_dir, connect_timeout=1, login_timeout=1).model_copy(
            update={"url": f"sftp://{sshd.user}@127.0.0.1:{port}{sftp_dir}"})
        before = _ssh_children()
        exc, took = _start_failure(r)
    assert isinstance(exc, RetryableError), exc
    assert took < 4, took
    assert _wait_gone(sorted(_ssh_children() - before)) == []


def _ssh_children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat.split(" (", 1)[1].split(") ", 1)
            if comm == "ssh" and rest.split()[1] == me:
                found.add(int(d.name))
    return found


@pytest.mark.parametrize(("stderr", "kind", "says"), [
    ("Host key verification failed.", PermanentError, "host key refused"),
    ("@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @", PermanentError,
     "host key refused"),
    ("u@h: Permission denied (publickey).", RetryableError, "login refused for u"),
    ("No user exists for uid 4242", PermanentError, "passwd entry"),
    ("Load key \"/k\": invalid format\nu@h: Permission denied (publickey).", PermanentError,
     "cannot load identity"),
    ("Load key \"/k\": error in libcrypto\nu@h: Permission denied (publickey).",
     PermanentError, "error in libcrypto"),
    ("Load key \"/k\": bad permissions\nu@h: Permission denied (publickey).", RetryableError,
     "bad permissions"),
    ("ssh: connect to host h port 22: Connection refused", RetryableError,
     "Connection refused"),
])
def test_ssh_errors_become_relay_errors(tmp_path: Path, stderr: str, kind: type,
                                        says: str) -> None:
    """What ssh prints before it gives up decides permanent vs retryable, as with asyncssh
    (the host-key, login and closed-port cases also run against real servers above and in
    test_sftp_destination.py)."""
    from types import SimpleNamespace

    from relay.destinations.sftp.openssh_login import refusal

    r = SftpRule(name="p", url="sftp://u@h/in", transport="openssh",
                        identity=tmp_path / "k")
    proc: Any = SimpleNamespace(errors=lambda: ["OpenSSH_9.2p1, OpenSSL 3.0",
                                                *stderr.splitlines()])
    exc = refusal("connecting to h:22", r, "u", proc, 255)
    assert type(exc) is kind and says in str(exc), exc


def test_a_server_allowing_fewer_sessions_gets_fewer_channels(tmp_path: Path) -> None:
    """sshd with MaxSessions 2: the server refuses the other multiplexed channels; relay
    goes on with the two it got, over one login, and delivers. (ssh's own fallback, a new
    connection and login per refused channel, is forbidden: found by this test.)"""
    from tests.sshd_server import running_sshd

    with running_sshd(tmp_path / "sshd", "MaxSessions 2") as server:
        dest = SftpDestination(rule(server, server.root))
        src = tmp_path / "f"
        src.write_bytes(os.urandom(300_000))

        async def go() -> int:
            try:
                staged = await write_to(dest, src, "f")
                assert await dest.commit(staged)
                return int(dest.capabilities["channels"])  # type: ignore[call-overload]
            finally:
                await dest.close()

        assert asyncio.run(go()) == 2
        assert (server.root / "f").read_bytes() == src.read_bytes()
        assert server.logins() == 1


def test_a_key_others_can_read_is_refused_with_ssh_saying_why(
        tmp_path: Path, sshd: Sshd, sftp_dir: Path) -> None:  # noqa: F811
    """ssh ignores a private key of relay's own user that others may read: the login is
    refused (retryable: fixing the mode needs no `relay retry`) and the error carries ssh's
    words for it (Kubernetes secret files are owned by root, so ssh does not check them).
    A file that is no key at all is a permanent error; the fixed key logs in."""
    key = tmp_path / "id"
    key.write_bytes(sshd.client_key.read_bytes())
    key.chmod(0o644)
    exc, _ = _start_failure(rule(sshd, sftp_dir, identity=key))
    assert isinstance(exc, RetryableError) and "login refused" in str(exc)
    assert "bad permissions" in str(exc), exc
    key.write_text("not a key\n")
    key.chmod(0o600)
    exc, _ = _start_failure(rule(sshd, sftp_dir, identity=key))
    assert isinstance(exc, PermanentError) and "cannot load identity" in str(exc), exc
    key.write_bytes(sshd.client_key.read_bytes())
    dest = SftpDestination(rule(sshd, sftp_dir, identity=key))

    async def go() -> None:
        try:
            await dest.start()
        finally:
            await dest.close()

    asyncio.run(go())


def test_a_lost_connection_is_collected_by_close(tmp_path: Path) -> None:
    """After a connection is lost mid-upload, close() waits for its ssh processes, so
    nothing of it (transports, our ends of the socket pairs) is left to the garbage
    collector: found as 'unclosed socket' ResourceWarnings in later tests."""
    from tests.fault_sftp import fault_server
    from tests.sshd_server import make_key

    key = tmp_path / "id"
    make_key(key)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2_000_000))
    with fault_server(tmp_path / "fault", key) as fs:
        dest = SftpDestination(SftpRule(
            name="f", url=fs.url(""), identity=fs.client_key, known_hosts=fs.known_hosts,
            transport="openssh", connect_timeout=5, login_timeout=5))

        async def go() -> str:
            try:
                await dest.start()
                fs.faults.drop_after = 500_000
                try:
                    await write_to(dest, src, "r.bin")
                except RetryableError as exc:  # not kept: its traceback holds the link
                    return str(exc)
                return "no error"
            finally:
                await dest.close()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            error = asyncio.run(go())
            gc.collect()
    assert "connection lost" in error
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_relay_check_says_when_ssh_is_missing(tmp_path: Path) -> None:
    """`relay check` (no connection needed) fails, naming the destination and the package,
    when a destination wants transport: openssh and no ssh is on PATH; passes with it."""
    from tests.helpers import RELAY, relay_env, write_rules

    (tmp_path / "in").mkdir()
    key, kh = tmp_path / "k", tmp_path / "kh"
    make_key(key)
    key.chmod(0o600)
    kh.write_text("")
    rules = write_rules(tmp_path / "rules", source=tmp_path / "in",
                        dests={"partner": "sftp://u@h.example/in"},
                        extra_dest={"partner": {"transport": "openssh", "identity": str(key),
                                                "known_hosts": str(kh)}})
    empty = tmp_path / "bin"
    empty.mkdir()
    res = subprocess.run([*RELAY, "check"], env=relay_env(tmp_path, rules, PATH=str(empty)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "partner" in res.stderr and "openssh-client" in res.stderr
    ok = subprocess.run([*RELAY, "check"], env=relay_env(tmp_path, rules),
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stdout + ok.stderr
    # a key others may read: ssh would ignore it, and every login would be refused
    key.chmod(0o644)
    res = subprocess.run([*RELAY, "check"], env=relay_env(tmp_path, rules),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "destinations[partner].identity" in res.stderr
    assert "0644" in res.stderr and "chmod 600" in res.stderr, res.stderr


def test_an_asyncssh_with_other_internals_is_refused_clearly(
        sshd: Sshd, sftp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The transport drives asyncssh's SFTPClientHandler directly. With an asyncssh whose
    handler takes other arguments (2.21's, say) a connect is a permanent error naming the
    version and the way out, not a TypeError; the installed one passes."""
    import asyncssh.sftp

    import relay.destinations.sftp.openssh as mod

    mod.asyncssh_compatible()  # the installed asyncssh

    class Old(asyncssh.sftp.SFTPClientHandler):  # asyncssh 2.21's constructor
        def __init__(self, loop: Any, reader: Any, writer: Any, sftp_version: int) -> None:
            raise AssertionError("never constructed")

    monkeypatch.setattr(mod, "SFTPClientHandler", Old)
    exc = start_error(SftpDestination(rule(sshd, sftp_dir)))
    assert isinstance(exc, PermanentError), repr(exc)
    assert "asyncssh" in str(exc) and "transport: asyncssh" in str(exc), exc


def test_killing_an_exited_ssh_keeps_its_exit_status(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Aborting a link kills processes that may have just exited. Popen.kill() polls first,
    and that waitpid() reaps the child before asyncio's watcher does: the exit status is
    lost (reported as 255) and asyncio logs "Unknown child process". Reproduced by holding
    the watcher's waitpid() until the child is a zombie and kill() has been called."""
    release = threading.Event()
    real_waitpid = os.waitpid

    def held_waitpid(pid: int, options: int) -> tuple[int, int]:
        if options == 0:  # asyncio's watcher thread; Popen.poll() passes WNOHANG
            release.wait(10)
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", held_waitpid)

    async def main() -> int:
        p = await _spawn(sys.executable, "-c", "import sys; sys.exit(3)")
        deadline = time.monotonic() + 10
        while _alive(p.proc.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not _alive(p.proc.pid), "the child did not exit"
        p.kill()  # a zombie now: must not be reaped behind asyncio's back
        release.set()
        return await asyncio.wait_for(p.wait(), 10)

    assert asyncio.run(main()) == 3
    assert "Unknown child process" not in caplog.text


def test_control_socket_folders_left_by_a_killed_relay_are_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay killed with kill -9 leaves its ssh control-socket folders behind; the next
    one to log in removes those whose socket nobody listens on, and only those."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sftp_openssh, "_swept", False)
    dead, live, logging_in = (tmp_path / f"relay-ssh-{n}" for n in ("dead", "live", "login"))
    for d in (dead, live, logging_in):
        d.mkdir()
    gone = socket.socket(socket.AF_UNIX)
    gone.bind(str(dead / "c"))  # bound, never listening, closed: as a killed master's
    gone.close()
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(live / "c"))
    listening.listen()
    other = tmp_path / "unrelated"
    other.mkdir()
    stray = socket.socket(socket.AF_UNIX)
    stray.bind(str(other / "c"))
    stray.close()
    try:
        sftp_openssh._remove_dead_socket_dirs()
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "relay-ssh-live", "relay-ssh-login", "unrelated"]
    finally:
        listening.close()
