//! The first layer on pixel input, visiting only the non-zero pixels.
//!
//! MNIST's pixels are about 81% zero. The first layer's two GEMMs, z = x·Wᵀ (+ b) and
//! dW = dzᵀ·x, are about 82% of the seed step's multiply-adds (18.8 of 22.8 MFLOP,
//! docs/perf.md); each non-zero pixel
//! contributes one row of Wᵀ to z and one row of dWᵀ, so visiting only those does ~19% of
//! the work:
//!
//!   z[r, :]   = b + Σ_{k : x[r,k] ≠ 0} x[r,k] · Wᵀ[k, :]
//!   dWᵀ[k, :] =     Σ_{r : x[r,k] ≠ 0} x[r,k] · dz[r, :]
//!
//! Layout: the layer's weight (and its gradient and momentum) are kept input-major, Wᵀ
//! `[in, out]`, so a pixel's row is contiguous. An output row is summed in column blocks of
//! up to 64 held in registers across all of the row's terms (a row kept in memory would make
//! every term a load, an add and a store); a last block narrower than 8 columns overlaps the
//! one before it rather than run as a narrow, latency-bound chain. The terms of an element
//! are summed in increasing pixel (forward) or row (backward) order with fused multiply-adds,
//! which round exactly once on every CPU: the result does not depend on the instruction set
//! the dispatch below picks.
//!
//! Pixel values are x = p/255 computed exactly as [`super::ops::gather_batch`] computes them.

use super::float::Float;

/// Each image as its non-zero pixels: positions and byte values, image after image.
pub struct SparseImages {
    /// Image i's entries are `offsets[i]..offsets[i+1]`.
    offsets: Vec<usize>,
    pixels: Vec<u32>,
    values: Vec<u8>,
    features: usize,
}

impl SparseImages {
    /// Indexes `images` (`[count, features]` bytes).
    pub fn new(images: &[u8], features: usize) -> Self {
        let count = images.len().checked_div(features).unwrap_or(0);
        let mut offsets = Vec::with_capacity(count + 1);
        let nonzero = images.iter().filter(|&&p| p != 0).count();
        let (mut pixels, mut values) = (Vec::with_capacity(nonzero), Vec::with_capacity(nonzero));
        offsets.push(0);
        for image in images.chunks_exact(features.max(1)) {
            for (k, &p) in image.iter().enumerate() {
                if p != 0 {
                    pixels.push(k as u32);
                    values.push(p);
                }
            }
            offsets.push(pixels.len());
        }
        SparseImages { offsets, pixels, values, features }
    }

    /// The fraction of pixels that are non-zero (1 for an empty set: nothing to skip).
    pub fn density(&self) -> f64 {
        let total = (self.offsets.len() - 1) * self.features;
        if total == 0 { 1.0 } else { self.pixels.len() as f64 / total as f64 }
    }

    fn image(&self, index: usize) -> (&[u32], &[u8]) {
        let range = self.offsets[index]..self.offsets[index + 1];
        (&self.pixels[range.clone()], &self.values[range])
    }
}

/// x = p/255 for every byte p, rounded as the dense gather rounds it.
fn pixel_values<F: Float>() -> [F; 256] {
    let scale = F::from_f64(1.0 / 255.0);
    std::array::from_fn(|p| F::from_f64(p as f64) * scale)
}

/// Scratch for [`weight_gradient`]: the batch transposed, pixel by pixel (CSC).
#[derive(Default)]
pub struct ColumnScratch {
    starts: Vec<usize>,
    rows: Vec<u32>,
    values: Vec<u8>,
}

/// Whether this CPU runs the sparse path at full speed: it needs fused multiply-add in
/// hardware (without it every term would call the C library's `fma`).
pub fn fast_on_this_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(target_arch = "aarch64")]
    return true;
    #[allow(unreachable_code)]
    false
}

/// z ← x·Wᵀ (+ bias) for the images `indices`.  w_t: [in, out]; bias: [out]; z: [rows, out].
pub fn forward<F: Float>(images: &SparseImages, indices: &[u32], w_t: &[F], bias: Option<&[F]>, outputs: usize, z: &mut [F]) {
    assert_eq!(w_t.len(), images.features * outputs, "sparse forward: Wᵀ has the wrong size");
    assert_eq!(z.len(), indices.len() * outputs, "sparse forward: z has the wrong size");
    assert!(bias.is_none_or(|b| b.len() == outputs), "sparse forward: bias has the wrong size");
    #[cfg(target_arch = "x86_64")]
    if fast_on_this_cpu() {
        // SAFETY: the CPU was just found to support AVX2 and FMA, the features it enables.
        return unsafe { forward_avx2(images, indices, w_t, bias, outputs, z) };
    }
    forward_body(images, indices, w_t, bias, outputs, z)
}

