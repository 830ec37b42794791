//! `bntrain reproduce`: the whole batch-normalization study of Ioffe & Szegedy 2015, §4.1 and
//! Figure 1, as retold by R2RT (2016), end to end — training, figures, CSV/JSON and a report.
//!
//! - [`study`]: the three experiments (the side-by-side comparison, the test-time story, the
//!   population-statistics estimators), generic over [`Backend`];
//! - [`population`]: exact population moments recomputed after training, in f64 on the host;
//! - [`figures`]: Figure 1(a,b,c) and the estimator plot, as PNG and SVG (plotters);
//! - [`write`]: `curves.csv`, `probes.csv`, `estimators.csv`, `metrics.json`, `report.md`;
//! - [`reference`]: the source's and PyTorch's numbers, cited.
//!
//! Everything the run measured lives in one [`ReproduceSummary`]: `metrics.json` is its
//! serialization and `report.md` is written from it, so the two always agree.

pub mod figures;
pub mod population;
pub mod reference;
pub mod study;
pub mod write;

use crate::backend::Backend;
use crate::data::Dataset;
use crate::model::checkpoint::HistoryPoint;
use crate::model::{ModelConfig, ModelParams, TrainConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use thiserror::Error;

pub use reference::References;

/// Builds a backend (CPU or CUDA, the caller's choice) for a model, a training configuration
/// and initial parameters: `reproduce` calls it for every network it trains or restores.
pub type OpenBackend<'a> = dyn FnMut(ModelConfig, TrainConfig, &ModelParams) -> crate::Result<Box<dyn Backend>> + 'a;

/// What can go wrong writing the report (training errors are the library's own).
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("cannot draw {path}: {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error("the embedded font does not load: {0}")]
    Font(String),
    #[error("invalid reproduce options: {0}")]
    Options(String),
    #[error("another `bntrain reproduce` is writing into {}: wait for it to end, or choose another --name", .0.display())]
    Busy(PathBuf),
}

/// What `reproduce` runs and where it writes; recorded in `metrics.json` without the two
/// fields that say where and how, not what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReproduceOptions {
    /// Output directory, conventionally `runs/<name>`; created if missing.
    #[serde(skip)]
    pub out_dir: PathBuf,
    /// Steps of the side-by-side BN / plain comparison (Figure 1).
    pub steps_compare: u64,
    /// Steps of the BN net that is saved, restored and studied at test time.
    pub steps_bn: u64,
    /// Evaluate on the test set every this many steps.
    pub eval_every: u64,
    /// Seeds of the estimator study (seed, seed+1, …); the first reuses the test-time net.
    pub seeds: u32,
    /// Initial weights and batch order of every run.
    pub seed: u64,
    /// Hidden layer widths (the seed: 100, 100).
    pub hidden: Vec<usize>,
    /// A small run for tests: recorded in the report, nothing else changes behavior.
    pub quick: bool,
    /// Progress bars on stderr (hidden otherwise).
    #[serde(skip)]
    pub progress: bool,
}

impl ReproduceOptions {
    /// The seed study: 40000 steps side by side, 10000 steps of BN, test accuracy every 50
    /// steps, one seed for the estimator study, 784-100-100-10.
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        ReproduceOptions {
            out_dir: out_dir.into(),
            steps_compare: 40_000,
            steps_bn: 10_000,
            eval_every: 50,
            seeds: 1,
            seed: 0,
            hidden: ModelConfig::seed(true).hidden,
            quick: false,
            progress: false,
        }
    }

    /// `--quick`: 1000 steps side by side, 500 steps of BN, evaluation every 50 steps, two
    /// seeds of the estimator study. Seconds on a CPU.
    pub fn quick(out_dir: impl Into<PathBuf>) -> Self {
        ReproduceOptions { steps_compare: 1000, steps_bn: 500, seeds: 2, quick: true, ..Self::new(out_dir) }
    }

    fn validate(&self) -> Result<(), ReportError> {
        let bad = |m: &str| Err(ReportError::Options(m.to_string()));
        if self.steps_compare == 0 || self.steps_bn == 0 {
            return bad("both runs need at least one step");
        }
        if self.eval_every == 0 {
            return bad("the evaluation interval must be at least 1 step");
        }
        if self.seeds == 0 {
            return bad("the estimator study needs at least one seed");
        }
        if self.hidden.is_empty() {
            return bad("batch normalization needs at least one hidden layer");
        }
        Ok(())
    }
}

/// Distribution of one probed unit's activation input over the test set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeStats {
    pub mean: f64,
    pub p15: f64,
    pub p50: f64,
    pub p85: f64,
}

/// The probed units at one evaluation point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbePoint {
    pub step: u64,
    pub neurons: Vec<ProbeStats>,
}

/// One network's evaluation history and probes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub history: Vec<HistoryPoint>,
    pub probes: Vec<ProbePoint>,
}

