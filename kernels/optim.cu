// optim.cu — gradient norm, clipping, fp16 loss scaling and the AdamW update (cpu/optim.rs).
//
// Global norm: sumsq = Σ g² over the flat fp32 gradient buffer (sum_squares_partial, then
// sum_squares_finalize: fp32 per-thread and per-block sums, the block partials added in fp64 in a
// fixed order — deterministic for a given grid and block).
// Clipping, as clip_grad_norm_: coef = min(1, max_norm / (√sumsq + 1e-6)) (computed in f64 from
// the device scalar sumsq, as the CPU does; a NaN coef counts as 1, where torch would multiply
// the gradients by NaN — fp16 skips such a step anyway); g *= coef when coef < 1.
// No host synchronization: the scalar stays on the device.
// AdamW as torch.optim.AdamW (single-tensor path), step t (1-based), per element, in fp32:
//   θ *= 1 − lr·λ (when λ ≠ 0; the factor computed in f64 and rounded to fp32);
//   m = m + (1−β₁)·(g − m); v = β₂·v + (1−β₂)·g²; θ −= step_size·(m / (√v / √(1−β₂ᵗ) + ε)),
//   step_size = lr/(1−β₁ᵗ). The host computes the step's scalars in f64 (as Python floats) and
//   passes them rounded to fp32, except lr (f64, for the decay factor). Every operation is an
//   explicitly rounded intrinsic (__fmul_rn, …), so no FMA contraction changes the result: the
//   update is the CPU reference's, bit for bit, given the same inputs. It is within 1 ulp of
//   torch's, not bit for bit: torch's lerp_ and addcmul_ fuse their multiply-add (about 1 in
//   1000 parameters differs by 1 ulp after a step).
// Dynamic loss scaling, all on the device: scale_by_device multiplies the logits' gradient by the
// scale; unscale_and_check multiplies the gradients by 1/scale and sets a device flag when any
// result is inf or NaN; update_loss_scale applies GradScaler's rule to [scale, growth_tracker];
// adamw_update takes the flag and then leaves everything untouched. No host round trip: the host
// reads the flag one step late to keep its learning-rate schedule and step count exact.
// Layout: parameters, gradients, exp_avg, exp_avg_sq are fp32 flat buffers with the same layout
// (a tensor at the same offset in each); the AdamW segment table lists the tensors to update.
#include "common.cuh"

