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

/// Trains two networks side by side with `train_lockstep` for `steps` steps and returns, per
/// network, the training and test loss at every evaluation point (every `every` steps).
pub fn lockstep_losses(
    a: &mut dyn bntrain::backend::Backend, b: &mut dyn bntrain::backend::Backend,
    train: &bntrain::model::TrainConfig, examples: usize, steps: u64, every: u64,
) -> [Vec<f64>; 2] {
    let schedule = bntrain::train::Schedule::new(steps, every);
    let mut losses: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut nets: [&mut dyn bntrain::backend::Backend; 2] = [a, b];
    bntrain::train::train_lockstep(&mut nets, train, examples, 0, &schedule, None, &mut |e| {
        if let bntrain::train::Event::Evaluated { net, record } = e {
            losses[net].push(record.point.train_loss);
            losses[net].push(record.point.test_loss);
        }
    })
    .unwrap();
    losses
}
