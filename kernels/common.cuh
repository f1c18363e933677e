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
