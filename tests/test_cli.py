"""The `kvframe` command: plugins, validate, config-schema, bench."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvframe import cli, plugins

REPO = Path(__file__).resolve().parent.parent


def kvframe_cmd(*args, env=None, timeout=120):
    """The installed console script, run as a user would."""
    exe = Path(sys.executable).parent / "kvframe"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kvframe.cli"]
    full_env = {k: v for k, v in os.environ.items() if not (k.startswith("KVFRAME_") and "__" in k[8:])}
    full_env.pop("KVFRAME_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


THIRD_PARTY = {
    # an optimizer whose config pins no Literal type: the schema must still get a tagged union member
    "kvframe_cli_fooopt": """
        from pydantic import Field
        import kvframe
        from kvframe.config import OptimizerConfig

        class FooOptConfig(OptimizerConfig):
            type: str = "fooopt"
            learning_rate: float = Field(0.1, gt=0, description="step size of foo")

        @kvframe.hookimpl
        def kvframe_register_updaters(register):
            register("fooopt", object, FooOptConfig)
    """,
    "kvframe_cli_broken": """
        import nonexistent_dependency_xyz
    """,
}
THIRD_PARTY_EPS = """
    [kvframe.optimizers]
    fooopt = kvframe_cli_fooopt
    [kvframe.stores]
    brokenstore = kvframe_cli_broken