impl Curve {
    /// Test accuracy at the last evaluation at or before `step`.
    pub fn accuracy_at(&self, step: u64) -> Option<(u64, f64)> {
        self.history.iter().rev().find(|p| p.step <= step).map(|p| (p.step, p.test_accuracy))
    }
    pub fn final_accuracy(&self) -> f64 {
        self.history.last().map_or(f64::NAN, |p| p.test_accuracy)
    }
}

/// Part 1: BN and plain nets from the same initial weights, trained on the same batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub steps: u64,
    pub eval_every: u64,
    /// 0-based hidden layer whose activation inputs are probed (1: the second layer).
    pub probe_layer: usize,
    pub probe_neurons: usize,
    /// How BN normalized the test set at evaluation points: `batch` (the whole test set's
    /// statistics, as the source and PyTorch's anchor measure their curves) or `population`.
    pub eval_mode: String,
    pub bn: Curve,
    pub plain: Curve,
    /// How far the probed inputs wander: per net, the mean over the probed units of the
    /// range (max − min) of their test-set mean over training.
    pub drift_bn: f64,
    pub drift_plain: f64,
    pub wall_s: f64,
}

/// One-by-one predictions (batch of one) of the first `count` examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneByOne {
    pub count: usize,
    pub accuracy: f64,
    /// How often each class was predicted.
    pub class_histogram: Vec<u32>,
    /// The most predicted class and its share of the predictions.
    pub majority_class: u8,
    pub majority_share: f64,
    pub predictions: Vec<u8>,
}

/// Part 2: the BN net trained, saved, restored and used at test time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestTime {
    pub steps: u64,
    pub checkpoint: String,
    pub curve: Curve,
    /// Test accuracy (population statistics) before saving and after restoring.
    pub accuracy_before_save: f64,
    pub accuracy_population: f64,
    /// Test accuracy with the whole test set's batch statistics (one batch of 10000).
    pub accuracy_test_batch: f64,
    /// The first 100 test images, one at a time.
    pub first_population: OneByOne,
    pub first_batch: OneByOne,
    /// The whole test set one at a time with batch statistics (with population statistics
    /// one-by-one equals [`TestTime::accuracy_population`]: examples do not interact).
    pub all_batch: f64,
    pub all_count: usize,
    /// The EMA's remaining weight on its initial values (mean 0, variance 1) after
    /// `steps` steps: decay^steps.
    pub ema_initial_weight: f64,
    pub wall_s: f64,
}

/// One population-statistics estimator across the seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EstimatorRow {
    /// Short label, e.g. `ema0.999-biased`, `exact-unbiased`.
    pub label: String,
    pub description: String,
    /// Test accuracy per seed, in the order of [`EstimatorStudy::seeds`].
    pub accuracy: Vec<f64>,
    pub mean: f64,
    /// Population standard deviation over seeds (0 for one seed).
    pub std: f64,
    pub min: f64,
    pub max: f64,
    /// Mean over seeds of the mean over BN units of |μ̂ − μ_exact| and |σ̂²/σ²_exact − 1|,
    /// against the exact moments of the same variance kind.
    pub mean_error: f64,
    pub var_rel_error: f64,
}

/// Part 3: estimators of the population statistics on the same trained weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EstimatorStudy {
    pub steps: u64,
    pub seeds: Vec<u64>,
    pub rows: Vec<EstimatorRow>,
    pub wall_s: f64,
}

impl EstimatorStudy {
    pub fn row(&self, label: &str) -> Option<&EstimatorRow> {
        self.rows.iter().find(|r| r.label == label)
    }
}

/// Wall-clock seconds of each part and of the whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub comparison_s: f64,
    pub test_time_s: f64,
    pub estimators_s: f64,
    pub outputs_s: f64,
    pub total_s: f64,
}

/// Everything one `reproduce` run measured; `metrics.json` is this, serialized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReproduceSummary {
    pub device: String,
    pub dataset: String,
    pub dataset_source: String,
    pub train_examples: usize,
    pub test_examples: usize,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub options: ReproduceOptions,
    pub comparison: Comparison,
    pub test_time: TestTime,
    pub estimators: EstimatorStudy,
    pub references: References,
    pub timings: Timings,
    /// Files written, relative to the output directory.
    pub files: Vec<String>,
}

