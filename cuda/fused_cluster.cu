// bntrain: ptx-arch compute_90
// Whole training steps in one thread-block cluster per network (Hopper, sm_90): the same
// steps as fused_step.cu (same parameters, same math; sums in another fixed order, so equal
// to rounding, not bitwise), with the grid barriers through L2 replaced by the cluster's
// hardware barrier, and the activations and gradients that other blocks need pushed into
// their shared memory (distributed shared memory) instead of being re-read from L2.
//
// Math, per step with batch B (as fused_step.cu):
//   forward  z[r,j] = Σ_k in[r,k]·W[j,k];  BN: μ, σ², x̂ = (z−μ)/√(σ²+ε), a = act(γ·x̂+β);
//            plain: a = act(z + b_j);  logits v = W_out·a_top + b;  softmax cross-entropy
//   backward dv = (softmax − 1_t)·scale;  da = Σ_m dz_up[r,m]·W_up[m,j];  dy = act'(a)·da;
//            BN: dβ = Σ dy, dγ = Σ dy·x̂, dz = γ·istd/B·(B·dy − dβ − x̂·dγ);  plain: db = Σ dy
//            dW[j,k] = Σ_r dz[r,j]·in[r,k];  SGD (deferred, as fused_step.cu);  running stats.
//
// Work split: C blocks (the cluster) of T threads per network. Hidden neuron j and output
// class k belong to block j mod C (k mod C): its weight row, BN, running statistics and
// gradients; softmax row r to block r mod C. A block's neurons of a layer are computed
// together: the dot products of the forward by all its warps (two halves of the rows, lanes
// by row, the inputs split in T/64 ranges summed in range order, every thread holding all of
// the block's neurons so that a pixel is unpacked once), BN and activation a warp per
// neuron (shuffle reductions in a fixed tree), and the weight gradient a thread per four
// inputs (all neurons again; rows split in groups where that leaves threads idle). Every block keeps full copies of each hidden layer's a, of the
// hidden layers' dz above the first, and of dlogits, in its shared memory: the owner of a
// column writes it into every block of the cluster, and a cluster barrier publishes it.
// Parameters stay in global memory as the host laid them out; a block reads other blocks'
// rows (the logits' W_out, the backward's W_up columns) through L2 only (ld.global.cg).
//
// Barriers per step: after each hidden layer's forward, after the softmax, after each
// backward layer but the lowest (with one hidden layer, after it too): fused_step.cu's, and
// one after the softmax, which fused_step.cu spares by computing it whole in every block.
//
// Shared memory (dynamic, laid out by cluster_layout, sized by the host through
// fused_cluster_layout_bytes): the batch's pixels [B, pitch] bytes and row validity; the
// full a copies [B, odd pitch] per hidden layer; the full dz copies of hidden layers ≥ 1 and
// dlogits; this block's weight rows of the current layer (at a pitch of a multiple of 4);
// all of W_out (odd pitch) and its bias; this block's x̂ per BN layer and 1/σ per neuron; z
// and dz of its neurons; the forward's partial sums; the weight gradient's group sums; a W_up
// column per warp; the rows' losses (block 0's copy is the one used).
// Launch: grid = C blocks per network (one cluster each, __cluster_dims__), T = 256 threads
// (also 64 and 128 in the CPU emulation), the layout's bytes of dynamic shared memory.
// Limits (fused_cluster_layout_bytes returns 0 beyond them): B ≤ 64, classes ≤ 32, at most
// 16 neurons of a layer per block, at most CLUSTER_MAX_HIDDEN hidden layers.

#include <stdint.h>
#include "common.cuh"
#include "fused_params.cuh"

#define CLUSTER_THREADS 256
#define CLUSTER_MAX_ROWS 64
#define CLUSTER_MAX_CLASSES 32
#define CLUSTER_MAX_PER_BLOCK 16
#define CLUSTER_MAX_HIDDEN 4
#define FULL_MASK 0xffffffffu

// Pixel loads in flight per thread when staging a batch (16 bytes each).
#define STAGE_QUADS 12

#ifndef FUSED_CLUSTER_SYNC
#include <cooperative_groups.h>
#define FUSED_CLUSTER_SYNC() cooperative_groups::this_cluster().sync()
#define FUSED_CLUSTER_RANK() cooperative_groups::this_cluster().block_rank()
#define FUSED_CLUSTER_MAP(p, rank) cooperative_groups::this_cluster().map_shared_rank((p), (rank))
#define FUSED_SHUFFLE(v, lane) __shfl_sync(FULL_MASK, (v), (lane))
#define FUSED_SHUFFLE_DOWN(v, by) __shfl_down_sync(FULL_MASK, (v), (by))
#define FUSED_SYNC_WARP() __syncwarp()
#define FUSED_LOAD_L2(p) __ldcg(p)
#endif

