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
// Work split: column j of a hidden layer (a neuron: its z, BN, activation, gradients and
// weight row W[j,:]) belongs to block j mod G; the output layer's row k (its gradients and
// update) to block G−1−(k mod G), counted from the other end: with a grid wider than the
// hidden layers (the host adds the classes) those rows get blocks of their own instead of
// lengthening the first blocks' phases. The logits and the softmax are computed whole, for
// every row, by every block (batch_logits: B·classes dot products of the top layer's width,
// a few per thread, from copies in the block's `part` where they fit), into its shared
// memory, where the top hidden layer's backward and the output layer's gradients read
// dlogits: the same values in every block, and no grid barrier
// between the softmax and the backward (a row per block needed one, and a pass of
// column_dot per row). A grid barrier separates a layer's forward from the next layer's
// (which reads all of a; the logits read all of the top layer's a), each layer's backward
// from the one below (which reads all of dz), and, with one hidden layer, the step from the
// next (whose forward rewrites the a that the logits and the output layer's gradient read):
// three barriers a step for the seed network. Other blocks read a hidden W[j,:] only in the
// backward of the layer below (column reads), so its update is deferred to the next step's
// forward of its layer; the output layer's rows are also read by every block for the logits,
// so their update comes at the start of the next step, before the forward's barriers (or,
// for the last step, at the end of the launch). Layer 0 has no layer below: no other block
// reads its rows, which take their step in the backward, where their gradients are summed
// (the weights and velocities loaded with the rows' inputs, in the kernels with registers for
// them), and the next forward waits on no update. In the 512-thread and unstaged pair kernels a layer
// above the first computes its row's update in the backward too, and keeps the new row in
// shared memory until its next forward stores it (pending rows, see `pending_row`). Every
// read of a row follows its previous
// update, and precedes its next one, across a barrier: the result is the same as updating at
// the end of the step.
//
// Latency, not bandwidth, bounds a step (a few warps per SM, each waiting on L2 round
// trips), so the inner loops keep several independent loads in flight: a dot product takes
// four rows at a time, loads up to four inputs a lane of each (and their weights) before
// using any, and adds their per-lane partials in one pass after one barrier; a weight
// gradient issues 8 or 16 rows' loads before using any; layer 0 looks a pass's image indices
// up once, in parallel, into shared memory, and reads four pixels per 32-bit load. Values a
// later pass needs and nothing this step changes (the running statistics, a and x̂ in the
// backward) are loaded before the dot products, in the kernels whose registers allow it.
// Sums that one thread adds in row order (the loss, bias gradients) have their rows loaded
// by all threads first; with one pass of rows and a row a thread (the seed's batch), the
// thread that summed a row's z (or da) keeps it in a register for the BN passes, and gives
// its row of dz to the weight gradient's table from a register; and a grid barrier is one
// atomic arrival (release) and a spin (acquire loads) on the same count.
// `nvdisasm -c -g` of the sm_90 code shows which loads share a round trip (docs/perf.md,
// twenty-second session).
//
// Staging (optional, chosen by the host per layer; off unless asked for until measured): a
// block copies a layer's whole input (the batch's pixel rows for layer 0, the layer below's
// a otherwise) into shared memory with 16-byte loads, all issued together, once per step,
// and both the forward dot products and the weight gradient then read shared memory: the
// unstaged loops wait on an L2 round trip per few rows. The weight row a block computes with
// goes to shared memory as its deferred update writes it (layer 0's, updated in the
// backward, is copied there). Same sums in the same order:
// staged and unstaged results are bitwise equal.
//
// Layout: params, grads, velocity: the backend's flat buffers; `layer_info` [n_layers,
//   LAYER_FIELDS] ints: inputs, outputs, weight offset, bias offset (−1: none), γ and β
//   offsets (−1: no BN), activation offset (this layer's [B, outputs] block in acts, xhat and
//   dz), column offset (into inv_std and, for BN layers, the running statistics' [total]),
//   BN layer index (into batches' [E, bn_layers]), staged input's byte offset in the dynamic
//   shared memory (−1: read from global memory). The last layer is the output layer.
//   Dynamic shared memory (16-byte aligned regions, host-computed), every kernel: first the
//   batch's logits, overwritten in place by dlogits, [B, classes] floats (rounded up to 16
//   bytes: B·classes·4 bytes a block, which limit the fused kernels' batch); then, staged
//   (at the offsets the table gives): layer 0's input is [B] u32 image indices (rows outside
//   the order or the dataset: NaN inputs), padded to 16 bytes, then [B, features rounded up
//   to 16] pixel bytes; a layer l > 0's is [B, inputs] floats; `weight_row_stage` (−1: none)
//   holds the widest hidden layer's weight row.
//   acts: a of the hidden layers; xhat: z then x̂ (hidden BN layers); dz: dL/dz of the hidden
//   layers (the acts and dz blocks of the output layer go unused); inv_std [total]; row_loss
//   [B] f64, row_correct [B] u32 (the loss block's); estimators [E, 2] f64 as in
//   running_stats.cu; barrier [1] u32, zero before the launch.
//   Shared memory (static, ~9 KB for the staged kernels, 13 KB for the pair kernel, ~17 KB for
//   the kernel that takes 1024, 37 KB for the 512-thread kernel; fused_shared_floats): a pass
//   of FUSED_PASS_ROWS rows' dot-product partials [rows, lanes+1] (`part`, which also holds
//   the logits' operands, W_out then a chunk of the top layer's rows, or in the 512-thread
//   kernel the chunk then W_out), image indices and dz column; then, in the 512-thread and
//   unstaged pair kernels, the pending rows (FUSED_PENDING_FLOATS).
// Launch: cooperative (all blocks resident: the grid barrier spins), grid ≤ the device's
//   co-resident block count, block = power of two ≤ FUSED_MAX_THREADS (256, 512 or 1024 on
//   the GPU; the staged and pair kernels 256, FUSED_STAGED_THREADS), at
//   most 64 registers a thread (__launch_bounds__); dynamic shared memory: the softmax's
//   region, and the staged regions after it (opted into beyond 48 KB).
//   fused_train_steps_512_f32 (blocks of 512, the host's default, one an SM; 37 KB of static
//   shared memory), the staged and the pair kernels: at most 128 registers.

#include <stdint.h>
#include "common.cuh"
#include "fused_params.cuh"

// The unstaged single-network kernel takes blocks of up to 1024 threads (the host picks 256
// or 1024 here, and 512 with BNTRAIN_FUSED_512_KERNEL=0; 512, the default, otherwise runs
// fused_train_steps_512_f32 below, the same code under launch bounds of 512): more warps an SM keep more loads in flight, where 256 threads
// leave a seed block's SM with 8 warps waiting on L2. Measured on an H100 (docs/perf.md):
// the seed step 6.5 % faster in blocks of 512, 2 % in blocks of 1024; on an H200 38.39 µs
// in blocks of 512 (the 512 kernel), 40.30 in blocks of 1024, 43.47 in blocks of 256. One
// block of 1024 an SM caps registers at 64 a thread (65536 / 1024), as four blocks of 256
// did: uncapped, the compiler takes ~100 for the unrolled loads, and with the cap they
// still fit without spills (scripts/ptx-check.sh).
#define FUSED_MAX_THREADS 1024
#define FUSED_MIN_BLOCKS 1
// The staged and pair kernels: blocks of at most 256 threads (their launch bounds below).
#define FUSED_STAGED_THREADS 256
#define FUSED_STAGED_MIN_BLOCKS 2
// The pair kernels keep the per-network pointers in registers: 128 of them, two blocks an SM
// (the seed's pair grid, 220 blocks, needs two on some SMs of 132). In blocks of 512, two an
// SM (64 registers a thread, 4 / 8 bytes of spill), the seed's pair step took 49.89 µs
// against 48.95 in blocks of 256, and the study 2.87 against 2.81 s (H200, docs/perf.md): the
// pair kernels keep 256.
#define FUSED_PAIR_MIN_BLOCKS 2
// The single-network kernel for blocks of 512 threads (the host's default size).
#define FUSED_512_THREADS 512

