"""Store 'local': MXNet's KVStore semantics, checked against plain-Python references."""

import numpy as np
import pytest

import kvframe
from kvframe import RowSparseArray
from kvframe.errors import (
    DTypeMismatchError,
    DuplicateInitError,
    KeyNotInitializedError,
    MixedKeyTypesError,
    NotSupportedError,
    ShapeMismatchError,
)

SHAPE = (4, 3)


@pytest.fixture
def kv():
    store = kvframe.create("local")
    yield store
    store.close()


def pulled(kv, key, shape=SHAPE, dtype=np.float32):
    out = np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 99, dtype)
    kv.pull(key, out=out)
    return out


def test_identity(kv):
    assert (kv.type, kv.rank, kv.num_workers) == ("local", 0, 1)
    assert kv.is_capable("optimizer") and kv.is_capable(kvframe.KVStore.OPTIMIZER)
    with pytest.raises(ValueError, match="unknown capability 'teleport'"):
        kv.is_capable("teleport")
    # MXNet ignores commands to servers on a store without servers; so do we
    assert kv._send_command_to_servers(0, "ignored") is None
    kv.barrier()


def test_push_assigns_the_sum_of_device_values(kv):
    rng = np.random.default_rng(0)
    kv.init(3, np.zeros(SHAPE, np.float32))
    vals = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(4)]
    kv.push(3, vals)
    expect = vals[0].astype(np.float64) + vals[1] + vals[2] + vals[3]
    np.testing.assert_allclose(pulled(kv, 3), expect, rtol=1e-6)
    # no updater: the store is assigned, not accumulated
    kv.push(3, vals[:2])
    np.testing.assert_allclose(pulled(kv, 3), vals[0].astype(np.float64) + vals[1], rtol=1e-6)


def test_repeated_key_in_one_push_is_summed(kv):
    kv.init([5, 7], [np.zeros(SHAPE, np.float32)] * 2)
    kv.push([5, 7, 5], [np.ones(SHAPE, np.float32), np.full(SHAPE, 2, np.float32), [np.full(SHAPE, 3, np.float32)] * 2])
    np.testing.assert_array_equal(pulled(kv, 5), np.full(SHAPE, 7))
    np.testing.assert_array_equal(pulled(kv, 7), np.full(SHAPE, 2))


def test_list_of_keys_with_lists_of_devices(kv):
    keys = [10, 11, 12]
    kv.init(keys, [np.zeros(SHAPE)] * 3)
    kv.push(keys, [[np.full(SHAPE, k + d, np.float64) for d in range(3)] for k in keys])
    outs = [[np.zeros(SHAPE), np.zeros(SHAPE)] for _ in keys]
    kv.pull(keys, out=outs)
    for k, os_ in zip(keys, outs):
        for o in os_:
            np.testing.assert_array_equal(o, np.full(SHAPE, sum(k + d for d in range(3))))


def test_updater_gets_key_merged_and_stored(kv):
    calls = []

    def updater(key, grad, weight):
        calls.append((key, grad.copy(), weight.copy()))
        weight -= 0.5 * grad

    kv.init("w", np.ones(SHAPE, np.float64))
    kv.set_updater(updater)
    kv.push("w", [np.full(SHAPE, 1.0), np.full(SHAPE, 3.0)])
    kv.push("w", np.full(SHAPE, 2.0))
    assert [c[0] for c in calls] == ["w", "w"]
    np.testing.assert_array_equal(calls[0][1], np.full(SHAPE, 4.0))
    np.testing.assert_array_equal(calls[0][2], np.ones(SHAPE))
    np.testing.assert_array_equal(pulled(kv, "w", dtype=np.float64), np.full(SHAPE, 1 - 0.5 * 4 - 0.5 * 2))
    kv._set_updater(lambda k, g, w: w.__iadd__(g))  # MXNet's private name works too
    kv.push("w", np.ones(SHAPE))
    np.testing.assert_array_equal(pulled(kv, "w", dtype=np.float64), np.full(SHAPE, -1.0))


def test_push_consumes_inputs_and_does_not_alias_them(kv):
    kv.init(0, np.zeros(SHAPE, np.float32))
    a = np.full(SHAPE, 2, np.float32)
    kv.push(0, a)
    a[...] = 100  # the caller may reuse its buffer at once
    np.testing.assert_array_equal(pulled(kv, 0), np.full(SHAPE, 2))
    init_val = np.ones(SHAPE, np.float32)
    kv.init(1, init_val)
    init_val[...] = 9
    np.testing.assert_array_equal(pulled(kv, 1), np.ones(SHAPE))


