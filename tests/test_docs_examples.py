"""Every rules example an operator can copy — rules/, and the YAML in README.md and docs/ —
loads with today's rule models (a destination's options belong to its backend)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.destinations import rule_adapter
from relay.rules import load_rules

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks() -> list[tuple[str, Any]]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for i, m in enumerate(re.finditer(r"```yaml\n(.*?)```", text, re.S)):
            data = yaml.safe_load(m.group(1))
            if isinstance(data, dict) and isinstance(data.get("rules"), dict):
                data = yaml.safe_load(data["rules"].get("inline", "")) or {}  # Helm values
            out.append((f"{doc.name}#{i + 1}", data))
    return out


BLOCKS = _blocks()


def test_the_docs_have_rules_examples() -> None:
    """The scan below finds the examples it is meant to check (README's rules, the SFTP
    options, the Helm values' inline rules)."""
    names = {n.split("#")[0] for n, data in BLOCKS if _destinations(data)}
    assert {"README.md", "sftp.md", "deploy.md"} <= names


def _destinations(data: Any) -> list[Any]:
    if isinstance(data, dict):
        return list(data.get("destinations") or [])
    if isinstance(data, list):  # an excerpt: one or more destinations
        return [d for d in data if isinstance(d, dict) and "url" in d]
    return []


@pytest.mark.parametrize(("where", "data"), BLOCKS, ids=[n for n, _ in BLOCKS])
def test_each_documented_destination_is_valid(where: str, data: Any) -> None:
    """Each destination shown in the docs validates with its backend's model."""
    for d in _destinations(data):
        rule_adapter().validate_python(d)


@pytest.mark.parametrize(("where", "data"), [b for b in BLOCKS if isinstance(b[1], dict)
                                             and {"sources", "routes"} <= set(b[1])],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_each_documented_rules_file_loads(tmp_path: Path, where: str, data: Any) -> None:
    """A complete rules example (sources, destinations, routes) loads as a rules file."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    rules = load_rules(tmp_path / "r.yaml")
    assert rules.routes


def test_the_example_rules_directory_loads() -> None:
    """rules/ (what the demo runs) loads."""
    rules = load_rules(ROOT / "rules")
    assert [d.scheme for d in rules.destinations] == ["file"]
