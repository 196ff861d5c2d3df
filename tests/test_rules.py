"""Rules loading, validation with file/line/field, globs and path templates."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
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


def test_check_reads_the_login_files_of_sftp_destinations(tmp_path: Path) -> None:
    """`relay check` names an unreadable identity or known_hosts, a secret named without
    RELAY_SECRETS_DIR or missing from it, and, for transport: openssh, a key others may
    read (ssh ignores it); a destination whose files are all there passes."""
    from relay.rules import login_file_problems

    (tmp_path / "in").mkdir()
    key, kh, secrets = tmp_path / "id", tmp_path / "kh", tmp_path / "secrets"
    key.write_text("k")
    key.chmod(0o644)
    kh.write_text("")
    secrets.mkdir()
    (secrets / "pw").write_text("pw")

    def problems(secrets_dir: Path | None, **dest: object) -> list[str]:
        y = {"sources": [{"name": "in", "path": str(tmp_path / "in")}],
             "destinations": [{"name": "p", "url": "sftp://u@h/in", "known_hosts": str(kh),
                               **dest}],
             "routes": [{"name": "r", "source": "in", "to": ["p"]}]}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(y))
        return [str(p) for p in login_file_problems(load_rules(tmp_path / "r.yaml"),
                                                    secrets_dir)]

    assert problems(secrets, identity=str(key), password_secret="pw") == []
    [p] = problems(secrets, identity=str(key), transport="openssh")
    assert "destinations[p].identity" in p and "0644" in p
    key.chmod(0o600)
    assert problems(secrets, identity=str(key), transport="openssh") == []
    [p] = problems(secrets, identity=str(tmp_path / "nope"))
    assert "destinations[p].identity" in p and "nope" in p
    [p] = problems(None, identity=str(key), passphrase_secret="pp")
    assert "passphrase_secret" in p and "RELAY_SECRETS_DIR is not set" in p
    [p] = problems(secrets, identity=str(key), passphrase_secret="pp")
    assert "secret 'pp'" in p and "No such file" in p
    [p] = problems(secrets, identity=str(key), known_hosts=str(tmp_path / "nokh"))
    assert "destinations[p].known_hosts" in p and "refused" in p


def test_check_names_a_uid_without_passwd_entry_for_openssh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ssh will not run for a UID without a passwd entry (OpenShift's arbitrary UIDs): a
    problem for transport: openssh, none for asyncssh."""
    import pwd

    from relay.rules import login_file_problems

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    (tmp_path / "in").mkdir()
    key, kh = tmp_path / "id", tmp_path / "kh"
    key.write_text("k")
    key.chmod(0o600)
    kh.write_text("")
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    for transport, want in (("openssh", 1), ("asyncssh", 0)):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({
            "sources": [{"name": "in", "path": str(tmp_path / "in")}],
            "destinations": [{"name": "p", "url": "sftp://u@h/in", "identity": str(key),
                              "known_hosts": str(kh), "transport": transport}],
            "routes": [{"name": "r", "source": "in", "to": ["p"]}]}))
        got = [str(p) for p in login_file_problems(load_rules(tmp_path / "r.yaml"), None)]
        assert len(got) == want, got
        assert all("destinations[p].transport" in p and "passwd entry" in p for p in got)
