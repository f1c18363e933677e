// attention_tc.cu — the same attention as attention.cu (read its header first: layout, SeqLayout,
// masking, dropout element mapping, backward strategy), with the four matrix products on tensor
// cores in 16-bit (fp16 or bf16) with fp32 accumulation, as PyTorch AMP + SDPA (FlashAttention-2)
// computes it. The backend uses these kernels when its matmul precision is F16 or Bf16 and
// head_dim is 32 or 64 (attention.cu otherwise); the CPU reference emulates the rounding below
// under the same rule (src/backend/cpu/attention.rs, `attention_rounding` in src/backend/mod.rs).
// The two are not bitwise equal. They differ by summation order (tensor-core accumulation vs the
// CPU's GEMMs, and D_i's fused dot product, see Backward), by the GPU's exp2f (built on
// ex2.approx.f32, ≤ 2 ulp; the CPU uses f32::exp2) and, for lse, log2f (≤ 1 ulp), and by the
// 16-bit rounding flips these cause where a value lies near a rounding midpoint. Every other fp32
// step rounds where the CPU does: a product the CPU rounds before a subtraction is written
// __fmul_rn/__fsub_rn, which ptxas may not contract into one FFMA. tests/cuda_ops.rs
// (attention_tensor_cores) budgets for all of it: each side must lie within a rigorous bound of
// an f64 reference (tests/common/naive.rs `attention_16`: (n + 8)·2U·Σ|terms| per fp32 sum,
// exp2f 2⁻²¹ relative, 4U per fp32 rounding of the scaled score and of the shift, each possible
// flip's full width), so GPU and CPU within twice that bound of each other; only run-to-run
// equality of the GPU is tested bitwise.
//
// ---- Layout --------------------------------------------------------------------------------------
// As attention.cu: qkv [rows, 3, heads, d] in the 16-bit format T16 (the QKV GEMM's output as
// autocast stores it; the backend casts an fp32 qkv first, to the same values r16 gives),
// out [rows, heads, d] fp32, or T16 (the _out16 forward kernels: r16(o), as autocast stores SDPA's
// output; the model stores it so), dout [rows, heads, d] and dqkv [rows, 3, heads, d] fp32; lse,
// D [rows, heads] fp32 (lse in natural log); starts, rows, valid [batch]. d = head_dim ∈ {32, 64}
// (one kernel per d).
//
// ---- Math and rounding points (r16(x) = x rounded to nearest even in the 16-bit format T16) -----
// Operands: q̂ = r16(q), k̂ = r16(k), v̂ = r16(v), dÔ = r16(dO) — the values an fp16/bf16 QKV GEMM
// output under autocast would hold. Every product of two 16-bit values is exact in fp32, and
// every sum is an fp32 accumulation (tensor-core order). c2 = (1/√d)·log2(e) (fp32), scale = 1/√d.
// Forward, query i < rows, keys j < valid:
//   S_ij = q̂_i·k̂_j (fp32),  s_ij = c2·S_ij (log2 units),  M_i = ⌈max_j s_ij⌉ (an integer),
//   e_ij = 2^(s_ij − M_i),  l_i = Σ_j e_ij (fp32, unrounded),  P̃_ij = r16(e_ij)·keep_ij,
//   o_i = (rp / l_i)·Σ_j P̃_ij·v̂_j  (rp = 1/(1−p), 0 when p ≥ 1, 1 without dropout),
//   lse_i = (M_i + log2 l_i)·ln 2.
//   Online softmax: the running max m is kept as an integer (⌈tile max⌉), so every rescale factor
//   2^(m_old − m_new) is an exact power of two (the rescales l·α + Σe and o·α + P̃·V̂ may be
//   fused: α·x is exact unless it underflows) and, in exact arithmetic, r16(2^(s − m_tile))·
//   2^(m_tile − M) = r16(2^(s − M)): the rounded probabilities do not depend on the tiling
//   (FlashAttention-2 rounds e^(s − running max), whose rounding does; the size of the error is
//   the same). In fp32 that holds only up to the rounding of the shift s − m_tile (exact only
//   when the subtraction is; the CPU rounds s − M, a different subtraction) and exp2f's error,
//   which differs between the two arguments: either can flip r16 of an e near a rounding
//   midpoint by one 16-bit ulp. The other exception is fp16's subnormal range (e < 2⁻¹⁴, where
//   rounding is absolute, ≤ 2⁻²⁵ per element relative to the row's largest e ∈ (½, 1]); bf16 has
//   none.
// Backward (D_i = dO_i·o_i in fp32 from dO (fp32) and o as stored — fp32, or r16(o) from an _out16
// forward, as FlashAttention-2 reads its 16-bit O — attention.cu's delta kernels, a fmaf chain
// and warp reduction; the CPU rounds each product and sums in order):
//   P_ij = 2^(c2·S_ij − lse_i·log2 e) (fp32),  dP_ij = dÔ_i·v̂_j (fp32),
//   P̂_ij = r16(P_ij·keep_ij),  dŜ_ij = r16(P_ij·(f_ij·dP_ij − D_i)),  f_ij = keep_ij·rp,
//   dv_j = rp·Σ_i P̂_ij·dÔ_i,  dq_i = scale·Σ_j dŜ_ij·k̂_j,  dk_j = scale·Σ_i dŜ_ij·q̂_i;
//   padding keys (valid ≤ j < rows) get dk = dv = 0 exactly; queries i over all rows.
// Dropout: the keep bit of (b, h, i, j) is attention.cu's (Philox element ((b·heads + h)·2¹⁶ +
// i)·2¹⁶ + j of (seed, stream), kept iff uniform ≥ p); p ≤ 0: no draws.
//
// ---- Tensor cores ---------------------------------------------------------------------------------
// PTX wmma.{load,mma,store}.sync.aligned.m16n16k16 (16×16×16, 16-bit A/B, fp32 C/D) through the
// inline-asm wrappers below (the NVRTC wheels ship no crt/mma.h, so nvcuda::wmma is not
// available; these are the instructions it wraps, with the same opaque fragment layouts).
// Fragments only move between registers and shared memory (the wrappers use the .shared state
// space, which ptxas lowers to LDSM; with generic addresses it emitted generic per-element loads);
// every element-wise step (scale, mask, softmax, dropout, rounding) reads or writes an fp32 tile
// in shared memory where lane L of a warp owns row L/2 and the 32 columns 32·(L%2) .. +31 (or d/2
// columns of a [16, d] tile).
// Alignment: the PTX ISA (Matrix Storage for WMMA – Address Alignment) requires the start of every
// row of a fragment's matrix to be aligned to the fragment's size in bytes: 32 for f16 A/B (8 ×
// .b32) and for the f32 accumulator C/D (8 × .f32), 16 for bf16 A/B (4 × .b32) — for
// wmma.load.a…m16n16k16.f16 "p is a multiple of 32. 2*s is a multiple of 32". So every row
// stride is a multiple of 32 bytes: LD = d + 16 halves (96 B at d = 32, 160 B at d = 64) for the
// 16-bit tiles, SLD = 72 floats = PLD = 144 halves (288 B) for ss, and every fragment pointer is a
// multiple of 32 bytes from a 128-byte aligned array (row offsets of 16 rows, column offsets of 16
// halves or 16 floats, the dŜ half of a row at 64 halves). ISA conformance over speed: the former
// strides (d + 8, 136 halves, 68 floats: 80, 144 and 272 B, 16-byte multiples, undefined
// behaviour for f16 loads and f32 stores) spread the 8 rows of each 8×8 LDSM matrix over all 32
// banks; with a 32-byte-multiple stride rows 4 apart share banks, so the LDSM row loads and the
// 16-byte per-lane row accesses of ss (P̃/dŜ writes, P̃·V̂ and gradient reads) become 2-way
// bank conflicts, while the accumulator stores (8 bytes per lane) go from 2-way to conflict-free
// (bank arithmetic on the sm_90 SASS, not measured). The net cost is to be measured on a GPU.
//
// ---- Work decomposition (block of 128 threads = 4 warps, tiles of 64 rows) -----------------------
// forward and dq: a block owns a tile of 64 queries, warp w its rows 16w .. 16w+15; its Q (and dO)
//   fragments stay in registers; it loops over key tiles of 64 (K and V copied, 16-bit, into
//   shared memory, zero rows past valid). Per key tile a warp computes its [16, 64] S (and dP)
//   into its fp32 rows of `ss`, reads them back per lane, writes P̃ (or dŜ) as 16-bit over the same
//   rows (PLD = 144 halves = one fp32 row), and multiplies with V (or K). forward keeps o in
//   registers (lane: row L/2, columns (d/2)·(L%2) ..), adding each tile's P̃·V̂ after the rescale;
//   dq keeps its [16, d] accumulators in fragments.
// dkdv: a block owns a tile of 64 keys (warp w: keys 16w ..), K and V fragments in registers,
//   dk and dv accumulators in fragments; it loops over all query tiles of 64 (Q, dO as 16-bit, lse,
//   D in shared memory), computing Sᵀ = K̂·Q̂ᵀ and dPᵀ = V̂·dÔᵀ per warp, then P̂ (halves 0..63 of
//   each row) and dŜ (halves 64..127), then dv += P̂·dÔ and dk += dŜ·Q̂. Blocks whose keys are all
//   padding write zeros and exit. Philox: a lane needs one bit of each of its 32 queries' blocks;
//   the 4 lanes of the same 4 keys (same L%2) each draw 8 blocks and exchange the keep bits
//   (4 bits per block, 8 blocks per u32) with 4 __shfl_sync.
// Every output element is one fixed-order fp32 sum: bitwise deterministic, no atomics.
//
//   shared memory (static, bytes)   d = 32    d = 64
//   forward, dq                     30720     38912     ks, vs [64][LD] T16; ss [64][72] fp32
//   dkdv                            31232     39424     qs, dos [64][LD] T16; ss; lse, D [64]
// ss also stages the Q (dO; K, V in dkdv) tile as 16-bit before its fragments are loaded.
// Registers per thread as ptxas allots them when NVRTC 13.0 (the cu13 pip wheel) compiles this
// file (read from the CUBIN's EIATTR_REGCOUNT, `bertft-cuda doctor --arch sm_XX --resources`),
// sm_90 / sm_80, f16 and bf16 alike unless both are given (f16, bf16): forward 95 / 96 (d32),
// 135 / 128 (d64), the same with a 16-bit out; dq 122, 128 / 160, 125 (d32), 164, 158 / 158, 166
// (d64); dkdv 168 / 168 (d32), 246 / 242 (d64). No spills, no stack frame. Other NVRTC versions
// allocate differently.
//
// ---- Kernels and launch configurations (S = max_b rows[b], B = batch) ---------------------------
// attention_tc_forward_<t>_<v>[_out16](float* out (T16* out: _out16), float* lse, const T16* qkv,
//                              starts, rows, valid, heads, head_dim, p, seed, stream)
// attention_tc_backward_dq_<t>_<v>(float* dqkv, const float* dout, const T16* qkv,
//                                  const float* lse, const float* delta, starts, rows, valid,
//                                  heads, head_dim, p, seed, stream)
// attention_tc_backward_dkdv_<t>_<v>(same parameters as _dq)
//   <t> ∈ {f16, bf16}, <v> ∈ {d32, d64}; grid (ceil(S/64), heads, B), block 128, no dynamic
//   shared memory. Backward = attention_backward_delta_f32 (attention.cu;
//   attention_backward_delta_out_<t> for a 16-bit out), then dq and dkdv in any order. head_dim ≠ the variant's d, rows > 65535 or valid > rows: __trap().
//   Needs sm_80 or newer (bf16 wmma); compiled for an older GPU every kernel traps, and the
//   backend keeps attention.cu there.

