//! The three experiments of `reproduce`, generic over [`Backend`]:
//!
//! 1. [`run_comparison`]: BN and plain nets from identical initial weights, trained side by
//!    side on the same batches, test accuracy and the second layer's activation inputs at
//!    every evaluation (Figure 1);
//! 2. [`run_test_time`]: a BN net trained, saved, restored into a fresh backend and used one
//!    example at a time with batch and with population statistics;
//! 3. [`run_estimators`]: on the same trained weights, every way of estimating the population
//!    statistics, by test accuracy, over several seeds.

use super::population;
use super::{OpenBackend, Comparison, Curve, EstimatorRow, EstimatorStudy, OneByOne, ProbePoint, ProbeStats, ReproduceOptions, TestTime};
use crate::backend::{Backend, Probe, SplitKind, StatsMode, TimelineSpan};
use crate::data::Dataset;
use crate::device::Precision;
use crate::model::checkpoint::{Checkpoint, HistoryPoint, StoredPrecision, TrainProgress, TrainedOn};
use crate::model::{Averaging, ModelConfig, ModelParams, RunningStats, StatsEstimator, TrainConfig, VarianceKind};
use crate::progress::StepProgress;
use crate::train::{train_lockstep, Event, Outcome, Schedule};
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

/// The file the test-time net is saved to, inside the output directory.
pub const CHECKPOINT: &str = "bn_net.safetensors";

/// Units probed per network (Figure 1(b,c) shows the first five of the second layer).
pub const PROBE_NEURONS: usize = 5;

/// How many test images the source predicts one at a time.
pub const FIRST: usize = 100;

/// A BN model with the study's hidden widths, shaped for `data`.
pub fn model_config(opts: &ReproduceOptions, data: &Dataset, batch_norm: bool) -> ModelConfig {
    ModelConfig {
        inputs: data.train.features,
        hidden: opts.hidden.clone(),
        classes: data.train.classes,
        ..ModelConfig::seed(batch_norm)
    }
}

/// The seed's optimizer with `seed` and further estimators.
pub fn train_config(seed: u64, extra_estimators: Vec<StatsEstimator>) -> TrainConfig {
    TrainConfig { seed, extra_estimators, ..TrainConfig::seed() }
}

/// The running estimators maintained side by side (slot 0, the seed's, first).
pub fn running_estimators() -> Vec<StatsEstimator> {
    let mut out = Vec::new();
    for averaging in [Averaging::Ema { decay: 0.999 }, Averaging::Ema { decay: 0.99 }, Averaging::Cumulative] {
        for variance in [VarianceKind::Biased, VarianceKind::Unbiased] {
            out.push(StatsEstimator { averaging, variance });
        }
    }
    out
}

fn describe(e: &StatsEstimator) -> String {
    let avg = match e.averaging {
        Averaging::Ema { decay } => {
            let source = if decay == 0.999 { "the source; " } else { "" };
            format!("EMA, decay {decay} ({source}PyTorch momentum {})", fmt_g(1.0 - decay))
        }
        Averaging::Cumulative => "cumulative average of the batch statistics (PyTorch momentum=None)".to_string(),
    };
    let var = match e.variance {
        VarianceKind::Biased => "biased batch variance",
        VarianceKind::Unbiased => "unbiased m/(m−1) batch variance",
    };
    format!("{avg}, {var}")
}