// ---- Σ g² ----
// Stage 1. Launch: block 1024 (any multiple of 32, ≤ 1024), grid P (any; e.g. 2·SMs); static shared
// memory 128 bytes. Writes partials[blockIdx.x] (fp32 [P]), the block's Σ x², every block
// (a block with no elements writes 0). 128-bit loads when x is 16-byte aligned.
extern "C" __global__ void sum_squares_partial(float* __restrict__ partials, const float* __restrict__ x,
                                               unsigned long long n) {
    __shared__ float scratch[32];
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    float acc = 0.0f;
    unsigned long long done = 0;
    if (is_aligned16(x)) {
        const unsigned long long quads = n / 4;
        for (unsigned long long k = tid; k < quads; k += stride) {
            const float4 q = reinterpret_cast<const float4*>(x)[k];
            acc += q.x * q.x;
            acc += q.y * q.y;
            acc += q.z * q.z;
            acc += q.w * q.w;
        }
        done = quads * 4;
    }
    for (unsigned long long i = done + tid; i < n; i += stride) acc += x[i] * x[i];
    const float total = block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Stage 2. Launch: ONE block of 1024 threads (any multiple of 32, ≤ 1024), grid 1. Static shared
// memory 256 bytes. out[0] = Σ partials[0 .. parts) (added in fp64, rounded to fp32).
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void sum_squares_finalize(float* __restrict__ out, const float* __restrict__ partials,
                                                unsigned int parts) {
    __shared__ double scratch[32];
    const unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    double acc = 0.0;
    for (unsigned int i = threadIdx.x; i < parts; i += blockDim.x) acc += (double)partials[i];
    acc = warp_sum_f64(acc);
    if (lane == 0) scratch[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = warp_sum_f64(lane < warps ? scratch[lane] : 0.0);
        if (lane == 0) out[0] = (float)acc;
    }
}

// ---- clipping ----
// x *= min(1, max_norm / (√sumsq[0] + 1e-6)) when that is < 1 (in place).
// Launch: block 256 (any), grid min(ceil(n / 4 / 256), 16·SMs) (any grid: grid-stride).
extern "C" __global__ void clip_by_global_norm(float* __restrict__ x, unsigned long long n,
                                               const float* __restrict__ sumsq, float max_norm) {
    const double coef = (double)max_norm / (sqrt((double)sumsq[0]) + 1e-6);
    const float c = (float)fmin(coef, 1.0);  // fmin(NaN, 1) = 1, as Rust's f64::min
    if (!(c < 1.0f)) return;
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long done = 0;
    if (is_aligned16(x)) {
        const unsigned long long quads = n / 4;
        float4* x4 = reinterpret_cast<float4*>(x);
        for (unsigned long long k = tid; k < quads; k += stride) {
            float4 q = x4[k];
            q.x *= c;
            q.y *= c;
            q.z *= c;
            q.w *= c;
            x4[k] = q;
        }
        done = quads * 4;
    }
    for (unsigned long long i = done + tid; i < n; i += stride) x[i] *= c;
}

// ---- loss scaling ----
// The scale lives on the device ([scale, growth_tracker], fp32), so that a step never waits for
// the host to learn whether the previous one overflowed.
//
// g *= 1/scale[0] (in place, the reciprocal in fp32); *found_inf = 1.0f if any result is inf or
// NaN (the caller zeroes the flag before; it is never cleared here). The flag is an fp32 element,
// as adamw_update's skip reads it. As torch's _amp_foreach_non_finite_check_and_unscale_, except
// that the check is on the unscaled value (which also catches an overflow of the product).
// Launch: block 256 (any multiple of 32), grid min(ceil(n / 4 / 256), 16·SMs) (any grid).
extern "C" __global__ void unscale_and_check(float* __restrict__ grads, unsigned long long n,
                                             const float* __restrict__ scale, float* __restrict__ found_inf) {
    const float inv_scale = __fdiv_rn(1.0f, scale[0]);
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const float big = 3.40282347e38f;  // FLT_MAX: !(|v| <= big) is inf or NaN
    bool bad = false;
    unsigned long long done = 0;
    if (is_aligned16(grads)) {
        const unsigned long long quads = n / 4;
        float4* g4 = reinterpret_cast<float4*>(grads);
        for (unsigned long long k = tid; k < quads; k += stride) {
            float4 q = g4[k];
            q.x *= inv_scale;
            q.y *= inv_scale;
            q.z *= inv_scale;
            q.w *= inv_scale;
            bad |= !(fabsf(q.x) <= big) | !(fabsf(q.y) <= big) | !(fabsf(q.z) <= big) | !(fabsf(q.w) <= big);
            g4[k] = q;
        }
        done = quads * 4;
    }
    for (unsigned long long i = done + tid; i < n; i += stride) {
        const float v = grads[i] * inv_scale;
        bad |= !(fabsf(v) <= big);
        grads[i] = v;
    }
    if (__any_sync(0xffffffffu, bad) && (threadIdx.x & 31u) == 0) *found_inf = 1.0f;
}

// x *= s[0] (the loss scale applied to the logits' gradient). Launch: any grid, block 256.
extern "C" __global__ void scale_by_device(float* __restrict__ x, unsigned long long n,
                                           const float* __restrict__ s) {
    const float factor = s[0];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = __fmul_rn(x[i], factor);
}

// GradScaler's update (torch._amp_update_scale_) of state = [scale, growth_tracker] from
// found_inf[0]: on an inf/NaN, scale *= backoff and the tracker restarts; else the tracker
// counts the step and, reaching growth_interval, restarts while the scale is multiplied by
// growth (kept if that is not finite). Launch: ONE thread (grid 1, block 1).
extern "C" __global__ void update_loss_scale(float* __restrict__ state, const float* __restrict__ found_inf,
                                             float growth, float backoff, unsigned int growth_interval) {
    const float scale = state[0], tracker = state[1];
    if (found_inf[0] != 0.0f) {
        state[0] = __fmul_rn(scale, backoff);
        state[1] = 0.0f;
    } else if (tracker + 1.0f >= (float)growth_interval) {
        const float grown = __fmul_rn(scale, growth);
        state[0] = isfinite(grown) ? grown : scale;
        state[1] = 0.0f;
    } else {
        state[1] = tracker + 1.0f;
    }
}

// ---- AdamW ----
// One entry of the segment table: the elements [offset, offset + length) of the four buffers,
// with weight decay λ. Host side (Rust): #[repr(C)] struct { offset: u64, length: u64,
// weight_decay: f64 } — 24 bytes, 8-byte aligned. The table may split a large tensor into several
// entries (same λ) to balance the blocks: ~64 Ki elements per entry is a good size.
struct AdamWSegment {
    unsigned long long offset;
    unsigned long long length;
    double weight_decay;
};

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, bool decay_on, float decay,
                                              float step_size, float b1c, float b2, float b2c, float bc2_sqrt,
                                              float eps) {
    if (decay_on) p = __fmul_rn(p, decay);
    m = __fadd_rn(m, __fmul_rn(b1c, __fsub_rn(g, m)));
    v = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(b2c, g), g));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
    p = __fsub_rn(p, __fmul_rn(step_size, __fdiv_rn(m, denom)));
}

