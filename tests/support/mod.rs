//! Helpers shared by the CPU-side integration tests.
#![allow(dead_code)]

// Skip notices go to stderr directly, past the test harness's capture, so a run shows them.
use std::io::Write as _;
use bntrain::data::DatasetKind;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

#[allow(unused_imports)] // not every test crate that includes this module uses it
pub use bntrain::bench::synthetic_dataset;

/// Uniform values in [lo, hi).
pub fn uniform(n: usize, lo: f64, hi: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| lo + (hi - lo) * rng.random::<f64>()).collect()
}

/// The real MNIST directory, when this machine has it (CI fetches it); None otherwise.
pub fn real_mnist() -> Option<PathBuf> {
    match bntrain::data::locate(None, DatasetKind::Mnist, false) {
        Ok(dir) => Some(dir),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "skipped: real MNIST not found ({e})");
            None
        }
    }
}