fn fmt_g(v: f64) -> String {
    let s = format!("{v:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The probed layer: the second hidden layer, or the only one.
pub fn probe_for(model: &ModelConfig) -> Probe {
    let layer = 1.min(model.hidden.len() - 1);
    Probe { layer, neurons: PROBE_NEURONS.min(model.hidden[layer]) }
}

/// The progress of `len` training steps, with live loss and accuracy in its message (a bar,
/// or lines where stderr is no terminal); hidden unless asked for.
fn step_bar(show: bool, len: u64, prefix: &str) -> StepProgress {
    if show { StepProgress::new(prefix, len, 0) } else { StepProgress::hidden() }
}

fn live(name: &str, p: &HistoryPoint) -> String {
    format!("{name} loss {:.3} acc {:.4}", p.train_loss, p.test_accuracy)
}

/// Linear-interpolation percentile (numpy's default) of `values`, which it reorders: the
/// order statistics it needs are found by selection, O(n), not by a sort. The study takes
/// three percentiles of five units at each of its 1600 evaluation points: sorting the
/// 10000-value columns took 1.7 ms a point on the development machine (~2.7 s of a study
/// whose GPU steps take ~3.4 s), selecting 0.6–0.75 ms (docs/perf.md).
pub fn percentile(values: &mut [f32], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let pos = p / 100.0 * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let (_, &mut low, above) = values.select_nth_unstable_by(lo, f32::total_cmp);
    // The next order statistic is the least of those above the lo-th.
    let high = if frac > 0.0 { above.iter().copied().min_by(f32::total_cmp).unwrap_or(low) } else { low };
    low as f64 * (1.0 - frac) + high as f64 * frac
}

/// Mean and 15/50/85th percentiles of each probed unit; `probe` is `[examples, neurons]`.
pub fn summarize_probe(probe: &[f32], neurons: usize) -> Vec<ProbeStats> {
    (0..neurons)
        .map(|j| {
            let mut column: Vec<f32> = probe.iter().skip(j).step_by(neurons).copied().collect();
            let mean = column.iter().map(|&v| v as f64).sum::<f64>() / column.len().max(1) as f64;
            ProbeStats { mean, p15: percentile(&mut column, 15.0), p50: percentile(&mut column, 50.0), p85: percentile(&mut column, 85.0) }
        })
        .collect()
}

/// The comparison's probe summaries, one worker thread per network: at each of the 1600
/// evaluation points the percentiles take some 0.6 ms a network (docs/perf.md), which on
/// the training thread would delay queuing the next steps by more than a fused run of 50
/// seed steps may take on a GPU. Each worker keeps its network's points in the order sent.
struct ProbeSummaries<'scope> {
    senders: Vec<SyncSender<(u64, Vec<f32>)>>,
    workers: Vec<ScopedJoinHandle<'scope, Vec<ProbePoint>>>,
}

/// Points a worker may fall behind by before `submit` waits for it (each holds a probe of
/// 10000 × 5 values: 200 kB).
const SUMMARY_BACKLOG: usize = 32;

impl<'scope> ProbeSummaries<'scope> {
    /// Starts the workers for two networks' probes of `neurons` units.
    fn start<'env>(scope: &'scope Scope<'scope, 'env>, neurons: usize) -> Self {
        let (senders, workers) = (0..2)
            .map(|_| {
                let (sender, received) = sync_channel::<(u64, Vec<f32>)>(SUMMARY_BACKLOG);
                let worker = scope.spawn(move || {
                    received.into_iter().map(|(step, probe)| ProbePoint { step, neurons: summarize_probe(&probe, neurons) }).collect()
                });
                (sender, worker)
            })
            .unzip();
        Self { senders, workers }
    }

    /// Hands network `net`'s probe at `step` to its worker.
    fn submit(&self, net: usize, step: u64, probe: Vec<f32>) {
        // A worker ends only when its sender is dropped (in `finish`), or by a panic, which
        // `finish` passes on: the send cannot fail otherwise.
        let _ = self.senders[net].send((step, probe));
    }

    /// Each network's summaries, in the order submitted, once the workers are done.
    fn finish(self) -> Vec<Vec<ProbePoint>> {
        drop(self.senders);
        self.workers.into_iter().map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    }
}

/// Mean over units of the range of each unit's test-set mean over training; NaN where it
/// is not measured (fewer than two evaluation points, or no unit probed).
pub(crate) fn drift(curve: &Curve) -> f64 {
    let neurons = curve.probes.first().map_or(0, |p| p.neurons.len());
    if neurons == 0 || curve.probes.len() < 2 {
        return f64::NAN;
    }
    let range = |j: usize| {
        let values = curve.probes.iter().map(|p| p.neurons[j].mean);
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        hi - lo
    };
    (0..neurons).map(range).sum::<f64>() / neurons as f64
}

