// layernorm.cu — LayerNorm over the last dimension, optionally fused with the dropout and the
// residual add before it (cpu/layernorm.rs): BERT's LayerNorm(dropout(dense(h)) + h).
//
// Forward (per row of `cols`):
//   s = x, or s = dropout(x) + residual — with a residual, dropout(x) is rounded to T (as
//                                   dropout.cu stores it), s is rounded to T and stored in `sum`,
//                                   and the statistics are taken of the stored (rounded) s, so that
//                                   backward, which reads `sum`, sees exactly the normalized values;
//   mean = Σs/cols, var = Σ(s − mean)²/cols (biased, two passes over the row, as PyTorch),
//   rstd = 1/√(var + eps), out = (s − mean)·rstd·gamma + beta; mean, rstd kept (fp32, [rows]);
//   out_copy (when non-null) = out as stored, rounded to C: the 16-bit copy the dense layers'
//                                   GEMMs read (forward and their weight gradients), written
//                                   beside the fp32 out the next residual add reads, so that
//                                   no GEMM has to cast it (layernorm_forward_f32_{f16,bf16}).
// Backward, with ŝ = (s − mean)·rstd and g = dout·gamma:
//   ds = rstd·(g − mean(g) − ŝ·mean(g·ŝ))   (overwrites dx; for a fused residual it is the
//                                             gradient of the residual),
//   dbranch = dropout_backward(ds)          (when dbranch is non-null: the gradient of the
//                                             dropped-out x of a fused residual add; ds as
//                                             stored in dx, i.e. rounded to T),
//   dgamma += Σ_rows dout·ŝ, dbeta += Σ_rows dout.
// Dropout: element i = row·cols + c (the flat index) draws what dropout.cu draws for element i
// (word i % 4 of Philox block i / 4 of the site (seed, stream)); kept iff uniform ≥ p, scale
// 1/(1 − p) in fp32. p ≤ 0 (or NaN) is no dropout: no Philox draws, values pass unchanged.
// Layout: x, residual, sum, out, dout, dx, dbranch are T [rows, cols] row-major, out_copy C [rows, cols];
// gamma, beta, dgamma, dbeta fp32 [cols] (master weights and their gradients); mean, rstd fp32 [rows].
// All statistics and accumulations are fp32 (the CPU reference uses f64).
//
// dgamma/dbeta reduction: deterministic, in two stages, no atomics.
//   1. layernorm_backward_<T>: each warp accumulates Σ dout·ŝ and Σ dout of its rows, per column, in
//      its own slice of shared memory; at the end the block adds its warps' slices in warp order and
//      writes one partial per block: partials[blockIdx.x][0][c] (dgamma), [1][c] (dbeta).
//   2. layernorm_backward_reduce: adds the gridDim.x partials of stage 1 in a fixed order and adds
//      the result into dgamma/dbeta (+=).
// The result is bit-identical from run to run for the same launch configuration (grid, block)
// and the same pointer alignment (16-byte aligned tensors take the vector path, whose summation
// order differs from the scalar path's).
#include "common.cuh"

// v[0..4B) = keep ? v·scale : 0 (rounded to T) for the 4B elements from flat index `first`, a
// multiple of 4: B whole Philox blocks. Only called with p > 0. The product is __fmul_rn so that
// it is never contracted with the residual add that follows into an FMA (one rounding instead of
// the two that dropout.cu followed by the add make).
template <typename T, int B>
__device__ __forceinline__ void ln_dropout_blocks(float* v, unsigned long long first, float p, float scale,
                                                  unsigned long long seed, unsigned long long stream) {
#pragma unroll
    for (int q = 0; q < B; ++q) {
        float u[4];
        philox_uniform4(seed, stream, first / 4 + q, u);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[4 * q + j] = u[j] >= p ? round_to<T>(__fmul_rn(v[4 * q + j], scale)) : 0.0f;
    }
}