impl ReproduceSummary {
    /// The terminal summary: the headline numbers beside the source's and PyTorch's.
    pub fn table(&self) -> String {
        let r = &self.references;
        let c = &self.comparison;
        let t = &self.test_time;
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("bntrain reproduce — {} on {} ({}), {:.1} s", self.model, self.dataset, self.device, self.timings.total_s));
        line(format!("{:<48} {:>9} {:>9} {:>9}", "", "bntrain", "source", "PyTorch"));
        let na = "—".to_string();
        let f = |v: f64| format!("{v:.4}");
        let mut row = |label: String, ours: String, src: String, torch: String| {
            line(format!("{label:<48} {ours:>9} {src:>9} {torch:>9}"));
        };
        if let (Some((s, bn)), Some((_, plain))) = (c.bn.accuracy_at(10_000), c.plain.accuracy_at(10_000)) {
            row(format!("BN / plain test accuracy at step {s}"), format!("{}/{}", f2(bn), f2(plain)), na.clone(), format!("{}/{}", f2(r.pytorch_bn_10000), f2(r.pytorch_plain_10000)));
        }
        let (bn_end, plain_end) = (c.bn.final_accuracy(), c.plain.final_accuracy());
        if c.bn.accuracy_at(10_000).map(|x| x.0) != Some(c.steps) {
            row(format!("BN / plain test accuracy at step {}", c.steps), format!("{}/{}", f2(bn_end), f2(plain_end)), na.clone(), format!("{}/{}", f2(r.pytorch_bn_40000), f2(r.pytorch_plain_40000)));
        }
        row(format!("restored BN net after {} steps (population)", t.steps), f(t.accuracy_population), f(r.source_final_accuracy_10000), f(r.pytorch_bn_10000));
        row(format!("one-by-one, first {}, population stats", t.first_population.count), f(t.first_population.accuracy), f(r.source_one_by_one_population), f(r.pytorch_one_by_one_population));
        row(format!("one-by-one, first {}, batch stats", t.first_batch.count), f(t.first_batch.accuracy), f(r.source_one_by_one_batch), f(r.pytorch_one_by_one_batch));
        row(format!("  batch stats: share predicted as \"{}\"", t.first_batch.majority_class), f(t.first_batch.majority_share), f(1.0), f(1.0));
        row(format!("one-by-one, all {}, batch stats", t.all_count), f(t.all_batch), na.clone(), na.clone());
        line(String::new());
        line(format!("population statistics, test accuracy over {} seed(s) after {} steps:", self.estimators.seeds.len(), self.estimators.steps));
        line(format!("  {:<22} {:>8} {:>8} {:>8} {:>8}", "estimator", "mean", "std", "min", "max"));
        for e in &self.estimators.rows {
            line(format!("  {:<22} {:>8.4} {:>8.4} {:>8.4} {:>8.4}", e.label, e.mean, e.std, e.min, e.max));
        }
        out
    }
}

fn f2(v: f64) -> String {
    format!("{v:.4}")
}

/// Where [`reproduce`] builds its outputs before they move into `out_dir`: the sibling
/// `<name>.partial`.
pub fn partial_dir(out_dir: &Path) -> PathBuf {
    let name = out_dir.file_name().map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
    out_dir.with_file_name(format!("{name}.partial"))
}

/// Runs the whole study and writes every output into `opts.out_dir`.
///
/// The outputs are built in [`partial_dir`] and moved into `opts.out_dir` once all are
/// written, so that a study that fails or is interrupted leaves an earlier run's outputs
/// whole, and its own in a directory that says it is partial.
///
/// `open` builds a backend (CPU or CUDA, the caller's choice) for a model, a training
/// configuration and initial parameters; it is called for every network the study trains or
/// restores. A request on `stop` ends the study at the next step boundary, or between its
/// parts, with [`crate::Error::Interrupted`]; what it wrote stays in [`partial_dir`].
///
/// Another study into the same directory, in this process or another, is refused while this
/// one runs ([`ReportError::Busy`]): it would delete this one's partial outputs.
pub fn reproduce(
    opts: &ReproduceOptions,
    data: Arc<Dataset>,
    open: &mut OpenBackend<'_>,
    stop: Option<&AtomicBool>,
) -> crate::Result<ReproduceSummary> {
    opts.validate()?;
    // Whether the outputs can move in is found out now, not after the study: a file where
    // the directory should be, a directory that takes no files.
    create_dir(&opts.out_dir)?;
    let _lock = lock_out_dir(&opts.out_dir)?;
    let partial = partial_dir(&opts.out_dir);
    // What an earlier interrupted study left is partial by its name: it goes.
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| crate::Error::io(format!("cannot remove {}", partial.display()), e))?;
    }
    create_dir(&partial)?;
    let probe = ".bntrain-move-probe";
    let probed = std::fs::write(partial.join(probe), b"")
        .and_then(|()| move_file(&partial.join(probe), &opts.out_dir.join(probe)))
        .and_then(|()| std::fs::remove_file(opts.out_dir.join(probe)));
    if let Err(e) = probed {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(crate::Error::io(format!("cannot move outputs into {}", opts.out_dir.display()), e));
    }
    let building = ReproduceOptions { out_dir: partial.clone(), ..opts.clone() };
    let summary = build_outputs(&building, data, open, stop)?;
    move_outputs(&partial, &opts.out_dir, &summary.files)?;
    Ok(summary)
}

