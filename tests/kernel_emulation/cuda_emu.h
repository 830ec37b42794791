// Minimal CPU emulation of the CUDA features the bntrain kernels use.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <thread>
#include <vector>
#include <functional>
#include <memory>
#include <chrono>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
// The barrier of the calling thread's block (null in a sequential launch).
thread_local std::barrier<>* g_bar = nullptr;
inline void __syncthreads() {
    if (!g_bar) { fprintf(stderr, "__syncthreads in a sequential launch\n"); abort(); }
    g_bar->arrive_and_wait();
}
// Shared memory of the calling thread's block in a cooperative launch (see fused_step.cu):
// the static array and the dynamic one (g_dynamic_bytes long, 16-byte aligned).
thread_local float* g_block_shared = nullptr;
thread_local uint8_t* g_block_dynamic = nullptr;
inline size_t g_dynamic_bytes = 0;
// (The emulated block's static shared memory: 2^14 floats, see launch_cooperative.)
#define EMULATED_TRAP(why) (fprintf(stderr, "%s\n", why), abort())
#define EMULATED_BLOCK_SHARED(n) ((n) <= (1u << 14) ? g_block_shared : (EMULATED_TRAP("static shared memory past the emulated block's"), nullptr))
#define EMULATED_BLOCK_DYNAMIC() (g_block_dynamic)
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
#define FUSED_TRAP() (fprintf(stderr, "grid barrier timed out\n"), abort())
#define FUSED_LOAD_ACQUIRE(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define FUSED_ARRIVE_RELEASE(p) __atomic_fetch_add((p), 1u, __ATOMIC_RELEASE)
// Vector loads and stores without type punning, aborting on an address the GPU would fault
// on (not a multiple of the access's size). Four pixels as one 32-bit word: little-endian, as
// on the GPU.
inline const void* emu_aligned(const void* p, size_t bytes) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) { fprintf(stderr, "a %zu-byte access at a misaligned address\n", bytes); abort(); }
    return p;
}
inline unsigned fused_load_u32(const uint8_t* p) { unsigned v; memcpy(&v, emu_aligned(p, 4), 4); return v; }
#define FUSED_LOAD_U32(p) fused_load_u32(p)
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 fused_load_f4(const float* p) { float4 v; memcpy(&v, emu_aligned(p, 16), 16); return v; }
#define FUSED_LOAD_F4(p) fused_load_f4(p)
inline void fused_store_f4(float* p, float4 v) { memcpy(const_cast<void*>(emu_aligned(p, 16)), &v, 16); }
#define FUSED_STORE_F4(p, v) fused_store_f4((p), (v))
inline void fused_store_u32(void* p, unsigned v) { memcpy(const_cast<void*>(emu_aligned(p, 4)), &v, 4); }
inline uint4 fused_load_u128(const void* p) { uint4 v; memcpy(&v, emu_aligned(p, 16), 16); return v; }
inline void fused_store_u128(void* p, uint4 v) { memcpy(const_cast<void*>(emu_aligned(p, 16)), &v, 16); }
#define FUSED_STORE_U32(p, v) fused_store_u32((p), (v))
#define FUSED_LOAD_U128(p) fused_load_u128(p)
#define FUSED_STORE_U128(p, v) fused_store_u128((p), (v))
// The block that sleeps after every grid barrier (none: UINT32_MAX); see fused_step.cu.
inline unsigned g_slow_block = UINT32_MAX;
#define FUSED_AFTER_BARRIER() \
    do { if (blockIdx.x == g_slow_block) std::this_thread::sleep_for(std::chrono::milliseconds(2)); } while (0)
