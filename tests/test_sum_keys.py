"""Sum-only keys (kvframe.sumkeys): summed and stored whatever optimizer or updater a store runs.
The dist servers apply the same rule (tests/torch/test_dist.py runs it against a server running SGD)."""

import numpy as np
import pytest

import kvframe
from kvframe.sumkeys import SUM_PREFIX, SumOnlyUpdater, is_sum_key, sum_key


def test_names():
    assert sum_key("loss") == SUM_PREFIX + "loss" == "__sum__/loss"
    assert sum_key(sum_key("loss")) == "__sum__/loss"
    assert is_sum_key("__sum__/x") and not is_sum_key("x") and not is_sum_key(3)
    with pytest.raises(TypeError):
        sum_key("")


@pytest.mark.parametrize("store_type", ["local", "device"])
def test_an_optimizer_never_sees_sum_keys(store_type):
    kv = kvframe.create(store_type)
    kv.set_optimizer("sgd", learning_rate=0.5)
    kv.init(["w", sum_key("m")], [np.ones(4, np.float32), np.zeros(4, np.float32)])
    g = np.full(4, 2.0, np.float32)
    kv.push(["w", sum_key("m")], [[g, g], [g, g]])  # two devices each
    w, m = np.empty(4, np.float32), np.empty(4, np.float32)
    kv.pull(["w", sum_key("m")], out=[w, m])
    assert np.array_equal(w, np.full(4, 1.0 - 0.5 * 4.0, np.float32))  # sgd on the sum
    assert np.array_equal(m, np.full(4, 4.0, np.float32))  # the sum itself
    kv.pushpull(sum_key("m"), np.full(4, 0.25, np.float32), out=m)
    assert np.array_equal(m, np.full(4, 0.25, np.float32))  # assigned, not accumulated


def test_custom_updaters_are_wrapped_and_keep_their_attributes(tmp_path):
    seen = []

    class Updater:
        steps = 7

        def __call__(self, key, grad, weight):
            seen.append(key)
            weight += grad

    kv = kvframe.create("local")
    kv.set_updater(Updater())
    kv.init(["a", sum_key("b")], [np.zeros(2, np.float32), np.zeros(2, np.float32)])
    kv.push(["a", sum_key("b")], [np.ones(2, np.float32), np.ones(2, np.float32)])
    kv.push(["a", sum_key("b")], [np.ones(2, np.float32), np.ones(2, np.float32)])
    out = np.empty(2, np.float32)
    kv.pull(sum_key("b"), out=out)
    assert seen == ["a", "a"] and np.array_equal(out, [1, 1])
    assert isinstance(kv.backend._updater, SumOnlyUpdater) and kv.backend._updater.steps == 7
    kv2 = kvframe.create("local")
    kv2.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    kv2.init(["w", sum_key("s")], [np.ones(3, np.float32), np.zeros(3, np.float32)])
    kv2.push(["w", sum_key("s")], [np.ones(3, np.float32), np.ones(3, np.float32)])
    kv2.save_optimizer_states(tmp_path / "st")  # the wrapper passes get_states through
    kv2.load_optimizer_states(tmp_path / "st")


def test_scale_free_compression_leaves_small_sum_keys_exact():
    kv = kvframe.create("device")
    kv.set_optimizer("sgd", learning_rate=1.0)
    kv.set_gradient_compression({"type": "2bit", "threshold_scale": "rms"})
    kv.init(sum_key("loss"), np.zeros(3, np.float32))
    vals = [np.array([0.1, -2.5, 3e-7], np.float32), np.array([0.2, 1.0, 0.0], np.float32)]
    out = np.empty(3, np.float32)
    kv.pushpull(sum_key("loss"), vals, out=out)
    assert np.array_equal(out, vals[0] + vals[1])