// An odd number of floats ≥ n: rows of a [rows, pitch] table read a row per lane then fall
// in different banks.
__device__ __forceinline__ unsigned odd_pitch(unsigned n) { return n | 1u; }
// Floats per row of the block's weight rows in shared memory: a multiple of four, so that
// the forward reads four weights a load.
__device__ __forceinline__ unsigned row_pitch(unsigned n) { return (n + 3) / 4 * 4; }
// Row groups of a weight gradient over K inputs (see weight_gradient): as many as the
// threads allow beside a thread per four inputs, within WGRAD_BYTES of partial sums.
#define WGRAD_BYTES 16384
__device__ __forceinline__ unsigned wgrad_groups(unsigned K, unsigned per_block, unsigned T) {
    const unsigned by_threads = T / ((K + 3) / 4), by_memory = WGRAD_BYTES / (per_block * row_pitch(K) * 4);
    const unsigned groups = by_threads < by_memory ? by_threads : by_memory;
    return groups < 1 ? 1 : groups;
}
// A block's share of n columns (j ≡ rank mod C).
__device__ __forceinline__ unsigned owned(unsigned n, unsigned rank, unsigned C) { return n > rank ? (n - rank + C - 1) / C : 0; }

struct ClusterLayout {
    unsigned hidden, widths[CLUSTER_MAX_HIDDEN + 2];  // widths[0] = features, widths[hidden + 1] = classes
    unsigned per_block;      // the most neurons (or classes) of a layer a block owns
    unsigned pixel_pitch;    // bytes per staged pixel row: a multiple of 4, an odd count of words
    unsigned act_pitch[CLUSTER_MAX_HIDDEN + 1];  // floats per row of the full copies (index hidden: dlogits)
    // Byte offsets into the dynamic shared memory.
    unsigned pixels, valid, act[CLUSTER_MAX_HIDDEN], dz[CLUSTER_MAX_HIDDEN + 1], wrows, wout, bout, xhat[CLUSTER_MAX_HIDDEN];
    unsigned istd, z, dzq, part, wpart, wcol, loss, right, bytes;
};

// The layout for a network (layer table `info`), or bytes = 0 where the kernel does not fit it.
__device__ __forceinline__ ClusterLayout cluster_layout(const int* info, unsigned n_layers, unsigned batch, unsigned features, unsigned C, unsigned T) {
    ClusterLayout L = {};
    const unsigned hidden = n_layers - 1;
    if (n_layers < 2 || hidden > CLUSTER_MAX_HIDDEN || batch < 1 || batch > CLUSTER_MAX_ROWS || T < 64 || T % 64 != 0) return L;
    L.hidden = hidden;
    L.widths[0] = features;
    unsigned widest = 0, widest_input = 0;
    for (unsigned l = 0; l < n_layers; ++l) {
        L.widths[l + 1] = (unsigned)info[l * LAYER_FIELDS + L_OUT];
        if ((unsigned)info[l * LAYER_FIELDS + L_IN] != L.widths[l]) return L;
        if (L.widths[l + 1] > widest) widest = L.widths[l + 1];
        if (l < hidden && L.widths[l] > widest_input) widest_input = L.widths[l];
    }
    const unsigned classes = L.widths[hidden + 1];
    if (classes > CLUSTER_MAX_CLASSES) return L;
    L.per_block = (widest + C - 1) / C;
    if (L.per_block > CLUSTER_MAX_PER_BLOCK) return L;
    unsigned at = 0;
    auto take = [&](unsigned bytes) { const unsigned o = at; at += (bytes + 15) / 16 * 16; return o; };
    L.pixel_pitch = (features + 3) / 4 * 4;
    if ((L.pixel_pitch / 4) % 2 == 0) L.pixel_pitch += 4;
    L.pixels = take(batch * L.pixel_pitch);
    L.valid = take(batch * 4);
    for (unsigned l = 0; l <= hidden; ++l) L.act_pitch[l] = odd_pitch(L.widths[l + 1]);
    for (unsigned l = 0; l < hidden; ++l) L.act[l] = take(batch * L.act_pitch[l] * 4);
    for (unsigned l = 1; l <= hidden; ++l) L.dz[l] = take(batch * L.act_pitch[l] * 4);
    L.wrows = take(L.per_block * row_pitch(widest_input) * 4);
    L.wout = take(classes * odd_pitch(L.widths[hidden]) * 4);
    L.bout = take(classes * 4);
    for (unsigned l = 0; l < hidden; ++l) L.xhat[l] = take(batch * L.per_block * 4);
    L.istd = take(hidden * L.per_block * 4);
    L.z = take(CLUSTER_MAX_ROWS * L.per_block * 4);
    L.dzq = take(CLUSTER_MAX_ROWS * L.per_block * 4);
    L.part = take((T / 64) * CLUSTER_MAX_ROWS * L.per_block * 4);
    unsigned wpart = 0;
    for (unsigned l = 0; l < hidden; ++l) {
        const unsigned groups = wgrad_groups(L.widths[l], L.per_block, T);
        const unsigned bytes = groups > 1 ? groups * L.per_block * row_pitch(L.widths[l]) * 4 : 0;
        if (bytes > wpart) wpart = bytes;
    }
    L.wpart = take(wpart);
    unsigned widest_above = 0;
    for (unsigned l = 1; l <= hidden; ++l) if (L.widths[l + 1] > widest_above) widest_above = L.widths[l + 1];
    L.wcol = take((T / 32) * widest_above * 4);
    L.loss = take(CLUSTER_MAX_ROWS * 8);
    L.right = take(CLUSTER_MAX_ROWS * 4);
    L.bytes = at;
    return L;
}