#ifndef FUSED_SPIN_PAUSE
#define FUSED_SPIN_PAUSE() __nanosleep(32)
#endif
// How a block arrives at the grid barrier and waits on its count: thread 0 adds its arrival
// with release semantics (`atom.add.release`: the block's earlier writes, ordered before it
// by `__syncthreads`, are visible to whoever sees the arrival) and polls with acquire loads
// (what it then reads, and the block after the next `__syncthreads`, follows the others'
// writes): what cooperative groups' grid sync does on sm_70 and newer (its older pattern,
// two full fences around a relaxed add, is what this did first). The add's result says
// which barrier this is. An add without a result (`red`) would not wait for its round trip,
// but then every block would have to hold its barrier count (the 64-register kernels spill
// for it); reading it off the first poll is unsafe (a block stalled between its arrival and
// that poll could see the next barrier's arrivals, and wait for itself). The CPU emulation
// maps both to C++ atomics of the same orders, so that ThreadSanitizer can follow them.
#ifndef FUSED_ARRIVE_RELEASE
__device__ __forceinline__ unsigned fused_arrive_release(unsigned* p) {
    unsigned old;
    asm volatile("atom.add.release.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
    return old;
}
#define FUSED_ARRIVE_RELEASE(p) fused_arrive_release(p)
#endif
#ifndef FUSED_LOAD_ACQUIRE
__device__ __forceinline__ unsigned fused_load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
#define FUSED_LOAD_ACQUIRE(p) fused_load_acquire(p)
#endif
// Called by every thread of a block as it leaves a grid barrier: nothing on the GPU; the
// emulation delays one block there, so the others run ahead into the next phase and any
// read of another block's data that no barrier protects sees it overwritten.
#ifndef FUSED_AFTER_BARRIER
#define FUSED_AFTER_BARRIER()
#endif
// Phase timing (`bntrain bench --trace`): null unless the host points it at a buffer of
// [gridDim.x, FUSED_TRACE_SLOTS, 4] u64. Thread 0 of each block then records, for each grid
// barrier k < FUSED_TRACE_BARRIERS of the launch (the count's k: the same k in every block),
// its SM clock and the global timer on arriving and on leaving (slot k: clock in, clock out,
// timer in, timer out); slot FUSED_TRACE_BARRIERS holds the block's clock and timer at the
// launch's start (fields 0 and 2), slot FUSED_TRACE_BARRIERS + 1 at its end. The clocks time
// a block's own phases (not comparable across SMs); the timer orders the blocks. Off, it
// costs a load and a branch a barrier.
#define FUSED_TRACE_BARRIERS 64
#define FUSED_TRACE_SLOTS (FUSED_TRACE_BARRIERS + 2)
__device__ unsigned long long* fused_trace;
#ifndef FUSED_CLOCK
#define FUSED_CLOCK() ((unsigned long long)clock64())
#endif
#ifndef FUSED_GLOBALTIMER
__device__ __forceinline__ unsigned long long fused_globaltimer() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define FUSED_GLOBALTIMER() fused_globaltimer()
#endif
// A hook of the CPU emulation, which counts each block's records of each slot (nothing here).
#ifndef FUSED_TRACE_RECORDED
#define FUSED_TRACE_RECORDED(slot)
#endif
// Records one slot of the calling block (see fused_trace); out of line, so that the kernels
// spend no registers on it.
__device__ __noinline__ void fused_trace_slot(unsigned slot, unsigned long long clock_in, unsigned long long timer_in, bool both) {
    FUSED_TRACE_RECORDED(slot);
    unsigned long long* p = fused_trace + ((size_t)blockIdx.x * FUSED_TRACE_SLOTS + slot) * 4;
    p[0] = clock_in;
    p[2] = timer_in;
    if (both) {
        p[1] = FUSED_CLOCK();
        p[3] = FUSED_GLOBALTIMER();
    }
}
// The launch's start or end in the calling block's trace (thread 0; nothing when off).
__device__ __forceinline__ void fused_trace_mark(unsigned slot) {
    if (threadIdx.x == 0 && fused_trace != nullptr) fused_trace_slot(slot, FUSED_CLOCK(), FUSED_GLOBALTIMER(), false);
}

// Waits at a grid barrier longer than this many pauses (seconds, where a step takes
// microseconds) mean a block never arrived: the kernel traps, and the process gets an error
// instead of a hang (the trap leaves the CUDA context unusable: the process must restart).
#define FUSED_MAX_SPINS (1u << 26)

// All blocks wait until every block has arrived. bar[0] counts arrivals over the whole launch
// (zero at its start): the k-th barrier is passed once it reaches k·G, so the last block's
// arrival itself releases the others, which spin on the count, and nothing is reset (the
// count after a launch is G × its barriers). The arrival's release and the polls' acquire
// order every block's earlier global writes before the others' later reads, where the
// older cooperative-groups pattern (as this was first) put a full fence (`__threadfence`)
// on either side of a relaxed arrival.
// `trace_stride`: the trace slot of barrier k is k·stride (fused_replicated.cuh puts a mark of
// its own between its barriers' slots).
__device__ __forceinline__ void grid_barrier(unsigned* bar, unsigned trace_stride = 1) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const bool traced = fused_trace != nullptr;
        const unsigned long long clock_in = traced ? FUSED_CLOCK() : 0, timer_in = traced ? FUSED_GLOBALTIMER() : 0;
        const unsigned arrival = FUSED_ARRIVE_RELEASE(bar);
        const unsigned passed = (arrival / gridDim.x + 1) * gridDim.x;
        unsigned spins = 0;
        // No wrap-around: a launch's count stays below FUSED_MAX_STEPS × a few barriers × G.
        while (FUSED_LOAD_ACQUIRE(bar) < passed) {
            FUSED_SPIN_PAUSE();
            if (++spins == FUSED_MAX_SPINS) FUSED_TRAP();
        }
        if (traced && arrival / gridDim.x * trace_stride < FUSED_TRACE_BARRIERS) fused_trace_slot(arrival / gridDim.x * trace_stride, clock_in, timer_in, true);
    }
    __syncthreads();
    FUSED_AFTER_BARRIER();
}

// Totals of the N values `v` of threads 0..width−1 (width a power of two ≤ blockDim; the
// other threads' v must be 0), in a fixed order: up to eight threads each add a chunk of
// width/8 consecutive values in order, then every thread adds the chunk sums in order. Three
// barriers whatever the width (a tree takes log2(width) + 2), and N totals share them.
// `red` holds N·(width + 8) floats.
template <unsigned N>
__device__ __forceinline__ void block_totals(float* red, const float* v, float* total, unsigned width) {
    const unsigned chunks = width < 8 ? width : 8, len = width / chunks;
    float* sums = red + N * width;
    if (threadIdx.x < width)
#pragma unroll
        for (unsigned n = 0; n < N; ++n) red[n * width + threadIdx.x] = v[n];
    __syncthreads();
    if (threadIdx.x < chunks) {
#pragma unroll
        for (unsigned n = 0; n < N; ++n) {
            const float* chunk = red + n * width + threadIdx.x * len;
            float sum = chunk[0];
            for (unsigned i = 1; i < len; ++i) sum += chunk[i];
            sums[n * 8 + threadIdx.x] = sum;
        }
    }
    __syncthreads();
#pragma unroll
    for (unsigned n = 0; n < N; ++n) {
        float sum = sums[n * 8];
        for (unsigned c = 1; c < chunks; ++c) sum += sums[n * 8 + c];
        total[n] = sum;
    }
    __syncthreads();
}

__device__ __forceinline__ float block_total(float* red, float v, unsigned width) {
    float total;
    block_totals<1>(red, &v, &total, width);
    return total;
}

// The smallest power of two ≥ min(rows, blockDim): the threads that hold a row's partial
// sum when each thread sums rows t, t+blockDim, ….
__device__ __forceinline__ unsigned row_threads(unsigned rows) {
    unsigned width = 1;
    while (width < rows && width < blockDim.x) width <<= 1;
    return width;
}


// Layer inputs as the dot products and weight gradients read them: `V` consecutive inputs
// per load; `stage` prepares a pass of rows (every thread calls it; the caller then
// synchronizes), `row` finds row r (i within the pass) without touching global memory
// (a null row: invalid, for pixels), `load` brings inputs V·kv … V·kv+V−1 of a row as they
// lie and `unpack` widens them to floats, so that several loads can be in flight first.
//
// Layer 0: the batch's images, as bytes scaled by 1/255. `load` brings the raw bytes,
// `unpack` scales them (NaN for an invalid row): loads of several rows can be issued as
// packed words before any is widened to floats. With V = 4 (features a multiple of 4, rows
// 4-byte aligned) one 32-bit load brings four pixels. An index outside the order or the
// dataset gives NaN inputs, as gather.cu does. With PERMUTE, a byte becomes a float by
// pixel_scaled (common.cuh: a byte permute and an FMA, full rate, bit for bit the same
// value), else by an I2F (16 a cycle an SM). Only the pair kernel takes the permute. The
// 64-register kernels spilled 40 bytes with it; in the 512-thread kernel (128 registers, no
// spill) it made the first phase slower on an H200, 20.0 against 18.0 µs, and the seed step
// 39.58 against the I2F's 38.48 µs on the 64-register kernel in the same call (docs/perf.md,
// twenty-first session); the pair, with it and the logits' shared loads, took 47.29
// against 48.78 µs.
template <unsigned V_, bool PERMUTE_>
struct PixelBytes {
    static constexpr unsigned V = V_;
    typedef const uint8_t* Row;  // null: an invalid row
    typedef unsigned Raw;
    __device__ __forceinline__ Raw load(Row p, unsigned kv) const {
        if (p == nullptr) return 0u;
        return V == 4 ? FUSED_LOAD_U32(p + 4 * (size_t)kv) : (unsigned)p[kv];
    }
    __device__ __forceinline__ void unpack(bool valid, Raw q, float* x) const {
#pragma unroll
        for (unsigned e = 0; e < V; ++e)
            x[e] = !valid ? __int_as_float(0x7fc00000) : PERMUTE_ ? pixel_scaled(q, e) : (float)((q >> (8 * e)) & 255u) * (1.0f / 255.0f);
    }
};

// The pixels in global memory. An image's index costs a load of `order[pos]` that the pixel
// loads depend on: `stage` looks the pass's rows up in parallel, once, into shared memory,
// so inner loops do one round trip per load instead of two.
template <unsigned V_, bool PERMUTE_>
struct Pixels : PixelBytes<V_, PERMUTE_> {
    const uint8_t* images;
    const unsigned* order;
    unsigned order_len, count, features;
    unsigned long long base;     // b·B: the batch's first position in the order
    unsigned* index;             // shared [FUSED_PASS_ROWS]: the pass's image indices
    __device__ __forceinline__ Pixels(const uint8_t* images_, const unsigned* order_, unsigned order_len_, unsigned count_,
                                      unsigned features_, unsigned long long base_, unsigned* index_)
        : images(images_), order(order_), order_len(order_len_), count(count_), features(features_), base(base_), index(index_) {}
    __device__ __forceinline__ void stage(unsigned first, unsigned rows) const {
        for (unsigned i = threadIdx.x; i < rows; i += blockDim.x) {
            const unsigned long long pos = base + first + i;
            index[i] = pos < order_len ? order[pos] : count;
        }
    }
    __device__ __forceinline__ const uint8_t* row(unsigned, unsigned i) const {
        const unsigned image = index[i];
        return image < count ? images + (size_t)image * features : nullptr;
    }
    __device__ __forceinline__ bool valid(unsigned, unsigned i) const { return index[i] < count; }
};

// The pixels as stage_pixel_rows left them in shared memory: row r at r·pitch, its image
// index (≥ count: invalid) in `image`.
template <unsigned V_, bool PERMUTE_>
struct StagedPixels : PixelBytes<V_, PERMUTE_> {
    const uint8_t* pixels;
    const unsigned* image;
    unsigned count, pitch;
    __device__ __forceinline__ StagedPixels(const uint8_t* pixels_, const unsigned* image_, unsigned count_, unsigned pitch_)
        : pixels(pixels_), image(image_), count(count_), pitch(pitch_) {}
    __device__ __forceinline__ void stage(unsigned, unsigned) const {}
    __device__ __forceinline__ const uint8_t* row(unsigned r, unsigned) const {
        return image[r] < count ? pixels + (size_t)r * pitch : nullptr;
    }
    __device__ __forceinline__ bool valid(unsigned r, unsigned) const { return image[r] < count; }
};

// Row-major float rows: a layer's input activations, dz of the layer above, weight rows.
struct Floats {
    static constexpr unsigned V = 1;
    typedef const float* Row;
    const float* base;
    size_t stride;
    __device__ __forceinline__ void stage(unsigned, unsigned) const {}
    __device__ __forceinline__ Row row(unsigned r, unsigned) const { return base + (size_t)r * stride; }
    typedef float Raw;
    __device__ __forceinline__ Raw load(Row p, unsigned kv) const { return p[kv]; }
    __device__ __forceinline__ bool valid(unsigned, unsigned) const { return true; }
    __device__ __forceinline__ void unpack(bool, Raw q, float* x) const { x[0] = q; }
};

// Layer 0's staged input: bytes of the image-index table (16-byte multiple) and of a row.
__device__ __forceinline__ unsigned staged_table_bytes(unsigned batch) { return (batch * 4 + 15) / 16 * 16; }
__device__ __forceinline__ unsigned staged_pitch(unsigned features) { return (features + 15) / 16 * 16; }

