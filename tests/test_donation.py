"""push(..., donate=True): the store may keep the caller's array instead of copying it."""

import numpy as np
import pytest

import kvframe


def test_local_store_keeps_a_donated_array_without_copying():
    kv = kvframe.create("local")
    kv.init(["a", "b"], [np.zeros(6, np.float32), np.zeros(6, np.float32)])
    g = np.arange(6, dtype=np.float32)
    kv.push("a", g, donate=True)
    assert kv.backend._values["a"] is g  # adopted: no copy
    out = np.empty(6, np.float32)
    kv.pull("a", out=out)
    np.testing.assert_array_equal(out, np.arange(6))
    # a later (copying) push writes the sum into the adopted array, which now belongs to the store
    kv.push("a", [np.ones(6, np.float32), np.ones(6, np.float32)])
    kv.pull("a", out=out)
    np.testing.assert_array_equal(out, np.full(6, 2.0))
    # a key list: each key adopts its own array
    x, y = np.full(6, 3, np.float32), np.full(6, 4, np.float32)
    kv.push(["a", "b"], [x, y], donate=True)
    assert kv.backend._values["a"] is x and kv.backend._values["b"] is y
    kv.pull(["a", "b"], out=[out, o2 := np.empty(6, np.float32)])
    assert out.tolist() == [3.0] * 6 and o2.tolist() == [4.0] * 6


@pytest.mark.parametrize("case", ["strided", "read-only", "several copies", "updater", "repeated key"])
def test_donation_falls_back_to_the_safe_copy(case):
    kv = kvframe.create("local")
    kv.init(0, np.zeros(4, np.float32))
    if case == "updater":
        kv.set_updater(lambda key, grad, weight: weight.__iadd__(grad))
    g = np.arange(8, dtype=np.float32)[::2] if case == "strided" else np.arange(4, dtype=np.float32)
    if case == "read-only":
        g.flags.writeable = False
    if case == "several copies":
        kv.push(0, [g, g], donate=True)
        expect = 2 * np.arange(4)
    elif case == "repeated key":
        kv.push([0, 0], [g, g], donate=True)
        expect = 2 * np.arange(4)
    else:
        kv.push(0, g, donate=True)
        expect = np.arange(0, 8, 2) if case == "strided" else np.arange(4)
    assert kv.backend._values[0] is not g
    before = g.copy()
    out = np.empty(4, np.float32)
    kv.pull(0, out=out)
    np.testing.assert_array_equal(out, expect)
    np.testing.assert_array_equal(g, before)  # the caller's array was only read


def test_donation_is_checked_like_any_push_and_other_stores_copy():
    kv = kvframe.create("device")
    kv.init(1, np.zeros(4, np.float32))
    with pytest.raises(kvframe.errors.DTypeMismatchError, match="key 1: pushed value has dtype float64"):
        kv.push(1, np.zeros(4), donate=True)
    g = np.ones(4, np.float32)
    kv.push(1, g, donate=True)  # the device store copies
    g[:] = 7
    out = np.empty(4, np.float32)
    kv.pull(1, out=out)
    assert out.tolist() == [1.0] * 4