/// Moves `files` from `from` into `to` (same-named files replaced, others left alone), then
/// removes `from`. A target that is a directory is found before anything moves; a move that
/// fails midway names what had moved.
fn move_outputs(from: &Path, to: &Path, files: &[String]) -> crate::Result<()> {
    if let Some(name) = files.iter().find(|name| to.join(name).is_dir()) {
        let why = std::io::Error::other("a directory has that name");
        return Err(crate::Error::io(format!("cannot move {name} into {} (the outputs stay in {})", to.display(), from.display()), why));
    }
    for (moved, name) in files.iter().enumerate() {
        let (source, target) = (from.join(name), to.join(name));
        move_file(&source, &target).map_err(|e| {
            let context = format!("cannot move {} to {} after moving {} of {} outputs", source.display(), target.display(), moved, files.len());
            crate::Error::io(context, e)
        })?;
    }
    std::fs::remove_dir(from).map_err(|e| crate::Error::io(format!("cannot remove {} (it should be empty)", from.display()), e))
}

/// A rename, or a copy and a removal where `to` is on another file system (an output
/// directory that is a link to one).
fn move_file(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
            crate::atomic_file::write_atomically(to, &std::fs::read(from)?)?;
            std::fs::remove_file(from)
        }
        done => done,
    }
}

/// [`reproduce`]'s study, with every output written into `opts.out_dir`.
fn build_outputs(
    opts: &ReproduceOptions,
    data: Arc<Dataset>,
    open: &mut OpenBackend<'_>,
    stop: Option<&AtomicBool>,
) -> crate::Result<ReproduceSummary> {
    let started = std::time::Instant::now();
    figures::register_fonts()?;

    let comparison = study::run_comparison(opts, &data, open, stop)?;
    let (test_time, first_seed) = study::run_test_time(opts, &data, open, stop)?;
    let estimators = study::run_estimators(opts, &data, open, first_seed, stop)?;

    let mut summary = ReproduceSummary {
        device: comparison.device.clone(),
        dataset: data.kind.name().to_string(),
        dataset_source: data.source.display().to_string(),
        train_examples: data.train.count,
        test_examples: data.test.count,
        model: study::model_config(opts, &data, true),
        train: study::train_config(opts.seed, Vec::new()),
        options: opts.clone(),
        timings: Timings {
            comparison_s: comparison.result.wall_s,
            test_time_s: test_time.wall_s,
            estimators_s: estimators.wall_s,
            ..Timings::default()
        },
        comparison: comparison.result,
        test_time,
        estimators,
        references: References::default(),
        files: Vec::new(),
    };
    let outputs_started = std::time::Instant::now();
    let mut files = figures::draw_all(&summary, &opts.out_dir)?;
    files.extend(write::write_tables(&summary, &opts.out_dir)?);
    files.insert(0, summary.test_time.checkpoint.clone());
    files.push(write::METRICS_JSON.to_string());
    files.push(write::REPORT_MD.to_string());
    summary.files = files;
    summary.timings.outputs_s = outputs_started.elapsed().as_secs_f64();
    summary.timings.total_s = started.elapsed().as_secs_f64();
    write::write_json(&summary, &opts.out_dir)?;
    write::write_report(&summary, &opts.out_dir)?;
    Ok(summary)
}

/// Redraws every figure and rewrites the tables and `report.md` of a finished run from its
/// `metrics.json` (after a change to the figures or the report, without training again).
pub fn rerender(out_dir: &Path) -> crate::Result<ReproduceSummary> {
    let path = out_dir.join(write::METRICS_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(format!("cannot read {}", path.display()), e))?;
    let summary: ReproduceSummary = serde_json::from_str(&text)
        .map_err(|e| ReportError::Write { path: path.clone(), reason: format!("does not parse as a reproduce summary: {e}") })?;
    figures::draw_all(&summary, out_dir)?;
    write::write_tables(&summary, out_dir)?;
    write::write_report(&summary, out_dir)?;
    Ok(summary)
}

/// Holds an exclusive lock on the output directory until the returned handle drops, or the
/// process ends however it ends (no stale lock to clear by hand). Where the file system
/// takes no lock on a directory, the study runs without one.
fn lock_out_dir(dir: &Path) -> crate::Result<Option<std::fs::File>> {
    let Ok(handle) = std::fs::File::open(dir) else { return Ok(None) };
    match handle.try_lock() {
        Ok(()) => Ok(Some(handle)),
        Err(std::fs::TryLockError::WouldBlock) => Err(ReportError::Busy(dir.to_path_buf()).into()),
        Err(std::fs::TryLockError::Error(_)) => Ok(None),
    }
}

fn create_dir(dir: &Path) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(format!("cannot create {}", dir.display()), e))
}