def test_list_pushpull_reduces_every_key_before_writing_outputs(kv):
    # MXNet's test_kvstore_custom passes the same list object for every key: done one key at a time
    # this would give 4, 16, 64 instead of 4 for every key.
    keys = [1, 2, 3]
    kv.init(keys, [np.zeros(SHAPE, np.float32)] * 3)
    shared = [np.ones(SHAPE, np.float32) for _ in range(4)]
    kv.pushpull(keys, [shared] * 3)
    for arr in shared:
        np.testing.assert_array_equal(arr, np.full(SHAPE, 4))
    outs = [np.zeros(SHAPE, np.float32) for _ in keys]
    kv.pushpull(keys, [shared] * 3, out=outs)
    for o in outs:
        np.testing.assert_array_equal(o, np.full(SHAPE, 16))


def test_pull_without_waiting_returns_a_handle(kv):
    kv.init("a", np.arange(12, dtype=np.float32).reshape(SHAPE))
    out = np.zeros(SHAPE, np.float32)
    handle = kv.pull("a", out=out, wait=False)
    handle.wait(timeout=5)
    assert handle.done()
    np.testing.assert_array_equal(out, np.arange(12).reshape(SHAPE))


def test_broadcast_initialises_and_fills_outputs(kv):
    value = np.arange(12, dtype=np.float64).reshape(SHAPE)
    outs = [np.zeros(SHAPE), np.zeros(SHAPE)]
    kv.broadcast("b", value, out=outs)
    for o in outs:
        np.testing.assert_array_equal(o, value)
    with pytest.raises(DuplicateInitError, match="duplicate init of key 'b'"):
        kv.broadcast("b", value, out=outs)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8])
def test_dtypes_sum_exactly(kv, dtype):
    kv.init(0, np.zeros(SHAPE, dtype))
    vals = [np.full(SHAPE, i + 1, dtype) for i in range(5)]
    kv.push(0, vals)
    out = pulled(kv, 0, dtype=dtype)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, np.full(SHAPE, 15))


def test_big_array_threaded_reduce_matches_float64_reference():
    kv = kvframe.create("local", bigarray_bound=1000, reduce_threads=3)
    n = 200_003  # not a multiple of the block or thread count
    rng = np.random.default_rng(1)
    vals = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    kv.init(0, np.zeros(n, np.float32))
    kv.push(0, vals)
    out = np.zeros(n, np.float32)
    kv.pull(0, out=out)
    ref = sum(v.astype(np.float64) for v in vals)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    kv.push(0, vals[2])
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, vals[2])
    kv.close()


def test_non_contiguous_values_and_outputs(kv):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    kv.init(0, np.zeros((4, 3), np.float32))
    kv.push(0, [base[:, ::2], base[:, 1::2]])
    out = np.zeros((4, 6), np.float32)
    kv.pull(0, out=out[:, ::2])
    np.testing.assert_array_equal(out[:, ::2], base[:, ::2] + base[:, 1::2])
    np.testing.assert_array_equal(out[:, 1::2], 0)


class DLPackOnly:
    """Something that speaks DLPack and nothing else (what a torch or JAX tensor offers)."""

    def __init__(self, arr):
        self._arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_dlpack_values_in_and_outputs_written_in_place(kv):
    kv.init(0, DLPackOnly(np.zeros(SHAPE, np.float32)))
    kv.push(0, [DLPackOnly(np.ones(SHAPE, np.float32)), DLPackOnly(np.full(SHAPE, 2, np.float32))])
    target = np.zeros(SHAPE, np.float32)
    kv.pull(0, out=DLPackOnly(target))
    np.testing.assert_array_equal(target, np.full(SHAPE, 3))


def test_torch_tensors_through_dlpack(kv):
    torch = pytest.importorskip("torch")
    kv.init("t", torch.zeros(5))
    kv.push("t", [torch.ones(5), torch.full((5,), 4.0)])
    out = torch.zeros(5)
    kv.pull("t", out=out)
    assert out.tolist() == [5.0] * 5
    with pytest.raises(TypeError, match=r"key 'b': value: cannot view .*bfloat16 through DLPack"):
        kv.init("b", torch.zeros(5, dtype=torch.bfloat16))


