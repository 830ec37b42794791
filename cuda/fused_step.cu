// Whole training steps in one persistent, cooperative kernel: forward, loss, backward, SGD
// and running statistics of every layer, for `steps` consecutive batches, with grid-wide
// barriers between the phases that need another block's results. It replaces the 16
// launches of a seed step (8 GEMMs, 8 kernels) by one launch for many steps: the seed step
// is bound by launch and GEMM latency, not FLOPs (docs/perf.md).
//
// Math: exactly that of the unfused path (gather.cu, batchnorm.cu, activation.cu,
// softmax_xent.cu, running_stats.cu, sgd.cu and cuBLAS), per step with batch B:
//   x[r,k]   = images[order[b·B + r], k] · (1/255)                     b = cursor + step
//   z[r,j]   = Σ_k in[r,k]·W[j,k]  (+ bias_j without BN)               every layer
//   BN:      μ_j = Σ_r z/B, σ²_j = Σ_r (z−μ)²/B, istd = 1/√(σ²+ε), x̂ = (z−μ)·istd,
//            y = γ·x̂ + β;   a = act(y)                                  hidden layers
//   logits v[r,k] = z[r,k] + bias_k;  ℓ_r = ln Σ e^{v−m} + m − v_t;  dv = (softmax − 1_t)·scale
//   backward: da[r,j] = Σ_m dz_up[r,m]·W_up[m,j];  dy = act'(a)·da;
//            BN: dβ = Σ dy, dγ = Σ dy·x̂, dz = (γ·istd/B)·(B·dy − dβ − x̂·dγ);  plain: db = Σ dy, dz = dy
//            dW[j,k] = Σ_r dz[r,j]·in[r,k]
//   SGD: v ← μ·v + g, w ← w − lr·v  (or w ← w − lr·g);  running statistics as running_stats.cu.
// Sums run in a fixed order (no atomics on data): results are deterministic, though not
// bitwise those of the unfused path (its GEMMs sum in cuBLAS's order).
//
// Work split: column j of a layer (a neuron: its z, BN, activation, gradients and weight row
// W[j,:]) belongs to block j mod G. A grid barrier separates a layer's forward from the
// next layer's (which reads all of a), the logits from the softmax (rows: r belongs to block
// r mod G, thread r div G), the softmax from the backward, each layer's backward from the
// one below (which reads all of dz), and, with one hidden layer, the step from the next
// (whose forward rewrites the a that the output layer's gradient read). W[j,:] is read by other blocks only in the
// backward of the layer below (column reads), so its update is deferred to the next step's
// forward of its layer (or the end of the launch), which every such read precedes by a
// barrier; the result is the same as updating at the end of the step.
//
// Layout: params, grads, velocity: the backend's flat buffers; `layer_info` [n_layers,
//   LAYER_FIELDS] ints: inputs, outputs, weight offset, bias offset (−1: none), γ and β
//   offsets (−1: no BN), activation offset (this layer's [B, outputs] block in acts, xhat and
//   dz), column offset (into inv_std and, for BN layers, the running statistics' [total]),
//   BN layer index (into batches' [E, bn_layers]). The last layer is the output layer.
//   acts: a of the hidden layers and the logits; xhat: z then x̂ (hidden BN layers); dz: dL/dz
//   (dlogits for the output layer); inv_std [total]; row_loss [B] f64, row_correct [B] u32;
//   estimators [E, 2] f64 as in running_stats.cu; barrier [2] u32, zero before the launch.
// Launch: cooperative (all blocks resident: the grid barrier spins), grid ≤ the device's
//   co-resident block count, block = power of two ≤ FUSED_MAX_THREADS (256 on the GPU).

#include <stdint.h>
#include "common.cuh"

#define FUSED_MAX_THREADS 256
#define LAYER_FIELDS 10
#define L_IN 0
#define L_OUT 1
#define L_W 2
#define L_BIAS 3
#define L_GAMMA 4
#define L_BETA 5
#define L_ACT 6
#define L_COL 7
#define L_BN 8