#include "common.cuh"
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace attn_tc {

constexpr unsigned FULL = 0xffffffffu;
constexpr int THREADS = 128;
constexpr int TILE = 64;         // rows of a query or key tile
constexpr int SLD = TILE + 8;    // fp32 row stride of ss (72 floats = 288 bytes = 9·32)
constexpr int PLD = 2 * SLD;     // 16-bit row stride over the same rows (144 halves)
// Row stride (elements) of a [64][d] 16-bit tile: d + 16, so a row is a multiple of 32 bytes.
constexpr int tile_ld(int d) { return d + 16; }
static_assert(SLD * 4 % 32 == 0 && PLD * 2 == SLD * 4, "ss rows: a multiple of 32 bytes, fp32 and 16-bit alike");
static_assert(tile_ld(32) * 2 % 32 == 0 && tile_ld(64) * 2 % 32 == 0, "16-bit tile rows: a multiple of 32 bytes");
static_assert(TILE * tile_ld(64) <= 2 * TILE * SLD, "a 16-bit [64][LD] staging tile fits in ss");
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

typedef unsigned long long u64;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

// 2^k for an integer k ≤ 0 (0 below the normal range).
__device__ __forceinline__ float pow2i(int k) { return k < -126 ? 0.f : __int_as_float((k + 127) << 23); }

// ---- PTX wmma m16n16k16: A/B fragments of 16-bit T, accumulators fp32 ----
// Every wrapper takes a pointer into __shared__ memory (all fragments here move between registers
// and shared tiles) and uses the .shared state space with its 32-bit shared-window address.

// The .shared address of p (p must point into __shared__ memory).
__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

template <typename T> struct Frag;
template <> struct Frag<__half> { unsigned x[8]; };          // 8 × .f16x2
template <> struct Frag<__nv_bfloat16> { unsigned x[4]; };   // 4 × .b32 (2 bf16 each)
struct Acc { float x[8]; };

__device__ __forceinline__ void zero(Acc& c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c.x[e] = 0.f;
}

#define TC_R8(f) "=r"(f.x[0]), "=r"(f.x[1]), "=r"(f.x[2]), "=r"(f.x[3]), "=r"(f.x[4]), "=r"(f.x[5]), "=r"(f.x[6]), "=r"(f.x[7])
#define TC_R4(f) "=r"(f.x[0]), "=r"(f.x[1]), "=r"(f.x[2]), "=r"(f.x[3])
#define TC_I8(f) "r"(f.x[0]), "r"(f.x[1]), "r"(f.x[2]), "r"(f.x[3]), "r"(f.x[4]), "r"(f.x[5]), "r"(f.x[6]), "r"(f.x[7])
#define TC_I4(f) "r"(f.x[0]), "r"(f.x[1]), "r"(f.x[2]), "r"(f.x[3])
#define TC_F8(f) "+f"(f.x[0]), "+f"(f.x[1]), "+f"(f.x[2]), "+f"(f.x[3]), "+f"(f.x[4]), "+f"(f.x[5]), "+f"(f.x[6]), "+f"(f.x[7])

// load_a: A (16×16) row-major at p (shared), ldm elements between rows.
// load_b_col: B (16×16, element (k, n) at p[n·ldm + k]); load_b_row: element (k, n) at p[k·ldm + n].
__device__ __forceinline__ void load_a(Frag<__half>& f, const __half* p, unsigned ldm) {
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                 : TC_R8(f) : "r"(smem(p)), "r"(ldm) : "memory");
}
__device__ __forceinline__ void load_b_col(Frag<__half>& f, const __half* p, unsigned ldm) {
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                 : TC_R8(f) : "r"(smem(p)), "r"(ldm) : "memory");
}
__device__ __forceinline__ void load_b_row(Frag<__half>& f, const __half* p, unsigned ldm) {
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, [%8], %9;"
                 : TC_R8(f) : "r"(smem(p)), "r"(ldm) : "memory");
}
__device__ __forceinline__ void load_a(Frag<__nv_bfloat16>& f, const __nv_bfloat16* p, unsigned ldm) {
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                 : TC_R4(f) : "r"(smem(p)), "r"(ldm) : "memory");
}
__device__ __forceinline__ void load_b_col(Frag<__nv_bfloat16>& f, const __nv_bfloat16* p, unsigned ldm) {
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                 : TC_R4(f) : "r"(smem(p)), "r"(ldm) : "memory");
}
__device__ __forceinline__ void load_b_row(Frag<__nv_bfloat16>& f, const __nv_bfloat16* p, unsigned ldm) {
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0,%1,%2,%3}, [%4], %5;"
                 : TC_R4(f) : "r"(smem(p)), "r"(ldm) : "memory");
}