# --- row-sparse ------------------------------------------------------------------------------

def test_row_sparse_array_conversions():
    dense = np.zeros((5, 2), np.float32)
    dense[1] = [1, 2]
    dense[3] = [3, 4]
    rs = RowSparseArray.from_dense(dense)
    assert rs.indices.tolist() == [1, 3] and rs.data.tolist() == [[1, 2], [3, 4]]
    np.testing.assert_array_equal(rs.todense(), dense)
    summed = RowSparseArray.from_rows(np.ones((3, 2), np.float32), [4, 0, 4], (5, 2))
    assert summed.indices.tolist() == [0, 4] and summed.data.tolist() == [[1, 1], [2, 2]]
    with pytest.raises(ValueError, match="sorted and unique"):
        RowSparseArray(np.ones((2, 2)), [3, 1], (5, 2))
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        RowSparseArray(np.ones((1, 2)), [5], (5, 2))
    with pytest.raises(ValueError, match="does not fit"):
        RowSparseArray(np.ones((3, 2)), [0, 1], (5, 2))


def test_row_sparse_pull_sorts_and_dedups_ids_and_shares_them(kv):
    weight = np.arange(12, dtype=np.float32).reshape(6, 2)
    kv.init("emb", weight)
    out = RowSparseArray.zeros((6, 2))
    kv.row_sparse_pull("emb", out=out, row_ids=np.array([3, 1, 3, 1]))
    assert out.indices.tolist() == [1, 3]
    np.testing.assert_array_equal(out.data, weight[[1, 3]])
    outs = [RowSparseArray.zeros((6, 2)) for _ in range(3)]
    kv.row_sparse_pull("emb", out=outs, row_ids=np.array([5, 0], dtype=np.int32))
    for o in outs:
        assert o.indices.tolist() == [0, 5]
        np.testing.assert_array_equal(o.todense()[[0, 5]], weight[[0, 5]])
    outs[0].data[...] = -1  # outputs do not share memory
    assert outs[1].data[0, 0] == 0
    empty = RowSparseArray.zeros((6, 2))
    kv.row_sparse_pull("emb", out=empty, row_ids=np.array([], dtype=np.int64))
    assert empty.indices.size == 0 and empty.data.shape == (0, 2)


def test_sparse_push_sums_the_union_of_rows(kv):
    kv.init("emb", RowSparseArray.zeros((6, 2), np.float32))
    a = RowSparseArray(np.ones((2, 2), np.float32), [0, 2], (6, 2))
    b = RowSparseArray(np.full((2, 2), 3, np.float32), [2, 5], (6, 2))
    kv.push("emb", [a, b])
    ref = np.zeros((6, 2))
    for r, v in [(0, 1), (2, 1), (2, 3), (5, 3)]:
        ref[r] += v
    np.testing.assert_array_equal(pulled(kv, "emb", (6, 2)), ref)
    # no updater: the store becomes the aggregate of this push (rows not pushed become 0)
    kv.push("emb", RowSparseArray(np.full((1, 2), 7, np.float32), [1], (6, 2)))
    ref = np.zeros((6, 2))
    ref[1] = 7
    np.testing.assert_array_equal(pulled(kv, "emb", (6, 2)), ref)


def test_dense_weight_with_sparse_gradient_reaches_the_updater(kv):
    seen = []
    kv.init("w", np.ones((4, 2), np.float32))
    kv.set_updater(lambda k, g, w: (seen.append(type(g).__name__), w.__setitem__(g.indices, w[g.indices] - g.data)))
    kv.push("w", [RowSparseArray(np.ones((1, 2), np.float32), [1], (4, 2))] * 2)
    assert seen == ["RowSparseArray"]
    np.testing.assert_array_equal(pulled(kv, "w", (4, 2)), [[1, 1], [-1, -1], [1, 1], [1, 1]])


def test_pull_into_sparse_outputs_is_skipped_unless_asked(kv):
    kv.init("e", np.arange(6, dtype=np.float32).reshape(3, 2))
    out = RowSparseArray.zeros((3, 2))
    with pytest.warns(UserWarning, match="skips RowSparseArray outputs"):
        kv.pull("e", out=out)
    assert out.indices.size == 0
    kv.pull("e", out=out, ignore_sparse=False)
    np.testing.assert_array_equal(out.todense(), np.arange(6).reshape(3, 2))


