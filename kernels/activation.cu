// activation.cu — element-wise activations (cpu/activation.rs).
//
// act = 0  gelu (exact, erf): y = 0.5·x·(1 + erf(x/√2)),   y' = Φ(x) + x·φ(x),
//                             Φ(x) = 0.5·(1 + erf(x/√2)), φ(x) = e^(−x²/2)/√(2π)
// act = 1  gelu (tanh):       y = 0.5·x·(1 + tanh u), u = √(2/π)·(x + 0.044715·x³),
//                             y' = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh²u)·√(2/π)·(1 + 3·0.044715·x²)
// act = 2  relu:              y = max(x, 0), y' = [x > 0]
// (the order of the Activation enum; any other value fills the output with NaN: a bad launch is loud)
// tanh (the pooler):          y = tanh x, y' = 1 − y² (backward reads the forward output y).
// Backward: dx = dout·y'(x) (overwrites dx). (The feed-forward bias is added inside its GEMM:
//   cuBLASLt's bias epilogue, or a rank-1 GEMM, src/backend/cuda/lt.rs.)
// activation_backward_x_{f16,bf16}: the same backward with x stored in 16 bits (the feed-forward
//   pre-activation kept in the GEMMs' format), dx and dout fp32.
// Layout: all tensors flat (n elements), fp32 (the _f32 kernels) or T (activation_forward_<T>);
// the _x_ kernels' dx, dout fp32 beside x 16-bit.
// Math in fp32 with the CPU's constants and order of operations, except that NVRTC's default
// --fmad=true contracts a multiply and an add into one FMA (x + 0.044715·x³, for one), so results
// differ from the CPU's by ulps; erff/expf/tanhf are CUDA's full-precision functions (the
// launcher must not compile with --use_fast_math).
#include "common.cuh"

#define SQRT_2_OVER_PI 0.7978846f
#define INV_SQRT_2 0.70710678118654752f
#define INV_SQRT_2PI 0.3989423f

