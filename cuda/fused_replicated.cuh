// Whole training steps with ONE grid barrier a step: the layers above the first are
// replicated, every block computing all of them, from its own copy of their parameters in
// shared memory. Included at the end of fused_step.cu, whose pieces it uses (the grid barrier,
// column_dot, weight_row_gradient, sgd_row, the block totals) and whose parameters it takes
// (FUSED_PARAMS), in the same module (so `bench --trace` reaches it through fused_trace).
//
// Why: the grid kernels above wait at 3 grid barriers a seed step (~1.5 µs each, and the
// waits of the blocks that arrive first), and between them each block works on one neuron
// at a time through chains of block barriers and L2 round trips. Here only layer 0's columns
// are split over blocks; layer 1 (100×100 weights for the seed) and the output layer are small
// enough to compute whole in every block from shared memory, where nothing waits on L2.
//
// Math: that of fused_step.cu (same forward, BN, softmax cross-entropy, backward, SGD and
// running statistics), per step with batch B:
//   layer 0 (split: column j belongs to block j mod G):
//     z[r,j] = Σ_k x[r,k]·W0[j,k];  BN (or + bias);  a0[r,j] = act(·)
//   layers l ≥ 1 (replicated: every block, all columns, from shared memory):
//     forward   Z = A_{l−1}·W_lᵀ (a product of B×in by in×out);  BN per column;  A_l = act(·)
//     output    V = A_{h−1}·W_outᵀ + b;  softmax cross-entropy, dV = (softmax − 1_t)·scale
//     backward  dA_{l−1} = dZ_l·W_l (before W_l changes);  dW_l = dZ_lᵀ·A_{l−1}, applied at
//               once (v ← μv + g, W ← W − lr·v, element by element);
//               dY = act'(A)·dA;  BN: dβ = Σ_r dY, dγ = Σ_r dY·x̂, dZ = γ·istd/B·(B·dY − dβ − x̂·dγ)
//   layer 0 again (its own columns): dA0[:,j] = dZ_1·W_1[:,j];  BN backward;
//     dW0[j,:] = Σ_r dZ0[r,j]·x[r,:], applied at once to params (only this block reads it).
// Every block computes the replicated layers with the same instructions on the same values,
// so their copies stay bitwise equal; the writer block (the last, G − 1: with a grid one
// wider than layer 0, as the host launches it where the device has room, a block with no
// layer-0 column, idle through that work) adds the step's losses, and writes the copies back
// at the end of the launch (and their gradients, the last step's, as the other kernels leave
// them).
//
// Barriers: one a step, after layer 0's forward (the replicated forward reads all of a0).
// Layer 0's backward needs only this block's work (dA0 of its own columns), and the next
// step's forward only its own weight rows, so the step runs on into the next with no barrier:
// a block may then write the next step's a0 while a slower one still reads this step's, so
// a0 alternates by step parity between acts' and dz's layer-0 blocks (this kernel keeps
// layer 0's dz in shared memory). A block two steps ahead is impossible: it would have passed
// the next step's barrier. One more barrier at the end orders the counters' update after
// every block's last read.
//
// Products from shared memory (tile_products): a thread computes an R×R tile of outputs
// (R = 4 where that leaves work for 128 threads or more, else 2 or 1), rows ti + u·tm and
// columns tj + v·tn: strided, so that a warp's consecutive tj read consecutive rows (or
// columns) of B, which the odd pitches of the shared arrays put in distinct banks, while the
// lanes of a tile row read the same A elements (a broadcast). Each output is one chain summed
// in order of the reduced index.
//
// Layout: the parameters and buffers of FUSED_PARAMS, as fused_step.cu has them, except:
// acts' layer-0 block holds a0 of even steps, dz's of odd ones; xhat's layer-0 block z then
// x̂ of layer 0; the replicated layers' blocks of acts, xhat and dz, row_loss and row_correct
// go unused; `weight_row_stage` and the stage offsets are ignored.
//   Dynamic shared memory (replicated_layout, in floats, each region 16-byte aligned; sized
//   by the host through fused_replicated_layout_bytes): per replicated layer W [out, odd pitch
//   ≥ in] and its velocity, the bias (or γ then β) [2·out] and its velocity; per replicated
//   hidden layer x̂ and a [B, odd pitch ≥ out] and its column statistics [3·out]; a0 [B, odd pitch ≥ width0]; the
//   logits, then dlogits [B, classes]; a scratch for dA ([B, pitch] of the widest replicated
//   hidden layer, or [owned columns, B] of layer 0's dA0); the rows' losses [B] f64 and
//   correct flags [B] u32. The seed network: 191 KB.
// Launch: cooperative, grid G ≤ layer 0's width + 1 (and co-resident), blocks of 256 or 512
//   threads (REPLICATED_THREADS: one block an SM, so 128 registers), the layout's bytes.
// Limits (the layout's bytes are 0 beyond them): at most REPLICATED_MAX_LAYERS layers above
// the first, G ≥ 1.