// Rows are taken FUSED_PASS_ROWS at a time (the batch, for the seed shape): the shared
// tables (image indices, a dz column) and the partial sums of column_dot hold one pass.
#define FUSED_PASS_ROWS 64
#define FUSED_MAX_LANES 64
// The static shared memory of a kernel whose blocks have at most MAX_T threads: `part` holds
// column_dot's partials ([rows of a pass] × (lanes + 1), lanes ≤ MAX_T/8) or the weight
// gradient's group sums (one V-vector a thread, V ≤ 4); then a pass's image indices and its
// dz column. Sized per kernel, so that the 256-thread kernels keep their ~9 KB (two staged
// blocks an SM need the rest for staging). Every use of `part` but the logits' operands
// stays below fused_part_floats(MAX_T) floats: the 512-thread kernel, whose `part` is larger,
// keeps W_out's copy past that bound for the top hidden layer's backward (batch_logits), and
// a use that grew past it would overwrite the copy.
__host__ __device__ constexpr unsigned fused_part_floats(unsigned max_t) {
    const unsigned lanes = max_t / 8 < FUSED_MAX_LANES ? max_t / 8 : FUSED_MAX_LANES;
    const unsigned rows = FUSED_PASS_ROWS * (lanes + 1), groups = max_t * 4;
    return rows > groups ? rows : groups;
}
// The grid kernels' `part`: fused_part_floats, but 32 KB in the 512-thread kernel (one block
// an SM), whose `part` also holds the logits' operands for a whole batch of the seed's (W_out's
// 1000 floats and 60 rows of 100): one copy behind one pair of barriers, where 17 KB took two
// chunks of rows, a copy each (batch_logits). The one-barrier kernel sizes its own.
#define FUSED_512_PART_FLOATS 8192
__host__ __device__ constexpr unsigned fused_step_part_floats(unsigned max_t) {
    const unsigned need = fused_part_floats(max_t);
    return max_t == FUSED_512_THREADS && need < FUSED_512_PART_FLOATS ? FUSED_512_PART_FLOATS : need;
}
// Then, in the kernels that keep pending rows (see the kernel body), those rows.
#define FUSED_PENDING_FLOATS 1024
__host__ __device__ constexpr unsigned fused_shared_floats(unsigned max_t, unsigned pending_floats) {
    return fused_step_part_floats(max_t) + 2 * FUSED_PASS_ROWS + pending_floats;
}

// Σ_r col[r·stride] for r < rows, added in row order (as one thread's loop would) by thread
// 0, whose return value it is (the others get 0). The rows' loads are issued in parallel into
// `stage` (FUSED_PASS_ROWS floats): one round trip a pass, where one thread's loop waits on
// one every few rows, and the rest of the block waits for it at the next barrier. Every
// thread calls it.
__device__ __forceinline__ float ordered_column_total(float* stage, const float* col, size_t stride, unsigned rows) {
    float s = 0.0f;
    // `stage` may still be read by the caller's previous work (a weight gradient's last pass).
    __syncthreads();
    for (unsigned first = 0; first < rows; first += FUSED_PASS_ROWS) {
        const unsigned pass = rows - first < FUSED_PASS_ROWS ? rows - first : FUSED_PASS_ROWS;
        for (unsigned i = threadIdx.x; i < pass; i += blockDim.x) stage[i] = col[(size_t)(first + i) * stride];
        __syncthreads();
        if (threadIdx.x == 0)
            for (unsigned i = 0; i < pass; ++i) s += stage[i];
        __syncthreads();
    }
    return s;
}

// log2 of column_dot's lanes a row, K: a power of two up to the smallest ≥ nv (the row's
// inputs, V a load), at most 64 and at most blockDim/8 (at least 8 groups, so 256 threads
// keep K ≤ 32). Of those, the one whose pass of rows takes the fewest rounds of loads,
// counting a round as four rows a group and four inputs a lane (the 512-thread kernel's
// reach; the others, which load fewer inputs a lane at once, take more rounds alike), and the
// widest of those: the seed's pixels (196 words) keep 64 lanes in blocks of 512 (2 groups of
// rows × 1 round) and 32 in blocks of 256; its 100-wide layers take 32 lanes in blocks of
// 512 (16 groups: the 60 rows in one group of four, four inputs a lane), where 64 lanes took
// two groups of rows. The choice depends on nothing but nv, the pass and blockDim: every
// kernel sums alike. Shifts only (blockDim is a power of two): a division by a value known
// at run time costs a few dozen instructions, and this runs before every column_dot.
__device__ __forceinline__ unsigned dot_lane_shift(unsigned nv, unsigned pass) {
    unsigned block_shift = 0;
    while ((1u << block_shift) < blockDim.x) ++block_shift;
    unsigned best = 0, best_rounds = ~0u;
    for (unsigned shift = 0;; ++shift) {
        // ⌈⌈pass/groups⌉/4⌉·⌈⌈nv/lanes⌉/4⌉ = ⌈pass/(4·groups)⌉·⌈nv/(4·lanes)⌉, groups = 2^(block_shift − shift).
        const unsigned group_shift = block_shift - shift;
        const unsigned rounds = ((pass + (4u << group_shift) - 1) >> (group_shift + 2)) * ((nv + (4u << shift) - 1) >> (shift + 2));
        if (rounds <= best_rounds) {
            best = shift;
            best_rounds = rounds;
        }
        const unsigned lanes = 1u << shift;
        if (lanes >= nv || lanes >= FUSED_MAX_LANES || lanes * 8 >= blockDim.x) return best;
    }
}

// out[r·out_stride] = Σ_{k<n} in(r,k)·w[k·w_stride] (+ add[r], if given) for r < rows.
// Threads form groups of K lanes (dot_lane_shift); a group takes rows
// g, g+groups, … four at a time, its lanes reading V·K consecutive inputs of each row
// (coalesced) and one w each for all four: 4 independent loads per w instead of a chain,
// AHEAD inputs a lane at once (with the weights), the rest of a row after them.
// Each (row, lane) partial goes to `part` ([rows of the pass] × (K+1): the padding keeps the
// per-row sums free of bank conflicts); after one barrier a thread per row adds its K
// partials in a fixed order (four interleaved sums, then (s0+s1)+(s2+s3)).
// `mine`, if given, also gets row threadIdx.x's result, from the thread that computed it.
template <unsigned AHEAD, typename In>
__device__ __forceinline__ void column_dot(
    float* part, const In& in, unsigned rows, unsigned n, const float* w, unsigned w_stride,
    float* out, unsigned out_stride, const float* add, float* mine = nullptr, bool prestaged = false)
{
    constexpr unsigned V = In::V;
    const unsigned nv = n / V;
    const unsigned shift = dot_lane_shift(nv, rows < FUSED_PASS_ROWS ? rows : FUSED_PASS_ROWS);
    const unsigned lanes = 1u << shift, groups = blockDim.x >> shift, pitch = lanes + 1;
    const unsigned lane = threadIdx.x & (lanes - 1), group = threadIdx.x >> shift;
    for (unsigned first = 0; first < rows; first += FUSED_PASS_ROWS) {
        const unsigned pass = rows - first < FUSED_PASS_ROWS ? rows - first : FUSED_PASS_ROWS;
        if (!prestaged || first > 0) in.stage(first, pass);
        __syncthreads();
        for (unsigned i0 = group; i0 < pass; i0 += 4 * groups) {
            // Rows past the pass load row i0 again (harmless) and are not stored.
            const unsigned i1 = i0 + groups, i2 = i1 + groups, i3 = i2 + groups;
            const typename In::Row r0 = in.row(first + i0, i0);
            const typename In::Row r1 = i1 < pass ? in.row(first + i1, i1) : r0;
            const typename In::Row r2 = i2 < pass ? in.row(first + i2, i2) : r0;
            const typename In::Row r3 = i3 < pass ? in.row(first + i3, i3) : r0;
            const bool v0 = r0 != typename In::Row(), v1 = r1 != typename In::Row(), v2 = r2 != typename In::Row(), v3 = r3 != typename In::Row();
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (unsigned kv0 = lane; kv0 < nv; kv0 += AHEAD * lanes) {
                // AHEAD of the lane's inputs (and their weights) loaded before any is used, those
                // past the row predicated off: one round trip where a loop over them (the
                // compiler's unrolling checks the count between iterations, and each waits on its
                // own loads) took one per input.
                typename In::Raw q0[AHEAD], q1[AHEAD], q2[AHEAD], q3[AHEAD];
                float wk[AHEAD][V];
#pragma unroll
                for (unsigned c = 0; c < AHEAD; ++c) {
                    const unsigned kv = kv0 + c * lanes;
                    const bool on = kv < nv;
                    q0[c] = on ? in.load(r0, kv) : (typename In::Raw)0;
                    q1[c] = on ? in.load(r1, kv) : (typename In::Raw)0;
                    q2[c] = on ? in.load(r2, kv) : (typename In::Raw)0;
                    q3[c] = on ? in.load(r3, kv) : (typename In::Raw)0;
#pragma unroll
                    for (unsigned e = 0; e < V; ++e) wk[c][e] = on ? w[(size_t)(kv * V + e) * w_stride] : 0.0f;
                }
#pragma unroll
                for (unsigned c = 0; c < AHEAD; ++c) {
                    if (kv0 + c * lanes >= nv) break;
                    float x0[V], x1[V], x2[V], x3[V];
                    in.unpack(v0, q0[c], x0); in.unpack(v1, q1[c], x1); in.unpack(v2, q2[c], x2); in.unpack(v3, q3[c], x3);
#pragma unroll
                    for (unsigned e = 0; e < V; ++e) {
                        a0 += x0[e] * wk[c][e]; a1 += x1[e] * wk[c][e]; a2 += x2[e] * wk[c][e]; a3 += x3[e] * wk[c][e];
                    }
                }
            }
            part[i0 * pitch + lane] = a0;
            if (i1 < pass) part[i1 * pitch + lane] = a1;
            if (i2 < pass) part[i2 * pitch + lane] = a2;
            if (i3 < pass) part[i3 * pitch + lane] = a3;
        }
        __syncthreads();
        for (unsigned i = threadIdx.x; i < pass; i += blockDim.x) {
            const float* p = part + i * pitch;
            float s;
            if (lanes >= 4) {
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
                for (unsigned q = 0; q < lanes; q += 4) { s0 += p[q]; s1 += p[q + 1]; s2 += p[q + 2]; s3 += p[q + 3]; }
                s = (s0 + s1) + (s2 + s3);
            } else {
                s = p[0];
                for (unsigned q = 1; q < lanes; ++q) s += p[q];
            }
            if (add != nullptr) s += add[first + i];
            out[(size_t)(first + i) * out_stride] = s;
            if (mine != nullptr && first + i == threadIdx.x) *mine = s;
        }
        __syncthreads();
    }
}

// A weight row's SGD step taken where its gradient is summed (see the kernel body): w the
// row's weights, `to` where the new ones go (w, or a pending row in shared memory), v its
// velocities (null without momentum). A null w: none. `early`: the weights and velocities
// are loaded before the rows' loads (the kernels with registers for them), else after the
// sums.
struct RowUpdate {
    const float* w;
    float* to;
    float* v;
    float lr, momentum;
    bool early;
};