// The dynamic shared memory a launch needs for this network and cluster (0: the cluster
// kernel does not fit it); one thread writes out[0].
extern "C" __global__ void fused_cluster_layout_bytes(const int* layer_info, unsigned n_layers, unsigned batch, unsigned features, unsigned cluster, unsigned threads, unsigned* out) {
    if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = cluster_layout(layer_info, n_layers, batch, features, cluster, threads).bytes;
}

// Σ of v over the warp's lanes in a fixed tree, the same total on every lane.
__device__ __forceinline__ float warp_total(float v) {
    for (unsigned by = 16; by > 0; by >>= 1) v += FUSED_SHUFFLE_DOWN(v, by);
    return FUSED_SHUFFLE(v, 0);
}

// One SGD step on this block's rows of a layer (rows j = rank + C·q, q < nq, of `info`),
// weights, bias, γ and β, from the gradients; the new weights also to `copy` ([nq, K]) if
// given. SGD_LOADS elements a thread are loaded before any is stored: the seed's 7 rows of
// 784 take two round trips to L2 instead of six. Every thread calls it.
#define SGD_LOADS 12
__device__ __forceinline__ void sgd_owned_rows(
    const int* info, unsigned rank, unsigned C, unsigned nq, float* params, const float* grads, float* velocity,
    float lr, float momentum, float* copy)
{
    const unsigned K = (unsigned)info[L_IN], n = nq * K, T = blockDim.x;
    for (unsigned i0 = threadIdx.x; i0 < n; i0 += SGD_LOADS * T) {
        float p[SGD_LOADS], g[SGD_LOADS], v[SGD_LOADS];
        size_t at[SGD_LOADS];
#pragma unroll
        for (unsigned u = 0; u < SGD_LOADS; ++u) {
            const unsigned i = i0 + u * T < n ? i0 + u * T : i0;
            at[u] = (size_t)info[L_W] + (size_t)(rank + C * (i / K)) * K + i % K;
            p[u] = params[at[u]]; g[u] = grads[at[u]];
            v[u] = velocity != nullptr ? velocity[at[u]] : 0.0f;
        }
#pragma unroll
        for (unsigned u = 0; u < SGD_LOADS; ++u) {
            const unsigned i = i0 + u * T;
            if (i >= n) continue;
            const float updated = sgd_step_at(params, params, velocity, at[u], g[u], p[u], v[u], true, lr, momentum);
            if (copy != nullptr) copy[(i / K) * row_pitch(K) + i % K] = updated;
        }
    }
    for (unsigned f = threadIdx.x; f < 3 * nq; f += T) {
        const int field = f % 3 == 0 ? L_BIAS : f % 3 == 1 ? L_GAMMA : L_BETA;
        if (info[field] < 0) continue;
        sgd_element(params, grads, velocity, (size_t)info[field] + rank + C * (f / 3), lr, momentum);
    }
}

// z[r·nq + q] = Σ_k in(r, k)·w[q·K + k] for r < B, q < nq. Warps: row half (lanes by row)
// × input range; each thread keeps all nq sums of its row and range; the ranges' sums are
// added in range order. PIXELS: in = the staged pixel rows (bytes/255, NaN for an invalid
// row); else in = a full activation copy with row pitch `pitch`. Every thread calls it; it
// synchronizes the block before returning.
template <bool PIXELS>
__device__ __forceinline__ void forward_dot(
    const ClusterLayout& L, uint8_t* smem, const void* in, unsigned pitch, unsigned K, unsigned nq, unsigned B, float* z)
{
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, S = blockDim.x / 64;
    const unsigned half = warp % 2, split = warp / 2, r = 32 * half + lane;
    const unsigned span = ((K + S - 1) / S + 3) / 4 * 4;
    const unsigned k0 = split * span < K ? split * span : K, k1 = k0 + span < K ? k0 + span : K;
    // Row q of the block's weights at q·row_pitch(K): four weights a (broadcast) load.
    const float* w = reinterpret_cast<const float*>(smem + L.wrows);
    const unsigned wp = row_pitch(K);
    float* part = reinterpret_cast<float*>(smem + L.part);
    float acc[CLUSTER_MAX_PER_BLOCK];
#pragma unroll
    for (unsigned q = 0; q < CLUSTER_MAX_PER_BLOCK; ++q) acc[q] = 0.0f;
    if (r < B) {
        // Inputs k..k+3 (x[e], in order) into every neuron's sum.
        auto add4 = [&](const float* x, unsigned k) {
#pragma unroll
            for (unsigned q = 0; q < CLUSTER_MAX_PER_BLOCK; ++q) {
                if (q >= nq) continue;
                const float4 w4 = FUSED_LOAD_F4(w + q * wp + k);
                acc[q] = fmaf(x[0], w4.x, acc[q]);
                acc[q] = fmaf(x[1], w4.y, acc[q]);
                acc[q] = fmaf(x[2], w4.z, acc[q]);
                acc[q] = fmaf(x[3], w4.w, acc[q]);
            }
        };
        auto add = [&](float x, unsigned k) {
#pragma unroll
            for (unsigned q = 0; q < CLUSTER_MAX_PER_BLOCK; ++q)
                if (q < nq) acc[q] = fmaf(x, w[q * wp + k], acc[q]);
        };
        unsigned k = k0;
        if (PIXELS) {
            const uint8_t* row = reinterpret_cast<const uint8_t*>(in) + (size_t)r * pitch;
            const bool valid = reinterpret_cast<const unsigned*>(smem + L.valid)[r] != 0;
            const float nan = __int_as_float(0x7fc00000);
            for (; k + 4 <= k1; k += 4) {
                const unsigned word = *reinterpret_cast<const unsigned*>(row + k);
                float x[4];
#pragma unroll
                for (unsigned e = 0; e < 4; ++e) x[e] = valid ? pixel_value(word, e) * (1.0f / 255.0f) : nan;
                add4(x, k);
            }
            for (; k < k1; ++k) add(valid ? (float)row[k] * (1.0f / 255.0f) : nan, k);
        } else {
            const float* row = reinterpret_cast<const float*>(in) + (size_t)r * pitch;
            for (; k + 4 <= k1; k += 4) {
                const float x[4] = {row[k], row[k + 1], row[k + 2], row[k + 3]};
                add4(x, k);
            }
            for (; k < k1; ++k) add(row[k], k);
        }
#pragma unroll
        for (unsigned q = 0; q < CLUSTER_MAX_PER_BLOCK; ++q)
            if (q < nq) part[((size_t)split * CLUSTER_MAX_ROWS + r) * nq + q] = acc[q];
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < B * nq; i += blockDim.x) {
        const unsigned row = i / nq, q = i % nq;
        float s = part[(size_t)row * nq + q];
        for (unsigned o = 1; o < S; ++o) s += part[((size_t)o * CLUSTER_MAX_ROWS + row) * nq + q];
        z[i] = s;
    }
    __syncthreads();
}

