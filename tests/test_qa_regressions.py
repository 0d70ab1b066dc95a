"""Regressions found by QA, using the API the way MXNet users do (stores 'local' and 'device')."""

import numpy as np
import pytest

import kvframe
from kvframe.errors import DTypeMismatchError, ShapeMismatchError


@pytest.fixture(params=["local", "device"])
def kv(request):
    store = kvframe.create(request.param)
    yield store
    store.close()


def read_only(a):
    a.flags.writeable = False
    return a


def stored(kv, key, shape=(4,), dtype=np.float32):
    out = np.zeros(shape, dtype)
    kv.pull(key, out=out)
    return out


@pytest.mark.parametrize("n", [4, 2_000_000])  # small and thread-pool sized
def test_pull_into_read_only_out_names_the_key(kv, n):
    kv.init("w", np.full(n, 3, np.float32))
    out = read_only(np.zeros(n, np.float32))
    with pytest.raises(ValueError, match=r"key 'w': out is read-only"):
        kv.pull("w", out=out)
    assert (out == 0).all()


def test_pull_list_with_one_read_only_out_writes_nothing(kv):
    kv.init(["a", "b"], [np.full(4, 1, np.float32), np.full(4, 2, np.float32)])
    good = np.zeros(4, np.float32)
    bad = read_only(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"key 'b': out is read-only"):
        kv.pull(["a", "b"], out=[good, bad])
    assert (good == 0).all()


def test_pushpull_with_read_only_out_leaves_the_store_unchanged(kv):
    kv.init(1, np.full(4, 5, np.float32))
    with pytest.raises(ValueError, match=r"key 1: out is read-only"):
        kv.pushpull(1, np.full(4, 9, np.float32), out=read_only(np.zeros(4, np.float32)))
    assert (stored(kv, 1) == 5).all()


def test_pushpull_in_place_on_read_only_value_leaves_the_store_unchanged(kv):
    kv.init(1, np.full(4, 5, np.float32))
    kv.set_optimizer("sgd", learning_rate=1.0)
    values = [np.full(4, 1, np.float32), read_only(np.full(4, 1, np.float32))]
    with pytest.raises(ValueError, match=r"key 1: value \(written in place\) 1 is read-only"):
        kv.pushpull(1, values)
    assert (stored(kv, 1) == 5).all()  # no update ran
    assert (values[0] == 1).all()


def test_broadcast_into_read_only_out_initialises_nothing(kv):
    with pytest.raises(ValueError, match=r"key 'x': out is read-only"):
        kv.broadcast("x", np.ones(4, np.float32), out=read_only(np.zeros(4, np.float32)))
    assert kv.keys() == []
    out = np.zeros(4, np.float32)
    kv.broadcast("x", np.full(4, 7, np.float32), out=out)  # a retry works
    assert (out == 7).all()


def test_read_only_inputs_are_fine(kv):
    kv.init("w", read_only(np.full(4, 2, np.float32)))
    kv.push("w", [read_only(np.full(4, 1, np.float32))] * 3)
    assert (stored(kv, "w") == 3).all()


def test_broadcast_dtype_mismatch_is_a_dtype_error(kv):
    with pytest.raises(DTypeMismatchError, match=r"key 'y'.*float64"):
        kv.broadcast("y", np.ones(3, np.float32), out=np.zeros(3, np.float64))
    with pytest.raises(ShapeMismatchError, match=r"key 'y'"):
        kv.broadcast("y", np.ones(3, np.float32), out=np.zeros(4, np.float32))
    assert kv.keys() == []


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_])
def test_optimizer_on_an_integer_key_names_the_key(kv, dtype):
    kv.init("steps", np.ones(4, dtype))
    kv.set_optimizer("sgd", learning_rate=0.5)
    with pytest.raises(DTypeMismatchError, match=r"key 'steps': optimizer 'sgd' updates floating-point weights"):
        kv.push("steps", np.ones(4, dtype))
    assert (stored(kv, "steps", dtype=dtype) == 1).all()