// The dropout factor of the single element i (p > 0): the scalar paths' form of the above.
__device__ __forceinline__ float ln_dropout_one(float v, unsigned long long i, float p, float scale,
                                                unsigned long long seed, unsigned long long stream) {
    float u[4];
    philox_uniform4(seed, stream, i / 4, u);
    return u[i % 4] >= p ? __fmul_rn(v, scale) : 0.0f;
}

// ---- forward ----
// Launch: one warp per row. block (256, 1, 1) (any multiple of 32, ≤ 1024), grid
// (ceil(rows / (blockDim.x/32)), 1, 1); grid-stride over rows, so any grid is correct. No shared
// memory. `residual` and `sum` are both null (plain LayerNorm of x; p is then ignored) or both
// non-null (s = dropout(x) + residual, written to sum).
// `out_copy` null: no copy.
// Fast path: cols % N == 0 (N = Pack<T>::N = 4 for fp32), cols ≤ 1024, all tensors 16-byte
// aligned: the row is loaded once with 128-bit accesses and kept in registers (≤ 32 floats per
// lane); out_copy is written N elements at a time (8 bytes of 16-bit values, st_round) when so aligned,
// else element by element. Otherwise a scalar path reads the row three times (L1/L2 hits after
// the first). out_copy's alignment never picks the path: the copy is out rounded either way.
template <typename T, typename C>
__device__ __forceinline__ void layernorm_forward_impl(T* __restrict__ out, C* __restrict__ out_copy,
                                                       float* __restrict__ mean,
                                                       float* __restrict__ rstd, const T* __restrict__ x,
                                                       const T* __restrict__ residual, T* __restrict__ sum,
                                                       const float* __restrict__ gamma,
                                                       const float* __restrict__ beta, unsigned int rows,
                                                       unsigned int cols, float eps, float p,
                                                       unsigned long long seed, unsigned long long stream) {
    constexpr int N = Pack<T>::N;
    constexpr int KP = 32 / N;  // packs cached per lane
    const unsigned int lane = threadIdx.x & 31u, warps = blockDim.x >> 5;
    const bool res = residual != nullptr;
    const bool drop = res && p > 0.0f;
    const float scale = 1.0f / (1.0f - p);
    const bool copy = out_copy != nullptr;
    // The copy's alignment does not choose the path (so out, mean, rstd never depend on it): an
    // out_copy not aligned to its N-element store is written element by element.
    const bool copy_vec = copy && ((unsigned long long)out_copy % (N * sizeof(C))) == 0;
    const bool vec = cols % N == 0 && cols <= 32u * KP * N && is_aligned16(out) && is_aligned16(x) &&
                     is_aligned16(gamma) && is_aligned16(beta) &&
                     (!res || (is_aligned16(residual) && is_aligned16(sum)));
    const float fcols = (float)cols;
    for (unsigned int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
        const unsigned long long base = (unsigned long long)row * cols;
        float mu, rs;
        if (vec) {
            float v[KP][N];
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < KP; ++k) {
                const unsigned int c = (lane + 32u * k) * N;
#pragma unroll
                for (int j = 0; j < N; ++j) v[k][j] = 0.0f;
                if (c < cols) {
                    ld_pack_f32(x + base + c, v[k]);
                    // base + c is a multiple of N, hence of 4: whole Philox blocks.
                    if (drop) ln_dropout_blocks<T, N / 4>(v[k], base + c, p, scale, seed, stream);
                    if (res) {
                        float b[N];
                        ld_pack_f32(residual + base + c, b);
#pragma unroll
                        for (int j = 0; j < N; ++j) v[k][j] = round_to<T>(v[k][j] + b[j]);
                        st_pack_f32(sum + base + c, v[k]);
                    }
#pragma unroll
                    for (int j = 0; j < N; ++j) s += v[k][j];
                }
            }
            mu = warp_sum(s) / fcols;
            float q = 0.0f;
#pragma unroll
            for (int k = 0; k < KP; ++k) {
                const unsigned int c = (lane + 32u * k) * N;
                if (c < cols) {
#pragma unroll
                    for (int j = 0; j < N; ++j) {
                        const float d = v[k][j] - mu;
                        q += d * d;
                    }
                }
            }
            rs = 1.0f / sqrtf(warp_sum(q) / fcols + eps);
#pragma unroll
            for (int k = 0; k < KP; ++k) {
                const unsigned int c = (lane + 32u * k) * N;
                if (c < cols) {
                    float g[N], b[N], o[N];
                    ld_f32xN(gamma + c, g);
                    ld_f32xN(beta + c, b);
#pragma unroll
                    for (int j = 0; j < N; ++j) o[j] = round_to<T>((v[k][j] - mu) * rs * g[j] + b[j]);
                    st_pack_f32(out + base + c, o);
                    if (copy_vec) {
                        st_round<C, N>(out_copy + base + c, o);
                    } else if (copy) {
#pragma unroll
                        for (int j = 0; j < N; ++j) out_copy[base + c + j] = from_f32<C>(o[j]);
                    }
                }
            }
        } else {
            // Pass 1 (and the residual add), pass 2 (variance), pass 3 (output); each lane always
            // touches the same columns, so it re-reads only what it wrote itself into `sum`.
            float s = 0.0f;
            for (unsigned int c = lane; c < cols; c += 32u) {
                float v = to_f32(x[base + c]);
                if (drop) v = round_to<T>(ln_dropout_one(v, base + c, p, scale, seed, stream));
                if (res) {
                    v = round_to<T>(v + to_f32(residual[base + c]));
                    sum[base + c] = from_f32<T>(v);
                }
                s += v;
            }
            mu = warp_sum(s) / fcols;
            const T* src = res ? (const T*)sum : x;
            float q = 0.0f;
            for (unsigned int c = lane; c < cols; c += 32u) {
                const float d = to_f32(src[base + c]) - mu;
                q += d * d;
            }
            rs = 1.0f / sqrtf(warp_sum(q) / fcols + eps);
            for (unsigned int c = lane; c < cols; c += 32u) {
                const float o = round_to<T>((to_f32(src[base + c]) - mu) * rs * gamma[c] + beta[c]);
                out[base + c] = from_f32<T>(o);
                if (copy) out_copy[base + c] = from_f32<C>(o);
            }
        }
        if (lane == 0) {
            mean[row] = mu;
            rstd[row] = rs;
        }
    }
}