// dW[j_q, k] = Σ_r dz[r·nq + q]·in(r, k) for q < nq (j_q = rank + C·q), k < K, into grads:
// a thread per four inputs and group of rows, all nq rows of dW in registers, rows added in
// order. Where a thread per four inputs leaves threads idle (a hidden layer's 100 inputs take
// 25 of 256), the rows are split in G groups (wgrad_groups), whose sums are then added in
// group order. Every thread calls it.
template <bool PIXELS>
__device__ __forceinline__ void weight_gradient(
    const ClusterLayout& L, uint8_t* smem, const void* in, unsigned pitch, unsigned K, unsigned nq, unsigned B,
    const float* dz, float* dw, unsigned rank, unsigned C)
{
    const unsigned quads = (K + 3) / 4, G = wgrad_groups(K, L.per_block, blockDim.x), kp = row_pitch(K);
    const unsigned* valid = reinterpret_cast<const unsigned*>(smem + L.valid);
    float* wpart = reinterpret_cast<float*>(smem + L.wpart);
    const float nan = __int_as_float(0x7fc00000);
    for (unsigned item = threadIdx.x; item < quads * G; item += blockDim.x) {
        const unsigned g = item / quads, kq = item % quads, k = 4 * kq;
        float acc[CLUSTER_MAX_PER_BLOCK][4];
#pragma unroll
        for (unsigned q = 0; q < CLUSTER_MAX_PER_BLOCK; ++q)
#pragma unroll
            for (unsigned e = 0; e < 4; ++e) acc[q][e] = 0.0f;
        for (unsigned r = g * B / G; r < (g + 1) * B / G; ++r) {
            float x[4];
            if (PIXELS) {
                const uint8_t* row = reinterpret_cast<const uint8_t*>(in) + (size_t)r * pitch;
                const bool ok = valid[r] != 0;
                if (k + 4 <= K) {
                    const unsigned word = *reinterpret_cast<const unsigned*>(row + k);
#pragma unroll
                    for (unsigned e = 0; e < 4; ++e) x[e] = ok ? pixel_value(word, e) * (1.0f / 255.0f) : nan;
                } else {
#pragma unroll
                    for (unsigned e = 0; e < 4; ++e) x[e] = k + e < K ? (ok ? (float)row[k + e] * (1.0f / 255.0f) : nan) : 0.0f;
                }
            } else {
                const float* row = reinterpret_cast<const float*>(in) + (size_t)r * pitch;
#pragma unroll
                for (unsigned e = 0; e < 4; ++e) x[e] = k + e < K ? row[k + e] : 0.0f;
            }
#pragma unroll
            for (unsigned q = 0; q < CLUSTER_MAX_PER_BLOCK; ++q) {
                if (q >= nq) continue;
                const float d = dz[r * nq + q];
#pragma unroll
                for (unsigned e = 0; e < 4; ++e) acc[q][e] = fmaf(d, x[e], acc[q][e]);
            }
        }
#pragma unroll
        for (unsigned q = 0; q < CLUSTER_MAX_PER_BLOCK; ++q) {
            if (q >= nq) continue;
#pragma unroll
            for (unsigned e = 0; e < 4; ++e) {
                if (k + e >= K) continue;
                if (G == 1) dw[(size_t)(rank + C * q) * K + k + e] = acc[q][e];
                else wpart[((size_t)g * nq + q) * kp + k + e] = acc[q][e];
            }
        }
    }
    if (G > 1) {
        __syncthreads();
        for (unsigned i = threadIdx.x; i < nq * K; i += blockDim.x) {
            const unsigned q = i / K, k = i % K;
            float s = wpart[(size_t)q * kp + k];
            for (unsigned g = 1; g < G; ++g) s += wpart[((size_t)g * nq + q) * kp + k];
            dw[(size_t)(rank + C * q) * K + k] = s;
        }
    }
}