// dw[k] = Σ_r dz[r·dz_stride]·in(r,k) for k < n, and then, if `update` has a row, that row's
// SGD step from dw: early, its weights and velocities are loaded before the rows' loads, and
// the step waits on no round trip of its own. Thread t keeps CH vectors of V outputs
// (V·(kv), kv = t', t'+T', …) in registers. The pass's dz column is staged in `gs` and the
// rows' lookups in `in.stage` (unless the caller has them ready), and U rows' loads are
// issued before any is used. When n/V ≤ T/2 the block splits into S = T/T' groups of
// T' ≥ n/V threads, group s summing its contiguous share of each pass's rows; the groups'
// sums are then added in group order (through `part`, T·V floats): ⌈rows/(S·U)⌉ round trips
// a chunk of outputs. Every sum runs in a fixed order.
template <unsigned CH, unsigned U, typename In>
__device__ __forceinline__ void weight_row_gradient_by(
    float* part, float* gs, float* dw, const float* dz, unsigned dz_stride, const In& in, unsigned rows, unsigned n, bool ready,
    const RowUpdate& update)
{
    constexpr unsigned V = In::V;
    const unsigned nv = n / V, T = blockDim.x;
    unsigned tg_n = T;
    if (CH == 1) while (tg_n / 2 >= nv && tg_n > 1) tg_n >>= 1;
    const unsigned S = T / tg_n, s = threadIdx.x / tg_n, tg = threadIdx.x % tg_n;
    for (unsigned c0 = 0; c0 < nv; c0 += CH * tg_n) {
        float acc[CH][V];
#pragma unroll
        for (unsigned q = 0; q < CH; ++q)
#pragma unroll
            for (unsigned e = 0; e < V; ++e) acc[q][e] = 0.0f;
        // The outputs this thread writes (group 0's when the groups' sums are added) and their
        // weights and velocities, for the update.
        float w0[CH][V], v0[CH][V];
#pragma unroll
        for (unsigned q = 0; q < CH; ++q) {
            const unsigned kv = c0 + q * tg_n + tg;
            const bool mine = update.w != nullptr && update.early && s == 0 && kv < nv;
#pragma unroll
            for (unsigned e = 0; e < V; ++e) {
                w0[q][e] = mine ? update.w[(size_t)kv * V + e] : 0.0f;
                v0[q][e] = mine && update.v != nullptr ? update.v[(size_t)kv * V + e] : 0.0f;
            }
        }
        // dw[kv·V + e] = g, and the update's step.
        auto finish = [&](unsigned q, unsigned kv, unsigned e, float g) {
            const size_t k = (size_t)kv * V + e;
            dw[k] = g;
            if (update.w != nullptr)
                (void)sgd_step_at(update.w, update.to, update.v, k, g, w0[q][e], v0[q][e], update.early, update.lr, update.momentum);
        };
        for (unsigned first = 0; first < rows; first += FUSED_PASS_ROWS) {
            const unsigned pass = rows - first < FUSED_PASS_ROWS ? rows - first : FUSED_PASS_ROWS;
            __syncthreads();  // the previous pass's readers of the tables are done
            if (!ready) {
                in.stage(first, pass);
                for (unsigned i = threadIdx.x; i < pass; i += T) gs[i] = dz[(size_t)(first + i) * dz_stride];
            }
            __syncthreads();
            const unsigned lo = s * pass / S, hi = (s + 1) * pass / S;
            // U rows at a time, the last group's missing rows predicated off (no load, no
            // add): the rows' sums keep their order, and a share of rows that is no multiple
            // of U costs one more round trip, where a loop of single rows after the groups
            // (the compiler unrolls it by four behind a remainder of singles) cost up to six.
            for (unsigned i = lo; i < hi; i += U) {
                const unsigned live = hi - i;
                typename In::Raw raw[U][CH];
#pragma unroll
                for (unsigned u = 0; u < U; ++u) {
                    const typename In::Row row = u < live ? in.row(first + i + u, i + u) : typename In::Row();
#pragma unroll
                    for (unsigned q = 0; q < CH; ++q) {
                        const unsigned kv = c0 + q * tg_n + tg;
                        raw[u][q] = u < live && kv < nv ? in.load(row, kv) : (typename In::Raw)0;
                    }
                }
#pragma unroll
                for (unsigned u = 0; u < U; ++u) {
                    if (u >= live) break;
                    const float g = gs[i + u];
                    const bool valid = in.valid(first + i + u, i + u);
#pragma unroll
                    for (unsigned q = 0; q < CH; ++q) {
                        float x[V];
                        in.unpack(valid, raw[u][q], x);
#pragma unroll
                        for (unsigned e = 0; e < V; ++e) acc[q][e] += g * x[e];
                    }
                }
            }
        }
        if (S == 1) {
#pragma unroll
            for (unsigned q = 0; q < CH; ++q) {
                const unsigned kv = c0 + q * tg_n + tg;
                if (kv < nv)
#pragma unroll
                    for (unsigned e = 0; e < V; ++e) finish(q, kv, e, acc[q][e]);
            }
        } else {  // CH == 1, c0 == 0
            for (unsigned e = 0; e < V; ++e) part[(s * tg_n + tg) * V + e] = acc[0][e];
            __syncthreads();
            if (s == 0 && tg < nv) {
#pragma unroll
                for (unsigned e = 0; e < V; ++e) {
                    float v = part[tg * V + e];
                    for (unsigned o = 1; o < S; ++o) v += part[(o * tg_n + tg) * V + e];
                    finish(0, tg, e, v);
                }
            }
            __syncthreads();
        }
    }
}

// One load (V outputs) per thread and row in a block-sized chunk, U rows' loads in flight,
// for pixel words or when the block covers the row (every layer of the seed network); four
// outputs per thread, two rows at a time, for long float rows.
// `ready` (rows ≤ FUSED_PASS_ROWS only): the caller has put the dz column in `gs` and the
// input's tables are current (its stage already ran for this batch), so that the pass waits
// on no load before its rows'.
template <unsigned U, typename In>
__device__ __forceinline__ void weight_row_gradient(
    float* part, float* gs, float* dw, const float* dz, unsigned dz_stride, const In& in, unsigned rows, unsigned n, bool ready = false,
    const RowUpdate& update = RowUpdate{nullptr, nullptr, nullptr, 0.0f, 0.0f, false})
{
    if (In::V > 1 || n <= blockDim.x) weight_row_gradient_by<1, U>(part, gs, dw, dz, dz_stride, in, rows, n, ready, update);
    else weight_row_gradient_by<4, 2>(part, gs, dw, dz, dz_stride, in, rows, n, ready, update);
}

// Staging's copy units: 16, 4 or 1 bytes.
template <unsigned W> struct Chunk;
template <> struct Chunk<16> {
    typedef uint4 T;
    static __device__ __forceinline__ T load(const void* p) { return FUSED_LOAD_U128(p); }
    static __device__ __forceinline__ void store(void* p, T v) { FUSED_STORE_U128(p, v); }
};
template <> struct Chunk<4> {
    typedef unsigned T;
    static __device__ __forceinline__ T load(const void* p) { return FUSED_LOAD_U32((const uint8_t*)p); }
    static __device__ __forceinline__ void store(void* p, T v) { FUSED_STORE_U32((unsigned*)p, v); }
};
template <> struct Chunk<1> {
    typedef uint8_t T;
    static __device__ __forceinline__ T load(const void* p) { return *(const uint8_t*)p; }
    static __device__ __forceinline__ void store(void* p, T v) { *(uint8_t*)p = v; }
};

// Copies `rows` rows of `row_bytes` (a multiple of W) from src_row(r) to dst + r·pitch,
// W bytes a load, LOADS loads per thread issued before any store (STAGE_LOADS by default):
// the seed's 47 KB of pixels takes two round trips (256 threads × 8 × 16 bytes at a time),
// where 4 loads a thread took three (12 would take one, but spill the staged kernel's 128
// registers). A null source row is skipped (its bytes are never read). Every thread calls
// it; the caller synchronizes.
// Chunk i = t + k·blockDim of the rows is (row, chunk) = (i / per_row, i % per_row); a thread
// walks its (row, chunk) pairs by adding blockDim's quotient and remainder, two divisions a
// call. Dividing for every chunk, as this did first, took a few dozen integer instructions a
// chunk (a division by a value known only at run time): on an H100 the seed's two staging
// copies then held 16 % of the staged kernel's warp samples, more than staging saved in the
// dot products (13 points; docs/perf.md).
#define STAGE_LOADS 8
struct ChunkWalk {
    unsigned row, chunk;
    unsigned per_row, step_rows, step_chunks;
    __device__ __forceinline__ void advance() {
        row += step_rows;
        chunk += step_chunks;
        if (chunk >= per_row) {
            chunk -= per_row;
            ++row;
        }
    }
};
template <unsigned W, unsigned LOADS = STAGE_LOADS, typename SrcRow>
__device__ __forceinline__ void stage_rows(uint8_t* dst, unsigned pitch, unsigned rows, unsigned row_bytes, SrcRow src_row) {
    typedef typename Chunk<W>::T T;
    const unsigned per_row = row_bytes / W, stride = blockDim.x;
    if (per_row == 0) return;
    ChunkWalk at{threadIdx.x / per_row, threadIdx.x % per_row, per_row, stride / per_row, stride % per_row};
    while (at.row < rows) {
        T v[LOADS];
        bool loaded[LOADS];
        ChunkWalk load = at;
#pragma unroll
        for (unsigned u = 0; u < LOADS; ++u) {
            const uint8_t* src = load.row < rows ? src_row(load.row) : nullptr;
            loaded[u] = src != nullptr;
            if (loaded[u]) v[u] = Chunk<W>::load(src + (size_t)load.chunk * W);
            load.advance();
        }
#pragma unroll
        for (unsigned u = 0; u < LOADS; ++u) {
            if (loaded[u]) Chunk<W>::store(dst + (size_t)at.row * pitch + (size_t)at.chunk * W, v[u]);
            at.advance();
        }
    }
}

// The widest copy unit that divides `bytes` and the alignment of every address given.
__device__ __forceinline__ unsigned copy_unit(size_t bytes, size_t a, size_t b) {
    const size_t all = bytes | a | b;
    return all % 16 == 0 ? 16 : all % 4 == 0 ? 4 : 1;
}

// Layer 0's staged input (see the header): the batch's image indices, then its pixel rows.
__device__ __forceinline__ void stage_pixel_rows(
    uint8_t* region, const uint8_t* images, const unsigned* order, unsigned order_len, unsigned count, unsigned features,
    unsigned long long base, unsigned batch)
{
    unsigned* image = reinterpret_cast<unsigned*>(region);
    uint8_t* pixels = region + staged_table_bytes(batch);
    const unsigned pitch = staged_pitch(features);
    for (unsigned r = threadIdx.x; r < batch; r += blockDim.x) {
        const unsigned long long pos = base + r;
        image[r] = pos < order_len ? order[pos] : count;
    }
    __syncthreads();
    auto src_row = [&](unsigned r) -> const uint8_t* { return image[r] < count ? images + (size_t)image[r] * features : nullptr; };
    const unsigned unit = copy_unit(features, (size_t)images, 0);
    if (unit == 16) stage_rows<16>(pixels, pitch, batch, features, src_row);
    else if (unit == 4) stage_rows<4>(pixels, pitch, batch, features, src_row);
    else stage_rows<1>(pixels, pitch, batch, features, src_row);
}

