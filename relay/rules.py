"""Routing rules: YAML files → validated, frozen models; ``Rules.match(source, rel)``.

Every problem is reported with its file, line and field (``RulesError.problems``), so
``relay check`` can point an operator at the exact line. Loading is the only I/O here.
"""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from relay.errors import RuleProblem, RulesError, UnsafePathError
from relay.paths import check_template, compile_glob

__all__ = [
    "DestinationRule",
    "ReadyRule",
    "RetryRule",
    "Route",
    "Rules",
    "SourceRule",
    "environment_problems",
    "load_rules",
    "parse_duration",
    "rules_json_schema",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


def parse_duration(value: Any) -> float | None:
    """``30``, ``"30s"``, ``"15m"``, ``"24h"``, ``"2d"`` → seconds; None stays None."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 24h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReadyRule(_Strict):
    """Which signals make a payload READY in a source."""

    checksums: tuple[Literal["sha256", "sha512", "md5"], ...] = ("sha256", "sha512", "md5")
    markers: tuple[str, ...] = (".done",)
    directory_marker: str | None = "_SUCCESS"
    manifest: str | None = "SHA256SUMS"
    deadline: float | None = Field(
        None, description="Quarantine a file still waiting this long after first seen "
        "(e.g. 24h). Unset: wait forever.")

    @field_validator("deadline", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> float | None:
        return parse_duration(v)

    @field_validator("markers")
    @classmethod
    def _suffixes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for s in v:
            if not s.startswith(".") or "/" in s or len(s) < 2:
                raise ValueError(f"marker suffix must look like '.done', got {s!r}")
        return v


class SourceRule(_Strict):
    """A watched landing zone."""

    name: str = Field(pattern=_NAME)
    path: Path
    recursive: bool = True
    watcher: Literal["native", "polling"] = Field(
        "native", description="'polling' for NFS/CIFS mounts where inotify sees nothing.")
    poll_interval: float = Field(2.0, gt=0)
    ignore: tuple[str, ...] = Field((".*", "**/.*"),
                                    description="Globs never considered (hidden temporaries).")
    ready: ReadyRule = ReadyRule()

    @field_validator("poll_interval", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> float | None:
        return parse_duration(v)


class DestinationRule(_Strict):
    """Where files go. The URL scheme picks the backend module."""

    name: str = Field(pattern=_NAME)
    url: str
    temp: Literal["hidden", "staging"] = Field(
        "hidden", description="hidden: '.X.tmp' beside the final name; staging: a folder "
        "under the destination root (same filesystem), for consumers that trip on any name.")
    staging_dir: str = ".relay-staging"
    fsync: bool = True
    verify: Literal["none", "readback"] = "none"
    concurrency: int | None = Field(None, ge=1, le=64)
    # SFTP options (ignored by file://).
    transport: Literal["asyncssh", "openssh"] = Field(
        "asyncssh", description="asyncssh: SSH in-process; openssh: OpenSSH's ssh client "
        "carries the connection (faster; needs the ssh client).")
    identity: Path | None = None
    passphrase_secret: str | None = None
    password_secret: str | None = None
    known_hosts: Path | None = None
    connect_timeout: float = 15.0
    login_timeout: float = 30.0
    keepalive_interval: float = 15.0
    idle_timeout: float = Field(
        300.0, description="Close the pooled SSH connection after this long without a "
        "transfer (reopened by the next one); 0 keeps it open.")
    overwrite: Literal["replace", "fail"] = "replace"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("file", "sftp"):
            raise ValueError(f"unsupported scheme {parts.scheme!r} (file:// or sftp://)")
        if parts.scheme == "sftp" and not parts.hostname:
            raise ValueError("sftp:// URL needs a host")
        if parts.scheme == "file" and not parts.path:
            raise ValueError("file:// URL needs a path")
        return v

    @field_validator("connect_timeout", "login_timeout", "keepalive_interval", "idle_timeout",
                     mode="before")
    @classmethod
    def _dur(cls, v: Any) -> float | None:
        return parse_duration(v)

    @model_validator(mode="after")
    def _openssh(self) -> DestinationRule:
        if self.transport == "openssh":
            if self.identity is None and not self.password_secret:
                raise ValueError("transport: openssh needs `identity` (a private key file) "
                                 "or `password_secret`")
            if self.passphrase_secret and self.identity is None:
                raise ValueError("passphrase_secret unlocks `identity`, which is not set")
        return self

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme


class RetryRule(_Strict):
    base: float | None = None
    cap: float | None = None
    max_attempts: int | None = Field(None, ge=1)

    @field_validator("base", "cap", mode="before")
    @classmethod
    def _dur(cls, v: Any) -> float | None:
        return parse_duration(v)


class Route(_Strict):
    """Which files of a source go to which destinations, under which name."""

    name: str = Field(pattern=_NAME)
    source: str
    match: tuple[str, ...] = ("**",)
    to: tuple[str, ...] = Field(min_length=1)
    path: str = "{path}"
    signal: Literal["sha256", "marker", "both", "none"] = "sha256"
    marker_suffix: str = ".done"
    then: str = "keep"
    retry: RetryRule = RetryRule()

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("path")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            check_template(v)
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("then")
    @classmethod
    def _then(cls, v: str) -> str:
        if v in ("keep", "delete"):
            return v
        if v.startswith("archive:") and len(v) > len("archive:"):
            return v
        raise ValueError("must be keep, delete or archive:/path/to/folder")

    def matches(self, rel: str) -> bool:
        return any(compile_glob(p).match(rel) for p in self.match)


class Rules(_Strict):
    sources: tuple[SourceRule, ...] = ()
    destinations: tuple[DestinationRule, ...] = ()
    routes: tuple[Route, ...] = ()
    files: tuple[str, ...] = ()

    def source(self, name: str) -> SourceRule:
        return next(s for s in self.sources if s.name == name)

    def destination(self, name: str) -> DestinationRule:
        return next(d for d in self.destinations if d.name == name)

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)

    def match(self, source: str, rel: str) -> Route | None:
        """The first route (in file order) of ``source`` whose globs match ``rel``."""
        for r in self.routes:
            if r.source == source and r.matches(rel):
                return r
        return None


# --- loading with line numbers -------------------------------------------------------

_SECTIONS: dict[str, type[_Strict]] = {
    "sources": SourceRule, "destinations": DestinationRule, "routes": Route,
}


def _plain(node: yaml.Node) -> Any:
    """A composed YAML node → plain Python, keeping scalars' resolved types."""
    return yaml.safe_load(yaml.serialize(node)) if node is not None else None


def _line_of(node: yaml.Node, loc: tuple[Any, ...]) -> int:
    """Best line for a pydantic error location inside ``node`` (1-based)."""
    cur = node
    for key in loc:
        nxt = None
        if isinstance(cur, yaml.MappingNode):
            for k, v in cur.value:
                if k.value == key:
                    nxt = v
                    break
        elif (isinstance(cur, yaml.SequenceNode) and isinstance(key, int)
              and 0 <= key < len(cur.value)):
            nxt = cur.value[key]
        if nxt is None:
            break
        cur = nxt
    return int(cur.start_mark.line) + 1


def _rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def load_rules(path: Path) -> Rules:
    """Load and validate every ``*.yaml``/``*.yml`` in ``path`` (a dir) or ``path`` itself.

    Raises RulesError listing every problem found, each with file, line and field.
    """
    problems: list[RuleProblem] = []
    files = _rule_files(path)
    if not files or not path.exists():
        raise RulesError([RuleProblem(str(path), None, "-", "no rules files found")])
    items: dict[str, list[tuple[Any, str, int]]] = {k: [] for k in _SECTIONS}
    attempted = dict.fromkeys(_SECTIONS, 0)
    for f in files:
        try:
            root = yaml.compose(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(RuleProblem(str(f), None, "-", f"cannot read: {exc}"))
            continue
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else None
            problems.append(RuleProblem(str(f), line, "-", f"invalid YAML: {exc}"))
            continue
        if root is None:
            continue
        if not isinstance(root, yaml.MappingNode):
            problems.append(RuleProblem(str(f), root.start_mark.line + 1, "-",
                                        "top level must be a mapping"))
            continue
        for knode, vnode in root.value:
            key = knode.value
            if key not in _SECTIONS:
                problems.append(RuleProblem(str(f), knode.start_mark.line + 1, key,
                                            "unknown section (sources, destinations, routes)"))
                continue
            if not isinstance(vnode, yaml.SequenceNode):
                problems.append(RuleProblem(str(f), vnode.start_mark.line + 1, key,
                                            "must be a list"))
                continue
            for i, item in enumerate(vnode.value):
                attempted[key] += 1
                label = f"{key}[{i}]"
                try:
                    model = _SECTIONS[key].model_validate(_plain(item))
                except ValidationError as exc:
                    for err in exc.errors():
                        loc = tuple(err["loc"])
                        field = ".".join([label, *map(str, loc)])
                        problems.append(RuleProblem(str(f), _line_of(item, loc), field,
                                                    err["msg"]))
                    continue
                items[key].append((model, str(f), item.start_mark.line + 1))
    problems.extend(_cross_check(items))
    if not attempted["routes"] and not problems:
        problems.append(RuleProblem(", ".join(map(str, files)), None, "routes",
                                    "no routes defined"))
    if problems:
        raise RulesError(problems)
    return Rules(
        sources=tuple(m for m, _, _ in items["sources"]),
        destinations=tuple(m for m, _, _ in items["destinations"]),
        routes=tuple(m for m, _, _ in items["routes"]),
        files=tuple(str(f) for f in files),
    )


def _cross_check(items: dict[str, list[tuple[Any, str, int]]]) -> list[RuleProblem]:
    problems = []
    for section in _SECTIONS:
        seen: dict[str, str] = {}
        for m, f, line in items[section]:
            if m.name in seen:
                problems.append(RuleProblem(f, line, f"{section}.name",
                                            f"duplicate name {m.name!r} (first in {seen[m.name]})"))
            seen.setdefault(m.name, f"{f}:{line}")
    sources = {m.name for m, _, _ in items["sources"]}
    dests = {m.name for m, _, _ in items["destinations"]}
    for r, f, line in items["routes"]:
        if r.source not in sources:
            problems.append(RuleProblem(f, line, f"routes[{r.name}].source",
                                        f"unknown source {r.source!r}"))
        for d in r.to:
            if d not in dests:
                problems.append(RuleProblem(f, line, f"routes[{r.name}].to",
                                            f"unknown destination {d!r}"))
    return problems


def rules_json_schema() -> dict[str, Any]:
    """JSON Schema of one rules file, for editors (``relay schema``)."""
    schema = Rules.model_json_schema()
    schema["properties"].pop("files", None)
    schema["title"] = "relay rules file"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def environment_problems(rules: Rules) -> list[RuleProblem]:
    """Problems a schema cannot see: missing source folders, loops."""
    from relay.destinations.local import file_url_root

    out = []
    for s in rules.sources:
        if not s.path.is_dir():
            out.append(RuleProblem(rules.files[0] if len(rules.files) == 1 else "(rules)", None,
                                   f"sources[{s.name}].path",
                                   f"{s.path} is not an existing directory"))
    for d in rules.destinations:
        if d.scheme != "file":
            continue
        root = file_url_root(d.url).absolute().resolve()
        for s in rules.sources:
            src = s.path.absolute().resolve()
            if root == src or src in root.parents:
                out.append(RuleProblem("(rules)", None, f"destinations[{d.name}].url",
                                       f"{root} is inside source {s.name} ({src}): "
                                       "relay would forward its own output"))
    return out


def login_file_problems(rules: Rules, secrets_dir: Path | None) -> list[RuleProblem]:
    """What `relay check` can tell about an SFTP destination's login without connecting:
    its identity, known_hosts and named secrets must be readable, and with ``transport:
    openssh`` the identity must not be readable by others (``ssh`` ignores such a key, and
    the login is then refused, e.g. a Kubernetes Secret mounted with its default 0644) and
    relay's user needs a passwd entry (``ssh`` refuses to run without one)."""
    out: list[RuleProblem] = []

    def problem(d: DestinationRule, field: str, message: str) -> None:
        out.append(RuleProblem("(rules)", None, f"destinations[{d.name}].{field}", message))

    def unreadable(path: Path) -> str | None:
        try:
            with open(path, "rb"):
                return None
        except OSError as exc:
            return f"cannot read {path}: {exc.strerror}"

    for d in rules.destinations:
        if d.scheme != "sftp":
            continue
        if d.identity is not None:
            if (why := unreadable(d.identity)) is not None:
                problem(d, "identity", why)
            elif d.transport == "openssh":
                st = d.identity.stat()
                if st.st_uid == os.getuid() and st.st_mode & 0o077:
                    problem(d, "identity", f"{d.identity} has mode {st.st_mode & 0o777:04o}; "
                            "ssh ignores a private key others may read (chmod 600; "
                            "Kubernetes: the Secret volume's defaultMode 0400)")
        if d.transport == "openssh":
            try:
                pwd.getpwuid(os.getuid())
            except KeyError:
                # OpenShift and some securityContexts run an arbitrary UID without one
                problem(d, "transport", f"ssh needs a passwd entry for relay's user (uid "
                        f"{os.getuid()} has none): use transport: asyncssh, or an image "
                        "that adds the user")
        known = d.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if (why := unreadable(known)) is not None:
            problem(d, "known_hosts", f"{why}: every host key would be refused")
        for field in ("passphrase_secret", "password_secret"):
            name = getattr(d, field)
            if name is None:
                continue
            if secrets_dir is None:
                problem(d, field, f"secret {name!r} named but RELAY_SECRETS_DIR is not set")
            elif (why := unreadable(secrets_dir / name)) is not None:
                problem(d, field, f"secret {name!r}: {why}")
    return out
