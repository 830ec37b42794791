// Small GEMMs without cuBLAS. The seed step's eight GEMMs are at most 60×100×784: far too
// small to fill a GPU, so their time is latency (launch, a serial K loop, the epilogue),
// and cuBLAS's kernels, tiled for large products, spend several microseconds on each
// (docs/perf.md). These two kernels give every output element its own thread or warp, so
// that all of a product's loads are in flight at once. src/cuda/gemm.rs routes f32
// products of at most SMALL_GEMM_MAX_MACS multiply-adds here: to the dot form for a·bᵀ
// with k ≥ SMALL_GEMM_DOT_MIN_K, else to the outer form with k ≤ SMALL_GEMM_OUTER_MAX_K
// (the rest go to cuBLAS; the seed step's eight all come here).
//
// Math (src/cuda/gemm.rs's row-major convention, cpu::ops::matmul):
//   c[i,j] = Σ_{q<k} A'[i,q]·B'[q,j]  (+ c[i,j] when accumulate),  i < m, j < n
//   A'[i,q] = ta ? a[q·m + i] : a[i·k + q]        (a stored [m,k], or [k,m] when ta)
//   B'[q,j] = tb ? b[j·k + q] : b[q·n + j]        (b stored [k,n], or [n,k] when tb)
// Each output's terms are added in a fixed order (deterministic, no atomics); without
// accumulate, c is never read (it may hold NaN).
//
// small_gemm_dot_f32, for ta = false, tb = true (both operands contiguous in q, as in the
//   forward z = x·Wᵀ): block = 256 threads = 8 groups of 32 lanes; group g of block x owns
//   output o = 8x + g (i = o / n, j = o % n). Lane l adds terms q = l, l+32, … in order
//   (coalesced: a group reads 32 consecutive floats of each row), then the 32 partial sums
//   are added by a fixed pairwise tree in shared memory. Grid: ceil(m·n / 8).
// small_gemm_outer_f32, any transposes: one thread per output, o = 256·blockIdx.x + t,
//   j = o % n fastest (so B'[q,j] is coalesced when !tb and A'[i,q] is one broadcast for a
//   row's threads); terms q = 0..k−1 in order. Grid: ceil(m·n / 256), block 256.

#define SMALL_GEMM_THREADS 256
#define SMALL_GEMM_LANES 32

extern "C" __global__ void small_gemm_dot_f32(
    const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
    unsigned m, unsigned n, unsigned k, int accumulate)
{
    __shared__ float part[SMALL_GEMM_THREADS];
    const unsigned lane = threadIdx.x % SMALL_GEMM_LANES, group = threadIdx.x / SMALL_GEMM_LANES;
    const unsigned long long o = (unsigned long long)blockIdx.x * (SMALL_GEMM_THREADS / SMALL_GEMM_LANES) + group;
    const bool live = o < (unsigned long long)m * n;
    float acc = 0.0f;
    if (live) {
        const float* row = a + (o / n) * k;
        const float* col = b + (o % n) * k;
#pragma unroll 4
        for (unsigned q = lane; q < k; q += SMALL_GEMM_LANES) acc += row[q] * col[q];
    }
    part[threadIdx.x] = acc;
    __syncthreads();
#pragma unroll
    for (unsigned s = SMALL_GEMM_LANES / 2; s > 0; s >>= 1) {
        if (lane < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (live && lane == 0) {
        const float total = part[threadIdx.x];
        c[o] = accumulate ? total + c[o] : total;
    }
}

extern "C" __global__ void small_gemm_outer_f32(
    const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
    unsigned m, unsigned n, unsigned k, int transpose_a, int transpose_b, int accumulate)
{
    const unsigned long long o = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= (unsigned long long)m * n) return;
    const size_t i = o / n, j = o % n;
    // A'[i,q] = a[q·a_step + a_base], B'[q,j] = b[q·b_step + b_base]
    const size_t a_step = transpose_a ? m : 1, a_base = transpose_a ? i : i * k;
    const size_t b_step = transpose_b ? 1 : n, b_base = transpose_b ? j * k : j;
    float acc = 0.0f;
#pragma unroll 8
    for (unsigned q = 0; q < k; ++q) acc += a[q * a_step + a_base] * b[q * b_step + b_base];
    c[o] = accumulate ? acc + c[o] : acc;
}