// A layer l > 0's staged input: the layer below's a, `n` floats, copied as they lie.
__device__ __forceinline__ void stage_floats(uint8_t* region, const float* a, unsigned n) {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(a);
    auto whole = [&](unsigned) { return src; };
    if (copy_unit((size_t)n * 4, (size_t)a, 0) == 16) stage_rows<16>(region, 0, 1, n * 4, whole);
    else stage_rows<4>(region, 0, 1, n * 4, whole);
}

// out[(row0 + r)·classes + k] = Σ_i a[r·n + i]·w[k·n + i] (+ bias[k], if given) for rows
// r < rows and every class k, a (row, class) pair a thread (pairs p = t, t+T, …; r = p /
// classes). Four partial sums, input i in sum i mod 4, added as (s0+s1)+(s2+s3), then the
// bias: the same order whether the rows are read four floats a load (both operands 16-byte
// aligned, n a multiple of 4) or one. Four independent chains a thread, and no barrier.
__device__ __forceinline__ void logit_pairs(
    const float* a, const float* w, const float* bias, unsigned row0, unsigned rows, unsigned n, unsigned classes, float* out)
{
    const bool quads = n % 4 == 0 && ((size_t)a % 16) == 0 && ((size_t)w % 16) == 0;
    const unsigned pairs = rows * classes;
    for (unsigned p = threadIdx.x; p < pairs; p += blockDim.x) {
        const unsigned r = p / classes, k = p - r * classes;
        const float* x = a + (size_t)r * n;
        const float* y = w + (size_t)k * n;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        unsigned i = 0;
        if (quads) {
#pragma unroll 2
            for (; i < n; i += 4) {
                const float4 xv = FUSED_LOAD_F4(x + i), yv = FUSED_LOAD_F4(y + i);
                s0 += xv.x * yv.x; s1 += xv.y * yv.y; s2 += xv.z * yv.z; s3 += xv.w * yv.w;
            }
        } else {
#pragma unroll 2
            for (; i + 4 <= n; i += 4) {
                s0 += x[i] * y[i]; s1 += x[i + 1] * y[i + 1]; s2 += x[i + 2] * y[i + 2]; s3 += x[i + 3] * y[i + 3];
            }
            if (i < n) s0 += x[i] * y[i];
            if (i + 1 < n) s1 += x[i + 1] * y[i + 1];
            if (i + 2 < n) s2 += x[i + 2] * y[i + 2];
        }
        float s = (s0 + s1) + (s2 + s3);
        if (bias != nullptr) s += bias[k];
        out[(size_t)(row0 + r) * classes + k] = s;
    }
}

// dst[q] = src[q] for q < quads float4s (both 16-byte aligned), a load a thread a round:
// stage_rows with one load a thread, without its walk, which the 64-register kernels have no
// registers for (sm_80: 16 bytes of spill).
__device__ __forceinline__ void copy_quads(float* dst, const float* src, unsigned quads) {
    for (unsigned q = threadIdx.x; q < quads; q += blockDim.x)
        *reinterpret_cast<float4*>(dst + (size_t)q * 4) = FUSED_LOAD_F4(src + (size_t)q * 4);
}

// The whole batch's logits in one block (logit_pairs over rows < rows), its operands read
// from shared memory: the output layer's W (classes × n floats) is copied into `part`
// (part_floats floats) first, then the top layer's a (`a`, [rows, n]) a chunk of rows at a
// time into the rest, unless `a_shared` (the staged kernels staged it): W and the first
// chunk in one copy (stage_rows, their rows of n floats lying end to end in `part`, the
// chunk's first and W after them, where it stays: the return value is its offset in `part`,
// or ~0 where W was not copied so), LOADS
// 16-byte loads a thread issued before any store. LOADS = 1 (copy_quads, W then the chunk)
// in every kernel but the 512-thread one: two or four made the 64-register kernels spill
// (ptxas, sm_90: 76 and 144 bytes), and the staged and pair kernels' 128 are spent already;
// the 512-thread kernel takes 8 (the seed's W and 60 rows, 1750 loads, in one round trip
// where a load a round took four). Read from L2 instead, a pair's n/2 loads waited a
// round trip every two (unroll 2), and a thread of the seed's 256 took up to three pairs: on an
// H200 the copies took the step's third phase from 22.1 to 14.3 µs (docs/perf.md, twentieth
// session). The same values in the same order: the results are bitwise those of reading
// L2, which it still does where n is not a multiple of 4, an operand is not 16-byte
// aligned, W and one row do not fit `part`, or the rows would take more than
// LOGIT_MAX_CHUNKS chunks. Measured on an H200:
// the seed's 2 chunks (blocks of 256: 51.07 → 43.05 µs a step) and the pair kernel's 6
// (51.97 → 48.17) gained; batch 256 of a 256-wide layer, 43 chunks of 6 rows, lost (3000
// steps of `train` 1.52 → 1.60 s): two block barriers and a copy a chunk cost more there
// than the L2 reads they spare (perhaps because W's rows, read by every thread, stay in
// L1; not measured). Every thread calls it.
#ifndef LOGIT_MAX_CHUNKS
#define LOGIT_MAX_CHUNKS 8
#endif
template <unsigned LOADS>
__device__ __forceinline__ unsigned batch_logits(
    float* part, unsigned part_floats, const float* a, bool a_shared, const float* w, const float* bias, unsigned rows, unsigned n,
    unsigned classes, float* out)
{
    const unsigned w_floats = classes * n;
    const bool aligned = n % 4 == 0 && ((size_t)a % 16) == 0 && ((size_t)w % 16) == 0;
    const unsigned chunk = !aligned || w_floats >= part_floats ? 0 : a_shared ? rows : (part_floats - w_floats) / n;
    const bool staging = chunk > 0 && (rows + chunk - 1) / chunk <= LOGIT_MAX_CHUNKS;
    const unsigned step_rows = staging ? chunk : rows;
    // W's copy: first (LOADS = 1), or after the first chunk's rows.
    const unsigned w_at = LOADS == 1 || a_shared ? 0 : (rows < step_rows ? rows : step_rows) * n;
    float* rows_copy = LOADS == 1 || a_shared ? part + w_floats : part;
    const float* w_copy = part + w_at;
    for (unsigned r0 = 0; r0 < rows; r0 += step_rows) {
        const unsigned m = rows - r0 < step_rows ? rows - r0 : step_rows;
        if (staging) {
            __syncthreads();  // part's last readers (the last chunk's pairs, or before the call) are done
            if (LOADS == 1) {
                if (r0 == 0) copy_quads(part, w, w_floats / 4);
                if (!a_shared) copy_quads(rows_copy, a + (size_t)r0 * n, m * n / 4);
            } else {
                // Rows of n floats into `part` end to end: the chunk's, then W's `classes` (first
                // chunk; at w_at, as the first chunk has m rows). With `a_shared`, W alone.
                const unsigned w_rows = r0 == 0 ? classes : 0, a_rows = a_shared ? 0 : m;
                stage_rows<16, LOADS>(reinterpret_cast<uint8_t*>(a_shared ? part : rows_copy), n * 4, a_rows + w_rows, n * 4, [&](unsigned r) {
                    return reinterpret_cast<const uint8_t*>(r < a_rows ? a + (size_t)(r0 + r) * n : w + (size_t)(r - a_rows) * n);
                });
            }
            __syncthreads();
        }
        // Two calls, not one on chosen pointers: where both operands are known to lie in shared
        // memory the compiler reads them with shared loads (LDS), not generic ones (LD), which
        // wait longer (with one call, the logits' region held 6.8 % of the 512-thread kernel's
        // warp samples on an H200; after, phase 3 took about 0.8 µs less; docs/perf.md).
        if (staging) logit_pairs(a_shared ? a + (size_t)r0 * n : rows_copy, w_copy, bias, r0, m, n, classes, out);
        else logit_pairs(a + (size_t)r0 * n, w, bias, r0, m, n, classes, out);
    }
    return staging && LOADS > 1 && !a_shared ? w_at : ~0u;
}

// BN's forward of one column from its z (`z_at(r)` for rows r < batch): the batch's mean and
// (biased) variance, by block totals in a fixed order; then `store(r, x̂, a)` with a =
// act(γ·x̂ + β), by the thread that read z_at(r) last (so x̂ may overwrite z). Every thread
// calls it (the totals synchronize).
struct ColumnMoments {
    float mu, sigma2, istd;
};
template <typename ZAt, typename Store>
__device__ __forceinline__ ColumnMoments bn_column_forward(
    float* part, ZAt z_at, Store store, unsigned batch, float g, float b, float epsilon, int activation, float inv_rows,
    unsigned reduce_width)
{
    const unsigned t = threadIdx.x, T = blockDim.x;
    float s = 0.0f;
    for (unsigned r = t; r < batch; r += T) s += z_at(r);
    const float mu = block_total(part, s, reduce_width) * inv_rows;
    float q = 0.0f;
    for (unsigned r = t; r < batch; r += T) {
        const float d = z_at(r) - mu;
        q += d * d;
    }
    const float sigma2 = block_total(part, q, reduce_width) * inv_rows;
    const float istd = 1.0f / sqrtf(sigma2 + epsilon);
    for (unsigned r = t; r < batch; r += T) {
        const float xh = (z_at(r) - mu) * istd;
        store(r, xh, activate(activation, g * xh + b));
    }
    return ColumnMoments{mu, sigma2, istd};
}

// softmax_xent.cu's arithmetic on one row of logits, in place: dlogits = (softmax − 1_label)
// · scale; returns the row's loss, and in `right` whether its largest logit is the label's.
// A label that is no class (an invalid row) gives NaN dlogits and loss.
__device__ __forceinline__ double softmax_row(float* row, unsigned classes, unsigned label, float grad_scale, bool* right) {
    const float nan = __int_as_float(0x7fc00000);
    const bool valid = label < classes;
    unsigned best = 0;
    float m = row[0];
    for (unsigned k = 1; k < classes; ++k)
        if (row[k] > m) { m = row[k]; best = k; }
    float denom = 0.0f;
    for (unsigned k = 0; k < classes; ++k) denom += expf(row[k] - m);
    const double loss = valid ? (double)(logf(denom) + m - row[label]) : (double)nan;
    for (unsigned k = 0; k < classes; ++k) {
        const float p = expf(row[k] - m) / denom;
        row[k] = valid ? (p - (k == label ? 1.0f : 0.0f)) * grad_scale : nan;
    }
    *right = valid && best == label;
    return loss;
}

