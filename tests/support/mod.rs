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
            mnist_missing(&format!("real MNIST not found ({e})"));
            None
        }
    }
}

/// Says that a test skips for want of the real MNIST: on stderr, past the harness's
/// capture; a failure instead with `BNTRAIN_REQUIRE_MNIST=1` (CI, which fetches it first).
pub fn mnist_missing(why: &str) {
    if std::env::var("BNTRAIN_REQUIRE_MNIST").as_deref() == Ok("1") {
        panic!("BNTRAIN_REQUIRE_MNIST=1 but {why}");
    }
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
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

use bntrain::backend::{measure_point, Backend};
use bntrain::model::TrainConfig;
use bntrain::train::{batches_per_epoch, epoch_order, judge_point, train_lockstep, EvalRecord, Event, Schedule, MAX_RUN};

/// `train_lockstep`'s runs of steps and points on one network, each point measured at once
/// ([`measure_point`]) instead of queued: the reference for queued points.
pub fn points_measured_at_once(net: &mut dyn Backend, train: &TrainConfig, examples: usize, schedule: &Schedule) -> bntrain::Result<Vec<EvalRecord>> {
    let per_epoch = batches_per_epoch(examples, train.batch_size);
    let (every, until) = (schedule.eval_every, schedule.until_step);
    let (mut step, mut records) = (0, Vec::new());
    while step < until {
        let epoch = step / per_epoch;
        if step % per_epoch == 0 {
            net.set_epoch_order(&epoch_order(train.order, train.seed, epoch, examples))?;
        }
        let next_eval = (step / every + 1) * every;
        let run = next_eval.min((epoch + 1) * per_epoch).min(until).min(step + MAX_RUN) - step;
        net.train_steps((step % per_epoch) as usize, run as usize)?;
        step += run;
        if step % every == 0 || step == until {
            records.push(judge_point(step, measure_point(net, schedule.eval_mode, schedule.probe)?)?);
        }
    }
    Ok(records)
}

/// The records `train_lockstep` reports for each of `nets` (points queued by the backends).
pub fn points_queued(nets: &mut [&mut dyn Backend], train: &TrainConfig, examples: usize, schedule: &Schedule) -> bntrain::Result<Vec<Vec<EvalRecord>>> {
    let mut records = vec![Vec::new(); nets.len()];
    train_lockstep(nets, train, examples, 0, schedule, None, &mut |event| {
        if let Event::Evaluated { net, record } = event {
            records[net].push(record.clone());
        }
    })?;
    Ok(records)
}
