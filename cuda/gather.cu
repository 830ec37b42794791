// Gather: builds a batch from the u8 dataset resident on the device.
//
// Math (cpu::ops::gather_batch):  x[r, f] = images[idx(r), f] · (1/255),
//                                 batch_labels[r] = labels[idx(r)]
// with idx(r) = order[base + r] when an order is given (training: the epoch's permutation),
// else base + r (evaluation: contiguous rows of a split), and
//   base = first + (cursor ? cursor[0] · rows : 0).
// The cursor is a device-side batch counter (advanced by sgd_update_f32), so a training
// step needs no per-step argument from the host and can be captured in a CUDA graph.
// An index out of range (never produced by the checked host code) yields a NaN row and
// label 255, which the loss kernel turns into a NaN loss rather than a wild read.
//
// Layout: images [count, features] u8 row-major; labels [count] u8; order [order_len] u32;
//         x [rows, features] f32; batch_labels [rows] u8.
// Launch: grid.x = rows (one block per example), block = 256 threads striding the features.

#include <stdint.h>

extern "C" __global__ void gather_rows_f32(
    const uint8_t* __restrict__ images, const uint8_t* __restrict__ labels,
    unsigned count, unsigned features,
    const unsigned* __restrict__ order, unsigned order_len,
    const unsigned* __restrict__ cursor, unsigned first, unsigned rows,
    float* __restrict__ x, uint8_t* __restrict__ batch_labels)
{
    const unsigned r = blockIdx.x;
    if (r >= rows) return;
    unsigned long long pos = (unsigned long long)first + r;
    if (cursor != nullptr) pos += (unsigned long long)cursor[0] * rows;
    bool ok;
    unsigned long long index;
    if (order != nullptr) {
        ok = pos < order_len;
        index = ok ? order[pos] : 0;
    } else {
        ok = true;
        index = pos;
    }
    ok = ok && index < count;

    const uint8_t* src = images + index * features;
    float* dst = x + (size_t)r * features;
    for (unsigned f = threadIdx.x; f < features; f += blockDim.x) {
        dst[f] = ok ? (float)src[f] * (1.0f / 255.0f) : __int_as_float(0x7fc00000);
    }
    if (threadIdx.x == 0) batch_labels[r] = ok ? labels[index] : 255;
}