def test_disabled_name_stays_disabled_after_its_module_loads_for_another_name(monkeypatch):
    # kvframe_compressors registers every codec from one module: loading it for '2bit' must not
    # bring back 'topk' when KVFRAME_DISABLE_PLUGINS names it (likewise optimizers, dist stores)
    from kvframe import plugins
    from kvframe.errors import PluginNotFoundError

    monkeypatch.setenv("KVFRAME_DISABLE_PLUGINS", "topk,adam")
    store = kvframe.create("device")
    store.set_gradient_compression({"type": "2bit"})
    store.set_optimizer("sgd")
    assert "topk" not in plugins.names("compressors") and "2bit" in plugins.names("compressors")
    assert "adam" not in [r.name for r in plugins.registrations("optimizers")]
    with pytest.raises(PluginNotFoundError, match="disabled by KVFRAME_DISABLE_PLUGINS"):
        store.set_gradient_compression({"type": "topk"})
    with pytest.raises(PluginNotFoundError, match="disabled by KVFRAME_DISABLE_PLUGINS"):
        store.set_optimizer("adam")
    assert store.gradient_compression.type == "2bit" and store.optimizer.config.type == "sgd"
    monkeypatch.delenv("KVFRAME_DISABLE_PLUGINS")
    store.set_gradient_compression({"type": "topk"})  # available again once unblocked
    assert "adam" in plugins.names("optimizers")
    store.close()


def test_create_refuses_a_second_store_type_in_the_options():
    with pytest.raises(TypeError, match=r"store type twice: name='local' and type='device'"):
        kvframe.create("local", type="device")
    store = kvframe.create("local", reduce_threads=2)
    assert type(store.backend).__name__ == "LocalStore" and store.type == "local"
    store.close()


def test_row_sparse_outputs_of_another_dtype_are_refused(kv):
    from kvframe import RowSparseArray

    kv.init("emb", np.arange(12, dtype=np.float32).reshape(6, 2))
    out = RowSparseArray.zeros((6, 2), dtype=np.float64)
    with pytest.raises(DTypeMismatchError, match=r"key 'emb': out has dtype float64.*float32"):
        kv.row_sparse_pull("emb", out=out, row_ids=np.array([1]))
    with pytest.raises(DTypeMismatchError, match=r"key 'emb': out has dtype float64.*float32"):
        kv.pull("emb", out=out, ignore_sparse=False)
    assert out.dtype == np.float64 and out.indices.size == 0  # untouched
    good = RowSparseArray.zeros((6, 2), dtype=np.float32)
    kv.row_sparse_pull("emb", out=good, row_ids=np.array([4, 1, 4]))
    assert good.indices.tolist() == [1, 4] and good.data.tolist() == [[2, 3], [8, 9]]


def test_a_closed_store_says_so_for_small_and_big_arrays(kv):
    from kvframe.errors import NotSupportedError

    kv.init([0, 1], [np.zeros(4, np.float32), np.zeros(2_000_000, np.float32)])
    kv.close()
    kv.close()  # twice is fine
    for call in (lambda: kv.push(0, np.ones(4, np.float32)),
                 lambda: kv.push(1, [np.ones(2_000_000, np.float32)] * 2),  # was: RuntimeError from the pool
                 lambda: kv.pull(0, out=np.zeros(4, np.float32)),
                 lambda: kv.pull(1, out=np.zeros(2_000_000, np.float32)),
                 lambda: kv.pushpull(0, np.ones(4, np.float32)),
                 lambda: kv.init(2, np.ones(1, np.float32)),
                 lambda: kv.set_optimizer("sgd"),
                 lambda: kv.barrier()):
        with pytest.raises(NotSupportedError, match=r"store is closed"):
            call()
    assert kv.keys() == [0, 1] and "keys=2" in repr(kv)


class _CudaOnlyDLPack:
    """A DLPack producer in CUDA memory (as a torch CUDA tensor) on a machine without cupy."""

    shape, dtype = (4,), np.float32

    def __dlpack__(self, stream=None):
        raise AssertionError("must not be exported")

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA


def test_gpu_dlpack_arrays_without_cupy_say_what_to_install(kv):
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed")
    kv.init("w", np.full(4, 2, np.float32))
    with pytest.raises(TypeError, match=r"key 'w': value: .*GPU memory.*cupy is not installed: pip install cupy"):
        kv.push("w", _CudaOnlyDLPack())
    assert (stored(kv, "w") == 2).all()


def test_numpy_scalars_and_odd_capabilities_get_clear_errors(kv):
    kv.init(0, np.zeros((), np.float32))
    with pytest.raises(TypeError, match=r"key 0: value must be an array .* got the numpy scalar .*np.asarray"):
        kv.push(0, np.float32(1))
    kv.push(0, np.asarray(np.float32(1)))
    assert stored(kv, 0, shape=()) == 1
    with pytest.raises(ValueError, match="unknown capability 1"):
        kv.is_capable(1)


def test_row_ids_as_a_list_of_ints_gets_a_clear_error(kv):
    from kvframe import RowSparseArray

    kv.init("emb", np.arange(12, dtype=np.float32).reshape(6, 2))
    out = RowSparseArray.zeros((6, 2))
    with pytest.raises(TypeError, match=r"key 'emb': row_ids must be arrays of row numbers.*got int "
                                        r"\(a list of row numbers\? pass np.array"):
        kv.row_sparse_pull("emb", out=out, row_ids=[0, 2])  # MXNet refuses it too
    kv.row_sparse_pull("emb", out=out, row_ids=np.array([0, 2]))
    assert out.indices.tolist() == [0, 2] and out.data.tolist() == [[0, 1], [4, 5]]


def test_a_scheduler_without_type_gets_a_plain_message():
    from kvframe.configfile import load_config
    from kvframe.errors import ConfigError

    store = kvframe.create("local")
    with pytest.raises(ConfigError, match=r"lr_scheduler: field 'type' is required here") as e:
        store.set_optimizer("sgd", lr_scheduler={"step": 2})
    assert "Unable to extract tag" not in str(e.value) and store.optimizer is None
    with pytest.raises(ConfigError, match=r"optimizer.lr_scheduler: field 'type' is required here"):
        load_config({"optimizer": {"type": "sgd", "lr_scheduler": {"step": 2}}}, environ={})
    store.close()


@pytest.mark.parametrize("raw", ["2m", "0", "-5", "inf", "nan"])
def test_a_bad_kvframe_timeout_is_named(monkeypatch, raw):
    from kvframe.backend import _env_timeout

    monkeypatch.setenv("KVFRAME_TIMEOUT", raw)
    with pytest.raises(ValueError, match=rf"KVFRAME_TIMEOUT='{raw}': expected a positive number of seconds"):
        _env_timeout()
    monkeypatch.setenv("KVFRAME_TIMEOUT", " 300 ")
    assert _env_timeout() == 300.0
    monkeypatch.delenv("KVFRAME_TIMEOUT")
    assert _env_timeout() == 120.0


def test_a_timeout_error_names_the_timeout_waited():
    import concurrent.futures

    from kvframe.backend import FutureHandle
    from kvframe.errors import KVTimeoutError

    handle = FutureHandle(concurrent.futures.Future(), "pull of key 'w'")
    with pytest.raises(KVTimeoutError, match=r"timed out after 0 s waiting for pull of key 'w'"):
        handle.wait(0)  # said 120 s (the default) before


