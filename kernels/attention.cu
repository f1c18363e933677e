// attention.cu — multi-head self-attention with the padding mask and attention dropout,
// flash-style: forward keeps only the log-sum-exp of each softmax row, backward recomputes the
// probabilities. The CPU reference is src/backend/cpu/attention.rs; this file computes the same
// function (up to fp32 rounding order) with fp32 storage and fp32 math everywhere (scores, softmax
// statistics, accumulators, lse, D). The templates take the storage type T, but only T = float is
// instantiated: 16-bit attention is attention_tc.cu's (head dims 32 and 64), and the one 16-bit
// input here is the stored o read by the delta_out kernels.
//
// ---- Layout (H = heads·d) ----------------------------------------------------------------------
//   qkv  [rows, 3, heads, d]  T      q(r, h) = qkv + r·3H + h·d, k(r, h) = q + H, v(r, h) = q + 2H
//   out  [rows, heads, d]     T      (= [rows, H]); dout the same
//   lse  [rows, heads]        fp32   natural-log log-sum-exp of each softmax row
//   D    [rows, heads]        fp32   backward scratch: D = rowsum(dO·o) (the launcher allocates it)
//   dqkv [rows, 3, heads, d]  T      overwritten: q, k and v slots of every row of every sequence
//   starts, rows, valid [batch] (const unsigned int*): sequence b is rows starts[b] .. starts[b] +
//   rows[b]; keys are its first valid[b] rows (1 ≤ valid ≤ rows ≤ 65535); padding rows are queries
//   like any other. Positions i (query) and j (key) below are relative to starts[b].
//
// ---- Math, for head h of sequence b, query i < rows, key j < valid, scale = 1/√d ---------------
// Forward:   s_ij = scale·q_i·k_j,  lse_i = log Σ_j e^(s_ij),  p_ij = e^(s_ij − lse_i),
//            o_i = Σ_j p_ij·m_ij·v_j,   m_ij = keep_ij/(1−p)  (m = 1 without dropout).
// Backward:  D_i = dO_i·o_i  (= Σ_j p_ij·m_ij·(dO_i·v_j)),  dp_ij = dO_i·v_j,
//            dv_j = Σ_i p_ij·m_ij·dO_i,   ds_ij = p_ij·(m_ij·dp_ij − D_i),
//            dq_i = scale·Σ_j ds_ij·k_j,  dk_j = scale·Σ_i ds_ij·q_i  (i over all rows, padding too);
//            padding keys (valid ≤ j < rows) get dk = dv = 0 exactly.
// Dropout:   element (b, h, i, j) is Philox element ((b·heads + h)·2¹⁶ + i)·2¹⁶ + j of the site
//            (seed, stream) — see common.cuh: block = element/4, word = element%4, uniform =
//            (word >> 8)·2⁻²⁴, kept iff uniform ≥ p. p ≤ 0: no dropout (no Philox draws).
//            p ≥ 1: everything dropped (out = 0), as the reference computes it.
// Scores are kept in log2 units internally (q or k pre-multiplied by scale·log2(e), exp2f), and
// lse is converted back to natural log on output, so lse matches the CPU reference's.
//
// ---- Work decomposition (block of exactly 128 threads = 4 warps, except delta) -----------------
// A "row group" is G consecutive lanes that own one row (a query in forward/dq, a key in dkdv);
// lane g of a group owns the float4 column groups c = 4·(g + G·t) .. +3, t < NT, so a row of
// up to DMAX = 4·G·NT columns lives in registers (fp32), and a dot product is a partial sum per
// lane followed by a log2(G)-step xor-shuffle all-reduce inside the group (bitwise identical in
// every lane of the group, since each step adds a commutative pair). A block owns ROWS = 128/G
// rows and streams the other side of the attention matrix through shared memory (fp32) in tiles
// of TILE rows, processed in chunks of CHUNK = 4·G rows. Per chunk each lane draws exactly one
// Philox block (4 words) and the warp shares the keep bits through 4 __ballot_sync: in forward/dq,
// lane (group r, g) draws (its query, keys chunk+4g..+3); in dkdv, lane L draws (query chunk +
// L/(8/G), keys warp_key0 + 4·(L%(8/G)) ..+3) — 32 lanes × 4 words = the warp's rows × CHUNK.
//
//   variant   d        G  NT  DMAX  ROWS  TILE  CHUNK  static shared memory (fwd, dq / dkdv)
//   _d32      32       2   4   32    64    64     8    16384 B / 16896 B
//   _d64      64       4   4   64    32    64    16    32768 B / 33280 B
//   _generic  1..128   8   4  128    16    32    32    32768 B / 33024 B   (row stride round4(d))
// _d32/_d64 need head_dim = 32/64; _generic takes any 1 ≤ d ≤ 128 (the launcher picks _d32/_d64
// for those d and _generic otherwise, and rejects d > 128). A kernel given a head_dim its variant
// does not handle, a sequence over 65535 rows or valid > rows executes __trap() (the launch fails,
// sticky on the context) rather than compute garbage. No dynamic shared memory, no attributes.
// ptxas (NVRTC 13.0, the cu13 pip wheel; `bertft-cuda doctor --arch sm_XX --resources`): 87–168
// registers per thread; small spills: on sm_90 an 8-byte stack frame in dq_d64 and dq_generic;
// on sm_80 8 bytes in dq_d64 and forward_generic, 16 in dkdv_generic (other NVRTC versions spill
// differently); the delta kernels 26–31
// registers. The other attention kernels, and every kernel of the other files, have no stack
// frame (tests/doctor.rs checks the other files).
//
// ---- Kernels and launch configurations (S = max_b rows[b], B = batch) --------------------------
// Parameter types: T* out / dqkv; float* lse (forward) / delta (delta kernel); const T* qkv, dout,
// out; const float* lse, delta (dq, dkdv); const unsigned* starts, rows, valid; unsigned heads,
// head_dim, total_rows; float p (dropout probability); unsigned long long seed, stream.
// attention_forward_<T>_<v>(out, lse, qkv, starts, rows, valid, heads, head_dim, p, seed, stream)
//     grid (ceil(S/ROWS), heads, B), block 128. Online softmax over key tiles (running max m and
//     sum l per query; o rescaled by e^(m_old − m_new) per chunk); writes out and lse of every
//     query i < rows[b]; blocks past rows[b] exit. (valid = 0 would give out = 0, lse = −∞.)
// attention_backward_delta_<T>(delta, dout, out, total_rows, heads, head_dim)
//     grid ceil(total_rows·heads/8), block 256 (any multiple of 32 up to 256 works: one warp per
//     (row, head), grid = ceil(total_rows·heads / warps per block)), any d. delta[r·heads + h] =
//     dO·o in fp32 for every row r < total_rows (rows outside sequences included, harmless).
//     attention_backward_delta_out_<f16|bf16>: dout fp32, out 16-bit (attention_tc.cu's stored O).
// attention_backward_dq_<T>_<v>(dqkv, dout, qkv, lse, delta, starts, rows, valid, heads,
//                               head_dim, p, seed, stream)
//     grid (ceil(S/ROWS), heads, B), block 128: query row groups, loop over key tiles of K and V;
//     writes the q slots of dqkv for i < rows[b].
// attention_backward_dkdv_<T>_<v>(same parameters as _dq)
//     grid (ceil(S/ROWS), heads, B), block 128: key row groups, loop over all query tiles (Q, dO,
//     lse, D in shared memory); writes the k and v slots of dqkv for j < rows[b] (zeros for
//     j ≥ valid[b]).
// <T> = f32, <v> ∈ {d32, d64, generic}. Backward = delta, then dq and dkdv in any
// order (they write disjoint slots of dqkv and read only inputs and delta).
//
// Backward strategy: deterministic two-kernel split (dq over query tiles, dk/dv over key tiles),
// no atomics and no fp32 dQ buffer: every output element is one thread's fixed-order sum, so
// gradients are bitwise reproducible run to run (resume-from-checkpoint draws the same bits). The
// cost is recomputing s and dp once more (7 row-sized passes per (i, j) instead of 5), acceptable
// for CUDA-core math where attention is a small share of a BERT step.
// Every row of dqkv belongs to one sequence: the launchers refuse layouts whose sequences do not
// lie back to back from row 0 (a row in a gap would not be written, rows in two sequences would
// be written by two blocks). Sequences are limited to 65535 rows (16-bit Philox positions), the
// batch to 65535 sequences and heads to 65535 (grid y/z).