/// What [`run_comparison`] hands back: the results, the device that produced them, and
/// each network's device timeline where the backend recorded one ([`Backend::timeline`]).
pub struct ComparisonRun {
    pub result: Comparison,
    pub device: String,
    pub timeline: Vec<NetTimeline>,
}

/// A network's device timeline: its label ("BN", "plain") and its rows.
pub type NetTimeline = (String, Vec<TimelineSpan>);

/// Part 1: the BN and plain nets side by side (Figure 1).
pub fn run_comparison(
    opts: &ReproduceOptions,
    data: &Dataset,
    open: &mut OpenBackend<'_>,
    stop: Option<&AtomicBool>,
) -> Result<ComparisonRun> {
    let started = Instant::now();
    let model_bn = model_config(opts, data, true);
    let model_plain = model_config(opts, data, false);
    let train = train_config(opts.seed, Vec::new());
    // The same seed gives the same weight draws: only the bias / BN parameters differ.
    let init_bn = ModelParams::init(&model_bn, opts.seed, 1);
    let init_plain = ModelParams::init(&model_plain, opts.seed, 1);
    let probe = probe_for(&model_bn);
    let mut bn = open(model_bn, train.clone(), &init_bn)?;
    let mut plain = open(model_plain, train.clone(), &init_plain)?;

    // As the source (and PyTorch's anchor) measure their curves: BN normalizes the test set
    // with its own batch statistics, the whole test set taken as one batch.
    let schedule = Schedule { probe: Some(probe), eval_mode: StatsMode::Batch, ..Schedule::new(opts.steps_compare, opts.eval_every) };
    let bar = step_bar(opts.progress, opts.steps_compare, "BN vs plain");
    let mut curves = [Curve::default(), Curve::default()];
    let mut latest: [Option<HistoryPoint>; 2] = [None, None];
    let probes = std::thread::scope(|scope| {
        let summaries = ProbeSummaries::start(scope, probe.neurons);
        let mut nets: [&mut dyn Backend; 2] = [bn.as_mut(), plain.as_mut()];
        let outcome = train_lockstep(&mut nets, &train, data.train.count, 0, &schedule, stop, &mut |event| match event {
            Event::Stepped { step } => bar.set_position(step),
            Event::Evaluated { net, record } => {
                summaries.submit(net, record.point.step, std::mem::take(&mut record.probe));
                curves[net].history.push(record.point.clone());
                latest[net] = Some(record.point.clone());
                // Once both networks' points of a step are in (BN's comes first): a progress
                // line waiting for this step's message must not take plain's previous point.
                if let [Some(b), Some(p)] = &latest {
                    if b.step == p.step {
                        bar.set_message(format!("{} | {}", live("BN", b), live("plain", p)));
                    }
                }
            }
        });
        // The workers finish what they were sent either way; an error of the run comes first.
        let probes = summaries.finish();
        completed(outcome?).map(|()| probes)
    })?;
    for (curve, probes) in curves.iter_mut().zip(probes) {
        curve.probes = probes;
    }
    bar.finish();
    // After training: the name says how the steps ran (e.g. two networks a launch).
    let device = bn.device_name();
    let [bn_curve, plain_curve] = curves;
    let result = Comparison {
        steps: opts.steps_compare,
        eval_every: opts.eval_every,
        probe_layer: probe.layer,
        probe_neurons: probe.neurons,
        eval_mode: "batch".to_string(),
        drift_bn: drift(&bn_curve),
        drift_plain: drift(&plain_curve),
        bn: bn_curve,
        plain: plain_curve,
        wall_s: started.elapsed().as_secs_f64(),
    };
    // Outside the timed part. A network's timeline may hold events on the other's stream
    // (a paired launch's start): both finish their work before either is read.
    bn.synchronize()?;
    plain.synchronize()?;
    let mut timeline = Vec::new();
    for (label, net) in [("BN", &mut bn), ("plain", &mut plain)] {
        if let Some(rows) = net.timeline()? {
            timeline.push((label.to_string(), rows));
        }
    }
    Ok(ComparisonRun { result, device, timeline })
}

