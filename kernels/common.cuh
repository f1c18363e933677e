// common.cuh — shared by every kernel in this folder.
//
// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind every dropout mask.
// It must draw exactly what src/backend/philox.rs draws, so that a CUDA kernel and the CPU
// reference drop the same elements:
//   element i of a dropout site uses word i % 4 of the block at counter
//   (lo(i/4), hi(i/4), lo(stream), hi(stream)) under key (lo(seed), hi(seed));
//   its uniform is (word >> 8) * 2^-24 in [0, 1); the element is kept when uniform >= p.
#pragma once

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#endif

struct philox_u32x4 { unsigned int x, y, z, w; };

__host__ __device__ __forceinline__ unsigned int philox_mulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}

__host__ __device__ __forceinline__ philox_u32x4 philox4x32_10(philox_u32x4 c, unsigned int k0, unsigned int k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        const unsigned int hi0 = philox_mulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned int hi1 = philox_mulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = philox_u32x4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    }
    return c;
}

// The four uniforms of block `block` (elements 4*block .. 4*block+3) of a dropout site.
__host__ __device__ __forceinline__ void philox_uniform4(unsigned long long seed, unsigned long long stream,
                                                         unsigned long long block, float u[4]) {
    const philox_u32x4 w = philox4x32_10(
        philox_u32x4{(unsigned int)block, (unsigned int)(block >> 32), (unsigned int)stream, (unsigned int)(stream >> 32)},
        (unsigned int)seed, (unsigned int)(seed >> 32));
    const float scale = 1.0f / 16777216.0f;
    u[0] = (float)(w.x >> 8) * scale;
    u[1] = (float)(w.y >> 8) * scale;
    u[2] = (float)(w.z >> 8) * scale;
    u[3] = (float)(w.w >> 8) * scale;
}

// ---- load/store and reductions ----
// Helpers of the element-wise, normalization, loss and optimizer kernels (embedding.cu,
// layernorm.cu, activation.cu, dropout.cu, gather.cu, loss.cu, optim.cu). Device code only:
// the Philox code above also compiles as host C++, this section only under NVRTC/nvcc.
//
// Storage types T ∈ {float, __half, __nv_bfloat16}; every computation is in fp32 (to_f32 on
// load, from_f32 with round-to-nearest-even on store). A Pack<T> is 16 bytes (4 floats or 8
// halves), moved with one 128-bit access: its address must be 16-byte aligned (is_aligned16),
// which kernels check at run time before taking a vectorized path.
// Reductions use __shfl_xor_sync butterflies: every lane gets the total, and the order of the
// additions depends only on the lane layout, so a result is deterministic for a given launch
// configuration. They need whole warps (blockDim.x a multiple of 32, all lanes present).
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// `v` rounded to the storage type T and back: the value a tensor of T holds after a store.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_f32(from_f32<T>(v)); }

__device__ __forceinline__ bool is_aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}

// 16 bytes of T: 4 floats or 8 halves / bfloat16s.
template <typename T> struct alignas(16) Pack {
    static constexpr int N = 16 / (int)sizeof(T);
    T v[N];
};

// One 128-bit load / store of a Pack; `p` must be 16-byte aligned.
template <typename T> __device__ __forceinline__ Pack<T> ld_pack(const T* p) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    Pack<T> r;
    memcpy(&r, &raw, 16);
    return r;
}
template <typename T> __device__ __forceinline__ void st_pack(T* p, const Pack<T>& x) {
    uint4 raw;
    memcpy(&raw, &x, 16);
    *reinterpret_cast<uint4*>(p) = raw;
}

// A Pack's N elements as floats, and N floats rounded into a Pack.
template <typename T> __device__ __forceinline__ void ld_pack_f32(const T* p, float (&f)[Pack<T>::N]) {
    const Pack<T> x = ld_pack(p);
#pragma unroll
    for (int j = 0; j < Pack<T>::N; ++j) f[j] = to_f32(x.v[j]);
}
template <typename T> __device__ __forceinline__ void st_pack_f32(T* p, const float (&f)[Pack<T>::N]) {
    Pack<T> x;
#pragma unroll
    for (int j = 0; j < Pack<T>::N; ++j) x.v[j] = from_f32<T>(f[j]);
    st_pack(p, x);
}

// N floats rounded to C and stored with one access of N·sizeof(C) bytes: 8 (4 halves or
// bfloat16s) or 16 (a Pack<C>); `p` aligned to that size.
template <typename C, int N> __device__ __forceinline__ void st_round(C* p, const float (&f)[N]) {
    static_assert(N * sizeof(C) == 8 || N * sizeof(C) == 16, "st_round stores 8 or 16 bytes");
    C v[N];
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = from_f32<C>(f[j]);
    if constexpr (N * sizeof(C) == 16) {
        uint4 raw;
        memcpy(&raw, v, 16);
        *reinterpret_cast<uint4*>(p) = raw;
    } else {
        uint2 raw;
        memcpy(&raw, v, 8);
        *reinterpret_cast<uint2*>(p) = raw;
    }
}

// N consecutive fp32 values (N a multiple of 4) with N/4 128-bit loads; `p` 16-byte aligned.
template <int N> __device__ __forceinline__ void ld_f32xN(const float* p, float (&f)[N]) {
    static_assert(N % 4 == 0, "ld_f32xN loads whole float4s");
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        const float4 q = *reinterpret_cast<const float4*>(p + j);
        f[j] = q.x; f[j + 1] = q.y; f[j + 2] = q.z; f[j + 3] = q.w;
    }
}
template <int N> __device__ __forceinline__ void st_f32xN(float* p, const float (&f)[N]) {
    static_assert(N % 4 == 0, "st_f32xN stores whole float4s");
#pragma unroll
    for (int j = 0; j < N; j += 4)
        *reinterpret_cast<float4*>(p + j) = make_float4(f[j], f[j + 1], f[j + 2], f[j + 3]);
}

// Sum / max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, blockDim.y == blockDim.z == 1); every thread
// gets the total. `scratch` is __shared__ float[32]; every thread of the block must call it (it
// has barriers), and it may be called again right away with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}
#endif  // __CUDACC__