#include "common.cuh"
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace attn {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int THREADS = 128;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

typedef unsigned long long u64;

// −∞ (NVRTC has no <cmath>/INFINITY).
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

// to_f32 / from_f32<T> (fp32 math, round-to-nearest-even stores) come from common.cuh.

// Tiling of one variant (see the table in the header).
template <int G_, int NT_, int TILE_, bool FIXED_>
struct Cfg {
    static constexpr int G = G_;                 // lanes per row group (2, 4 or 8)
    static constexpr int NT = NT_;               // float4 column groups per lane
    static constexpr int DMAX = 4 * G_ * NT_;    // widest row the registers hold
    static constexpr int ROWS = THREADS / G_;    // rows owned by one block
    static constexpr int TILE = TILE_;           // streamed rows per shared-memory tile
    static constexpr int CHUNK = 4 * G_;         // streamed rows per chunk (one Philox block per lane)
    static constexpr int NKB = 8 / G_;           // dkdv: 4-key Philox blocks per warp (32/G keys)
    static constexpr bool FIXED = FIXED_;        // d == DMAX at compile time
    static_assert(G_ == 2 || G_ == 4 || G_ == 8, "row groups of 2, 4 or 8 lanes");
    static_assert(TILE_ % (4 * G_) == 0, "a tile is whole chunks");
};
typedef Cfg<2, 4, 64, true> CfgD32;
typedef Cfg<4, 4, 64, true> CfgD64;
typedef Cfg<8, 4, 32, false> CfgGeneric;

// ---- row vectors in registers: lane g owns columns 4·(g + G·t) + e ----

template <class C> __device__ __forceinline__ int col0(int g, int t) { return 4 * (g + C::G * t); }

// Whether lane g owns column group t at all (dp = row stride, a multiple of 4).
template <class C> __device__ __forceinline__ bool owns(int g, int t, int dp) {
    return C::FIXED || col0<C>(g, t) < dp;
}

template <class C> __device__ __forceinline__ void zero_row(float (&a)[C::NT][4]) {
#pragma unroll
    for (int t = 0; t < C::NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) a[t][e] = 0.f;
}

// a = mul·src[c] for the lane's columns c < d (0 elsewhere, and everywhere when !live).
template <typename T, class C>
__device__ __forceinline__ void load_row(float (&a)[C::NT][4], const T* __restrict__ src, int g, int d,
                                         bool live, float mul) {
#pragma unroll
    for (int t = 0; t < C::NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = col0<C>(g, t) + e;
            float x = 0.f;
            if (live && c < d) x = to_f32(src[c]) * mul;
            a[t][e] = x;
        }
}

// dst[c] = mul·a for the lane's columns c < d (nothing when !live).
template <typename T, class C>
__device__ __forceinline__ void store_row(T* __restrict__ dst, const float (&a)[C::NT][4], int g, int d,
                                          bool live, float mul) {
    if (!live) return;
#pragma unroll
    for (int t = 0; t < C::NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = col0<C>(g, t) + e;
            if (c < d) dst[c] = from_f32<T>(a[t][e] * mul);
        }
}

// a = the lane's columns of a shared-memory row (16-byte aligned, zero-padded to dp).
template <class C>
__device__ __forceinline__ void smem_row(float (&a)[C::NT][4], const float* row, int g, int dp) {
#pragma unroll
    for (int t = 0; t < C::NT; ++t) {
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (owns<C>(g, t, dp)) x = *reinterpret_cast<const float4*>(row + col0<C>(g, t));
        a[t][0] = x.x;
        a[t][1] = x.y;
        a[t][2] = x.z;
        a[t][3] = x.w;
    }
}

// The lane's share of a·b (columns it does not own are 0 in both).
template <class C> __device__ __forceinline__ float dot_part(const float (&a)[C::NT][4], const float (&b)[C::NT][4]) {
    float s = 0.f;
#pragma unroll
    for (int t = 0; t < C::NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) s = fmaf(a[t][e], b[t][e], s);
    return s;
}

// acc += s·x
template <class C> __device__ __forceinline__ void axpy(float (&acc)[C::NT][4], float s, const float (&x)[C::NT][4]) {
#pragma unroll
    for (int t = 0; t < C::NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] = fmaf(s, x[t][e], acc[t][e]);
}

template <class C> __device__ __forceinline__ void scale_row(float (&acc)[C::NT][4], float s) {
#pragma unroll
    for (int t = 0; t < C::NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] *= s;
}

// Sum over the G lanes of a row group (G consecutive lanes, G-aligned); every lane gets the same bits.
template <int G> __device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}