// ---- backward, stage 1 ----
// Launch: one warp per row. block (128, 1, 1) (any multiple of 32, ≤ 1024), grid (P, 1, 1) with
// P ≈ 2–4 × SMs (at most ceil(rows / warps)); grid-stride over rows, so any grid is correct.
// Dynamic shared memory: (blockDim.x/32)·2·cols·4 bytes (24 KiB for 4 warps, cols 768; above
// 48 KiB the launcher must raise cudaFuncAttributeMaxDynamicSharedMemorySize).
// `partials`: fp32 scratch [gridDim.x][2][cols], fully overwritten (blocks without rows write 0);
// pass it with P to layernorm_backward_reduce.
// `dbranch` null: no branch gradient (p, seed, stream ignored).
// Vector path when cols % N == 0 and dx, dout, x, gamma (and dbranch) are 16-byte aligned;
// otherwise scalar.
template <typename T>
__device__ __forceinline__ void layernorm_backward_impl(T* __restrict__ dx, T* __restrict__ dbranch,
                                                        float* __restrict__ partials,
                                                        const T* __restrict__ dout, const T* __restrict__ x,
                                                        const float* __restrict__ mean,
                                                        const float* __restrict__ rstd,
                                                        const float* __restrict__ gamma, unsigned int rows,
                                                        unsigned int cols, float p, unsigned long long seed,
                                                        unsigned long long stream) {
    constexpr int N = Pack<T>::N;
    extern __shared__ float4 ln_smem4[];  // float4: 16-byte aligned
    float* smem = reinterpret_cast<float*>(ln_smem4);
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float* dg = smem + (unsigned long long)warp * 2u * cols;  // this warp's Σ dout·ŝ per column
    float* db = dg + cols;                                     // this warp's Σ dout per column
    for (unsigned int c = lane; c < 2u * cols; c += 32u) dg[c] = 0.0f;
    __syncwarp();  // the loop below gives the columns to other lanes
    // With cols % N == 0 (N ≥ 4) every slice offset is a multiple of 16 bytes.
    const bool branch = dbranch != nullptr, drop = branch && p > 0.0f;
    const float scale = 1.0f / (1.0f - p);
    const bool vec = cols % N == 0 && is_aligned16(dx) && is_aligned16(dout) && is_aligned16(x) &&
                     is_aligned16(gamma) && (!branch || is_aligned16(dbranch));
    const float fcols = (float)cols;
    for (unsigned int row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
        const unsigned long long base = (unsigned long long)row * cols;
        const float mu = mean[row], rs = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        if (vec) {
            for (unsigned int c = lane * N; c < cols; c += 32u * N) {
                float dy[N], xv[N], gm[N];
                ld_pack_f32(dout + base + c, dy);
                ld_pack_f32(x + base + c, xv);
                ld_f32xN(gamma + c, gm);
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const float g = dy[j] * gm[j];
                    sg += g;
                    sgx += g * ((xv[j] - mu) * rs);
                }
            }
        } else {
            for (unsigned int c = lane; c < cols; c += 32u) {
                const float g = to_f32(dout[base + c]) * gamma[c];
                sg += g;
                sgx += g * ((to_f32(x[base + c]) - mu) * rs);
            }
        }
        const float mean_g = warp_sum(sg) / fcols, mean_gx = warp_sum(sgx) / fcols;
        if (vec) {
            for (unsigned int c = lane * N; c < cols; c += 32u * N) {
                float dy[N], xv[N], gm[N], d[N], ag[N], ab[N];
                ld_pack_f32(dout + base + c, dy);
                ld_pack_f32(x + base + c, xv);
                ld_f32xN(gamma + c, gm);
                ld_f32xN(dg + c, ag);
                ld_f32xN(db + c, ab);
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    const float xhat = (xv[j] - mu) * rs;
                    d[j] = rs * (dy[j] * gm[j] - mean_g - xhat * mean_gx);
                    ag[j] += dy[j] * xhat;
                    ab[j] += dy[j];
                }
                st_pack_f32(dx + base + c, d);
                st_f32xN(dg + c, ag);
                st_f32xN(db + c, ab);
                if (branch) {
                    // From ds as stored in dx (rounded to T), as dropout_backward would read it.
#pragma unroll
                    for (int j = 0; j < N; ++j) d[j] = round_to<T>(d[j]);
                    if (drop) ln_dropout_blocks<T, N / 4>(d, base + c, p, scale, seed, stream);
                    st_pack_f32(dbranch + base + c, d);
                }
            }
        } else {
            for (unsigned int c = lane; c < cols; c += 32u) {
                const float dy = to_f32(dout[base + c]);
                const float xhat = (to_f32(x[base + c]) - mu) * rs;
                const float d = round_to<T>(rs * (dy * gamma[c] - mean_g - xhat * mean_gx));
                dx[base + c] = from_f32<T>(d);
                if (branch) dbranch[base + c] = from_f32<T>(drop ? ln_dropout_one(d, base + c, p, scale, seed, stream) : d);
                dg[c] += dy * xhat;
                db[c] += dy;
            }
        }
    }
    __syncthreads();
    // The block's partial: its warps' slices added in warp order.
    float* part = partials + (unsigned long long)blockIdx.x * 2u * cols;
    for (unsigned int c = threadIdx.x; c < 2u * cols; c += blockDim.x) {
        float s = 0.0f;
        for (unsigned int w = 0; w < warps; ++w) s += smem[(unsigned long long)w * 2u * cols + c];
        part[c] = s;
    }
}

