"""The main job, examples/train_digits.py, end to end: local (the default), device, 2bit, dist_sync."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvframe import plugins

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "train_digits.py"
CONFIGS = REPO / "examples" / "configs"

pytest.importorskip("sklearn", reason="the demo's dataset comes with scikit-learn (requirements-dev.txt)")


def run_demo(*args, tmp_path, env=None, timeout=180):
    out = tmp_path / "result-{rank}.json"
    full_env = {k: v for k, v in os.environ.items() if not (k.startswith("KVFRAME_") and "__" in k[8:])}
    full_env.pop("KVFRAME_CONFIG", None)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(DEMO), *args, "--json", str(out)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")}
    return proc, results


def needs(kind, name):
    if name not in plugins.names(kind):
        pytest.skip(f"{kind[:-1]} {name!r} is not installed")


def write_cfg(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_default_run_is_local_and_learns(tmp_path):
    """The README's main job: no arguments but --progress (a pipe is no terminal) and --json."""
    needs("optimizers", "sgd")
    proc, res = run_demo("--progress", tmp_path=tmp_path)
    r = res[0]
    assert r["store"] == "local" and r["num_workers"] == 1 and r["devices"] == 2 and r["optimizer"] == "sgd"
    assert r["epochs"] == 15 and len(r["history"]) == 15
    assert r["accuracy"] >= 0.95, r
    assert r["loss"] < r["history"][0]["loss"] / 3
    assert r["seconds"] < 30
    out = proc.stdout
    assert "kvframe store 'local': 1 worker(s) x 2 device(s); compression: none; optimizer: sgd on the store" in out
    assert "epoch  1/15  loss " in out and "test acc" in out
    assert f"final: store=local workers=1 devices=2 compression=none loss={r['loss']:.4f} " \
           f"accuracy={r['accuracy']:.4f}" in out
    # the progress bar goes to stderr
    assert "epoch 1/15" in proc.stderr


def test_runs_are_deterministic_and_store_optimizer_equals_worker_sgd(tmp_path):
    """With the optimizer on the store (push grads, pull weights) the trajectory is the same as
    with the store only summing and each worker applying SGD itself."""
    needs("optimizers", "sgd")
    on_store = write_cfg(tmp_path, '[store]\ntype = "local"\n[optimizer]\ntype = "sgd"\nlearning_rate = 0.1\n'
                                   'momentum = 0.9\n', "on_store.toml")
    on_worker = write_cfg(tmp_path, '[store]\ntype = "local"\n', "on_worker.toml")
    args = ["--epochs", "3", "--no-progress", "--quiet"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    _, a = run_demo("--config", str(on_store), *args, tmp_path=tmp_path / "a")
    _, b = run_demo("--config", str(on_worker), *args, tmp_path=tmp_path / "b")
    _, c = run_demo("--config", str(on_store), *args, tmp_path=tmp_path / "c")
    assert b[0]["optimizer"] == "worker-sgd"
    assert a[0]["history"] == c[0]["history"]  # same seed, same numbers
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-4)
    assert a[0]["accuracy"] == pytest.approx(b[0]["accuracy"], abs=1 / 359)


def test_env_override_changes_the_run(tmp_path):
    needs("optimizers", "sgd")
    proc, res = run_demo("--epochs", "2", "--no-progress", tmp_path=tmp_path,
                         env={"KVFRAME_APP__DEVICES": "3", "KVFRAME_STORE__TYPE": "listsum"})
    assert res[0]["devices"] == 3 and res[0]["store"] == "listsum"
    assert "kvframe store 'listsum': 1 worker(s) x 3 device(s)" in proc.stdout


def test_device_store(tmp_path):
    needs("stores", "device")
    needs("optimizers", "sgd")
    _, res = run_demo("--config", str(CONFIGS / "device.toml"), "--epochs", "6", "--no-progress", tmp_path=tmp_path)
    assert res[0]["store"] == "device" and res[0]["accuracy"] >= 0.93


def test_2bit_compression(tmp_path):
    needs("stores", "device")
    needs("compressors", "2bit")
    needs("optimizers", "sgd")
    (tmp_path / "plain").mkdir()
    (tmp_path / "2bit").mkdir()
    _, plain = run_demo("--config", str(CONFIGS / "device.toml"), "--epochs", "6", "--no-progress",
                        tmp_path=tmp_path / "plain")
    proc, comp = run_demo("--config", str(CONFIGS / "2bit.toml"), "--epochs", "6", "--no-progress",
                          tmp_path=tmp_path / "2bit")
    assert "compression: 2bit" in proc.stdout
    assert comp[0]["compression"] == "2bit"
    assert comp[0]["accuracy"] >= 0.9
    assert comp[0]["loss"] != plain[0]["loss"]  # the gradients really went through the quantizer