/// A trained BN network with every running estimator, ready for the estimator study.
pub struct TrainedNet {
    pub seed: u64,
    pub model: ModelConfig,
    pub params: ModelParams,
    pub backend: Box<dyn Backend>,
}

/// Trains a BN net for `opts.steps_bn` steps with all the running estimators side by side.
fn train_bn(
    opts: &ReproduceOptions,
    data: &Dataset,
    open: &mut OpenBackend<'_>,
    seed: u64,
    eval_every: u64,
    label: &str,
    stop: Option<&AtomicBool>,
) -> Result<(ModelConfig, TrainConfig, Box<dyn Backend>, Curve)> {
    let estimators = running_estimators();
    let model = model_config(opts, data, true);
    let train = train_config(seed, estimators[1..].to_vec());
    let init = ModelParams::init(&model, seed, estimators.len());
    let mut net = open(model.clone(), train.clone(), &init)?;
    let schedule = Schedule::new(opts.steps_bn, eval_every);
    let bar = step_bar(opts.progress, opts.steps_bn, label);
    let mut curve = Curve::default();
    let outcome = train_lockstep(&mut [net.as_mut()], &train, data.train.count, 0, &schedule, stop, &mut |event| match event {
        Event::Stepped { step } => bar.set_position(step),
        Event::Evaluated { record, .. } => {
            bar.set_message(live("BN", &record.point));
            curve.history.push(record.point.clone());
        }
    })?;
    completed(outcome)?;
    bar.finish();
    Ok((model, train, net, curve))
}

/// A study cannot resume: a stop request ends it with [`Error::Interrupted`].
fn completed(outcome: Outcome) -> Result<()> {
    match outcome {
        Outcome::Finished { .. } => Ok(()),
        Outcome::Interrupted { step, .. } => Err(Error::Interrupted { step }),
    }
}

/// Between the parts that do not train (evaluations, predictions), a stop request is seen
/// here; `step` is the step the part's network had reached.
pub fn check_stop(stop: Option<&AtomicBool>, step: u64) -> Result<()> {
    match stop {
        Some(s) if s.load(Ordering::Relaxed) => Err(Error::Interrupted { step }),
        _ => Ok(()),
    }
}

fn one_by_one(predictions: Vec<u8>, labels: &[u8], classes: usize) -> OneByOne {
    let count = predictions.len();
    let correct = predictions.iter().zip(labels).filter(|(p, l)| p == l).count();
    let mut class_histogram = vec![0u32; classes];
    for &p in &predictions {
        if let Some(h) = class_histogram.get_mut(p as usize) {
            *h += 1;
        }
    }
    // The most predicted class; the lowest on ties.
    let (majority_class, majority) = class_histogram.iter().enumerate().fold((0, 0), |best, (k, &n)| if n > best.1 { (k, n) } else { best });
    OneByOne {
        count,
        accuracy: correct as f64 / count.max(1) as f64,
        class_histogram,
        majority_class: majority_class as u8,
        majority_share: majority as f64 / count.max(1) as f64,
        predictions,
    }
}

