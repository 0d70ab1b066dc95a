"""Store 'device' on numpy arrays: N arrays in a push stand for N CPU devices."""

import sys
from pathlib import Path

import numpy as np
import pytest

import kvframe
from kvframe.errors import DTypeMismatchError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "compressors"))
from mxnet_reference import (  # noqa: E402
    dequantize_1bit,
    dequantize_2bit,
    quantize_1bit,
    quantize_2bit,
)


@pytest.fixture
def kv():
    store = kvframe.create("device")
    yield store
    store.close()


def test_hand_checked_2bit_sequence(kv):
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init(3, np.zeros(4, np.float32))
    a = np.float32([0.4, 0.6, -0.7, 0.1])
    b = np.float32([0.6, 0.6, -0.2, 0.1])
    out = np.empty(4, np.float32)
    kv.push(3, [a, b])
    kv.pull(3, out=out)
    np.testing.assert_array_equal(out, np.float32([0.5, 1, -0.5, 0]))
    kv.push(3, [a, b])
    kv.pull(3, out=out)
    np.testing.assert_array_equal(out, np.float32([1, 1, -0.5, 0]))


def test_mxnet_store_type_alias():
    kv = kvframe.create("local_allreduce_device")
    assert kv.type == "local_allreduce_device" and type(kv.backend).__name__ == "DeviceStore"


@pytest.mark.parametrize("ndev", [1, 2, 3])
@pytest.mark.parametrize("n", [5, 40, 3000])
def test_2bit_store_against_per_device_reference(ndev, n):
    kv = kvframe.create("device")
    t = 0.3
    kv.set_gradient_compression({"type": "2bit", "threshold": t})
    kv.init("w", np.zeros(n, np.float32))
    rng = np.random.default_rng(ndev * 1000 + n)
    ref_res = [[np.float32(0)] * n for _ in range(ndev)]
    out = np.empty(n, np.float32)
    for _ in range(6 if n < 1000 else 2):
        grads = [(rng.standard_normal(n) * t).astype(np.float32) for _ in range(ndev)]
        kv.push("w", grads)
        kv.pull("w", out=out)
        want = np.zeros(n, np.float32)
        for d in range(ndev):  # each device quantizes with its own residual; the merge device sums
            want = want + dequantize_2bit(quantize_2bit(list(grads[d]), ref_res[d], t), n, t)
        np.testing.assert_array_equal(out, want)
        for d in range(ndev):
            np.testing.assert_array_equal(kv.backend.residual("w", d), np.float32(ref_res[d]))


def test_2bit_fused_blocks_over_threads_match_reference():
    # small blocks and a low bound so the fused, threaded path runs on an array a test can check
    kv = kvframe.create("device", block=1024, bigarray_bound=2048, reduce_threads=2)
    n = 5 * 1024 + 3
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init(0, np.zeros((n,), np.float32))
    rng = np.random.default_rng(7)
    ref_res = [[np.float32(0)] * n for _ in range(2)]
    out = np.empty(n, np.float32)
    for _ in range(2):
        grads = [(rng.standard_normal(n) * 0.5).astype(np.float32) for _ in range(2)]
        kv.pushpull(0, grads, out=out)
        want = dequantize_2bit(quantize_2bit(list(grads[0]), ref_res[0], 0.5), n, 0.5) + \
            dequantize_2bit(quantize_2bit(list(grads[1]), ref_res[1], 0.5), n, 0.5)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.5])
def test_1bit_store(threshold):
    kv = kvframe.create("device")
    kv.set_gradient_compression({"type": "1bit", "threshold": threshold})
    n = 70
    kv.init(1, np.zeros((7, 10), np.float32))
    rng = np.random.default_rng(11)
    ref_res = [[np.float32(0)] * n for _ in range(2)]
    out = np.empty((7, 10), np.float32)
    for _ in range(4):
        grads = [rng.standard_normal((7, 10)).astype(np.float32) for _ in range(2)]
        kv.push(1, grads)
        kv.pull(1, out=out)
        want = sum(dequantize_1bit(quantize_1bit(list(g.reshape(-1)), r, threshold), n)
                   for g, r in zip(grads, ref_res))
        np.testing.assert_array_equal(out.reshape(-1), want)


def test_compression_with_updater_and_topk():
    kv = kvframe.create("device")
    kv.set_gradient_compression({"type": "topk", "ratio": 0.5})
    kv.init(0, np.ones(4, np.float32))
    seen = []

    def updater(key, grad, weight):
        seen.append(grad.copy())
        weight -= 0.1 * grad

    kv.set_updater(updater)
    kv.push(0, [np.float32([1, -3, 0.5, 0]), np.float32([0, 1, 2, -4])])
    np.testing.assert_array_equal(seen[0], np.float32([1, -3, 2, -4]))
    out = np.empty(4, np.float32)
    kv.pull(0, out=out)
    np.testing.assert_allclose(out, 1 - 0.1 * np.float32([1, -3, 2, -4]))
    np.testing.assert_array_equal(kv.backend.residual(0, 0), np.float32([0, 0, 0.5, 0]))
    np.testing.assert_array_equal(kv.backend.residual(0, 1), np.float32([0, 1, 0, 0]))


def test_non_float32_push_is_refused_naming_the_key(kv):
    kv.set_gradient_compression({"type": "2bit"})
    kv.init([0, 1], [np.zeros(4, np.float32), np.zeros(4, np.float16)])
    with pytest.raises(DTypeMismatchError, match=r"key 1: 2bit compression needs float32 gradients; got dtype float16"):
        kv.push([0, 1], [np.ones(4, np.float32), np.ones(4, np.float16)])
    out = np.empty(4, np.float32)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, 0)  # nothing was applied, not even key 0
    assert kv.backend.residual(0, 0) is None