// c += a·b, a row-major; b as loaded by load_b_col (mma_rc) or load_b_row (mma_rr).
__device__ __forceinline__ void mma_rc(Acc& c, const Frag<__half>& a, const Frag<__half>& b) {
    asm volatile("wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19,%20,%21,%22,%23}, {%0,%1,%2,%3,%4,%5,%6,%7};"
                 : TC_F8(c) : TC_I8(a), TC_I8(b));
}
__device__ __forceinline__ void mma_rr(Acc& c, const Frag<__half>& a, const Frag<__half>& b) {
    asm volatile("wmma.mma.sync.aligned.row.row.m16n16k16.f32.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19,%20,%21,%22,%23}, {%0,%1,%2,%3,%4,%5,%6,%7};"
                 : TC_F8(c) : TC_I8(a), TC_I8(b));
}
__device__ __forceinline__ void mma_rc(Acc& c, const Frag<__nv_bfloat16>& a, const Frag<__nv_bfloat16>& b) {
    asm volatile("wmma.mma.sync.aligned.row.col.m16n16k16.f32.bf16.bf16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11}, {%12,%13,%14,%15}, {%0,%1,%2,%3,%4,%5,%6,%7};"
                 : TC_F8(c) : TC_I4(a), TC_I4(b));
}
__device__ __forceinline__ void mma_rr(Acc& c, const Frag<__nv_bfloat16>& a, const Frag<__nv_bfloat16>& b) {
    asm volatile("wmma.mma.sync.aligned.row.row.m16n16k16.f32.bf16.bf16.f32 {%0,%1,%2,%3,%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11}, {%12,%13,%14,%15}, {%0,%1,%2,%3,%4,%5,%6,%7};"
                 : TC_F8(c) : TC_I4(a), TC_I4(b));
}