// tile[r·dp + c] = src[base + (row0 + r)·stride + c] for row0 + r < limit and c < d, else 0;
// rows r < TILE. Consecutive threads read consecutive columns (coalesced per row).
template <typename T, class C>
__device__ __forceinline__ void load_tile(float* tile, const T* __restrict__ src, u64 base, u64 stride, int row0,
                                          int limit, int d, int dp) {
    for (int e = threadIdx.x; e < C::TILE * dp; e += THREADS) {
        const int r = e / dp, c = e - r * dp;
        float x = 0.f;
        if (row0 + r < limit && c < d) x = to_f32(src[base + (u64)(row0 + r) * stride + c]);
        tile[e] = x;
    }
}

// ---- dropout ----

// Philox block of element (i, j) of one (sequence, head); head_base = (b·heads + h) << 32.
// Positions are < 2^16 for every element that is used; the masks only keep stray lanes (rows
// past the sequence, whose bits are never used) inside their own row.
__device__ __forceinline__ u64 philox_block_of(u64 head_base, int i, int j) {
    return (head_base | ((u64)(i & 0xFFFF) << 16) | (u64)(j & 0xFFFF)) >> 2;
}

// Every lane draws one Philox block; bal[w] = the warp's keep bits of word w (bit = lane).
// Must be called by all 32 lanes of the warp.
__device__ __forceinline__ void keep_ballots(unsigned (&bal)[4], unsigned long long seed, unsigned long long stream,
                                             u64 block, float p) {
    float u[4];
    philox_uniform4(seed, stream, block, u);
#pragma unroll
    for (int w = 0; w < 4; ++w) bal[w] = __ballot_sync(FULL_MASK, u[w] >= p);
}