#define REPLICATED_THREADS 512
#define REPLICATED_MAX_LAYERS 4

// The dynamic shared memory the launch gave (the CPU emulation defines its own).
#ifndef FUSED_DYNAMIC_BYTES
#define FUSED_DYNAMIC_BYTES() fused_dynamic_smem_size()
__device__ __forceinline__ unsigned fused_dynamic_smem_size() {
    unsigned bytes;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}
#endif

// Row pitch (floats) of a shared [rows, n] array: odd, so that 32 consecutive rows read at
// the same column fall in 32 distinct banks.
__host__ __device__ __forceinline__ unsigned replicated_pitch(unsigned n) { return n | 1u; }

struct ReplicatedLayout {
    // Per replicated layer r = l − 1 (float offsets): weights, their velocity, bias or γ|β,
    // its velocity; x̂, a and per-column statistics (hidden layers only): [out] 1/σ, then
    // [2·out] the forward's μ or the backward's column sums (dβ|dγ, or the bias's).
    unsigned w[REPLICATED_MAX_LAYERS], vw[REPLICATED_MAX_LAYERS], vec[REPLICATED_MAX_LAYERS], vvec[REPLICATED_MAX_LAYERS];
    unsigned xhat[REPLICATED_MAX_LAYERS], act[REPLICATED_MAX_LAYERS], stat[REPLICATED_MAX_LAYERS];
    unsigned a0, soft, scratch, losses, rights;
    unsigned owned;  // layer-0 columns a block owns at most: ⌈width0 / G⌉
    unsigned bytes;  // 0: beyond the kernel's limits
};

// Out of line in the kernel: inlined, its 64-bit sizes cost the 128-register kernel spills.
__host__ __device__ __noinline__ inline ReplicatedLayout replicated_layout(const int* info, unsigned n_layers, unsigned batch, unsigned grid) {
    ReplicatedLayout s{};
    if (n_layers < 2 || n_layers - 1 > REPLICATED_MAX_LAYERS || grid == 0 || batch == 0) return s;
    // Sizes in 64 bits: a layout past 4 GB is refused (bytes 0), not wrapped to a small one.
    unsigned long long at = 0;
    auto take = [&](unsigned long long floats) {
        const unsigned offset = (unsigned)at;
        at += (floats + 3) / 4 * 4;
        return offset;
    };
    const unsigned long long B = batch;
    const unsigned hidden = n_layers - 1, width0 = (unsigned)info[L_OUT];
    s.owned = (width0 + grid - 1) / grid;
    unsigned long long scratch = B * s.owned;
    for (unsigned l = 1; l < n_layers; ++l) {
        const int* f = info + (size_t)l * LAYER_FIELDS;
        const unsigned in = (unsigned)f[L_IN], out = (unsigned)f[L_OUT], r = l - 1;
        s.w[r] = take((unsigned long long)out * replicated_pitch(in));
        s.vw[r] = take((unsigned long long)out * replicated_pitch(in));
        s.vec[r] = take(2ull * out);
        s.vvec[r] = take(2ull * out);
        if (l < hidden) {
            s.xhat[r] = take(B * replicated_pitch(out));
            s.act[r] = take(B * replicated_pitch(out));
            s.stat[r] = take(3ull * out);
            if (B * replicated_pitch(out) > scratch) scratch = B * replicated_pitch(out);
        }
    }
    s.a0 = take(B * replicated_pitch(width0));
    s.soft = take(B * (unsigned)info[(size_t)hidden * LAYER_FIELDS + L_OUT]);
    s.scratch = take(scratch);
    s.losses = take(2 * B);  // f64, at a multiple of 4 floats
    s.rights = take(B);
    s.bytes = at * 4 <= 0xffffffffull ? (unsigned)(at * 4) : 0u;
    return s;
}

// The dynamic shared memory the kernel needs for this network and grid (0: beyond its
// limits), for the host: the layout is the kernel's own.
extern "C" __global__ void fused_replicated_layout_bytes(const int* layer_info, unsigned n_layers, unsigned batch, unsigned grid, unsigned* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = replicated_layout(layer_info, n_layers, batch, grid).bytes;
}