template <int ACT> __device__ __forceinline__ float act_value(float x) {
    if (ACT == 0) return 0.5f * x * (1.0f + erff(x * INV_SQRT_2));
    if (ACT == 1) {
        const float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    return fmaxf(x, 0.0f);
}

template <int ACT> __device__ __forceinline__ float act_derivative(float x) {
    if (ACT == 0) {
        const float cdf = 0.5f * (1.0f + erff(x * INV_SQRT_2));
        return cdf + x * INV_SQRT_2PI * expf(-0.5f * x * x);
    }
    if (ACT == 1) {
        const float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
        const float t = tanhf(u);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
    }
    return x > 0.0f ? 1.0f : 0.0f;
}

template <int ACT> struct ActForward {
    __device__ __forceinline__ float operator()(float x) const { return act_value<ACT>(x); }
};
template <int ACT> struct ActBackward {
    __device__ __forceinline__ float operator()(float g, float x) const { return g * act_derivative<ACT>(x); }
};
struct TanhForward {
    __device__ __forceinline__ float operator()(float x) const { return tanhf(x); }
};
struct TanhBackward {
    __device__ __forceinline__ float operator()(float g, float y) const { return g * (1.0f - y * y); }
};

// An unknown `act`: out is filled with NaN, so that a bad launch cannot pass unnoticed.
template <typename T> __device__ __forceinline__ void fill_nan(T* __restrict__ out, unsigned long long n) {
    const T nan = from_f32<T>(__int_as_float(0x7fffffff));
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = nan;
}

// out[i] = f(a[i]) and out[i] = f(a[i], b[i]) over n elements. Grid-stride: packs of N = Pack<T>::N
// elements with 128-bit accesses when every pointer is 16-byte aligned, then the tail (or, when
// unaligned, everything) one element at a time.
template <typename T, typename F>
__device__ __forceinline__ void map1(T* __restrict__ out, const T* __restrict__ a, unsigned long long n, F f) {
    constexpr int N = Pack<T>::N;
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long done = 0;
    if (is_aligned16(out) && is_aligned16(a)) {
        const unsigned long long packs = n / N;
        for (unsigned long long k = tid; k < packs; k += stride) {
            float v[N];
            ld_pack_f32(a + k * N, v);
#pragma unroll
            for (int j = 0; j < N; ++j) v[j] = f(v[j]);
            st_pack_f32(out + k * N, v);
        }
        done = packs * N;
    }
    for (unsigned long long i = done + tid; i < n; i += stride) out[i] = from_f32<T>(f(to_f32(a[i])));
}

// out[i] = f(a[i], b[i]) with out and a fp32, b fp32 or 16-bit (U): packs of N = Pack<U>::N
// elements (4 fp32, 8 16-bit), b with one 128-bit load and a, out with N/4 each, when all three
// are 16-byte aligned (N floats from an aligned start stay aligned); then the tail, or
// everything, one element at a time.
template <typename U, typename F>
__device__ __forceinline__ void map2(float* __restrict__ out, const float* __restrict__ a,
                                              const U* __restrict__ b, unsigned long long n, F f) {
    constexpr int N = Pack<U>::N;
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long done = 0;
    if (is_aligned16(out) && is_aligned16(a) && is_aligned16(b)) {
        const unsigned long long packs = n / N;
        for (unsigned long long k = tid; k < packs; k += stride) {
            float u[N], v[N];
            ld_f32xN<N>(a + k * N, u);
            ld_pack_f32(b + k * N, v);
#pragma unroll
            for (int j = 0; j < N; ++j) u[j] = f(u[j], v[j]);
            st_f32xN<N>(out + k * N, u);
        }
        done = packs * N;
    }
    for (unsigned long long i = done + tid; i < n; i += stride) out[i] = f(a[i], to_f32(b[i]));
}

// Launch (activation_*, tanh_*): block 256 (any), grid min(ceil(n / 4 / 256), 16·SMs) (any grid;
// grid-stride; a 16-bit pack is 8 elements, so small 16-bit launches have up to twice the blocks
// they need). No shared memory.
// activation_forward_<T>: T = f32, and f16/bf16 for the feed-forward activation stored in the
// GEMMs' 16-bit format (its pre-activation stored so too).
#define ACTIVATION_FORWARD(T, SUFFIX)                                                                              \
    extern "C" __global__ void activation_forward_##SUFFIX(T* __restrict__ out, const T* __restrict__ x,           \
                                                           unsigned long long n, int act) {                        \
        switch (act) {                                                                                             \
            case 0: map1(out, x, n, ActForward<0>()); break;                                                       \
            case 1: map1(out, x, n, ActForward<1>()); break;                                                       \
            case 2: map1(out, x, n, ActForward<2>()); break;                                                       \
            default: fill_nan(out, n); break;                                                                      \
        }                                                                                                          \
    }

ACTIVATION_FORWARD(float, f32)
ACTIVATION_FORWARD(__half, f16)
ACTIVATION_FORWARD(__nv_bfloat16, bf16)

// The backward: dx and dout fp32 (the gradients are fp32 under every precision); x fp32, or
// 16-bit for the feed-forward pre-activation stored in the GEMMs' format (the _x_ kernels).
#define ACTIVATION_BACKWARD(U, NAME)                                                                               \
    extern "C" __global__ void NAME(float* __restrict__ dx, const float* __restrict__ dout, const U* __restrict__ x, \
                                    unsigned long long n, int act) {                                               \
        switch (act) {                                                                                             \
            case 0: map2(dx, dout, x, n, ActBackward<0>()); break;                                                 \
            case 1: map2(dx, dout, x, n, ActBackward<1>()); break;                                                 \
            case 2: map2(dx, dout, x, n, ActBackward<2>()); break;                                                 \
            default: fill_nan(dx, n); break;                                                                       \
        }                                                                                                          \
    }

ACTIVATION_BACKWARD(float, activation_backward_f32)
ACTIVATION_BACKWARD(__half, activation_backward_x_f16)
ACTIVATION_BACKWARD(__nv_bfloat16, activation_backward_x_bf16)

// The pooler's tanh: fp32 only.
extern "C" __global__ void tanh_forward_f32(float* __restrict__ out, const float* __restrict__ x, unsigned long long n) {
    map1(out, x, n, TanhForward());
}

extern "C" __global__ void tanh_backward_f32(float* __restrict__ dx, const float* __restrict__ dout,
                                             const float* __restrict__ y, unsigned long long n) {
    map2(dx, dout, y, n, TanhBackward());
}
