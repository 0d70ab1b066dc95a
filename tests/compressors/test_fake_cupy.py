"""The GPU tests of test_cupy.py, run on fake_cupy (simulated devices, the real kernel source
compiled as C++), so the cupy code paths are exercised on machines without a GPU."""

import shutil

import fake_cupy
import pytest
from test_cupy import (  # noqa: F401 - collected here with the fake `cp` below
    test_casts_bit_identical_on_gpu,
    test_device_store_hand_checked_sequence_on_gpu,
    test_device_store_on_gpus_matches_numpy,
    test_encode_decode_into_on_gpu,
    test_quantizers_bit_identical_on_gpu,
    test_topk_on_gpu_conserves_mass,
)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler for the simulated kernels")


@pytest.fixture
def cp(monkeypatch):
    fake_cupy.install(monkeypatch)
    return fake_cupy


def test_the_fake_is_gone_afterwards():
    import sys

    import kvframe_compressors

    assert sys.modules.get("cupy") is not fake_cupy
    cuda = sys.modules.get("kvframe_compressors._cuda")
    assert cuda is None or cuda.cupy is not fake_cupy
    assert getattr(kvframe_compressors, "_cuda", None) is cuda