// The body: network `FUSED_PARAMS` on the C blocks of this cluster, this block its `rank`-th.
template <unsigned C>
__device__ __forceinline__ void cluster_train_steps(FUSED_PARAMS, unsigned rank)
{
#ifdef EMULATED_BLOCK_SHARED
    uint8_t* smem = EMULATED_BLOCK_DYNAMIC();
#else
    extern __shared__ __align__(16) uint8_t fused_cluster_shared[];
    uint8_t* smem = fused_cluster_shared;
#endif
    const unsigned t = threadIdx.x, T = blockDim.x, lane = t % 32, warp = t / 32, W = T / 32;
    const ClusterLayout L = cluster_layout(layer_info, n_layers, batch, features, C, T);
    // The host sized the launch with fused_cluster_layout_bytes; anything else is a bug.
    if (L.bytes == 0 || FUSED_DYNAMIC_BYTES() < L.bytes) FUSED_TRAP();
    const unsigned hidden = n_layers - 1, B = batch;
    const int* out_info = layer_info + (size_t)hidden * LAYER_FIELDS;
    const unsigned classes = L.widths[hidden + 1], top = L.widths[hidden];
    const float inv_rows = 1.0f / (float)B, nan = __int_as_float(0x7fc00000);
    const bool pixel_words = features % 4 == 0 && ((size_t)images & 3) == 0;
    const bool pixel_quads = features % 16 == 0 && ((size_t)images & 15) == 0;
    const unsigned cursor0 = cursor[0];
    auto floats = [&](unsigned offset) { return reinterpret_cast<float*>(smem + offset); };
    float* z = floats(L.z);
    float* dzq = floats(L.dzq);
    // Writes v at `offset`'s table, element i, in every block of the cluster.
    auto push = [&](unsigned offset, size_t i, float v) {
        for (unsigned b = 0; b < C; ++b) FUSED_CLUSTER_MAP(floats(offset), b)[i] = v;
    };
    // Every block has started before any writes into another's shared memory.
    FUSED_CLUSTER_SYNC();

    for (unsigned step = 0; step < steps; ++step) {
        const unsigned long long base = (unsigned long long)(cursor0 + step) * B;

        // The batch's pixels, and which rows are valid (inside the order and the dataset).
        {
            unsigned* valid = reinterpret_cast<unsigned*>(smem + L.valid);
            for (unsigned r = t; r < B; r += T) {
                const unsigned long long pos = base + r;
                const unsigned image = pos < order_len ? order[pos] : count;
                valid[r] = image < count ? image + 1 : 0;  // 0: invalid, else image + 1
            }
            __syncthreads();
            uint8_t* pixels = smem + L.pixels;
            if (pixel_quads) {
                // 16 bytes a load, STAGE_QUADS loads a thread before any store: the seed's
                // 47 KB in one round trip. (Rows land at an odd word pitch: stored by words.)
                const unsigned quads = features / 16, n = B * quads;
                for (unsigned i0 = t; i0 < n; i0 += STAGE_QUADS * T) {
                    uint4 v[STAGE_QUADS];
#pragma unroll
                    for (unsigned u = 0; u < STAGE_QUADS; ++u) {
                        const unsigned i = i0 + u * T;
                        const unsigned tag = i < n ? valid[i / quads] : 0;
                        v[u] = tag != 0 ? FUSED_LOAD_U128(images + (size_t)(tag - 1) * features + 16 * (i % quads)) : uint4{0u, 0u, 0u, 0u};
                    }
#pragma unroll
                    for (unsigned u = 0; u < STAGE_QUADS; ++u) {
                        const unsigned i = i0 + u * T;
                        if (i >= n) continue;
                        uint8_t* to = pixels + (size_t)(i / quads) * L.pixel_pitch + 16 * (i % quads);
                        FUSED_STORE_U32(to, v[u].x);
                        FUSED_STORE_U32(to + 4, v[u].y);
                        FUSED_STORE_U32(to + 8, v[u].z);
                        FUSED_STORE_U32(to + 12, v[u].w);
                    }
                }
            } else if (pixel_words) {
                const unsigned words = features / 4, n = B * words;
                for (unsigned i0 = t; i0 < n; i0 += 4 * T) {
                    unsigned v[4];
#pragma unroll
                    for (unsigned u = 0; u < 4; ++u) {
                        const unsigned i = i0 + u * T;
                        const unsigned tag = i < n ? valid[i / words] : 0;
                        v[u] = tag != 0 ? FUSED_LOAD_U32(images + (size_t)(tag - 1) * features + 4 * (i % words)) : 0u;
                    }
#pragma unroll
                    for (unsigned u = 0; u < 4; ++u) {
                        const unsigned i = i0 + u * T;
                        if (i < n) FUSED_STORE_U32(pixels + (size_t)(i / words) * L.pixel_pitch + 4 * (i % words), v[u]);
                    }
                }
            } else {
                for (unsigned i = t; i < B * features; i += T) {
                    const unsigned tag = valid[i / features];
                    pixels[(size_t)(i / features) * L.pixel_pitch + i % features] = tag != 0 ? images[(size_t)(tag - 1) * features + i % features] : 0;
                }
            }
        }

        // The output layer's deferred update (its rows are read by every block in the logits,
        // after the forward's barriers).
        if (step > 0) sgd_owned_rows(out_info, rank, C, owned(classes, rank, C), params, grads, velocity, lr, momentum, nullptr);

        // Forward, hidden layers.
        for (unsigned l = 0; l < hidden; ++l) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            const unsigned K = L.widths[l], width = L.widths[l + 1], nq = owned(width, rank, C);
            const bool bn = info[L_GAMMA] >= 0;
            // This block's rows: updated (the previous step's deferred SGD) or copied.
            if (step > 0) {
                sgd_owned_rows(info, rank, C, nq, params, grads, velocity, lr, momentum, floats(L.wrows));
            } else {
                for (unsigned i = t; i < nq * K; i += T) floats(L.wrows)[(i / K) * row_pitch(K) + i % K] = params[info[L_W] + (size_t)(rank + C * (i / K)) * K + i % K];
            }
            __syncthreads();
            if (l == 0) forward_dot<true>(L, smem, smem + L.pixels, L.pixel_pitch, K, nq, B, z);
            else forward_dot<false>(L, smem, floats(L.act[l - 1]), L.act_pitch[l - 1], K, nq, B, z);
            // A warp per neuron: BN (or the bias) and the activation, a lane per row (and
            // row + 32); a goes into every block's copy of this layer.
            for (unsigned q = warp; q < nq; q += W) {
                const unsigned j = rank + C * q, r0 = lane, r1 = lane + 32;
                const float z0 = r0 < B ? z[r0 * nq + q] : 0.0f, z1 = r1 < B ? z[r1 * nq + q] : 0.0f;
                float a0, a1;
                if (bn) {
                    const float g = params[info[L_GAMMA] + j], b = params[info[L_BETA] + j];
                    const float mu = warp_total(z0 + z1) * inv_rows;
                    const float d0 = r0 < B ? z0 - mu : 0.0f, d1 = r1 < B ? z1 - mu : 0.0f;
                    const float sigma2 = warp_total(d0 * d0 + d1 * d1) * inv_rows;
                    const float istd = 1.0f / sqrtf(sigma2 + epsilon);
                    const float x0 = (z0 - mu) * istd, x1 = (z1 - mu) * istd;
                    float* xh = floats(L.xhat[l]);
                    if (r0 < B) xh[r0 * nq + q] = x0;
                    if (r1 < B) xh[r1 * nq + q] = x1;
                    if (lane == 0) floats(L.istd)[l * L.per_block + q] = istd;
                    a0 = activate(activation, g * x0 + b);
                    a1 = activate(activation, g * x1 + b);
                    const unsigned col = (unsigned)info[L_COL] + j, bn_index = (unsigned)info[L_BN];
                    for (unsigned e = lane; e < n_estimators; e += 32)
                        update_running_stats(estimator_factors(estimators, e, batches[(size_t)e * bn_layers + bn_index] + step, B),
                                             running_mean + (size_t)e * bn_total + col, running_var + (size_t)e * bn_total + col, mu, sigma2);
                } else {
                    const float b = params[info[L_BIAS] + j];
                    a0 = activate(activation, z0 + b);
                    a1 = activate(activation, z1 + b);
                }
                if (r0 < B) push(L.act[l], (size_t)r0 * L.act_pitch[l] + j, a0);
                if (r1 < B) push(L.act[l], (size_t)r1 * L.act_pitch[l] + j, a1);
            }
            FUSED_CLUSTER_SYNC();
        }

        // Logits and softmax cross-entropy, a warp per row of this block (r ≡ rank mod C), a
        // lane per class; dlogits into every block's copy, the row's loss into block 0's.
        {
            // W_out's rows at an odd pitch: a lane per class reads them without bank conflicts.
            float* wout = floats(L.wout);
            float* bout = floats(L.bout);
            const unsigned w_pitch = odd_pitch(top);
#pragma unroll 4
            for (unsigned i = t; i < classes * top; i += T) wout[(i / top) * w_pitch + i % top] = FUSED_LOAD_L2(params + out_info[L_W] + i);
            for (unsigned k = t; k < classes; k += T) bout[k] = out_info[L_BIAS] >= 0 ? FUSED_LOAD_L2(params + out_info[L_BIAS] + k) : 0.0f;
            __syncthreads();
            const float* a_top = floats(L.act[hidden - 1]);
            const unsigned a_pitch = L.act_pitch[hidden - 1], d_pitch = L.act_pitch[hidden];
            for (unsigned i = warp; rank + C * i < B; i += W) {
                const unsigned r = rank + C * i;
                const unsigned long long pos = base + r;
                const unsigned image = pos < order_len ? order[pos] : count;
                const unsigned label = image < count ? labels[image] : 255u;
                float v = -__int_as_float(0x7f800000);
                if (lane < classes) {
                    float s = 0.0f;
                    for (unsigned m = 0; m < top; ++m) s = fmaf(a_top[(size_t)r * a_pitch + m], wout[lane * w_pitch + m], s);
                    v = s + bout[lane];
                }
                // Every lane walks the classes in order: the same maximum, first best and
                // denominator on all of them.
                float m = FUSED_SHUFFLE(v, 0);
                unsigned best = 0;
                for (unsigned k = 1; k < classes; ++k) {
                    const float vk = FUSED_SHUFFLE(v, k);
                    if (vk > m) { m = vk; best = k; }
                }
                float denom = 0.0f;
                for (unsigned k = 0; k < classes; ++k) denom += expf(FUSED_SHUFFLE(v, k) - m);
                const bool valid = label < classes;
                if (lane < classes) {
                    const float p = expf(v - m) / denom;
                    push(L.dz[hidden], (size_t)r * d_pitch + lane, valid ? (p - (lane == label ? 1.0f : 0.0f)) * grad_scale : nan);
                }
                const float v_label = FUSED_SHUFFLE(v, valid ? label : 0);
                if (lane == 0) {
                    FUSED_CLUSTER_MAP(reinterpret_cast<double*>(smem + L.loss), 0)[r] = valid ? (double)(logf(denom) + m - v_label) : (double)nan;
                    FUSED_CLUSTER_MAP(reinterpret_cast<unsigned*>(smem + L.right), 0)[r] = (valid && best == label) ? 1u : 0u;
                }
            }
            FUSED_CLUSTER_SYNC();
        }

        // Backward. Block 0 adds the rows' losses in row order.
        if (rank == 0 && t == 0) {
            const double* losses = reinterpret_cast<const double*>(smem + L.loss);
            const unsigned* rights = reinterpret_cast<const unsigned*>(smem + L.right);
            double s = 0.0;
            unsigned long long c = 0;
            for (unsigned r = 0; r < B; ++r) { s += losses[r]; c += rights[r]; }
            loss_sum[0] += s;
            correct[0] += c;
        }
        // The output layer's gradients, a warp per class of this block.
        {
            const float* dlogits = floats(L.dz[hidden]);
            const float* a_top = floats(L.act[hidden - 1]);
            const unsigned a_pitch = L.act_pitch[hidden - 1], d_pitch = L.act_pitch[hidden];
            for (unsigned i = warp; rank + C * i < classes; i += W) {
                const unsigned k = rank + C * i, r0 = lane, r1 = lane + 32;
                const float g = (r0 < B ? dlogits[(size_t)r0 * d_pitch + k] : 0.0f) + (r1 < B ? dlogits[(size_t)r1 * d_pitch + k] : 0.0f);
                const float db = warp_total(g);
                if (lane == 0 && out_info[L_BIAS] >= 0) grads[out_info[L_BIAS] + k] = db;
                for (unsigned m = lane; m < top; m += 32) {
                    float s = 0.0f;
                    for (unsigned r = 0; r < B; ++r) s = fmaf(dlogits[(size_t)r * d_pitch + k], a_top[(size_t)r * a_pitch + m], s);
                    grads[out_info[L_W] + (size_t)k * top + m] = s;
                }
            }
        }
        // Hidden layers from the top down.
        for (unsigned l = hidden; l-- > 0;) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            const int* up = layer_info + (size_t)(l + 1) * LAYER_FIELDS;
            const unsigned K = L.widths[l], width = L.widths[l + 1], up_w = L.widths[l + 2], nq = owned(width, rank, C);
            const float* dz_up = floats(L.dz[l + 1]);
            const unsigned up_pitch = L.act_pitch[l + 1], a_pitch = L.act_pitch[l];
            const float* a = floats(L.act[l]);
            const bool bn = info[L_GAMMA] >= 0;
            float* wcol = floats(L.wcol) + (size_t)warp * up_w;
            for (unsigned q = warp; q < nq; q += W) {
                const unsigned j = rank + C * q, r0 = lane, r1 = lane + 32;
                // Column j of W_up (other blocks' rows, through L2).
#pragma unroll 4
                for (unsigned m = lane; m < up_w; m += 32) wcol[m] = FUSED_LOAD_L2(params + up[L_W] + (size_t)m * width + j);
                FUSED_SYNC_WARP();
                float da0 = 0.0f, da1 = 0.0f;
                for (unsigned m = 0; m < up_w; ++m) {
                    if (r0 < B) da0 = fmaf(dz_up[(size_t)r0 * up_pitch + m], wcol[m], da0);
                    if (r1 < B) da1 = fmaf(dz_up[(size_t)r1 * up_pitch + m], wcol[m], da1);
                }
                const float dy0 = r0 < B ? activate_backward(activation, a[(size_t)r0 * a_pitch + j], da0) : 0.0f;
                const float dy1 = r1 < B ? activate_backward(activation, a[(size_t)r1 * a_pitch + j], da1) : 0.0f;
                float dz0 = dy0, dz1 = dy1;
                if (bn) {
                    const float* xh = floats(L.xhat[l]);
                    const float x0 = r0 < B ? xh[r0 * nq + q] : 0.0f, x1 = r1 < B ? xh[r1 * nq + q] : 0.0f;
                    const float d_beta = warp_total(dy0 + dy1), d_gamma = warp_total(dy0 * x0 + dy1 * x1);
                    const float g = params[info[L_GAMMA] + j], istd = floats(L.istd)[l * L.per_block + q], b = (float)B;
                    dz0 = g * istd / b * (b * dy0 - d_beta - x0 * d_gamma);
                    dz1 = g * istd / b * (b * dy1 - d_beta - x1 * d_gamma);
                    if (lane == 0) {
                        grads[info[L_GAMMA] + j] = d_gamma;
                        grads[info[L_BETA] + j] = d_beta;
                    }
                } else {
                    const float db = warp_total(dy0 + dy1);
                    if (lane == 0) grads[info[L_BIAS] + j] = db;
                }
                if (r0 < B) dzq[r0 * nq + q] = dz0;
                if (r1 < B) dzq[r1 * nq + q] = dz1;
                if (l > 0) {
                    if (r0 < B) push(L.dz[l], (size_t)r0 * a_pitch + j, dz0);
                    if (r1 < B) push(L.dz[l], (size_t)r1 * a_pitch + j, dz1);
                }
                FUSED_SYNC_WARP();  // wcol is rewritten for the warp's next neuron
            }
            __syncthreads();
            float* dw = grads + info[L_W];
            if (l == 0) weight_gradient<true>(L, smem, smem + L.pixels, L.pixel_pitch, K, nq, B, dzq, dw, rank, C);
            else weight_gradient<false>(L, smem, floats(L.act[l - 1]), L.act_pitch[l - 1], K, nq, B, dzq, dw, rank, C);
            __syncthreads();
            // The layer below reads all of this layer's dz; with one hidden layer, the next
            // step's forward must not overwrite the a the output layer's gradient read.
            if (l > 0 || hidden == 1) FUSED_CLUSTER_SYNC();
        }
    }

    // The last step's deferred updates, then the counters every block read at the start.
    FUSED_CLUSTER_SYNC();
    if (steps > 0) {
        for (unsigned l = 0; l < n_layers; ++l) {
            const int* info = layer_info + (size_t)l * LAYER_FIELDS;
            sgd_owned_rows(info, rank, C, owned((unsigned)info[L_OUT], rank, C), params, grads, velocity, lr, momentum, nullptr);
        }
    }
    if (rank == 0 && t == 0) {
        cursor[0] = cursor0 + steps;
        for (unsigned e = 0; e < n_estimators; ++e)
            for (unsigned bn = 0; bn < bn_layers; ++bn) batches[(size_t)e * bn_layers + bn] += steps;
    }
}