// epi(i, j, Σ_{p<K} A[i·ai + p·ap]·B[j·bj + p·bp]) for i < M, j < N: R×R outputs a thread
// (see the header), each summed in order of p.
template <unsigned R, typename Epi>
__device__ __forceinline__ void tile_products(
    unsigned M, unsigned N, unsigned K, const float* A, unsigned ai, unsigned ap, const float* B, unsigned bj, unsigned bp, Epi epi)
{
    const unsigned tm = (M + R - 1) / R, tn = (N + R - 1) / R;
    for (unsigned q = threadIdx.x; q < tm * tn; q += blockDim.x) {
        const unsigned ti = q / tn, tj = q - ti * tn;
        unsigned ao[R], bo[R];
#pragma unroll
        for (unsigned u = 0; u < R; ++u) {
            const unsigned i = ti + u * tm;
            ao[u] = (i < M ? i : ti) * ai;  // rows past M repeat row ti (not stored)
        }
#pragma unroll
        for (unsigned v = 0; v < R; ++v) {
            const unsigned j = tj + v * tn;
            bo[v] = (j < N ? j : tj) * bj;
        }
        float acc[R][R];
#pragma unroll
        for (unsigned u = 0; u < R; ++u)
#pragma unroll
            for (unsigned v = 0; v < R; ++v) acc[u][v] = 0.0f;
        for (unsigned p = 0; p < K; ++p) {
            float x[R], y[R];
#pragma unroll
            for (unsigned u = 0; u < R; ++u) x[u] = A[ao[u] + p * ap];
#pragma unroll
            for (unsigned v = 0; v < R; ++v) y[v] = B[bo[v] + p * bp];
#pragma unroll
            for (unsigned u = 0; u < R; ++u)
#pragma unroll
                for (unsigned v = 0; v < R; ++v) acc[u][v] += x[u] * y[v];
        }
#pragma unroll
        for (unsigned u = 0; u < R; ++u)
#pragma unroll
            for (unsigned v = 0; v < R; ++v) {
                const unsigned i = ti + u * tm, j = tj + v * tn;
                if (i < M && j < N) epi(i, j, acc[u][v]);
            }
    }
}

// tile_products with the largest tile that leaves 128 threads or more with work.
template <typename Epi>
__device__ __forceinline__ void shared_product(
    unsigned M, unsigned N, unsigned K, const float* A, unsigned ai, unsigned ap, const float* B, unsigned bj, unsigned bp, Epi epi)
{
    if (((M + 3) / 4) * ((N + 3) / 4) >= 128) tile_products<4>(M, N, K, A, ai, ap, B, bj, bp, epi);
    else if (((M + 1) / 2) * ((N + 1) / 2) >= 128) tile_products<2>(M, N, K, A, ai, ap, B, bj, bp, epi);
    else tile_products<1>(M, N, K, A, ai, ap, B, bj, bp, epi);
}

// f(r, j) for every element of a [rows, width] array, spread over the block's threads (thread
// t takes elements t, t+T, … in row-major order, walked without a division per element).
template <typename F>
__device__ __forceinline__ void for_elements(unsigned rows, unsigned width, F f) {
    ChunkWalk at{threadIdx.x / width, threadIdx.x % width, width, blockDim.x / width, blockDim.x % width};
    while (at.row < rows) {
        f(at.row, at.chunk);
        at.advance();
    }
}

// A column's running statistics and estimator factors, loaded ahead (see running_update).
#define REPLICATED_PREFETCH 4
struct RunningPrefetch {
    unsigned count;
    float keep[REPLICATED_PREFETCH], corr[REPLICATED_PREFETCH], mean[REPLICATED_PREFETCH], var[REPLICATED_PREFETCH];
};

