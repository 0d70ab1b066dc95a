"""Updater states: created on first use, saved as arrays + JSON (never pickle), exact round trips,
dump_optimizer, and clear refusals of states from another optimizer or for other shapes."""

import io
import json
import warnings

import numpy as np
import pytest
from kvframe_optimizers import RULES, StatesFormatError, create_optimizer

import kvframe
from kvframe.arrays import RowSparseArray
from kvframe.errors import ConfigError, ShapeMismatchError

OPTIONS = {"sgd": {"momentum": 0.9}, "nag": {"momentum": 0.9}, "dcasgd": {"momentum": 0.5},
           "lbsgd": {"momentum": 0.9, "batch_scale": 2}, "rmsprop": {"centered": True}, "sgld": {"seed": 3},
           "lars": {"momentum": 0.9, "lr_scheduler": {"type": "factor", "step": 2, "factor": 0.5, "base_lr": 1.0}}}


def _grads(n, shape=(5, 4), seed=0):
    rs = np.random.default_rng(seed)
    return [rs.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _continue(upd, w, grads, keys=(0, "b")):
    for g in grads:
        for k in keys:
            upd(k, g, w[k])


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dump", [False, True])
def test_exact_round_trip_for_every_optimizer(name, dump):
    """Save after 3 steps, continue 3 steps; a fresh optimizer that loads the states and continues
    the same 3 steps ends bit for bit at the same weights (update counts, scalars, RNG included)."""
    cfg = OPTIONS.get(name, {})
    grads = _grads(6)
    w0 = _grads(1, seed=9)[0]
    upd = create_optimizer(name, **cfg).create_updater()
    w = {0: w0.copy(), "b": w0.copy()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _continue(upd, w, grads[:3])
        data = upd.get_states(dump_optimizer=dump)
        saved = {k: v.copy() for k, v in w.items()}
        _continue(upd, w, grads[3:])
        other = create_optimizer(name, **cfg).create_updater()
        other.set_states(data)
        _continue(other, saved, grads[3:])
    for k in w:
        np.testing.assert_array_equal(saved[k], w[k], err_msg=f"{name} key {k!r}")
    assert set(other.states) == {0, "b"}


def test_file_is_npz_of_plain_arrays_and_json():
    upd = create_optimizer("adam", multi_precision=True).create_updater()
    w = np.ones((3, 2), np.float16)
    upd(7, np.ones((3, 2), np.float16), w)
    data = upd.get_states(dump_optimizer=True)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:  # would raise on any pickled object
        arrays = {n: z[n] for n in z.files}
    meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    assert meta["optimizer"] == "adam" and meta["config"]["multi_precision"] is True
    (entry,) = meta["keys"]
    assert entry["key"] == 7 and entry["shape"] == [3, 2] and entry["dtype"] == "float16" and entry["count"] == 1
    assert set(entry["arrays"]) == {"mean", "var", "weight32"}
    assert all(a.dtype != object for a in arrays.values())
    assert b"pickle" not in data and not data.startswith(b"\x80")


def test_dump_optimizer_restores_the_config():
    upd = create_optimizer("sgd", learning_rate=0.5, momentum=0.9, wd=0.01).create_updater()
    w = np.ones(4, np.float32)
    upd(0, np.ones(4, np.float32), w)
    data = upd.get_states(dump_optimizer=True)
    other_opt = create_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    other = other_opt.create_updater()
    other.set_states(data)
    assert other_opt.config.learning_rate == 0.5 and other_opt.config.wd == 0.01
    assert other_opt.num_update == 1
    # without dump_optimizer the config stays
    third_opt = create_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    third_opt.create_updater().set_states(upd.get_states())
    assert third_opt.config.learning_rate == 0.1


def test_states_of_another_optimizer_are_refused():
    upd = create_optimizer("adam").create_updater()
    w = np.ones(4, np.float32)
    upd(0, np.ones(4, np.float32), w)
    target = create_optimizer("sgd", momentum=0.9).create_updater()
    target(0, np.ones(4, np.float32), np.ones(4, np.float32))
    before = target.states[0].arrays["mom"].copy()
    with pytest.raises(StatesFormatError, match="written by optimizer 'adam'.*'sgd'"):
        target.set_states(upd.get_states())
    np.testing.assert_array_equal(target.states[0].arrays["mom"], before)  # nothing changed


def test_states_with_another_layout_are_refused():
    upd = create_optimizer("sgd", momentum=0.9).create_updater()
    upd(0, np.ones(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(StatesFormatError, match="momentum or multi_precision"):
        create_optimizer("sgd").create_updater().set_states(upd.get_states())


def test_states_for_other_shapes_fail_when_used():
    upd = create_optimizer("adam").create_updater()
    upd(0, np.ones((4, 2), np.float32), np.ones((4, 2), np.float32))
    other = create_optimizer("adam").create_updater()
    other.set_states(upd.get_states())
    with pytest.raises(ShapeMismatchError, match=r"key 0.*shape \(4, 2\).*\(3, 2\)"):
        other(0, np.ones((3, 2), np.float32), np.ones((3, 2), np.float32))


@pytest.mark.parametrize("junk", [b"", b"not a zip", b"\x80\x04K\x01.", None])
def test_garbage_is_refused(junk):
    if junk is None:  # an npz without our metadata
        buf = io.BytesIO()
        np.savez(buf, a=np.ones(2))
        junk = buf.getvalue()
    with pytest.raises(StatesFormatError, match="not kvframe optimizer states"):
        create_optimizer("sgd").create_updater().set_states(junk)


def test_npz_with_a_pickled_array_is_refused():
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(b"{}", np.uint8), evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(StatesFormatError):
        create_optimizer("sgd").create_updater().set_states(buf.getvalue())


def test_bad_dumped_config_is_refused():
    upd = create_optimizer("adam").create_updater()
    upd(0, np.ones(2, np.float32), np.ones(2, np.float32))
    with np.load(io.BytesIO(upd.get_states(dump_optimizer=True)), allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["config"]["beta1"] = 2.0
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(ConfigError, match="beta1"):
        create_optimizer("adam").create_updater().set_states(buf.getvalue())


# through the store -------------------------------------------------------------------------------

def test_store_save_and_load_optimizer_states(tmp_path):
    def run(kv, steps, start=0):
        for i in range(start, start + steps):
            kv.push(["w", "e"], [np.full((4, 3), 0.1 * (i + 1), np.float32),
                                 RowSparseArray(np.ones((1, 3), np.float32), [i % 4], (4, 3))])

    def pull(kv):
        out = [np.empty((4, 3), np.float32), np.empty((4, 3), np.float32)]
        kv.pull(["w", "e"], out=out)
        return out

    kv = kvframe.create("local")
    kv.init(["w", "e"], [np.ones((4, 3), np.float32), np.ones((4, 3), np.float32)])
    kv.set_optimizer("adam", learning_rate=0.1)
    run(kv, 3)
    kv.save_optimizer_states(tmp_path / "s.npz", dump_optimizer=True)
    weights = pull(kv)
    run(kv, 2, 3)
    expect = pull(kv)

    kv2 = kvframe.create("local")
    kv2.init(["w", "e"], weights)
    kv2.set_optimizer("adam", learning_rate=0.5)
    kv2.load_optimizer_states(tmp_path / "s.npz")
    assert kv2.optimizer.config.learning_rate == 0.1
    run(kv2, 2, 3)
    for a, b in zip(pull(kv2), expect):
        np.testing.assert_array_equal(a, b)


def test_store_refuses_states_for_other_shapes_before_loading(tmp_path):
    kv = kvframe.create("local")
    kv.init(3, np.ones((4, 3), np.float32))
    kv.set_optimizer("sgd", momentum=0.9)
    kv.push(3, np.ones((4, 3), np.float32))
    kv.save_optimizer_states(tmp_path / "s.npz")

    kv2 = kvframe.create("local")
    kv2.init(3, np.ones((2, 6), np.float32))
    kv2.set_optimizer("sgd", momentum=0.9)
    with pytest.raises(ShapeMismatchError, match=r"key 3.*\(4, 3\).*\(2, 6\)"):
        kv2.load_optimizer_states(tmp_path / "s.npz")
    kv3 = kvframe.create("local")
    kv3.init(3, np.ones((4, 3), np.float64))
    kv3.set_optimizer("sgd", momentum=0.9)
    with pytest.raises(TypeError, match="dtype"):
        kv3.load_optimizer_states(tmp_path / "s.npz")
    kv4 = kvframe.create("local")
    kv4.init(3, np.ones((4, 3), np.float32))
    kv4.set_optimizer("nag", momentum=0.9)
    with pytest.raises(StatesFormatError, match="'sgd'"):
        kv4.load_optimizer_states(tmp_path / "s.npz")


def test_dumped_config_decides_the_layout():
    """States saved with momentum and dump_optimizer load into an optimizer set without momentum:
    the dumped config comes with them."""
    upd = create_optimizer("sgd", momentum=0.9, learning_rate=0.1).create_updater()
    w = np.ones(3, np.float32)
    upd(0, np.ones(3, np.float32), w)
    opt = create_optimizer("sgd")
    opt.check_states(upd.get_states(dump_optimizer=True), {0: ((3,), np.float32)})
    other = opt.create_updater()
    other.set_states(upd.get_states(dump_optimizer=True))
    assert opt.config.momentum == 0.9
    w2 = w.copy()
    upd(0, np.ones(3, np.float32), w)
    other(0, np.ones(3, np.float32), w2)
    np.testing.assert_array_equal(w, w2)


def test_dumped_config_of_another_optimizer_names_it():
    upd = create_optimizer("adam").create_updater()
    upd(0, np.ones(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(StatesFormatError, match="'adam'"):
        create_optimizer("sgd").create_updater().set_states(upd.get_states(dump_optimizer=True))


def test_int_keyed_options_survive_the_json_config():
    """JSON turns int keys of lr_mult/wd_mult/param_idx2name into strings; lookups still find them."""
    cfg = {"learning_rate": 0.1, "wd": 0.5, "param_idx2name": {0: "fc_bias", 1: "fc_weight"}, "lr_mult": {1: 2.0}}
    upd = create_optimizer("sgd", **cfg).create_updater()
    for k in (0, 1):
        upd(k, np.ones(2, np.float32), np.ones(2, np.float32))
    opt = create_optimizer("sgd")
    opt.create_updater().set_states(upd.get_states(dump_optimizer=True))
    assert opt.config.param_idx2name == {"0": "fc_bias", "1": "fc_weight"}
    assert (opt.wd_for(0), opt.wd_for(1)) == (0.0, 0.5)
    assert opt.lr_for(1, 0.1) == pytest.approx(0.2) and opt.lr_for(0, 0.1) == pytest.approx(0.1)
