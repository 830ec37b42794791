// Bias and activation for layers without batch normalization (the plain network's hidden
// layers), forward and backward.
//
// Forward (cpu::ops::linear_forward's bias add + activation_forward):
//   y[r,c] = z[r,c] + bias_c   (bias may be null: y = z),   a = act(y)
//   act = sigmoid 1/(1+e^{−y}) or relu max(y, 0).
// Backward (cpu::ops::activation_backward + the bias part of linear_backward):
//   dz[r,c] = act'(da[r,c]) = da·a(1−a) (sigmoid) or da·1[a>0] (relu), from the saved a;
//   dbias_c = Σ_r dz[r,c]  (bias gradient of this layer; dbias may be null).
//
// Layout: z, y, a, da, dz: [B, C] row-major; bias, dbias: [C].
// Launch: forward elementwise, grid-stride, any grid, block 256; `y` may be null.
//   Backward is a column kernel (common.cuh): grid.x = ceil(C/TILE_COLS), block
//   (TILE_COLS, TILE_ROWS); the bias gradient sums each column over rows in a fixed order (deterministic, no atomics).

#include "common.cuh"

extern "C" __global__ void bias_act_fwd_f32(
    const float* __restrict__ z, const float* __restrict__ bias,
    int activation, unsigned rows, unsigned width,
    float* __restrict__ y, float* __restrict__ a)
{
    const size_t n = (size_t)rows * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float yv = bias != nullptr ? z[i] + bias[i % width] : z[i];
        if (y != nullptr) y[i] = yv;
        a[i] = activate(activation, yv);
    }
}

extern "C" __global__ void act_bwd_bias_grad_f32(
    const float* __restrict__ da, const float* __restrict__ a,
    int activation, unsigned rows, unsigned width,
    float* __restrict__ dz, float* __restrict__ dbias)
{
    __shared__ float part[TILE_ROWS][TILE_COLS];
    const unsigned c = blockIdx.x * TILE_COLS + threadIdx.x;
    const bool live = c < width;

    // A row's a and da, loaded together.
    struct Row { float a, da; };
    float s = 0.0f;
    if (live)
        for_column_rows(
            rows, [&](unsigned r) { const size_t i = (size_t)r * width + c; return Row{a[i], da[i]}; },
            [&](unsigned r, Row v) {
                const float g = activate_backward(activation, v.a, v.da);
                dz[(size_t)r * width + c] = g;
                s += g;
            });
    const float total = column_total(part, s);
    if (live && threadIdx.y == 0 && dbias != nullptr) dbias[c] = total;
}
