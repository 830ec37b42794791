// Softmax cross-entropy of the output layer, in one pass over the logits, fused with the
// output layer's bias add and bias gradient (cpu::ops::softmax_cross_entropy, argmax, and
// the bias parts of linear_forward / linear_backward).
//
// Per example r, with logits v_k = z[r,k] + bias_k (bias may be null) and label t:
//   m = max_k v_k at k* = argmax (the first index on ties), D = Σ_k e^{v_k − m}
//   ℓ_r = ln D + m − v_t                        (accumulated in f64)
//   dlogits[r,k] = (e^{v_k − m}/D − 1[k=t])·grad_scale   (grad_scale = 1, or 1/B for a mean)
//   correct += 1[k* = t];  predicted[r] = k*
// then  loss_sum[0] += Σ_r ℓ_r,  correct[0] += Σ_r 1[k*_r = t_r]
// and   dbias_k = Σ_r dlogits[r,k]  (in a fixed order: see the end of the kernel).
// A label ≥ classes (a gather out of range) makes that example's loss and gradient NaN.
//
// Layout: z, dlogits: [B, K] row-major; bias, dbias: [K]; labels, predicted: [B] u8;
//   loss_sum: [1] f64, correct: [1] u64 — device accumulators read only by the host's
//   take_step_stats / evaluate. dlogits, dbias (needs dlogits), predicted may be null.
//   Scratch for several blocks: partial_loss [G] f64, partial_correct [G] u64,
//   partial_dbias [G, K] f32, ticket [1] u32, zero between launches (the kernel leaves it so).
// Launch: G = min(⌈B / SOFTMAX_THREADS⌉, SOFTMAX_MAX_BLOCKS) blocks of SOFTMAX_THREADS
//   threads (the launcher computes it); block b takes rows [b·R, min(B, (b+1)·R)),
//   R = ⌈B / G⌉. Within a block, each thread sums its rows r = start+tid, start+tid+256, …,
//   then a fixed tree over threads. One block (B ≤ 256: the seed's steps) updates the
//   accumulators and dbias itself. Several write their partial sums to the scratch; the last
//   to take a ticket adds them in block order and resets the ticket. Either way every sum has
//   a fixed order, whatever the schedule, and no accumulator sees an atomic. (One block for
//   all rows took 31.7 µs for the wide network's 1024 on an H200, docs/perf.md, and would
//   walk the 10000 rows of a test-set evaluation ten times longer.)

#include <stdint.h>
#include "common.cuh"

#define SOFTMAX_THREADS 256
#define SOFTMAX_MAX_BLOCKS 128