// Dropout factor 1/(1−p) of kept elements (p ≥ 1 keeps nothing: 0 avoids 0·inf).
__device__ __forceinline__ float keep_factor(float p) {
    return p <= 0.f ? 1.f : (p < 1.f ? 1.f / (1.f - p) : 0.f);
}

// Launcher misuse that would otherwise give silently wrong results or overrun shared memory:
// head_dim not what the variant handles, a sequence over 65535 rows, or valid > rows. Traps (the
// launch fails with an unspecified launch failure, sticky on the context) instead.
template <class C> __device__ __forceinline__ void check_args(unsigned head_dim, unsigned rows, unsigned valid) {
    const bool bad_d = C::FIXED ? head_dim != (unsigned)C::DMAX : (head_dim < 1u || head_dim > (unsigned)C::DMAX);
    if (bad_d || rows > 65535u || valid > rows) __trap();
}

// ---- forward ----

template <typename T, class C>
__device__ __forceinline__ void forward(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ qkv,
                                        const unsigned* __restrict__ starts, const unsigned* __restrict__ rows_of,
                                        const unsigned* __restrict__ valid_of, unsigned heads_, unsigned head_dim,
                                        float p, unsigned long long seed, unsigned long long stream) {
    __shared__ __align__(16) float ks[C::TILE * C::DMAX];
    __shared__ __align__(16) float vs[C::TILE * C::DMAX];

    const int b = blockIdx.z, h = blockIdx.y;
    check_args<C>(head_dim, rows_of[b], valid_of[b]);
    const int rows = (int)rows_of[b], valid = (int)valid_of[b];
    const int q0 = blockIdx.x * C::ROWS;
    if (q0 >= rows) return;  // block-uniform
    const u64 start = starts[b];
    const int heads = (int)heads_;
    const int d = C::FIXED ? C::DMAX : (int)head_dim;
    const int dp = C::FIXED ? C::DMAX : (d + 3) & ~3;
    const u64 H = (u64)heads * d, stride = 3 * H;
    const int lane = threadIdx.x & 31, g = threadIdx.x % C::G;
    const int i = q0 + threadIdx.x / C::G;
    const bool live = i < rows;
    const float scale = 1.f / sqrtf((float)d);
    const bool dropping = p > 0.f;
    const float rp = keep_factor(p);
    const u64 head_base = ((u64)b * heads + h) << 32;

    float q[C::NT][4], o[C::NT][4];
    load_row<T, C>(q, qkv + (start + i) * stride + (u64)h * d, g, d, live, scale * LOG2E);
    zero_row<C>(o);
    float m = neg_inf(), l = 0.f;  // running max (log2 units) and running Σ e^(s − m)

    for (int t0 = 0; t0 < valid; t0 += C::TILE) {
        __syncthreads();  // the previous tile is consumed
        load_tile<T, C>(ks, qkv, start * stride + H + (u64)h * d, stride, t0, valid, d, dp);
        load_tile<T, C>(vs, qkv, start * stride + 2 * H + (u64)h * d, stride, t0, valid, d, dp);
        __syncthreads();
        const int tlen = min(C::TILE, valid - t0);
        for (int c0 = 0; c0 < tlen; c0 += C::CHUNK) {
            const int j0 = t0 + c0;
            unsigned km[4] = {FULL_MASK, FULL_MASK, FULL_MASK, FULL_MASK};
            if (dropping) {
                keep_ballots(km, seed, stream, philox_block_of(head_base, i, j0 + 4 * g), p);
#pragma unroll
                for (int w = 0; w < 4; ++w) km[w] >>= (lane & ~(C::G - 1));  // this group's G·4 bits
            }
            float s[C::CHUNK];
            float mc = neg_inf();
#pragma unroll
            for (int jc = 0; jc < C::CHUNK; ++jc) {
                float k[C::NT][4];
                smem_row<C>(k, ks + (c0 + jc) * dp, g, dp);
                const float x = group_sum<C::G>(dot_part<C>(q, k));
                s[jc] = j0 + jc < valid ? x : neg_inf();
                mc = fmaxf(mc, s[jc]);
            }
            const float mn = fmaxf(m, mc);
            const float mref = mn == neg_inf() ? 0.f : mn;  // never -inf here (key j0 < valid); guard anyway
            const float alpha = exp2f(m - mref);            // 0 on the first chunk
            l *= alpha;
            scale_row<C>(o, alpha);
#pragma unroll
            for (int jc = 0; jc < C::CHUNK; ++jc) {
                const float pj = exp2f(s[jc] - mref);
                l += pj;
                const bool keep = (km[jc & 3] >> (jc >> 2)) & 1u;
                float v[C::NT][4];
                smem_row<C>(v, vs + (c0 + jc) * dp, g, dp);
                axpy<C>(o, keep ? pj : 0.f, v);
            }
            m = mn;
        }
    }
    const float inv = l > 0.f ? rp / l : 0.f;
    store_row<T, C>(out + (start + i) * H + (u64)h * d, o, g, d, live, inv);
    if (live && g == 0) lse[(start + i) * heads + h] = l > 0.f ? (m + log2f(l)) * LN2 : neg_inf();
}

