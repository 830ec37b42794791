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
// Layout: z, x̂, y, a, da, dz: [B, C] row-major; γ, β, μ, σ², inv_std, dγ, dβ: [C].
// Launch: column kernels (train forward, backward): grid.x = ceil(C/TILE_COLS), block
//   (TILE_COLS, TILE_ROWS), see common.cuh; sums are over rows in a fixed order (deterministic, no atomics).
//   Inference forward: elementwise, grid-stride, any grid, block 256.
// `y` may be null (only evaluation with a probe needs the activation input).

#include "common.cuh"

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
    const float g = gamma[c], b = beta[c];
    for_column_rows(rows, z_at, [&](unsigned r, float v) {
        const size_t i = (size_t)r * width + c;
        const float xh = (v - mu) * istd;
        const float yv = g * xh + b;
        x_hat[i] = xh;
        if (y != nullptr) y[i] = yv;
        a[i] = activate(activation, yv);
    });
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