// The 16×16 fp32 accumulator to p (shared), row-major with ldm floats between rows.
__device__ __forceinline__ void store_acc(float* p, const Acc& c, unsigned ldm) {
    asm volatile("wmma.store.d.sync.aligned.row.m16n16k16.shared.f32 [%0], {%1,%2,%3,%4,%5,%6,%7,%8}, %9;"
                 :
                 : "r"(smem(p)), "f"(c.x[0]), "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]), "f"(c.x[4]), "f"(c.x[5]),
                   "f"(c.x[6]), "f"(c.x[7]), "r"(ldm)
                 : "memory");
}

#undef TC_R8
#undef TC_R4
#undef TC_I8
#undef TC_I4
#undef TC_F8

// ---- tiles ----

// Two values rounded to T (round to nearest even), packed as one 32-bit word (a first).
template <typename T> __device__ __forceinline__ unsigned pack2(float a, float b) {
    T x[2] = {from_f32<T>(a), from_f32<T>(b)};
    unsigned u;
    memcpy(&u, x, 4);
    return u;
}

// tile[r·LD + c] = r16(src[base + (row0 + r)·stride + c]) for r < 64, c < D, row0 + r < limit
// (LD = tile_ld(D)); 0 for rows past limit. The pad columns D .. LD−1 are never read. `vec`: src,
// base and stride allow 16-byte loads (every offset here is a multiple of 8 elements, for fp32
// and 16-bit sources alike; only the pointer can break it). Two overloads: an fp32 source
// (dO) is rounded, a 16-bit one (qkv) copied as it is.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, const float* __restrict__ src, u64 base, u64 stride, int row0,
                                          int limit, bool vec) {
    constexpr int LD = tile_ld(D), Q4 = D / 4;
    for (int e = threadIdx.x; e < TILE * Q4; e += THREADS) {
        const int r = e / Q4, c = (e - r * Q4) * 4;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + r < limit) {
            const float* s = src + base + (u64)(row0 + r) * stride + c;
            if (vec) {
                x = *reinterpret_cast<const float4*>(s);
            } else {
                x.x = s[0];
                x.y = s[1];
                x.z = s[2];
                x.w = s[3];
            }
        }
        *reinterpret_cast<uint2*>(tile + r * LD + c) = make_uint2(pack2<T>(x.x, x.y), pack2<T>(x.z, x.w));
    }
}

