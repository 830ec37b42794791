//! `bntrain bench`: microseconds per training step, the median of several timed runs after a
//! warm-up, on the first twelve batches of a real training set (the CPU backend's cost
//! depends on how many pixels are zero), on all of its batches (as training streams them),
//! or on uniform noise; and with `--points`, the study's evaluation points.

use crate::backend::{Backend, StatsMode};
use crate::data::{Dataset, DatasetKind, Split, CLASSES};
use crate::model::{ModelConfig, ModelParams, TrainConfig};
use crate::train;
use crate::Result;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

/// The two benchmark networks of the peers' anchors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchConfig {
    /// 784-100-100-10, BN, sigmoid, batch 60: the seed.
    Seed,
    /// 784-1024-1024-10, BN, sigmoid, batch 1024.
    Wide,
}

impl FromStr for BenchConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seed" => Ok(BenchConfig::Seed),
            "wide" => Ok(BenchConfig::Wide),
            _ => Err(format!("unknown bench config `{s}`: expected seed or wide")),
        }
    }
}

impl BenchConfig {
    pub fn configs(self, batch_norm: bool) -> (ModelConfig, TrainConfig) {
        let mut model = ModelConfig::seed(batch_norm);
        let mut train = TrainConfig::seed();
        if self == BenchConfig::Wide {
            model.hidden = vec![1024, 1024];
            train.batch_size = 1024;
        }
        (model, train)
    }
}

/// A dataset of random pixels (`features` per image) and labels of ten classes: for timing,
/// and for tests that need data of a given shape.
pub fn synthetic_dataset(train_count: usize, test_count: usize, features: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut split = |count: usize| Split {
        images: (0..count * features).map(|_| rng.random::<u8>()).collect(),
        labels: (0..count).map(|_| rng.random_range(0..CLASSES as u8)).collect(),
        count,
        features,
        classes: CLASSES,
    };
    Dataset { kind: DatasetKind::Mnist, train: split(train_count), test: split(test_count), source: "synthetic".into() }
}

/// Steps `bench --trace` times phase by phase (fewer where the kernel's record is full).
pub const TRACE_STEPS: usize = 15;

/// `train`'s timeline table (`BNTRAIN_TIMELINE=1`): a line per kind of interval.
pub fn timeline_table(spans: &[crate::backend::TimelineSpan]) -> String {
    let width = spans.iter().map(|s| s.what.chars().count()).max().unwrap_or(0).max(8);
    let mut out = format!("{:<width$}  {:>7}  {:>12}  {:>10}\n", "timeline", "count", "total µs", "median µs");
    for s in spans {
        out += &format!("{:<width$}  {:>7}  {:>12.1}  {:>10.2}\n", s.what, s.count, s.total_us, s.median_us);
    }
    out
}

/// `bench --trace`'s table: a line per phase, then their sum.
pub fn phase_table(phases: &[crate::backend::PhaseTiming]) -> String {
    let width = phases.iter().map(|p| p.phase.chars().count()).max().unwrap_or(0).max(5);
    let mut out = format!(
        "{:<width$}  {:>8}  {:>12}  {:>12}  {:>13}  {:>10}\n",
        "phase", "wall µs", "block work µs", "slowest µs", "slowest block", "barrier µs"
    );
    for p in phases {
        out += &format!(
            "{:<width$}  {:>8.2}  {:>12.2}  {:>12.2}  {:>13}  {:>10.2}\n",
            p.phase, p.wall_us, p.block_work_us, p.block_work_max_us, p.slowest_block, p.barrier_us
        );
    }
    let total: f64 = phases.iter().map(|p| p.wall_us + p.barrier_us).sum();
    out += &format!("{:<width$}  {total:>8.2}  (walls and barriers: one step, medians)\n", "step");
    out
}