template <unsigned MAX_T>
__device__ __forceinline__ void replicated_train_steps(FUSED_PARAMS)
{
    constexpr unsigned PART_FLOATS = fused_part_floats(MAX_T), SHARED_FLOATS = fused_shared_floats(MAX_T);
#ifdef EMULATED_BLOCK_SHARED
    if (blockDim.x > MAX_T) EMULATED_TRAP("a block larger than the kernel's launch bounds");
    float* shared = EMULATED_BLOCK_SHARED(SHARED_FLOATS);
    float* sm = reinterpret_cast<float*>(EMULATED_BLOCK_DYNAMIC());
#else
    __shared__ __align__(16) float shared[SHARED_FLOATS];
    extern __shared__ __align__(16) uint8_t fused_dynamic_shared[];
    float* sm = reinterpret_cast<float*>(fused_dynamic_shared);
#endif
    float* part = shared;
    unsigned* index = reinterpret_cast<unsigned*>(shared + PART_FLOATS);
    float* gs = shared + PART_FLOATS + FUSED_PASS_ROWS;

    const unsigned t = threadIdx.x, T = blockDim.x, G = gridDim.x, me = blockIdx.x;
    const unsigned hidden = n_layers - 1;
    // The block that adds the losses and writes the replicated layers back (see the header).
    const bool writer = me == G - 1;
    const ReplicatedLayout lay = replicated_layout(layer_info, n_layers, batch, G);
    // The host sized the dynamic shared memory by this layout (a network beyond it never
    // launches); a mismatch traps rather than writing past the block's shared memory.
    if (lay.bytes == 0 || FUSED_DYNAMIC_BYTES() < lay.bytes) FUSED_TRAP();
    const int* info0 = layer_info;
    const unsigned in0 = (unsigned)info0[L_IN], width0 = (unsigned)info0[L_OUT], pitch0 = replicated_pitch(width0);
    const bool bn0 = info0[L_GAMMA] >= 0;
    const int* out_info = layer_info + (size_t)hidden * LAYER_FIELDS;
    const unsigned classes = (unsigned)out_info[L_OUT];
    float* a0s = sm + lay.a0;
    float* soft = sm + lay.soft;
    float* scratch = sm + lay.scratch;
    double* losses = reinterpret_cast<double*>(sm + lay.losses);
    unsigned* rights = reinterpret_cast<unsigned*>(sm + lay.rights);
    const float inv_rows = 1.0f / (float)batch, b = (float)batch;
    const unsigned reduce_width = row_threads(batch);
    const bool pixel_words = features % 4 == 0 && ((size_t)images & 3) == 0;
    const unsigned cursor0 = cursor[0];
    auto batches_before = [&](unsigned e, unsigned bn) { return batches[(size_t)e * bn_layers + bn]; };
    auto with_pixels = [&](unsigned long long base, auto f) {
        if (pixel_words) f(Pixels<4>{images, order, order_len, count, features, base, index});
        else f(Pixels<1>{images, order, order_len, count, features, base, index});
    };
    // Replicated layer l's shapes and shared arrays.
    auto in_of = [&](unsigned l) { return (unsigned)layer_info[(size_t)l * LAYER_FIELDS + L_IN]; };
    auto out_of = [&](unsigned l) { return (unsigned)layer_info[(size_t)l * LAYER_FIELDS + L_OUT]; };
    // A replicated layer's input: a0 (layer 1) or the layer below's a, and its pitch.
    auto input_of = [&](unsigned l) { return l == 1 ? a0s : sm + lay.act[l - 2]; };
    auto input_pitch = [&](unsigned l) { return replicated_pitch(in_of(l)); };
    // One SGD step of a shared copy's element (sgd_element's arithmetic).
    auto sgd_shared = [&](float* w, float* vw, unsigned i, float g) {
        if (velocity != nullptr) {
            const float v = momentum * vw[i] + g;
            vw[i] = v;
            w[i] -= lr * v;
        } else {
            w[i] -= lr * g;
        }
    };
    // A BN feature's running statistics, by the block that owns its column: estimators
    // e0, e0+de, … by the calling thread. Their old values and factors take two round trips
    // through L2: `prefetch_running` loads the first REPLICATED_PREFETCH of them before the
    // work that hides those trips (layer 0's dot products, a replicated layer's product), and
    // `running_update_prefetched` uses them.
    auto running_update = [&](unsigned col, unsigned bn_index, unsigned step, float mu, float sigma2, unsigned e0, unsigned de) {
        for (unsigned e = e0; e < n_estimators; e += de)
            update_running_stats(estimator_factors(estimators, e, batches_before(e, bn_index) + step, batch),
                                 running_mean + (size_t)e * bn_total + col, running_var + (size_t)e * bn_total + col, mu, sigma2);
    };
    auto prefetch_running = [&](RunningPrefetch& p, unsigned col, unsigned bn_index, unsigned step) {
        p.count = n_estimators < REPLICATED_PREFETCH ? n_estimators : REPLICATED_PREFETCH;
#pragma unroll
        for (unsigned e = 0; e < REPLICATED_PREFETCH; ++e) {
            if (e >= p.count) break;
            const EstimatorFactors f = estimator_factors(estimators, e, batches_before(e, bn_index) + step, batch);
            p.keep[e] = f.keep;
            p.corr[e] = f.corr;
            p.mean[e] = running_mean[(size_t)e * bn_total + col];
            p.var[e] = running_var[(size_t)e * bn_total + col];
        }
    };
    // The prefetched estimators' updates (update_running_stats' arithmetic), then the rest.
    auto running_update_prefetched = [&](const RunningPrefetch& p, unsigned col, unsigned bn_index, unsigned step, float mu, float sigma2) {
#pragma unroll
        for (unsigned e = 0; e < REPLICATED_PREFETCH; ++e) {
            if (e >= p.count) break;
            running_mean[(size_t)e * bn_total + col] = blend(p.keep[e], p.mean[e], 1.0f - p.keep[e], mu);
            running_var[(size_t)e * bn_total + col] = blend(p.keep[e], p.var[e], 1.0f - p.keep[e], __fmul_rn(sigma2, p.corr[e]));
        }
        running_update(col, bn_index, step, mu, sigma2, p.count, 1);
    };

    // The replicated layers' parameters (and velocity) into this block's copies.
    for (unsigned l = 1; l < n_layers; ++l) {
        const int* f = layer_info + (size_t)l * LAYER_FIELDS;
        const unsigned in = in_of(l), out = out_of(l), pitch = replicated_pitch(in), r = l - 1;
        for (unsigned i = t; i < in * out; i += T) {
            const unsigned m = i / in, k = i - m * in;
            sm[lay.w[r] + m * pitch + k] = params[f[L_W] + i];
            sm[lay.vw[r] + m * pitch + k] = velocity != nullptr ? velocity[f[L_W] + i] : 0.0f;
        }
        for (unsigned i = t; i < 2 * out; i += T) {
            const int field = i < out ? (f[L_BIAS] >= 0 ? f[L_BIAS] : f[L_GAMMA]) : f[L_BETA];
            const unsigned m = i < out ? i : i - out;
            sm[lay.vec[r] + i] = field >= 0 ? params[field + m] : 0.0f;
            sm[lay.vvec[r] + i] = field >= 0 && velocity != nullptr ? velocity[field + m] : 0.0f;
        }
    }
    __syncthreads();

    fused_trace_mark(FUSED_TRACE_BARRIERS);
    for (unsigned step = 0; step < steps; ++step) {
        const unsigned long long base = (unsigned long long)(cursor0 + step) * batch;
        const bool last = step + 1 == steps;
        float* a0g = (step & 1 ? dz : acts) + info0[L_ACT];

        // Layer 0's forward, this block's columns (fused_step.cu's forward of one column).
        {
            float* zx = xhat + info0[L_ACT];
            for (unsigned j = me; j < width0; j += G) {
                RunningPrefetch ahead{0};
                if (bn0 && t == 0) prefetch_running(ahead, (unsigned)info0[L_COL] + j, (unsigned)info0[L_BN], step);
                float z_kept = 0.0f;
                with_pixels(base, [&](const auto& px) {
                    column_dot(part, px, batch, in0, params + info0[L_W] + (size_t)j * in0, 1, zx + j, width0, nullptr, &z_kept);
                });
                const bool kept = batch <= FUSED_PASS_ROWS && batch <= T;
                auto z_at = [&](size_t i) { return kept ? z_kept : zx[i]; };
                if (bn0) {
                    const float g = params[info0[L_GAMMA] + j], be = params[info0[L_BETA] + j];
                    const ColumnMoments m = bn_column_forward(part, z_at, zx, a0g, width0, j, batch, g, be, epsilon, activation, inv_rows, reduce_width);
                    if (t == 0) {
                        inv_std[info0[L_COL] + j] = m.istd;
                        running_update_prefetched(ahead, (unsigned)info0[L_COL] + j, (unsigned)info0[L_BN], step, m.mu, m.sigma2);
                    }
                } else {
                    const float bias = params[info0[L_BIAS] + j];
                    for (unsigned r = t; r < batch; r += T) {
                        const size_t i = (size_t)r * width0 + j;
                        a0g[i] = activate(activation, z_at(i) + bias);
                    }
                }
                __syncthreads();
            }
        }
        grid_barrier(barrier, 2);

        // Row t's label: two dependent loads, issued before the copy of a0 and the forward.
        const unsigned long long pos = base + t;
        const unsigned image = t < batch && pos < order_len ? order[pos] : count;
        const unsigned label_t = image < count ? labels[image] : 255u;
        // All of a0 into shared memory: every block's columns, this step's parity.
        stage_rows<4>(reinterpret_cast<uint8_t*>(a0s), pitch0 * 4, batch, width0 * 4,
                      [&](unsigned r) { return reinterpret_cast<const uint8_t*>(a0g + (size_t)r * width0); });
        __syncthreads();

        // Forward of the replicated layers.
        for (unsigned l = 1; l < n_layers; ++l) {
            const int* f = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in = in_of(l), out = out_of(l), r_ = l - 1;
            const float* w = sm + lay.w[r_];
            const float* vec = sm + lay.vec[r_];
            if (l == hidden) {
                const bool has_bias = f[L_BIAS] >= 0;
                shared_product(batch, out, in, input_of(l), input_pitch(l), 1, w, replicated_pitch(in), 1,
                               [&](unsigned r, unsigned k, float v) { soft[r * out + k] = has_bias ? v + vec[k] : v; });
                break;
            }
            const unsigned pitch = replicated_pitch(out);
            float* xh = sm + lay.xhat[r_];
            float* a = sm + lay.act[r_];
            const bool bn = f[L_GAMMA] >= 0;
            // The statistics pass below gives column t to thread t (when out ≤ T): where this
            // block owns it, that thread loads its running statistics now, under the product.
            RunningPrefetch ahead{0};
            if (bn && t < out && t % G == me) prefetch_running(ahead, (unsigned)f[L_COL] + t, (unsigned)f[L_BN], step);
            shared_product(batch, out, in, input_of(l), input_pitch(l), 1, w, replicated_pitch(in), 1, [&](unsigned r, unsigned m, float v) {
                if (bn) xh[r * pitch + m] = v;
                else a[r * pitch + m] = activate(activation, v + vec[m]);
            });
            __syncthreads();
            if (bn) {
                // The statistics a thread per column, its rows in order; then x̂ and a by all
                // threads, element by element.
                float* istd_of = sm + lay.stat[r_];
                float* mu_of = istd_of + out;
                for (unsigned m = t; m < out; m += T) {
                    float s = 0.0f;
                    for (unsigned r = 0; r < batch; ++r) s += xh[r * pitch + m];
                    const float mu = s * inv_rows;
                    float q = 0.0f;
                    for (unsigned r = 0; r < batch; ++r) {
                        const float d = xh[r * pitch + m] - mu;
                        q += d * d;
                    }
                    const float sigma2 = q * inv_rows;
                    mu_of[m] = mu;
                    istd_of[m] = 1.0f / sqrtf(sigma2 + epsilon);
                    if (m % G != me) continue;
                    if (m == t) running_update_prefetched(ahead, (unsigned)f[L_COL] + m, (unsigned)f[L_BN], step, mu, sigma2);
                    else running_update((unsigned)f[L_COL] + m, (unsigned)f[L_BN], step, mu, sigma2, 0, 1);
                }
                __syncthreads();
                for_elements(batch, out, [&](unsigned r, unsigned m) {
                    const float x = (xh[r * pitch + m] - mu_of[m]) * istd_of[m];
                    xh[r * pitch + m] = x;
                    a[r * pitch + m] = activate(activation, vec[m] * x + vec[out + m]);
                });
                __syncthreads();
            }
        }
        __syncthreads();

        // Softmax cross-entropy (softmax_xent.cu's arithmetic), a row a thread; dlogits
        // overwrite the logits. Every block computes them; the writer adds the rows' losses.
        {
            for (unsigned r = t; r < batch; r += T) {
                unsigned label = label_t;
                if (r != t) {
                    const unsigned long long pos_r = base + r;
                    const unsigned image_r = pos_r < order_len ? order[pos_r] : count;
                    label = image_r < count ? labels[image_r] : 255u;
                }
                bool right;
                losses[r] = softmax_row(soft + (size_t)r * classes, classes, label, grad_scale, &right);
                rights[r] = right ? 1u : 0u;
            }
            __syncthreads();
            if (writer && t == 0) {
                double s = 0.0;
                unsigned long long c = 0;
                for (unsigned r = 0; r < batch; ++r) { s += losses[r]; c += rights[r]; }
                loss_sum[0] += s;
                correct[0] += c;
            }
        }

        // Backward of the replicated layers, from the output layer down: dA of the layer below
        // into the scratch (layer 0: this block's columns only), then this layer's weight
        // gradient applied in place, then the layer below's dZ (in place of its a).
        for (unsigned l = hidden; l >= 1; --l) {
            const int* f = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in = in_of(l), out = out_of(l), r_ = l - 1, wp = replicated_pitch(in);
            float* w = sm + lay.w[r_];
            float* vw = sm + lay.vw[r_];
            const float* dzl = l == hidden ? soft : sm + lay.act[r_];
            const unsigned dzp = l == hidden ? classes : replicated_pitch(out);
            const float* input = input_of(l);
            const unsigned ip = input_pitch(l);
            if (l > 1) {
                shared_product(batch, in, out, dzl, dzp, 1, w, 1, wp, [&](unsigned r, unsigned j, float v) { scratch[r * ip + j] = v; });
            } else {
                for (unsigned q = t; q < batch * lay.owned; q += T) {
                    const unsigned c = q / batch, r = q - c * batch, j = me + c * G;
                    if (j >= width0) continue;
                    float s = 0.0f;
                    for (unsigned m = 0; m < out; ++m) s += dzl[r * dzp + m] * w[m * wp + j];
                    scratch[c * batch + r] = s;
                }
            }
            if (l == hidden && f[L_BIAS] >= 0) {
                // The output bias, a thread per class (only this thread reads it).
                float* vec = sm + lay.vec[r_];
                float* vvec = sm + lay.vvec[r_];
                for (unsigned k = t; k < out; k += T) {
                    float s = 0.0f;
                    for (unsigned r = 0; r < batch; ++r) s += soft[r * classes + k];
                    if (last && writer) grads[f[L_BIAS] + k] = s;
                    sgd_shared(vec, vvec, k, s);
                }
            }
            __syncthreads();  // the dA products read W before it changes
            shared_product(out, in, batch, dzl, 1, dzp, input, 1, ip, [&](unsigned m, unsigned k, float g) {
                if (last && writer) grads[f[L_W] + (size_t)m * in + k] = g;
                sgd_shared(w, vw, m * wp + k, g);
            });
            __syncthreads();  // the weight gradient read the layer below's a
            // Phase timing (bench --trace): the replicated layers, dA0 of this block's columns
            // included, end here; a mark in slot 2·step + 1, between the barriers' even slots.
            if (l == 1 && t == 0 && fused_trace != nullptr && 2 * step + 1 < FUSED_TRACE_BARRIERS) {
                const unsigned long long clock = FUSED_CLOCK(), timer = FUSED_GLOBALTIMER();
                fused_trace_slot(2 * step + 1, clock, timer, true);
            }
            if (l > 1) {
                // The layer below (replicated, hidden): dY = act'(a)·dA, then BN's backward
                // (or the bias's gradient); dZ replaces a.
                const unsigned lb = l - 1, rb = lb - 1, width = out_of(lb), p = replicated_pitch(width);
                const int* fb = layer_info + (size_t)lb * LAYER_FIELDS;
                float* a = sm + lay.act[rb];
                const float* xh = sm + lay.xhat[rb];
                float* vec = sm + lay.vec[rb];
                float* vvec = sm + lay.vvec[rb];
                const bool bn = fb[L_GAMMA] >= 0;
                const float* istd_of = sm + lay.stat[rb];
                float* d_beta = sm + lay.stat[rb] + width;  // or the bias's gradient
                float* d_gamma = d_beta + width;
                // dY element by element; the column sums a thread per column, rows in order;
                // BN's dZ element by element (with γ before its update); the updates.
                for_elements(batch, width, [&](unsigned r, unsigned j) {
                    a[r * p + j] = activate_backward(activation, a[r * p + j], scratch[r * p + j]);
                });
                __syncthreads();
                for (unsigned j = t; j < width; j += T) {
                    float sb = 0.0f, sg = 0.0f;
                    for (unsigned r = 0; r < batch; ++r) {
                        const float dy = a[r * p + j];
                        sb += dy;
                        if (bn) sg += dy * xh[r * p + j];
                    }
                    d_beta[j] = sb;
                    d_gamma[j] = sg;
                }
                __syncthreads();
                if (bn) {
                    for_elements(batch, width, [&](unsigned r, unsigned j) {
                        const float dy = a[r * p + j], x = xh[r * p + j];
                        a[r * p + j] = vec[j] * istd_of[j] / b * (b * dy - d_beta[j] - x * d_gamma[j]);
                    });
                    __syncthreads();
                }
                for (unsigned j = t; j < width; j += T) {
                    if (bn) {
                        if (last && writer) {
                            grads[fb[L_GAMMA] + j] = d_gamma[j];
                            grads[fb[L_BETA] + j] = d_beta[j];
                        }
                        sgd_shared(vec, vvec, j, d_gamma[j]);
                        sgd_shared(vec, vvec, width + j, d_beta[j]);
                    } else {
                        if (last && writer) grads[fb[L_BIAS] + j] = d_beta[j];
                        sgd_shared(vec, vvec, j, d_beta[j]);
                    }
                }
                __syncthreads();
            }
        }

        // Layer 0's backward, this block's columns: dY from dA0 (scratch) and a0, BN's
        // backward (fused_step.cu's, block-wide sums), dZ0 in the scratch, then the weight row's
        // gradient from the step's pixels and its update.
        for (unsigned c = 0, j = me; j < width0; ++c, j += G) {
            float* d = scratch + c * batch;
            float sb = 0.0f, sg = 0.0f, dy_kept = 0.0f, xh_kept = 0.0f;
            const float* xh0 = xhat + info0[L_ACT];
            for (unsigned r = t; r < batch; r += T) {
                const float dy = activate_backward(activation, a0s[r * pitch0 + j], d[r]);
                d[r] = dy;
                if (bn0) {
                    const float x = xh0[(size_t)r * width0 + j];
                    sb += dy;
                    sg += dy * x;
                    dy_kept = dy;
                    xh_kept = x;
                }
            }
            const bool kept = batch <= T;
            if (bn0) {
                const float g = params[info0[L_GAMMA] + j], istd = inv_std[info0[L_COL] + j];
                const float sums[2] = {sb, sg};
                float totals[2];
                block_totals<2>(part, sums, totals, reduce_width);
                const float d_beta = totals[0], d_gamma = totals[1];
                for (unsigned r = t; r < batch; r += T) {
                    const float dy = kept ? dy_kept : d[r], x = kept ? xh_kept : xh0[(size_t)r * width0 + j];
                    d[r] = g * istd / b * (b * dy - d_beta - x * d_gamma);
                }
                if (t == 0) {
                    grads[info0[L_GAMMA] + j] = d_gamma;
                    grads[info0[L_BETA] + j] = d_beta;
                }
            } else {
                __syncthreads();
                if (t == 0) {
                    float s = 0.0f;
                    for (unsigned r = 0; r < batch; ++r) s += d[r];
                    grads[info0[L_BIAS] + j] = s;
                }
            }
            __syncthreads();
            with_pixels(base, [&](const auto& px) {
                weight_row_gradient(part, gs, grads + info0[L_W] + (size_t)j * in0, d, 1, px, batch, in0);
            });
            __syncthreads();
            sgd_row(info0, j, params, grads, velocity, lr, momentum);
        }
    }

    // Every block's last reads of the counters (and of a0) lie before this barrier.
    grid_barrier(barrier, 2);
    if (writer) {
        for (unsigned l = 1; l < n_layers; ++l) {
            const int* f = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in = in_of(l), out = out_of(l), pitch = replicated_pitch(in), r = l - 1;
            for (unsigned i = t; i < in * out; i += T) {
                const unsigned m = i / in, k = i - m * in;
                params[f[L_W] + i] = sm[lay.w[r] + m * pitch + k];
                if (velocity != nullptr) velocity[f[L_W] + i] = sm[lay.vw[r] + m * pitch + k];
            }
            for (unsigned i = t; i < 2 * out; i += T) {
                const int field = i < out ? (f[L_BIAS] >= 0 ? f[L_BIAS] : f[L_GAMMA]) : f[L_BETA];
                const unsigned m = i < out ? i : i - out;
                if (field < 0) continue;
                params[field + m] = sm[lay.vec[r] + i];
                if (velocity != nullptr) velocity[field + m] = sm[lay.vvec[r] + i];
            }
        }
        if (t == 0) {
            cursor[0] = cursor0 + steps;
            for (unsigned e = 0; e < n_estimators; ++e)
                for (unsigned bn = 0; bn < bn_layers; ++bn) batches[(size_t)e * bn_layers + bn] += steps;
        }
    }
    fused_trace_mark(FUSED_TRACE_BARRIERS + 1);
}

// One block an SM (the layout takes most of its shared memory): up to 512 threads, 128
// registers each.
extern "C" __global__ void __launch_bounds__(REPLICATED_THREADS, 1) fused_train_steps_replicated_f32(FUSED_PARAMS)
{
    replicated_train_steps<REPLICATED_THREADS>(FUSED_ARGS);
}