// ---- backward: D = rowsum(dO·o) ----

// TO: out's type (T, or the 16-bit type the tensor-core forward stores O in; attention_tc.cu).
template <typename T, typename TO>
__device__ __forceinline__ void backward_delta(float* __restrict__ delta, const T* __restrict__ dout,
                                               const TO* __restrict__ out, unsigned total_rows, unsigned heads,
                                               unsigned head_dim) {
    const u64 w = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (w >= (u64)total_rows * heads) return;  // warp-uniform
    const int lane = threadIdx.x & 31;
    const u64 r = w / heads, h = w % heads;
    const u64 at = r * heads * head_dim + h * head_dim;
    float s = 0.f;
    for (unsigned c = lane; c < head_dim; c += 32) s = fmaf(to_f32(dout[at + c]), to_f32(out[at + c]), s);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL_MASK, s, o);
    if (lane == 0) delta[w] = s;  // w = r·heads + h
}

// ---- backward: dq (query row groups, loop over key tiles) ----

template <typename T, class C>
__device__ __forceinline__ void backward_dq(T* __restrict__ dqkv, const T* __restrict__ dout,
                                            const T* __restrict__ qkv, const float* __restrict__ lse,
                                            const float* __restrict__ delta, const unsigned* __restrict__ starts,
                                            const unsigned* __restrict__ rows_of, const unsigned* __restrict__ valid_of,
                                            unsigned heads_, unsigned head_dim, float p, unsigned long long seed,
                                            unsigned long long stream) {
    __shared__ __align__(16) float ks[C::TILE * C::DMAX];
    __shared__ __align__(16) float vs[C::TILE * C::DMAX];

    const int b = blockIdx.z, h = blockIdx.y;
    check_args<C>(head_dim, rows_of[b], valid_of[b]);
    const int rows = (int)rows_of[b], valid = (int)valid_of[b];
    const int q0 = blockIdx.x * C::ROWS;
    if (q0 >= rows) return;  // block-uniform
    const u64 start = starts[b];
    const int heads = (int)heads_;
    const int d = C::FIXED ? C::DMAX : (int)head_dim;
    const int dp = C::FIXED ? C::DMAX : (d + 3) & ~3;
    const u64 H = (u64)heads * d, stride = 3 * H;
    const int lane = threadIdx.x & 31, g = threadIdx.x % C::G;
    const int i = q0 + threadIdx.x / C::G;
    const bool live = i < rows;
    const float scale = 1.f / sqrtf((float)d);
    const bool dropping = p > 0.f;
    const float rp = keep_factor(p);
    const u64 head_base = ((u64)b * heads + h) << 32;

    float q[C::NT][4], dO[C::NT][4], dq[C::NT][4];
    load_row<T, C>(q, qkv + (start + i) * stride + (u64)h * d, g, d, live, scale * LOG2E);
    load_row<T, C>(dO, dout + (start + i) * H + (u64)h * d, g, d, live, 1.f);
    zero_row<C>(dq);
    const float lse2 = live ? lse[(start + i) * heads + h] * LOG2E : 0.f;
    const float Di = live ? delta[(start + i) * heads + h] : 0.f;

    for (int t0 = 0; t0 < valid; t0 += C::TILE) {
        __syncthreads();
        load_tile<T, C>(ks, qkv, start * stride + H + (u64)h * d, stride, t0, valid, d, dp);
        load_tile<T, C>(vs, qkv, start * stride + 2 * H + (u64)h * d, stride, t0, valid, d, dp);
        __syncthreads();
        const int tlen = min(C::TILE, valid - t0);
        for (int c0 = 0; c0 < tlen; c0 += C::CHUNK) {
            const int j0 = t0 + c0;
            unsigned km[4] = {FULL_MASK, FULL_MASK, FULL_MASK, FULL_MASK};
            if (dropping) {
                keep_ballots(km, seed, stream, philox_block_of(head_base, i, j0 + 4 * g), p);
#pragma unroll
                for (int w = 0; w < 4; ++w) km[w] >>= (lane & ~(C::G - 1));
            }
#pragma unroll
            for (int jc = 0; jc < C::CHUNK; ++jc) {
                float k[C::NT][4], v[C::NT][4];
                smem_row<C>(k, ks + (c0 + jc) * dp, g, dp);
                smem_row<C>(v, vs + (c0 + jc) * dp, g, dp);
                const float s = group_sum<C::G>(dot_part<C>(q, k));
                const float dpv = group_sum<C::G>(dot_part<C>(dO, v));
                const float pj = j0 + jc < valid ? exp2f(s - lse2) : 0.f;
                const bool keep = (km[jc & 3] >> (jc >> 2)) & 1u;
                const float f = keep ? rp : 0.f;
                axpy<C>(dq, pj * (f * dpv - Di), k);
            }
        }
    }
    store_row<T, C>(dqkv + (start + i) * stride + (u64)h * d, dq, g, d, live, scale);
}

