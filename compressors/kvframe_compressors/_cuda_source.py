"""CUDA C source of the 2bit/1bit kernels (kept apart from cupy so it can be checked anywhere).

One encode thread per payload byte (4 or 8 values, no atomics); one decode thread per value; one
thread per value for the one-pass encode + decode (no payload); grid-stride loops.  Only float32
additions, subtractions and comparisons, in the CPU order.
"""

SOURCE = r"""
extern "C" __global__
void kvf_encode_2bit(const float* __restrict__ g, float* __restrict__ r, unsigned char* __restrict__ out,
                     const long long n, const long long nbytes, const float t) {
    const float neg_t = -t;
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < nbytes;
         b += (long long)blockDim.x * gridDim.x) {
        unsigned int byte = 0;
        const long long start = b << 2;
        for (int j = 0; j < 4; ++j) {
            const long long i = start + j;
            if (i < n) {
                float v = r[i] + g[i];
                if (v >= t) {
                    byte |= 0xc0u >> (2 * j);
                    v = v - t;
                } else if (v <= neg_t) {
                    byte |= 0x80u >> (2 * j);
                    v = v - neg_t;
                }
                r[i] = v;
            }
        }
        out[b] = (unsigned char)byte;
    }
}

extern "C" __global__
void kvf_decode_2bit(const unsigned char* __restrict__ in, float* __restrict__ out, const long long n,
                     const float t, const int accumulate) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const unsigned int code = (in[i >> 2] >> (6 - 2 * (int)(i & 3))) & 3u;
        const float v = code == 3u ? t : (code == 2u ? -t : 0.0f);
        out[i] = accumulate ? out[i] + v : v;
    }
}

extern "C" __global__
void kvf_encode_1bit(const float* __restrict__ g, float* __restrict__ r, unsigned char* __restrict__ out,
                     const long long n, const long long nbytes, const float t) {
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < nbytes;
         b += (long long)blockDim.x * gridDim.x) {
        unsigned int byte = 0;
        const long long start = b << 3;
        for (int j = 0; j < 8; ++j) {
            const long long i = start + j;
            if (i < n) {
                float v = r[i] + g[i];
                if (v > t) {
                    byte |= 0x80u >> j;
                    v = v - 1.0f;
                } else {
                    v = v + 1.0f;
                }
                r[i] = v;
            }
        }
        out[b] = (unsigned char)byte;
    }
}

extern "C" __global__
void kvf_decode_1bit(const unsigned char* __restrict__ in, float* __restrict__ out, const long long n,
                     const int accumulate) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float v = ((in[i >> 3] >> (7 - (int)(i & 7))) & 1u) ? 1.0f : -1.0f;
        out[i] = accumulate ? out[i] + v : v;
    }
}

extern "C" __global__
void kvf_encode_decode_2bit(const float* __restrict__ g, float* __restrict__ r, float* __restrict__ out,
                            const long long n, const float t, const int accumulate) {
    const float neg_t = -t;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float v = r[i] + g[i];
        const float d = v >= t ? t : (v <= neg_t ? neg_t : 0.0f);
        r[i] = v - d;
        out[i] = accumulate ? out[i] + d : d;
    }
}

extern "C" __global__
void kvf_encode_decode_1bit(const float* __restrict__ g, float* __restrict__ r, float* __restrict__ out,
                            const long long n, const float t, const int accumulate) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const float v = r[i] + g[i];
        const bool bit = v > t;
        r[i] = bit ? v - 1.0f : v + 1.0f;
        const float d = bit ? 1.0f : -1.0f;
        out[i] = accumulate ? out[i] + d : d;
    }
}
"""