def test_validate_a_non_utf8_file_and_schema_to_a_missing_folder_are_clean_errors(tmp_path, capsys):
    from kvframe.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[store]\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err
    assert main(["config-schema", "-o", str(tmp_path / "missing" / "schema.json")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "No such file or directory" in err


def test_numpy_str_keys_are_plain_str_keys(kv):
    names = np.array(["w", "b"])  # np.str_ elements, e.g. parameter names kept in an array
    kv.init(list(names), [np.zeros(2, np.float32), np.zeros(3, np.float32)])
    assert kv.keys() == ["w", "b"] and all(type(k) is str for k in kv.keys())
    kv.push(names[0], np.ones(2, np.float32))  # was MixedKeyTypesError: 'this store uses str keys'
    kv.push("b", np.full(3, 2, np.float32))
    out = np.zeros(2, np.float32)
    kv.pull(names[0], out=out)
    assert (out == 1).all() and (stored(kv, names[1], shape=(3,)) == 2).all()


def test_a_plugin_whose_register_hook_fails_breaks_only_its_own_names(tmp_path, monkeypatch, capsys):
    import textwrap

    from kvframe import cli, plugins
    from kvframe.errors import PluginImportError

    info = tmp_path / "kvframe_qa_hookfail-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvframe-qa-hookfail\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[kvframe.stores]\nqa_hookfail = kvframe_qa_hookfail\n"
                                           "qa_badmodel = kvframe_qa_badmodel\n")
    (tmp_path / "kvframe_qa_hookfail.py").write_text(textwrap.dedent("""
        import kvframe
        @kvframe.hookimpl
        def kvframe_register_stores(register):
            raise RuntimeError("boom in the register hook")
        """))
    (tmp_path / "kvframe_qa_badmodel.py").write_text(textwrap.dedent("""
        import kvframe
        @kvframe.hookimpl
        def kvframe_register_stores(register):
            register("qa_badmodel", object, dict)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(PluginImportError, match=r"kvframe-qa-hookfail .*hook failed: RuntimeError: boom"):
            kvframe.create("qa_hookfail")
        with pytest.raises(PluginImportError, match=r"hook failed: TypeError: .*not a kvframe.config.PluginConfig"):
            kvframe.create("qa_badmodel")
        assert kvframe.create("local").type == "local"
        # `kvframe plugins` lists them as failed instead of crashing with a traceback
        assert cli.main(["plugins"]) == 0
        out = capsys.readouterr().out
        assert "store 'qa_hookfail' from kvframe-qa-hookfail 1.2.3: RuntimeError: boom in the register hook" in out
        assert "store 'qa_badmodel' from kvframe-qa-hookfail 1.2.3: TypeError" in out
        assert plugins.plugin_manager().get_plugin("kvframe_qa_hookfail") is None  # nothing half-registered
    finally:
        for name in ("kvframe.stores:qa_hookfail", "kvframe.stores:qa_badmodel"):
            plugins._failed.pop(name, None)


# MXNet 1.9.1's own kvstore tests, run against kvframe -------------------------------------------
@pytest.mark.parametrize("store", ["local", "device"])
def test_row_sparse_pull_takes_row_ids_of_any_shape(store):
    kv = kvframe.create(store)
    w = np.arange(12, dtype=np.float32).reshape(6, 2)
    kv.init("e", w)
    out = kvframe.RowSparseArray.zeros((6, 2), np.float32)
    kv.row_sparse_pull("e", out=out, row_ids=np.array([[0, 1], [3, 3]]))  # rows 0, 1 and 3
    assert out.indices.tolist() == [0, 1, 3]
    np.testing.assert_array_equal(out.data, w[[0, 1, 3]])
    kv.row_sparse_pull("e", out=out, row_ids=np.array(4))  # a 0-d id array is one row
    assert out.indices.tolist() == [4]
    with pytest.raises(TypeError, match="key 'e': row_ids must hold row numbers; got dtype <U1"):
        kv.row_sparse_pull("e", out=out, row_ids=np.array(["a"]))


def test_load_optimizer_states_says_there_are_none_before_opening_the_file(tmp_path):
    kv = kvframe.create("local")
    kv.init(3, np.zeros(4, np.float32))
    missing = tmp_path / "no-such-file"
    with pytest.raises(kvframe.errors.NotSupportedError, match="needs an optimizer: call set_optimizer first"):
        kv.load_optimizer_states(missing)
    kv.set_updater(lambda k, g, w: None)  # a plain updater keeps no states
    with pytest.raises(kvframe.errors.NotSupportedError, match="call set_optimizer first"):
        kv.load_optimizer_states(missing)
    kv.set_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    with pytest.raises(FileNotFoundError):  # now the file is what is missing
        kv.load_optimizer_states(missing)
    kv.save_optimizer_states(tmp_path / "s")
    kv.load_optimizer_states(tmp_path / "s")