// ---- backward: dk, dv (key row groups, loop over all query tiles) ----

template <typename T, class C>
__device__ __forceinline__ void backward_dkdv(T* __restrict__ dqkv, const T* __restrict__ dout,
                                              const T* __restrict__ qkv, const float* __restrict__ lse,
                                              const float* __restrict__ delta, const unsigned* __restrict__ starts,
                                              const unsigned* __restrict__ rows_of,
                                              const unsigned* __restrict__ valid_of, unsigned heads_,
                                              unsigned head_dim, float p, unsigned long long seed,
                                              unsigned long long stream) {
    __shared__ __align__(16) float qs[C::TILE * C::DMAX];
    __shared__ __align__(16) float dos[C::TILE * C::DMAX];
    __shared__ float lse_s[C::TILE];  // lse·log2(e) of the tile's queries
    __shared__ float del_s[C::TILE];  // D of the tile's queries

    const int b = blockIdx.z, h = blockIdx.y;
    check_args<C>(head_dim, rows_of[b], valid_of[b]);
    const int rows = (int)rows_of[b], valid = (int)valid_of[b];
    const int k0 = blockIdx.x * C::ROWS;
    if (k0 >= rows) return;  // block-uniform
    const u64 start = starts[b];
    const int heads = (int)heads_;
    const int d = C::FIXED ? C::DMAX : (int)head_dim;
    const int dp = C::FIXED ? C::DMAX : (d + 3) & ~3;
    const u64 H = (u64)heads * d, stride = 3 * H;
    const int lane = threadIdx.x & 31, g = threadIdx.x % C::G;
    const int j = k0 + threadIdx.x / C::G;
    const bool in_seq = j < rows, is_key = j < valid;
    T* const dk_at = dqkv + (start + j) * stride + H + (u64)h * d;
    T* const dv_at = dk_at + H;

    float dk[C::NT][4], dv[C::NT][4];
    zero_row<C>(dk);
    zero_row<C>(dv);
    if (k0 >= valid) {  // block-uniform: only padding keys here, their gradient is zero
        store_row<T, C>(dk_at, dk, g, d, in_seq, 1.f);
        store_row<T, C>(dv_at, dv, g, d, in_seq, 1.f);
        return;
    }
    const float scale = 1.f / sqrtf((float)d);
    const bool dropping = p > 0.f;
    const float rp = keep_factor(p);
    const u64 head_base = ((u64)b * heads + h) << 32;
    // Philox: lane L draws (query chunk + L / NKB, keys jw + 4·(L % NKB) .. +3), jw = the warp's
    // first key (a multiple of 4); this lane's key kl = L / G of the warp is bit kl & 3 of block
    // kl >> 2, so its bit of query ic is bit ic·NKB + (kl >> 2) of ballot word kl & 3.
    const int jw = k0 + (threadIdx.x / 32) * (32 / C::G);
    const int kl = lane / C::G;

    float k[C::NT][4], v[C::NT][4];
    load_row<T, C>(k, qkv + (start + j) * stride + H + (u64)h * d, g, d, is_key, scale * LOG2E);
    load_row<T, C>(v, qkv + (start + j) * stride + 2 * H + (u64)h * d, g, d, is_key, 1.f);

    for (int t0 = 0; t0 < rows; t0 += C::TILE) {
        __syncthreads();
        load_tile<T, C>(qs, qkv, start * stride + (u64)h * d, stride, t0, rows, d, dp);
        load_tile<T, C>(dos, dout, start * H + (u64)h * d, H, t0, rows, d, dp);
        for (int r = threadIdx.x; r < C::TILE; r += THREADS) {
            const bool in = t0 + r < rows;
            lse_s[r] = in ? lse[(start + t0 + r) * heads + h] * LOG2E : 0.f;
            del_s[r] = in ? delta[(start + t0 + r) * heads + h] : 0.f;
        }
        __syncthreads();
        const int tlen = min(C::TILE, rows - t0);
        for (int c0 = 0; c0 < tlen; c0 += C::CHUNK) {
            const int i0 = t0 + c0;
            unsigned kbits = FULL_MASK;
            if (dropping) {
                unsigned bal[4];
                keep_ballots(bal, seed, stream, philox_block_of(head_base, i0 + lane / C::NKB, jw + 4 * (lane % C::NKB)),
                             p);
                const int w = kl & 3;
                const unsigned word = w == 0 ? bal[0] : w == 1 ? bal[1] : w == 2 ? bal[2] : bal[3];
                kbits = word >> (kl >> 2);
            }
#pragma unroll
            for (int ic = 0; ic < C::CHUNK; ++ic) {
                float qi[C::NT][4], doi[C::NT][4];
                smem_row<C>(qi, qs + (c0 + ic) * dp, g, dp);
                smem_row<C>(doi, dos + (c0 + ic) * dp, g, dp);
                const float s = group_sum<C::G>(dot_part<C>(qi, k));
                const float dpv = group_sum<C::G>(dot_part<C>(doi, v));
                const float pj = i0 + ic < rows ? exp2f(s - lse_s[c0 + ic]) : 0.f;
                const bool keep = (kbits >> (ic * C::NKB)) & 1u;
                const float f = keep ? rp : 0.f;
                axpy<C>(dv, pj * f, doi);
                axpy<C>(dk, pj * (f * dpv - del_s[c0 + ic]), qi);
            }
        }
    }
    if (!is_key) {  // padding key inside a block that has real keys: exact zeros
        zero_row<C>(dk);
        zero_row<C>(dv);
    }
    store_row<T, C>(dk_at, dk, g, d, in_seq, scale);
    store_row<T, C>(dv_at, dv, g, d, in_seq, 1.f);
}

}  // namespace attn