/// dWᵀ ← xᵀ·dz for the images `indices` (the gradient of [`forward`]'s weight).
/// dz: [rows, out]; dw_t: [in, out].
pub fn weight_gradient<F: Float>(
    images: &SparseImages, indices: &[u32], dz: &[F], outputs: usize, dw_t: &mut [F], scratch: &mut ColumnScratch,
) {
    assert_eq!(dz.len(), indices.len() * outputs, "sparse weight gradient: dz has the wrong size");
    assert_eq!(dw_t.len(), images.features * outputs, "sparse weight gradient: dWᵀ has the wrong size");
    transpose_batch(images, indices, scratch);
    #[cfg(target_arch = "x86_64")]
    if fast_on_this_cpu() {
        // SAFETY: the CPU was just found to support AVX2 and FMA, the features it enables.
        return unsafe { weight_gradient_avx2(images.features, dz, outputs, dw_t, scratch) };
    }
    weight_gradient_body(images.features, dz, outputs, dw_t, scratch)
}

// The same bodies compiled for AVX2 and FMA (wider registers, the fused multiply-add in one
// instruction rather than a library call; the same result).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_avx2<F: Float>(images: &SparseImages, indices: &[u32], w_t: &[F], bias: Option<&[F]>, outputs: usize, z: &mut [F]) {
    forward_body(images, indices, w_t, bias, outputs, z)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weight_gradient_avx2<F: Float>(features: usize, dz: &[F], outputs: usize, dw_t: &mut [F], scratch: &ColumnScratch) {
    weight_gradient_body(features, dz, outputs, dw_t, scratch)
}

#[inline(always)]
fn forward_body<F: Float>(images: &SparseImages, indices: &[u32], w_t: &[F], bias: Option<&[F]>, outputs: usize, z: &mut [F]) {
    let table = pixel_values::<F>();
    for (row, &index) in z.chunks_exact_mut(outputs).zip(indices) {
        let (pixels, bytes) = images.image(index as usize);
        match bias {
            Some(b) => row.copy_from_slice(b),
            None => row.fill(F::ZERO),
        }
        sum_scaled_rows(row, pixels, bytes, &table, w_t, outputs);
    }
}

/// Groups the batch's non-zero pixels by pixel: `rows[starts[k]..starts[k+1]]` are the batch
/// rows where pixel k is non-zero, in increasing order, with their byte values.
fn transpose_batch(images: &SparseImages, indices: &[u32], scratch: &mut ColumnScratch) {
    let features = images.features;
    let starts = &mut scratch.starts;
    starts.clear();
    starts.resize(features + 1, 0);
    for &index in indices {
        for &k in images.image(index as usize).0 {
            starts[k as usize + 1] += 1;
        }
    }
    for k in 0..features {
        starts[k + 1] += starts[k];
    }
    let total = starts[features];
    scratch.rows.resize(total, 0);
    scratch.values.resize(total, 0);
    // `starts[k]` serves as pixel k's write cursor, then is restored by one shift.
    for (r, &index) in indices.iter().enumerate() {
        let (pixels, bytes) = images.image(index as usize);
        for (&k, &p) in pixels.iter().zip(bytes) {
            let at = &mut starts[k as usize];
            scratch.rows[*at] = r as u32;
            scratch.values[*at] = p;
            *at += 1;
        }
    }
    starts.copy_within(0..features, 1);
    starts[0] = 0;
}

#[inline(always)]
fn weight_gradient_body<F: Float>(features: usize, dz: &[F], outputs: usize, dw_t: &mut [F], scratch: &ColumnScratch) {
    let table = pixel_values::<F>();
    for (k, row) in dw_t.chunks_exact_mut(outputs).enumerate().take(features) {
        row.fill(F::ZERO);
        let range = scratch.starts[k]..scratch.starts[k + 1];
        if !range.is_empty() {
            sum_scaled_rows(row, &scratch.rows[range.clone()], &scratch.values[range], &table, dz, outputs);
        }
    }
}

