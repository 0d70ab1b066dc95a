"""Store 'device' on several (simulated) GPUs: merge devices, per-device residuals, peer copies.

fake_cupy stands in for cupy (strict about devices, running the real kernel source compiled as
C++), so these paths run in CI; test_cupy.py runs the real thing on GPU machines."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import kvframe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "compressors"))
import fake_cupy  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler for the simulated kernels")


@pytest.fixture
def cp(monkeypatch):
    fake_cupy.install(monkeypatch)
    return fake_cupy


def on(cp, dev, a):
    with cp.cuda.Device(dev):
        return cp.asarray(np.asarray(a, np.float32))


@pytest.mark.parametrize("comp", [None, {"type": "2bit", "threshold": 0.5}, {"type": "1bit", "threshold": 0.2},
                                  {"type": "fp16"}, {"type": "bf16"}, {"type": "topk", "ratio": 0.3}])
def test_gpus_give_the_numpy_store_results(cp, comp):
    n = 1000
    slots = [0, 1, 2, 1]  # four values on three GPUs: two share GPU 1 but keep their own residuals
    kv_gpu, kv_cpu = kvframe.create("device"), kvframe.create("device")
    if comp:
        kv_gpu.set_gradient_compression(comp)
        kv_cpu.set_gradient_compression(comp)
    rng = np.random.default_rng(3)
    w = rng.standard_normal(n).astype(np.float32)
    kv_gpu.init(7, on(cp, 2, w))
    kv_cpu.init(7, w)
    for _ in range(3):
        grads = [(rng.standard_normal(n) * 0.5).astype(np.float32) for _ in slots]
        kv_gpu.push(7, [on(cp, d, g) for d, g in zip(slots, grads)])
        kv_cpu.push(7, grads)
        outs = [on(cp, d, np.zeros(n)) for d in (0, 1, 2)]
        kv_gpu.pull(7, out=outs)
        want = np.empty(n, np.float32)
        kv_cpu.pull(7, out=want)
        for d, o in enumerate(outs):
            assert isinstance(o, cp.ndarray) and o.device.id == d
            np.testing.assert_array_equal(o.get(), want)
        host = np.empty(n, np.float32)
        kv_gpu.pull(7, out=host)  # a host output works too
        np.testing.assert_array_equal(host, want)
    store = kv_gpu.backend
    merge = store.merge_device(7)
    assert merge[0] == "gpu" and store._values[7].device.id == merge[1]
    if comp:
        for slot, d in enumerate(slots):
            res = store.residual(7, slot)
            assert isinstance(res, cp.ndarray) and res.device.id == d
            np.testing.assert_array_equal(res.get(), kv_cpu.backend.residual(7, slot))
    assert cp.stats["peer_copies"] > 0
    if comp and comp["type"] in ("2bit", "1bit"):
        assert cp.stats["kernel_launches"] >= 2 * len(slots)


def test_hand_checked_sequence_on_two_gpus(cp):
    kv = kvframe.create("device")
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init(0, on(cp, 0, np.zeros(4)))
    vals = [on(cp, 0, [0.4, 0.6, -0.7, 0.1]), on(cp, 1, [0.6, 0.6, -0.2, 0.1])]
    out = on(cp, 1, np.zeros(4))
    kv.push(0, vals)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out.get(), np.float32([0.5, 1, -0.5, 0]))
    kv.pushpull(0, vals, out=out)
    np.testing.assert_array_equal(out.get(), np.float32([1, 1, -0.5, 0]))


def test_keys_spread_over_gpus_largest_first(cp):
    kv = kvframe.create("device")
    sizes = {"a": 10, "b": 50, "c": 30, "d": 20}
    kv.init(list(sizes), [on(cp, 0, np.zeros(s)) for s in sizes.values()])
    kv.push("a", [on(cp, d, np.ones(10)) for d in (0, 1, 2)])
    store = kv.backend
    assert {k: store.merge_device(k) for k in sizes} == {
        "b": ("gpu", 0), "c": ("gpu", 1), "d": ("gpu", 2), "a": ("gpu", 2)}
    for k in sizes:  # each stored value moved to its merge device
        assert store._values[k].device.id == store.merge_device(k)[1]
    out = on(cp, 0, np.zeros(10))
    kv.pull("a", out=out)
    np.testing.assert_array_equal(out.get(), 3)


def test_updater_runs_on_the_merge_device(cp):
    kv = kvframe.create("device")
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init([0, 1], [on(cp, 0, np.ones(6)), on(cp, 0, np.ones(2))])
    seen = []

    def updater(key, grad, weight):
        current = cp.cuda.Device().id
        seen.append((key, grad.device.id, weight.device.id, current))
        weight -= 0.5 * grad

    kv.set_updater(updater)
    kv.push([0, 1], [[on(cp, 1, np.full(6, 0.7)), on(cp, 2, np.full(6, 0.7))],
                     [on(cp, 1, np.full(2, -0.6)), on(cp, 2, np.full(2, 0.1))]])
    merge = {k: kv.backend.merge_device(k)[1] for k in (0, 1)}
    assert sorted(seen) == [(0, merge[0], merge[0], merge[0]), (1, merge[1], merge[1], merge[1])]
    outs = [np.empty(6, np.float32), np.empty(2, np.float32)]
    kv.pull([0, 1], out=outs)
    np.testing.assert_array_equal(outs[0], 1 - 0.5 * np.float32(1.0))  # each device sends +0.5
    np.testing.assert_array_equal(outs[1], 1 - 0.5 * np.float32(-0.5))  # -0.5 from one, 0 from the other


def test_host_and_gpu_values_mixed(cp):
    kv = kvframe.create("device")
    kv.init(0, np.zeros(5, np.float32))
    kv.push(0, [np.ones(5, np.float32), on(cp, 1, np.full(5, 2.0))])
    out = np.empty(5, np.float32)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, 3)


def test_updater_and_row_sparse_without_compression(cp):
    kv = kvframe.create("device")
    kv.init(0, on(cp, 0, np.ones((4, 2))))
    kv.push(0, [on(cp, 2, np.zeros((4, 2)))])  # places key 0 on GPU 2
    assert kv.backend.merge_device(0) == ("gpu", 2)
    with cp.cuda.Device(1):
        sparse = kvframe.RowSparseArray(cp.asarray(np.float32([[1, 2]])), cp.asarray(np.int64([3])), (4, 2))
    kv.push(0, [sparse, on(cp, 0, np.full((4, 2), 0.5))])
    out = np.empty((4, 2), np.float32)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, np.float32([[0.5, 0.5]] * 3 + [[1.5, 2.5]]))
    kv.set_updater(lambda key, grad, weight: weight.__isub__(grad))
    kv.push(0, [on(cp, 0, np.ones((4, 2))), on(cp, 1, np.ones((4, 2)))])
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, np.float32([[-1.5, -1.5]] * 3 + [[-0.5, 0.5]]))


def test_gpu_row_sparse_into_a_host_key(cp):
    kv = kvframe.create("device")
    kv.init(0, np.zeros((3, 2), np.float32))
    with cp.cuda.Device(1):
        sparse = kvframe.RowSparseArray(cp.asarray(np.float32([[1, 2]])), cp.asarray(np.int64([1])), (3, 2))
    kv.push(0, [sparse, np.ones((3, 2), np.float32)])  # slot 0 is a GPU, slot 1 the host: merged on GPU 1
    out = np.empty((3, 2), np.float32)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, np.float32([[1, 1], [2, 3], [1, 1]]))
    kv.init(1, np.zeros((3, 2), np.float32))
    kv.push(1, [np.ones((3, 2), np.float32), sparse])  # slot 0 is the host now: reduced on the CPU
    assert kv.backend.merge_device(1) == ("cpu", 0)
    kv.pull(1, out=out)
    np.testing.assert_array_equal(out, np.float32([[1, 1], [2, 3], [1, 1]]))