// C: out_copy's type (the instance with C = T is launched with out_copy null). Only T = float is
// compiled: the residual stream and the gradients are fp32 under every precision, and the one
// 16-bit tensor is the copy.
#define LAYERNORM_FORWARD(T, C, SUFFIX)                                                                           \
    extern "C" __global__ void layernorm_forward_##SUFFIX(                                                         \
        T* __restrict__ out, C* __restrict__ out_copy, float* __restrict__ mean, float* __restrict__ rstd,         \
        const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ sum,                             \
        const float* __restrict__ gamma, const float* __restrict__ beta, unsigned int rows, unsigned int cols,     \
        float eps, float p, unsigned long long seed, unsigned long long stream) {                                  \
        layernorm_forward_impl<T, C>(out, out_copy, mean, rstd, x, residual, sum, gamma, beta, rows, cols, eps, p, \
                                     seed, stream);                                                                \
    }

#define LAYERNORM_BACKWARD(T, SUFFIX)                                                                              \
    extern "C" __global__ void layernorm_backward_##SUFFIX(                                                        \
        T* __restrict__ dx, T* __restrict__ dbranch, float* __restrict__ partials, const T* __restrict__ dout,     \
        const T* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,                   \
        const float* __restrict__ gamma, unsigned int rows, unsigned int cols, float p, unsigned long long seed,   \
        unsigned long long stream) {                                                                               \
        layernorm_backward_impl<T>(dx, dbranch, partials, dout, x, mean, rstd, gamma, rows, cols, p, seed,         \
                                   stream);                                                                        \
    }

