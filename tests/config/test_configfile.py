"""kvframe.create_from_config: TOML and YAML files, every kind of invalid file, environment overrides."""

import textwrap

import numpy as np
import pytest

import kvframe
from kvframe.configfile import env_overrides, load_config, parse_env_value
from kvframe.errors import ConfigError

FULL_TOML = """
[store]
type = "cfgtest_store"
slots = 8

[compression]
type = "cfgtest_2bit"
threshold = 0.25

[optimizer]
type = "cfgtest_sgd"
learning_rate = 0.1
momentum = 0.9

[optimizer.lr_scheduler]
type = "factor"
step = 10
factor = 0.5

[app]
epochs = 3
"""

FULL_YAML = """
store:
  type: cfgtest_store
  slots: 8
compression: {type: cfgtest_2bit, threshold: 0.25}
optimizer:
  type: cfgtest_sgd
  learning_rate: 0.1
  momentum: 0.9
  lr_scheduler: {type: factor, step: 10, factor: 0.5}
app:
  epochs: 3
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(config, **kw):
    with pytest.raises(ConfigError) as e:
        load_config(config, **kw)
    return str(e.value)


# valid files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,text", [("full.toml", FULL_TOML), ("full.yaml", FULL_YAML), ("full.yml", FULL_YAML)])
def test_full_file_validates_every_section(tmp_path, name, text):
    cfg = load_config(write(tmp_path, name, text))
    assert cfg.store.type == "cfgtest_store" and cfg.store.slots == 8
    assert cfg.compression.type == "cfgtest_2bit" and cfg.compression.threshold == 0.25
    assert cfg.optimizer.learning_rate == 0.1 and cfg.optimizer.momentum == 0.9
    assert cfg.optimizer.lr_scheduler.step == 10 and cfg.optimizer.lr_scheduler.factor == 0.5
    assert cfg.app == {"epochs": 3}
    assert cfg.source.endswith(name)


def test_create_from_config_applies_store_compression_and_optimizer(tmp_path, cfgtest_plugin):
    kv = kvframe.create_from_config(write(tmp_path, "full.toml", FULL_TOML))
    assert kv.type == "cfgtest_store"
    backend = kv.backend
    assert backend.config.slots == 8
    assert backend.compressor.config.threshold == 0.25
    assert kv.gradient_compression.threshold == 0.25
    assert kv.optimizer.config.learning_rate == 0.1
    # the optimizer runs on the store: w -= lr * (sum of the per-device gradients)
    kv.init(0, np.ones(3, np.float32))
    kv.push(0, [np.full(3, 1.0, np.float32), np.full(3, 2.0, np.float32)])
    out = np.empty(3, np.float32)
    kv.pull(0, out=out)
    np.testing.assert_allclose(out, 1.0 - 0.1 * 3.0)


def test_str_path_and_dict_and_shorthand(tmp_path):
    p = write(tmp_path, "s.toml", 'store = "listsum"\noptimizer = "cfgtest_sgd"\n')
    cfg = load_config(str(p))
    assert cfg.store.type == "listsum" and cfg.optimizer.learning_rate == 0.01
    kv = kvframe.create_from_config({"store": {"type": "local", "reduce_threads": 2}})
    assert kv.type == "local" and kv.backend.config.reduce_threads == 2
    assert load_config({"store": "listsum"}).source == "<dict>"


def test_empty_file_means_local_store(tmp_path):
    cfg = load_config(write(tmp_path, "empty.toml", ""))
    assert cfg.store.type == "local" and cfg.compression is None and cfg.optimizer is None
    cfg = load_config(write(tmp_path, "empty.yaml", ""))
    assert cfg.store.type == "local"


def test_store_type_is_case_insensitive_and_mxnet_aliases_are_kept(tmp_path):
    kv = kvframe.create_from_config({"store": {"type": "Local_Update_CPU"}})
    assert kv.backend.config.type == "local"
    assert kv.type == "Local_Update_CPU"  # echoed as written, like MXNet's kv.type


def test_kvframe_config_variable_is_read_without_argument(tmp_path, monkeypatch):
    p = write(tmp_path, "env.toml", '[store]\ntype = "listsum"\n')
    monkeypatch.setenv("KVFRAME_CONFIG", str(p))
    kv = kvframe.create_from_config()
    assert kv.type == "listsum"
    assert load_config().source == str(p)


def test_no_argument_and_no_variable_gives_local():
    kv = kvframe.create_from_config()
    assert kv.type == "local"


def test_summary_names_every_part(tmp_path):
    text = load_config(write(tmp_path, "full.toml", FULL_TOML)).summary()
    assert "store:       cfgtest_store [slots=8]" in text
    assert "compression: cfgtest_2bit [threshold=0.25]" in text
    assert "optimizer:   cfgtest_sgd [" in text and "learning_rate=0.1" in text and '"step": 10' in text


# invalid files -------------------------------------------------------------------------------

def test_unknown_section(tmp_path):
    p = write(tmp_path, "bad.toml", '[store]\ntype = "local"\n[optimiser]\ntype = "sgd"\n')
    msg = error_of(p)
    assert f"invalid kvframe config in {p}" in msg
    assert "optimiser: unknown section; the sections are store, compression, optimizer, app" in msg


def test_unknown_store_option_names_the_field(tmp_path):
    p = write(tmp_path, "bad.toml", '[store]\ntype = "local"\nreduce_thread = 2\n')
    msg = error_of(p)
    assert str(p) in msg
    assert "store.reduce_thread: Extra inputs are not permitted (got 2)" in msg


def test_out_of_bounds_value(tmp_path):
    p = write(tmp_path, "bad.yaml", "store: {type: local, reduce_threads: 0}\n")
    msg = error_of(p)
    assert str(p) in msg
    assert "store.reduce_threads: Input should be greater than or equal to 1 (got 0)" in msg


def test_wrong_value_type(tmp_path):
    p = write(tmp_path, "bad.toml", '[optimizer]\ntype = "cfgtest_sgd"\nlearning_rate = "fast"\n')
    msg = error_of(p)
    assert "optimizer.learning_rate: Input should be a valid number" in msg and "(got 'fast')" in msg


def test_nested_lr_scheduler_field_path(tmp_path):
    p = write(tmp_path, "bad.toml", """
        [optimizer]
        type = "cfgtest_sgd"
        [optimizer.lr_scheduler]
        type = "factor"
        step = 0
        factr = 0.5
    """)
    msg = error_of(p)
    assert "optimizer.lr_scheduler.step: Input should be greater than or equal to 1 (got 0)" in msg
    assert "optimizer.lr_scheduler.factr: Extra inputs are not permitted (got 0.5)" in msg


def test_missing_type_in_optimizer_and_compression(tmp_path):
    msg = error_of({"optimizer": {"learning_rate": 0.1}, "compression": {"threshold": 1.0}})
    assert "optimizer.type: field required: the optimizer name, one of [" in msg
    assert "'cfgtest_sgd'" in msg
    assert "compression.type: field required: the compressor name" in msg


def test_unknown_plugin_names_lists_installed(tmp_path):
    p = write(tmp_path, "bad.toml", '[store]\ntype = "nosuchstore"\n[compression]\ntype = "9bit"\n')
    msg = error_of(p)
    assert "store.type: no store named 'nosuchstore'; installed:" in msg and "local" in msg
    assert "compression.type: no compressor named '9bit'" in msg and "cfgtest_2bit" in msg


def test_section_of_the_wrong_shape(tmp_path):
    msg = error_of({"store": 3, "optimizer": ["sgd"], "app": "x"})
    assert "store: must be a table of options with a 'type', or a name (got 3)" in msg
    assert "optimizer: must be a table of options with a 'type', or a name (got ['sgd'])" in msg
    assert "app: Input should be a valid dictionary (got 'x')" in msg


def test_non_string_type(tmp_path):
    msg = error_of({"store": {"type": 5}})
    assert "store.type: must be a string naming a store" in msg and "(got 5)" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    p = write(tmp_path, "bad.toml", """
        [store]
        type = "local"
        reduce_threads = 999
        [optimizer]
        type = "cfgtest_sgd"
        learning_rate = -1
        [extra]
        a = 1
    """)
    msg = error_of(p)
    lines = msg.splitlines()
    assert lines[0] == f"invalid kvframe config in {p}:"
    assert len(lines) == 4, msg
    assert any(line.startswith("  extra:") for line in lines)
    assert any(line.startswith("  store.reduce_threads:") for line in lines)
    assert any(line.startswith("  optimizer.learning_rate: Input should be greater than 0") for line in lines)


def test_compression_on_a_store_that_cannot_compress(tmp_path, cfgtest_plugin):
    p = write(tmp_path, "bad.toml", '[store]\ntype = "local"\n[compression]\ntype = "cfgtest_2bit"\n')
    msg = error_of(p)
    assert "compression: store 'local' does not support gradient compression" in msg


def test_toml_syntax_error_shows_file_and_line(tmp_path):
    p = write(tmp_path, "broken.toml", '[store]\ntype = "local"\nreduce_threads = \n')
    msg = error_of(p)
    assert msg.startswith(f"invalid TOML in {p}:")
    assert "line 3" in msg


def test_yaml_syntax_error_shows_file_and_line(tmp_path):
    p = write(tmp_path, "broken.yaml", "store:\n  type: local\n  reduce_threads: [1,\n")
    msg = error_of(p)
    assert msg.startswith(f"invalid YAML in {p}:")
    assert "line" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    p = write(tmp_path, "list.yaml", "- store\n- local\n")
    msg = error_of(p)
    assert f"invalid config in {p}: the top level must be a table/mapping of sections" in msg


def test_missing_file_and_unknown_extension(tmp_path):
    assert f"config file {str(tmp_path / 'nope.toml')!r} not found" in error_of(tmp_path / "nope.toml")
    p = write(tmp_path, "cfg.ini", "[store]\n")
    assert "unknown extension '.ini'; use .toml, .yaml or .yml" in error_of(p)
    assert "a config must be a file path, a dict or None" in error_of(42)


def test_nothing_is_created_when_any_part_is_invalid(tmp_path, cfgtest_plugin):
    p = write(tmp_path, "bad.toml",
              '[store]\ntype = "cfgtest_store"\n[optimizer]\ntype = "cfgtest_sgd"\nmomentum = 1.5\n')
    with pytest.raises(ConfigError, match="optimizer.momentum: Input should be less than 1"):
        kvframe.create_from_config(p)
    assert cfgtest_plugin.CREATED == []


def test_store_is_closed_when_applying_a_part_fails(cfgtest_plugin):
    with pytest.raises(RuntimeError, match="threshold refused by the backend"):
        kvframe.create_from_config({"store": "cfgtest_store", "compression": {"type": "cfgtest_2bit",
                                                                              "threshold": 500}})
    assert len(cfgtest_plugin.CREATED) == 1
    assert cfgtest_plugin.CLOSED == cfgtest_plugin.CREATED


# environment overrides -----------------------------------------------------------------------

def test_parse_env_value():
    assert parse_env_value("0.05") == 0.05
    assert parse_env_value("3") == 3
    assert parse_env_value("true") is True
    assert parse_env_value("null") is None
    assert parse_env_value("[1, 2]") == [1, 2]
    assert parse_env_value('{"step": 4}') == {"step": 4}
    assert parse_env_value("dist_sync") == "dist_sync"
    assert parse_env_value('"7"') == "7"


def test_env_overrides_are_parsed_and_scoped():
    env = {"KVFRAME_OPTIMIZER__LEARNING_RATE": "0.5", "KVFRAME_CONFIG": "x.toml", "KVFRAME_TIMEOUT": "3",
           "KVFRAME_STORE__TYPE": "listsum", "OTHER__X": "1"}
    got = env_overrides(env)
    assert [(v, p, val) for v, p, val, _ in got] == [
        ("KVFRAME_OPTIMIZER__LEARNING_RATE", ("optimizer", "learning_rate"), 0.5),
        ("KVFRAME_STORE__TYPE", ("store", "type"), "listsum")]
    with pytest.raises(ConfigError, match="empty name between '__' separators"):
        env_overrides({"KVFRAME_STORE____TYPE": "x"})


def test_env_overrides_file_values(tmp_path, monkeypatch):
    p = write(tmp_path, "full.toml", FULL_TOML)
    monkeypatch.setenv("KVFRAME_OPTIMIZER__LEARNING_RATE", "0.05")
    monkeypatch.setenv("KVFRAME_OPTIMIZER__LR_SCHEDULER__STEP", "100")
    monkeypatch.setenv("KVFRAME_STORE__SLOTS", "16")
    monkeypatch.setenv("KVFRAME_APP__EPOCHS", "7")
    cfg = load_config(p)
    assert cfg.optimizer.learning_rate == 0.05
    assert cfg.optimizer.lr_scheduler.step == 100 and cfg.optimizer.lr_scheduler.factor == 0.5
    assert cfg.optimizer.momentum == 0.9  # untouched values stay
    assert cfg.store.slots == 16 and cfg.app["epochs"] == 7
    assert cfg.overrides["KVFRAME_OPTIMIZER__LEARNING_RATE"] == "0.05"
    kv = kvframe.create_from_config(p)
    assert kv.optimizer.config.learning_rate == 0.05


def test_env_switches_the_store_type_and_removes_sections(tmp_path, monkeypatch):
    p = write(tmp_path, "full.toml", FULL_TOML.replace("slots = 8\n", ""))
    monkeypatch.setenv("KVFRAME_STORE__TYPE", "listsum")
    monkeypatch.setenv("KVFRAME_COMPRESSION__TYPE", "none")
    cfg = load_config(p)
    assert cfg.store.type == "listsum" and cfg.compression is None and cfg.optimizer is not None


def test_env_into_a_shorthand_section_and_without_a_file(monkeypatch):
    monkeypatch.setenv("KVFRAME_OPTIMIZER__LEARNING_RATE", "0.3")
    cfg = load_config({"optimizer": "cfgtest_sgd"})
    assert cfg.optimizer.learning_rate == 0.3
    monkeypatch.setenv("KVFRAME_OPTIMIZER__TYPE", "cfgtest_sgd")
    monkeypatch.setenv("KVFRAME_STORE__TYPE", "listsum")
    kv = kvframe.create_from_config()
    assert kv.type == "listsum" and kv.optimizer.config.learning_rate == 0.3


def test_invalid_env_value_names_the_variable(tmp_path, monkeypatch):
    p = write(tmp_path, "full.toml", FULL_TOML)
    monkeypatch.setenv("KVFRAME_OPTIMIZER__MOMENTUM", "lots")
    monkeypatch.setenv("KVFRAME_STOR__TYPE", "local")
    msg = error_of(p)
    assert str(p) in msg
    assert ("optimizer.momentum: Input should be a valid number, unable to parse string as a number (got 'lots') "
            "[from environment variable KVFRAME_OPTIMIZER__MOMENTUM]") in msg
    assert "stor: unknown section" in msg and "KVFRAME_STOR__TYPE" in msg


def test_env_cannot_descend_into_a_scalar(monkeypatch):
    monkeypatch.setenv("KVFRAME_OPTIMIZER__LEARNING_RATE__X", "1")
    msg = error_of({"optimizer": {"type": "cfgtest_sgd", "learning_rate": 0.1}})
    assert "KVFRAME_OPTIMIZER__LEARNING_RATE__X: cannot set optimizer.learning_rate.x" in msg


def test_a_loaded_config_can_be_adjusted_then_created(cfgtest_plugin):
    cfg = load_config({"store": "cfgtest_store", "optimizer": {"type": "cfgtest_sgd"}})
    cfg.optimizer.learning_rate = 0.5  # validated on assignment
    with pytest.raises(Exception, match="greater than 0"):
        cfg.optimizer.learning_rate = -1.0
    kv = kvframe.create_from_config(cfg)
    assert kv.optimizer.config.learning_rate == 0.5


def test_real_optimizer_with_a_tagged_lr_scheduler_union(tmp_path):
    """kvframe-optimizers' lr_scheduler is a discriminated union: the error path is still the file's."""
    from kvframe import plugins

    if "sgd" not in plugins.names("optimizers"):
        pytest.skip("kvframe-optimizers is not installed")
    p = write(tmp_path, "sgd.toml", """
        [store]
        type = "local"
        reduce_threads = 0
        [compression]
        type = "cfgtest_2bit"
        [optimizer]
        type = "SGD"
        momentum = 0.9
        [optimizer.lr_scheduler]
        type = "factor"
        step = 0
    """)
    msg = error_of(p)
    assert "  optimizer.lr_scheduler.step: Input should be greater than or equal to 1 (got 0)" in msg
    assert "factor.step" not in msg
    # the store's options are invalid, yet its type is known: compression is still checked against it
    assert "  compression: store 'local' does not support gradient compression" in msg
    ok = load_config({"optimizer": {"type": "SGD", "momentum": 0.9,
                                    "lr_scheduler": {"type": "factor", "step": 10, "factor": 0.5}}})
    assert ok.optimizer.type == "sgd" and ok.optimizer.lr_scheduler.step == 10


def test_clean_loc_drops_union_tags_only():
    from kvframe.configfile import _clean_loc

    data = {"lr_scheduler": {"type": "factor", "step": 0}, "items": [{"a": 1}]}
    assert _clean_loc(("lr_scheduler", "factor", "step"), data) == ("lr_scheduler", "step")
    assert _clean_loc(("lr_scheduler", "factor", "missing"), data) == ("lr_scheduler", "missing")
    assert _clean_loc(("items", 0, "a"), data) == ("items", 0, "a")
    assert _clean_loc(("function-after[check(), X]", "x"), {"x": 1}) == ("x",)
    assert _clean_loc(("nope", "deeper"), data) == ("nope", "deeper")


def test_yaml_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    import sys

    p = write(tmp_path, "cfg.yaml", "store: local\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    msg = error_of(p)
    assert msg == f"reading {p} needs PyYAML: pip install pyyaml (or use a .toml file)"


def test_toml_on_python_3_10_uses_tomli(tmp_path, monkeypatch):
    import sys

    tomli = pytest.importorskip("tomli")
    from kvframe import configfile

    monkeypatch.setattr(sys, "version_info", (3, 10, 12, "final", 0))
    assert configfile._toml_module() is tomli
    cfg = load_config(write(tmp_path, "cfg.toml", '[store]\ntype = "listsum"\n'))
    assert cfg.store.type == "listsum"
    assert "invalid TOML" in error_of(write(tmp_path, "bad.toml", "[store\n"))