def test_placement_largest_first_on_least_loaded():
    kv = kvframe.create("device")
    sizes = {"a": 10, "b": 50, "c": 30, "d": 20, "e": 5}
    kv.init(list(sizes), [np.zeros(s, np.float32) for s in sizes.values()])
    store = kv.backend
    assert store.merge_device("b") is None  # placed at the first push, when the devices are known
    kv.push("a", [np.ones(10, np.float32)] * 3)
    # largest first: b(50)->0, c(30)->1, d(20)->2, a(10)->2 (load 20), e(5)->2 (loads 50, 30, 30 -> first least)
    assert {k: store.merge_device(k) for k in sizes} == {
        "b": ("cpu", 0), "c": ("cpu", 1), "d": ("cpu", 2), "a": ("cpu", 2), "e": ("cpu", 1)}
    assert store.device_loads == {("cpu", 0): 50, ("cpu", 1): 35, ("cpu", 2): 30}
    # a second batch continues from those loads
    kv.init(["f", "g"], [np.zeros(7, np.float32), np.zeros(40, np.float32)])
    kv.push("g", [np.ones(40, np.float32)] * 3)
    assert store.merge_device("g") == ("cpu", 2) and store.merge_device("f") == ("cpu", 1)
    out = np.empty(10, np.float32)
    kv.pull("a", out=out)
    np.testing.assert_array_equal(out, 3)


def _exercise(kv, rng):
    """A sequence of operations; returns everything pulled."""
    shapes = {0: (3, 4), 1: (1000,), 2: (2, 2, 2), 3: (1,)}
    kv.init(list(shapes), [rng.standard_normal(s).astype(np.float32) for s in shapes.values()])
    pulled = []
    for step in range(5):
        keys = list(shapes)[: 1 + step % 4]
        vals = [[rng.standard_normal(shapes[k]).astype(np.float32) for _ in range(1 + (k + step) % 3)]
                for k in keys]
        kv.push(keys, vals)
        outs = [[np.empty(shapes[k], np.float32) for _ in range(2)] for k in keys]
        kv.pull(keys, out=outs)
        pulled.extend(o for os_ in outs for o in os_)
        pp = [np.empty(shapes[k], np.float32) for k in keys]
        kv.pushpull(keys, [v[0] for v in vals], out=pp)
        pulled.extend(pp)
        if step == 2:
            kv.set_updater(lambda key, grad, weight: weight.__isub__(0.5 * grad))
    kv.push([1, 1], [rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)])
    out = np.empty(1000, np.float32)
    kv.pull(1, out=out)
    pulled.append(out)
    return pulled


def test_device_equals_local_without_compression():
    local = _exercise(kvframe.create("local"), np.random.default_rng(42))
    device = _exercise(kvframe.create("device"), np.random.default_rng(42))
    assert len(local) == len(device)
    for a, b in zip(local, device):
        np.testing.assert_array_equal(a, b)


def test_large_sum_without_compression_over_threads():
    kv = kvframe.create("device", bigarray_bound=1 << 16)
    n = (1 << 18) + 11
    kv.init(0, np.zeros(n, np.float32))
    rng = np.random.default_rng(1)
    vals = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    out = np.empty(n, np.float32)
    kv.pushpull(0, vals, out=out)
    np.testing.assert_array_equal(out, ((vals[0] + vals[1]) + vals[2]) + vals[3])


def test_row_sparse_push_is_not_compressed(kv):
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init(0, np.zeros((4, 2), np.float32))
    g = kvframe.RowSparseArray(np.float32([[0.1, 0.2]]), [2], (4, 2))
    kv.push(0, [g])
    out = np.empty((4, 2), np.float32)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, np.float32([[0, 0], [0, 0], [0.1, 0.2], [0, 0]]))


def test_compression_with_non_contiguous_values_and_repeated_key(kv):
    kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
    kv.init(0, np.zeros((4, 4), np.float32))
    base = np.arange(32, dtype=np.float32).reshape(4, 8) / 20 - 0.8
    view = base[:, ::2]  # not contiguous
    kv.push([0, 0], [view, [view, base[:, 1::2]]])  # a key repeated in one push is summed
    out = np.empty((4, 4), np.float32)
    kv.pull(0, out=out)
    want = np.zeros(16, np.float32)
    for g in (view, view, base[:, 1::2]):
        want = want + dequantize_2bit(quantize_2bit(list(g.reshape(-1)), [np.float32(0)] * 16, 0.5), 16, 0.5)
    np.testing.assert_array_equal(out.reshape(-1), want)
    assert kv.backend.residual(0, 2) is not None  # three device slots, three residuals


def test_optimizer_runs_on_the_merge_device_like_local():
    pytest.importorskip("kvframe_optimizers")
    results = []
    for name in ("local", "device"):
        kv = kvframe.create(name)
        kv.set_optimizer("sgd", learning_rate=0.1, momentum=0.9, wd=0.01)
        rng = np.random.default_rng(8)
        kv.init(["w", "b"], [rng.standard_normal((5, 3)).astype(np.float32), np.ones(3, np.float32)])
        for _ in range(4):
            kv.push(["w", "b"], [[rng.standard_normal((5, 3)).astype(np.float32) for _ in range(3)],
                                 [rng.standard_normal(3).astype(np.float32) for _ in range(3)]])
        outs = [np.empty((5, 3), np.float32), np.empty(3, np.float32)]
        kv.pull(["w", "b"], out=outs)
        results.append(outs)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[0][1], np.ones(3, np.float32))
