"""The store conformance suite: MXNet-compatible KVStore semantics, for any store plugin.

Use it from a plugin's own tests by subclassing :class:`StoreConformance` and naming the store::

    # tests/test_conformance.py of kvframe-foo
    from kvframe.testing import StoreConformance

    class TestFooConformance(StoreConformance):
        store_name = "foo"
        store_options = {"buckets": 4}     # passed to kvframe.create("foo", **store_options)

Or leave ``store_name`` unset and choose the store on the command line, with this module loaded as
a pytest plugin (``pytest_plugins = ["kvframe.testing.conformance"]`` in the root conftest.py, or
``pytest -p kvframe.testing.conformance``)::

    pytest -p kvframe.testing.conformance --kvframe-store foo --kvframe-store-options '{"buckets": 4}'

Every test creates fresh stores through ``kvframe.create`` and closes them.  Tests of things a store
says it cannot do (``KVStore.is_capable``: 'optimizer', 'row_sparse', 'compression') are skipped
with the reason, and so are tests needing a plugin that is not installed (the 'sgd' optimizer, the
'2bit' compressor).  The suite is for single-process stores (one worker, rank 0).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest

import kvframe
from kvframe import plugins
from kvframe.errors import (
    DTypeMismatchError,
    DuplicateInitError,
    KeyNotInitializedError,
    MixedKeyTypesError,
    ShapeMismatchError,
)

SHAPE = (4, 3)


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("kvframe", "kvframe store conformance")
    group.addoption("--kvframe-store", default=None, help="store name to run StoreConformance classes against "
                    "when the class sets no store_name")
    group.addoption("--kvframe-store-options", default=None, help="JSON object of that store's options")


def _ones(value: float = 1.0, shape: tuple = SHAPE, dtype: Any = np.float32) -> np.ndarray:
    return np.full(shape, value, dtype=dtype)


def _pulled(kv: Any, key: Any, shape: tuple = SHAPE, dtype: Any = np.float32) -> np.ndarray:
    out = np.full(shape, -12345, dtype=dtype)
    kv.pull(key, out=out)
    return out


class StoreConformance:
    """MXNet KVStore semantics every single-process store must show. Subclass and set ``store_name``."""

    store_name: str | None = None
    store_options: dict[str, Any] = {}
    #: 'device'-style compression: every device quantizes its own value with its own residual
    #: (MXNet's CommDevice).  Set False for a store that quantizes the merged value once.
    compression_per_device: bool = True
    #: whether save_optimizer_states / load_optimizer_states work once an optimizer is set (MXNet's
    #: local stores do).  Set False for a store that runs optimizers but keeps no states.
    optimizer_states: bool = True

    # fixtures ----------------------------------------------------------------------------------
    @pytest.fixture
    def store_target(self, request: Any) -> tuple[str, dict[str, Any]]:
        name, options = self.store_name, dict(self.store_options)
        if name is None:
            try:
                name = request.config.getoption("kvframe_store")
                raw = request.config.getoption("kvframe_store_options")
            except ValueError:
                name = raw = None
            if name is None:
                pytest.skip("no store to test: set store_name on the StoreConformance subclass, or load "
                            "kvframe.testing.conformance as a pytest plugin and pass --kvframe-store NAME")
            options = json.loads(raw) if raw else {}
        return name, options

    @pytest.fixture
    def make_store(self, store_target: tuple[str, dict[str, Any]]) -> Any:
        name, options = store_target
        made: list = []

        def make(**extra: Any) -> Any:
            kv = kvframe.create(name, **{**options, **extra})
            made.append(kv)
            return kv

        yield make
        for kv in made:
            kv.close()

    @pytest.fixture
    def kv(self, make_store: Any) -> Any:
        return make_store()

    @staticmethod
    def require(kv: Any, capability: str) -> None:
        if not kv.is_capable(capability):
            pytest.skip(f"store {kv.type!r} is not capable of {capability!r}")

    @staticmethod
    def require_plugin(kind: str, name: str) -> None:
        if name not in plugins.names(kind):
            pytest.skip(f"{kind[:-1]} {name!r} is not installed")

    # identity ----------------------------------------------------------------------------------
    def test_identity(self, kv: Any, store_target: tuple) -> None:
        assert kv.type == store_target[0]
        assert kv.rank == 0
        assert kv.num_workers == 1
        assert isinstance(kv.is_capable("optimizer"), bool)
        with pytest.raises(ValueError, match="unknown capability"):
            kv.is_capable("teleportation")

    # init / push / pull ------------------------------------------------------------------------
    def test_init_then_pull(self, kv: Any) -> None:
        value = np.arange(12, dtype=np.float32).reshape(SHAPE)
        kv.init(3, value)
        value[...] = 0  # init keeps a copy
        np.testing.assert_array_equal(_pulled(kv, 3), np.arange(12, dtype=np.float32).reshape(SHAPE))

    def test_push_assigns_without_updater(self, kv: Any) -> None:
        kv.init(3, _ones(7.0))
        kv.push(3, _ones(2.0))
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(2.0))
        kv.push(3, _ones(5.0))  # assigned again, not accumulated
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(5.0))

    def test_per_device_list_is_summed(self, kv: Any) -> None:
        kv.init(3, _ones(0.0))
        kv.push(3, [_ones(1.0), _ones(2.0), _ones(4.0), _ones(8.0)])
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(15.0))

    def test_key_list_with_per_device_lists(self, kv: Any) -> None:
        keys = [5, 7, 9]
        kv.init(keys, [_ones(0.0)] * 3)
        kv.push(keys, [[_ones(1.0), _ones(2.0)], _ones(3.0), [_ones(i) for i in range(1, 5)]])
        outs = [np.zeros(SHAPE, np.float32) for _ in keys]
        kv.pull(keys, out=outs)
        for out, want in zip(outs, [3.0, 3.0, 10.0]):
            np.testing.assert_array_equal(out, _ones(want))

    def test_repeated_key_in_one_push_is_summed(self, kv: Any) -> None:
        kv.init(3, _ones(0.0))
        kv.push([3, 3], [_ones(2.0), [_ones(3.0), _ones(4.0)]])
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(9.0))

    def test_pull_into_several_outputs(self, kv: Any) -> None:
        kv.init(3, _ones(6.0))
        outs = [np.zeros(SHAPE, np.float32) for _ in range(3)]
        kv.pull(3, out=outs)
        for out in outs:
            np.testing.assert_array_equal(out, _ones(6.0))

    def test_push_consumes_its_inputs(self, kv: Any) -> None:
        kv.init(3, _ones(0.0))
        a, b = _ones(1.0), _ones(2.0)
        kv.push(3, [a, b])
        a[...] = 100.0  # the caller may reuse its arrays once push returns
        b[...] = 100.0
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(3.0))
        c = _ones(4.0)
        kv.push(3, c)
        c[...] = 100.0
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(4.0))

    def test_pull_sees_every_earlier_push(self, kv: Any) -> None:
        kv.init([1, 2], [_ones(0.0), _ones(0.0)])
        for i in range(1, 6):
            kv.push([1, 2], [_ones(i), [_ones(i), _ones(i)]])
            outs = [np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)]
            kv.pull([1, 2], out=outs)
            np.testing.assert_array_equal(outs[0], _ones(i))
            np.testing.assert_array_equal(outs[1], _ones(2 * i))

    @pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64])
    def test_dtypes(self, kv: Any, dtype: Any) -> None:
        kv.init(3, _ones(1, dtype=dtype))
        kv.push(3, [_ones(2, dtype=dtype), _ones(3, dtype=dtype)])
        out = _pulled(kv, 3, dtype=dtype)
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, _ones(5, dtype=dtype))

    def test_str_keys(self, kv: Any) -> None:
        kv.init(["weight", "bias"], [_ones(1.0), _ones(2.0, shape=(3,))])
        kv.push("weight", [_ones(3.0), _ones(4.0)])
        np.testing.assert_array_equal(_pulled(kv, "weight"), _ones(7.0))
        np.testing.assert_array_equal(_pulled(kv, "bias", shape=(3,)), _ones(2.0, shape=(3,)))

    def test_pull_without_waiting_returns_a_handle(self, kv: Any) -> None:
        kv.init(3, _ones(0.0))
        kv.push(3, [_ones(2.0), _ones(3.0)])
        out = np.zeros(SHAPE, np.float32)
        handle = kv.pull(3, out=out, wait=False)
        assert hasattr(handle, "wait") and hasattr(handle, "done")
        handle.wait()
        assert handle.done()
        np.testing.assert_array_equal(out, _ones(5.0))
        handle.wait()  # waiting again is harmless

    # pushpull / broadcast ----------------------------------------------------------------------
    def test_pushpull_with_out_and_in_place(self, kv: Any) -> None:
        kv.init(3, _ones(0.0))
        out = np.zeros(SHAPE, np.float32)
        kv.pushpull(3, [_ones(1.0), _ones(2.0)], out=out)
        np.testing.assert_array_equal(out, _ones(3.0))
        vals = [_ones(1.0), _ones(5.0)]
        kv.pushpull(3, vals)  # out=None: written back into the values
        for v in vals:
            np.testing.assert_array_equal(v, _ones(6.0))
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(6.0))

    def test_list_key_pushpull_finishes_every_reduction_before_writing(self, kv: Any) -> None:
        # MXNet's test_kvstore_custom passes the *same* list object for every key, in place: reducing
        # key by key would feed each key's output into the next key's input (8, 32, 128).
        keys = ["a", "b", "c"]
        kv.init(keys, [_ones(0.0)] * 3)
        vals = [_ones(2.0) for _ in range(4)]
        kv.pushpull(keys, [vals] * len(keys))
        for v in vals:
            np.testing.assert_array_equal(v, _ones(8.0))
        for k in keys:
            np.testing.assert_array_equal(_pulled(kv, k), _ones(8.0))

    def test_broadcast_initialises_and_pulls(self, kv: Any) -> None:
        outs = [np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)]
        kv.broadcast("w", _ones(4.0), out=outs)
        for o in outs:
            np.testing.assert_array_equal(o, _ones(4.0))
        np.testing.assert_array_equal(_pulled(kv, "w"), _ones(4.0))
        with pytest.raises(DuplicateInitError, match="'w'"):
            kv.broadcast("w", _ones(1.0), out=outs[0])

    # updater and optimizer ---------------------------------------------------------------------
    def test_updater_gets_key_merged_and_stored(self, kv: Any) -> None:
        self.require(kv, "optimizer")
        calls: list = []

        def updater(key: Any, merged: Any, stored: Any) -> None:
            calls.append((key, np.array(merged, copy=True)))
            stored += 2 * merged

        kv.set_updater(updater)
        kv.init(["w", "v"], [_ones(1.0), _ones(10.0)])
        kv.push(["w", "v"], [[_ones(1.0), _ones(2.0)], _ones(0.5)])
        np.testing.assert_array_equal(_pulled(kv, "w"), _ones(1.0 + 2 * 3.0))
        np.testing.assert_array_equal(_pulled(kv, "v"), _ones(11.0))
        assert sorted(k for k, _ in calls) == ["v", "w"]
        merged = dict(calls)
        np.testing.assert_array_equal(merged["w"], _ones(3.0))
        np.testing.assert_array_equal(merged["v"], _ones(0.5))

    def test_updater_with_int_keys_and_repeated_pushes(self, kv: Any) -> None:
        self.require(kv, "optimizer")
        seen: list = []

        def updater(key: Any, merged: Any, stored: Any) -> None:
            seen.append(key)
            stored += merged

        kv._set_updater(updater)  # MXNet's private name works too
        kv.init(9, _ones(0.0))
        for _ in range(3):
            kv.push(9, [_ones(1.0), _ones(1.0)])
        np.testing.assert_array_equal(_pulled(kv, 9), _ones(6.0))
        assert seen == [9, 9, 9]

    def test_sgd_optimizer_on_the_store(self, kv: Any) -> None:
        self.require(kv, "optimizer")
        self.require_plugin("optimizers", "sgd")
        kv.set_optimizer("sgd", learning_rate=0.1)
        kv.init(0, _ones(1.0))
        kv.push(0, [_ones(1.0), _ones(3.0)])
        np.testing.assert_allclose(_pulled(kv, 0), _ones(1.0 - 0.1 * 4.0), rtol=1e-6)

    def test_optimizer_states_round_trip(self, make_store: Any, tmp_path: Any) -> None:
        probe = make_store()
        self.require(probe, "optimizer")
        self.require_plugin("optimizers", "sgd")
        if not self.optimizer_states:
            pytest.skip(f"{type(self).__name__} says its store keeps no optimizer states")

        def run(kv: Any, steps: int) -> None:
            for i in range(steps):
                kv.push(0, [_ones(0.1 * (i + 1)), _ones(0.2)])

        straight = make_store()
        straight.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
        straight.init(0, _ones(1.0))
        run(straight, 4)

        first = make_store()
        first.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
        first.init(0, _ones(1.0))
        run(first, 2)
        path = tmp_path / "states.bin"
        first.save_optimizer_states(path)
        resumed = make_store()
        resumed.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
        resumed.init(0, _pulled(first, 0))
        resumed.load_optimizer_states(path)
        # the momentum came along: continuing gives the uninterrupted result
        for i in range(2, 4):
            resumed.push(0, [_ones(0.1 * (i + 1)), _ones(0.2)])
        np.testing.assert_allclose(_pulled(resumed, 0), _pulled(straight, 0), rtol=1e-6)

    # compression -------------------------------------------------------------------------------
    def test_2bit_compression(self, kv: Any) -> None:
        self.require(kv, "compression")
        self.require_plugin("compressors", "2bit")
        kv.set_gradient_compression({"type": "2bit", "threshold": 0.5})
        kv.init(0, np.zeros(4, np.float32))
        a = np.array([0.4, 0.6, -0.7, 0.1], np.float32)
        b = np.array([0.6, 0.6, -0.2, 0.1], np.float32)
        out = np.zeros(4, np.float32)
        if self.compression_per_device:  # MXNet 'device', hand-checked: [.5, 1, -.5, 0] then [1, 1, -.5, 0]
            wants = [[0.5, 1.0, -0.5, 0.0], [1.0, 1.0, -0.5, 0.0]]
        else:  # the merged value [1, 1.2, -.9, .2] quantized once, with its residual
            wants = [[0.5, 0.5, -0.5, 0.0], [0.5, 0.5, -0.5, 0.0]]
        for want in wants:
            kv.push(0, [a, b])
            kv.pull(0, out=out)
            np.testing.assert_allclose(out, want, atol=1e-6)

    # row-sparse --------------------------------------------------------------------------------
    def test_row_sparse_pull_unique_sorted_rows(self, kv: Any) -> None:
        self.require(kv, "row_sparse")
        dense = np.arange(15, dtype=np.float32).reshape(5, 3)
        kv.init("emb", dense)
        out = kvframe.RowSparseArray.zeros((5, 3), np.float32)
        kv.row_sparse_pull("emb", out=out, row_ids=np.array([3, 1, 3, 1]))
        np.testing.assert_array_equal(np.asarray(out.indices), [1, 3])
        np.testing.assert_array_equal(np.asarray(out.data), dense[[1, 3]])

    def test_sparse_push_sums_the_union_of_rows(self, kv: Any) -> None:
        self.require(kv, "row_sparse")
        RSA = kvframe.RowSparseArray
        kv.init("emb", RSA.zeros((5, 3), np.float32))
        g1 = RSA(np.ones((2, 3), np.float32), np.array([0, 2], np.int64), (5, 3))
        g2 = RSA(np.full((2, 3), 2.0, np.float32), np.array([2, 4], np.int64), (5, 3))
        kv.push("emb", [g1, g2])
        out = np.zeros((5, 3), np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kv.pull("emb", out=out)
        np.testing.assert_array_equal(out[:, 0], [1, 0, 3, 0, 2])

    # errors leave the store as it was ------------------------------------------------------------
    def test_duplicate_init_is_an_error(self, kv: Any) -> None:
        kv.init(3, _ones(1.0))
        with pytest.raises(DuplicateInitError, match="3"):
            kv.init(3, _ones(2.0))
        with pytest.raises(DuplicateInitError):
            kv.init([4, 4], [_ones(1.0), _ones(1.0)])
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(1.0))
        with pytest.raises(KeyNotInitializedError):  # the refused list initialised nothing
            _pulled(kv, 4)

    def test_unknown_key_is_an_error(self, kv: Any) -> None:
        kv.init(3, _ones(1.0))
        with pytest.raises(KeyNotInitializedError, match="99"):
            _pulled(kv, 99)
        with pytest.raises(KeyNotInitializedError, match="99"):
            kv.push(99, _ones(1.0))
        with pytest.raises(KeyNotInitializedError):
            kv.push([3, 99], [_ones(5.0), _ones(5.0)])
        np.testing.assert_array_equal(_pulled(kv, 3), _ones(1.0))

    def test_mixed_key_types_are_an_error(self, kv: Any) -> None:
        with pytest.raises(MixedKeyTypesError):
            kv.init([1, "b"], [_ones(1.0), _ones(1.0)])
        kv.init(1, _ones(1.0))
        with pytest.raises(MixedKeyTypesError):
            kv.init("w", _ones(1.0))
        with pytest.raises(MixedKeyTypesError):
            kv.push("w", _ones(1.0))
        np.testing.assert_array_equal(_pulled(kv, 1), _ones(1.0))

    def test_shape_mismatch_leaves_the_store_unchanged(self, kv: Any) -> None:
        kv.init([1, 2], [_ones(1.0), _ones(2.0)])
        with pytest.raises(ShapeMismatchError, match=r"\(4, 3\)"):
            kv.push(1, _ones(5.0, shape=(3, 4)))
        with pytest.raises(ShapeMismatchError):  # the good first key is not applied either
            kv.push([1, 2], [_ones(5.0), [_ones(5.0), _ones(5.0, shape=(2, 2))]])
        with pytest.raises(ShapeMismatchError):
            kv.pull(1, out=np.zeros((2, 2), np.float32))
        np.testing.assert_array_equal(_pulled(kv, 1), _ones(1.0))
        np.testing.assert_array_equal(_pulled(kv, 2), _ones(2.0))

    def test_dtype_mismatch_leaves_the_store_unchanged(self, kv: Any) -> None:
        kv.init([1, 2], [_ones(1.0), _ones(2.0)])
        with pytest.raises(DTypeMismatchError, match="float64"):
            kv.push(1, _ones(5.0, dtype=np.float64))
        with pytest.raises(DTypeMismatchError):
            kv.push([1, 2], [_ones(5.0), _ones(5.0, dtype=np.float16)])
        with pytest.raises(DTypeMismatchError):
            kv.pushpull(1, _ones(5.0), out=np.zeros(SHAPE, np.int32))
        np.testing.assert_array_equal(_pulled(kv, 1), _ones(1.0))
        np.testing.assert_array_equal(_pulled(kv, 2), _ones(2.0))

    def test_bad_arguments(self, kv: Any) -> None:
        kv.init(1, _ones(1.0))
        with pytest.raises(ValueError, match="empty"):
            kv.push([], [])
        with pytest.raises(ValueError):
            kv.push([1, 1], [_ones(1.0)])  # 2 keys, 1 value
        with pytest.raises(TypeError, match="array"):
            kv.push(1, "not an array")
        with pytest.raises(TypeError):
            kv.init(1.5, _ones(1.0))
        np.testing.assert_array_equal(_pulled(kv, 1), _ones(1.0))


__all__ = ["StoreConformance", "pytest_addoption"]
