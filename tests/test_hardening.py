"""Adversarial tests of the in-process API (issue #11): every refusal names the key and leaves the
store as it was; multi-key pushes are all or nothing; dtypes a store cannot sum are refused at
init; row-sparse edge shapes; fp16/bf16 keep inf."""

from __future__ import annotations

import re

import numpy as np
import pytest

import kvframe
from kvframe import RowSparseArray
from kvframe.errors import DTypeMismatchError, ShapeMismatchError

STORES = ["local", "device"]


@pytest.fixture(params=STORES)
def store_type(request):
    return request.param


def make(store_type: str, **options):
    kv = kvframe.create(store_type, **options)
    return kv


def pulled(kv, key, shape=(4,), dtype=np.float32):
    out = np.zeros(shape, dtype)
    out[...] = 123  # not what any test expects: the pull must overwrite it
    kv.pull(key, out=out)
    return out


def snapshot(kv) -> dict:
    """Every key's value (pulled) and the updater's per-key states, to compare after a refusal."""
    meta = {k: kv._meta[k] for k in kv.keys()}
    values = {k: pulled(kv, k, m.shape, m.dtype).copy() for k, m in meta.items()}
    upd = getattr(kv.backend, "_updater", None)
    inner = getattr(upd, "updater", upd)
    states = {}
    for k, ks in getattr(inner, "states", {}).items():
        states[k] = (ks.count, {n: np.array(a, copy=True) for n, a in ks.arrays.items()}, dict(ks.scalars))
    return {"keys": list(kv.keys()), "values": values, "states": states,
            "num_update": getattr(getattr(inner, "optimizer", None), "num_update", None)}


def assert_same(a: dict, b: dict) -> None:
    assert a["keys"] == b["keys"]
    assert a["num_update"] == b["num_update"]
    for k in a["values"]:
        np.testing.assert_array_equal(a["values"][k], b["values"][k])
    assert a["states"].keys() == b["states"].keys()
    for k, (count, arrays, scalars) in a["states"].items():
        count2, arrays2, scalars2 = b["states"][k]
        assert count == count2 and scalars == scalars2 and arrays.keys() == arrays2.keys()
        for n in arrays:
            np.testing.assert_array_equal(arrays[n], arrays2[n])


f32 = np.float32


# multi-key push is all or nothing ----------------------------------------------------------------

@pytest.mark.parametrize("order", ["refused_last", "refused_first"])
@pytest.mark.parametrize("op", ["push", "pushpull"])
def test_optimizer_refusing_one_key_changes_no_key(store_type, order, op):
    kv = make(store_type)
    kv.init(["a", "b", "c"], [np.ones(4, f32), np.ones(4, np.int32), np.full(4, 2, f32)])
    kv.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    kv.push("a", np.ones(4, f32))  # states exist for 'a' (momentum), none for 'c'
    before = snapshot(kv)
    keys = ["a", "c", "b"] if order == "refused_last" else ["b", "a", "c"]
    vals = {"a": np.ones(4, f32), "b": np.ones(4, np.int32), "c": np.ones(4, f32)}
    outs = [np.full(4, 7, vals[k].dtype) for k in keys]
    with pytest.raises(DTypeMismatchError, match=r"key 'b': optimizer 'sgd' updates floating-point weights; "
                                                 r"this key holds dtype int32"):
        if op == "push":
            kv.push(keys, [vals[k] for k in keys])
        else:
            kv.pushpull(keys, [vals[k] for k in keys], out=outs)
    assert_same(before, snapshot(kv))
    for o in outs:
        assert (o == 7).all()  # no output written either
    # the store still works, and 'a' continues from where it was
    ref = make(store_type)
    ref.init(["a", "c"], [np.ones(4, f32), np.full(4, 2, f32)])
    ref.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    ref.push("a", np.ones(4, f32))
    for s in (kv, ref):
        s.push(["a", "c"], [np.ones(4, f32), np.ones(4, f32)])
    for k in ("a", "c"):
        np.testing.assert_array_equal(pulled(kv, k), pulled(ref, k))


def test_optimizer_refusing_a_shape_changes_no_key(store_type):
    kv = make(store_type)
    kv.init(["m", "v"], [np.ones((2, 3), f32), np.ones(3, f32)])
    kv.set_optimizer("groupadagrad", learning_rate=0.1)
    before = snapshot(kv)
    with pytest.raises(ShapeMismatchError, match=r"key 'v': groupadagrad needs weights with at least 2 dim"):
        kv.push(["m", "v"], [np.ones((2, 3), f32), np.ones(3, f32)])
    assert_same(before, snapshot(kv))


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_optimizer_refuses_complex_weights_naming_the_key(store_type, dtype):
    kv = make(store_type)
    kv.init(["w", "z"], [np.ones(4, f32), np.ones(4, dtype)])
    kv.set_optimizer("lamb", learning_rate=0.1)
    before = snapshot(kv)
    with pytest.raises(DTypeMismatchError, match=rf"key 'z': optimizer 'lamb' updates floating-point weights; "
                                                 rf"this key holds dtype {np.dtype(dtype)}"):
        kv.push(["w", "z"], [np.ones(4, f32), np.ones(4, dtype)])
    assert_same(before, snapshot(kv))


