// embedding.cu — the sum of the word, position and token-type tables (cpu/embedding.rs).
//
// Forward:  out[r, c] = word[ids[r], c] + position[positions[r], c] + token_type[type_ids[r], c]
//           (added in that order, in fp32, then rounded to T).
// Backward: each table's gradient gets dout[r, :] added at the row that was read, except the word
//           row `padding_idx` (nn.Embedding(padding_idx=…)), which gets nothing.
// Layout: tables (and their gradients) are fp32 [entries, hidden] (master weights: read directly,
// no cast copy); out / dout are T [rows, hidden]; ids, positions, type_ids are u32 [rows].
// Only the fp32 instance (_f32) is compiled: the model keeps these tensors in fp32 under every
// precision (16 bits are for GEMM operands), so a 16-bit instance would be code no caller runs.
// Indices are not range-checked here (the CPU reference panics): the caller validates them.
//
// Backward adds with fp32 atomicAdd into the tables, so the order of the additions (and the last
// bits of the result) varies from run to run. Each thread owns one column for a chunk of
// EMB_BWD_ROWS consecutive rows and first sums consecutive rows that hit the same table row in a
// register (runs: the two token types, repeated tokens), so the two-row token-type table is not
// hammered by one atomic per row.
#include "common.cuh"

#define EMB_BWD_ROWS 32u

// Launch: block (B, 1, 1), grid (ceil(hidden / N / B), min(rows, 65535), 1), where N = Pack<T>::N
// (4 for fp32, 8 for 16-bit) and B = min(256, hidden / N rounded up to 32); both dimensions
// grid-stride, so any grid is correct. blockIdx.y walks the rows, x the columns of a row.
// Vector path (one 128-bit access per N elements) when hidden % N == 0 and out and the three
// tables are 16-byte aligned; otherwise one element per thread and iteration.
template <typename T>
__device__ __forceinline__ void embeddings_forward_impl(T* __restrict__ out, const float* __restrict__ word,
                                                        const float* __restrict__ position,
                                                        const float* __restrict__ token_type,
                                                        const unsigned int* __restrict__ ids,
                                                        const unsigned int* __restrict__ positions,
                                                        const unsigned int* __restrict__ type_ids, unsigned int rows,
                                                        unsigned int hidden) {
    constexpr int N = Pack<T>::N;
    const bool vec = hidden % N == 0 && is_aligned16(out) && is_aligned16(word) && is_aligned16(position) &&
                     is_aligned16(token_type);
    const unsigned int step = (vec ? N : 1) * gridDim.x * blockDim.x;
    const unsigned int c0 = (vec ? N : 1) * (blockIdx.x * blockDim.x + threadIdx.x);
    for (unsigned int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float* __restrict__ w = word + (unsigned long long)ids[r] * hidden;
        const float* __restrict__ p = position + (unsigned long long)positions[r] * hidden;
        const float* __restrict__ t = token_type + (unsigned long long)type_ids[r] * hidden;
        T* __restrict__ o = out + (unsigned long long)r * hidden;
        if (vec) {
            for (unsigned int c = c0; c < hidden; c += step) {
                float wv[N], pv[N], tv[N], ov[N];
                ld_f32xN(w + c, wv);
                ld_f32xN(p + c, pv);
                ld_f32xN(t + c, tv);
#pragma unroll
                for (int j = 0; j < N; ++j) ov[j] = wv[j] + pv[j] + tv[j];
                st_pack_f32(o + c, ov);
            }
        } else {
            for (unsigned int c = c0; c < hidden; c += step) o[c] = from_f32<T>(w[c] + p[c] + t[c]);
        }
    }
}