/// Part 2: the BN net trained for `steps_bn` steps, saved, restored into a fresh backend and
/// used one example at a time. Returns the restored net for the estimator study.
pub fn run_test_time(
    opts: &ReproduceOptions,
    data: &Dataset,
    open: &mut OpenBackend<'_>,
    stop: Option<&AtomicBool>,
) -> Result<(TestTime, TrainedNet)> {
    let started = Instant::now();
    let (model, train, mut net, curve) = train_bn(opts, data, open, opts.seed, opts.eval_every, "BN (test time)", stop)?;
    let checkpoint = Checkpoint {
        model,
        train,
        params: net.params()?,
        velocity: net.velocity()?,
        progress: TrainProgress { step: opts.steps_bn, history: curve.history.clone(), ..TrainProgress::default() },
        precision: StoredPrecision::F32,
        trained_on: Some(TrainedOn { precision: Precision::F32, dataset: data.kind }),
    };
    let path = opts.out_dir.join(CHECKPOINT);
    checkpoint.save(&path)?;
    drop(net);

    // Restored in inference mode, in a backend that never trained.
    let restored = Checkpoint::load(&path)?;
    let mut net = open(restored.model.clone(), restored.train.clone(), &restored.params)?;
    let accuracy_population = net.evaluate(SplitKind::Test, StatsMode::Population, None)?.accuracy();
    let accuracy_test_batch = net.evaluate(SplitKind::Test, StatsMode::Batch, None)?.accuracy();
    let test = &data.test;
    let first = FIRST.min(test.count);
    let classes = restored.model.classes;
    let first_population = one_by_one(net.predict_each(SplitKind::Test, first, StatsMode::Population)?, &test.labels, classes);
    let first_batch = one_by_one(net.predict_each(SplitKind::Test, first, StatsMode::Batch)?, &test.labels, classes);
    // The longest part that does not train: 10000 one-example passes.
    check_stop(stop, opts.steps_bn)?;
    let all_batch = one_by_one(net.predict_each(SplitKind::Test, test.count, StatsMode::Batch)?, &test.labels, classes).accuracy;
    let result = TestTime {
        steps: opts.steps_bn,
        checkpoint: CHECKPOINT.to_string(),
        accuracy_before_save: curve.final_accuracy(),
        curve,
        accuracy_population,
        accuracy_test_batch,
        first_labels: test.labels[..first].to_vec(),
        first_population,
        first_batch,
        all_batch,
        all_count: test.count,
        ema_initial_weight: match restored.train.estimator.averaging {
            Averaging::Ema { decay } => decay.powf(opts.steps_bn as f64),
            Averaging::Cumulative => 0.0,
        },
        wall_s: started.elapsed().as_secs_f64(),
    };
    let trained = TrainedNet { seed: opts.seed, model: restored.model, params: restored.params, backend: net };
    Ok((result, trained))
}

/// Mean over BN units of |μ̂ − μ| and of |σ̂²/σ² − 1| against `exact`. A unit whose exact
/// variance is 0 (an input constant over the training set) has no relative error: it is left
/// out of the second mean, which is NaN where no unit is left.
fn errors(params: &ModelParams, slot: usize, exact: &[RunningStats]) -> (f64, f64) {
    let (mut mean_err, mut var_err, mut n_mean, mut n_var) = (0.0, 0.0, 0usize, 0usize);
    let layers = params.layers.iter().filter_map(|l| l.batch_norm.as_ref());
    for (bn, truth) in layers.zip(exact) {
        let est = &bn.running[slot];
        for j in 0..truth.mean.len() {
            mean_err += (est.mean[j] - truth.mean[j]).abs();
            n_mean += 1;
            if truth.var[j] != 0.0 {
                var_err += (est.var[j] / truth.var[j] - 1.0).abs();
                n_var += 1;
            }
        }
    }
    let var_rel = if n_var == 0 { f64::NAN } else { var_err / n_var as f64 };
    (mean_err / n_mean.max(1) as f64, var_rel)
}

