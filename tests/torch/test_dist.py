"""kvframe-torch across processes: one dist_sync job (2 workers, 1 server running SGD) runs every
scenario of dist_job.py; each is checked against single-process torch on the combined batches."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the torch tests need PyTorch (requirements-dev.txt pins torch==2.13.0)")
kvframe_torch = pytest.importorskip("kvframe_torch", reason="kvframe-torch is not installed (make installs it)")

from torch_helpers import STEPS, data, flat, loss_of, make_model, reference  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "dist"))

from dist_helpers import run_job  # noqa: E402

pytestmark = pytest.mark.dist
TOL = 1e-5


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torch-dist")
    env = {"KVF_TORCH_RESULT": str(tmp / "result-{rank}.json"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "dist"), os.environ.get("PYTHONPATH", "")])}
    res = run_job(tmp, (HERE / "dist_job.py").read_text(), n=2, s=1, env=env, timeout=150, prelude=False)
    assert res.rc == 0, res.out
    results = [json.loads((tmp / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in results] == [0, 1] and results[0]["num_workers"] == 2
    return results


def close(got, want, what):
    g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    assert g.shape == w.shape, what
    err = float((g - w).abs().max())
    assert err <= TOL, f"{what}: differs from single-process torch by {err:.3g}"


def check_curve(results, name, ref):
    for r in results:
        close(r[name]["losses"], ref["losses"], f"{name}: loss curve of worker {r['rank']}")
        close(r[name]["params"], ref["params"], f"{name}: parameters of worker {r['rank']}")


@pytest.mark.parametrize("name", ["sum", "store", "no_average", "passes", "resumed"])
def test_training_equals_single_process_on_the_combined_batch(job, name):
    """sum: the server sums, torch's SGD on the workers; store: SGD on the server; no_average: sums
    with half the learning rate; passes: backward_passes_per_step=2; resumed: a checkpoint after 3 of
    5 steps loaded into a new model and optimizer. The loss curves are allreduced metrics."""
    check_curve(job, name, reference())


def test_gradient_clipping_between_synchronize_and_step(job):
    check_curve(job, "clip", reference(clip=0.05))
    assert job[0]["clip"]["params"][-1] != reference()["params"][-1]  # the clip did bite


def test_broadcast_parameters_from_either_root(job):
    for r in job:
        close(r["bcast0"], flat(make_model(seed=10)), "broadcast from rank 0")
        close(r["bcast1"], flat(make_model(seed=11)), "broadcast from rank 1 (named_parameters)")


def test_broadcast_optimizer_state_and_objects(job):
    x, y = data()
    m = make_model(seed=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.5)  # what rank 1 (the root) did
    for s in range(2):
        opt.zero_grad()
        loss_of(m, x[s], y[s]).backward()
        opt.step()
    want = [opt.state[p]["momentum_buffer"].reshape(-1).tolist() for p in m.parameters()]
    for r in job:
        st = r["opt_state"]
        assert st["lr"] == 0.02 and st["momentum"] == 0.5
        assert len(st["buffers"]) == len(want)
        for got, w in zip(st["buffers"], want):
            close(got, w, f"momentum buffer on worker {r['rank']}")
        assert r["object"] == {"from": 1, "list": [1, 2.5, None]}


def test_allreduce_dtypes_and_shapes_with_a_server_optimizer(job):
    for r in job:
        assert r["allreduce_int"] == [3, 20]
        assert r["allreduce_scalar"] == 1.0
        assert r["allreduce_f64"] == [[0.5, 0.5]] * 3
        assert len(r["sum"]["losses"]) == STEPS
