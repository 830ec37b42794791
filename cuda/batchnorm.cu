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
//   and every block merges them in the order p = 0, 1, … (Chan, Golub and LeVeque's pairwise
//   update; all blocks get the same μ, σ²):
//     n ← n + n_p,  δ = m_p − μ,  μ ← μ + δ·n_p/n,  M2 ← M2 + M2_p + δ²·(n − n_p)·n_p/n
//   then σ²_c = M2/B and the normalization above for its own part's rows.
//
// Layout: z, x̂, y, a, da, dz: [B, C] row-major; γ, β, μ, σ², inv_std, dγ, dβ: [C];
//   the split's moments: [2, P, C] (every part's m_p, then every part's M2_p).
// Launch: column kernels (train forward, backward): grid.x = ceil(C/TILE_COLS), block
//   (TILE_COLS, TILE_ROWS), see common.cuh; sums are over rows in a fixed order (deterministic, no atomics).
//   The split forward's two kernels: the same, with grid.y = P = ceil(B/R) parts.
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

// The split forward's first kernel: part blockIdx.y's moments m_p and M2_p.
extern "C" __global__ void bn_column_moments_f32(
    const float* __restrict__ z, unsigned rows, unsigned width, unsigned part_rows, float* __restrict__ moments)
{
    __shared__ float part[TILE_ROWS][TILE_COLS];
    const unsigned c = blockIdx.x * TILE_COLS + threadIdx.x;
    const bool live = c < width;
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
        moments[(size_t)(gridDim.y + blockIdx.y) * width + c] = m2;
    }
}

#define MERGE_LOADS 16

// The split forward's second kernel: the merged statistics (written by the blocks of part 0),
// then x̂, y and a for part blockIdx.y's rows.
extern "C" __global__ void bn_act_fwd_train_parts_f32(
    const float* __restrict__ z, const float* __restrict__ gamma, const float* __restrict__ beta,
    float epsilon, int activation, unsigned rows, unsigned width, unsigned part_rows,
    const float* __restrict__ moments,
    float* __restrict__ mean, float* __restrict__ var, float* __restrict__ inv_std,
    float* __restrict__ x_hat, float* __restrict__ y, float* __restrict__ a)
{
    // Thread row 0 merges the parts for the block's columns and shares μ and inv_std: the
    // other 63 would only repeat it (with every thread merging, a launch on the test split's
    // 10000 × 100 took 39.9 µs on an H200; so, 24.6 µs).
    __shared__ float column_mu[TILE_COLS], column_istd[TILE_COLS];
    const unsigned c = blockIdx.x * TILE_COLS + threadIdx.x;
    const bool live = c < width;
    if (live && threadIdx.y == 0) {
        const unsigned parts = gridDim.y;
        float n = 0.0f, mu = 0.0f, m2 = 0.0f;
        // MERGE_LOADS parts' moments loaded before the first is merged: one L2 round trip
        // for them, not one each.
        for (unsigned p0 = 0; p0 < parts; p0 += MERGE_LOADS) {
            float m_p[MERGE_LOADS], m2_p[MERGE_LOADS];
#pragma unroll
            for (unsigned u = 0; u < MERGE_LOADS; ++u) {
                if (p0 + u < parts) {
                    m_p[u] = moments[(size_t)(p0 + u) * width + c];
                    m2_p[u] = moments[(size_t)(parts + p0 + u) * width + c];
                }
            }
#pragma unroll
            for (unsigned u = 0; u < MERGE_LOADS; ++u) {
                if (p0 + u < parts) {
                    const float n_p = (float)rows_of_part(rows, part_rows, p0 + u);
                    const float delta = m_p[u] - mu;
                    const float merged = n + n_p;
                    mu += delta * (n_p / merged);
                    m2 += m2_p[u] + delta * delta * (n * n_p / merged);
                    n = merged;
                }
            }
        }
        const float sigma2 = m2 / (float)rows;
        const float istd = 1.0f / sqrtf(sigma2 + epsilon);
        if (blockIdx.y == 0) {
            mean[c] = mu;
            var[c] = sigma2;
            inv_std[c] = istd;
        }
        column_mu[threadIdx.x] = mu;
        column_istd[threadIdx.x] = istd;
    }
    __syncthreads();
    if (!live) return;  // no barrier follows
    const unsigned first = blockIdx.y * part_rows;
    normalize_column(z, gamma[c], beta[c], activation, first, rows_of_part(rows, part_rows, blockIdx.y), width, c,
                     column_mu[threadIdx.x], column_istd[threadIdx.x], x_hat, y, a);
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