// ---- exported entry points -----------------------------------------------------------------------

#define ATTN_FORWARD(NAME, T, CFG)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        NAME(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ qkv,                       \
             const unsigned* __restrict__ starts, const unsigned* __restrict__ rows,                        \
             const unsigned* __restrict__ valid, unsigned heads, unsigned head_dim, float dropout_p,        \
             unsigned long long seed, unsigned long long stream) {                                          \
        attn::forward<T, CFG>(out, lse, qkv, starts, rows, valid, heads, head_dim, dropout_p, seed, stream); \
    }

#define ATTN_BACKWARD(NAME, IMPL, T, CFG)                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        NAME(T* __restrict__ dqkv, const T* __restrict__ dout, const T* __restrict__ qkv,                   \
             const float* __restrict__ lse, const float* __restrict__ delta,                                \
             const unsigned* __restrict__ starts, const unsigned* __restrict__ rows,                        \
             const unsigned* __restrict__ valid, unsigned heads, unsigned head_dim, float dropout_p,        \
             unsigned long long seed, unsigned long long stream) {                                          \
        attn::IMPL<T, CFG>(dqkv, dout, qkv, lse, delta, starts, rows, valid, heads, head_dim, dropout_p,    \
                           seed, stream);                                                                   \
    }

#define ATTN_DELTA(NAME, T, TO)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
        NAME(float* __restrict__ delta, const T* __restrict__ dout, const TO* __restrict__ out,             \
             unsigned total_rows, unsigned heads, unsigned head_dim) {                                      \
        attn::backward_delta<T, TO>(delta, dout, out, total_rows, heads, head_dim);                         \
    }