// One SGD step on a layer's row j (weights, bias, γ, β), from the gradients in `grads`.
// Four elements per thread are loaded before any is stored (the buffers are distinct, but
// the compiler cannot know it and would otherwise wait a round trip per element); the bias,
// γ and β go to three different threads. The updated weights also go to `row_copy` unless
// it is null.
__device__ __forceinline__ void sgd_row(
    const int* info, unsigned j, float* params, const float* grads, float* velocity, float lr, float momentum,
    float* row_copy = nullptr)
{
    const unsigned in = (unsigned)info[L_IN], T = blockDim.x;
    const size_t row = (size_t)info[L_W] + (size_t)j * in;
    for (unsigned k0 = threadIdx.x; k0 < in; k0 += 4 * T) {
        float p[4], g[4], v[4];
#pragma unroll
        for (unsigned u = 0; u < 4; ++u) {
            const unsigned k = k0 + u * T;
            const size_t i = row + (k < in ? k : k0);
            p[u] = params[i]; g[u] = grads[i];
            v[u] = velocity != nullptr ? velocity[i] : 0.0f;
        }
#pragma unroll
        for (unsigned u = 0; u < 4; ++u) {
            const unsigned k = k0 + u * T;
            if (k >= in) continue;
            const float updated = sgd_step_at(params, params, velocity, row + k, g[u], p[u], v[u], true, lr, momentum);
            if (row_copy != nullptr) row_copy[k] = updated;
        }
    }
    for (unsigned f = threadIdx.x; f < 3; f += T) {
        const int field = f == 0 ? L_BIAS : f == 1 ? L_GAMMA : L_BETA;
        if (info[field] < 0) continue;
        sgd_element(params, grads, velocity, (size_t)info[field] + j, lr, momentum);
    }
    __syncthreads();
}


