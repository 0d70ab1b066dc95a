"""The plugin extras the stores rely on are declared in kvframe.protocols, and the built-in
plugins satisfy them (a third-party plugin that does gets the same treatment)."""

import numpy as np
import pytest

from kvframe import plugins, protocols
from kvframe.backend import StoreBackend


@pytest.mark.parametrize("name", ["sgd", "adam", "lamb"])
def test_optimizers_and_their_updaters_declare_checks(name):
    opt = plugins.build("optimizers", {"type": name, "learning_rate": 0.1}, "test")
    assert isinstance(opt, protocols.Optimizer) and isinstance(opt, protocols.StatesChecker)
    updater = opt.create_updater()
    assert isinstance(updater, protocols.StatefulUpdater) and isinstance(updater, protocols.CheckedUpdater)
    with pytest.raises(Exception, match="key 'k'"):  # the check refuses before any step
        updater.check("k", np.ones(3, np.int32), np.zeros(3, np.int32))


@pytest.mark.parametrize("name, fused", [("2bit", True), ("1bit", True), ("fp16", False), ("topk", False)])
def test_compressors_declare_what_the_device_store_fuses(name, fused):
    comp = plugins.build("compressors", {"type": name}, "test")
    assert isinstance(comp, protocols.Compressor) and isinstance(comp, protocols.DTypeCheckingCompressor)
    assert isinstance(comp, protocols.BlockCodec)
    assert (comp.block_multiple is not None) == (name != "topk")
    with pytest.raises((TypeError, ValueError)):
        comp.check_dtype(np.dtype("int64"))
    if fused:
        assert isinstance(comp, protocols.FusedBlockCodec) and isinstance(comp, protocols.FusedSumCodec)


def test_own_states_format_is_part_of_the_store_contract():
    assert StoreBackend.own_states_format is False
    dist = pytest.importorskip("kvframe_dist.worker")
    assert dist.DistStore.own_states_format is True
