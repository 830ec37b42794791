//! Helpers shared by the CPU-side integration tests.
#![allow(dead_code)]

use bntrain::data::{Dataset, DatasetKind, Split};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

/// A random dataset with `features` pixels per image and ten classes.
pub fn tiny_dataset(train: usize, test: usize, features: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut split = |count: usize| Split {
        images: (0..count * features).map(|_| rng.random::<u8>()).collect(),
        labels: (0..count).map(|_| rng.random_range(0..10u8)).collect(),
        count,
        features,
        classes: 10,
    };
    Dataset { kind: DatasetKind::Mnist, train: split(train), test: split(test), source: PathBuf::from("synthetic") }
}

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
            eprintln!("skipped: real MNIST not found ({e})");
            None
        }
    }
}
