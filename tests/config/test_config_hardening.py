"""Adversarial config input (issue #11): deep nesting, alias and merge-key bombs, huge files and
values, unreadable paths.  Each is refused with a ConfigError that names the file (or variable)
and the field, in bounded time and memory; nothing is created."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

import kvframe
from kvframe import cli
from kvframe.configfile import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, MAX_TEXT, load_config, read_file
from kvframe.errors import ConfigError

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def refused(config, *, environ=None, max_s: float = 10.0, max_mb: float = 64.0, max_len: int = 3000,
            trace: bool = True) -> str:
    """The ConfigError of ``load_config``, checked to be short and to have come in bounded time and memory
    (``trace=False``: time only, where tracemalloc would slow a big parse down)."""
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError) as info:
            load_config(config, environ={} if environ is None else environ)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
    finally:
        if trace:
            tracemalloc.stop()
    msg = str(info.value)
    assert elapsed < max_s, elapsed
    assert peak < max_mb * 2**20, peak
    assert len(msg) <= max_len, len(msg)
    return msg


def unchanged(path: Path, before: bytes, cfgtest_plugin) -> None:
    assert path.read_bytes() == before
    assert cfgtest_plugin.CREATED == []


# deep nesting -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,text,where", [
    ("arrays.toml", "[app]\nx = " + "[" * 5000 + "]" * 5000 + "\n", "at line 2 (key 'x')"),
    ("inline.toml", "[app]\nx = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n", "at line 2 (key 'x')"),
    ("tables.toml", "[app." + ".".join(["t"] * 500) + "]\nx = 1\n", "app.t.t.t.t"),
    ("flow.yaml", "app:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", "line 2"),
    ("flowmap.yaml", "app:\n  x: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", "app.x.a.a"),
    ("block.yaml", "app:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(400)) + "  " * 401 + "1\n",
     "app.a.a.a"),
])
def test_deep_nesting_in_a_file_is_refused_naming_file_and_place(tmp_path, cfgtest_plugin, name, text, where):
    p = write(tmp_path, name, text)
    before = p.read_bytes()
    msg = refused(p)
    assert str(p) in msg and where in msg, msg
    assert "nest" in msg and "RecursionError" not in msg
    with pytest.raises(ConfigError):
        kvframe.create_from_config(p)
    unchanged(p, before, cfgtest_plugin)


def test_nesting_up_to_the_limit_is_fine(tmp_path):
    inner = "[" * (MAX_DEPTH - 2) + "1" + "]" * (MAX_DEPTH - 2)  # top level, app, then the arrays
    cfg = load_config(write(tmp_path, "ok.toml", f"[app]\nx = {inner}\n"), environ={})
    depth, node = 0, cfg.app["x"]
    while isinstance(node, list):
        depth, node = depth + 1, node[0]
    assert depth == MAX_DEPTH - 2 and node == 1
    with pytest.raises(ConfigError, match=r"app\.x\..*nested more than"):
        load_config(write(tmp_path, "no.toml", f"[app]\nx = [{inner}]\n"), environ={})


def test_deep_environment_values_and_names_are_refused_naming_the_variable():
    msg = refused({}, environ={"KVFRAME_APP__X": "[" * 100_000 + "]" * 100_000})
    assert msg == f"environment variable KVFRAME_APP__X: the value is nested more than {MAX_DEPTH} levels deep"
    msg = refused({}, environ={"KVFRAME_APP__X": "[" * 40 + "]" * 40})  # parses, but deeper than allowed
    assert msg.startswith("environment variable KVFRAME_APP__X: app.x.0.0") and "nested more than" in msg
    name = "KVFRAME_APP" + "__A" * 5000
    msg = refused({}, environ={name: "1"})
    assert msg.startswith("environment variable KVFRAME_APP__A__A") and "5001 levels of names" in msg
    half = list(range(MAX_NODES // 2 + 10))  # each within the budget, together over it
    msg = refused({"app": {"a": half}}, environ={"KVFRAME_APP__B": json.dumps(half)}, max_s=20, trace=False)
    assert msg.startswith("config <dict> with the KVFRAME_... environment overrides: app.")
    assert f"more than {MAX_NODES} values" in msg


def test_a_dict_that_contains_itself_is_refused():
    looped: dict = {"type": "local"}
    looped["me"] = looped
    msg = refused({"store": looped})
    assert msg.startswith("config <dict>: store.me.me.me") and "contains itself" in msg


def test_a_yaml_alias_to_itself_is_refused(tmp_path, cfgtest_plugin):
    p = write(tmp_path, "loop.yaml", "app:\n  x: &x [1, *x]\n")
    msg = refused(p)
    assert str(p) in msg and "app.x.1.1.1" in msg and "contains itself" in msg


# alias and merge-key bombs ------------------------------------------------------------------------

@pytest.mark.parametrize("section", ["", "app", "optimizer", "store"])
def test_yaml_alias_bombs_are_refused_before_they_expand(tmp_path, cfgtest_plugin, section):
    text = BILLION_LAUGHS if not section else f"{section}:\n" + "".join(f"  {line}\n" for line in
                                                                          BILLION_LAUGHS.splitlines())
    p = write(tmp_path, "bomb.yaml", text)
    before = p.read_bytes()
    msg = refused(p, max_s=5, max_mb=16, max_len=400)
    assert msg.startswith(f"invalid config in {p}, line ")
    assert f"the config holds more than {MAX_NODES} values (YAML aliases counted at every use)" in msg
    assert (f"{section}." if section else "") in msg
    unchanged(p, before, cfgtest_plugin)


def test_yaml_merge_key_bomb_is_refused(tmp_path):
    lines = ["a: &a {x: 1, y: 2, z: 3}"]
    for i in range(12):
        prev = f"*b{i - 1}" if i else "*a"
        lines.append(f"b{i}: &b{i}\n  <<: [{', '.join([prev] * 9)}]")
    msg = refused(write(tmp_path, "merge.yaml", "\n".join(lines) + "\n"), max_s=5, max_mb=16)
    assert "more than" in msg and "values" in msg and "<<" in msg


def test_yaml_text_bomb_is_refused(tmp_path):
    text = "app:\n  s: &s " + "x" * 100_000 + "\n  l: [" + ", ".join(["*s"] * 50) + "]\n"
    msg = refused(write(tmp_path, "text.yaml", text), max_s=5, max_mb=32)
    assert f"app.l: the config holds more than {MAX_TEXT} characters of text" in msg


def test_yaml_anchors_aliases_and_merge_keys_within_the_budget_still_work(tmp_path):
    p = write(tmp_path, "ok.yaml", "optimizer: &d {type: cfgtest_sgd, learning_rate: 0.1}\n"
                                   "app:\n  layers: &l [64, 64]\n  again: *l\n  opt: *d\n"
                                   "  merged:\n    <<: *d\n    momentum: 0.5\n")
    cfg = load_config(p, environ={})
    assert cfg.optimizer.learning_rate == 0.1 and cfg.app["again"] == [64, 64]
    assert cfg.app["merged"] == {"type": "cfgtest_sgd", "learning_rate": 0.1, "momentum": 0.5}


def test_validate_json_on_an_app_bomb_prints_a_short_error(tmp_path, capsys):
    small = "".join(f"  {line}\n" for line in BILLION_LAUGHS.splitlines()[:6])
    p = write(tmp_path, "app.yaml", "app:\n" + small)  # 9**6 = 531441 values once expanded
    assert len(p.read_bytes()) < 500
    assert cli.main(["validate", str(p), "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err) < 500 and str(p) in err and "app." in err


# big files and values ---------------------------------------------------------------------------

def test_too_many_values_in_app_is_refused(tmp_path):
    p = write(tmp_path, "many.toml", "[app]\nx = [" + ",".join(["1"] * (MAX_NODES + 1)) + "]\n")
    msg = refused(p, max_s=30, trace=False)
    assert msg.startswith(f"config file {p}: app.x: the config holds more than {MAX_NODES} values")


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    p = tmp_path / "big.toml"
    with open(p, "wb") as f:
        f.write(b"[app]\n# " + b"x" * MAX_FILE_BYTES + b"\n")
    msg = refused(p, max_s=2, max_mb=8)
    assert msg == (f"config file {p} is larger than {MAX_FILE_BYTES} bytes; a kvframe config holds settings: keep "
                   "data in files of its own")


def test_long_values_and_names_are_shortened_in_messages(tmp_path, cfgtest_plugin):
    p = write(tmp_path, "long.toml", '[optimizer]\ntype = "cfgtest_sgd"\nlearning_rate = "' + "x" * 200_000 + '"\n'
              + "k" * 100_000 + ' = 1\n')
    msg = refused(p, max_len=1500)
    assert "optimizer.learning_rate: Input should be a valid number, unable to parse string as a number " \
           "(got 'xxxxx" in msg
    assert "optimizer.kkkkk...(100000 characters)...kkkkk: Extra inputs are not permitted" in msg
    msg = refused({"optimizer": {"type": "x" * 100_000}}, max_len=1500)
    assert "optimizer.type: " in msg
    msg = refused({"optimizer": {"type": "cfgtest_sgd", "learning_rate": [[["deep"] * 100] * 10] * 10}})
    assert "optimizer.learning_rate: " in msg and "..." in msg


def test_many_problems_are_counted_not_all_listed(tmp_path):
    p = write(tmp_path, "keys.toml", '[optimizer]\ntype = "cfgtest_sgd"\n' + "".join(f"k{i} = 1\n" for i in range(500)))
    msg = refused(p)
    assert msg.count("Extra inputs are not permitted") == 50 and msg.endswith("... and 450 more problems")


def test_the_in_process_api_shortens_and_counts_problems_too():
    kv = kvframe.create("local")
    with pytest.raises(ConfigError) as info:
        kv.set_optimizer({"type": "sgd", "learning_rate": "x" * 100_000, **{f"k{i}": 1 for i in range(200)}})
    msg = str(info.value)
    assert len(msg) < 6000 and "learning_rate" in msg and "more problems" in msg
    assert kv.optimizer is None


# unreadable paths -------------------------------------------------------------------------------

def test_a_file_name_over_255_bytes_is_refused(tmp_path, cfgtest_plugin):
    p = tmp_path / ("a" * 300 + ".toml")
    msg = refused(p, max_len=400)
    assert msg.startswith("cannot read config file '") and msg.endswith("': File name too long")
    assert "(" in msg and "characters)" in msg  # the path is shortened
    with pytest.raises(ConfigError):
        kvframe.create_from_config(str(p))
    assert cfgtest_plugin.CREATED == []


def test_a_path_with_a_nul_byte_is_refused(monkeypatch):
    assert refused("cfg\x00.toml") == "config file 'cfg\\x00.toml' not found"  # what is_file() says
    monkeypatch.setattr(Path, "is_file", lambda self: True)  # and if it let the name through, open() refuses it
    assert refused("cfg\x00.toml") == "cannot read config file 'cfg\\x00.toml': embedded null byte"


def test_a_directory_that_may_not_be_searched(tmp_path, monkeypatch):
    p = tmp_path / "locked" / "cfg.toml"

    def no_access(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "stat", no_access)  # what is_file() meets under a directory without x permission
    assert refused(p) == f"cannot read config file {str(p)!r}: Permission denied"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may search any directory")
def test_a_directory_that_may_not_be_searched_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "cfg.toml").write_text("[app]\n")
    locked.chmod(0)
    try:
        p = locked / "cfg.toml"
        assert refused(p) == f"cannot read config file {str(p)!r}: Permission denied"
    finally:
        locked.chmod(0o700)


def test_a_directory_named_like_a_config(tmp_path):
    (tmp_path / "d.toml").mkdir()
    assert refused(tmp_path / "d.toml") == f"config path {str(tmp_path / 'd.toml')!r} is not a file"


# values YAML cannot build, and what validate --json prints ---------------------------------------

@pytest.mark.parametrize("text,why", [
    ("app:\n  when: 2020-13-45\n", "month must be in 1..12"),
    ("app:\n  n: 1" + "0" * 5000 + "\n", "Exceeds the limit"),
    ("app:\n  b: !!binary 'zz'\n", "base64"),
    ("app:\n  {[1]: 2}\n", "unhashable"),
])
def test_yaml_values_that_cannot_be_built_name_file_and_line(tmp_path, text, why):
    p = write(tmp_path, "bad.yaml", text)
    msg = refused(p)
    assert msg.startswith(f"invalid YAML in {p}:") and why in msg and "line 2" in msg


def test_read_file_applies_the_limits_too(tmp_path):
    with pytest.raises(ConfigError, match="nested more than"):
        read_file(write(tmp_path, "deep.yaml", "a: " + "[" * 40 + "]" * 40 + "\n"))


def test_validate_json_prints_dates_binary_and_sets(tmp_path, capsys):
    p = write(tmp_path, "d.yaml", "app:\n  day: 2020-01-02\n  b: !!binary aGVsbG8=\n  s: !!set {a}\n")
    assert cli.main(["validate", str(p), "--json"]) == 0
    app = json.loads(capsys.readouterr().out)["app"]
    assert app == {"day": "2020-01-02", "b": "b'hello'", "s": "{'a'}"}
    p = write(tmp_path, "d.toml", "[app]\nat = 1979-05-27T07:32:00Z\n")
    assert cli.main(["validate", str(p), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["app"] == {"at": "1979-05-27 07:32:00+00:00"}