@pytest.mark.dist
def test_dist_sync_reaches_the_local_accuracy(tmp_path):
    needs("stores", "dist_sync")
    needs("optimizers", "sgd")
    if shutil.which("kvframe-launch", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}") \
            is None:
        pytest.skip("kvframe-launch is not installed")
    (tmp_path / "local").mkdir()
    (tmp_path / "dist").mkdir()
    _, local = run_demo("--config", str(CONFIGS / "local.toml"), "--epochs", "5", "--no-progress",
                        tmp_path=tmp_path / "local")
    proc, dist = run_demo("--config", str(CONFIGS / "dist_sync.toml"), "--epochs", "5", "--no-progress",
                          tmp_path=tmp_path / "dist", timeout=240)
    assert "launching 2 workers and 1 server(s) on loopback" in proc.stdout
    assert sorted(dist) == [0, 1]
    for r in dist.values():
        assert r["store"] == "dist_sync" and r["num_workers"] == 2
    # both workers hold the same model, and it is the local run's model up to float rounding
    assert dist[0]["loss"] == dist[1]["loss"] and dist[0]["accuracy"] == dist[1]["accuracy"]
    assert dist[0]["accuracy"] >= 0.93
    assert abs(dist[0]["accuracy"] - local[0]["accuracy"]) <= 2 / 359
    assert dist[0]["loss"] == pytest.approx(local[0]["loss"], rel=0.05)
    assert "final: store=dist_sync workers=2" in proc.stdout


def test_invalid_config_is_refused_before_training(tmp_path):
    bad = write_cfg(tmp_path, '[store]\ntype = "local"\n[optimizer]\ntype = "sgd"\nmomentum = 2\n')
    proc = subprocess.run([sys.executable, str(DEMO), "--config", str(bad)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"invalid kvframe config in {bad}" in proc.stderr
    assert "optimizer.momentum" in proc.stderr
    assert "epoch" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--devices", "-1"], "argument --devices: must be a positive integer, got -1"),
    (["--batch-size", "5000"], "--batch-size 5000 is larger than the 1438 training images"),
    (["--workers", "2"], "--workers and --servers apply to dist stores"),
])
def test_bad_demo_options_are_refused(args, message):
    proc = subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "final:" not in proc.stdout


def test_simple_progress_bar_without_tqdm(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("train_digits_under_test", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bar = mod.SimpleBar(4, "epoch 1/2", disable=False)
    bar.update()
    bar.update()
    assert capsys.readouterr().err.endswith("epoch 1/2 [" + "#" * 15 + "." * 15 + "] 2/4")
    bar.set_description("epoch 2/2")
    bar.set_postfix_str("loss 0.5")
    bar.write("epoch  1/2  loss 0.9")
    got = capsys.readouterr()
    assert got.out == "epoch  1/2  loss 0.9\n"
    assert got.err.endswith("epoch 2/2 [" + "#" * 15 + "." * 15 + "] 2/4  loss 0.5")
    bar.close()


# PyTorch interop (torch is not a test requirement: these skip without it) -----------------------

def test_torch_interop_example(tmp_path):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "torch_interop.py")], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    mse = float(out.split("final: mse=")[1].split()[0])
    first = float(out.split("epoch  1  train mse ")[1].split()[0])
    assert mse < 0.02 and mse < first / 10
    assert "replicas_agree=True" in out
    assert out.count("  [ok] ") == 6 and "[NO]" not in out


def test_torch_tensors_are_read_and_written_in_place():
    torch = pytest.importorskip("torch")
    import numpy as np

    import kvframe

    kv = kvframe.create("local")
    seen = []
    kv.set_updater(lambda key, merged, stored: (seen.append(merged.__array_interface__["data"][0]),
                                                stored.__iadd__(merged)))
    kv.init("w", torch.zeros(2, 3))
    g = torch.full((2, 3), 1.5)
    kv.push("w", g)
    assert seen == [g.data_ptr()]  # the updater read the tensor's own memory: no copy on push
    out = torch.empty(2, 3)
    ptr = out.data_ptr()
    kv.pull("w", out=out)
    assert out.data_ptr() == ptr and torch.equal(out, torch.full((2, 3), 1.5))
    out += 1  # the store's value is its own
    back = np.empty((2, 3), np.float32)
    kv.pull("w", out=back)
    np.testing.assert_array_equal(back, np.full((2, 3), 1.5, np.float32))
    with pytest.raises(TypeError, match=r"key .*: value: cannot view .*require"):
        kv.push("w", torch.ones(2, 3, requires_grad=True))
    kv.pull("w", out=back)
    np.testing.assert_array_equal(back, np.full((2, 3), 1.5, np.float32))