// The kernel's body; STAGED compiles the staging in (the kernels below), PERMUTE_PIXELS the
// pixels' byte permute (PixelBytes). The network's blocks are `G` blocks of the grid, this one
// its `me`-th (the whole grid, or half of it for a pair); the grid barrier counts every block
// of the grid.
template <bool STAGED, unsigned MAX_T, bool PERMUTE_PIXELS = false>
__device__ __forceinline__ void fused_train_steps(FUSED_PARAMS, unsigned G, unsigned me)
{
    constexpr unsigned FUSED_PART_FLOATS = fused_step_part_floats(MAX_T);
    // How many of a lane's inputs column_dot loads at once: four in the 512-thread kernel
    // (up to 128 registers: the seed's first layer, 196 words a row over 64 lanes, in one round
    // trip a group of rows), two in the other unstaged kernels, whose budgets (64 registers;
    // the pair's 128 with two networks' pointers) would spill the rest, one in the staged
    // kernels (their inputs in shared memory, the staged pair's registers spilling already).
    constexpr unsigned DOT_AHEAD = MAX_T == FUSED_512_THREADS ? 4 : STAGED ? 1 : 2;
    // Whether values that a later pass needs and nothing this step changes are loaded ahead,
    // before the dot products that hide their round trips (the running statistics in the
    // forward; a and x̂ in the backward; row t's image index): in the staged and 512-thread
    // kernels (128 registers; the staged pair kernel, not a default, spills more with them);
    // the 64-register kernels would spill.
    constexpr bool PREFETCH = STAGED || MAX_T == FUSED_512_THREADS;
    // Whether the backward loads the parameters and velocities of the SGD steps it takes
    // (layer 0's row, and the pending rows below) before the sums that need them
    // (RowUpdate::early; γ and β, or the bias, by thread 0), and γ and 1/σ for the BN
    // backward before its dot products: in the 512-thread and unstaged pair kernels; with
    // them, the 64-register kernel spilled 92 bytes, the staged ones 44 and 180 (ptxas,
    // sm_90), and these load them after the sums.
    constexpr bool EARLY_UPDATE = !STAGED && MAX_T != FUSED_MAX_THREADS;
    // The same kernels keep pending rows: a layer l ≥ 1's updated row j, computed in its
    // backward where its gradient is summed, waits in shared memory (other blocks still read
    // the old row in the backward of the layer below) until the next forward of layer l,
    // which stores it and reads it from there: the deferred update waits on no load. For the
    // layers that are no wider than the grid (one row a block), whose rows fit
    // FUSED_PENDING_FLOATS after those of the layers below; the others' updates are deferred
    // whole (sgd_row).
    constexpr unsigned PENDING_FLOATS = EARLY_UPDATE ? FUSED_PENDING_FLOATS : 0;
    constexpr unsigned FUSED_SHARED_FLOATS = fused_shared_floats(MAX_T, PENDING_FLOATS);
    // How many rows' inputs the weight gradient loads at once: 16 in the 512-thread kernel (the
    // seed's first layer: 30 rows a thread, two round trips), 8 in the others.
    constexpr unsigned GRADIENT_AHEAD = MAX_T == FUSED_512_THREADS ? 16 : 8;
#ifdef EMULATED_BLOCK_SHARED
    // The CPU emulation (tests/kernel_emulation) runs all blocks at once: it gives each block
    // its own buffer, where `__shared__` would be one static array for all of them. Nor does
    // it enforce the launch bounds, which on the GPU keep blockDim ≤ MAX_T.
    if (blockDim.x > MAX_T) EMULATED_TRAP("a block larger than the kernel's launch bounds");
    float* shared = EMULATED_BLOCK_SHARED(FUSED_SHARED_FLOATS);
    uint8_t* staged = EMULATED_BLOCK_DYNAMIC();
#else
    __shared__ __align__(16) float shared[FUSED_SHARED_FLOATS];  // 16: `part` also holds doubles
    extern __shared__ __align__(16) uint8_t fused_dynamic_shared[];
    uint8_t* staged = fused_dynamic_shared;
#endif
    // The batch's logits, overwritten in place by dlogits ([B, classes]): the dynamic shared
    // memory's first bytes, in every kernel (the staged regions follow, at the host's offsets).
    float* soft = reinterpret_cast<float*>(staged);
    // part: column_dot's partials, the block totals, the weight gradient's group sums, the
    // logits' operands (W_out's copy kept, in the 512-thread kernel, until the top hidden
    // layer's backward), the step's row losses; index, gs: a pass's image indices and dz
    // column; pending: the pending rows.
    float* part = shared;
    unsigned* index = reinterpret_cast<unsigned*>(shared + FUSED_PART_FLOATS);
    float* gs = shared + FUSED_PART_FLOATS + FUSED_PASS_ROWS;
    float* pending = shared + FUSED_PART_FLOATS + 2 * FUSED_PASS_ROWS;

    const unsigned t = threadIdx.x, T = blockDim.x;
    const unsigned hidden = n_layers - 1;
    const int* out_info = layer_info + (size_t)hidden * LAYER_FIELDS;
    const unsigned classes = (unsigned)out_info[L_OUT];
    // The output layer's first row of this block (see the header).
    const unsigned out_first = G - 1 - me;
    // The block that writes and adds the step's row losses: the output layer's row 0's, one
    // of the last blocks, which own no hidden neuron when the grid is wide enough.
    const bool loss_block = me == G - 1;
    const float inv_rows = 1.0f / (float)batch;
    const unsigned reduce_width = row_threads(batch);
    // One pass of at most one row a thread (the seed's 60): each thread keeps its row's
    // values (z, da, dy, x̂, dz) in registers, from the dot product that sums them to the
    // passes that use them.
    const bool kept = batch <= FUSED_PASS_ROWS && batch <= T;
    // Four pixels per load where the images allow it (the seed: 784 features, an allocation).
    const bool pixel_words = features % 4 == 0 && ((size_t)images & 3) == 0;
    // Read before the first barrier; block 0 writes them back after the last.
    const unsigned cursor0 = cursor[0];
    auto batches_before = [&](unsigned e, unsigned bn) { return batches[(size_t)e * bn_layers + bn]; };
    // Layer l's pending row (this block's row of it), or null where its update is deferred
    // whole: layer 0 (updated in its backward), the output layer, a layer wider than the grid,
    // or one whose row does not fit after the layers' below it.
    auto pending_row = [&](unsigned l) -> float* {
        if (PENDING_FLOATS == 0 || l == 0 || l >= hidden) return nullptr;
        unsigned at = 0;
        for (unsigned m = 1; m < l; ++m) at += (unsigned)layer_info[(size_t)m * LAYER_FIELDS + L_IN];
        const int* info = layer_info + (size_t)l * LAYER_FIELDS;
        return (unsigned)info[L_OUT] <= G && at + (unsigned)info[L_IN] <= PENDING_FLOATS ? pending + at : nullptr;
    };
    // Row j of the layer that `info` describes, from its pending row into params.
    auto store_pending = [&](const int* info, unsigned j, const float* pend) {
        const unsigned in_w = (unsigned)info[L_IN];
        for (unsigned k = t; k < in_w; k += T) params[info[L_W] + (size_t)j * in_w + k] = pend[k];
    };

    // Layer l > 0's input rows ([B, inputs] floats): the layer below's a, from shared memory
    // where this layer is staged.
    auto float_input = [&](unsigned l) -> const float* {
        const int stage = STAGED ? layer_info[(size_t)l * LAYER_FIELDS + L_STAGE] : -1;
        return stage >= 0 ? reinterpret_cast<const float*>(staged + stage) : acts + layer_info[(size_t)(l - 1) * LAYER_FIELDS + L_ACT];
    };
    // Calls f with layer l's input: the batch's pixels (layer 0) or the layer below's a,
    // from shared memory where this layer is staged (the caller staged it this step).
    auto with_input = [&](unsigned l, unsigned long long base, auto f) {
        const int stage = STAGED ? layer_info[(size_t)l * LAYER_FIELDS + L_STAGE] : -1;
        if (l == 0 && stage >= 0) {
            const uint8_t* region = staged + stage;
            const unsigned* image = reinterpret_cast<const unsigned*>(region);
            const uint8_t* pixels = region + staged_table_bytes(batch);
            // Staged rows start at multiples of 16 bytes: four pixels a load when features allow.
            if (features % 4 == 0) f(StagedPixels<4, PERMUTE_PIXELS>{pixels, image, count, staged_pitch(features)});
            else f(StagedPixels<1, PERMUTE_PIXELS>{pixels, image, count, staged_pitch(features)});
        } else if (l == 0) {
            if (pixel_words) f(Pixels<4, PERMUTE_PIXELS>{images, order, order_len, count, features, base, index});
            else f(Pixels<1, PERMUTE_PIXELS>{images, order, order_len, count, features, base, index});
        } else {
            f(Floats{float_input(l), (size_t)layer_info[(size_t)l * LAYER_FIELDS + L_IN]});
        }
    };
    // Copies layer l's input into its staged region, if it has one (every thread calls it).
    auto stage_input = [&](unsigned l, unsigned long long base) {
        const int stage = STAGED ? layer_info[(size_t)l * LAYER_FIELDS + L_STAGE] : -1;
        if (stage < 0) return;
        if (l == 0) {
            stage_pixel_rows(staged + stage, images, order, order_len, count, features, base, batch);
        } else {
            const int* below = layer_info + (size_t)(l - 1) * LAYER_FIELDS;
            stage_floats(staged + stage, acts + below[L_ACT], batch * (unsigned)below[L_OUT]);
        }
        __syncthreads();
    };
    float* weight_row = STAGED && weight_row_stage >= 0 ? reinterpret_cast<float*>(staged + weight_row_stage) : nullptr;

    fused_trace_mark(FUSED_TRACE_BARRIERS);
    for (unsigned step = 0; step < steps; ++step) {
        const unsigned long long base = (unsigned long long)(cursor0 + step) * batch;
        // Row t's image index, for layer 0's table and its label in the softmax: read here,
        // before the whole forward, where registers allow, so that neither waits for it.
        const unsigned long long pos = base + t;
        const unsigned image_ahead = PREFETCH && t < batch && pos < order_len ? order[pos] : count;

        // The output layer's deferred update (see the header): its rows are read by every
        // block in the logits, after the barriers of the forward below.
        if (step > 0)
            for (unsigned k = out_first; k < classes; k += G) sgd_row(out_info, k, params, grads, velocity, lr, momentum);

        // Forward, hidden layers.
        for (unsigned l = 0; l < hidden; ++l) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned in_w = (unsigned)info[L_IN], width = (unsigned)info[L_OUT];
            float* a = acts + info[L_ACT];
            float* zx = xhat + info[L_ACT];
            const bool bn = info[L_GAMMA] >= 0;
            // The input is final (the barrier below the previous layer, or read-only pixels);
            // it stays staged until this layer's weight gradient in the backward.
            if (me < width) stage_input(l, base);
            for (unsigned j = me; j < width; j += G) {
                const float* w = params + info[L_W] + (size_t)j * in_w;
                // The first pass's lookups (layer 0's image indices): with a row a thread
                // (PREFETCH), row t's index was read at the step's start and goes to the table
                // below, after the loads above it were issued (a store waits for its value);
                // otherwise they are looked up here, a round trip of their own (shared, in the
                // staged kernels, with the weight row's copy). column_dot's first barrier orders
                // the table before its reads, and the previous readers of the table passed a
                // barrier since.
                const bool index_ahead = PREFETCH && l == 0 && kept;
                if (!index_ahead) with_input(l, base, [&](const auto& in) { in.stage(0, batch < FUSED_PASS_ROWS ? batch : FUSED_PASS_ROWS); });
                // Estimator t's inputs and running statistics, loaded before the deferred update
                // (of a layer updated whole here) and the dot products, and used after them (the
                // factors' arithmetic waits for them, so it comes after the update, which waits
                // for its own loads at the same time): where they were
                // loaded after the BN sums, a chain of two round trips (the factors and the
                // mean, then the variance, behind the mean's store) came before the grid barrier.
                const bool stats_ahead = PREFETCH && bn && t < n_estimators;
                double decay0 = 0.0, unbiased0 = 0.0;
                unsigned long long seen0 = 0;
                float mean0 = 0.0f, var0 = 0.0f;
                if (stats_ahead) {
                    const unsigned col = (unsigned)info[L_COL] + j, bn_index = (unsigned)info[L_BN];
                    decay0 = estimators[2 * t];
                    unbiased0 = estimators[2 * t + 1];
                    seen0 = batches_before(t, bn_index);
                    mean0 = running_mean[(size_t)t * bn_total + col];
                    var0 = running_var[(size_t)t * bn_total + col];
                }
                // The deferred update of the layers above the first (layer 0's rows were updated
                // by the last backward): the pending row stored, and read from shared memory,
                // or the whole update. The weight row in shared memory: written by the
                // deferred update, or copied; column_dot's first barrier orders these writes
                // before its reads.
                float* const pend = step > 0 ? pending_row(l) : nullptr;
                if (pend != nullptr) {
                    store_pending(info, j, pend);
                    w = pend;
                } else if (step > 0 && l > 0) sgd_row(info, j, params, grads, velocity, lr, momentum, weight_row);
                else if (weight_row != nullptr)
                    for (unsigned k = t; k < in_w; k += T) weight_row[k] = w[k];
                if (weight_row != nullptr) w = weight_row;
                if (index_ahead && t < batch) index[t] = image_ahead;
                float keep0 = 0.0f, corr0 = 0.0f;
                if (stats_ahead) {
                    const EstimatorFactors f = estimator_factors_of(decay0, unbiased0, seen0 + step, batch);
                    keep0 = f.keep;
                    corr0 = f.corr;
                }
                float z_kept = 0.0f;
                with_input(l, base, [&](const auto& in) { column_dot<DOT_AHEAD>(part, in, batch, in_w, w, 1, zx + j, width, nullptr, &z_kept, true); });
                // The column's z are in zx (this block's writes, visible after the barrier
                // inside column_dot). When the batch is one pass of rows and a row a thread
                // (the seed's 60), each thread's row is also in z_kept, from the thread that
                // summed it: the passes below then wait on no load of z (the loops below run
                // once, r = t).
                auto z_at = [&](size_t i) { return kept ? z_kept : zx[i]; };
                if (bn) {
                    // γ and β are loaded before the totals, whose barriers hide the round trip.
                    const float g = params[info[L_GAMMA] + j], b = params[info[L_BETA] + j];
                    const ColumnMoments moments = bn_column_forward(
                        part, [&](unsigned r) { return z_at((size_t)r * width + j); },
                        [&](unsigned r, float xh, float act) {
                            const size_t i = (size_t)r * width + j;
                            zx[i] = xh;
                            a[i] = act;
                        },
                        batch, g, b, epsilon, activation, inv_rows, reduce_width);
                    const float mu = moments.mu, sigma2 = moments.sigma2, istd = moments.istd;
                    // One thread per estimator (a chain of round trips of its own, unless
                    // prefetched above).
                    const unsigned col = (unsigned)info[L_COL] + j, bn_index = (unsigned)info[L_BN];
                    if (t == 0) inv_std[col] = istd;
                    if (PREFETCH && t < n_estimators) {
                        const float take = 1.0f - keep0;
                        running_mean[(size_t)t * bn_total + col] = blend(keep0, mean0, take, mu);
                        running_var[(size_t)t * bn_total + col] = blend(keep0, var0, take, __fmul_rn(sigma2, corr0));
                    }
                    for (unsigned e = PREFETCH ? t + T : t; e < n_estimators; e += T)
                        update_running_stats(estimator_factors(estimators, e, batches_before(e, bn_index) + step, batch),
                                             running_mean + (size_t)e * bn_total + col, running_var + (size_t)e * bn_total + col, mu, sigma2);
                } else {
                    const float b = params[info[L_BIAS] + j];
                    for (unsigned r = t; r < batch; r += T) {
                        const size_t i = (size_t)r * width + j;
                        a[i] = activate(activation, z_at(i) + b);
                    }
                }
                __syncthreads();
            }
            grid_barrier(barrier);
        }

        // W_out's copy in `part` (batch_logits), or null.
        const float* w_out_copy = nullptr;
        // Logits (bias included) and softmax cross-entropy of the whole batch, in every block:
        // the backward below (the top hidden layer's dA, the output layer's gradients) then
        // reads dlogits from this block's shared memory, with no grid barrier between: with
        // a row per block, as before, every block needed the others' rows after one. All
        // blocks compute the same values (same loads, same order); the loss block also
        // writes the rows' losses.
        {
            const unsigned in_w = (unsigned)out_info[L_IN];
            const float* bias = out_info[L_BIAS] >= 0 ? params + out_info[L_BIAS] : nullptr;
            // Row t's label takes two dependent loads: the image index read at the step's
            // start (PREFETCH) or here, before the dot products, and the label before them too
            // (PREFETCH) or after, so that they overlap them.
            const unsigned image = PREFETCH ? image_ahead : t < batch && pos < order_len ? order[pos] : count;
            const unsigned label_ahead = PREFETCH && image < count ? labels[image] : 255u;
            stage_input(hidden, base);
            const bool top_staged = STAGED && out_info[L_STAGE] >= 0;
            const unsigned w_out_at = batch_logits<MAX_T == FUSED_512_THREADS ? 8 : 1>(part, FUSED_PART_FLOATS, float_input(hidden), top_staged, params + out_info[L_W], bias, batch, in_w, classes, soft);
            // W_out's copy stays for the top hidden layer's backward where it lies past every
            // other use of `part` until then (fused_part_floats: the dot products' partials,
            // the weight gradients' group sums, the totals, the loss rows): the seed's, after
            // 60 rows of 100 in the 512-thread kernel's 8192 floats.
            w_out_copy = w_out_at != ~0u && w_out_at >= fused_part_floats(MAX_T) ? part + w_out_at : nullptr;
            __syncthreads();
            // softmax_xent.cu's arithmetic, a row a thread; dlogits overwrite the row's logits.
            for (unsigned r = t; r < batch; r += T) {
                const unsigned long long pos_r = base + r;
                const unsigned image_r = r == t ? image : pos_r < order_len ? order[pos_r] : count;
                const unsigned label = PREFETCH && r == t ? label_ahead : image_r < count ? labels[image_r] : 255u;
                bool right;
                const double loss = softmax_row(soft + (size_t)r * classes, classes, label, grad_scale, &right);
                if (loss_block) {
                    row_loss[r] = loss;
                    row_correct[r] = right ? 1u : 0u;
                }
            }
            __syncthreads();
        }

        // Backward: the step's loss sums; the output layer's gradients; the hidden layers from
        // the top down.
        // The loss block adds the rows' losses in row order, their loads issued in parallel
        // (as in ordered_column_total; `part` is free here); its own writes above, visible to
        // its threads after the barrier.
        if (loss_block) {
            double* losses = reinterpret_cast<double*>(part);
            unsigned* rights = reinterpret_cast<unsigned*>(losses + FUSED_PASS_ROWS);
            double s = 0.0;
            unsigned long long c = 0;
            for (unsigned first = 0; first < batch; first += FUSED_PASS_ROWS) {
                const unsigned pass = batch - first < FUSED_PASS_ROWS ? batch - first : FUSED_PASS_ROWS;
                for (unsigned i = t; i < pass; i += T) { losses[i] = row_loss[first + i]; rights[i] = row_correct[first + i]; }
                __syncthreads();
                if (t == 0)
                    for (unsigned i = 0; i < pass; ++i) { s += losses[i]; c += rights[i]; }
                __syncthreads();
            }
            if (t == 0) {
                loss_sum[0] += s;
                correct[0] += c;
            }
        }
        {
            const unsigned in_w = (unsigned)out_info[L_IN];
            const float* dlogits = soft;
            for (unsigned k = out_first; k < classes; k += G) {
                if (out_info[L_BIAS] >= 0) {
                    const float s = ordered_column_total(gs, dlogits + k, classes, batch);
                    if (t == 0) grads[out_info[L_BIAS] + k] = s;
                }
                with_input(hidden, base, [&](const auto& in) {
                    weight_row_gradient<GRADIENT_AHEAD>(part, gs, grads + out_info[L_W] + (size_t)k * in_w, dlogits + k, classes, in, batch, in_w);
                });
            }
        }
        for (unsigned l = hidden; l-- > 0;) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            const int* up = layer_info + (size_t)(l + 1) * LAYER_FIELDS;
            const unsigned in_w = (unsigned)info[L_IN], width = (unsigned)info[L_OUT], up_w = (unsigned)up[L_OUT];
            // The output layer's dz (dlogits) lies in this block's shared memory (above).
            const Floats up_dz{l + 1 == hidden ? soft : dz + up[L_ACT], (size_t)up_w};
            const float* a = acts + info[L_ACT];
            const float* xh = xhat + info[L_ACT];
            float* d = dz + info[L_ACT];
            const bool bn = info[L_GAMMA] >= 0;
            // Layer 0's row, and a layer's with a pending row, take their SGD step here, where
            // their gradients are summed (see the header and `pending_row`): the weights in the
            // weight gradient (layer 0's into params, no other block reading them; the others'
            // into the pending row), γ and β (or the bias), which only this block reads, by
            // thread 0.
            float* const pend = pending_row(l);
            const bool update_here = l == 0 || pend != nullptr;
            for (unsigned j = me; j < width; j += G) {
                // da[r] = Σ_m dz_up[r,m]·W_up[m,j] into d's column, then dy = act'(a)·da, with
                // the BN sums taken in the same pass (one round trip for a, da and x̂).
                // As in the forward, a thread's row stays in registers (da, then dy and x̂) when
                // the batch is one pass of rows and a row a thread.
                float da_kept = 0.0f, dy_kept = 0.0f, xh_kept = 0.0f;
                // The thread's row of a and x̂ (this step's forward, this block's column) ahead
                // of the dot products, where the pass below would wait a round trip for them.
                const bool ahead = PREFETCH && kept && t < batch;
                float a_ahead = 0.0f, xh_ahead = 0.0f;
                if (ahead) {
                    a_ahead = a[(size_t)t * width + j];
                    if (bn) xh_ahead = xh[(size_t)t * width + j];
                }
                // γ and 1/σ for the BN backward, loaded here in the kernels that load the
                // step's parameters early (after the dot products, their round trip comes
                // before the totals' barriers).
                float g_ahead = 0.0f, istd_ahead = 0.0f;
                if (EARLY_UPDATE && bn) {
                    g_ahead = params[info[L_GAMMA] + j];
                    istd_ahead = inv_std[info[L_COL] + j];
                }
                // Thread 0's parameters and velocities for the step here (early).
                const int field0 = bn ? info[L_GAMMA] : info[L_BIAS], field1 = bn ? info[L_BETA] : -1;
                float own[2] = {0.0f, 0.0f}, own_v[2] = {0.0f, 0.0f};
                if (EARLY_UPDATE && update_here && t == 0) {
                    const int fields[2] = {field0, field1};
#pragma unroll
                    for (unsigned f = 0; f < 2; ++f) {
                        if (fields[f] < 0) continue;
                        own[f] = params[fields[f] + j];
                        if (velocity != nullptr) own_v[f] = velocity[fields[f] + j];
                    }
                }
                // Thread 0's step of field f (field0 or field1) with gradient g.
                auto own_step = [&](unsigned f, int field, float g) {
                    (void)sgd_step_at(params, params, velocity, field + j, g, own[f], own_v[f], EARLY_UPDATE, lr, momentum);
                };
                // W_up's column: from the logits' copy of W_out in shared memory where it stayed.
                const float* up_column = (l + 1 == hidden && w_out_copy != nullptr ? w_out_copy : params + up[L_W]) + j;
                column_dot<DOT_AHEAD>(part, up_dz, batch, up_w, up_column, width, d + j, width, nullptr, &da_kept);
                float sb = 0.0f, sg = 0.0f;
                for (unsigned r = t; r < batch; r += T) {
                    const size_t i = (size_t)r * width + j;
                    const float dy = activate_backward(activation, ahead ? a_ahead : a[i], kept ? da_kept : d[i]);
                    d[i] = dy;
                    dy_kept = dy;
                    if (bn) {
                        const float x = ahead ? xh_ahead : xh[i];
                        sb += dy;
                        sg += dy * x;
                        xh_kept = x;
                    }
                }
                // With a row a thread, the column's final dz also goes to `gs` from the
                // thread's register, and the weight gradient below waits on no load of it.
                float dz_kept = dy_kept;
                if (bn) {
                    const float g = EARLY_UPDATE ? g_ahead : params[info[L_GAMMA] + j], istd = EARLY_UPDATE ? istd_ahead : inv_std[info[L_COL] + j];
                    const float sums[2] = {sb, sg};
                    float totals[2];
                    block_totals<2>(part, sums, totals, reduce_width);
                    const float d_beta = totals[0], d_gamma = totals[1];
                    const float b = (float)batch;
                    for (unsigned r = t; r < batch; r += T) {
                        const size_t i = (size_t)r * width + j;
                        const float dy = kept ? dy_kept : d[i], x = kept ? xh_kept : xh[i];
                        dz_kept = g * istd / b * (b * dy - d_beta - x * d_gamma);
                        d[i] = dz_kept;
                    }
                    if (t == 0) {
                        grads[info[L_GAMMA] + j] = d_gamma;
                        grads[info[L_BETA] + j] = d_beta;
                        // (Every thread read γ above, before block_totals' barriers.)
                        if (update_here) {
                            own_step(0, field0, d_gamma);
                            own_step(1, field1, d_beta);
                        }
                    }
                } else {
                    __syncthreads();  // every thread's dy is written
                    const float s = ordered_column_total(gs, d + j, width, batch);
                    if (t == 0) {
                        grads[info[L_BIAS] + j] = s;
                        if (update_here) own_step(0, field0, s);
                    }
                }
                // (ordered_column_total's last reads of gs are behind its final barrier.) The
                // input's tables are current with a row a thread (one pass): layer 0's image
                // indices are this step's, staged by its forward, and no input since staged any.
                if (kept && t < batch) gs[t] = dz_kept;
                __syncthreads();
                // dW[j,:] = Σ_r dz[r,j]·in[r,:]
                const size_t row = (size_t)info[L_W] + (size_t)j * in_w;
                const RowUpdate update{update_here ? params + row : nullptr, pend != nullptr ? pend : params + row,
                                       velocity != nullptr ? velocity + row : nullptr, lr, momentum, EARLY_UPDATE};
                with_input(l, base, [&](const auto& in) {
                    weight_row_gradient<GRADIENT_AHEAD>(part, gs, grads + row, d + j, width, in, batch, in_w, kept, update);
                });
                __syncthreads();
            }
            // The layer below reads all of this layer's dz. With one hidden layer the barrier
            // is still needed: the output layer's weight gradient above read all of layer
            // 0's a, which the next step's forward overwrites.
            if (l > 0 || hidden == 1) grid_barrier(barrier);
        }
    }

    // The last step's deferred updates (layer 0's took theirs in the backward; the pending
    // rows are stored), then the counters every block read at the start.
    grid_barrier(barrier);
    if (steps > 0) {
        for (unsigned l = hidden > 0 ? 1 : 0; l < n_layers; ++l) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            const float* pend = pending_row(l);
            for (unsigned j = l < hidden ? me : out_first; j < (unsigned)info[L_OUT]; j += G) {
                if (pend != nullptr) store_pending(info, j, pend);
                else sgd_row(info, j, params, grads, velocity, lr, momentum);
            }
        }
    }
    if (me == 0 && t == 0) {
        cursor[0] = cursor0 + steps;
        for (unsigned e = 0; e < n_estimators; ++e)
            for (unsigned bn = 0; bn < bn_layers; ++bn) batches[(size_t)e * bn_layers + bn] += steps;
    }
    fused_trace_mark(FUSED_TRACE_BARRIERS + 1);
}

