// Whole training steps with ONE grid barrier a step: the layers above the first are
// replicated, every block computing all of them, from its own copy of their parameters in
// shared memory. Included at the end of fused_step.cu, whose pieces it uses (the grid barrier,
// the block totals, bn_column_forward, softmax_row, Chunk, ChunkWalk) and whose parameters it
// takes (FUSED_PARAMS), in the same module (so `bench --trace` reaches it through fused_trace).
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
//               once (v ← μv + g, W ← W − lr·v, element by element); but layer 1's (the
//               largest: 100×100 for the seed, 60 deep) only for the rows m ≡ block mod G,
//               each block's rows going to a buffer in global memory that every block copies
//               whole after the next step's barrier (see Layer 1's weights);
//               dY = act'(A)·dA;  BN: dβ = Σ_r dY, dγ = Σ_r dY·x̂, dZ = γ·istd/B·(B·dY − dβ − x̂·dγ)
//   layer 0 again (its own columns): dA0[:,j] = dZ_1·W_1[:,j];  BN backward;
//     dW0[j,:] = Σ_r dZ0[r,j]·x[r,:], each element applied as it is summed, to the block's own
//     copy of row j (only this block reads it; written back at the end of the launch).
// Every block computes the replicated layers with the same instructions on the same values,
// so their copies stay bitwise equal; the writer block (the last, G − 1: with a grid one
// wider than layer 0, as the host launches it where the device has room, a block with no
// layer-0 column, idle through that work) adds the step's losses, and writes the copies back
// at the end of the launch (and their gradients, the last step's, as the other kernels leave
// them), but for layer 1's weights: their owners write those rows' gradients and velocity,
// and the writer only copies the weights from xhat when the last step's parity is odd.
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
// Layer 1's weights: its weight gradient is split by rows like layer 0's columns (a block sums
// 100 of the 10 000 outputs, not all), since the copy every block then makes (40 KB, with a0
// after the barrier) costs less than the product. Between steps the weights alternate by step
// parity between params' own and xhat (which the host sizes for them): a block writes its rows
// of step s into parity s + 1, which no block reads before the next barrier and every block
// last read (as parity s − 1) before this one. The velocity of a block's rows stays in its
// shared memory; the writer copies odd parity's weights to params at the end.
//
// Layer 0 (pixel_column_dot, pixel_row_gradient): the step's pixels come straight from global
// memory into registers, 16 bytes a load where the rows allow, all of a thread's rows in
// flight at once, and are widened to floats by pixel_scaled; the block's weight rows, γ, β
// and their velocity stay in its shared memory for the whole launch.
//
// Layout: the parameters and buffers of FUSED_PARAMS, as fused_step.cu has them, except:
// acts' layer-0 block holds a0 of even steps, dz's of odd ones; xhat layer 1's weights of odd
// steps; the replicated layers' blocks of acts and dz, row_loss and row_correct go unused
// (layer 0's x̂ stays in shared memory); `weight_row_stage` and the stage offsets are ignored.
// Only the last step's gradients reach `grads`.
//   Dynamic shared memory (replicated_layout, in floats, each region 16-byte aligned; sized
//   by the host through fused_replicated_layout_bytes): per replicated layer W [out,
//   quad pitch ≥ in] and its velocity (layer 1's: of the block's rows only), the bias (or γ
//   then β) [2·out] and its velocity; per replicated hidden layer x̂ and a [B, odd pitch ≥
//   out] and its column statistics [3·out]; a0 [B, quad pitch ≥ width0]; the logits, then
//   dlogits [B, classes]; a scratch for dA ([B, pitch] of the widest replicated hidden layer,
//   or [owned columns, B] of layer 0's dA0); the rows' losses [B] f64 and correct flags [B]
//   u32; the block's layer-0 columns and the steps' image indices (see ReplicatedLayout).
//   Quad pitch: replicated_quad_pitch. The seed network: 154.5 KiB, and 16.3 KiB of static
//   `part`.
// Launch: cooperative, grid G ≤ layer 0's width + 1 (and co-resident), blocks of 256 or 512
//   threads (REPLICATED_THREADS: one block an SM, so 128 registers), the layout's bytes.
// Limits (the layout's bytes are 0 beyond them): at most REPLICATED_MAX_LAYERS layers above
// the first, G ≥ 1.

#define REPLICATED_THREADS 512
#define REPLICATED_MAX_LAYERS 4
// Trace slots a step (bench --trace; src/cuda/phase_trace.rs's replicated_phase_names): its
// grid barrier (slot 5·step), then marks of thread 0 (a mark is no barrier: each block passes
// it at its own pace) after the copy of a0 and layer 1's weights (+1), after the replicated
// forward and the softmax (+2), after the replicated backward down to dA0 (+3), and after
// layer 0's backward (+4, thread 0's last update: the other threads may still be at theirs).
#define REPLICATED_TRACE_STRIDE 5

// Thread 0 records passing trace slot `slot` (nothing when the trace is off or full).
__device__ __forceinline__ void replicated_trace_mark(unsigned slot) {
    if (threadIdx.x == 0 && fused_trace != nullptr && slot < FUSED_TRACE_BARRIERS) {
        const unsigned long long clock = FUSED_CLOCK(), timer = FUSED_GLOBALTIMER();
        fused_trace_slot(slot, clock, timer, true);
    }
}

