// SGD with classical momentum over every trainable scalar at once (cpu::ops::sgd_update):
//   with velocity:  v ← μ·v + g;  w ← w − lr·v
//   without:        w ← w − lr·g
// and, when `cursor` is given, cursor[0] += 1: the step's SGD launch advances the device
// batch counter that gather_rows_f32 reads (see gather.cu; with BN the running statistics'
// update follows it, and does not read the counter).
//
// Layout: w, g, v: [n] — the backend keeps all trainable tensors in one flat buffer (and
//   their gradients and velocities in buffers of the same layout), so one launch updates all.
// Launch: elementwise, grid-stride, any grid, block 256. v and cursor may be null.

extern "C" __global__ void sgd_update_f32(
    float* __restrict__ w, const float* __restrict__ g, float* __restrict__ v,
    unsigned long long n, float lr, float momentum, unsigned* __restrict__ cursor)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    if (v != nullptr) {
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
            const float vi = momentum * v[i] + g[i];
            v[i] = vi;
            w[i] -= lr * vi;
        }
    } else {
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) w[i] -= lr * g[i];
    }
    if (cursor != nullptr && blockIdx.x == 0 && threadIdx.x == 0) cursor[0] += 1;
}