template <typename T, int D>
__device__ __forceinline__ void load_tile(T* tile, const T* __restrict__ src, u64 base, u64 stride, int row0,
                                          int limit, bool vec) {
    constexpr int LD = tile_ld(D), Q8 = D / 8;
    for (int e = threadIdx.x; e < TILE * Q8; e += THREADS) {
        const int r = e / Q8, c = (e - r * Q8) * 8;
        uint4 x = make_uint4(0u, 0u, 0u, 0u);  // +0 in fp16 and bf16
        if (row0 + r < limit) {
            const T* s = src + base + (u64)(row0 + r) * stride + c;
            if (vec) {
                x = *reinterpret_cast<const uint4*>(s);
            } else {
                T v[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = s[j];
                memcpy(&x, v, 16);
            }
        }
        *reinterpret_cast<uint4*>(tile + r * LD + c) = x;
    }
}

// 32 consecutive floats of shared memory (16-byte aligned).
__device__ __forceinline__ void read32(float (&v)[32], const float* p) {
#pragma unroll
    for (int c = 0; c < 32; c += 4) {
        const float4 x = *reinterpret_cast<const float4*>(p + c);
        v[c] = x.x;
        v[c + 1] = x.y;
        v[c + 2] = x.z;
        v[c + 3] = x.w;
    }
}

// 32 values rounded to T at p (4-byte aligned).
template <typename T> __device__ __forceinline__ void write32(T* p, const float (&v)[32]) {
#pragma unroll
    for (int c = 0; c < 32; c += 2) *reinterpret_cast<unsigned*>(p + c) = pack2<T>(v[c], v[c + 1]);
}

// ---- dropout (attention.cu's mapping) ----

__device__ __forceinline__ u64 philox_block_of(u64 head_base, int i, int j) {
    return (head_base | ((u64)(i & 0xFFFF) << 16) | (u64)(j & 0xFFFF)) >> 2;
}

// Bit c of the result: keep bit of (query i, key j0 + c), c < 32 (j0 a multiple of 4).
__device__ __forceinline__ unsigned keep_row32(unsigned long long seed, unsigned long long stream, u64 head_base, int i,
                                               int j0, float p) {
    unsigned bits = 0;
#pragma unroll
    for (int g = 0; g < 8; ++g) {
        float u[4];
        philox_uniform4(seed, stream, philox_block_of(head_base, i, j0 + 4 * g), u);
#pragma unroll
        for (int w = 0; w < 4; ++w) bits |= (u[w] >= p ? 1u : 0u) << (4 * g + w);
    }
    return bits;
}

__device__ __forceinline__ float keep_factor(float p) {
    return p <= 0.f ? 1.f : (p < 1.f ? 1.f / (1.f - p) : 0.f);
}

template <int D> __device__ __forceinline__ void check_args(unsigned head_dim, unsigned rows, unsigned valid) {
    if (head_dim != (unsigned)D || rows > 65535u || valid > rows) __trap();
}

// ---- forward ----

// O: out's type, float or T (the _out16 kernels: o rounded once to T16, as autocast stores SDPA's
// output).
template <typename T, int D, typename O>
__device__ __forceinline__ void forward(O* __restrict__ out, float* __restrict__ lse, const T* __restrict__ qkv,
                                        const unsigned* __restrict__ starts, const unsigned* __restrict__ rows_of,
                                        const unsigned* __restrict__ valid_of, unsigned heads_, unsigned head_dim,
                                        float p, unsigned long long seed, unsigned long long stream) {
    constexpr int LD = tile_ld(D), KD = D / 16, NC = D / 2;
    __shared__ __align__(128) T ks[TILE * LD];
    __shared__ __align__(128) T vs[TILE * LD];
    __shared__ __align__(128) float ss[TILE * SLD];

    const int b = blockIdx.z, h = blockIdx.y;
    check_args<D>(head_dim, rows_of[b], valid_of[b]);
    const int rows = (int)rows_of[b], valid = (int)valid_of[b];
    const int q0 = blockIdx.x * TILE;
    if (q0 >= rows) return;  // block-uniform
    const u64 start = starts[b];
    const int heads = (int)heads_;
    const u64 H = (u64)heads * D, stride = 3 * H;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, hf = lane & 1;
    const int i = q0 + 16 * warp + r;  // this lane's query (row r of the warp's 16)
    const float c2 = (1.f / sqrtf((float)D)) * LOG2E;
    const bool dropping = p > 0.f;
    const float rp = keep_factor(p);
    const u64 head_base = ((u64)b * heads + h) << 32;
    const bool vec = is_aligned16(qkv);
    float* const sw = ss + 16 * warp * SLD;  // the warp's 16 fp32 rows
    T* const pw = reinterpret_cast<T*>(sw);  // the same rows as 16-bit, PLD apart

    // Q fragments (staged through ss).
    Frag<T> qa[KD];
    {
        T* const st = reinterpret_cast<T*>(ss);
        load_tile<T, D>(st, qkv, start * stride + (u64)h * D, stride, q0, rows, vec);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) load_a(qa[kk], st + 16 * warp * LD + 16 * kk, LD);
    }

    float o[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) o[c] = 0.f;
    float m = neg_inf(), l = 0.f;  // running max (an integer, log2 units) and this lane's share of Σ e

    for (int t0 = 0; t0 < valid; t0 += TILE) {
        __syncthreads();  // ss (Q staging / last tile's P·V) read and ks, vs consumed by every warp
        load_tile<T, D>(ks, qkv, start * stride + H + (u64)h * D, stride, t0, valid, vec);
        load_tile<T, D>(vs, qkv, start * stride + 2 * H + (u64)h * D, stride, t0, valid, vec);
        __syncthreads();
        // S = Q̂·K̂ᵀ, the warp's [16, 64] into sw.
#pragma unroll
        for (int n = 0; n < TILE / 16; ++n) {
            Acc acc;
            zero(acc);
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                Frag<T> kb;
                load_b_col(kb, ks + 16 * n * LD + 16 * kk, LD);
                mma_rc(acc, qa[kk], kb);
            }
            store_acc(sw + 16 * n, acc, SLD);
        }
        __syncwarp();
        float s[32];
        read32(s, sw + r * SLD + 32 * hf);
        const int j0 = t0 + 32 * hf;  // this lane's keys j0 .. j0+31
        float mx = neg_inf();
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            s[c] = j0 + c < valid ? __fmul_rn(s[c], c2) : neg_inf();
            mx = fmaxf(mx, s[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 1));
        const float mn = fmaxf(m, ceilf(mx));             // key t0 < valid: finite for finite inputs
        const float mref = mn == neg_inf() ? 0.f : mn;
        const float alpha = m == neg_inf() ? 0.f : pow2i((int)(m - mref));  // exact power of two
        const unsigned keep = dropping ? keep_row32(seed, stream, head_base, i, j0, p) : FULL;
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const float e = exp2f(__fsub_rn(s[c], mref));
            sum += e;
            s[c] = (keep >> c) & 1u ? e : 0.f;
        }
        l = l * alpha + sum;
#pragma unroll
        for (int c = 0; c < NC; ++c) o[c] *= alpha;
        m = mn;
        __syncwarp();  // every lane has read its S before P̃ overwrites the rows
        write32<T>(pw + r * PLD + 32 * hf, s);
        __syncwarp();
        Frag<T> pa[TILE / 16];
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) load_a(pa[kk], pw + 16 * kk, PLD);
        __syncwarp();  // P̃ is in registers before P̃·V̂ overwrites the rows
#pragma unroll
        for (int n = 0; n < KD; ++n) {
            Acc acc;
            zero(acc);
#pragma unroll
            for (int kk = 0; kk < TILE / 16; ++kk) {
                Frag<T> vb;
                load_b_row(vb, vs + 16 * kk * LD + 16 * n, LD);
                mma_rr(acc, pa[kk], vb);
            }
            store_acc(sw + 16 * n, acc, SLD);
        }
        __syncwarp();
        const float* pv = sw + r * SLD + NC * hf;
#pragma unroll
        for (int c = 0; c < NC; ++c) o[c] += pv[c];
    }
    l += __shfl_xor_sync(FULL, l, 1);
    if (i < rows) {
        const float inv = l > 0.f ? rp / l : 0.f;
        O* const dst = out + (start + i) * H + (u64)h * D + NC * hf;
#pragma unroll
        for (int c = 0; c < NC; ++c) dst[c] = from_f32<O>(o[c] * inv);
        if (hf == 0) lse[(start + i) * heads + h] = l > 0.f ? (m + log2f(l)) * LN2 : neg_inf();
    }
}

// ---- backward: dq (query tile, loop over key tiles) ----

