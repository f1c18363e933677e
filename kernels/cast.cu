// cast.cu — element-wise conversions from fp32 to the 16-bit formats (fp16, bf16). (Nothing
// casts back on the device: 16-bit tensors are GEMM operands, read by cuBLAS and the kernels.)
//
// Math: y[i] = convert(x[i]) for i in [0, n).
//   fp32 -> fp16: IEEE round-to-nearest-even (__float2half_rn); beyond ±65504 gives ±inf,
//                 below 2^-24 rounds to ±0 (or a subnormal); NaN stays NaN.
//   fp32 -> bf16: round-to-nearest-even of the top 16 bits (__float2bfloat16_rn); same range
//                 as fp32, 8 bits of mantissa; NaN stays NaN.
// These are the roundings PyTorch's .half() / .bfloat16() use, so a cast here and one there
// give the same bits.
//
// Layout: x and y are flat, contiguous arrays of n elements each, not aliased; n is 64-bit so a
// tensor of more than 2^31 elements is one launch. Any grid works: each thread walks the array
// with a grid-sized stride (e.g. 256 threads per block, min(ceil(n / 256), 32 * SMs) blocks).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define CAST_KERNEL(NAME, IN, OUT, CONVERT)                                                 \
    extern "C" __global__ void NAME(const IN* __restrict__ x, OUT* __restrict__ y,          \
                                    unsigned long long n) {                                 \
        const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;       \
        for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
             i < n; i += stride) {                                                          \
            y[i] = CONVERT(x[i]);                                                           \
        }                                                                                   \
    }

CAST_KERNEL(cast_f32_to_f16, float, __half, __float2half_rn)
CAST_KERNEL(cast_f32_to_bf16, float, __nv_bfloat16, __float2bfloat16_rn)
