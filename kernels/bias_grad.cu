// bias_grad.cu — a dense layer's bias gradient, dbias[c] += Σ_r dout[r][c], in the same pass as
// the cast of dout into the 16-bit copy its two GEMMs read (dx = dout·w, dw = doutᵀ·x), so that
// dout is read once instead of twice (a cast, then a ones-vector GEMV). The CPU reference is the
// dbias of linear_backward (src/backend/cpu/matmul.rs); the sum order differs (fp32 noise).
//
// Layout: dout fp32 [rows, cols] row-major; copy [rows, cols] row-major in `format` (0: none,
//   copy null; 1: fp16; 2: bf16), rounded as cast.cu rounds (__float2half_rn,
//   __float2bfloat16_rn); partials fp32 [parts][cols] scratch; dbias fp32 [cols].
//
// Deterministic, no atomics, two stages:
// 1. bias_grad_partial: block (32, 8, 1), grid (ceil(cols/32), parts, 1) with parts ≤ 65535.
//    Thread (x, y) of block (bx, by) owns column c = 32·bx + x and the rows
//    r = 8·by + y + k·8·parts (k = 0, 1, …), summed in k order (a warp reads 32 consecutive
//    columns of one row: coalesced); it writes copy[r][c] on the way. The block's 8 row lanes are
//    then added in y order (static shared memory 8·32·4 bytes) into partials[by][c], which every
//    block writes for its columns (0 where it had no rows), so the scratch needs no clearing.
// 2. bias_grad_reduce: block 256, grid ceil(cols/256): dbias[c] += Σ_p partials[p][c] in p order.
// The host picks parts from the GPU's SM count (about four blocks per SM: parts =
// ceil(4·SMs / ceil(cols/32)), at most ceil(rows/8); bias_grad_and_operand in
// src/backend/cuda/backend.rs), and parts fixes how the rows are split and summed. So dbias is
// bitwise reproducible run to run on one GPU model (the same SM count), but its bits may differ
// between models with different SM counts (fp32 summation-order noise).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

extern "C" __global__ void bias_grad_partial(float* __restrict__ partials, void* __restrict__ copy,
                                             int format, const float* __restrict__ dout, unsigned int rows,
                                             unsigned int cols) {
    __shared__ float lanes[8][32];
    const unsigned int c = blockIdx.x * 32u + threadIdx.x;
    const unsigned int step = 8u * gridDim.y;
    float s = 0.0f;
    if (c < cols) {
        for (unsigned int r = blockIdx.y * 8u + threadIdx.y; r < rows; r += step) {
            const unsigned long long i = (unsigned long long)r * cols + c;
            const float v = dout[i];
            s += v;
            if (format == 1)
                static_cast<__half*>(copy)[i] = __float2half_rn(v);
            else if (format == 2)
                static_cast<__nv_bfloat16*>(copy)[i] = __float2bfloat16_rn(v);
        }
    }
    lanes[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t = 0.0f;
#pragma unroll
        for (int y = 0; y < 8; ++y) t += lanes[y][threadIdx.x];
        partials[(unsigned long long)blockIdx.y * cols + c] = t;
    }
}

extern "C" __global__ void bias_grad_reduce(float* __restrict__ dbias, const float* __restrict__ partials,
                                            unsigned int parts, unsigned int cols) {
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float t = 0.0f;
    for (unsigned int p = 0; p < parts; ++p) t += partials[(unsigned long long)p * cols + c];
    dbias[c] += t;
}