// Every layer read from global memory (the host's stage offsets are ignored).
extern "C" __global__ void __launch_bounds__(FUSED_MAX_THREADS, FUSED_MIN_BLOCKS) fused_train_steps_f32(FUSED_PARAMS)
{
    fused_train_steps<false, FUSED_MAX_THREADS>(FUSED_ARGS, gridDim.x, blockIdx.x);
}

// The same kernel for blocks of at most 512 threads, one block an SM: up to 128 registers a
// thread (ptxas, sm_90: 128 used), where the kernel above, bounded by blocks of 1024, has 64
// and schedules its loads within them (on an H200 the seed step took 38.39 µs here against
// 39.22 there, docs/perf.md). The host runs blocks of 512 here unless told not to
// (BNTRAIN_FUSED_512_KERNEL=0). Same code, same sums in the same order: its results are
// bitwise those of the kernel above in blocks of 512.
extern "C" __global__ void __launch_bounds__(FUSED_512_THREADS, 1) fused_train_steps_512_f32(FUSED_PARAMS)
{
    fused_train_steps<false, FUSED_512_THREADS>(FUSED_ARGS, gridDim.x, blockIdx.x);
}

// The layers the host staged read from shared memory. The staged regions (~96 KB for the
// seed network) allow two blocks an SM at most, so registers are capped at 128, not 64:
// the staged loops want ~140 and spill under the unstaged kernel's cap.
extern "C" __global__ void __launch_bounds__(FUSED_STAGED_THREADS, FUSED_STAGED_MIN_BLOCKS) fused_train_steps_staged_f32(FUSED_PARAMS)
{
    fused_train_steps<true, FUSED_STAGED_THREADS>(FUSED_ARGS, gridDim.x, blockIdx.x);
}

// Two networks of the same layer count trained in one launch on the same batches (the BN
// and the plain network of the study's comparison): blocks [0, G) run network a, [G, 2G)
// network b, and every grid barrier counts all 2G (both networks reach the same barriers:
// their steps have the same phases), so the two networks' phases overlap, where two
// launches might run one after the other. Each network reads its own buffers; `b_barrier`
// and `b_steps` are ignored (a's serve both).
extern "C" __global__ void __launch_bounds__(FUSED_STAGED_THREADS, FUSED_PAIR_MIN_BLOCKS) fused_train_pair_f32(FUSED_PARAMS_P(a_), FUSED_PARAMS_P(b_))
{
    const unsigned G = gridDim.x / 2;
    const bool second = blockIdx.x >= G;
    fused_train_steps<false, FUSED_STAGED_THREADS, true>(FUSED_ARGS_SELECT(second, a_, b_), G, second ? blockIdx.x - G : blockIdx.x);
}

extern "C" __global__ void __launch_bounds__(FUSED_STAGED_THREADS, FUSED_PAIR_MIN_BLOCKS) fused_train_pair_staged_f32(FUSED_PARAMS_P(a_), FUSED_PARAMS_P(b_))
{
    const unsigned G = gridDim.x / 2;
    const bool second = blockIdx.x >= G;
    fused_train_steps<true, FUSED_STAGED_THREADS>(FUSED_ARGS_SELECT(second, a_, b_), G, second ? blockIdx.x - G : blockIdx.x);
}

// The one-barrier variant, which replicates the layers above the first in every block.
#include "fused_replicated.cuh"
