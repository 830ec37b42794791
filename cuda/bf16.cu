// bf16 GEMM operands: `--precision bf16` rounds each GEMM's two f32 operands to bfloat16
// (1 sign, 8 exponent, 7 mantissa bits) in scratch buffers, and cuBLAS multiplies those on
// the tensor cores with f32 accumulation into an f32 result (src/cuda/gemm.rs). cuBLAS's
// CUBLAS_COMPUTE_32F_FAST_16BF on f32 buffers would only *allow* it that rounding: on an
// H100 it ran those GEMMs in TF32 (docs/perf.md), so the rounding is done here, explicitly.
//
// Math, bit for bit GemmPrecision::Bf16.round (src/backend.rs, the `half` crate): with x the
// f32 bits,
//   NaN:       out = (x >> 16) | 0x0040                (stays NaN, quiet, sign kept)
//   otherwise: out = (x + 0x7FFF + ((x >> 16) & 1)) >> 16   (round to nearest, ties to even;
//              a carry out of the mantissa bumps the exponent, up to ±∞)
//
// Layout: x [n] f32; out [n] u16 (bf16 bits).
// Launch: elementwise, grid-stride, any grid, block 256.

extern "C" __global__ void round_to_bf16(const float* __restrict__ x, unsigned long long n, unsigned short* __restrict__ out)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const unsigned bits = __float_as_uint(x[i]);
        const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
        out[i] = (unsigned short)(nan ? ((bits >> 16) | 0x0040u) : ((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16));
    }
}
