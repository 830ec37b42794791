// Counting non-finite values: the divergence check at every evaluation point reads back one
// count instead of every parameter and running statistic (train::evaluate_point; only when
// the count is not 0 does the host read everything, to name the tensor).
//
// Math: count[0] += #{ i < n : x[i] is NaN or ±∞ }  (|x| ≤ FLT_MAX is false for exactly those).
//
// Layout: x [n] f32; count [1] u32, zeroed by the caller before the first of its launches.
// Launch: elementwise, grid-stride, any grid, block 256. Integer atomics: the count does not
//   depend on the order in which blocks add.

extern "C" __global__ void count_non_finite_f32(const float* __restrict__ x, unsigned long long n, unsigned* __restrict__ count)
{
    unsigned local = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        local += fabsf(x[i]) <= 3.402823466e38f ? 0u : 1u;
    if (local != 0) atomicAdd(count, local);
}