/// Part 3: every population-statistics estimator on the same trained weights, over
/// `opts.seeds` seeds (`opts.seed`, `opts.seed + 1`, …; the first is the test-time net).
pub fn run_estimators(
    opts: &ReproduceOptions,
    data: &Dataset,
    open: &mut OpenBackend<'_>,
    first: TrainedNet,
    stop: Option<&AtomicBool>,
) -> Result<EstimatorStudy> {
    let started = Instant::now();
    let running = running_estimators();
    let mut rows: Vec<EstimatorRow> = running
        .iter()
        .map(|e| EstimatorRow { label: e.label(), description: describe(e), ..empty_row() })
        .collect();
    for (variance, what) in [(VarianceKind::Biased, "biased (÷N)"), (VarianceKind::Unbiased, "unbiased (÷(N−1))")] {
        let label = format!("exact-{}", if variance == VarianceKind::Biased { "biased" } else { "unbiased" });
        let description = format!("exact population moments after training, one f64 pass over the training set, {what}");
        rows.push(EstimatorRow { label, description, ..empty_row() });
    }
    let mut seeds = Vec::new();
    let mut errs = vec![(0.0, 0.0); rows.len()];
    let mut first = Some(first);
    for k in 0..opts.seeds as u64 {
        // Seeds name runs: past u64's end they go on from 0.
        let seed = opts.seed.wrapping_add(k);
        let mut net = match first.take() {
            Some(net) => net,
            None => {
                let label = format!("BN seed {seed}");
                let (model, _, mut backend, _) = train_bn(opts, data, open, seed, opts.steps_bn, &label, stop)?;
                let params = backend.params()?;
                TrainedNet { seed, model, params, backend }
            }
        };
        check_stop(stop, opts.steps_bn)?;
        seeds.push(net.seed);
        let (exact_biased, exact_unbiased) = population::exact_moments_both(&net.model, &net.params, &data.train);
        for (i, estimator) in running.iter().enumerate() {
            net.backend.set_params(&net.params.with_estimator(i))?;
            rows[i].accuracy.push(net.backend.evaluate(SplitKind::Test, StatsMode::Population, None)?.accuracy());
            let exact = if estimator.variance == VarianceKind::Biased { &exact_biased } else { &exact_unbiased };
            let (m, v) = errors(&net.params, i, exact);
            errs[i].0 += m;
            errs[i].1 += v;
        }
        for (offset, exact) in [&exact_biased, &exact_unbiased].into_iter().enumerate() {
            net.backend.set_params(&population::with_slot0(&net.params, exact))?;
            rows[running.len() + offset].accuracy.push(net.backend.evaluate(SplitKind::Test, StatsMode::Population, None)?.accuracy());
        }
        net.backend.set_params(&net.params)?;
    }
    let n = seeds.len() as f64;
    for (row, (m, v)) in rows.iter_mut().zip(errs) {
        let acc = &row.accuracy;
        row.mean = acc.iter().sum::<f64>() / n;
        row.std = (acc.iter().map(|a| (a - row.mean).powi(2)).sum::<f64>() / n).sqrt();
        row.min = acc.iter().copied().fold(f64::INFINITY, f64::min);
        row.max = acc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        row.mean_error = m / n;
        row.var_rel_error = v / n;
    }
    Ok(EstimatorStudy { steps: opts.steps_bn, seeds, rows, wall_s: started.elapsed().as_secs_f64() })
}

