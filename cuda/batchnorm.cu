// Batch normalization fused with the activation that follows it.
//
// Forward, training (cpu::ops::batch_norm_forward_train + activation_forward):
//   μ_c = (Σ_r z[r,c]) · (1/B)                      two passes: no E[z²]−E[z]² cancellation
//   σ²_c = (Σ_r (z[r,c] − μ_c)²) · (1/B)            biased
//   inv_std_c = 1/√(σ²_c + ε)
//   x̂[r,c] = (z[r,c] − μ_c)·inv_std_c,  y = γ_c·x̂ + β_c,  a = act(y)
//   Saves μ, σ², inv_std and x̂ for the backward pass and the running statistics.
//   With B = 1 this gives μ = z, σ² = 0, x̂ = 0 (prediction one by one with batch stats).
// Forward, inference (cpu::ops::batch_norm_forward_infer): with population μ, σ²,
//   s_c = γ_c/√(σ²_c + ε),  y = (z − μ_c)·s_c + β_c,  a = act(y).
// Backward through the activation and BN (cpu::ops::activation_backward +
//   batch_norm_backward), dy = act'(da) recomputed on the fly from the saved a:
//   dβ_c = Σ_r dy,  dγ_c = Σ_r dy·x̂,
//   dz = (γ_c·inv_std_c / B)·(B·dy − dβ_c − x̂·dγ_c).
//
// Forward, training, split over rows (tall batches: the test split's 10 000 rows, where the
//   column kernel's ceil(C/TILE_COLS) blocks, 13 for the seed's 100 features, leave most SMs
//   idle): part p of R rows (the last may be shorter) gives its moments
//     m_p = (Σ_{r∈p} z[r,c]) / n_p,   M2_p = Σ_{r∈p} (z[r,c] − m_p)²      (two passes)
//   and the last block of each column group to finish (it takes the group's last ticket)
//   merges them (Chan, Golub and LeVeque's pairwise update of sets A and B, in a fixed tree):
//     n = n_A + n_B,  δ = m_B − m_A,  m = m_A + δ·n_B/n,  M2 = M2_A + M2_B + δ²·n_A·n_B/n
//   into μ_c, σ²_c = M2/B and inv_std_c. A second kernel then normalizes every part's rows.
//
// Layout: z, x̂, y, a, da, dz: [B, C] row-major; γ, β, μ, σ², inv_std, dγ, dβ: [C];
//   the split's moments: [2, P, C] (every part's m_p, then every part's M2_p); its tickets:
//   [ceil(C/TILE_COLS)] u32, zero between launches (the merging block resets its group's).
// Launch: column kernels (train forward, backward): grid.x = ceil(C/TILE_COLS), block
//   (TILE_COLS, TILE_ROWS), see common.cuh; sums are over rows in a fixed order (deterministic, no atomics).
//   The split forward's two kernels: the same, with grid.y = P = ceil(B/R) parts; the
//   moments are merged once a column group (one block), not in each of its P blocks. Its
//   atomic ticket only elects the merging block: the merge's order is fixed, so its results
//   are as deterministic as the column kernels'.
//   Inference forward: elementwise, grid-stride, any grid, block 256.
// `y` may be null (only evaluation with a probe needs the activation input).

#include "common.cuh"

// Rows first … first+count−1 of column c: x̂ = (z − μ)·inv_std, y = γx̂ + β, a = act(y).
__device__ __forceinline__ void normalize_column(
    const float* __restrict__ z, float g, float b, int activation, unsigned first, unsigned count, unsigned width,
    unsigned c, float mu, float istd, float* __restrict__ x_hat, float* __restrict__ y, float* __restrict__ a)
{
    auto z_at = [&](unsigned r) { return z[(size_t)(first + r) * width + c]; };
    for_column_rows(count, z_at, [&](unsigned r, float v) {
        const size_t i = (size_t)(first + r) * width + c;
        const float xh = (v - mu) * istd;
        const float yv = g * xh + b;
        x_hat[i] = xh;
        if (y != nullptr) y[i] = yv;
        a[i] = activate(activation, yv);
    });
}