// Two networks, a cluster of C blocks each: the first cluster trains network a, the second b
// (the batches, hyperparameters and layer count are a's, as FUSED_ARGS_SELECT says).
template <unsigned C>
__device__ __forceinline__ void cluster_pair_train_steps(FUSED_PARAMS_P(a_), FUSED_PARAMS_P(b_))
{
    const bool second = blockIdx.x >= C;
    cluster_train_steps<C>(FUSED_ARGS_SELECT(second, a_, b_), FUSED_CLUSTER_RANK());
}

#ifndef EMULATED_BLOCK_SHARED
// One network per cluster of 8 or 16 blocks (16 needs the non-portable cluster size, which
// the host allows before launching).
extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(CLUSTER_THREADS, 1) fused_cluster8_f32(FUSED_PARAMS)
{
    cluster_train_steps<8>(FUSED_ARGS, FUSED_CLUSTER_RANK());
}
extern "C" __global__ void __cluster_dims__(16, 1, 1) __launch_bounds__(CLUSTER_THREADS, 1) fused_cluster16_f32(FUSED_PARAMS)
{
    cluster_train_steps<16>(FUSED_ARGS, FUSED_CLUSTER_RANK());
}
// Two networks, a cluster each (the BN and the plain network of the study's comparison).
extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(CLUSTER_THREADS, 1) fused_cluster_pair8_f32(FUSED_PARAMS_P(a_), FUSED_PARAMS_P(b_))
{
    cluster_pair_train_steps<8>(FUSED_ARGS_P(a_), FUSED_ARGS_P(b_));
}
extern "C" __global__ void __cluster_dims__(16, 1, 1) __launch_bounds__(CLUSTER_THREADS, 1) fused_cluster_pair16_f32(FUSED_PARAMS_P(a_), FUSED_PARAMS_P(b_))
{
    cluster_pair_train_steps<16>(FUSED_ARGS_P(a_), FUSED_ARGS_P(b_));
}
#endif