template <typename T, int D>
__device__ __forceinline__ void backward_dq(float* __restrict__ dqkv, const float* __restrict__ dout,
                                            const T* __restrict__ qkv, const float* __restrict__ lse,
                                            const float* __restrict__ delta, const unsigned* __restrict__ starts,
                                            const unsigned* __restrict__ rows_of, const unsigned* __restrict__ valid_of,
                                            unsigned heads_, unsigned head_dim, float p, unsigned long long seed,
                                            unsigned long long stream) {
    constexpr int LD = tile_ld(D), KD = D / 16, NC = D / 2;
    __shared__ __align__(128) T ks[TILE * LD];
    __shared__ __align__(128) T vs[TILE * LD];
    __shared__ __align__(128) float ss[TILE * SLD];

    const int b = blockIdx.z, h = blockIdx.y;
    check_args<D>(head_dim, rows_of[b], valid_of[b]);
    const int rows = (int)rows_of[b], valid = (int)valid_of[b];
    const int q0 = blockIdx.x * TILE;
    if (q0 >= rows) return;  // block-uniform
    const u64 start = starts[b];
    const int heads = (int)heads_;
    const u64 H = (u64)heads * D, stride = 3 * H;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, hf = lane & 1;
    const int i = q0 + 16 * warp + r;
    const bool live = i < rows;
    const float c2 = (1.f / sqrtf((float)D)) * LOG2E;
    const float scale = 1.f / sqrtf((float)D);
    const bool dropping = p > 0.f;
    const float rp = keep_factor(p);
    const u64 head_base = ((u64)b * heads + h) << 32;
    const bool vec = is_aligned16(qkv) && is_aligned16(dout);
    float* const sw = ss + 16 * warp * SLD;
    T* const pw = reinterpret_cast<T*>(sw);

    Frag<T> qa[KD], da[KD];  // Q̂ and dÔ of the warp's 16 queries
    {
        T* const st = reinterpret_cast<T*>(ss);
        load_tile<T, D>(st, qkv, start * stride + (u64)h * D, stride, q0, rows, vec);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) load_a(qa[kk], st + 16 * warp * LD + 16 * kk, LD);
        __syncthreads();
        load_tile<T, D>(st, dout, start * H + (u64)h * D, H, q0, rows, vec);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) load_a(da[kk], st + 16 * warp * LD + 16 * kk, LD);
    }
    const float lse2 = live ? lse[(start + i) * heads + h] * LOG2E : 0.f;
    const float Di = live ? delta[(start + i) * heads + h] : 0.f;

    Acc dq[KD];
#pragma unroll
    for (int n = 0; n < KD; ++n) zero(dq[n]);

    for (int t0 = 0; t0 < valid; t0 += TILE) {
        __syncthreads();  // staging read; ks, vs and ss of the last tile consumed
        load_tile<T, D>(ks, qkv, start * stride + H + (u64)h * D, stride, t0, valid, vec);
        load_tile<T, D>(vs, qkv, start * stride + 2 * H + (u64)h * D, stride, t0, valid, vec);
        __syncthreads();
        // S = Q̂·K̂ᵀ → P (fp32, registers)
#pragma unroll
        for (int n = 0; n < TILE / 16; ++n) {
            Acc acc;
            zero(acc);
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                Frag<T> kb;
                load_b_col(kb, ks + 16 * n * LD + 16 * kk, LD);
                mma_rc(acc, qa[kk], kb);
            }
            store_acc(sw + 16 * n, acc, SLD);
        }
        __syncwarp();
        const int j0 = t0 + 32 * hf;
        float pr[32];
        read32(pr, sw + r * SLD + 32 * hf);
#pragma unroll
        for (int c = 0; c < 32; ++c) pr[c] = j0 + c < valid ? exp2f(__fsub_rn(__fmul_rn(pr[c], c2), lse2)) : 0.f;
        __syncwarp();  // S read before dP overwrites it
        // dP = dÔ·V̂ᵀ
#pragma unroll
        for (int n = 0; n < TILE / 16; ++n) {
            Acc acc;
            zero(acc);
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                Frag<T> vb;
                load_b_col(vb, vs + 16 * n * LD + 16 * kk, LD);
                mma_rc(acc, da[kk], vb);
            }
            store_acc(sw + 16 * n, acc, SLD);
        }
        __syncwarp();
        const unsigned keep = dropping ? keep_row32(seed, stream, head_base, i, j0, p) : FULL;
        {
            float dp[32];
            read32(dp, sw + r * SLD + 32 * hf);
#pragma unroll
            for (int c = 0; c < 32; ++c) {
                const float f = (keep >> c) & 1u ? rp : 0.f;
                pr[c] = pr[c] * __fsub_rn(__fmul_rn(f, dp[c]), Di);  // dS (fp32)
            }
        }
        __syncwarp();  // dP read before dŜ overwrites it
        write32<T>(pw + r * PLD + 32 * hf, pr);
        __syncwarp();
        // dq += dŜ·K̂
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) {
            Frag<T> sa;
            load_a(sa, pw + 16 * kk, PLD);
#pragma unroll
            for (int n = 0; n < KD; ++n) {
                Frag<T> kb;
                load_b_row(kb, ks + 16 * kk * LD + 16 * n, LD);
                mma_rr(dq[n], sa, kb);
            }
        }
    }
    __syncwarp();  // dŜ fragments loaded before dq overwrites the rows
#pragma unroll
    for (int n = 0; n < KD; ++n) store_acc(sw + 16 * n, dq[n], SLD);
    __syncwarp();
    if (live) {
        const float* g = sw + r * SLD + NC * hf;
        float* const dst = dqkv + (start + i) * stride + (u64)h * D + NC * hf;
#pragma unroll
        for (int c = 0; c < NC; ++c) dst[c] = g[c] * scale;
    }
}

// ---- backward: dk, dv (key tile, loop over all query tiles) ----

