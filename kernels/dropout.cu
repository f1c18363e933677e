// dropout.cu — dropout with a counter-based mask (cpu/dropout.rs, backend/philox.rs).
//
// keep[i] = uniform(seed, stream, i) ≥ p, out[i] = keep[i] ? x[i]·(1/(1−p)) : 0 (fp32, rounded to T).
// Element i is the flat index within the tensor; it uses word i % 4 of the Philox block i / 4
// (philox_uniform4 in common.cuh, the same function as philox.rs's uniform4), so the CPU reference
// and these kernels drop the same elements. Backward regenerates the mask from the same
// (seed, stream) instead of reading a stored one: dx[i] = keep[i] ? dout[i]·(1/(1−p)) : 0 —
// forward and backward are the same map. p ≤ 0 (or NaN) is no dropout: out = x, bit for bit.
// The scale is computed as the CPU does: 1.0f / (1.0f − p) in fp32.
// Layout: x, out (dout, dx) flat T [n]; out never aliases x.
// Only the fp32 instance (_f32) is compiled: the model keeps these tensors in fp32 under every
// precision (16 bits are for GEMM operands), so a 16-bit instance would be code no caller runs.
#include "common.cuh"

// Launch: block 256 (any), grid min(ceil(n / N / 256), 16·SMs) (any grid: grid-stride), where
// N = Pack<T>::N (4 fp32, 8 16-bit). No shared memory.
// When out and x are 16-byte aligned, each thread takes packs of N elements (N/4 Philox blocks, one
// 128-bit load and store); the tail — or, unaligned, the whole tensor — goes by Philox block: the
// (up to) 4 elements of one block per thread and iteration, element by element.
template <typename T>
__device__ __forceinline__ void dropout_apply(T* __restrict__ out, const T* __restrict__ x, unsigned long long n,
                                              float p, unsigned long long seed, unsigned long long stream) {
    constexpr int N = Pack<T>::N;
    constexpr int B = N / 4;  // Philox blocks per pack
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const bool vec = is_aligned16(out) && is_aligned16(x);
    const unsigned long long packs = vec ? n / N : 0;
    if (!(p > 0.0f)) {
        for (unsigned long long k = tid; k < packs; k += stride) st_pack(out + k * N, ld_pack(x + k * N));
        for (unsigned long long i = packs * N + tid; i < n; i += stride) out[i] = x[i];
        return;
    }
    const float scale = 1.0f / (1.0f - p);
    for (unsigned long long k = tid; k < packs; k += stride) {
        float v[N];
        ld_pack_f32(x + k * N, v);
#pragma unroll
        for (int q = 0; q < B; ++q) {
            float u[4];
            philox_uniform4(seed, stream, k * B + q, u);
#pragma unroll
            for (int j = 0; j < 4; ++j) v[4 * q + j] = u[j] >= p ? v[4 * q + j] * scale : 0.0f;
        }
        st_pack_f32(out + k * N, v);
    }
    // packs·N is a multiple of 4: the rest starts at a Philox block boundary.
    const unsigned long long blocks = (n + 3) / 4;
    for (unsigned long long b = packs * B + tid; b < blocks; b += stride) {
        float u[4];
        philox_uniform4(seed, stream, b, u);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned long long i = 4 * b + j;
            if (i < n) out[i] = from_f32<T>(u[j] >= p ? to_f32(x[i]) * scale : 0.0f);
        }
    }
}

#define DROPOUT_KERNELS(T, SUFFIX)                                                                                 \
    extern "C" __global__ void dropout_forward_##SUFFIX(T* __restrict__ out, const T* __restrict__ x,              \
                                                        unsigned long long n, float p, unsigned long long seed,    \
                                                        unsigned long long stream) {                               \
        dropout_apply(out, x, n, p, seed, stream);                                                                 \
    }                                                                                                              \
    extern "C" __global__ void dropout_backward_##SUFFIX(T* __restrict__ dx, const T* __restrict__ dout,           \
                                                         unsigned long long n, float p, unsigned long long seed,   \
                                                         unsigned long long stream) {                              \
        dropout_apply(dx, dout, n, p, seed, stream);                                                               \
    }

DROPOUT_KERNELS(float, f32)