extern "C" __global__ void softmax_xent_f32(
    const float* __restrict__ z, const float* __restrict__ bias, const uint8_t* __restrict__ labels,
    unsigned rows, unsigned classes, float grad_scale,
    float* __restrict__ dlogits, float* __restrict__ dbias, uint8_t* __restrict__ predicted,
    double* __restrict__ loss_sum, unsigned long long* __restrict__ correct,
    double* partial_loss, unsigned long long* partial_correct, float* partial_dbias, unsigned* ticket)
{
    __shared__ double loss_part[SOFTMAX_THREADS];
    __shared__ unsigned long long correct_part[SOFTMAX_THREADS];
    __shared__ float bias_part[SOFTMAX_THREADS];
    __shared__ bool last_block;
    const unsigned tid = threadIdx.x, blocks = gridDim.x, block = blockIdx.x;
    const float nan = __int_as_float(0x7fc00000);
    const unsigned per_block = (rows + blocks - 1) / blocks;
    const unsigned start = block * per_block;
    const unsigned end = start >= rows ? start : rows - start < per_block ? rows : start + per_block;

    double my_loss = 0.0;
    unsigned long long my_correct = 0;
    for (unsigned r = start + tid; r < end; r += SOFTMAX_THREADS) {
        const float* row = z + (size_t)r * classes;
#define LOGIT(k) (bias != nullptr ? row[k] + bias[k] : row[k])
        unsigned best = 0;
        float m = LOGIT(0);
        for (unsigned k = 1; k < classes; ++k) {
            const float v = LOGIT(k);
            if (v > m) { m = v; best = k; }
        }
        float denom = 0.0f;
        for (unsigned k = 0; k < classes; ++k) denom += expf(LOGIT(k) - m);
        const unsigned label = labels[r];
        const bool valid = label < classes;
        if (dlogits != nullptr) {
            float* grad = dlogits + (size_t)r * classes;
            for (unsigned k = 0; k < classes; ++k) {
                const float p = expf(LOGIT(k) - m) / denom;
                grad[k] = valid ? (p - (k == label ? 1.0f : 0.0f)) * grad_scale : nan;
            }
        }
        const float loss = valid ? logf(denom) + m - LOGIT(label) : nan;
#undef LOGIT
        my_loss += (double)loss;
        my_correct += (valid && best == label) ? 1ull : 0ull;
        if (predicted != nullptr) predicted[r] = (uint8_t)best;
    }

    loss_part[tid] = my_loss;
    correct_part[tid] = my_correct;
    __syncthreads();
    for (unsigned s = SOFTMAX_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) {
            loss_part[tid] += loss_part[tid + s];
            correct_part[tid] += correct_part[tid + s];
        }
        __syncthreads();
    }
    // The block's dlogits writes are visible to all its threads after the barriers above.
    // dbias: the threads form G = SOFTMAX_THREADS / classes groups; thread (g, k) sums rows
    // start+g, start+g+G, … of column k, then thread k adds the G partial sums in order. One
    // thread per column walking all rows would wait on ~B dependent-latency loads; this way
    // each walks B/G rows (3 for the seed's 60 rows and 10 classes).
    const bool with_dbias = dbias != nullptr && dlogits != nullptr;
    float block_dbias = 0.0f;  // thread k < classes: this block's share of dbias_k
    if (with_dbias) {
        const unsigned groups = SOFTMAX_THREADS / classes;  // ≥ 1: classes ≤ SOFTMAX_THREADS
        const unsigned k = tid % classes, g = tid / classes;
        float s = 0.0f;
        if (g < groups)
            for (unsigned r = start + g; r < end; r += groups) s += dlogits[(size_t)r * classes + k];
        bias_part[tid] = s;
        __syncthreads();
        if (tid < classes)
            for (unsigned h = 0; h < groups; ++h) block_dbias += bias_part[h * classes + tid];
    }
    if (blocks == 1) {
        if (tid == 0) {
            loss_sum[0] += loss_part[0];
            correct[0] += correct_part[0];
        }
        if (with_dbias && tid < classes) dbias[tid] = block_dbias;
        return;
    }
    // Several blocks: this one's partial sums, then the ticket. The fence orders every
    // thread's partial writes before the ticket its block takes after the barrier.
    if (tid == 0) {
        partial_loss[block] = loss_part[0];
        partial_correct[block] = correct_part[0];
    }
    if (with_dbias && tid < classes) partial_dbias[(size_t)block * classes + tid] = block_dbias;
    __threadfence();
    __syncthreads();
    if (tid == 0) last_block = atomicAdd(ticket, 1u) == blocks - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    if (tid == 0) {
        double loss = 0.0;
        unsigned long long right = 0;
        for (unsigned b = 0; b < blocks; ++b) {
            loss += LOAD_PAST_L1(partial_loss + b);
            right += LOAD_PAST_L1(partial_correct + b);
        }
        loss_sum[0] += loss;
        correct[0] += right;
        *ticket = 0u;  // every block has taken its ticket: ready for the next launch
    }
    if (with_dbias && tid < classes) {
        float total = 0.0f;
        for (unsigned b = 0; b < blocks; ++b) total += LOAD_PAST_L1(partial_dbias + (size_t)b * classes + tid);
        dbias[tid] = total;
    }
}