extern "C" __global__ void bn_act_fwd_train_f32(
    const float* __restrict__ z, const float* __restrict__ gamma, const float* __restrict__ beta,
    float epsilon, int activation, unsigned rows, unsigned width,
    float* __restrict__ mean, float* __restrict__ var, float* __restrict__ inv_std,
    float* __restrict__ x_hat, float* __restrict__ y, float* __restrict__ a)
{
    __shared__ float part[TILE_ROWS][TILE_COLS];
    const unsigned c = blockIdx.x * TILE_COLS + threadIdx.x;
    const bool live = c < width;
    const float inv_rows = 1.0f / (float)rows;

    auto z_at = [&](unsigned r) { return z[(size_t)r * width + c]; };
    float s = 0.0f;
    if (live) for_column_rows(rows, z_at, [&](unsigned, float v) { s += v; });
    const float mu = column_total(part, s) * inv_rows;

    float q = 0.0f;
    if (live)
        for_column_rows(rows, z_at, [&](unsigned, float v) {
            const float d = v - mu;
            q += d * d;
        });
    const float sigma2 = column_total(part, q) * inv_rows;
    if (!live) return;  // no barrier follows

    const float istd = 1.0f / sqrtf(sigma2 + epsilon);
    if (threadIdx.y == 0) {
        mean[c] = mu;
        var[c] = sigma2;
        inv_std[c] = istd;
    }
    normalize_column(z, gamma[c], beta[c], activation, 0, rows, width, c, mu, istd, x_hat, y, a);
}

// Rows of part p of the split forward (all part_rows but the last's; p < ceil(rows/part_rows)).
__device__ __forceinline__ unsigned rows_of_part(unsigned rows, unsigned part_rows, unsigned p) {
    const unsigned left = rows - p * part_rows;
    return left < part_rows ? left : part_rows;
}

// Rows n, mean and M2 (the sum of squared deviations from the mean) of a set of rows.
struct PartMoments { float n, mean, m2; };