// Row pitch (floats) of a shared [rows, n] array: odd, so that 32 consecutive rows read at
// the same column fall in 32 distinct banks.
__host__ __device__ __forceinline__ unsigned replicated_pitch(unsigned n) { return n | 1u; }
// Row pitch (floats) of the replicated weights and of a0, the operands that the forward
// products read four floats a load (tile_products' quads): a multiple of 4 and ≡ 4 mod 32, so
// that a quarter warp's 16-byte loads of eight consecutive rows at one column fall in 32
// distinct banks (an odd pitch does that for loads of one float; a0 and the weights are read
// by rows only in those products, and the copies store them four floats at a time).
__host__ __device__ __forceinline__ unsigned replicated_quad_pitch(unsigned n) {
    const unsigned p = (n + 3) / 4 * 4;
    return p + (36 - p % 32) % 32;
}
// Row pitch (floats) of layer 0's weight rows: a multiple of 4, so that a chunk's weights
// come four a load.
__host__ __device__ __forceinline__ unsigned replicated_row_pitch(unsigned n) { return (n + 3) / 4 * 4; }

struct ReplicatedLayout {
    // Per replicated layer r = l − 1 (float offsets): weights, their velocity, bias or γ|β,
    // its velocity; x̂, a and per-column statistics (hidden layers only): [out] 1/σ, then
    // [2·out] the forward's μ or the backward's column sums (dβ|dγ, or the bias's).
    unsigned w[REPLICATED_MAX_LAYERS], vw[REPLICATED_MAX_LAYERS], vec[REPLICATED_MAX_LAYERS], vvec[REPLICATED_MAX_LAYERS];
    unsigned xhat[REPLICATED_MAX_LAYERS], act[REPLICATED_MAX_LAYERS], stat[REPLICATED_MAX_LAYERS];
    unsigned a0, soft, scratch, losses, rights;
    // Layer 0's columns that the block owns (at most `owned`: ⌈width0 / G⌉), kept here for the
    // whole launch: weight rows [owned, w0_pitch] and their velocity, γ|β (or the bias) [owned, 2]
    // and its velocity, z then x̂ [owned, B], 1/σ [owned]; and the image indices of the step's
    // rows [2, B] (by step parity: the next step's are loaded during this one).
    unsigned w0, vw0, vec0, vvec0, x0, istd0, image;
    unsigned w0_pitch;
    unsigned owned;
    unsigned owned1;  // layer 1's weight rows a block owns at most: ⌈out1 / G⌉ (their velocity: vw[0])
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
    s.owned1 = ((unsigned)info[LAYER_FIELDS + L_OUT] + grid - 1) / grid;
    unsigned long long scratch = B * s.owned;
    for (unsigned l = 1; l < n_layers; ++l) {
        const int* f = info + (size_t)l * LAYER_FIELDS;
        const unsigned in = (unsigned)f[L_IN], out = (unsigned)f[L_OUT], r = l - 1;
        s.w[r] = take((unsigned long long)out * replicated_quad_pitch(in));
        s.vw[r] = take((unsigned long long)(l == 1 ? s.owned1 : out) * replicated_quad_pitch(in));
        s.vec[r] = take(2ull * out);
        s.vvec[r] = take(2ull * out);
        if (l < hidden) {
            s.xhat[r] = take(B * replicated_pitch(out));
            s.act[r] = take(B * replicated_pitch(out));
            s.stat[r] = take(3ull * out);
            if (B * replicated_pitch(out) > scratch) scratch = B * replicated_pitch(out);
        }
    }
    s.a0 = take(B * replicated_quad_pitch(width0));
    s.soft = take(B * (unsigned)info[(size_t)hidden * LAYER_FIELDS + L_OUT]);
    s.scratch = take(scratch);
    s.losses = take(2 * B);  // f64, at a multiple of 4 floats
    s.rights = take(B);
    s.w0_pitch = replicated_row_pitch((unsigned)info[L_IN]);
    s.w0 = take((unsigned long long)s.owned * s.w0_pitch);
    s.vw0 = take((unsigned long long)s.owned * s.w0_pitch);
    s.vec0 = take(2ull * s.owned);
    s.vvec0 = take(2ull * s.owned);
    s.x0 = take(B * s.owned);
    s.istd0 = take(s.owned);
    s.image = take(2 * B);
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
    // Both operands contiguous along p and 16-byte aligned: four p a load (LDS.128), each
    // output still summed in order of p. For A that is a quarter of the loads, each a
    // broadcast; for B the same bytes in a quarter of the instructions. Shared-memory
    // wavefronts per warp per p: R/4 + R, not R + R (the forward products, the largest).
    const bool quads = ap == 1 && bp == 1 && K % 4 == 0 && ai % 4 == 0 && bj % 4 == 0 && ((size_t)A & 15) == 0 && ((size_t)B & 15) == 0;
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
        if (quads) {
            for (unsigned p = 0; p < K; p += 4) {
                float4 x[R];
#pragma unroll
                for (unsigned u = 0; u < R; ++u) x[u] = FUSED_LOAD_F4(A + ao[u] + p);
#pragma unroll
                for (unsigned v = 0; v < R; ++v) {
                    const float4 y = FUSED_LOAD_F4(B + bo[v] + p);
#pragma unroll
                    for (unsigned u = 0; u < R; ++u) {
                        acc[u][v] += x[u].x * y.x;
                        acc[u][v] += x[u].y * y.y;
                        acc[u][v] += x[u].z * y.z;
                        acc[u][v] += x[u].w * y.w;
                    }
                }
            }
        } else {
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

// Layer 0's pixels straight into registers. The batch's [rows, features] bytes are a grid of
// (row, chunk) cells, a chunk V = 16, 4 or 1 bytes (the largest the rows' alignment allows):
// lanes = min(chunks a row, T) threads take a row's chunks c = lane, lane + lanes, …, and
// groups = T / lanes row groups take rows group, group + groups, … A pass gives each thread
// up to pixel_rows<V>() rows, their loads all issued before any is used: one round
// trip a pass. The seed in blocks of 512: 49 lanes × 10 groups, the batch in one pass of six
// 16-byte loads a thread (in blocks of 256: 5 groups, two passes). The grid kernels'
// column_dot instead reads four bytes a load, 32 lanes to a row in blocks of 256 (two words
// a lane of four rows at once: 8 round trips a thread for the seed's batch), and converts
// each byte with an I2F (16 a cycle an SM; pixel_scaled here).
//
// Rows a thread a pass: the seed's 6 in blocks of 512 for 16-byte chunks (6 loads, 24
// registers), 8 for the narrower ones.
template <unsigned V> __device__ __forceinline__ constexpr unsigned pixel_rows() { return V == 16 ? 6 : 8; }

// A chunk as 32-bit words (CHUNK_PIXELS(V) pixels each), word q (q constant once unrolled);
// word_pixels gives a word's pixels as floats scaled by 1/255 (pixel_scaled).
#define CHUNK_WORDS(V) ((V) >= 4 ? (V) / 4 : 1)
#define CHUNK_PIXELS(V) ((V) >= 4 ? 4 : (V))
__device__ __forceinline__ unsigned chunk_word(const uint4& c, unsigned q) { return q == 0 ? c.x : q == 1 ? c.y : q == 2 ? c.z : c.w; }
__device__ __forceinline__ unsigned chunk_word(unsigned c, unsigned) { return c; }
__device__ __forceinline__ unsigned chunk_word(uint8_t c, unsigned) { return c; }
template <unsigned P>
__device__ __forceinline__ void word_pixels(unsigned word, float* x) {
#pragma unroll
    for (unsigned e = 0; e < P; ++e) x[e] = pixel_scaled(word, e);
}

// The P floats of a shared row at p (16-byte aligned when P = 4): one load.
template <unsigned P>
__device__ __forceinline__ void shared_floats(const float* p, float* x) {
    if constexpr (P == 4) {
        const float4 q = FUSED_LOAD_F4(p);
        x[0] = q.x; x[1] = q.y; x[2] = q.z; x[3] = q.w;
    } else {
#pragma unroll
        for (unsigned e = 0; e < P; ++e) x[e] = p[e];
    }
}

template <unsigned V>
struct PixelChunks {
    typedef typename Chunk<V>::T Raw;
    const uint8_t* images;
    const unsigned* image;  // shared [rows]: the step's image indices (≥ count: a row past the dataset)
    unsigned count, features, chunks, lanes, groups, lane, group;
    __device__ __forceinline__ PixelChunks(const uint8_t* images_, const unsigned* image_, unsigned count_, unsigned features_)
        : images(images_), image(image_), count(count_), features(features_) {
        chunks = features / V;
        lanes = chunks < blockDim.x ? chunks : blockDim.x;
        groups = blockDim.x / lanes;
        lane = threadIdx.x % lanes;
        group = threadIdx.x / lanes;
    }
    __device__ __forceinline__ bool valid(unsigned r) const { return image[r] < count; }
    // Chunk c of row r (zeros for a row past the dataset, which is not read).
    __device__ __forceinline__ Raw load(unsigned r, unsigned c) const {
        const unsigned i = image[r];
        return i < count ? Chunk<V>::load(images + (size_t)i * features + (size_t)c * V) : Raw{};
    }
};

// z[r] = Σ_k x[r,k]·w[k] for r < rows (x the pixels scaled by 1/255, w a shared row): each
// thread sums its chunks (c in order, a chunk's bytes in order) for each of its rows into
// `part` ([pass rows, lanes], part_floats at most), then a thread per row adds its lanes'
// sums in a fixed order (four interleaved sums, then (s0+s1)+(s2+s3)). A row past the
// dataset gives NaN, as gather.cu does. Every thread calls it (it synchronizes).
template <unsigned V>
__device__ __forceinline__ void pixel_column_dot(float* part, unsigned part_floats, const PixelChunks<V>& px, unsigned rows, const float* w, float* z)
{
    typedef typename PixelChunks<V>::Raw Raw;
    constexpr unsigned RPR = pixel_rows<V>();
    unsigned per_pass = px.groups * RPR;
    if (per_pass * px.lanes > part_floats) per_pass = part_floats / px.lanes;
    for (unsigned first = 0; first < rows; first += per_pass) {
        const unsigned pass = rows - first < per_pass ? rows - first : per_pass;
        if (px.group < px.groups) {
            float acc[RPR];
#pragma unroll
            for (unsigned u = 0; u < RPR; ++u) acc[u] = 0.0f;
            for (unsigned c = px.lane; c < px.chunks; c += px.lanes) {
                Raw raw[RPR];
#pragma unroll
                for (unsigned u = 0; u < RPR; ++u) {
                    const unsigned i = px.group + u * px.groups;
                    raw[u] = i < pass ? px.load(first + i, c) : Raw{};
                }
                // A word of weights at a time for every row (each row's sum still runs in
                // order of its bytes): 4 of them live, not V.
                constexpr unsigned P = CHUNK_PIXELS(V);
#pragma unroll
                for (unsigned q = 0; q < CHUNK_WORDS(V); ++q) {
                    float wq[P];
                    shared_floats<P>(w + (size_t)c * V + q * P, wq);
#pragma unroll
                    for (unsigned u = 0; u < RPR; ++u) {
                        if (px.group + u * px.groups >= pass) continue;
                        float x[P];
                        word_pixels<P>(chunk_word(raw[u], q), x);
#pragma unroll
                        for (unsigned e = 0; e < P; ++e) acc[u] += x[e] * wq[e];
                    }
                }
            }
#pragma unroll
            for (unsigned u = 0; u < RPR; ++u) {
                const unsigned i = px.group + u * px.groups;
                if (i < pass) part[i * px.lanes + px.lane] = px.valid(first + i) ? acc[u] : __int_as_float(0x7fc00000);
            }
        }
        __syncthreads();
        for (unsigned i = threadIdx.x; i < pass; i += blockDim.x) {
            const float* p = part + i * px.lanes;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            unsigned q = 0;
            for (; q + 4 <= px.lanes; q += 4) { s0 += p[q]; s1 += p[q + 1]; s2 += p[q + 2]; s3 += p[q + 3]; }
            if (q < px.lanes) s0 += p[q];
            if (q + 1 < px.lanes) s1 += p[q + 1];
            if (q + 2 < px.lanes) s2 += p[q + 2];
            z[first + i] = (s0 + s1) + (s2 + s3);
        }
        __syncthreads();
    }
}

// epi(k, Σ_r dz[r]·x[r,k]) for every k < features, once each: thread (group, lane) sums its
// rows (group, group + groups, …, in order) for the V bytes of its chunk, then the groups'
// sums are added in group order, S = min(V, 8) of each chunk's outputs at a time through
// `part` ([S, groups·lanes]: a warp's stores and loads fall in consecutive banks; T·8 floats
// at most). A row past the dataset makes every sum NaN. Every thread calls it.
template <unsigned V, typename Epi>
__device__ __forceinline__ void pixel_row_gradient(float* part, const PixelChunks<V>& px, unsigned rows, const float* dz, Epi epi)
{
    typedef typename PixelChunks<V>::Raw Raw;
    constexpr unsigned RPR = pixel_rows<V>(), S = V < 8 ? V : 8;
    const unsigned per_pass = px.groups * RPR, cells = px.groups * px.lanes;
    const float nan = __int_as_float(0x7fc00000);
    for (unsigned c0 = 0; c0 < px.chunks; c0 += px.lanes) {
        const unsigned c = c0 + px.lane, span = px.chunks - c0 < px.lanes ? px.chunks - c0 : px.lanes;
        const bool mine = px.group < px.groups && c < px.chunks;
        float acc[V];
#pragma unroll
        for (unsigned e = 0; e < V; ++e) acc[e] = 0.0f;
        if (mine) {
            for (unsigned first = 0; first < rows; first += per_pass) {
                const unsigned pass = rows - first < per_pass ? rows - first : per_pass;
                Raw raw[RPR];
#pragma unroll
                for (unsigned u = 0; u < RPR; ++u) {
                    const unsigned i = px.group + u * px.groups;
                    raw[u] = i < pass ? px.load(first + i, c) : Raw{};
                }
#pragma unroll
                for (unsigned u = 0; u < RPR; ++u) {
                    const unsigned r = first + px.group + u * px.groups;
                    if (r >= first + pass) continue;
                    // A row past the dataset: its zeros times NaN, every sum NaN.
                    const float g = px.valid(r) ? dz[r] : nan;
                    constexpr unsigned P = CHUNK_PIXELS(V);
#pragma unroll
                    for (unsigned q = 0; q < CHUNK_WORDS(V); ++q) {
                        float x[P];
                        word_pixels<P>(chunk_word(raw[u], q), x);
#pragma unroll
                        for (unsigned e = 0; e < P; ++e) acc[q * P + e] += g * x[e];
                    }
                }
            }
        }
#pragma unroll
        for (unsigned s0 = 0; s0 < V; s0 += S) {
            if (mine)
#pragma unroll
                for (unsigned i = 0; i < S; ++i) part[i * cells + px.group * px.lanes + px.lane] = acc[s0 + i];
            __syncthreads();
            for_elements(S, span, [&](unsigned i, unsigned l) {
                const float* p = part + i * cells + l;
                float sum = p[0];
                for (unsigned g = 1; g < px.groups; ++g) sum += p[g * px.lanes];
                epi((c0 + l) * V + s0 + i, sum);
            });
            __syncthreads();
        }
    }
}

// [rows, width] floats from global memory (rows contiguous) into shared rows of `pitch`.
struct FloatRows {
    const float* src;
    float* dst;
    unsigned rows, width, pitch;
};
// Copies `a`, then `b`, as one run of loads: 16 bytes a load where both allow it (widths a
// multiple of 4, sources 16-byte aligned), else 4; REPLICATED_STAGE_QUADS of a thread's loads
// issued before any is stored (the seed's a0 and layer-1 weights: 4000 loads of 16 bytes, two
// rounds in blocks of 512: eight a round, one round for the seed, made the kernel spill 202
// bytes where four spill 42).
#define REPLICATED_STAGE_QUADS 4
__device__ __forceinline__ void stage_float_rows(FloatRows a, FloatRows b) {
    const bool quads = a.width % 4 == 0 && b.width % 4 == 0 && ((size_t)a.src & 15) == 0 && ((size_t)b.src & 15) == 0;
    // (Four floats a store too where the destinations' rows are 16-byte aligned: four
    // scalar stores of a lane's floats would fall four lanes to a bank.)
    const bool quad_stores = quads && a.pitch % 4 == 0 && b.pitch % 4 == 0 && ((size_t)a.dst & 15) == 0 && ((size_t)b.dst & 15) == 0;
    const unsigned V = quads ? 4 : 1, na = a.rows * a.width / V, n = na + b.rows * b.width / V, T = blockDim.x;
    for (unsigned q0 = threadIdx.x; q0 < n; q0 += REPLICATED_STAGE_QUADS * T) {
        float4 v[REPLICATED_STAGE_QUADS];
#pragma unroll
        for (unsigned u = 0; u < REPLICATED_STAGE_QUADS; ++u) {
            const unsigned q = q0 + u * T;
            if (q >= n) break;
            const float* p = q < na ? a.src + q * V : b.src + (q - na) * V;
            v[u] = quads ? FUSED_LOAD_F4(p) : float4{p[0], 0.0f, 0.0f, 0.0f};
        }
#pragma unroll
        for (unsigned u = 0; u < REPLICATED_STAGE_QUADS; ++u) {
            const unsigned q = q0 + u * T;
            if (q >= n) break;
            // (Field by field: selecting between the two structs put them on the stack.)
            const bool in_a = q < na;
            const unsigned width = in_a ? a.width : b.width, pitch = in_a ? a.pitch : b.pitch;
            const unsigned i = (in_a ? q : q - na) * V, r = i / width, k = i - r * width;
            float* d = (in_a ? a.dst : b.dst) + r * pitch + k;
            if (quad_stores) {
                FUSED_STORE_F4(d, v[u]);
            } else {
                d[0] = v[u].x;
                if (quads) { d[1] = v[u].y; d[2] = v[u].z; d[3] = v[u].w; }
            }
        }
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
    // `part`: the block totals, and layer 0's partial sums (pixel_column_dot: [pass rows,
    // lanes]; pixel_row_gradient: T·8 floats).
    constexpr unsigned PART_FLOATS = fused_part_floats(MAX_T);
    static_assert(PART_FLOATS >= MAX_T * 8, "pixel_row_gradient's sums");
#ifdef EMULATED_BLOCK_SHARED
    if (blockDim.x > MAX_T) EMULATED_TRAP("a block larger than the kernel's launch bounds");
    float* part = EMULATED_BLOCK_SHARED(PART_FLOATS);
    float* sm = reinterpret_cast<float*>(EMULATED_BLOCK_DYNAMIC());
#else
    __shared__ __align__(16) float part[PART_FLOATS];
    extern __shared__ __align__(16) uint8_t fused_dynamic_shared[];
    float* sm = reinterpret_cast<float*>(fused_dynamic_shared);
#endif

    const unsigned t = threadIdx.x, T = blockDim.x, G = gridDim.x, me = blockIdx.x;
    const unsigned hidden = n_layers - 1;
    // The block that adds the losses and writes the replicated layers back (see the header).
    const bool writer = me == G - 1;
    const ReplicatedLayout lay = replicated_layout(layer_info, n_layers, batch, G);
    // The host sized the dynamic shared memory by this layout (a network beyond it never
    // launches); a mismatch traps rather than writing past the block's shared memory.
    if (lay.bytes == 0 || FUSED_DYNAMIC_BYTES() < lay.bytes) FUSED_TRAP();
    const int* info0 = layer_info;
    const unsigned in0 = (unsigned)info0[L_IN], width0 = (unsigned)info0[L_OUT], pitch0 = replicated_quad_pitch(width0);
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
    const unsigned cursor0 = cursor[0];
    auto batches_before = [&](unsigned e, unsigned bn) { return batches[(size_t)e * bn_layers + bn]; };
    // Layer 0's columns of this block (see ReplicatedLayout) and the steps' image indices.
    float* w0s = sm + lay.w0;
    float* vw0s = sm + lay.vw0;
    float* vec0s = sm + lay.vec0;
    float* vvec0s = sm + lay.vvec0;
    float* x0s = sm + lay.x0;
    float* istd0s = sm + lay.istd0;
    unsigned* image_of = reinterpret_cast<unsigned*>(sm + lay.image);
    auto image_at = [&](unsigned long long pos) { return pos < order_len ? order[pos] : count; };
    // The pixels in chunks of 16, 4 or 1 bytes: the largest that every row's start allows.
    const unsigned chunk_bytes = features % 16 == 0 && ((size_t)images & 15) == 0 ? 16u
                               : features % 4 == 0 && ((size_t)images & 3) == 0   ? 4u
                                                                                  : 1u;
    auto with_chunks = [&](const unsigned* image, auto f) {
        if (chunk_bytes == 16) f(PixelChunks<16>(images, image, count, features));
        else if (chunk_bytes == 4) f(PixelChunks<4>(images, image, count, features));
        else f(PixelChunks<1>(images, image, count, features));
    };
    // A layer-0 column's bias (or γ, then β) fields.
    auto vec0_field = [&](unsigned i) { return i == 0 ? (bn0 ? info0[L_GAMMA] : info0[L_BIAS]) : (bn0 ? info0[L_BETA] : -1); };
    // Layer 1's weights between steps, by step parity: params' own, then xhat (which this
    // kernel leaves otherwise unused; the host sizes it for them).
    auto w1_buffer = [&](unsigned parity) { return parity ? xhat : params + layer_info[LAYER_FIELDS + L_W]; };
    // Replicated layer l's shapes and shared arrays.
    auto in_of = [&](unsigned l) { return (unsigned)layer_info[(size_t)l * LAYER_FIELDS + L_IN]; };
    auto out_of = [&](unsigned l) { return (unsigned)layer_info[(size_t)l * LAYER_FIELDS + L_OUT]; };
    // A replicated layer's input: a0 (layer 1) or the layer below's a, and its pitch.
    auto input_of = [&](unsigned l) { return l == 1 ? a0s : sm + lay.act[l - 2]; };
    auto input_pitch = [&](unsigned l) { return l == 1 ? pitch0 : replicated_pitch(in_of(l)); };
    // One SGD step of weight w with velocity *v (unused without momentum): the new weight.
    auto sgd_step = [&](float w, float* v, float g) { return sgd_value(w, g, velocity != nullptr ? v : nullptr, lr, momentum); };
    // The same on a shared copy's element.
    auto sgd_shared = [&](float* w, float* vw, unsigned i, float g) { w[i] = sgd_step(w[i], vw + i, g); };
    // A BN feature's running statistics, by the block that owns its column: estimators
    // e0, e0+de, … by the calling thread. Their old values and factors take two round trips
    // through L2: `prefetch_running` loads the first REPLICATED_PREFETCH of them before the
    // work that hides those trips (a replicated layer's product), and
    // `running_update_prefetched` uses them. (Layer 0 loads them a thread per estimator.)
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

    // The replicated layers' parameters (and velocity) into this block's copies; of layer 1's
    // weights, only the velocity of the rows this block owns (each step copies the weights).
    for (unsigned l = 1; l < n_layers; ++l) {
        const int* f = layer_info + (size_t)l * LAYER_FIELDS;
        const unsigned in = in_of(l), out = out_of(l), pitch = replicated_quad_pitch(in), r = l - 1;
        for (unsigned i = t; i < in * out; i += T) {
            const unsigned m = i / in, k = i - m * in;
            if (l > 1) {
                sm[lay.w[r] + m * pitch + k] = params[f[L_W] + i];
                sm[lay.vw[r] + m * pitch + k] = velocity != nullptr ? velocity[f[L_W] + i] : 0.0f;
            } else if (m % G == me) {
                sm[lay.vw[r] + (m / G) * pitch + k] = velocity != nullptr ? velocity[f[L_W] + i] : 0.0f;
            }
        }
        for (unsigned i = t; i < 2 * out; i += T) {
            const int field = i < out ? (f[L_BIAS] >= 0 ? f[L_BIAS] : f[L_GAMMA]) : f[L_BETA];
            const unsigned m = i < out ? i : i - out;
            sm[lay.vec[r] + i] = field >= 0 ? params[field + m] : 0.0f;
            sm[lay.vvec[r] + i] = field >= 0 && velocity != nullptr ? velocity[field + m] : 0.0f;
        }
    }
    // This block's layer-0 columns (only it reads or updates them), and step 0's image indices.
    for (unsigned c = 0, j = me; j < width0; ++c, j += G) {
        const size_t row = (size_t)info0[L_W] + (size_t)j * in0;
        for (unsigned k = t; k < in0; k += T) {
            w0s[c * lay.w0_pitch + k] = params[row + k];
            vw0s[c * lay.w0_pitch + k] = velocity != nullptr ? velocity[row + k] : 0.0f;
        }
        if (t < 2) {
            const int field = vec0_field(t);
            vec0s[2 * c + t] = field >= 0 ? params[field + j] : 0.0f;
            vvec0s[2 * c + t] = field >= 0 && velocity != nullptr ? velocity[field + j] : 0.0f;
        }
    }
    for (unsigned r = t; r < batch; r += T) image_of[r] = image_at((unsigned long long)cursor0 * batch + r);
    __syncthreads();

    fused_trace_mark(FUSED_TRACE_BARRIERS);
    for (unsigned step = 0; step < steps; ++step) {
        const unsigned long long base = (unsigned long long)(cursor0 + step) * batch;
        const bool last = step + 1 == steps;
        float* a0g = (step & 1 ? dz : acts) + info0[L_ACT];
        const unsigned* image_now = image_of + (step & 1) * batch;

        // Layer 0's forward, this block's columns, from its copies of their weights: z, then
        // x̂ in place (x0s), and a into the step's a0.
        for (unsigned c = 0, j = me; j < width0; ++c, j += G) {
            // Estimator t's running statistics of the column, by thread t, loaded under the dot
            // products (4 registers a thread, where RunningPrefetch's 17 in one thread made
            // this part spill).
            const unsigned col0 = (unsigned)info0[L_COL] + j, bn_index0 = (unsigned)info0[L_BN];
            float keep_t = 0.0f, corr_t = 0.0f, mean_t = 0.0f, var_t = 0.0f;
            if (bn0 && t < n_estimators) {
                const EstimatorFactors f = estimator_factors(estimators, t, batches_before(t, bn_index0) + step, batch);
                keep_t = f.keep;
                corr_t = f.corr;
                mean_t = running_mean[(size_t)t * bn_total + col0];
                var_t = running_var[(size_t)t * bn_total + col0];
            }
            float* z = x0s + c * batch;
            with_chunks(image_now, [&](const auto& px) { pixel_column_dot(part, PART_FLOATS, px, batch, w0s + c * lay.w0_pitch, z); });
            if (bn0) {
                const ColumnMoments m = bn_column_forward(
                    part, [&](unsigned r) { return z[r]; },
                    [&](unsigned r, float xh, float a) {
                        z[r] = xh;
                        a0g[(size_t)r * width0 + j] = a;
                    },
                    batch, vec0s[2 * c], vec0s[2 * c + 1], epsilon, activation, inv_rows, reduce_width);
                if (t == 0) {
                    istd0s[c] = m.istd;
                    inv_std[col0] = m.istd;
                }
                if (t < n_estimators) {
                    running_mean[(size_t)t * bn_total + col0] = blend(keep_t, mean_t, 1.0f - keep_t, m.mu);
                    running_var[(size_t)t * bn_total + col0] = blend(keep_t, var_t, 1.0f - keep_t, __fmul_rn(m.sigma2, corr_t));
                }
                running_update(col0, bn_index0, step, m.mu, m.sigma2, t + T, T);
            } else {
                const float bias = vec0s[2 * c];
                for (unsigned r = t; r < batch; r += T) a0g[(size_t)r * width0 + j] = activate(activation, z[r] + bias);
            }
            __syncthreads();
        }
        grid_barrier(barrier, REPLICATED_TRACE_STRIDE);

        // Row t's label, and the next step's image index of row t (stored into the other half
        // of image_of, which the previous step's layer 0 read last, after the copy of a0):
        // loads issued before that copy, whose own round trip hides theirs.
        const unsigned image_t = t < batch ? image_now[t] : count;
        const unsigned label_t = image_t < count ? labels[image_t] : 255u;
        const bool more = step + 1 < steps;
        const unsigned next_image_t = more && t < batch ? image_at(base + batch + t) : count;
        // All of a0 (every block's columns, this step's parity) and layer 1's weights (every
        // block's rows, as the previous step left them) into shared memory.
        stage_float_rows(FloatRows{a0g, a0s, batch, width0, pitch0}, FloatRows{w1_buffer(step & 1), sm + lay.w[0], out_of(1), in_of(1), replicated_quad_pitch(in_of(1))});
        if (more)
            for (unsigned r = t; r < batch; r += T) image_of[((step + 1) & 1) * batch + r] = r == t ? next_image_t : image_at(base + batch + r);
        __syncthreads();
        replicated_trace_mark(REPLICATED_TRACE_STRIDE * step + 1);

        // Forward of the replicated layers.
        for (unsigned l = 1; l < n_layers; ++l) {
            const int* f = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in = in_of(l), out = out_of(l), r_ = l - 1;
            const float* w = sm + lay.w[r_];
            const float* vec = sm + lay.vec[r_];
            if (l == hidden) {
                const bool has_bias = f[L_BIAS] >= 0;
                shared_product(batch, out, in, input_of(l), input_pitch(l), 1, w, replicated_quad_pitch(in), 1,
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
            shared_product(batch, out, in, input_of(l), input_pitch(l), 1, w, replicated_quad_pitch(in), 1, [&](unsigned r, unsigned m, float v) {
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
                if (r != t) label = image_now[r] < count ? labels[image_now[r]] : 255u;
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
        replicated_trace_mark(REPLICATED_TRACE_STRIDE * step + 2);

        // Backward of the replicated layers, from the output layer down: dA of the layer below
        // into the scratch (layer 0: this block's columns only), then this layer's weight
        // gradient applied in place, then the layer below's dZ (in place of its a).
        for (unsigned l = hidden; l >= 1; --l) {
            const int* f = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in = in_of(l), out = out_of(l), r_ = l - 1, wp = replicated_quad_pitch(in);
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
            if (l > 1) {
                shared_product(out, in, batch, dzl, 1, dzp, input, 1, ip, [&](unsigned m, unsigned k, float g) {
                    if (last && writer) grads[f[L_W] + (size_t)m * in + k] = g;
                    sgd_shared(w, vw, m * wp + k, g);
                });
            } else {
                // Layer 1's weights: only the rows this block owns (m ≡ me mod G), each output
                // summed in order of the rows as tile_products would; the updated row goes to
                // the other parity's buffer, which no block reads before the next barrier (and
                // which every block last read before this one).
                float* next = w1_buffer((step + 1) & 1);
                for (unsigned q = t; q < lay.owned1 * in; q += T) {
                    const unsigned c1 = q / in, k = q - c1 * in, m = me + c1 * G;
                    if (m >= out) continue;
                    float g = 0.0f;
#pragma unroll 4
                    for (unsigned r = 0; r < batch; ++r) g += dzl[r * dzp + m] * input[r * ip + k];
                    if (last) grads[f[L_W] + (size_t)m * in + k] = g;
                    next[(size_t)m * in + k] = sgd_step(w[m * wp + k], vw + c1 * wp + k, g);
                }
            }
            __syncthreads();  // the weight gradient read the layer below's a
            // Phase timing (bench --trace): the replicated backward, dA0 of this block's columns
            // included, ends here.
            if (l == 1) replicated_trace_mark(REPLICATED_TRACE_STRIDE * step + 3);
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
        // gradient from the step's pixels, each element applied as it is summed, and γ and β
        // (or the bias).
        for (unsigned c = 0, j = me; j < width0; ++c, j += G) {
            float* d = scratch + c * batch;
            const float* xh0 = x0s + c * batch;
            float sb = 0.0f, sg = 0.0f;
            for (unsigned r = t; r < batch; r += T) {
                const float dy = activate_backward(activation, a0s[r * pitch0 + j], d[r]);
                d[r] = dy;
                if (bn0) {
                    sb += dy;
                    sg += dy * xh0[r];
                }
            }
            // The vector's gradients (dβ, dγ; or the bias's in d_beta), by every thread (BN) or
            // thread 0 (the bias).
            float d_beta = 0.0f, d_gamma = 0.0f;
            if (bn0) {
                const float g = vec0s[2 * c], istd = istd0s[c];
                const float sums[2] = {sb, sg};
                float totals[2];
                block_totals<2>(part, sums, totals, reduce_width);
                d_beta = totals[0];
                d_gamma = totals[1];
                for (unsigned r = t; r < batch; r += T) d[r] = g * istd / b * (b * d[r] - d_beta - xh0[r] * d_gamma);
            } else {
                __syncthreads();
                if (t == 0)
                    for (unsigned r = 0; r < batch; ++r) d_beta += d[r];
            }
            __syncthreads();
            const size_t row = (size_t)info0[L_W] + (size_t)j * in0;
            float* w = w0s + c * lay.w0_pitch;
            float* vw = vw0s + c * lay.w0_pitch;
            with_chunks(image_now, [&](const auto& px) {
                pixel_row_gradient(part, px, batch, d, [&](unsigned k, float g) {
                    if (last) grads[row + k] = g;
                    sgd_shared(w, vw, k, g);
                });
            });
            if (t == 0) {
                const float first = bn0 ? d_gamma : d_beta;
                if (last) {
                    grads[vec0_field(0) + j] = first;
                    if (bn0) grads[vec0_field(1) + j] = d_beta;
                }
                sgd_shared(vec0s, vvec0s, 2 * c, first);
                if (bn0) sgd_shared(vec0s, vvec0s, 2 * c + 1, d_beta);
            }
        }
        replicated_trace_mark(REPLICATED_TRACE_STRIDE * step + 4);
    }

    // This block's layer-0 columns back (no other block reads them), after thread 0's last
    // update of γ and β; and the velocity of its layer-1 rows.
    __syncthreads();
    if (velocity != nullptr) {
        const unsigned in1 = in_of(1), out1 = out_of(1);
        for (unsigned q = t; q < lay.owned1 * in1; q += T) {
            const unsigned c1 = q / in1, k = q - c1 * in1, m = me + c1 * G;
            if (m < out1) velocity[layer_info[LAYER_FIELDS + L_W] + (size_t)m * in1 + k] = sm[lay.vw[0] + c1 * replicated_quad_pitch(in1) + k];
        }
    }
    for (unsigned c = 0, j = me; j < width0; ++c, j += G) {
        const size_t row = (size_t)info0[L_W] + (size_t)j * in0;
        for (unsigned k = t; k < in0; k += T) {
            params[row + k] = w0s[c * lay.w0_pitch + k];
            if (velocity != nullptr) velocity[row + k] = vw0s[c * lay.w0_pitch + k];
        }
        if (t < 2 && vec0_field(t) >= 0) {
            params[vec0_field(t) + j] = vec0s[2 * c + t];
            if (velocity != nullptr) velocity[vec0_field(t) + j] = vvec0s[2 * c + t];
        }
    }

    // Every block's last reads of the counters (and of a0), and its last writes of layer 1's
    // weights, lie before this barrier.
    grid_barrier(barrier, REPLICATED_TRACE_STRIDE);
    if (writer) {
        for (unsigned l = 1; l < n_layers; ++l) {
            const int* f = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in = in_of(l), out = out_of(l), pitch = replicated_quad_pitch(in), r = l - 1;
            for (unsigned i = t; i < in * out; i += T) {
                const unsigned m = i / in, k = i - m * in;
                if (l == 1) {
                    // The last step's rows went to parity steps & 1: odd, xhat's.
                    if (steps & 1) params[f[L_W] + i] = xhat[i];
                    continue;
                }
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