def test_a_user_updater_raising_on_one_key_changes_no_key(store_type):
    calls = []

    def updater(key, grad, weight):
        calls.append(key)
        weight += grad  # changes this key's value first...
        if key == "bad":
            raise RuntimeError("updater says no")  # ...then refuses

    kv = make(store_type)
    kv.init(["a", "bad", "c"], [np.ones(4, f32), np.full(4, 5, f32), np.full(4, 2, f32)])
    kv.set_updater(updater)
    before = snapshot(kv)
    with pytest.raises(RuntimeError, match="updater says no"):
        kv.push(["a", "c", "bad"], [[np.ones(4, f32)] * 2, np.ones(4, f32), np.ones(4, f32)])
    assert calls == ["a", "c", "bad"]
    assert_same(before, snapshot(kv))
    kv.push(["a", "c"], [[np.ones(4, f32)] * 2, np.ones(4, f32)])  # the good keys still update
    np.testing.assert_array_equal(pulled(kv, "a"), np.full(4, 3, f32))
    np.testing.assert_array_equal(pulled(kv, "c"), np.full(4, 3, f32))


def test_compressed_multi_key_push_with_a_refusing_updater_keeps_the_residuals():
    refuse = []

    def updater(key, grad, weight):
        if key == "bad" and refuse:
            raise ValueError("too big")
        weight -= 0.5 * grad

    def build():
        kv = make("device")
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
        kv.init(["a", "bad"], [np.zeros(6, f32), np.zeros(6, f32)])
        kv.set_updater(updater)
        return kv

    kv, ref = build(), build()
    g = np.float32([0.7, -0.2, 0.3, 1.6, -0.9, 0.1])
    for s in (kv, ref):
        s.push(["a", "bad"], [[g, g], [g, g]])
    res_before = [np.array(kv.backend.residual("a", i), copy=True) for i in range(2)]
    refuse.append(True)
    with pytest.raises(ValueError, match="too big"):
        kv.push(["a", "bad"], [[g, g], [g, g]])  # 'a' was encoded (its residuals changed) before 'bad' refused
    refuse.clear()
    for i in range(2):
        np.testing.assert_array_equal(kv.backend.residual("a", i), res_before[i])
    for s in (kv, ref):
        s.push(["a", "bad"], [[g, g], [g, g]])
    for k in ("a", "bad"):
        np.testing.assert_array_equal(pulled(kv, k, (6,)), pulled(ref, k, (6,)))


def test_sum_only_keys_are_not_checked_by_the_optimizer(store_type):
    kv = make(store_type)
    steps = kvframe.sum_key("steps")
    kv.init([steps, "w"], [np.zeros(4, np.int64), np.ones(4, f32)])
    kv.set_optimizer("sgd", learning_rate=0.5)
    kv.push([steps, "w"], [[np.ones(4, np.int64)] * 3, np.ones(4, f32)])
    np.testing.assert_array_equal(pulled(kv, steps, dtype=np.int64), np.full(4, 3))
    np.testing.assert_array_equal(pulled(kv, "w"), np.full(4, 0.5, f32))


def test_a_repeated_key_in_one_push_is_still_summed_with_an_optimizer(store_type):
    kv = make(store_type)
    kv.init(["w", "v"], [np.ones(4, f32), np.ones(4, f32)])
    kv.set_optimizer("sgd", learning_rate=0.1)
    kv.push(["w", "v", "w"], [np.ones(4, f32), np.ones(4, f32), np.ones(4, f32)])
    np.testing.assert_allclose(pulled(kv, "w"), np.full(4, 0.8, f32), rtol=1e-6)
    np.testing.assert_allclose(pulled(kv, "v"), np.full(4, 0.9, f32), rtol=1e-6)


# dtypes a store cannot sum -------------------------------------------------------------------------

UNSUMMABLE = {
    "object": lambda: np.array([1, "x", None, 2.5], dtype=object),
    "str": lambda: np.array(["a", "b", "c", "d"]),
    "bytes": lambda: np.array([b"a", b"b", b"c", b"d"]),
    "datetime64": lambda: np.array(["2024-01-01"] * 4, dtype="datetime64[s]"),
    "timedelta64": lambda: np.arange(4).astype("timedelta64[s]"),
    "void": lambda: np.zeros(4, dtype="V8"),
    "structured": lambda: np.zeros(4, dtype=[("x", "f4"), ("y", "i4")]),
}