ATTN_FORWARD(attention_forward_f32_d32, float, attn::CfgD32)
ATTN_FORWARD(attention_forward_f32_d64, float, attn::CfgD64)
ATTN_FORWARD(attention_forward_f32_generic, float, attn::CfgGeneric)

ATTN_DELTA(attention_backward_delta_f32, float, float)
// fp32 dout, out as attention_tc.cu's _out16 forward kernels store it.
ATTN_DELTA(attention_backward_delta_out_f16, float, __half)
ATTN_DELTA(attention_backward_delta_out_bf16, float, __nv_bfloat16)

ATTN_BACKWARD(attention_backward_dq_f32_d32, backward_dq, float, attn::CfgD32)
ATTN_BACKWARD(attention_backward_dq_f32_d64, backward_dq, float, attn::CfgD64)
ATTN_BACKWARD(attention_backward_dq_f32_generic, backward_dq, float, attn::CfgGeneric)

ATTN_BACKWARD(attention_backward_dkdv_f32_d32, backward_dkdv, float, attn::CfgD32)
ATTN_BACKWARD(attention_backward_dkdv_f32_d64, backward_dkdv, float, attn::CfgD64)
ATTN_BACKWARD(attention_backward_dkdv_f32_generic, backward_dkdv, float, attn::CfgGeneric)
