"""examples/train_torch.py end to end: one process on 'local', and 2 workers + 1 server with the
scale-free 2bit compression (the example re-launches itself with kvframe-launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "train_torch.py"
pytest.importorskip("torch", reason="the torch tests need PyTorch (requirements-dev.txt pins torch==2.13.0)")
pytest.importorskip("kvframe_torch", reason="kvframe-torch is not installed (make installs it)")
pytest.importorskip("sklearn", reason="the example's dataset comes with scikit-learn (requirements-dev.txt)")


def run_example(tmp_path, *args, timeout=150):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVFRAME_", "DMLC_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(EXAMPLE), *args, "--json", str(tmp_path / "r-{rank}.json")],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, {int(p.stem[2:]): json.loads(p.read_text()) for p in tmp_path.glob("r-*.json")}


def test_single_process_run_learns_with_a_progress_bar(tmp_path):
    proc, res = run_example(tmp_path, "--epochs", "4", "--progress", "--clip", "5")
    r = res[0]
    assert (r["store"], r["num_workers"], r["optimizer"], r["compression"]) == ("local", 1, "torch-sgd", None)
    assert r["accuracy"] >= 0.9 and len(r["history"]) == 4
    assert "epoch 1/4" in proc.stderr  # the bar
    assert "final: store=local workers=1 compression=none" in proc.stdout


@pytest.mark.dist
def test_two_workers_with_2bit_compression(tmp_path):
    proc, res = run_example(tmp_path, "--config", str(REPO / "examples/configs/torch_2bit.toml"), "--epochs", "4",
                            "--no-progress")
    assert sorted(res) == [0, 1]
    assert "launching 2 workers and 1 server(s)" in proc.stdout
    for r in res.values():
        assert r["store"] == "dist_sync" and r["num_workers"] == 2
        assert r["compression"] == {"type": "2bit", "threshold": 1.0, "threshold_scale": "rms"}
        assert r["accuracy"] >= 0.9
    assert res[0]["params"] == res[1]["params"]  # every worker holds the same model