// One AdamW step over every segment of the table, in one launch.
//   lr                 learning rate (f64: the decay factor is (float)(1 − lr·λ) computed in f64)
//   step_size          (float)(lr / (1 − β₁ᵗ))
//   one_minus_beta1    (float)(1 − β₁)
//   beta2              (float)β₂
//   one_minus_beta2    (float)(1 − β₂)
//   bias_correction2_sqrt (float)√(1 − β₂ᵗ)
//   eps                (float)ε
//   skip               null, or a device flag (unscale_and_check's fp32 found_inf): when it is non-zero
//                      nothing is written (the caller then also keeps its step count).
// Launch: block 256 (any), grid = number of segments (any grid: blocks stride over the segments,
// threads over the elements of one). No shared memory. 128-bit accesses when the four buffers
// are 16-byte aligned and the segment's offset is a multiple of 4; otherwise scalar.
extern "C" __global__ void adamw_update(float* __restrict__ param, const float* __restrict__ grad,
                                        float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                        const AdamWSegment* __restrict__ segments, unsigned int num_segments,
                                        double lr, float step_size, float one_minus_beta1, float beta2,
                                        float one_minus_beta2, float bias_correction2_sqrt, float eps,
                                        const float* __restrict__ skip) {
    if (skip != nullptr && *skip != 0.0f) return;
    const bool aligned =
        is_aligned16(param) && is_aligned16(grad) && is_aligned16(exp_avg) && is_aligned16(exp_avg_sq);
    for (unsigned int s = blockIdx.x; s < num_segments; s += gridDim.x) {
        const AdamWSegment seg = segments[s];
        const bool decay_on = seg.weight_decay != 0.0;
        const float decay = (float)__dsub_rn(1.0, __dmul_rn(lr, seg.weight_decay));
        float* __restrict__ p = param + seg.offset;
        const float* __restrict__ g = grad + seg.offset;
        float* __restrict__ m = exp_avg + seg.offset;
        float* __restrict__ v = exp_avg_sq + seg.offset;
        unsigned long long done = 0;
        if (aligned && seg.offset % 4 == 0) {
            const unsigned long long quads = seg.length / 4;
            for (unsigned long long k = threadIdx.x; k < quads; k += blockDim.x) {
                float4 pq = reinterpret_cast<float4*>(p)[k];
                const float4 gq = reinterpret_cast<const float4*>(g)[k];
                float4 mq = reinterpret_cast<float4*>(m)[k];
                float4 vq = reinterpret_cast<float4*>(v)[k];
                adamw_element(pq.x, gq.x, mq.x, vq.x, decay_on, decay, step_size, one_minus_beta1, beta2,
                              one_minus_beta2, bias_correction2_sqrt, eps);
                adamw_element(pq.y, gq.y, mq.y, vq.y, decay_on, decay, step_size, one_minus_beta1, beta2,
                              one_minus_beta2, bias_correction2_sqrt, eps);
                adamw_element(pq.z, gq.z, mq.z, vq.z, decay_on, decay, step_size, one_minus_beta1, beta2,
                              one_minus_beta2, bias_correction2_sqrt, eps);
                adamw_element(pq.w, gq.w, mq.w, vq.w, decay_on, decay, step_size, one_minus_beta1, beta2,
                              one_minus_beta2, bias_correction2_sqrt, eps);
                reinterpret_cast<float4*>(p)[k] = pq;
                reinterpret_cast<float4*>(m)[k] = mq;
                reinterpret_cast<float4*>(v)[k] = vq;
            }
            done = quads * 4;
        }
        for (unsigned long long i = done + threadIdx.x; i < seg.length; i += blockDim.x) {
            float pv = p[i], mv = m[i], vv = v[i];
            adamw_element(pv, g[i], mv, vv, decay_on, decay, step_size, one_minus_beta1, beta2, one_minus_beta2,
                          bias_correction2_sqrt, eps);
            p[i] = pv;
            m[i] = mv;
            v[i] = vv;
        }
    }
}
