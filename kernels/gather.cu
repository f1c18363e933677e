// gather.cu — the first token of every sequence (BERT's [CLS], read by the pooler) (cpu/gather.rs).
//
// Forward:  out[b, c] = x[starts[b], c]                       (a copy, bit for bit)
// Backward: dx[starts[b], c] += dout[b, c]                    (adds into dx, in fp32, rounded to T;
//                                                              the caller zeroes dx first)
// Layout: x, dx T [rows, hidden]; out, dout T [batch, hidden]; starts u32 [batch] (SeqLayout's
// starts: distinct rows, so backward needs no atomics — duplicate starts would race).
// Only the fp32 instance (_f32) is compiled: the model keeps these tensors in fp32 under every
// precision (16 bits are for GEMM operands), so a 16-bit instance would be code no caller runs.
#include "common.cuh"

// Launch (both): block (B, 1, 1), grid (ceil(hidden / N / B), min(batch, 65535), 1), where
// N = Pack<T>::N (4 fp32, 8 16-bit) and B = min(256, hidden / N rounded up to 32); grid-stride in
// both dimensions, so any grid is correct. blockIdx.y walks the sequences, x the columns.
// 128-bit accesses when hidden % N == 0 and both tensors are 16-byte aligned; otherwise scalar.
template <typename T>
__device__ __forceinline__ void gather_first_tokens_impl(T* __restrict__ out, const T* __restrict__ x,
                                                         const unsigned int* __restrict__ starts, unsigned int batch,
                                                         unsigned int hidden) {
    constexpr int N = Pack<T>::N;
    const bool vec = hidden % N == 0 && is_aligned16(out) && is_aligned16(x);
    const unsigned int step = (vec ? N : 1) * gridDim.x * blockDim.x;
    const unsigned int c0 = (vec ? N : 1) * (blockIdx.x * blockDim.x + threadIdx.x);
    for (unsigned int b = blockIdx.y; b < batch; b += gridDim.y) {
        const T* __restrict__ src = x + (unsigned long long)starts[b] * hidden;
        T* __restrict__ dst = out + (unsigned long long)b * hidden;
        if (vec) {
            for (unsigned int c = c0; c < hidden; c += step) st_pack(dst + c, ld_pack(src + c));
        } else {
            for (unsigned int c = c0; c < hidden; c += step) dst[c] = src[c];
        }
    }
}

template <typename T>
__device__ __forceinline__ void scatter_first_tokens_backward_impl(T* __restrict__ dx, const T* __restrict__ dout,
                                                                   const unsigned int* __restrict__ starts,
                                                                   unsigned int batch, unsigned int hidden) {
    constexpr int N = Pack<T>::N;
    const bool vec = hidden % N == 0 && is_aligned16(dx) && is_aligned16(dout);
    const unsigned int step = (vec ? N : 1) * gridDim.x * blockDim.x;
    const unsigned int c0 = (vec ? N : 1) * (blockIdx.x * blockDim.x + threadIdx.x);
    for (unsigned int b = blockIdx.y; b < batch; b += gridDim.y) {
        T* __restrict__ dst = dx + (unsigned long long)starts[b] * hidden;
        const T* __restrict__ src = dout + (unsigned long long)b * hidden;
        if (vec) {
            for (unsigned int c = c0; c < hidden; c += step) {
                float d[N], g[N];
                ld_pack_f32(dst + c, d);
                ld_pack_f32(src + c, g);
#pragma unroll
                for (int j = 0; j < N; ++j) d[j] += g[j];
                st_pack_f32(dst + c, d);
            }
        } else {
            for (unsigned int c = c0; c < hidden; c += step) dst[c] = from_f32<T>(to_f32(dst[c]) + to_f32(src[c]));
        }
    }
}

#define GATHER_KERNELS(T, SUFFIX)                                                                                  \
    extern "C" __global__ void gather_first_tokens_##SUFFIX(T* __restrict__ out, const T* __restrict__ x,          \
                                                            const unsigned int* __restrict__ starts,               \
                                                            unsigned int batch, unsigned int hidden) {             \
        gather_first_tokens_impl(out, x, starts, batch, hidden);                                                   \
    }                                                                                                              \
    extern "C" __global__ void scatter_first_tokens_backward_##SUFFIX(                                             \
        T* __restrict__ dx, const T* __restrict__ dout, const unsigned int* __restrict__ starts, unsigned int batch, \
        unsigned int hidden) {                                                                                     \
        scatter_first_tokens_backward_impl(dx, dout, starts, batch, hidden);                                       \
    }

GATHER_KERNELS(float, f32)