@pytest.mark.parametrize("name", sorted(UNSUMMABLE))
def test_init_refuses_a_dtype_the_store_cannot_sum(store_type, name):
    kv = make(store_type)
    kv.init("ok", np.ones(4, f32))
    bad = UNSUMMABLE[name]()
    with pytest.raises(DTypeMismatchError) as info:
        kv.init(["fresh", "k"], [np.ones(4, f32), bad])
    msg = str(info.value)
    assert msg.startswith(f"key 'k': the value has dtype {bad.dtype}, which a store cannot sum")
    assert "accepted dtypes: bool, int8/16/32/64, uint8/16/32/64, float16/32/64" in msg
    # neither key was stored
    assert kv.keys() == ["ok"] and "fresh" not in kv.backend._values and "k" not in kv.backend._values
    out = np.zeros(4, f32)
    with pytest.raises(DTypeMismatchError, match=re.escape(f"key 'ok': pushed value has dtype {bad.dtype}")):
        kv.push("ok", bad)
    with pytest.raises(DTypeMismatchError, match=re.escape(f"key 'ok': pushed value has dtype {bad.dtype}")):
        kv.push(["ok", "ok"], [np.ones(4, f32), bad])
    with pytest.raises(DTypeMismatchError, match=r"key 'k'.*cannot sum"):
        kv.broadcast("k", bad, out=bad.copy())
    with pytest.raises(DTypeMismatchError, match=r"key 'k'.*cannot sum"):
        kv.init("k", RowSparseArray(bad[:1], [0], bad.shape))
    assert kv.keys() == ["ok"]
    kv.pull("ok", out=out)
    np.testing.assert_array_equal(out, np.ones(4, f32))
    kv.init("k", np.zeros(4, f32))  # the key is still free


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                   np.uint64, np.float16, np.float32, np.float64, np.longdouble, np.complex64,
                                   np.complex128])
def test_every_summable_dtype_is_accepted_and_summed(store_type, dtype):
    kv = make(store_type)
    kv.init("k", np.zeros(4, dtype))
    kv.push("k", [np.ones(4, dtype)] * 3)
    want = np.ones(4, dtype) + np.ones(4, dtype) + np.ones(4, dtype)
    np.testing.assert_array_equal(pulled(kv, "k", dtype=dtype), want)


# row-sparse edge shapes -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 3), (0,), (3, 0), (2, 0, 4), (0, 2, 3), (5,), (3, 2), (1, 1)])
def test_row_sparse_from_dense_edge_shapes(shape):
    dense = np.zeros(shape, f32)
    if dense.size:
        dense.reshape(dense.shape[0], -1)[-1, 0] = 7
    rs = RowSparseArray.from_dense(dense)
    assert rs.shape == shape and rs.dtype == f32
    kept = [shape[0] - 1] if dense.size else []
    assert rs.indices.tolist() == kept and rs.data.shape == (len(kept),) + shape[1:]
    back = rs.todense()
    assert back.shape == shape
    np.testing.assert_array_equal(back, dense)


def test_row_sparse_from_dense_refuses_a_scalar():
    with pytest.raises(ValueError, match="at least one dimension"):
        RowSparseArray.from_dense(np.zeros((), f32))


def test_empty_keys_work_end_to_end(store_type):
    kv = make(store_type)
    kv.init(["e", "f"], [np.zeros((0, 3), f32), np.zeros((4, 0), f32)])
    kv.push(["e", "f"], [[RowSparseArray.from_dense(np.zeros((0, 3), f32))] * 2,
                         RowSparseArray.from_dense(np.zeros((4, 0), f32))])
    out = RowSparseArray.zeros((0, 3))
    kv.row_sparse_pull("e", out=out, row_ids=np.zeros(0, np.int64))
    assert out.data.shape == (0, 3) and out.indices.shape == (0,)
    kv.set_optimizer("sgd", learning_rate=0.1)
    kv.push(["e", "f"], [np.zeros((0, 3), f32), np.zeros((4, 0), f32)])
    assert pulled(kv, "f", (4, 0)).shape == (4, 0)