template <typename T, int D>
__device__ __forceinline__ void backward_dkdv(float* __restrict__ dqkv, const float* __restrict__ dout,
                                              const T* __restrict__ qkv, const float* __restrict__ lse,
                                              const float* __restrict__ delta, const unsigned* __restrict__ starts,
                                              const unsigned* __restrict__ rows_of,
                                              const unsigned* __restrict__ valid_of, unsigned heads_,
                                              unsigned head_dim, float p, unsigned long long seed,
                                              unsigned long long stream) {
    constexpr int LD = tile_ld(D), KD = D / 16, NC = D / 2;
    __shared__ __align__(128) T qs[TILE * LD];
    __shared__ __align__(128) T dos[TILE * LD];
    __shared__ __align__(128) float ss[TILE * SLD];
    __shared__ float lse_s[TILE];  // lse·log2(e) of the tile's queries
    __shared__ float del_s[TILE];  // D of the tile's queries

    const int b = blockIdx.z, h = blockIdx.y;
    check_args<D>(head_dim, rows_of[b], valid_of[b]);
    const int rows = (int)rows_of[b], valid = (int)valid_of[b];
    const int k0 = blockIdx.x * TILE;
    if (k0 >= rows) return;  // block-uniform
    const u64 start = starts[b];
    const int heads = (int)heads_;
    const u64 H = (u64)heads * D, stride = 3 * H;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 1, hf = lane & 1;
    const int j = k0 + 16 * warp + r;  // this lane's key
    const bool in_seq = j < rows, is_key = j < valid;
    float* const dk_at = dqkv + (start + j) * stride + H + (u64)h * D + NC * hf;
    float* const dv_at = dk_at + H;

    if (k0 >= valid) {  // block-uniform: only padding keys, whose gradient is zero
        if (in_seq)
#pragma unroll
            for (int c = 0; c < NC; ++c) dk_at[c] = dv_at[c] = 0.f;
        return;
    }
    const float c2 = (1.f / sqrtf((float)D)) * LOG2E;
    const float scale = 1.f / sqrtf((float)D);
    const bool dropping = p > 0.f;
    const float rp = keep_factor(p);
    const u64 head_base = ((u64)b * heads + h) << 32;
    const bool vec = is_aligned16(qkv) && is_aligned16(dout);
    float* const sw = ss + 16 * warp * SLD;
    T* const pw = reinterpret_cast<T*>(sw);  // P̂ at halves 0..63 of each row, dŜ at 64..127

    Frag<T> ka[KD], va[KD];  // K̂ and V̂ of the warp's 16 keys (zero past valid)
    {
        T* const st = reinterpret_cast<T*>(ss);
        load_tile<T, D>(st, qkv, start * stride + H + (u64)h * D, stride, k0, valid, vec);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) load_a(ka[kk], st + 16 * warp * LD + 16 * kk, LD);
        __syncthreads();
        load_tile<T, D>(st, qkv, start * stride + 2 * H + (u64)h * D, stride, k0, valid, vec);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) load_a(va[kk], st + 16 * warp * LD + 16 * kk, LD);
    }

    Acc dk[KD], dv[KD];
#pragma unroll
    for (int n = 0; n < KD; ++n) {
        zero(dk[n]);
        zero(dv[n]);
    }
    // Philox: keys j − j%4 .. +3 share a block per query; the 4 lanes of those keys with the same
    // hf are lanes (lane & ~7) | 2·o | hf, o = j % 4 = r % 4 (k0 and 16·warp are multiples of 4).
    // Lane o draws the blocks of queries t0 + 32·hf + 8·o + k, k < 8, packing the 4 keep bits of
    // block k at bits 4k .. 4k+3; the lane's bit of query c (of its 32) is then bit
    // 4·(c%8) + j%4 of lane c/8's word.
    const int jo = r & 3, jb = j - jo;

    for (int t0 = 0; t0 < rows; t0 += TILE) {
        __syncthreads();  // staging read; qs, dos, lse_s, del_s and ss of the last tile consumed
        load_tile<T, D>(qs, qkv, start * stride + (u64)h * D, stride, t0, rows, vec);
        load_tile<T, D>(dos, dout, start * H + (u64)h * D, H, t0, rows, vec);
        if (threadIdx.x < TILE) {
            const int x = threadIdx.x;
            const bool in = t0 + x < rows;
            lse_s[x] = in ? lse[(start + t0 + x) * heads + h] * LOG2E : 0.f;
            del_s[x] = in ? delta[(start + t0 + x) * heads + h] : 0.f;
        }
        __syncthreads();
        // Sᵀ = K̂·Q̂ᵀ (the warp's 16 keys × 64 queries) → P (fp32, registers)
#pragma unroll
        for (int n = 0; n < TILE / 16; ++n) {
            Acc acc;
            zero(acc);
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                Frag<T> qb;
                load_b_col(qb, qs + 16 * n * LD + 16 * kk, LD);
                mma_rc(acc, ka[kk], qb);
            }
            store_acc(sw + 16 * n, acc, SLD);
        }
        __syncwarp();
        const int i0 = t0 + 32 * hf;  // this lane's queries i0 .. i0+31
        float pr[32];
        read32(pr, sw + r * SLD + 32 * hf);
#pragma unroll
        for (int c = 0; c < 32; ++c)
            pr[c] = i0 + c < rows ? exp2f(__fsub_rn(__fmul_rn(pr[c], c2), lse_s[32 * hf + c])) : 0.f;
        __syncwarp();
        // dPᵀ = V̂·dÔᵀ
#pragma unroll
        for (int n = 0; n < TILE / 16; ++n) {
            Acc acc;
            zero(acc);
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                Frag<T> db;
                load_b_col(db, dos + 16 * n * LD + 16 * kk, LD);
                mma_rc(acc, va[kk], db);
            }
            store_acc(sw + 16 * n, acc, SLD);
        }
        unsigned w4[4] = {FULL, FULL, FULL, FULL};
        if (dropping) {
            unsigned mine = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                float u[4];
                philox_uniform4(seed, stream, philox_block_of(head_base, i0 + 8 * jo + k, jb), u);
#pragma unroll
                for (int w = 0; w < 4; ++w) mine |= (u[w] >= p ? 1u : 0u) << (4 * k + w);
            }
