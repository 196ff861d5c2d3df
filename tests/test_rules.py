"""Rules loading, validation with file/line/field, globs and path templates."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.errors import RulesError, UnsafePathError
from relay.paths import compile_glob, render_template, safe_relpath
from relay.rules import load_rules, rules_json_schema

GOOD = """\
sources:
  - name: in
    path: /data/in
destinations:
  - name: out
    url: file:///data/out
routes:
  - name: r
    source: in
    match: "reports/**/*.csv"
    to: [out]
    path: "{year}/{month}/{name}"
"""


def test_good_rules_load(tmp_path: Path) -> None:
    """A valid rules file loads and routes matching paths."""
    (tmp_path / "a.yaml").write_text(GOOD)
    rules = load_rules(tmp_path)
    assert rules.match("in", "reports/2026/x.csv") is not None
    assert rules.match("in", "reports/x.csv") is not None
    assert rules.match("in", "other/x.csv") is None


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    """Every error carries the file, the line of the offending field and its path."""
    bad = GOOD.replace("to: [out]", "to: [nowhere]").replace(
        'path: "{year}/{month}/{name}"', 'path: "../{name}"').replace(
        "url: file:///data/out", "url: ftp://x/y")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(RulesError) as exc:
        load_rules(tmp_path)
    text = str(exc.value)
    assert f"{tmp_path / 'bad.yaml'}:6: destinations[0].url" in text
    assert f"{tmp_path / 'bad.yaml'}:12: routes[0].path" in text
    lines = {p.field: p.line for p in exc.value.problems}
    assert lines["destinations[0].url"] == 6


def test_unknown_field_and_cross_reference(tmp_path: Path) -> None:
    """Typos in keys and routes naming unknown destinations are both reported."""
    (tmp_path / "x.yaml").write_text(GOOD.replace("to: [out]", "to: [nowhere]").replace(
        "    path: /data/in", "    path: /data/in\n    recursiv: true"))
    with pytest.raises(RulesError) as exc:
        load_rules(tmp_path)
    msgs = [str(p) for p in exc.value.problems]
    assert any("sources[0].recursiv" in m and ":4:" in m for m in msgs), msgs
    assert any("unknown destination 'nowhere'" in m for m in msgs), msgs


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    """A YAML syntax error is reported with its line."""
    (tmp_path / "x.yaml").write_text("sources:\n  - name: [unclosed\n")
    with pytest.raises(RulesError) as exc:
        load_rules(tmp_path)
    assert exc.value.problems[0].line is not None


@pytest.mark.parametrize("template", ["../{name}", "/abs/{name}", "{name.__class__}",
                                      "{secret}", "a/../../{name}"])
def test_unsafe_templates_refused(template: str, tmp_path: Path) -> None:
    """Templates that could escape the destination root or read attributes are refused."""
    (tmp_path / "x.yaml").write_text(GOOD.replace("{year}/{month}/{name}", template))
    with pytest.raises(RulesError):
        load_rules(tmp_path)


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../b", "a\x00b", "x" * 256, ""])
def test_unsafe_relpaths_refused(rel: str) -> None:
    """Traversal, absolute paths, NUL and over-long names never become destination paths."""
    with pytest.raises(UnsafePathError):
        safe_relpath(rel)


@given(st.lists(st.sampled_from(["a", "..", ".", "", "b c", "-x", "é"]), max_size=6))
def test_safe_relpath_never_escapes(parts: list[str]) -> None:
    """Whatever the input, an accepted path has no '..' and is relative."""
    try:
        out = safe_relpath("/".join(parts))
    except UnsafePathError:
        return
    assert not out.startswith("/") and ".." not in out.split("/")


def test_template_render_uses_ready_time() -> None:
    """{year}/{month}/{dir}/{name} render from the path and the time it became ready."""
    when = datetime(2026, 3, 4, tzinfo=UTC)
    assert render_template("{year}/{month}/{dir}/{name}", "a/b.csv", source="s", route="r",
                           when=when) == "2026/03/a/b.csv"
    assert render_template("{dir}/{stem}.{ext}", "b.csv", source="s", route="r",
                           when=when) == "b.csv"


def test_every_template_field_renders() -> None:
    """Each field is worked out only when used; all of them, together and alone."""
    when = datetime(2026, 3, 4, 5, tzinfo=UTC)
    everything = ("{source}/{route}/{year}-{month}-{day}T{hour}/{dir}/{stem}{suffix}/"
                  "{name}.{ext}/{path}")
    assert render_template(everything, "x/y/z.tar.gz", source="s", route="r", when=when) \
        == "s/r/2026-03-04T05/x/y/z.tar.gz/z.tar.gz.gz/x/y/z.tar.gz"
    assert render_template("{hour}/{day}", "f", source="s", route="r", when=when) == "05/04"
    with pytest.raises(KeyError):
        render_template("{nope}/{path}", "f", source="s", route="r", when=when)


def test_glob_semantics() -> None:
    """* stays in a segment, ** spans segments, including none."""
    g = compile_glob("a/**/*.csv")
    assert g.match("a/x.csv") and g.match("a/b/c/x.csv") and not g.match("b/x.csv")
    assert not compile_glob("*.csv").match("a/x.csv")


def test_schema_is_published() -> None:
    """The JSON Schema describes sources, destinations and routes and forbids unknown keys."""
    schema = rules_json_schema()
    assert set(schema["properties"]) == {"sources", "destinations", "routes"}
    assert schema["additionalProperties"] is False