fn empty_row() -> EstimatorRow {
    EstimatorRow {
        label: String::new(),
        description: String::new(),
        accuracy: Vec::new(),
        mean: 0.0,
        std: 0.0,
        min: 0.0,
        max: 0.0,
        mean_error: 0.0,
        var_rel_error: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy's definition on sorted values: the reference the selection must equal exactly.
    fn sorted_percentile(values: &[f32], p: f64) -> f64 {
        let mut sorted = values.to_vec();
        sorted.sort_unstable_by(f32::total_cmp);
        let pos = p / 100.0 * (sorted.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let frac = pos - lo as f64;
        sorted[lo] as f64 * (1.0 - frac) + sorted[hi] as f64 * frac
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let mut v: Vec<f32> = (0..=10).rev().map(|i| i as f32).collect();
        assert_eq!(percentile(&mut v, 50.0), 5.0);
        assert!((percentile(&mut v, 15.0) - 1.5).abs() < 1e-12);
        assert!((percentile(&mut v, 85.0) - 8.5).abs() < 1e-12);
        assert!(percentile(&mut [], 50.0).is_nan());
        assert_eq!(percentile(&mut [7.0], 85.0), 7.0);
        // Selection gives exactly the sorted answer: any length, ties, signed zeros, any
        // earlier reordering of the same values, every percentile.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for n in [2usize, 3, 10, 11, 100, 1001, 10_000] {
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    [((state >> 40) % 7) as f32 - 3.0, -0.0, (state >> 40) as f32 / 1e5 - 80.0][(state % 3) as usize]
                })
                .collect();
            let mut reordered = values.clone();
            for p in [0.0, 15.0, 33.3, 50.0, 85.0, 99.9, 100.0] {
                assert_eq!(percentile(&mut reordered, p).to_bits(), sorted_percentile(&values, p).to_bits(), "n = {n}, p = {p}");
            }
        }
        let s = summarize_probe(&[1.0, 10.0, 2.0, 20.0, 3.0, 30.0], 2);
        assert_eq!(s[0].mean, 2.0);
        assert_eq!(s[1].p50, 20.0);
    }

    /// The workers hand back each network's summaries in the order its probes were sent,
    /// equal to summarizing them on the spot, and more points than their backlog holds pass.
    #[test]
    fn probe_summaries_on_workers_equal_summaries_made_in_place() {
        let neurons = 3;
        let probe = |net: usize, step: u64| -> Vec<f32> {
            (0..30).map(|i| ((i * 7 + step as usize * 13 + net * 5) % 11) as f32 - 4.5).collect()
        };
        let points = (SUMMARY_BACKLOG as u64 + 5) * 2;
        let summaries = std::thread::scope(|scope| {
            let summaries = ProbeSummaries::start(scope, neurons);
            for step in 1..=points {
                // Interleaved as train_lockstep reports them, with the plain net skipping some.
                summaries.submit(0, step, probe(0, step));
                if step % 3 != 0 {
                    summaries.submit(1, step, probe(1, step));
                }
            }
            summaries.finish()
        });
        assert_eq!(summaries.len(), 2);
        for (net, got) in summaries.iter().enumerate() {
            let want: Vec<ProbePoint> = (1..=points)
                .filter(|step| net == 0 || step % 3 != 0)
                .map(|step| ProbePoint { step, neurons: summarize_probe(&probe(net, step), neurons) })
                .collect();
            assert_eq!(got, &want, "network {net}");
        }
    }

    /// A unit whose exact variance is 0 is left out of the relative variance error, rather
    /// than making it infinite (or NaN where the estimate is 0 too).
    #[test]
    fn a_unit_of_zero_exact_variance_is_left_out_of_the_variance_error() {
        let model = ModelConfig { inputs: 3, hidden: vec![2], classes: 2, ..ModelConfig::seed(true) };
        let mut params = ModelParams::init(&model, 0, 1);
        let bn = params.layers[0].batch_norm.as_mut().expect("a BN layer");
        bn.running[0] = RunningStats { mean: vec![1.0, 2.0], var: vec![3.0, 0.5], batches: 1 };
        let exact = [RunningStats { mean: vec![0.5, 2.0], var: vec![2.0, 0.0], batches: 10 }];
        let (mean_err, var_err) = errors(&params, 0, &exact);
        assert_eq!(mean_err, 0.25, "both units count in the mean error");
        assert_eq!(var_err, 0.5, "only the first unit has a relative variance error");
        let none_left = [RunningStats { mean: vec![0.5, 2.0], var: vec![0.0, 0.0], batches: 10 }];
        assert!(errors(&params, 0, &none_left).1.is_nan(), "no unit left: not a number, not 0");
    }

    #[test]
    fn estimator_labels_are_distinct() {
        let labels: std::collections::HashSet<String> = running_estimators().iter().map(|e| e.label()).collect();
        assert_eq!(labels.len(), 6);
        assert_eq!(running_estimators()[0], StatsEstimator::SEED);
    }
}