# fp16 / bf16 keep inf ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fp16", "bf16"])
@pytest.mark.parametrize("error_feedback", [True, False])
def test_casting_compression_keeps_inf_through_the_store(name, error_feedback):
    kv = make("device")
    kv.set_gradient_compression({"type": name, "error_feedback": error_feedback})
    kv.init("w", np.zeros(5, f32))
    g = np.float32([np.inf, -np.inf, 1.0, -2.0, 0.5])
    kv.push("w", [g, g])  # two devices: inf + inf, not 2 * 65504
    got = pulled(kv, "w", (5,))
    np.testing.assert_array_equal(got, np.float32([np.inf, -np.inf, 2.0, -4.0, 1.0]))
    kv.push("w", [np.ones(5, f32)] * 2)  # the overflow is not kept for later steps
    np.testing.assert_array_equal(pulled(kv, "w", (5,)), np.full(5, 2, f32))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_casting_compression_keeps_inf_on_the_blocked_threaded_path(name):
    kv = make("device", block=1024, bigarray_bound=1, reduce_threads=2)
    kv.set_gradient_compression({"type": name})
    n = 300_000
    kv.init("w", np.zeros(n, f32))
    g = np.full(n, 0.5, f32)
    where = [0, 1023, 1024, 150_001, n - 1]
    g[where] = [np.inf, -np.inf, np.inf, -np.inf, np.inf]
    kv.push("w", [g, g, g])
    got = pulled(kv, "w", (n,))
    np.testing.assert_array_equal(got[where], np.float32([np.inf, -np.inf, np.inf, -np.inf, np.inf]))
    mask = np.ones(n, bool)
    mask[where] = False
    assert (got[mask] == 1.5).all()


def test_fp16_encode_keeps_inf_and_saturates_only_finite_values():
    from kvframe import plugins
    from kvframe.plugins import validate_plugin_config

    for ef in (True, False):
        comp = plugins.create("compressors", validate_plugin_config("compressors", {"type": "fp16",
                                                                                   "error_feedback": ef}, "c"))
        for dtype in (np.float32, np.float64):
            g = np.array([np.inf, -np.inf, 1e5, -1e5, 3.0], dtype)
            res = np.zeros_like(g)
            p = comp.encode(g, res)
            np.testing.assert_array_equal(p, np.float16([np.inf, -np.inf, 65504, -65504, 3.0]))
            want = [0, 0, 1e5 - 65504, -1e5 + 65504, 0] if ef else [0, 0, 0, 0, 0]
            np.testing.assert_array_equal(res, np.array(want, dtype))


# the same on (simulated) GPUs ---------------------------------------------------------------------

@pytest.fixture
def fake_gpus(monkeypatch):
    import shutil
    import sys
    from pathlib import Path

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler for the simulated kernels")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "compressors"))
    try:
        import fake_cupy
    finally:
        sys.path.pop(0)
    fake_cupy.install(monkeypatch)
    return fake_cupy


def on_gpu(cp, dev, a, dtype=f32):
    with cp.cuda.Device(dev):
        return cp.asarray(np.asarray(a, dtype))


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # inf - inf, as cupy does silently
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_casting_compression_keeps_inf_on_gpus(fake_gpus, name):
    cp = fake_gpus
    kv = make("device")
    kv.set_gradient_compression({"type": name})
    kv.init("w", on_gpu(cp, 1, np.zeros(5)))
    g = [np.inf, -np.inf, 1.0, -2.0, 0.5]
    kv.push("w", [on_gpu(cp, 0, g), on_gpu(cp, 1, g)])
    np.testing.assert_array_equal(pulled(kv, "w", (5,)), np.float32([np.inf, -np.inf, 2.0, -4.0, 1.0]))
    kv.push("w", [on_gpu(cp, 0, np.ones(5)), on_gpu(cp, 1, np.ones(5))])
    np.testing.assert_array_equal(pulled(kv, "w", (5,)), np.full(5, 2, f32))


def test_multi_key_push_on_gpus_is_all_or_nothing(fake_gpus):
    cp = fake_gpus

    def updater(key, grad, weight):
        weight += grad
        if key == "bad":
            raise RuntimeError("updater says no")

    kv = make("device")
    kv.init(["a", "bad"], [on_gpu(cp, 0, np.ones(4)), on_gpu(cp, 1, np.full(4, 5))])
    kv.set_updater(updater)
    vals = [[on_gpu(cp, 0, np.ones(4)), on_gpu(cp, 1, np.ones(4))]] * 2
    kv.push(["a"], [vals[0]])  # places the keys on their merge devices
    devices = {k: kv.backend.merge_device(k) for k in ("a", "bad")}
    before = snapshot(kv)
    with pytest.raises(RuntimeError, match="updater says no"):
        kv.push(["a", "bad"], vals)
    assert_same(before, snapshot(kv))
    assert {k: kv.backend.merge_device(k) for k in ("a", "bad")} == devices
    for k in ("a", "bad"):  # the values stayed on their devices
        assert kv.backend._values[k].device.id == devices[k][1]
    kv.set_optimizer("sgd", learning_rate=0.5)
    kv.init("i", on_gpu(cp, 0, np.ones(4), np.int32))
    before = snapshot(kv)
    with pytest.raises(DTypeMismatchError, match=r"key 'i': optimizer 'sgd'"):
        kv.push(["a", "i"], [vals[0], [on_gpu(cp, 0, np.ones(4), np.int32)]])
    assert_same(before, snapshot(kv))
