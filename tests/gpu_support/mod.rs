//! Helpers shared by the GPU tests: the skip-or-fail rule, synthetic data, poisoned device
//! buffers and the f32 → f64 bridge to the CPU reference.
#![allow(dead_code)]

// Skip notices go to stderr directly, past the test harness's capture, so a run shows them.
use std::io::Write as _;
use bntrain::cuda::{self, CudaError, Gpu};

use cudarc::driver::CudaSlice;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU, or None (after printing why) when this machine has no usable one. With
/// `BNTRAIN_REQUIRE_GPU=1` (the GPU host's check script) a missing GPU is a failure instead.
pub fn gpu() -> Option<Gpu> {
    let reason = if cuda::kernels_built() {
        match Gpu::open() {
            Ok(gpu) => return Some(gpu),
            Err(e) => e,
        }
    } else {
        CudaError::KernelsNotBuilt
    };
    if std::env::var("BNTRAIN_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("BNTRAIN_REQUIRE_GPU=1 but there is no usable GPU: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "skipped: no usable GPU ({reason})");
    None
}

#[allow(unused_imports)] // not every test crate that includes this module uses it
pub use bntrain::bench::synthetic_dataset;

/// Uniform f32 values in [lo, hi).
pub fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| lo + (hi - lo) * rng.random::<f32>()).collect()
}

/// The same values in f64, for the CPU reference.
pub fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Extra elements past every output, left poisoned: a write past the end shows up there.
pub const TAIL: usize = 37;

/// A device buffer of `len + TAIL` NaNs.
pub fn poisoned(gpu: &Gpu, len: usize) -> CudaSlice<f32> {
    gpu.stream().clone_htod(&vec![f32::NAN; len + TAIL]).unwrap()
}

/// A device copy of `host`.
pub fn upload<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, host: &[T]) -> CudaSlice<T> {
    gpu.stream().clone_htod(host).unwrap()
}

/// A host copy of a device buffer, once the queued work is done.
pub fn fetch<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, buf: &CudaSlice<T>) -> Vec<T> {
    let host = gpu.stream().clone_dtoh(buf).unwrap();
    gpu.synchronize().unwrap();
    host
}

/// The first `len` elements of a poisoned output, after checking that the tail is untouched.
pub fn read(gpu: &Gpu, what: &str, buf: &CudaSlice<f32>, len: usize) -> Vec<f32> {
    let host = fetch(gpu, buf);
    assert!(host[len..].iter().all(|v| v.is_nan()), "{what}: the kernel wrote past element {len}");
    host[..len].to_vec()
}

/// A tolerance whose absolute part scales with the reference's largest magnitude: for sums
/// in f32, whose rounding error grows with the size of the terms, not of the result.
pub fn scaled(reference: &[f64], atol_rel: f64, rtol: f64) -> bntrain::tolerance::Tolerance {
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    bntrain::tolerance::Tolerance::new(atol_rel * scale, rtol)
}

/// Random bytes.
pub fn random_u8(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random::<u8>()).collect()
}

/// Random values in 0..below.
pub fn random_below(n: usize, below: u32, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..below)).collect()
}