#pragma unroll
            for (int o = 0; o < 4; ++o) w4[o] = __shfl_sync(FULL, mine, (lane & ~7) | (2 * o) | hf);
        }
        __syncwarp();
        float ds[32];
        read32(ds, sw + r * SLD + 32 * hf);  // dP
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            const bool keep = (w4[c >> 3] >> (4 * (c & 7) + jo)) & 1u;
            ds[c] = pr[c] * __fsub_rn(__fmul_rn(keep ? rp : 0.f, ds[c]), del_s[32 * hf + c]);
            pr[c] = keep ? pr[c] : 0.f;
        }
        __syncwarp();  // dP read before P̂ and dŜ overwrite it
        write32<T>(pw + r * PLD + 32 * hf, pr);
        write32<T>(pw + TILE + r * PLD + 32 * hf, ds);
        __syncwarp();
        // dv += P̂·dÔ, dk += dŜ·Q̂ (the tile's 64 queries)
#pragma unroll
        for (int kk = 0; kk < TILE / 16; ++kk) {
            Frag<T> pa, sa;
            load_a(pa, pw + 16 * kk, PLD);
            load_a(sa, pw + TILE + 16 * kk, PLD);
#pragma unroll
            for (int n = 0; n < KD; ++n) {
                Frag<T> xb;
                load_b_row(xb, dos + 16 * kk * LD + 16 * n, LD);
                mma_rr(dv[n], pa, xb);
                load_b_row(xb, qs + 16 * kk * LD + 16 * n, LD);
                mma_rr(dk[n], sa, xb);
            }
        }
    }
    __syncwarp();  // P̂, dŜ fragments loaded before dk overwrites the rows
#pragma unroll
    for (int n = 0; n < KD; ++n) store_acc(sw + 16 * n, dk[n], SLD);
    __syncwarp();
    const float* g = sw + r * SLD + NC * hf;
    if (in_seq)
#pragma unroll
        for (int c = 0; c < NC; ++c) dk_at[c] = is_key ? g[c] * scale : 0.f;
    __syncwarp();
#pragma unroll
    for (int n = 0; n < KD; ++n) store_acc(sw + 16 * n, dv[n], SLD);
    __syncwarp();
    if (in_seq)
#pragma unroll
        for (int c = 0; c < NC; ++c) dv_at[c] = is_key ? g[c] * rp : 0.f;
}

}  // namespace attn_tc

// ---- exported entry points -----------------------------------------------------------------------

// bf16 wmma needs sm_80: older GPUs get a kernel that traps (the backend does not launch it).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ATTN_TC_SM80(...) __VA_ARGS__
#else
#define ATTN_TC_SM80(...) __trap()
#endif

#define ATTN_TC_FORWARD(NAME, T, D, O)                                                                       \
    extern "C" __global__ void __launch_bounds__(128)                                                        \
        NAME(O* __restrict__ out, float* __restrict__ lse, const T* __restrict__ qkv,                        \
             const unsigned* __restrict__ starts, const unsigned* __restrict__ rows,                         \
             const unsigned* __restrict__ valid, unsigned heads, unsigned head_dim, float dropout_p,         \
             unsigned long long seed, unsigned long long stream) {                                           \
        ATTN_TC_SM80(attn_tc::forward<T, D, O>(out, lse, qkv, starts, rows, valid, heads, head_dim,          \
                                                dropout_p, seed, stream));                                    \
    }

#define ATTN_TC_BACKWARD(NAME, IMPL, T, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                                        \
        NAME(float* __restrict__ dqkv, const float* __restrict__ dout, const T* __restrict__ qkv,            \
             const float* __restrict__ lse, const float* __restrict__ delta,                                 \
             const unsigned* __restrict__ starts, const unsigned* __restrict__ rows,                         \
             const unsigned* __restrict__ valid, unsigned heads, unsigned head_dim, float dropout_p,         \
             unsigned long long seed, unsigned long long stream) {                                           \
        ATTN_TC_SM80(attn_tc::IMPL<T, D>(dqkv, dout, qkv, lse, delta, starts, rows, valid, heads, head_dim,  \
                                         dropout_p, seed, stream));                                          \
    }

ATTN_TC_FORWARD(attention_tc_forward_f16_d32, __half, 32, float)
ATTN_TC_FORWARD(attention_tc_forward_f16_d64, __half, 64, float)
ATTN_TC_FORWARD(attention_tc_forward_bf16_d32, __nv_bfloat16, 32, float)
ATTN_TC_FORWARD(attention_tc_forward_bf16_d64, __nv_bfloat16, 64, float)
ATTN_TC_FORWARD(attention_tc_forward_f16_d32_out16, __half, 32, __half)
ATTN_TC_FORWARD(attention_tc_forward_f16_d64_out16, __half, 64, __half)
ATTN_TC_FORWARD(attention_tc_forward_bf16_d32_out16, __nv_bfloat16, 32, __nv_bfloat16)
ATTN_TC_FORWARD(attention_tc_forward_bf16_d64_out16, __nv_bfloat16, 64, __nv_bfloat16)

ATTN_TC_BACKWARD(attention_tc_backward_dq_f16_d32, backward_dq, __half, 32)
ATTN_TC_BACKWARD(attention_tc_backward_dq_f16_d64, backward_dq, __half, 64)
ATTN_TC_BACKWARD(attention_tc_backward_dq_bf16_d32, backward_dq, __nv_bfloat16, 32)
ATTN_TC_BACKWARD(attention_tc_backward_dq_bf16_d64, backward_dq, __nv_bfloat16, 64)

ATTN_TC_BACKWARD(attention_tc_backward_dkdv_f16_d32, backward_dkdv, __half, 32)
ATTN_TC_BACKWARD(attention_tc_backward_dkdv_f16_d64, backward_dkdv, __half, 64)
ATTN_TC_BACKWARD(attention_tc_backward_dkdv_bf16_d32, backward_dkdv, __nv_bfloat16, 32)
ATTN_TC_BACKWARD(attention_tc_backward_dkdv_bf16_d64, backward_dkdv, __nv_bfloat16, 64)