"""


@pytest.fixture
def third_party(tmp_path, make_dist):
    path = make_dist(tmp_path, "kvframe-clitest", THIRD_PARTY_EPS, THIRD_PARTY)
    return {"PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}


# plugins ---------------------------------------------------------------------------------------

def test_plugins_lists_every_kind_with_distribution_and_version():
    proc = kvframe_cmd("plugins")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for title in ("stores (", "transports (", "compressors (", "optimizers ("):
        assert title in out
    lines = out.splitlines()
    local = next(line for line in lines if line.split()[:1] == ["local"])
    assert local.split()[1:3] == ["kvframe-local", "0.1.0"]
    listsum = next(line for line in lines if line.split()[:1] == ["listsum"])
    assert listsum.split()[1:4] == ["kvframe-testplugin", "0.0.1", "kvframe_testplugin.store"]
    assert "failed to load" not in out


def test_plugins_reports_broken_and_disabled_plugins(third_party):
    proc = kvframe_cmd("plugins", env={**third_party, "KVFRAME_DISABLE_PLUGINS": "listsum"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "failed to load (1):" in out
    assert ("store 'brokenstore' from kvframe-clitest 1.2.3: ModuleNotFoundError: No module named "
            "'nonexistent_dependency_xyz'") in out
    assert "disabled by KVFRAME_DISABLE_PLUGINS (1):\n  store 'listsum' from kvframe-testplugin" in out
    fooopt = next(line for line in out.splitlines() if line.split()[:1] == ["fooopt"])
    assert fooopt.split()[1:4] == ["kvframe-clitest", "1.2.3", "kvframe_cli_fooopt"]
    # the other plugins still load
    assert any(line.split()[:1] == ["local"] for line in out.splitlines())


def test_plugins_json(third_party):
    proc = kvframe_cmd("plugins", "--json", env=third_party)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"stores", "transports", "compressors", "optimizers", "failed", "disabled"}
    local = next(r for r in data["stores"] if r["name"] == "local")
    assert local["distribution"] == "kvframe-local" and local["config"] == "kvframe_local.store.LocalConfig"
    assert data["failed"] == [{"kind": "stores", "name": "brokenstore", "distribution": "kvframe-clitest 1.2.3",
                               "reason": "ModuleNotFoundError: No module named 'nonexistent_dependency_xyz'"}]


# validate --------------------------------------------------------------------------------------

def test_validate_valid_file(tmp_path):
    p = tmp_path / "ok.toml"
    p.write_text('[store]\ntype = "local"\nreduce_threads = 2\n[app]\nepochs = 3\n')
    proc = kvframe_cmd("validate", str(p))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"{p}: valid"
    assert "store:       local [reduce_threads=2]" in proc.stdout
    assert "compression: none" in proc.stdout
    assert "app:         epochs" in proc.stdout


def test_validate_invalid_file_exits_1_with_file_path_and_reason(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("store:\n  type: local\n  reduce_threads: -3\nextra_section: {}\n")
    proc = kvframe_cmd("validate", str(p))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"invalid kvframe config in {p}:" in proc.stderr
    assert "store.reduce_threads: Input should be greater than or equal to 1 (got -3)" in proc.stderr
    assert "extra_section: unknown section" in proc.stderr


def test_validate_env_override_and_kvframe_config(tmp_path):
    p = tmp_path / "ok.toml"
    p.write_text('[store]\ntype = "local"\n')
    proc = kvframe_cmd("validate", "--json", env={"KVFRAME_CONFIG": str(p), "KVFRAME_STORE__REDUCE_THREADS": "3"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["source"] == str(p)
    assert data["store"]["type"] == "local" and data["store"]["reduce_threads"] == 3
    assert data["overrides"] == {"KVFRAME_STORE__REDUCE_THREADS": "3"}
    proc = kvframe_cmd("validate", str(p), env={"KVFRAME_STORE__REDUCE_THREADS": "0"})
    assert proc.returncode == 1
    assert "[from environment variable KVFRAME_STORE__REDUCE_THREADS]" in proc.stderr


def test_validate_missing_file_and_no_file():
    proc = kvframe_cmd("validate", "/nonexistent/kv.toml")
    assert proc.returncode == 1 and "config file '/nonexistent/kv.toml' not found" in proc.stderr
    proc = kvframe_cmd("validate")
    assert proc.returncode == 2 and "give a config file, or set KVFRAME_CONFIG" in proc.stderr


def test_validate_example_configs():
    # every shipped example whose plugins are installed validates
    for p in sorted((REPO / "examples" / "configs").glob("*.*")):
        proc = kvframe_cmd("validate", str(p))
        if proc.returncode and "no store named" in proc.stderr:
            continue  # e.g. 'device' or 'dist_sync' not installed yet
        assert proc.returncode == 0, (p, proc.stderr)


# config-schema ---------------------------------------------------------------------------------

def test_config_schema_has_discriminated_unions_of_installed_plugins(third_party):
    proc = kvframe_cmd("config-schema", env=third_party)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"store", "compression", "optimizer", "app"}
    store = schema["properties"]["store"]
    assert store["discriminator"]["propertyName"] == "type"
    assert {"local", "listsum"} <= set(store["discriminator"]["mapping"])
    local = schema["$defs"]["LocalConfig"]
    assert local["additionalProperties"] is False
    assert local["properties"]["reduce_threads"]["anyOf"][0]["minimum"] == 1
    # the third-party optimizer (type: str in its model) joins the optimizer union, tagged by its name
    opt = schema["properties"]["optimizer"]
    members = opt["anyOf"]
    foo = json.dumps(members)
    assert "FooOptConfig" in foo
    foo_def = schema["$defs"]["FooOptConfig"]
    assert foo_def["properties"]["type"]["const"] == "fooopt"
    assert foo_def["properties"]["learning_rate"]["description"] == "step size of foo"
    if "2bit" in plugins.names("compressors"):
        comp = next(m for m in schema["properties"]["compression"]["anyOf"] if "discriminator" in m)
        assert "2bit" in comp["discriminator"]["mapping"]


def test_config_schema_to_file(tmp_path):
    out = tmp_path / "schema.json"
    assert cli.main(["config-schema", "-o", str(out), "--indent", "0"]) == 0
    schema = json.loads(out.read_text())
    assert schema["$schema"].endswith("2020-12/schema")


# bench -----------------------------------------------------------------------------------------

def load_run_all():
    spec = importlib.util.spec_from_file_location("kvframe_run_all_under_test", REPO / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_all_turns_tables_into_throughput_series():
    run_all = load_run_all()
    text = textwrap.dedent("""
        ### demo bench (µs per iteration)

        | size | copies | kvframe µs | kvframe GB/s | MXNet 1.9.1 µs | speed-up |
        | ---- | ------ | ---------- | ------------ | -------------- | -------- |
        | 2^10 | 1      | 2.0        | 1.0          | 4.0            | 2.00x    |
        | 2^20 | 1      | 1000.0     | 8.0          | 500.0          | 0.50x    |

        | name | value |
        | ---- | ----- |
        | a    | 1     |
    """)
    series = run_all.throughput_series(text)
    assert series == {
        "demo bench: kvframe (copies=1)": [(1024.0, 1024 / 2e-6), (2.0 ** 20, 2.0 ** 20 / 1e-3)],
        "demo bench: MXNet 1.9.1 (copies=1)": [(1024.0, 1024 / 4e-6), (2.0 ** 20, 2.0 ** 20 / 5e-4)],
    }
    ms_table = textwrap.dedent("""
        ### other (ms per iteration)

        | size | codec | sent       | kvframe ms/iter |
        | ---- | ----- | ---------- | --------------- |
        | 2^20 | none  | 4 MiB      | 2.0             |
        | 2^20 | 2bit  | 256 KiB    | 4.0             |
        | 2^24 | none  | 64 MiB     | 40.0            |
        | 2^24 | 2bit  | 4 MiB      | 50.0            |
    """)
    series = run_all.throughput_series(ms_table)  # 'sent' differs on every row: not a series key
    assert series == {
        "other: kvframe (codec=none)": [(2.0 ** 20, 2.0 ** 20 / 2e-3), (2.0 ** 24, 2.0 ** 24 / 4e-2)],
        "other: kvframe (codec=2bit)": [(2.0 ** 20, 2.0 ** 20 / 4e-3), (2.0 ** 24, 2.0 ** 24 / 5e-2)],
    }


def test_bench_quick_prints_tables_and_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    proc = kvframe_cmd("bench", "--quick", "--no-mxnet", "--only", "local", "--out", str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## bench_local.py" in proc.stdout
    assert "| size |" in proc.stdout
    png = tmp_path / "throughput.png"
    assert f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    assert any(label.endswith("kvframe (copies=4)") for label in results["throughput"])


def test_bench_without_source_tree(monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_runner", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    assert "runs benchmarks/run_all.py from a source checkout" in capsys.readouterr().err


def test_no_command_is_a_usage_error():
    proc = kvframe_cmd()
    assert proc.returncode == 2 and "required: COMMAND" in proc.stderr
    proc = kvframe_cmd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("kvframe ")


def test_run_all_passes_only_known_flags_and_reports_failed_exits(tmp_path, capsys):
    run_all = load_run_all()
    strict = tmp_path / "bench_strict.py"
    strict.write_text(textwrap.dedent("""
        import argparse, sys
        def main(argv=None):
            ap = argparse.ArgumentParser()
            ap.add_argument("--no-mxnet", action="store_true")
            args = ap.parse_args(argv)
            print("strict ran", args.no_mxnet, sys.argv[1:])
    """))
    out = run_all.run_one(strict, ["--quick", "--no-mxnet"])  # --quick is not in its source
    assert "strict ran True ['--no-mxnet']" in out
    failing = tmp_path / "bench_failing.py"
    failing.write_text("import sys\ndef main(argv):\n    sys.exit(3)\n")
    with pytest.raises(RuntimeError, match="bench_failing.py exited with status 3"):
        run_all.run_one(failing, [])
    quiet_exit = tmp_path / "bench_exit0.py"
    quiet_exit.write_text("import sys\ndef main(argv):\n    print('done')\n    sys.exit(0)\n")
    assert run_all.run_one(quiet_exit, []) == "done\n"