LAYERNORM_FORWARD(float, float, f32)
LAYERNORM_FORWARD(float, __half, f32_f16)
LAYERNORM_FORWARD(float, __nv_bfloat16, f32_bf16)
LAYERNORM_BACKWARD(float, f32)

// ---- backward, stage 2 ----
// dgamma[c] += Σ_p partials[p][0][c], dbeta[c] += Σ_p partials[p][1][c], p = 0 .. parts−1.
// Launch: block (32, 32, 1) (blockDim.x must be 32, blockDim.y ≤ 32), grid (ceil(2·cols / 32), 1, 1);
// grid-stride over 32-column tiles, so any grid is correct. Static shared memory 32·33·4 bytes.
// Thread (x, y) adds parts y, y + blockDim.y, … of column tile·32 + x in order; then thread (x, 0)
// adds the blockDim.y sums in y order: a fixed order, deterministic.
extern "C" __global__ void layernorm_backward_reduce(float* __restrict__ dgamma, float* __restrict__ dbeta,
                                                     const float* __restrict__ partials, unsigned int parts,
                                                     unsigned int cols) {
    __shared__ float tile[32][33];
    const unsigned int width = 2u * cols;
    for (unsigned int c0 = blockIdx.x * 32u; c0 < width; c0 += gridDim.x * 32u) {
        const unsigned int c = c0 + threadIdx.x;
        float s = 0.0f;
        if (c < width)
            for (unsigned int p = threadIdx.y; p < parts; p += blockDim.y)
                s += partials[(unsigned long long)p * width + c];
        tile[threadIdx.y][threadIdx.x] = s;
        __syncthreads();
        if (threadIdx.y == 0 && c < width) {
            float t = 0.0f;
            for (unsigned int y = 0; y < blockDim.y; ++y) t += tile[y][threadIdx.x];
            if (c < cols)
                dgamma[c] += t;
            else
                dbeta[c - cols] += t;
        }
        __syncthreads();
    }
}