# --- bad input: a clear error, and the store as it was ---------------------------------------

def snapshot(kv):
    return {k: pulled(kv, k).copy() for k in kv.keys()}


def assert_unchanged(kv, before):
    after = snapshot(kv)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


@pytest.fixture
def filled(kv):
    kv.init([0, 1], [np.ones(SHAPE, np.float32), np.full(SHAPE, 2, np.float32)])
    return kv


@pytest.mark.parametrize("call, error, message", [
    (lambda kv: kv.push([0, 1], [np.ones(SHAPE, np.float32), np.ones((3, 4), np.float32)]),
     ShapeMismatchError, r"key 1: pushed value has shape \(3, 4\), but the key was initialised with shape \(4, 3\)"),
    (lambda kv: kv.push(0, [np.ones(SHAPE, np.float32), np.ones(SHAPE, np.float64)]),
     DTypeMismatchError, r"key 0: pushed value 1 has dtype float64, but the key was initialised with dtype float32"),
    (lambda kv: kv.push([0, 1], [np.ones(SHAPE, np.float32)]), ValueError, r"2 keys \[0, 1\] need 2 values"),
    (lambda kv: kv.push([0, "a"], [np.ones(SHAPE, np.float32)] * 2), MixedKeyTypesError, "mixed key types"),
    (lambda kv: kv.init("x", np.ones(SHAPE, np.float32)), MixedKeyTypesError, "this store uses int keys"),
    (lambda kv: kv.push([], []), ValueError, "key list is empty"),
    (lambda kv: kv.push(0, []), ValueError, "key 0: the list of values is empty"),
    (lambda kv: kv.push(0, [[1.0, 2.0]]), TypeError, "key 0: value must be an array"),
    (lambda kv: kv.push(0, "text"), TypeError, "key 0: value must be an array"),
    (lambda kv: kv.push(2.5, np.ones(SHAPE)), TypeError, "a key must be an int or a str; got 2.5"),
    (lambda kv: kv.push(True, np.ones(SHAPE)), TypeError, "a key must be an int or a str"),
    (lambda kv: kv.push([0, 9], [np.ones(SHAPE, np.float32)] * 2), KeyNotInitializedError,
     r"key 9 has not been initialised"),
    (lambda kv: kv.pull(9, out=np.ones(SHAPE, np.float32)), KeyNotInitializedError, "key 9 has not been initialised"),
    (lambda kv: kv.pull(0, out=np.ones((2, 2), np.float32)), ShapeMismatchError, r"key 0: out has shape \(2, 2\)"),
    (lambda kv: kv.pull(0), ValueError, "out is required"),
    (lambda kv: kv.init([2, 0], [np.ones(SHAPE, np.float32)] * 2), DuplicateInitError, "duplicate init of key 0"),
    (lambda kv: kv.init([3, 3], [np.ones(SHAPE, np.float32)] * 2), DuplicateInitError, "duplicate init of key 3"),
    (lambda kv: kv.pushpull([0, 1], [np.ones(SHAPE, np.float32)] * 2, out=[np.ones(SHAPE, np.float32),
                                                                           np.ones(SHAPE, np.int32)]),
     DTypeMismatchError, "key 1: out has dtype int32"),
    (lambda kv: kv.row_sparse_pull(0, out=np.zeros(SHAPE, np.float32), row_ids=np.array([1])), TypeError,
     "row_sparse_pull writes into kvframe.RowSparseArray outputs"),
    (lambda kv: kv.row_sparse_pull(0, out=RowSparseArray.zeros(SHAPE), row_ids=np.array([7])), IndexError,
     r"row_ids must lie in \[0, 4\)"),
    (lambda kv: kv.set_updater("sgd"), TypeError, "an updater must be callable"),
    (lambda kv: kv.save_optimizer_states("/tmp/never-written"), NotSupportedError, "call set_optimizer first"),
])
def test_bad_input_raises_clearly_and_changes_nothing(filled, call, error, message):
    before = snapshot(filled)
    with pytest.raises(error, match=message):
        call(filled)
    assert_unchanged(filled, before)
    assert filled.keys() == [0, 1]


def test_uninitialised_key_error_is_a_key_error(kv):
    with pytest.raises(KeyError):
        kv.pull("nope", out=np.zeros(1))
