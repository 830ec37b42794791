//! The seed network on the real MNIST, on the CPU (CI fetches the data; elsewhere the test
//! skips with a message when MNIST is absent).

mod support;

use bntrain::backend::{Backend, SplitKind, StatsMode};
use bntrain::cpu::CpuBackend;
use bntrain::data::{self, DatasetKind};
use bntrain::model::{ModelConfig, ModelParams, TrainConfig};
use bntrain::train::{train_lockstep, Schedule};
use std::sync::Arc;

#[test]
fn seed_network_reaches_90_percent_in_2000_steps() {
    let Some(dir) = support::real_mnist() else { return };
    let data = Arc::new(data::load_dir(&dir, DatasetKind::Mnist).unwrap());
    let model = ModelConfig::seed(true);
    let train = TrainConfig::seed();
    let params = ModelParams::init(&model, train.seed, 1);
    let mut net = CpuBackend::<f32>::new(model, train.clone(), data.clone(), &params).unwrap();
    let mut nets: [&mut dyn Backend; 1] = [&mut net];
    train_lockstep(&mut nets, &train, data.train.count, 0, &Schedule::new(2000, 1000), None, &mut |_| {}).unwrap();

    // The source's training curves (and the PyTorch anchor's 0.916 at step 2000) normalize
    // the test set with its own batch statistics.
    let batch = net.evaluate(SplitKind::Test, StatsMode::Batch, None).unwrap().accuracy();
    // Population statistics lag here: after 2000 steps the EMA (decay 0.999) still holds
    // 0.999^2000 = 13.5% of its starting point (mean 0, variance 1), far from the layer-1
    // moments of unscaled N(0,1) weights. By step 10000 (0.005%) the two measures agree
    // (the 10000-step acceptance run is in the closing note).
    let population = net.evaluate(SplitKind::Test, StatsMode::Population, None).unwrap().accuracy();
    eprintln!("2000 steps: test accuracy {batch:.4} (test-set batch statistics), {population:.4} (population statistics)");
    assert!(batch >= 0.90, "test accuracy with batch statistics {batch} < 0.90");
    assert!(population >= 0.85, "test accuracy with population statistics {population} < 0.85");
}