/// What the benchmark trains on.
pub enum BenchData<'a> {
    /// The first twelve batches of this dataset's training split.
    Real(&'a Dataset),
    /// Every batch of this dataset's training split: one epoch, its order reused, as
    /// training streams them. Twelve batches of MNIST (0.56 MB) stay in a GPU's L2 from one
    /// step to the next; the whole set (47 MB) may not, and the study reads all of it.
    All(&'a Dataset),
    /// Uniform random pixels (every pixel non-zero with probability 255/256).
    Noise,
}

/// The result of one benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub config: BenchConfig,
    /// Whether the network has BN; with `--pair`, the first of the two (BN, beside the plain
    /// one).
    pub batch_norm: bool,
    /// Networks trained in lockstep: 1, or 2 for `--pair` (the BN and the plain network side
    /// by side, as `reproduce`'s comparison trains them); µs per step covers both.
    pub networks: usize,
    /// The layer widths, input to output: the configuration's on the data's image size
    /// (784-100-100-10 for the seed on MNIST).
    pub layers: String,
    pub device: String,
    /// The build's CUDA kernels (PTX target, nvcc), as `bntrain info` prints them.
    pub kernels: String,
    /// `mnist`, `fashion-mnist` or `noise`, and the fraction of non-zero pixels.
    pub data: String,
    pub nonzero_pixels: f64,
    pub batch_size: usize,
    /// Distinct batches the steps cycle through (twelve, or every batch with
    /// [`BenchData::All`]; fewer where the training split is smaller).
    pub batches: u64,
    pub us_per_step: f64,
    pub us_per_step_min: f64,
    pub us_per_step_max: f64,
    pub steps_per_second: f64,
    pub runs: usize,
    pub steps_per_run: u64,
    /// Each GEMM shape tuned in this process (`BNTRAIN_GEMM_TUNE=1`): the candidates' µs
    /// and the one kept. Empty without tuning.
    pub tuned_gemms: Vec<crate::cuda::gemm_tuning::TunedGemm>,
    /// With `trace`: a row per phase of the (first) network's step, from one more launch
    /// after the timed runs ([`Backend::phase_trace`]); None where its steps are not fused.
    pub phases: Option<Vec<crate::backend::PhaseTiming>>,
    /// With `points`: per network, µs per evaluation point as the study's comparison makes
    /// them ([`time_points`]), on `test_examples` test images.
    pub us_per_point: Option<Vec<f64>>,
    /// The test images an evaluation point covers: the whole test split with `points`, else
    /// the 1000 the networks are built with.
    pub test_examples: usize,
}

/// Evaluation points timed per network by [`time_points`], after [`WARM_POINTS`] untimed.
pub const TIMED_POINTS: usize = 21;
pub const WARM_POINTS: usize = 2;

/// The median µs of [`TIMED_POINTS`] evaluation points of `net`, each as the study's
/// comparison makes them (the test split with batch statistics, the probe of five units of
/// the second hidden layer) but begun and finished at once: latency, with nothing queued
/// behind it, where the study overlaps a point with the next run of steps.
pub fn time_points(net: &mut dyn Backend, model: &ModelConfig) -> Result<f64> {
    let probe = Some(crate::report::study::probe_for(model));
    let point = |net: &mut dyn Backend| -> Result<f64> {
        let t = Instant::now();
        train::evaluate_point(net, 0, StatsMode::Batch, probe)?;
        Ok(t.elapsed().as_secs_f64() * 1e6)
    };
    for _ in 0..WARM_POINTS {
        point(net)?;
    }
    let us = (0..TIMED_POINTS).map(|_| point(net)).collect::<Result<Vec<f64>>>()?;
    Ok(median(&us))
}

