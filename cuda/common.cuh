// Shared pieces of the bntrain kernels: activation functions and the deterministic
// per-column reduction used by every kernel that sums over the batch.
//
// Layout everywhere: activations are [rows, width] row-major f32 (rows = batch examples),
// per-feature vectors are [width]. Math is IEEE f32 (no fast-math), matching
// src/cpu/ops.rs operation for operation; nvcc may contract a*b+c into one FMA.
#pragma once

// Activation codes; must match `activation_code` in src/cuda/kernels.rs.
#define ACT_SIGMOID 0
#define ACT_RELU 1

// a = σ(y) = 1/(1+e^{−y}) or max(y, 0)  (cpu::ops::activation_forward)
__device__ __forceinline__ float activate(int activation, float y) {
    if (activation == ACT_SIGMOID) return 1.0f / (1.0f + expf(-y));
    return y > 0.0f ? y : 0.0f;
}

// dy = da·σ'(y) from the saved output a: a(1−a) for the sigmoid, 1[a>0] for relu
// (cpu::ops::activation_backward; same evaluation order: (da·a)·(1−a)).
__device__ __forceinline__ float activate_backward(int activation, float a, float da) {
    if (activation == ACT_SIGMOID) return da * a * (1.0f - a);
    return a > 0.0f ? da : 0.0f;
}

// Pixel byte e of a 32-bit word as a float: byte e under the exponent of 2^23 (the
// constant's top byte; its other bytes are zero) is 2^23 + byte exactly (pixel_bits), and
// `pixel_value` the byte itself, less 2^23 (exact). `pixel_scaled`
// gives byte·(1/255) from it with one FMA, bit for bit (float)byte·(1/255): 2^23·(1/255) is
// exact, so the FMA rounds (2^23 + byte)·(1/255) − 2^23·(1/255) = byte·(1/255) once, as the
// product does. A byte permute and an FMA, both at full rate, where an integer conversion
// (I2F) runs at 16 a cycle an SM on sm_80/sm_90 by the CUDA guide's throughput table, against
// 64 (sm_80) or 128 (sm_90) FMAs (not measured here).
#define PIXEL_MAGIC 0x4B000000u
#define PIXEL_SELECTOR(e) (0x7540u + (e))
#ifndef PIXEL_BYTE_PERM
#define PIXEL_BYTE_PERM(x, y, s) __byte_perm((x), (y), (s))
#endif
#define PIXEL_SCALE (1.0f / 255.0f)
__device__ __forceinline__ float pixel_bits(unsigned word, unsigned e) {
    return __int_as_float((int)PIXEL_BYTE_PERM(word, PIXEL_MAGIC, PIXEL_SELECTOR(e)));
}
__device__ __forceinline__ float pixel_value(unsigned word, unsigned e) { return pixel_bits(word, e) - 8388608.0f; }
__device__ __forceinline__ float pixel_scaled(unsigned word, unsigned e) {
    return fmaf(pixel_bits(word, e), PIXEL_SCALE, -8388608.0f * PIXEL_SCALE);
}

// Another block's writes of this launch, read past L1, which is not coherent across SMs.
// The writer fenced them before the ticket that the reader's block took after it.
#ifndef LOAD_PAST_L1
#define LOAD_PAST_L1(p) (*(const volatile decltype(+*(p))*)(p))
#endif

// Column tiles: a block of (TILE_COLS, TILE_ROWS) threads owns TILE_COLS consecutive
// features (threadIdx.x) and walks all rows, thread row threadIdx.y taking rows threadIdx.y,
// +TILE_ROWS, ... . Launch: grid.x = ceil(width/TILE_COLS), block = (TILE_COLS, TILE_ROWS).
// Narrow and tall, for latency: a warp reads 4 rows × 8 features, four full 32-byte sectors
// (what the memory system moves anyway), and the grid has width/8 blocks of 16 warps. The
// wide network's [1024, 1024] layers thus get 128 blocks, one per SM of an H100, with 16
// rows per thread; 32 × 8 tiles gave 32 blocks with 128 rows per thread, a few loads in
// flight on each of 32 SMs. Every thread of the block must call column_total (it
// synchronizes).
#define TILE_COLS 8
#define TILE_ROWS 64

// Visits this thread's rows r = threadIdx.y, +TILE_ROWS, … < rows in that order: `load(r)`
// reads what row r needs, `use(r, value)` consumes it (adds it up, writes results), with
// COLUMN_LOADS rows' loads issued before the first is used. A plain loop checks the bound
// before each row's load, so each waits on the previous row's round trip: 157 of them a
// pass for the 10000 rows of a test-set evaluation. Same order, same sums as that loop.
#define COLUMN_LOADS 8
template <typename Load, typename Use>
__device__ __forceinline__ void for_column_rows(unsigned rows, Load load, Use use) {
    for (unsigned r0 = threadIdx.y; r0 < rows; r0 += COLUMN_LOADS * TILE_ROWS) {
        decltype(load(0u)) v[COLUMN_LOADS];
#pragma unroll
        for (unsigned u = 0; u < COLUMN_LOADS; ++u) {
            const unsigned r = r0 + u * TILE_ROWS;
            if (r < rows) v[u] = load(r);
        }
#pragma unroll
        for (unsigned u = 0; u < COLUMN_LOADS; ++u) {
            const unsigned r = r0 + u * TILE_ROWS;
            if (r < rows) use(r, v[u]);
        }
    }
}

// Total over the block's thread rows of each column's partial sum `v`, by a fixed pairwise
// tree (thread row y adds y + s for s = 32, 16, ..., 1): deterministic, no atomics. Every
// thread of a column gets the same total. `part` is the block's [TILE_ROWS][TILE_COLS]
// shared scratch.
__device__ __forceinline__ float column_total(float (*part)[TILE_COLS], float v) {
    part[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
#pragma unroll
    for (unsigned s = TILE_ROWS / 2; s > 0; s >>= 1) {
        if (threadIdx.y < s) part[threadIdx.y][threadIdx.x] += part[threadIdx.y + s][threadIdx.x];
        __syncthreads();
    }
    const float total = part[0][threadIdx.x];
    __syncthreads();  // `part` is reused by the next call
    return total;
}