// Adds a run of rows that hit the same table row: flushes the previous run on a change of index.
struct EmbRun {
    unsigned int idx;  // table row of the current run, ~0u when none
    float acc;
    __device__ __forceinline__ void add(float* __restrict__ table, unsigned int i, float g, unsigned int hidden,
                                        unsigned int c) {
        if (i != idx) {
            flush(table, hidden, c);
            idx = i;
        }
        acc += g;
    }
    __device__ __forceinline__ void flush(float* __restrict__ table, unsigned int hidden, unsigned int c) {
        if (idx != ~0u) atomicAdd(table + (unsigned long long)idx * hidden + c, acc);
        idx = ~0u;
        acc = 0.0f;
    }
};

// Launch: block (256, 1, 1) (any blockDim.x); grid (ceil(hidden / 256), min(ceil(rows / 32), 65535), 1)
// — both dimensions grid-stride, so any grid is correct. Thread (x) owns column
// c = blockIdx.x·blockDim.x + threadIdx.x (consecutive lanes: consecutive columns, coalesced
// loads and atomics); blockIdx.y selects a chunk of EMB_BWD_ROWS = 32 rows.
// padding_idx: the word row that gets no gradient, −1 for none.
template <typename T>
__device__ __forceinline__ void embeddings_backward_impl(float* __restrict__ dword, float* __restrict__ dposition,
                                                         float* __restrict__ dtoken_type, const T* __restrict__ dout,
                                                         const unsigned int* __restrict__ ids,
                                                         const unsigned int* __restrict__ positions,
                                                         const unsigned int* __restrict__ type_ids, unsigned int rows,
                                                         unsigned int hidden, int padding_idx) {
    for (unsigned int c = blockIdx.x * blockDim.x + threadIdx.x; c < hidden; c += gridDim.x * blockDim.x) {
        for (unsigned long long r0 = (unsigned long long)blockIdx.y * EMB_BWD_ROWS; r0 < rows;
             r0 += (unsigned long long)gridDim.y * EMB_BWD_ROWS) {
            const unsigned int r1 = (unsigned int)(r0 + EMB_BWD_ROWS < rows ? r0 + EMB_BWD_ROWS : rows);
            EmbRun w{~0u, 0.0f}, p{~0u, 0.0f}, t{~0u, 0.0f};
            for (unsigned int r = (unsigned int)r0; r < r1; ++r) {
                const float g = to_f32(dout[(unsigned long long)r * hidden + c]);
                const unsigned int id = ids[r];
                if (padding_idx < 0 || id != (unsigned int)padding_idx) w.add(dword, id, g, hidden, c);
                p.add(dposition, positions[r], g, hidden, c);
                t.add(dtoken_type, type_ids[r], g, hidden, c);
            }
            w.flush(dword, hidden, c);
            p.flush(dposition, hidden, c);
            t.flush(dtoken_type, hidden, c);
        }
    }
}

#define EMBEDDING_KERNELS(T, SUFFIX)                                                                               \
    extern "C" __global__ void embeddings_forward_##SUFFIX(                                                        \
        T* __restrict__ out, const float* __restrict__ word, const float* __restrict__ position,                   \
        const float* __restrict__ token_type, const unsigned int* __restrict__ ids,                                \
        const unsigned int* __restrict__ positions, const unsigned int* __restrict__ type_ids, unsigned int rows,  \
        unsigned int hidden) {                                                                                     \
        embeddings_forward_impl<T>(out, word, position, token_type, ids, positions, type_ids, rows, hidden);       \
    }                                                                                                              \
    extern "C" __global__ void embeddings_backward_##SUFFIX(                                                       \
        float* __restrict__ dword, float* __restrict__ dposition, float* __restrict__ dtoken_type,                 \
        const T* __restrict__ dout, const unsigned int* __restrict__ ids, const unsigned int* __restrict__ positions, \
        const unsigned int* __restrict__ type_ids, unsigned int rows, unsigned int hidden, int padding_idx) {      \
        embeddings_backward_impl<T>(dword, dposition, dtoken_type, dout, ids, positions, type_ids, rows, hidden,   \
                                    padding_idx);                                                                  \
    }

EMBEDDING_KERNELS(float, f32)