// The fused kernel's phase clocks (fused_trace): one monotonic clock, in ns, for both.
inline unsigned long long emu_now_ns() {
    return (unsigned long long)std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
#define FUSED_CLOCK() emu_now_ns()
#define FUSED_GLOBALTIMER() emu_now_ns()
// How many times each block recorded each trace slot (fused_trace_slot): [block][slot], sized
// by the test before a traced launch (a slot recorded twice would skew its phase's time and
// pass every check of the values).
inline std::vector<std::vector<unsigned>> g_trace_records;
#define FUSED_TRACE_RECORDED(slot) \
    do { if (blockIdx.x < g_trace_records.size() && (slot) < g_trace_records[blockIdx.x].size()) g_trace_records[blockIdx.x][(slot)]++; } while (0)
#define __noinline__
#define __global__
#define __launch_bounds__(...)
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }

// Threaded launch (kernels with barriers): every thread of a block is a std::thread.
inline void launch(dim3 grid, dim3 block, std::function<void()> f) {
    gridDim = grid; blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(block.x * block.y * block.z);
        std::vector<std::thread> ts;
        for (unsigned tz = 0; tz < block.z; ++tz) for (unsigned ty = 0; ty < block.y; ++ty) for (unsigned tx = 0; tx < block.x; ++tx)
            ts.emplace_back([=, &f, &bar] { g_bar = &bar; blockIdx = {bx, by, bz}; threadIdx = {tx, ty, tz}; f(); });
        for (auto& t : ts) t.join();
    }
}
// Cooperative launch (kernels with grid barriers): every thread of every block runs at once,
// as a cooperative launch guarantees all blocks are resident. 1-D grids and blocks.
inline void launch_cooperative(dim3 grid, dim3 block, std::function<void()> f) {
    gridDim = grid; blockDim = block;
    std::vector<std::unique_ptr<std::barrier<>>> bars;
    std::vector<std::vector<float>> shared(grid.x, std::vector<float>(1 << 14));
    // uint4 elements: 16-byte aligned, as the GPU aligns dynamic shared memory; all bits set
    // (NaN floats), where the GPU leaves whatever was there.
    std::vector<std::vector<uint4>> dynamic(grid.x, std::vector<uint4>((g_dynamic_bytes + 15) / 16, uint4{~0u, ~0u, ~0u, ~0u}));
    for (unsigned bx = 0; bx < grid.x; ++bx) bars.push_back(std::make_unique<std::barrier<>>(block.x));
    std::vector<std::thread> ts;
    for (unsigned bx = 0; bx < grid.x; ++bx) for (unsigned tx = 0; tx < block.x; ++tx)
        ts.emplace_back([=, &f, &bars, &shared, &dynamic] {
            g_bar = bars[bx].get(); g_block_shared = shared[bx].data();
            g_block_dynamic = reinterpret_cast<uint8_t*>(dynamic[bx].data());
            blockIdx = {bx, 0, 0}; threadIdx = {tx, 0, 0}; f();
        });
    for (auto& t : ts) t.join();
}
// Cluster launch (fused_cluster.cu): every thread of every block at once, as in a cooperative
// launch, plus what a thread-block cluster gives: a barrier across the cluster's blocks,
// each block's dynamic shared memory mapped into the others, and warp shuffles (a warp's 32
// threads exchange through a table between two warp barriers; every lane must take part).
struct EmuWarp {
    std::barrier<> bar{32};
    float val[32];
};
inline unsigned g_cluster_size = 1;
thread_local std::barrier<>* g_cluster_bar = nullptr;
thread_local EmuWarp* g_warp = nullptr;
inline std::vector<uint8_t*> g_dynamic_table;
inline float emu_shuffle(float v, unsigned src) {
    const unsigned lane = threadIdx.x % 32;
    g_warp->val[lane] = v;
    g_warp->bar.arrive_and_wait();
    const float got = g_warp->val[src % 32];
    g_warp->bar.arrive_and_wait();
    return got;
}
inline float emu_shuffle_down(float v, unsigned by) {
    const unsigned lane = threadIdx.x % 32;
    return emu_shuffle(v, lane + by < 32 ? lane + by : lane);
}
template <class T> T* emu_map_rank(T* p, unsigned rank) {
    const size_t offset = reinterpret_cast<uint8_t*>(p) - g_block_dynamic;
    const unsigned first = blockIdx.x - blockIdx.x % g_cluster_size;
    return reinterpret_cast<T*>(g_dynamic_table[first + rank] + offset);
}
// __byte_perm as CUDA documents it: result byte n is byte (s >> 4n) & 7 of the eight bytes
// {y:x} (x bytes 0-3, y bytes 4-7), for selectors without the sign-replicating bit 3.
inline unsigned emu_byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long both = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (unsigned n = 0; n < 4; ++n) r |= (unsigned)((both >> (8 * ((s >> (4 * n)) & 7))) & 255) << (8 * n);
    return r;
}
#define PIXEL_BYTE_PERM(x, y, s) emu_byte_perm((x), (y), (s))
#define FUSED_CLUSTER_SYNC() do { g_cluster_bar->arrive_and_wait(); FUSED_AFTER_BARRIER(); } while (0)
#define FUSED_CLUSTER_RANK() (blockIdx.x % g_cluster_size)
#define FUSED_CLUSTER_MAP(p, rank) emu_map_rank((p), (rank))
#define FUSED_SHUFFLE(v, lane) emu_shuffle((v), (lane))
#define FUSED_SHUFFLE_DOWN(v, by) emu_shuffle_down((v), (by))
#define FUSED_SYNC_WARP() g_warp->bar.arrive_and_wait()
#define FUSED_LOAD_L2(p) (*(p))
#define FUSED_DYNAMIC_BYTES() ((unsigned)g_dynamic_bytes)
inline void launch_clusters(dim3 grid, dim3 block, unsigned cluster, std::function<void()> f) {
    gridDim = grid; blockDim = block; g_cluster_size = cluster;
    std::vector<std::unique_ptr<std::barrier<>>> bars, cluster_bars;
    std::vector<std::unique_ptr<EmuWarp>> warps;
    std::vector<std::vector<uint4>> dynamic(grid.x, std::vector<uint4>((g_dynamic_bytes + 15) / 16, uint4{~0u, ~0u, ~0u, ~0u}));
    g_dynamic_table.clear();
    for (auto& d : dynamic) g_dynamic_table.push_back(reinterpret_cast<uint8_t*>(d.data()));
    for (unsigned bx = 0; bx < grid.x; ++bx) bars.push_back(std::make_unique<std::barrier<>>(block.x));
    for (unsigned c = 0; c < grid.x / cluster; ++c) cluster_bars.push_back(std::make_unique<std::barrier<>>(cluster * block.x));
    for (unsigned w = 0; w < grid.x * (block.x / 32); ++w) warps.push_back(std::make_unique<EmuWarp>());
    std::vector<std::thread> ts;
    for (unsigned bx = 0; bx < grid.x; ++bx) for (unsigned tx = 0; tx < block.x; ++tx)
        ts.emplace_back([=, &f, &bars, &cluster_bars, &warps, &dynamic] {
            g_bar = bars[bx].get(); g_cluster_bar = cluster_bars[bx / cluster].get();
            g_warp = warps[bx * (block.x / 32) + tx / 32].get();
            g_block_dynamic = reinterpret_cast<uint8_t*>(dynamic[bx].data());
            blockIdx = {bx, 0, 0}; threadIdx = {tx, 0, 0}; f();
        });
    for (auto& t : ts) t.join();
    g_dynamic_table.clear();
    g_cluster_size = 1;
}
// Sequential launch (barrier-free kernels), threads run in a shuffled-ish order (reverse).
inline void launch_seq(dim3 grid, dim3 block, std::function<void()> f) {
    gridDim = grid; blockDim = block;
    for (int bz = grid.z - 1; bz >= 0; --bz) for (int by = grid.y - 1; by >= 0; --by) for (int bx = grid.x - 1; bx >= 0; --bx)
        for (int tz = block.z - 1; tz >= 0; --tz) for (int ty = block.y - 1; ty >= 0; --ty) for (int tx = block.x - 1; tx >= 0; --tx) {
            blockIdx = {(unsigned)bx, (unsigned)by, (unsigned)bz}; threadIdx = {(unsigned)tx, (unsigned)ty, (unsigned)tz}; f();
        }
}