/// Times training steps of `nets` in lockstep (each run of steps queued on every network
/// before any is waited for, as [`train::train_lockstep`] does): `warmup` steps, a calibration
/// on warm steps, then `runs` runs of enough steps to last about `seconds_per_run` each; the median run gives µs per
/// step of all the networks together. `on_run` hears of each finished run (outside the
/// timed spans: a progress bar).
#[allow(clippy::too_many_arguments)]
pub fn time_steps(
    nets: &mut [&mut dyn Backend], train: &TrainConfig, train_examples: usize,
    warmup: u64, runs: usize, seconds_per_run: f64, on_run: &mut dyn FnMut(usize),
) -> Result<(Vec<f64>, u64)> {
    let per_epoch = train::batches_per_epoch(train_examples, train.batch_size);
    let order = train::epoch_order(train.order, train.seed, 0, train_examples);
    for net in nets.iter_mut() {
        net.set_epoch_order(&order)?;
    }
    let mut step = 0u64;
    // As training does: runs of steps to the end of the epoch (the order is reused).
    let mut run_steps = |nets: &mut [&mut dyn Backend], n: u64| -> Result<f64> {
        let t = Instant::now();
        let mut done = 0;
        while done < n {
            let batch = step % per_epoch;
            let run = (per_epoch - batch).min(n - done);
            train::queue_steps(nets, batch as usize, run as usize)?;
            step += run;
            done += run;
        }
        for net in nets.iter_mut() {
            net.synchronize()?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    run_steps(nets, warmup.max(1))?;
    // The run length from warm steps only (the warm-up pays for first launches, first-touch
    // allocations and cold caches): a span doubled until it is a tenth of a run, so that
    // one scheduler hiccup does not set it.
    let mut calibration = warmup.max(1);
    let per_step = loop {
        let span = run_steps(nets, calibration)?;
        if span >= seconds_per_run / 10.0 || calibration >= 100_000 {
            break span / calibration as f64;
        }
        calibration *= 2;
    };
    let steps_per_run = ((seconds_per_run / per_step.max(1e-9)) as u64).clamp(3, 100_000);
    let mut us = Vec::with_capacity(runs);
    for run in 0..runs.max(1) {
        us.push(run_steps(nets, steps_per_run)? * 1e6 / steps_per_run as f64);
        on_run(run + 1);
    }
    for net in nets.iter_mut() {
        net.take_step_stats()?;
    }
    Ok((us, steps_per_run))
}

/// Median of a non-empty sample.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 { f64::NAN } else if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// Builds a backend for a model, its training configuration, data and initial parameters.
pub type OpenBackend<'a> = dyn FnMut(ModelConfig, TrainConfig, Arc<Dataset>, &ModelParams) -> Result<Box<dyn Backend>> + 'a;

/// Which networks a benchmark trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchNets {
    /// One network, with BN or without.
    One { batch_norm: bool },
    /// The BN and the plain network in lockstep, on the same batches.
    Pair,
}

/// Builds the benchmark network(s) with `open` and times them; with `trace`, then times the
/// phases of the first network's steps too (up to [`TRACE_STEPS`] more steps); with
/// `points`, then each network's evaluation points on the whole test split
/// ([`time_points`]; the noise has 10 000 test images). `on_run` hears of each finished
/// timed run.
#[allow(clippy::too_many_arguments)]
pub fn run(
    config: BenchConfig, nets: BenchNets, data: BenchData<'_>, runs: usize, seconds_per_run: f64, trace: bool, points: bool,
    open: &mut OpenBackend<'_>, on_run: &mut dyn FnMut(usize),
) -> Result<BenchReport> {
    let batch_norm = nets != BenchNets::One { batch_norm: false };
    let (model, train) = config.configs(batch_norm);
    let examples = match &data {
        BenchData::All(dataset) => dataset.train.count,
        BenchData::Real(_) | BenchData::Noise => train.batch_size * 12,
    };
    // The steps read no test image; the points read them all.
    let test_examples = if points { usize::MAX } else { 1000 };
    let (data, name) = match data {
        BenchData::Real(dataset) | BenchData::All(dataset) => {
            let subset = Dataset {
                kind: dataset.kind,
                train: dataset.train.subset(examples),
                test: dataset.test.subset(test_examples),
                source: dataset.source.clone(),
            };
            (subset, dataset.kind.name().to_string())
        }
        BenchData::Noise => (synthetic_dataset(examples, test_examples.min(10_000), 784, 1), "noise".to_string()),
    };
    let nonzero_pixels = data.train.images.iter().filter(|&&p| p != 0).count() as f64 / data.train.images.len().max(1) as f64;
    let data = Arc::new(data);
    let mut opened = Vec::new();
    let mut models = vec![model];
    if nets == BenchNets::Pair {
        models.push(config.configs(false).0);
    }
    // The configuration's layers, on the data's image size and classes (MNIST's 784 and 10,
    // or another IDX dataset's given with --data).
    for model in &mut models {
        (model.inputs, model.classes) = (data.train.features, data.train.classes);
    }
    for model in &models {
        let params = ModelParams::init(model, train.seed, 1);
        opened.push(open(model.clone(), train.clone(), Arc::clone(&data), &params)?);
    }
    let (us, steps_per_run) = {
        let mut lockstep: Vec<&mut dyn Backend> = opened.iter_mut().map(|net| &mut **net as &mut dyn Backend).collect();
        time_steps(&mut lockstep, &train, data.train.count, 20, runs, seconds_per_run, on_run)?
    };
    let med = median(&us);
    // The traced steps start at batch 0 and must stay inside the benchmark's short epoch.
    let trace_steps = TRACE_STEPS.min(train::batches_per_epoch(data.train.count, train.batch_size) as usize);
    let phases = if trace { opened[0].phase_trace(0, trace_steps)? } else { None };
    let us_per_point = if points {
        Some(opened.iter_mut().zip(&models).map(|(net, model)| time_points(net.as_mut(), model)).collect::<Result<Vec<f64>>>()?)
    } else {
        None
    };
    Ok(BenchReport {
        config,
        batch_norm,
        networks: opened.len(),
        layers: models[0].widths().iter().map(usize::to_string).collect::<Vec<_>>().join("-"),
        device: opened[0].device_name(),
        kernels: crate::cuda::build_info(),
        data: name,
        nonzero_pixels,
        batch_size: train.batch_size,
        batches: train::batches_per_epoch(data.train.count, train.batch_size),
        us_per_step: med,
        us_per_step_min: us.iter().cloned().fold(f64::INFINITY, f64::min),
        us_per_step_max: us.iter().cloned().fold(0.0, f64::max),
        steps_per_second: 1e6 / med,
        runs: us.len(),
        steps_per_run,
        tuned_gemms: crate::cuda::gemm_tuning::tuned_gemms(),
        phases,
        us_per_point,
        test_examples: data.test.count,
    })
}

#[cfg(test)]
mod tests {
    /// The configuration's layers on the data's image size: a dataset of 20×20 images (400
    /// features) is timed, not refused for the seed's 784 inputs.
    #[test]
    fn a_dataset_of_another_image_size_is_timed() {
        use super::*;
        let data = synthetic_dataset(720, 50, 400, 3);
        let mut opened_inputs = Vec::new();
        let mut open = |model: crate::model::ModelConfig, train: crate::model::TrainConfig, data: Arc<Dataset>, params: &ModelParams| -> Result<Box<dyn Backend>> {
            opened_inputs.push(model.inputs);
            Ok(Box::new(crate::cpu::CpuBackend::<f32>::new(model, train, data, params)?))
        };
        let report = run(BenchConfig::Seed, BenchNets::Pair, BenchData::Real(&data), 1, 0.01, false, false, &mut open, &mut |_| {}).unwrap();
        assert!(report.us_per_step > 0.0);
        assert_eq!(opened_inputs, [400, 400]);
        assert_eq!(report.layers, "400-100-100-10");
    }

    #[test]
    fn phase_table_lists_each_phase_and_the_step() {
        let row = |phase: &str, wall_us: f64| crate::backend::PhaseTiming {
            phase: phase.into(), wall_us, block_work_us: 1.5, block_work_max_us: 2.25, slowest_block: 7, barrier_us: 0.5,
        };
        let table = super::phase_table(&[row("forward layer 0", 10.0), row("logits, softmax", 4.0)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[1].starts_with("forward layer 0") && lines[1].contains("10.00") && lines[1].contains("2.25") && lines[1].contains(" 7 "), "{table}");
        assert!(lines[3].starts_with("step") && lines[3].contains("15.00"), "{table}");
    }
}