// Moments of the union of the disjoint row sets a and b (Chan, Golub and LeVeque); an
// empty set leaves the other as it is (without the check, δ² of a mean past ~1.8e19 would
// overflow and 0·∞ give NaN).
__device__ __forceinline__ PartMoments merge_moments(PartMoments a, PartMoments b) {
    if (b.n == 0.0f) return a;
    if (a.n == 0.0f) return b;
    const float n = a.n + b.n;
    const float delta = b.mean - a.mean;
    return PartMoments{n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// The split forward's first kernel: part blockIdx.y's moments m_p and M2_p; then the last
// block of the column group to finish merges every part's into the batch statistics.
extern "C" __global__ void bn_column_moments_f32(
    const float* __restrict__ z, unsigned rows, unsigned width, unsigned part_rows, float epsilon,
    float* __restrict__ moments, unsigned* __restrict__ tickets,
    float* __restrict__ mean, float* __restrict__ var, float* __restrict__ inv_std)
{
    __shared__ float part[TILE_ROWS][TILE_COLS];
    __shared__ bool last_of_group;
    const unsigned c = blockIdx.x * TILE_COLS + threadIdx.x;
    const bool live = c < width;
    const unsigned parts = gridDim.y;
    const unsigned first = blockIdx.y * part_rows;
    const unsigned count = rows_of_part(rows, part_rows, blockIdx.y);
    auto z_at = [&](unsigned r) { return z[(size_t)(first + r) * width + c]; };
    float s = 0.0f;
    if (live) for_column_rows(count, z_at, [&](unsigned, float v) { s += v; });
    const float m = column_total(part, s) / (float)count;
    float q = 0.0f;
    if (live)
        for_column_rows(count, z_at, [&](unsigned, float v) {
            const float d = v - m;
            q += d * d;
        });
    const float m2 = column_total(part, q);
    if (live && threadIdx.y == 0) {
        moments[(size_t)blockIdx.y * width + c] = m;
        moments[(size_t)(parts + blockIdx.y) * width + c] = m2;
    }
    // This part's moments, then the ticket: the fence orders the writes before the ticket
    // the block takes after the barrier. (Merging in each block of the second kernel took
    // 24.6 µs a launch on the test split, H200, docs/perf.md: 520 blocks, each waiting on a
    // serial merge of 40 parts.)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) last_of_group = atomicAdd(tickets + blockIdx.x, 1u) == parts - 1;
    __syncthreads();
    if (!last_of_group) return;  // the same for the whole block: no barrier is left waiting
    if (threadIdx.x == 0 && threadIdx.y == 0) tickets[blockIdx.x] = 0u;  // every part has taken its ticket
    __threadfence();
    // Thread row y merges parts y, y + TILE_ROWS, … in order (one part each for up to
    // TILE_ROWS parts: one L2 round trip), then the rows' merges combine by a fixed pairwise
    // tree, as column_total's sums: deterministic, and log2(TILE_ROWS) steps deep, not P.
    __shared__ PartMoments merged[TILE_ROWS][TILE_COLS];
    PartMoments row_moments{0.0f, 0.0f, 0.0f};
    if (live)
        for (unsigned p = threadIdx.y; p < parts; p += TILE_ROWS)
            row_moments = merge_moments(row_moments, PartMoments{(float)rows_of_part(rows, part_rows, p),
                                                 LOAD_PAST_L1(moments + (size_t)p * width + c),
                                                 LOAD_PAST_L1(moments + (size_t)(parts + p) * width + c)});
    merged[threadIdx.y][threadIdx.x] = row_moments;
    __syncthreads();
#pragma unroll
    for (unsigned step = TILE_ROWS / 2; step > 0; step >>= 1) {
        if (threadIdx.y < step)
            merged[threadIdx.y][threadIdx.x] = merge_moments(merged[threadIdx.y][threadIdx.x], merged[threadIdx.y + step][threadIdx.x]);
        __syncthreads();
    }
    if (!live || threadIdx.y != 0) return;
    const float sigma2 = merged[0][threadIdx.x].m2 / (float)rows;
    mean[c] = merged[0][threadIdx.x].mean;
    var[c] = sigma2;
    inv_std[c] = 1.0f / sqrtf(sigma2 + epsilon);
}

// The split forward's second kernel: x̂, y and a for part blockIdx.y's rows, with the batch
// statistics bn_column_moments_f32 merged.
extern "C" __global__ void bn_act_fwd_train_parts_f32(
    const float* __restrict__ z, const float* __restrict__ gamma, const float* __restrict__ beta,
    int activation, unsigned rows, unsigned width, unsigned part_rows,
    const float* __restrict__ mean, const float* __restrict__ inv_std,
    float* __restrict__ x_hat, float* __restrict__ y, float* __restrict__ a)
{
    const unsigned c = blockIdx.x * TILE_COLS + threadIdx.x;
    if (c >= width) return;
    normalize_column(z, gamma[c], beta[c], activation, blockIdx.y * part_rows, rows_of_part(rows, part_rows, blockIdx.y),
                     width, c, mean[c], inv_std[c], x_hat, y, a);
}

extern "C" __global__ void bn_act_fwd_infer_f32(
    const float* __restrict__ z, const float* __restrict__ gamma, const float* __restrict__ beta,
    const float* __restrict__ mean, const float* __restrict__ var,
    float epsilon, int activation, unsigned rows, unsigned width,
    float* __restrict__ y, float* __restrict__ a)
{
    const size_t n = (size_t)rows * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const unsigned c = (unsigned)(i % width);
        const float scale = gamma[c] / sqrtf(var[c] + epsilon);
        const float yv = (z[i] - mean[c]) * scale + beta[c];
        if (y != nullptr) y[i] = yv;
        a[i] = activate(activation, yv);
    }
}

extern "C" __global__ void act_bn_bwd_f32(
    const float* __restrict__ da, const float* __restrict__ a, const float* __restrict__ x_hat,
    const float* __restrict__ gamma, const float* __restrict__ inv_std,
    int activation, unsigned rows, unsigned width,
    float* __restrict__ dz, float* __restrict__ d_gamma, float* __restrict__ d_beta)
{
    __shared__ float part[TILE_ROWS][TILE_COLS];
    const unsigned c = blockIdx.x * TILE_COLS + threadIdx.x;
    const bool live = c < width;

    // A row's a, da and x̂, loaded together.
    struct Row { float a, da, x_hat; };
    auto row_at = [&](unsigned r) {
        const size_t i = (size_t)r * width + c;
        return Row{a[i], da[i], x_hat[i]};
    };
    float sb = 0.0f, sg = 0.0f;
    if (live)
        for_column_rows(rows, row_at, [&](unsigned, Row v) {
            const float dy = activate_backward(activation, v.a, v.da);
            sb += dy;
            sg += dy * v.x_hat;
        });
    const float db = column_total(part, sb);
    const float dg = column_total(part, sg);
    if (!live) return;  // no barrier follows

    if (threadIdx.y == 0) {
        d_beta[c] = db;
        d_gamma[c] = dg;
    }
    const float batch = (float)rows;
    const float k = gamma[c] * inv_std[c] / batch;
    for_column_rows(rows, row_at, [&](unsigned r, Row v) {
        const float dy = activate_backward(activation, v.a, v.da);
        dz[(size_t)r * width + c] = k * (batch * dy - db - v.x_hat * dg);
    });
}
