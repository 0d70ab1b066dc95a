"""The CUDA kernels' logic, compiled as plain C++ with a stand-in for the CUDA thread indices and
run over several (block, thread) pairs, gives the numpy path's bytes, residuals and values.
Checks the kernels on machines without a GPU; the real kernels run in test_cupy.py."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from kvframe_compressors._cuda_source import SOURCE

PRELUDE = r"""
struct kvf_dim { unsigned int x; };
static kvf_dim blockIdx, blockDim, threadIdx, gridDim;
#define __global__
#define __restrict__
"""

# Run a kernel as a grid of GRID blocks x THREADS threads, one (block, thread) after another.
DRIVER = r"""
#define KVF_GRID(call) \
    gridDim.x = grid; blockDim.x = threads; \
    for (unsigned int bb = 0; bb < grid; ++bb) for (unsigned int tt = 0; tt < threads; ++tt) { \
        blockIdx.x = bb; threadIdx.x = tt; call; }
extern "C" void run_encode_2bit(unsigned grid, unsigned threads, const float* g, float* r, unsigned char* out,
                                long long n, long long nbytes, float t) {
    KVF_GRID(kvf_encode_2bit(g, r, out, n, nbytes, t)) }
extern "C" void run_decode_2bit(unsigned grid, unsigned threads, const unsigned char* in, float* out, long long n,
                                float t, int acc) {
    KVF_GRID(kvf_decode_2bit(in, out, n, t, acc)) }
extern "C" void run_encode_1bit(unsigned grid, unsigned threads, const float* g, float* r, unsigned char* out,
                                long long n, long long nbytes, float t) {
    KVF_GRID(kvf_encode_1bit(g, r, out, n, nbytes, t)) }
extern "C" void run_decode_1bit(unsigned grid, unsigned threads, const unsigned char* in, float* out, long long n,
                                int acc) {
    KVF_GRID(kvf_decode_1bit(in, out, n, acc)) }
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("kvf_cuda_src")
    (d / "k.cpp").write_text(PRELUDE + SOURCE + DRIVER)
    # -ffp-contract=off: no fused multiply-add, as with --fmad=false on the GPU
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(d / "k.so"), str(d / "k.cpp")],
                   check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(d / "k.so"))
    f, ll, u = ctypes.c_float, ctypes.c_longlong, ctypes.c_uint
    p = ctypes.c_void_p
    lib.run_encode_2bit.argtypes = [u, u, p, p, p, ll, ll, f]
    lib.run_encode_1bit.argtypes = [u, u, p, p, p, ll, ll, f]
    lib.run_decode_2bit.argtypes = [u, u, p, p, ll, f, ctypes.c_int]
    lib.run_decode_1bit.argtypes = [u, u, p, p, ll, ctypes.c_int]
    return lib


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("name, threshold", [("2bit", 0.5), ("2bit", 0.11), ("1bit", -0.5), ("1bit", 0.0),
                                             ("1bit", 0.5)])
@pytest.mark.parametrize("n, grid, threads", [(1, 1, 1), (17, 2, 3), (100, 3, 4), (1031, 2, 32)])
def test_kernel_logic_matches_numpy(lib, make, name, threshold, n, grid, threads):
    comp = make(name, threshold=threshold)
    rng = np.random.default_rng(n)
    res_np, res_k = np.zeros(n, np.float32), np.zeros(n, np.float32)
    t = np.float32(threshold)
    enc = lib.run_encode_2bit if name == "2bit" else lib.run_encode_1bit
    for _ in range(5):
        g = (rng.standard_normal(n) * 0.6).astype(np.float32)
        g[::5], g[1::5], g[2::5] = t, -t, t / 2  # residuals land exactly on the thresholds
        want = comp.encode(g, res_np)
        got = np.full(want.size, 0xAA, np.uint8)  # every byte must be written, padding included
        enc(grid, threads, _ptr(g), _ptr(res_k), _ptr(got), n, got.size, t)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(res_k, res_np)
        for acc in (0, 1):
            out_np = np.full(n, 0.75, np.float32)
            out_k = out_np.copy()
            comp.decode(want, out_np, accumulate=bool(acc))
            if name == "2bit":
                lib.run_decode_2bit(grid, threads, _ptr(got), _ptr(out_k), n, t, acc)
            else:
                lib.run_decode_1bit(grid, threads, _ptr(got), _ptr(out_k), n, acc)
            np.testing.assert_array_equal(out_k, out_np)
