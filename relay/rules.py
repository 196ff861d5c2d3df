"""Routing rules: YAML files → validated, frozen models; ``Rules.match(source, rel)``.

Every problem is reported with its file, line and field (``RulesError.problems``), so
``relay check`` can point an operator at the exact line. Loading is the only I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator

from relay.destinations import BACKENDS, check_problems, conflicts, rule_adapter
from relay.destinations.base import CheckContext, DestinationRule
from relay.errors import RuleProblem, RulesError, UnsafePathError
from relay.paths import check_template, compile_glob
from relay.rule_fields import Duration, Name, Strict, parse_duration

__all__ = [
    "DestinationRule",
    "ReadyRule",
    "RetryRule",
    "Route",
    "Rules",
    "SourceRule",
    "destination_problems",
    "environment_problems",
    "load_rules",
    "parse_duration",
    "rules_json_schema",
]

class ReadyRule(Strict):
    """Which signals make a payload READY in a source."""

    checksums: tuple[Literal["sha256", "sha512", "md5"], ...] = ("sha256", "sha512", "md5")
    markers: tuple[str, ...] = (".done",)
    directory_marker: str | None = "_SUCCESS"
    manifest: str | None = "SHA256SUMS"
    deadline: Duration | None = Field(
        None, description="Quarantine a file still waiting this long after first seen "
        "(e.g. 24h). Unset: wait forever.")

    @field_validator("markers")
    @classmethod
    def _suffixes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for s in v:
            if not s.startswith(".") or "/" in s or len(s) < 2:
                raise ValueError(f"marker suffix must look like '.done', got {s!r}")
        return v


class SourceRule(Strict):
    """A watched landing zone."""

    name: Name
    path: Path
    recursive: bool = True
    watcher: Literal["native", "polling"] = Field(
        "native", description="'polling' for NFS/CIFS mounts where inotify sees nothing.")
    poll_interval: Duration = Field(2.0, gt=0)
    ignore: tuple[str, ...] = Field((".*", "**/.*"),
                                    description="Globs never considered (hidden temporaries).")
    ready: ReadyRule = ReadyRule()


class RetryRule(Strict):
    base: Duration | None = None
    cap: Duration | None = None
    max_attempts: int | None = Field(None, ge=1)


class Route(Strict):
    """Which files of a source go to which destinations, under which name."""

    name: Name
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


class Rules(Strict):
    sources: tuple[SourceRule, ...] = ()
    # Each destination is its backend's rule model (relay.destinations.rule_adapter);
    # SerializeAsAny keeps their own fields when the rules are dumped.
    destinations: tuple[SerializeAsAny[DestinationRule], ...] = ()
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

_SECTIONS: dict[str, Callable[[Any], Any]] = {
    "sources": SourceRule.model_validate,
    "destinations": lambda data: rule_adapter().validate_python(data),
    "routes": Route.model_validate,
}


def _located(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A destination's error location without the backend's tag pydantic puts first."""
    return loc[1:] if loc and loc[0] in BACKENDS else loc


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
                    model = _SECTIONS[key](_plain(item))
                except ValidationError as exc:
                    for err in exc.errors():
                        loc = _located(tuple(err["loc"]))
                        if err["type"] == "unsupported_scheme":
                            loc = ("url",)
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
    """JSON Schema of one rules file, for editors (``relay schema``): each destination is
    one of the backends' models, told apart by its URL's scheme."""
    schema = Rules.model_json_schema()
    schema["properties"].pop("files", None)
    union = rule_adapter().json_schema(ref_template="#/$defs/{model}")
    schema.setdefault("$defs", {}).update(union.pop("$defs", {}))
    schema["$defs"].pop("DestinationRule", None)
    schema["properties"]["destinations"]["items"] = union
    schema["title"] = "relay rules file"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _where(rules: Rules) -> str:
    return rules.files[0] if len(rules.files) == 1 else "(rules)"


def environment_problems(rules: Rules) -> list[RuleProblem]:
    """Problems a schema cannot see, which make relay refuse to start: missing source
    folders, and each backend's conflicts (a local folder inside a source, say)."""
    out = []
    for s in rules.sources:
        if not s.path.is_dir():
            out.append(RuleProblem(_where(rules), None, f"sources[{s.name}].path",
                                   f"{s.path} is not an existing directory"))
    ctx = CheckContext(sources=rules.sources)
    for d in rules.destinations:
        for field, message in conflicts(d, ctx):
            out.append(RuleProblem("(rules)", None, f"destinations[{d.name}].{field}", message))
    return out


def destination_problems(rules: Rules, secrets_dir: Path | None) -> list[RuleProblem]:
    """What ``relay check`` can tell about each destination without connecting to it
    (its backend's checks: for SFTP, the login files and whether its key loads)."""
    ctx = CheckContext(sources=rules.sources, secrets_dir=secrets_dir)
    out = []
    for d in rules.destinations:
        for field, message in check_problems(d, ctx):
            out.append(RuleProblem("(rules)", None, f"destinations[{d.name}].{field}", message))
    return out