/// out[:] += Σ_t x(bytes[t]) · matrix[positions[t], :], where matrix is `[_, width]`, out is
/// `[width]` and x(p) = `table[p]`.
#[inline(always)]
fn sum_scaled_rows<F: Float>(out: &mut [F], positions: &[u32], bytes: &[u8], table: &[F; 256], matrix: &[F], width: usize) {
    let mut done = 0;
    while done < width {
        let left = width - done;
        // Blocks of 64; the rest in one block of a multiple of 8 that ends at `width`,
        // starting early (overlapping columns already done) when the rest is no such multiple.
        let block = if left >= 64 {
            64
        } else if left.next_multiple_of(8) <= width {
            left.next_multiple_of(8)
        } else if left >= 8 {
            left / 8 * 8
        } else {
            1
        };
        let start = if block > left { width - block } else { done };
        let args = (&mut *out, positions, bytes, table, matrix, width, start, done);
        done = match block {
            64 => sum_block::<F, 64>(args),
            56 => sum_block::<F, 56>(args),
            48 => sum_block::<F, 48>(args),
            40 => sum_block::<F, 40>(args),
            32 => sum_block::<F, 32>(args),
            24 => sum_block::<F, 24>(args),
            16 => sum_block::<F, 16>(args),
            8 => sum_block::<F, 8>(args),
            _ => sum_block::<F, 1>(args),
        };
    }
}

/// Columns `start..start+T` of [`sum_scaled_rows`], accumulated in a `[F; T]` the compiler
/// keeps in vector registers; columns before `keep_from` were done by an earlier block and
/// are not written back. Returns `start + T`, the first column not done.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn sum_block<F: Float, const T: usize>(
    (out, positions, bytes, table, matrix, width, start, keep_from): (&mut [F], &[u32], &[u8], &[F; 256], &[F], usize, usize, usize),
) -> usize {
    let mut acc = [F::ZERO; T];
    acc.copy_from_slice(&out[start..start + T]);
    for (&position, &byte) in positions.iter().zip(bytes) {
        let value = table[byte as usize];
        let first = position as usize * width + start;
        let row: &[F; T] = matrix[first..first + T].try_into().expect("a block of T columns");
        for j in 0..T {
            acc[j] = value.mul_add(row[j], acc[j]);
        }
    }
    out[keep_from..start + T].copy_from_slice(&acc[keep_from - start..]);
    start + T
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The AVX2+FMA bodies (where this CPU has them) and the baseline ones give the same bits:
    /// fused multiply-adds round once either way and the terms come in the same order.
    #[test]
    fn the_instruction_set_does_not_change_the_result() {
        if !fast_on_this_cpu() {
            // Both calls would run the baseline bodies: nothing to compare.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), b"skipped: this CPU has no AVX2+FMA\n");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (count, features) = (30, 784);
        let images: Vec<u8> = (0..count * features).map(|_| if rng.random::<f64>() < 0.2 { rng.random_range(1..=255u8) } else { 0 }).collect();
        let index = SparseImages::new(&images, features);
        let indices: Vec<u32> = (0..20).map(|_| rng.random_range(0..count as u32)).collect();
        for outputs in [100, 37, 5] {
            let w_t: Vec<f32> = (0..features * outputs).map(|_| rng.random::<f32>() - 0.5).collect();
            let bias: Vec<f32> = (0..outputs).map(|_| rng.random::<f32>()).collect();
            let (mut dispatched, mut baseline) = (vec![0.0f32; indices.len() * outputs], vec![0.0f32; indices.len() * outputs]);
            forward(&index, &indices, &w_t, Some(&bias), outputs, &mut dispatched);
            forward_body(&index, &indices, &w_t, Some(&bias), outputs, &mut baseline);
            assert!(dispatched.iter().zip(&baseline).all(|(a, b)| a.to_bits() == b.to_bits()), "forward, {outputs} outputs");

            let dz: Vec<f32> = (0..indices.len() * outputs).map(|_| rng.random::<f32>() - 0.5).collect();
            let mut scratch = ColumnScratch::default();
            let (mut dispatched, mut baseline) = (vec![0.0f32; features * outputs], vec![0.0f32; features * outputs]);
            weight_gradient(&index, &indices, &dz, outputs, &mut dispatched, &mut scratch);
            weight_gradient_body(features, &dz, outputs, &mut baseline, &scratch);
            assert!(dispatched.iter().zip(&baseline).all(|(a, b)| a.to_bits() == b.to_bits()), "weight gradient, {outputs} outputs");
        }
    }
}