#ifndef FUSED_SPIN_PAUSE
#define FUSED_SPIN_PAUSE() __nanosleep(32)
#endif
#ifndef FUSED_TRAP
#define FUSED_TRAP() __trap()
#endif
// How the barrier reads its generation and resets its count: a volatile load (with the
// fences around it, the legacy cooperative-groups pattern) and a plain store on the GPU;
// the CPU emulation maps them to C++ atomics so ThreadSanitizer can follow them.
#ifndef FUSED_LOAD_ACQUIRE
#define FUSED_LOAD_ACQUIRE(p) (*(volatile unsigned*)(p))
#endif
#ifndef FUSED_STORE_RELAXED
#define FUSED_STORE_RELAXED(p, v) (*(p) = (v))
#endif
// Called by every thread of a block as it leaves a grid barrier: nothing on the GPU; the
// emulation delays one block there, so the others run ahead into the next phase and any
// read of another block's data that no barrier protects sees it overwritten.
#ifndef FUSED_AFTER_BARRIER
#define FUSED_AFTER_BARRIER()
#endif
// Waits at a grid barrier longer than this many pauses (seconds, where a step takes
// microseconds) mean a block never arrived: the kernel traps, and the process gets an error
// instead of a hang (the trap leaves the CUDA context unusable: the process must restart).
#define FUSED_MAX_SPINS (1u << 26)

// All blocks wait until every block has arrived. bar[0] counts arrivals, bar[1] is the
// generation: a block reads it before arriving, the last to arrive resets the count and
// advances it, the others spin until it moves. Fences order every block's earlier global
// writes before the others' later reads.
__device__ __forceinline__ void grid_barrier(unsigned* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* generation = bar + 1;
        const unsigned seen = FUSED_LOAD_ACQUIRE(generation);
        __threadfence();
        if (atomicAdd(bar, 1u) == gridDim.x - 1) {
            FUSED_STORE_RELAXED(bar, 0u);
            __threadfence();
            atomicAdd(bar + 1, 1u);
        } else {
            unsigned spins = 0;
            while (FUSED_LOAD_ACQUIRE(generation) == seen) {
                FUSED_SPIN_PAUSE();
                if (++spins == FUSED_MAX_SPINS) FUSED_TRAP();
            }
        }
        __threadfence();
    }
    __syncthreads();
    FUSED_AFTER_BARRIER();
}

