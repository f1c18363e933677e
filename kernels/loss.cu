// loss.cu — softmax cross-entropy with label smoothing ε, per row of [rows, classes] logits
// (cpu/loss.rs).
//
// lse = logsumexp(z) = max + log Σ_c exp(z_c − max),  log p_c = z_c − lse,
// loss = (1−ε)·(−log p_y) + ε·mean_c(−log p_c) = (1−ε)·(lse − z_y) + ε·(lse − Σ_c z_c / C)
//        (= PyTorch's cross_entropy(label_smoothing=ε)),
// dz_c = scale·(p_c − (1−ε)·[c = y] − ε/C)   (overwrites dlogits).
// cross_entropy_forward writes the losses, cross_entropy_backward the gradient, and
// cross_entropy_forward_backward both (the training step): one log-sum-exp per row instead of
// two, from the same device functions, so the same bits as the other two. Its arguments:
// (losses, dlogits, logits, labels, rows, classes, smoothing, scale).
// The caller reduces `losses` (the mean over rows) and passes scale = 1/rows to backward.
// The label IGNORE_LABEL (0xffffffff, PyTorch's ignore_index; Rust's backend::IGNORE_LABEL) marks
// a row the loss leaves out — the dummy sequences a batch is padded with to its sequence bucket:
// its loss and its gradient row are exactly 0 (whatever the logits and scale), and the caller's
// mean does not count it. Any other label ≥ classes (the CPU reference panics) gives a NaN loss
// and a NaN gradient row.
// Layout: logits, dlogits T [rows, classes] (T = fp32: the _f32 kernels); labels u32 [rows];
// losses fp32 [rows]. Math in fp32 (the CPU reference uses f64).
// Only the fp32 instance (_f32) is compiled: the model keeps these tensors in fp32 under every
// precision (16 bits are for GEMM operands), so a 16-bit instance would be code no caller runs.
#include "common.cuh"

// The label of a row the loss leaves out (loss 0, gradient 0).
#define IGNORE_LABEL 0xffffffffu

// Launch (all three): one warp per row. block (256, 1, 1) (any multiple of 32, ≤ 1024), grid
// (ceil(rows / (blockDim.x/32)), 1, 1); grid-stride over rows, so any grid is correct. No shared
// memory. The lanes stride over the classes (any number of classes).

// max, Σ z and lse of row z, on every lane of the warp.
template <typename T>
__device__ __forceinline__ float row_lse(const T* __restrict__ z, unsigned int classes, unsigned int lane,
                                         float* sum_z) {
    float m = -__int_as_float(0x7f800000), s = 0.0f;  // −inf
    for (unsigned int c = lane; c < classes; c += 32u) {
        const float v = to_f32(z[c]);
        m = fmaxf(m, v);
        s += v;
    }
    m = warp_max(m);
    *sum_z = warp_sum(s);
    float e = 0.0f;
    for (unsigned int c = lane; c < classes; c += 32u) e += expf(to_f32(z[c]) - m);
    return m + logf(warp_sum(e));
}

// Row z's loss for label y, from its lse and Σ z.
template <typename T>
__device__ __forceinline__ float row_loss(const T* __restrict__ z, unsigned int y, unsigned int classes,
                                          float lse, float sum_z, float smoothing) {
    if (y == IGNORE_LABEL) return 0.0f;
    if (y >= classes) return __int_as_float(0x7fffffff);  // NaN: label out of range
    const float nll_y = lse - to_f32(z[y]);
    const float mean_nll = lse - sum_z / (float)classes;
    return (1.0f - smoothing) * nll_y + smoothing * mean_nll;
}

// Row z's gradient into dz for label y, from its lse; the lanes stride over the classes.
template <typename T>
__device__ __forceinline__ void row_grad(T* __restrict__ dz, const T* __restrict__ z, unsigned int y,
                                         unsigned int classes, unsigned int lane, float lse, float smoothing,
                                         float scale) {
    const float uniform = smoothing / (float)classes, on = 1.0f - smoothing;
    for (unsigned int c = lane; c < classes; c += 32u) {
        float d = __int_as_float(0x7fffffff);  // NaN: label out of range
        if (y == IGNORE_LABEL) {
            d = 0.0f;
        } else if (y < classes) {
            const float target = (c == y ? on : 0.0f) + uniform;
            d = scale * (expf(to_f32(z[c]) - lse) - target);
        }
        dz[c] = from_f32<T>(d);
    }
}

// Losses (unless `losses` is null) and gradient rows (unless `dlogits` is null) of every row, one
// warp per row. The three kernels are this with one or both outputs: a null output is a constant
// after inlining, so its code is compiled out.
template <typename T>
__device__ __forceinline__ void cross_entropy_impl(float* __restrict__ losses, T* __restrict__ dlogits,
                                                   const T* __restrict__ logits,
                                                   const unsigned int* __restrict__ labels, unsigned int rows,
                                                   unsigned int classes, float smoothing, float scale) {
    const unsigned int lane = threadIdx.x & 31u, warps = blockDim.x >> 5;
    for (unsigned int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
        const unsigned long long base = (unsigned long long)row * classes;
        float sum_z;
        const float lse = row_lse(logits + base, classes, lane, &sum_z);
        const unsigned int y = labels[row];
        if (losses && lane == 0) losses[row] = row_loss(logits + base, y, classes, lse, sum_z, smoothing);
        if (dlogits) row_grad(dlogits + base, logits + base, y, classes, lane, lse, smoothing, scale);
    }
}

#define LOSS_KERNELS(T, SUFFIX)                                                                                        \
    extern "C" __global__ void cross_entropy_forward_##SUFFIX(float* __restrict__ losses,                              \
                                                              const T* __restrict__ logits,                            \
                                                              const unsigned int* __restrict__ labels,                 \
                                                              unsigned int rows, unsigned int classes,                 \
                                                              float smoothing) {                                       \
        cross_entropy_impl<T>(losses, nullptr, logits, labels, rows, classes, smoothing, 0.0f);                        \
    }                                                                                                                  \
    extern "C" __global__ void cross_entropy_backward_##SUFFIX(T* __restrict__ dlogits, const T* __restrict__ logits,  \
                                                               const unsigned int* __restrict__ labels,                \
                                                               unsigned int rows, unsigned int classes,                \
                                                               float smoothing, float scale) {                         \
        cross_entropy_impl<T>(nullptr, dlogits, logits, labels, rows, classes, smoothing, scale);                      \
    }                                                                                                                  \
    extern "C" __global__ void cross_entropy_forward_backward_##SUFFIX(                                                \
        float* __restrict__ losses, T* __restrict__ dlogits, const T* __restrict__ logits,                             \
        const unsigned int* __restrict__ labels, unsigned int rows, unsigned int classes, float smoothing,             \
        float scale) {                                                                                                 \
        cross_entropy_impl<T>(losses, dlogits, logits, labels, rows, classes, smoothing, scale);                       \
    }

LOSS_KERNELS(float, f32)