// Total of the `v` of threads 0..width−1 (a power of two ≤ blockDim; the other threads'
// v must be 0), in a fixed tree order; every thread gets it. A tree over the whole block
// would add only exact zeros beyond width: the same total in more steps.
__device__ __forceinline__ float block_total(float* red, float v, unsigned width) {
    if (threadIdx.x < width) red[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = width / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    const float total = red[0];
    __syncthreads();
    return total;
}

// The smallest power of two ≥ min(rows, blockDim): the threads that hold a row's partial
// sum when each thread sums rows t, t+blockDim, ….
__device__ __forceinline__ unsigned row_threads(unsigned rows) {
    unsigned width = 1;
    while (width < rows && width < blockDim.x) width <<= 1;
    return width;
}


// One row of a layer's input, looked up once: pixels (scaled on reading) or activations.
struct InputRow {
    const uint8_t* pixels;      // layer 0 (null: an invalid row, all NaN)
    const float* values;        // otherwise
    bool is_image;
    __device__ __forceinline__ float at(unsigned k) const {
        if (!is_image) return values[k];
        return pixels != nullptr ? (float)pixels[k] * (1.0f / 255.0f) : __int_as_float(0x7fc00000);
    }
};

// Where a layer reads its input: the batch's images (layer 0) or the layer below's a.
struct Input {
    const uint8_t* images;      // non-null: layer 0
    const unsigned* order;
    unsigned order_len, count, features;
    unsigned long long base;    // b·B: the batch's first position in the order
    const float* acts;          // otherwise: [B, width]
    unsigned width;
    // Pointer to row r's first input and whether the row is valid (an index outside the
    // order or the dataset gives NaN inputs, as gather.cu does).
    __device__ __forceinline__ InputRow row(unsigned r) const {
        InputRow row;
        row.is_image = images != nullptr;
        row.values = row.is_image ? nullptr : acts + (size_t)r * width;
        row.pixels = nullptr;
        if (row.is_image) {
            const unsigned long long pos = base + r;
            const unsigned index = pos < order_len ? order[pos] : count;
            if (index < count) row.pixels = images + (size_t)index * features;
        }
        return row;
    }
};

// dw[i] = Σ_r g(r)·in(r, i) for i < n, with g(r) = dz[r·dz_stride], rows added in order
// 0..rows−1. Each thread keeps ROW_GRAD_CHUNK outputs (i, i+T, …) in registers, so one
// lookup of an input row (an order and an image index for layer 0) serves all of them.
#define ROW_GRAD_CHUNK 4
template <typename In>
__device__ __forceinline__ void weight_row_gradient(
    float* dw, const float* dz, unsigned dz_stride, const In& in, unsigned rows, unsigned n)
{
    const unsigned T = blockDim.x;
    for (unsigned first = 0; first < n; first += ROW_GRAD_CHUNK * T) {
        float acc[ROW_GRAD_CHUNK];
        for (unsigned q = 0; q < ROW_GRAD_CHUNK; ++q) acc[q] = 0.0f;
        for (unsigned r = 0; r < rows; ++r) {
            const InputRow row = in.row(r);
            const float g = dz[(size_t)r * dz_stride];
#pragma unroll
            for (unsigned q = 0; q < ROW_GRAD_CHUNK; ++q) {
                const unsigned i = first + q * T + threadIdx.x;
                if (i < n) acc[q] += g * row.at(i);
            }
        }
        for (unsigned q = 0; q < ROW_GRAD_CHUNK; ++q) {
            const unsigned i = first + q * T + threadIdx.x;
            if (i < n) dw[i] = acc[q];
        }
    }
}

// out[r·out_stride] = Σ_{k<n} in(r,k)·w[k·w_stride] for r < rows. Threads form groups of
// K consecutive lanes (K = a power of two ≥ min(n, 32)), one row per group at a time: a
// warp reads K consecutive inputs of a row (coalesced; rows are row-major), and the group's
// K partial sums are added by a fixed tree. `part` holds blockDim floats.
template <typename In>
__device__ __forceinline__ void column_dot(
    float* part, const In& in, unsigned rows, unsigned n, const float* w, unsigned w_stride,
    float* out, unsigned out_stride)
{
    unsigned lanes = 1;
    while (lanes < n && lanes < 32 && lanes < blockDim.x) lanes <<= 1;
    const unsigned groups = blockDim.x / lanes;
    const unsigned lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
    for (unsigned first = 0; first < rows; first += groups) {
        const unsigned r = first + group;
        float acc = 0.0f;
        if (r < rows) {
            const InputRow row = in.row(r);
            for (unsigned k = lane; k < n; k += lanes) acc += row.at(k) * w[(size_t)k * w_stride];
        }
        part[threadIdx.x] = acc;
        __syncthreads();
        for (unsigned s = lanes / 2; s > 0; s >>= 1) {
            if (lane < s) part[threadIdx.x] += part[threadIdx.x + s];
            __syncthreads();
        }
        if (lane == 0 && r < rows) out[(size_t)r * out_stride] = part[threadIdx.x];
        __syncthreads();
    }
}

// One SGD step on a layer's row j (weights, bias, γ, β), from the gradients in `grads`.
__device__ __forceinline__ void sgd_row(
    const int* info, unsigned j, float* params, const float* grads, float* velocity, float lr, float momentum)
{
    const unsigned in = (unsigned)info[L_IN];
    auto update = [&](size_t i) {
        if (velocity != nullptr) {
            const float vi = momentum * velocity[i] + grads[i];
            velocity[i] = vi;
            params[i] -= lr * vi;
        } else {
            params[i] -= lr * grads[i];
        }
    };
    const size_t row = (size_t)info[L_W] + (size_t)j * in;
    for (unsigned k = threadIdx.x; k < in; k += blockDim.x) update(row + k);
    if (threadIdx.x == 0) {
        if (info[L_BIAS] >= 0) update((size_t)info[L_BIAS] + j);
        if (info[L_GAMMA] >= 0) update((size_t)info[L_GAMMA] + j);
        if (info[L_BETA] >= 0) update((size_t)info[L_BETA] + j);
    }
    __syncthreads();
}

extern "C" __global__ void fused_train_steps_f32(
    const uint8_t* __restrict__ images, const uint8_t* __restrict__ labels, unsigned count, unsigned features,
    const unsigned* __restrict__ order, unsigned order_len, unsigned* cursor,
    const int* __restrict__ layer_info, unsigned n_layers,
    unsigned batch, float epsilon, int activation, float grad_scale, float lr, float momentum,
    float* params, float* grads, float* velocity,
    const double* __restrict__ estimators, unsigned n_estimators, unsigned bn_total, unsigned bn_layers,
    float* running_mean, float* running_var, unsigned long long* batches,
    float* acts, float* xhat, float* dz, float* inv_std,
    double* row_loss, unsigned* row_correct,
    double* loss_sum, unsigned long long* correct,
    unsigned* barrier, unsigned steps)
{
#ifdef EMULATED_BLOCK_SHARED
    // The CPU emulation (tests/kernel_emulation) runs all blocks at once: it gives each block
    // its own buffer, where `__shared__` would be one static array for all of them.
    float* part = EMULATED_BLOCK_SHARED(FUSED_MAX_THREADS);
#else
    __shared__ float part[FUSED_MAX_THREADS];
#endif
    const unsigned G = gridDim.x, me = blockIdx.x, t = threadIdx.x, T = blockDim.x;
    const unsigned hidden = n_layers - 1;
    const int* out_info = layer_info + (size_t)hidden * LAYER_FIELDS;
    const unsigned classes = (unsigned)out_info[L_OUT];
    const float inv_rows = 1.0f / (float)batch;
    const unsigned reduce_width = row_threads(batch);
    // Read before the first barrier; block 0 writes them back after the last.
    const unsigned cursor0 = cursor[0];
    auto batches_before = [&](unsigned e, unsigned bn) { return batches[(size_t)e * bn_layers + bn]; };

    auto input_of = [&](unsigned l, unsigned long long base) {
        Input in;
        in.order = order; in.order_len = order_len; in.count = count; in.features = features; in.base = base;
        if (l == 0) {
            in.images = images; in.acts = nullptr; in.width = features;
        } else {
            const int* below = layer_info + (size_t)(l - 1) * LAYER_FIELDS;
            in.images = nullptr; in.acts = acts + below[L_ACT]; in.width = (unsigned)below[L_OUT];
        }
        return in;
    };

    for (unsigned step = 0; step < steps; ++step) {
        const unsigned long long base = (unsigned long long)(cursor0 + step) * batch;

        // Forward, hidden layers.
        for (unsigned l = 0; l < hidden; ++l) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in_w = (unsigned)info[L_IN], width = (unsigned)info[L_OUT];
            const Input in = input_of(l, base);
            float* a = acts + info[L_ACT];
            float* zx = xhat + info[L_ACT];
            const bool bn = info[L_GAMMA] >= 0;
            for (unsigned j = me; j < width; j += G) {
                if (step > 0) sgd_row(info, j, params, grads, velocity, lr, momentum);
                const float* w = params + info[L_W] + (size_t)j * in_w;
                column_dot(part, in, batch, in_w, w, 1, zx + j, width);
                // The column's z are in zx (this block's writes, visible after the barrier
                // inside column_dot).
                if (bn) {
                    float s = 0.0f;
                    for (unsigned r = t; r < batch; r += T) s += zx[(size_t)r * width + j];
                    const float mu = block_total(part, s, reduce_width) * inv_rows;
                    float q = 0.0f;
                    for (unsigned r = t; r < batch; r += T) {
                        const float d = zx[(size_t)r * width + j] - mu;
                        q += d * d;
                    }
                    const float sigma2 = block_total(part, q, reduce_width) * inv_rows;
                    const float istd = 1.0f / sqrtf(sigma2 + epsilon);
                    const float g = params[info[L_GAMMA] + j], b = params[info[L_BETA] + j];
                    for (unsigned r = t; r < batch; r += T) {
                        const size_t i = (size_t)r * width + j;
                        const float xh = (zx[i] - mu) * istd;
                        zx[i] = xh;
                        a[i] = activate(activation, g * xh + b);
                    }
                    if (t == 0) {
                        const unsigned col = (unsigned)info[L_COL] + j, bn_index = (unsigned)info[L_BN];
                        inv_std[col] = istd;
                        for (unsigned e = 0; e < n_estimators; ++e) {
                            const double decay = estimators[2 * e];
                            const bool unbiased = estimators[2 * e + 1] != 0.0;
                            const double n = (double)(batches_before(e, bn_index) + step);
                            const float keep = decay > 0.0 ? (float)decay : (float)(n / (n + 1.0));
                            const float take = 1.0f - keep;
                            const float corr = unbiased ? (float)((double)batch / ((double)batch - 1.0)) : 1.0f;
                            float* rm = running_mean + (size_t)e * bn_total + col;
                            float* rv = running_var + (size_t)e * bn_total + col;
                            *rm = keep * *rm + take * mu;
                            *rv = keep * *rv + take * (sigma2 * corr);
                        }
                    }
                } else {
                    const float b = params[info[L_BIAS] + j];
                    for (unsigned r = t; r < batch; r += T) {
                        const size_t i = (size_t)r * width + j;
                        a[i] = activate(activation, zx[i] + b);
                    }
                }
                __syncthreads();
            }
            grid_barrier(barrier);
        }

        // Output layer: logits (bias included), column by column.
        {
            const unsigned in_w = (unsigned)out_info[L_IN];
            const Input in = input_of(hidden, base);
            float* logits = acts + out_info[L_ACT];
            for (unsigned k = me; k < classes; k += G) {
                if (step > 0) sgd_row(out_info, k, params, grads, velocity, lr, momentum);
                column_dot(part, in, batch, in_w, params + out_info[L_W] + (size_t)k * in_w, 1, logits + k, classes);
                if (out_info[L_BIAS] >= 0) {
                    const float b = params[out_info[L_BIAS] + k];
                    for (unsigned r = t; r < batch; r += T) logits[(size_t)r * classes + k] += b;
                }
                __syncthreads();
            }
            grid_barrier(barrier);
        }

        // Softmax cross-entropy, row by row (softmax_xent.cu's arithmetic).
        {
            const float* logits = acts + out_info[L_ACT];
            float* dlogits = dz + out_info[L_ACT];
            const float nan = __int_as_float(0x7fc00000);
            for (unsigned r = me + G * t; r < batch; r += G * T) {
                const float* row = logits + (size_t)r * classes;
                unsigned best = 0;
                float m = row[0];
                for (unsigned k = 1; k < classes; ++k)
                    if (row[k] > m) { m = row[k]; best = k; }
                float denom = 0.0f;
                for (unsigned k = 0; k < classes; ++k) denom += expf(row[k] - m);
                const unsigned long long pos = base + r;
                const bool in_order = pos < order_len;
                const unsigned index = in_order ? order[pos] : 0;
                const unsigned label = (in_order && index < count) ? labels[index] : 255u;
                const bool valid = label < classes;
                for (unsigned k = 0; k < classes; ++k) {
                    const float p = expf(row[k] - m) / denom;
                    dlogits[(size_t)r * classes + k] = valid ? (p - (k == label ? 1.0f : 0.0f)) * grad_scale : nan;
                }
                row_loss[r] = valid ? (double)(logf(denom) + m - row[label]) : (double)nan;
                row_correct[r] = (valid && best == label) ? 1u : 0u;
            }
            grid_barrier(barrier);
        }

        // Backward: the step's loss sums; the output layer's gradients; the hidden layers from
        // the top down.
        if (me == 0 && t == 0) {
            double s = 0.0;
            unsigned long long c = 0;
            for (unsigned r = 0; r < batch; ++r) { s += row_loss[r]; c += row_correct[r]; }
            loss_sum[0] += s;
            correct[0] += c;
        }
        {
            const unsigned in_w = (unsigned)out_info[L_IN];
            const Input in = input_of(hidden, base);
            const float* dlogits = dz + out_info[L_ACT];
            for (unsigned k = me; k < classes; k += G) {
                if (out_info[L_BIAS] >= 0 && t == 0) {
                    float s = 0.0f;
                    for (unsigned r = 0; r < batch; ++r) s += dlogits[(size_t)r * classes + k];
                    grads[out_info[L_BIAS] + k] = s;
                }
                weight_row_gradient(grads + out_info[L_W] + (size_t)k * in_w, dlogits + k, classes, in, batch, in_w);
            }
        }
        for (unsigned l = hidden; l-- > 0;) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            const int* up = layer_info + (size_t)(l + 1) * LAYER_FIELDS;
            const unsigned in_w = (unsigned)info[L_IN], width = (unsigned)info[L_OUT], up_w = (unsigned)up[L_OUT];
            const Input in = input_of(l, base);
            Input up_dz;
            up_dz.images = nullptr; up_dz.acts = dz + up[L_ACT]; up_dz.width = up_w;
            const float* a = acts + info[L_ACT];
            const float* xh = xhat + info[L_ACT];
            float* d = dz + info[L_ACT];
            const bool bn = info[L_GAMMA] >= 0;
            for (unsigned j = me; j < width; j += G) {
                // da[r] = Σ_m dz_up[r,m]·W_up[m,j] into d's column, then dy = act'(a)·da.
                column_dot(part, up_dz, batch, up_w, params + up[L_W] + j, width, d + j, width);
                for (unsigned r = t; r < batch; r += T) {
                    const size_t i = (size_t)r * width + j;
                    d[i] = activate_backward(activation, a[i], d[i]);
                }
                __syncthreads();
                if (bn) {
                    float sb = 0.0f, sg = 0.0f;
                    for (unsigned r = t; r < batch; r += T) {
                        const size_t i = (size_t)r * width + j;
                        sb += d[i];
                        sg += d[i] * xh[i];
                    }
                    const float d_beta = block_total(part, sb, reduce_width);
                    const float d_gamma = block_total(part, sg, reduce_width);
                    const float g = params[info[L_GAMMA] + j], istd = inv_std[info[L_COL] + j];
                    const float b = (float)batch;
                    for (unsigned r = t; r < batch; r += T) {
                        const size_t i = (size_t)r * width + j;
                        d[i] = g * istd / b * (b * d[i] - d_beta - xh[i] * d_gamma);
                    }
                    if (t == 0) {
                        grads[info[L_GAMMA] + j] = d_gamma;
                        grads[info[L_BETA] + j] = d_beta;
                    }
                } else if (t == 0) {
                    float s = 0.0f;
                    for (unsigned r = 0; r < batch; ++r) s += d[(size_t)r * width + j];
                    grads[info[L_BIAS] + j] = s;
                }
                __syncthreads();
                // dW[j,:] = Σ_r dz[r,j]·in[r,:]
                weight_row_gradient(grads + info[L_W] + (size_t)j * in_w, d + j, width, in, batch, in_w);
                __syncthreads();
            }
            // The layer below reads all of this layer's dz. With one hidden layer the barrier
            // is still needed: the output layer's weight gradient above read all of layer
            // 0's a, which the next step's forward overwrites.
            if (l > 0 || hidden == 1) grid_barrier(barrier);
        }
    }

    // The last step's deferred updates, then the counters every block read at the start.
    grid_barrier(barrier);
    if (steps > 0) {
        for (unsigned l = 0; l < n_layers; ++l) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            for (unsigned j = me; j < (unsigned)info[L_OUT]; j += G) sgd_row(info, j, params, grads, velocity, lr, momentum);
        }
    }
    if (me == 0 && t == 0) {
        cursor[0] = cursor0 + steps;
        for (unsigned e = 0; e < n_estimators; ++e)
            for (unsigned bn = 0; bn < bn_layers; ++bn) batches[(size_t)e * bn_layers + bn] += steps;
    }
}
