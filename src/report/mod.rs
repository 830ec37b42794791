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
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
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

    /// Everything about the study that its data does not decide, the hidden layers among it:
    /// checkable before the data is loaded, or downloaded.
    pub fn validate(&self) -> crate::Result<()> {
        self.validate_schedule()?;
        ModelConfig { hidden: self.hidden.clone(), ..ModelConfig::seed(true) }.validate_layers()?;
        Ok(())
    }

    fn validate_schedule(&self) -> Result<(), ReportError> {
        let bad = |m: &str| Err(ReportError::Options(m.to_string()));
        if self.steps_compare == 0 || self.steps_bn == 0 {
            return bad("both runs need at least one step");
        }
        if self.steps_compare.max(self.steps_bn) > crate::model::config::MAX_STEPS {
            return bad("a run may take at most 2^48 steps");
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

/// serde_json writes a non-finite f64 as `null`: read `null` back as NaN, so that a summary
/// that measured one (a unit's variance error over no units, the probe of an empty test set)
/// still rerenders, its report saying `n/a` there.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// [`nan_if_null`] for each number of a list.
fn nan_if_null_each<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

/// Distribution of one probed unit's activation input over the test set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeStats {
    #[serde(deserialize_with = "nan_if_null")]
    pub mean: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p15: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p50: f64,
    #[serde(deserialize_with = "nan_if_null")]
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
    #[serde(deserialize_with = "nan_if_null")]
    pub drift_bn: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub drift_plain: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_s: f64,
}

impl Comparison {
    /// BN's lead over plain in test accuracy at each evaluation both made: (step, BN − plain).
    pub fn lead(&self) -> Vec<(u64, f64)> {
        self.bn.history.iter().zip(&self.plain.history).map(|(b, p)| (b.step, b.test_accuracy - p.test_accuracy)).collect()
    }

    /// The step from which BN is above plain at every evaluation to the end: the first
    /// evaluation's where it always is; None where it is not above at the last.
    pub fn bn_ahead_from(&self) -> Option<u64> {
        let lead = self.lead();
        let from = lead.iter().rposition(|&(_, d)| d.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)).map_or(0, |last_not_ahead| last_not_ahead + 1);
        lead.get(from).map(|&(step, _)| step)
    }
}

/// One-by-one predictions (batch of one) of the first `count` examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OneByOne {
    pub count: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub accuracy: f64,
    /// How often each class was predicted.
    pub class_histogram: Vec<u32>,
    /// The most predicted class and its share of the predictions.
    pub majority_class: u8,
    #[serde(deserialize_with = "nan_if_null")]
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
    #[serde(deserialize_with = "nan_if_null")]
    pub accuracy_before_save: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub accuracy_population: f64,
    /// Test accuracy with the whole test set's batch statistics (one batch of 10000).
    #[serde(deserialize_with = "nan_if_null")]
    pub accuracy_test_batch: f64,
    /// The first 100 test images, one at a time.
    pub first_population: OneByOne,
    /// Their labels (empty in a summary written before they were kept).
    #[serde(default)]
    pub first_labels: Vec<u8>,
    pub first_batch: OneByOne,
    /// The whole test set one at a time with batch statistics (with population statistics
    /// one-by-one equals [`TestTime::accuracy_population`]: examples do not interact).
    #[serde(deserialize_with = "nan_if_null")]
    pub all_batch: f64,
    pub all_count: usize,
    /// The EMA's remaining weight on its initial values (mean 0, variance 1) after
    /// `steps` steps: decay^steps.
    #[serde(deserialize_with = "nan_if_null")]
    pub ema_initial_weight: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_s: f64,
}

/// One population-statistics estimator across the seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EstimatorRow {
    /// Short label, e.g. `ema0.999-biased`, `exact-unbiased`.
    pub label: String,
    pub description: String,
    /// Test accuracy per seed, in the order of [`EstimatorStudy::seeds`].
    #[serde(deserialize_with = "nan_if_null_each")]
    pub accuracy: Vec<f64>,
    #[serde(deserialize_with = "nan_if_null")]
    pub mean: f64,
    /// Population standard deviation over seeds (0 for one seed).
    #[serde(deserialize_with = "nan_if_null")]
    pub std: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub min: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub max: f64,
    /// Mean over seeds of the mean over BN units of |μ̂ − μ_exact| and |σ̂²/σ²_exact − 1|,
    /// against the exact moments of the same variance kind (the second over the units whose
    /// exact variance is not 0; NaN where there are none).
    #[serde(deserialize_with = "nan_if_null")]
    pub mean_error: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub var_rel_error: f64,
}

/// Part 3: estimators of the population statistics on the same trained weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EstimatorStudy {
    pub steps: u64,
    pub seeds: Vec<u64>,
    pub rows: Vec<EstimatorRow>,
    #[serde(deserialize_with = "nan_if_null")]
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
    #[serde(deserialize_with = "nan_if_null")]
    pub comparison_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub test_time_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub estimators_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub outputs_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
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
    /// The comparison's device timeline per network (`BNTRAIN_TIMELINE=1` on CUDA; else
    /// empty): printed and in `reproduce --json`, not in metrics.json.
    #[serde(skip)]
    pub comparison_timeline: Vec<study::NetTimeline>,
}

impl ReproduceSummary {
    /// Are the references (the source's and PyTorch's) measurements of this setup: the seed
    /// network, 784-100-100-10, on MNIST's 60000 / 10000 examples? Elsewhere they compare
    /// nothing, and neither the figures nor the tables show them.
    pub fn anchors_apply(&self) -> bool {
        self.dataset == "mnist" && self.model.hidden == [100, 100] && self.train_examples == 60_000 && self.test_examples == 10_000
    }

    /// Why the references are left out of this run's tables, once; None where they apply.
    pub fn anchors_left_out(&self) -> Option<String> {
        (!self.anchors_apply()).then(|| {
            format!(
                "the references (the source's and PyTorch's) are for 784-100-100-10 on MNIST (60000 / 10000 examples); this run trained {} on {} ({} / {}), so they are left out (—)",
                self.model.widths().iter().map(|w| w.to_string()).collect::<Vec<_>>().join("-"), self.dataset, self.train_examples, self.test_examples
            )
        })
    }

    /// The terminal summary (within 80 columns): the headline numbers beside the source's and PyTorch's, each
    /// reference shown only where it measured the same setup at the row's step.
    pub fn table(&self) -> String {
        use write::fmt4 as f;
        let r = &self.references;
        let c = &self.comparison;
        let t = &self.test_time;
        let anchors = self.anchors_apply();
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("bntrain reproduce — {} on {} ({}), {:.1} s", self.model, self.dataset, self.device, self.timings.total_s));
        // Within 80 columns: a label, then three columns of 9 (`0.0000`, a class and share).
        line(format!("{:<TABLE_LABEL$} {:>9} {:>9} {:>9}", "", "bntrain", "source", "PyTorch"));
        let na = "—".to_string();
        let cell = |v: Option<f64>| v.map_or_else(|| na.clone(), f);
        let torch_at = |step: u64, run_steps: u64| r.pytorch_at(step, run_steps).filter(|_| anchors);
        let reference = |v: f64| Some(v).filter(|_| anchors && r.trained_long_enough_for_references(t.steps));
        let mut row = |label: String, ours: String, src: String, torch: String| {
            line(format!("{label:<TABLE_LABEL$} {ours:>9} {src:>9} {torch:>9}"));
        };
        let at_10000 = c.bn.accuracy_at(10_000).zip(c.plain.accuracy_at(10_000)).map(|((s, bn), (_, plain))| (s, bn, plain));
        let end = (c.steps, c.bn.final_accuracy(), c.plain.final_accuracy());
        let rows = at_10000.into_iter().chain((at_10000.map(|x| x.0) != Some(c.steps)).then_some(end));
        for (step, bn, plain) in rows {
            let torch = torch_at(step, c.steps);
            row(format!("BN test accuracy at step {step}"), f(bn), na.clone(), cell(torch.map(|x| x.0)));
            row(format!("plain test accuracy at step {step}"), f(plain), na.clone(), cell(torch.map(|x| x.1)));
        }
        // The source's "final accuracy" measured the test set with its own batch statistics
        // (see reference::SOURCE_FINAL_ACCURACY_10000), as PyTorch's comparison run did.
        let source_final = r.source_final_at(t.steps).filter(|_| anchors);
        let torch_final = torch_at(t.steps, c.steps).map(|(bn, _)| bn);
        row(format!("BN net, {} steps, test set as a batch", t.steps), f(t.accuracy_test_batch), cell(source_final), cell(torch_final));
        row(format!("restored BN net, {} steps, population", t.steps), f(t.accuracy_population), na.clone(), na.clone());
        row(format!("one-by-one, first {}, population stats", t.first_population.count), f(t.first_population.accuracy), cell(reference(r.source_one_by_one_population)), cell(reference(r.pytorch_one_by_one_population)));
        row(format!("one-by-one, first {}, batch stats", t.first_batch.count), f(t.first_batch.accuracy), cell(reference(r.source_one_by_one_batch)), cell(reference(r.pytorch_one_by_one_batch)));
        // Each column's own most predicted class: the references collapsed to another class
        // than this run may have.
        let collapsed = |class: u8, share: f64| format!("{class}: {}", f(share));
        let theirs = if anchors && r.trained_long_enough_for_references(t.steps) { collapsed(r.source_collapsed_class, 1.0) } else { na.clone() };
        row("  batch stats: most predicted class".to_string(), collapsed(t.first_batch.majority_class, t.first_batch.majority_share), theirs.clone(), theirs);
        row(format!("one-by-one, all {}, batch stats", t.all_count), f(t.all_batch), na.clone(), na.clone());
        if let Some(why) = self.anchors_left_out() {
            line(format!("note: {why}"));
        }
        line(String::new());
        line(format!("population statistics, test accuracy over {} seed(s) after {} steps:", self.estimators.seeds.len(), self.estimators.steps));
        line(format!("  {:<22} {:>8} {:>8} {:>8} {:>8}", "estimator", "mean", "std", "min", "max"));
        for e in &self.estimators.rows {
            let std = if self.estimators.seeds.len() < 2 { na.clone() } else { f(e.std) };
            line(format!("  {:<22} {:>8} {:>8} {:>8} {:>8}", e.label, f(e.mean), std, f(e.min), f(e.max)));
        }
        out
    }
}

/// The width of [`ReproduceSummary::table`]'s labels.
const TABLE_LABEL: usize = 44;

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
/// parts, with [`crate::Error::Interrupted`], or [`crate::Error::Kept`] around it where what
/// it wrote stays in [`partial_dir`]. A study that fails says so the same way.
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
    // The networks and the outputs' places are checked before anything on disk is made or
    // removed (an earlier interrupted study's partial outputs among them).
    for batch_norm in [true, false] {
        study::model_config(opts, &data, batch_norm).validate()?;
    }
    if let Some(name) = output_names().into_iter().find(|name| opts.out_dir.join(name).is_dir()) {
        let why = std::io::Error::other("a directory has that name");
        return Err(crate::Error::io(format!("cannot write {name} into {}", opts.out_dir.display()), why));
    }
    // Whether the outputs can move in is found out now, not after the study: a file where
    // the directory should be, a directory that takes no files.
    let made_from = outermost_missing(&opts.out_dir);
    create_dir(&opts.out_dir)?;
    let _lock = lock_out_dir(&opts.out_dir)?;
    let partial = partial_dir(&opts.out_dir);
    let mut made_partial = false;
    let built = (|| {
        // A stop that came before the study began (while the data loaded) leaves an earlier
        // interrupted study's partial outputs where they are.
        study::check_stop(stop, 0)?;
        // What an earlier interrupted study left is partial by its name: it goes.
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| crate::Error::io(format!("cannot remove {}", partial.display()), e))?;
        }
        create_dir(&partial)?;
        made_partial = true;
        let probe = ".bntrain-move-probe";
        // Never left behind by a second Ctrl-C between the write and the removal.
        let _probing = crate::interrupt::Critical::enter();
        std::fs::write(partial.join(probe), b"")
            .and_then(|()| move_file(&partial.join(probe), &opts.out_dir.join(probe)))
            .and_then(|()| std::fs::remove_file(opts.out_dir.join(probe)))
            .map_err(|e| {
                // The probe is not an output: the partial directory is left empty for the tidy.
                let _ = std::fs::remove_file(partial.join(probe));
                crate::Error::io(format!("cannot move outputs into {}", opts.out_dir.display()), e)
            })
    })()
    .and_then(|()| build_outputs(&ReproduceOptions { out_dir: partial.clone(), ..opts.clone() }, data, open, stop));
    match built {
        // The move names what moved and where the rest is, itself.
        Ok(summary) => move_outputs(&partial, &opts.out_dir, &summary.files).map(|()| summary),
        Err(failed) => Err(tidy_after_failure(failed, made_partial.then_some(partial.as_path()), &opts.out_dir, made_from.as_deref())),
    }
}

/// The outermost directory of `dir`'s path that does not exist yet (`dir` itself where only
/// it is missing; None where it exists): what creating `dir` makes.
fn outermost_missing(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).last().map(Path::to_path_buf)
}

/// After a study failed or was interrupted, with the lock still held (so that only this
/// study's directories are touched): the partial directory it made goes where it is empty,
/// and so do the run directory and the parents it made (from `made_from` down), where it left
/// them empty; where the partial directory holds something, the error is
/// [`crate::Error::Kept`], which names it (and the directories above it stay).
fn tidy_after_failure(failed: crate::Error, partial: Option<&Path>, out_dir: &Path, made_from: Option<&Path>) -> crate::Error {
    let kept = partial.filter(|partial| std::fs::remove_dir(partial).is_err() && partial.is_dir());
    if let Some(top) = made_from {
        // Innermost first; a directory that is not empty (or not ours to remove) ends it.
        for dir in out_dir.ancestors() {
            if std::fs::remove_dir(dir).is_err() || dir == top {
                break;
            }
        }
    }
    match kept {
        Some(partial) => crate::Error::Kept { failed: Box::new(failed), kept: partial.to_path_buf() },
        None => failed,
    }
}

/// The names of the files a study writes into its directory (its summary's `files`).
pub fn output_names() -> Vec<String> {
    let mut names = vec![study::CHECKPOINT.to_string()];
    for figure in [figures::FIG1A, figures::FIG1A_LEAD, figures::FIG1B, figures::FIG1C, figures::TEST_TIME, figures::ESTIMATORS] {
        names.extend([format!("{figure}.png"), format!("{figure}.svg")]);
    }
    for table in [write::CURVES_CSV, write::PROBES_CSV, write::PREDICTIONS_CSV, write::ESTIMATORS_CSV, write::METRICS_JSON, write::REPORT_MD] {
        names.push(table.to_string());
    }
    names
}

/// Moves `files` from `from` into `to` (same-named files replaced, others left alone), then
/// removes `from`. A target that is a directory is found before anything moves; a move that
/// fails midway names what had moved; a second Ctrl-C waits for the move to end.
fn move_outputs(from: &Path, to: &Path, files: &[String]) -> crate::Result<()> {
    // All of them or, on an error, a message naming what moved: never an exit midway.
    let _whole = crate::interrupt::Critical::enter();
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
        comparison_timeline: comparison.timeline,
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
        .map_err(|e| ReportError::Read { path: path.clone(), reason: format!("it does not parse as a reproduce summary: {e}") })?;
    check_drawable(&summary).map_err(|reason| ReportError::Read { path: path.clone(), reason })?;
    figures::draw_all(&summary, out_dir)?;
    write::write_tables(&summary, out_dir)?;
    write::write_report(&summary, out_dir)?;
    Ok(summary)
}

/// Refuses what a study never writes and the figures and tables would turn into a panic, an
/// endless tick search or an image the host cannot hold: a summary read back from a
/// hand-edited or damaged metrics.json.
fn check_drawable(s: &ReproduceSummary) -> Result<(), String> {
    const MOST_UNITS_PROBED: usize = 100;
    const MOST_ESTIMATORS: usize = 1000;
    const MOST_CLASSES: usize = 256;
    let c = &s.comparison;
    if c.eval_every == 0 {
        return Err("its evaluation interval is 0 steps".into());
    }
    let max = crate::model::config::MAX_STEPS;
    if let Some(steps) = [c.steps, s.test_time.steps, s.estimators.steps].into_iter().find(|&steps| steps > max) {
        return Err(format!("a run of {steps} steps, beyond the {max} a run may take"));
    }
    if c.probe_neurons > MOST_UNITS_PROBED {
        return Err(format!("{} probed units, more than the {MOST_UNITS_PROBED} a figure draws", c.probe_neurons));
    }
    if let Some(point) = c.bn.probes.iter().chain(&c.plain.probes).find(|p| p.neurons.len() < c.probe_neurons) {
        return Err(format!("its probe at step {} holds {} units, not the {} probed", point.step, point.neurons.len(), c.probe_neurons));
    }
    if s.estimators.rows.len() > MOST_ESTIMATORS {
        return Err(format!("{} estimators, more than the {MOST_ESTIMATORS} a figure draws", s.estimators.rows.len()));
    }
    let t = &s.test_time;
    if [&t.first_population, &t.first_batch].iter().any(|one| one.class_histogram.len() > MOST_CLASSES) {
        return Err(format!("a histogram of more than {MOST_CLASSES} classes"));
    }
    Ok(())
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The move of a study's outputs holds one section a second Ctrl-C waits for.
    #[test]
    fn moving_the_outputs_holds_a_critical_section() {
        let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let files: Vec<String> = ["a.csv", "b.json"].iter().map(|n| n.to_string()).collect();
        let partial = from.path().join("partial");
        std::fs::create_dir(&partial).unwrap();
        for name in &files {
            std::fs::write(partial.join(name), name).unwrap();
        }
        let before = crate::interrupt::sections_entered_on_this_thread();
        move_outputs(&partial, to.path(), &files).unwrap();
        assert_eq!(crate::interrupt::sections_entered_on_this_thread(), before + 1);
        assert!(!partial.exists() && files.iter().all(|n| to.path().join(n).is_file()));
    }

    /// A summary of a run of `steps` side-by-side steps (evaluated every `eval_every`) and
    /// `steps_bn` BN steps, on the seed network and MNIST's sizes, where the references apply:
    /// BN ahead of plain, its inputs steady; batch statistics collapse to "5".
    pub(crate) fn sample(steps: u64, eval_every: u64, steps_bn: u64) -> ReproduceSummary {
        let point = |step: u64, accuracy: f64| HistoryPoint { step, train_loss: 0.3, train_accuracy: accuracy, test_loss: 0.3, test_accuracy: accuracy };
        let curve = |base: f64, drift: f64| {
            let steps: Vec<u64> = (1..=steps / eval_every).map(|i| i * eval_every).collect();
            Curve {
                history: steps.iter().map(|&s| point(s, base + 0.05 * s as f64 / steps.len().max(1) as f64 / eval_every as f64)).collect(),
                probes: steps
                    .iter()
                    .map(|&s| {
                        let mean = base + drift * s as f64 / (steps.len().max(1) as u64 * eval_every) as f64;
                        ProbePoint { step: s, neurons: vec![ProbeStats { mean, p15: mean - 1.0, p50: mean, p85: mean + 1.0 }; 5] }
                    })
                    .collect(),
            }
        };
        let one = |accuracy: f64, class: u8, share: f64| {
            let mut class_histogram = vec![0u32; 10];
            class_histogram[class as usize] = (share * 100.0) as u32;
            OneByOne { count: 100, accuracy, class_histogram, majority_class: class, majority_share: share, predictions: vec![class; 100] }
        };
        let row = |label: &str, accuracy: f64| EstimatorRow {
            label: label.into(),
            description: label.into(),
            accuracy: vec![accuracy],
            mean: accuracy,
            std: 0.0,
            min: accuracy,
            max: accuracy,
            mean_error: 1e-3,
            var_rel_error: 1e-2,
        };
        let (bn, plain) = (curve(0.90, 0.1), curve(0.85, 3.0));
        ReproduceSummary {
            device: "test".into(),
            dataset: "mnist".into(),
            dataset_source: "nowhere".into(),
            train_examples: 60_000,
            test_examples: 10_000,
            model: ModelConfig::seed(true),
            train: TrainConfig::seed(),
            options: ReproduceOptions { steps_compare: steps, steps_bn, eval_every, ..ReproduceOptions::new("unused") },
            comparison: Comparison {
                steps,
                eval_every,
                probe_layer: 1,
                probe_neurons: 5,
                eval_mode: "batch".into(),
                drift_bn: study::drift(&bn),
                drift_plain: study::drift(&plain),
                bn: bn.clone(),
                plain,
                wall_s: 1.0,
            },
            comparison_timeline: Vec::new(),
            test_time: TestTime {
                steps: steps_bn,
                checkpoint: "bn_net.safetensors".into(),
                curve: bn,
                accuracy_before_save: 0.95,
                accuracy_population: 0.95,
                accuracy_test_batch: 0.95,
                first_labels: vec![0; 100],
                first_population: one(0.97, 1, 0.2),
                first_batch: one(0.09, 5, 1.0),
                all_batch: 0.09,
                all_count: 10_000,
                ema_initial_weight: 0.999f64.powf(steps_bn as f64),
                wall_s: 1.0,
            },
            estimators: EstimatorStudy { steps: steps_bn, seeds: vec![0], rows: vec![row("ema0.999-biased", 0.95), row("cumulative-biased", 0.96)], wall_s: 1.0 },
            references: References::default(),
            timings: Timings::default(),
            files: vec![],
        }
    }

    fn table_line<'a>(table: &'a str, starts: &str) -> &'a str {
        table.lines().find(|l| l.starts_with(starts)).unwrap_or_else(|| panic!("no line `{starts}` in\n{table}"))
    }

    /// The cells after the label of a line of the terminal table.
    fn cells(line: &str) -> Vec<&str> {
        line[TABLE_LABEL..].split_whitespace().collect()
    }

    #[test]
    fn the_table_pairs_each_row_with_the_anchor_at_its_step() {
        // --quick: the comparison ends at 1000 steps, the restored net trained 500.
        let quick = sample(1000, 50, 500).table();
        assert_eq!(cells(table_line(&quick, "BN test accuracy at step 1000")), ["0.9500", "—", "0.8986"]);
        assert_eq!(cells(table_line(&quick, "plain test accuracy at step 1000")), ["0.9000", "—", "0.8798"]);
        assert_eq!(cells(table_line(&quick, "restored BN net, 500 steps")), ["0.9500", "—", "—"]);
        // The anchor at 500 steps measured batch statistics, as this row does.
        assert_eq!(cells(table_line(&quick, "BN net, 500 steps, test set as a batch"))[1..], ["—", "0.8768"]);
        // No anchor at 15000; the 10000 one at 10000; the source's restored net at 10000.
        let longer = sample(15_000, 50, 10_000).table();
        assert_eq!(cells(table_line(&longer, "BN test accuracy at step 10000"))[2], "0.9535");
        assert_eq!(cells(table_line(&longer, "plain test accuracy at step 10000"))[2], "0.9430");
        assert_eq!(cells(table_line(&longer, "BN test accuracy at step 15000"))[2], "—");
        assert_eq!(cells(table_line(&longer, "BN net, 10000 steps, test set as a batch"))[1..], ["0.9721", "0.9535"]);
        assert_eq!(cells(table_line(&longer, "restored BN net, 10000 steps"))[1..], ["—", "—"]);
        // The end of a 40000-step run is PyTorch's last evaluation.
        let full = sample(40_000, 50, 3000).table();
        assert_eq!(cells(table_line(&full, "BN test accuracy at step 40000"))[2], "0.9689");
        assert_eq!(cells(table_line(&full, "plain test accuracy at step 40000"))[2], "0.9548");
        assert_eq!(cells(table_line(&full, "restored BN net, 3000 steps"))[1..], ["—", "—"]);
        assert!(full.lines().all(|l| l.chars().count() <= 80), "wider than 80 columns:\n{full}");
    }

    #[test]
    fn the_table_shows_each_columns_own_collapsed_class() {
        let table = sample(15_000, 50, 10_000).table();
        assert!(!table.contains("predicted as \"5\""), "a label that claims the references' class:\n{table}");
        assert_eq!(cells(table_line(&table, "  batch stats: most predicted class")), ["5:", "1.0000", "8:", "1.0000", "8:", "1.0000"]);
        assert_eq!(cells(table_line(&table, "one-by-one, first 100, population stats"))[1..], ["0.9900", "0.9800"]);
    }

    /// The references' one-by-one figures come from nets trained 10000 (source) and 40000
    /// (PyTorch) steps: beside a net trained for 500, they are left out.
    #[test]
    fn one_by_one_references_stand_beside_a_net_trained_as_long_only() {
        let quick = sample(1000, 50, 500).table();
        for label in ["one-by-one, first 100, population stats", "one-by-one, first 100, batch stats"] {
            assert_eq!(cells(table_line(&quick, label))[1..], ["—", "—"], "{label}");
        }
        assert_eq!(cells(table_line(&quick, "  batch stats: most predicted class")), ["5:", "1.0000", "—", "—"]);
        let report = write::render_report(&sample(1000, 50, 500));
        let row = report.lines().find(|l| l.starts_with("| one-by-one, first 100 test images, population")).unwrap();
        assert!(row.ends_with("| — | — |"), "{row}");
    }

    #[test]
    fn the_table_leaves_out_references_that_do_not_apply() {
        let mut s = sample(10_000, 50, 10_000);
        s.model.hidden = vec![50, 50];
        let table = s.table();
        for row in ["BN test accuracy at step 10000", "plain test accuracy at step 10000", "restored BN net,", "one-by-one, first 100, population", "one-by-one, first 100, batch", "  batch stats"] {
            let line = table_line(&table, row);
            let c = cells(line);
            assert_eq!(c[c.len() - 2..], ["—", "—"], "a reference where none applies: {line}");
        }
        assert_eq!(table.matches("are for 784-100-100-10 on MNIST").count(), 1, "why, once:\n{table}");
    }

    /// A summary that measured non-finite numbers is written with `null`s (serde_json's
    /// choice) and still rerenders, its report saying `n/a` there.
    #[test]
    fn a_summary_with_non_finite_numbers_rerenders() {
        let mut s = sample(200, 50, 100);
        s.estimators.rows[0].var_rel_error = f64::NAN;
        s.estimators.rows[1].accuracy[0] = f64::INFINITY;
        s.comparison.drift_bn = f64::NAN;
        s.comparison.bn.probes[0].neurons[0].p15 = f64::NAN;
        s.test_time.accuracy_before_save = f64::NAN;
        let dir = tempfile::tempdir().expect("a temporary directory");
        write::write_json(&s, dir.path()).expect("metrics.json");
        let text = std::fs::read_to_string(dir.path().join(write::METRICS_JSON)).expect("metrics.json");
        assert!(text.contains("null"), "serde_json writes non-finite numbers as null");
        let back = rerender(dir.path()).expect("a summary with nulls rerenders");
        assert!(back.estimators.rows[0].var_rel_error.is_nan() && back.comparison.drift_bn.is_nan());
        assert!(back.estimators.rows[1].accuracy[0].is_nan() && back.comparison.bn.probes[0].neurons[0].p15.is_nan());
        let report = std::fs::read_to_string(dir.path().join(write::REPORT_MD)).expect("report.md");
        assert!(report.contains("n/a") && !report.contains("NaN") && !report.contains("| inf"), "{report}");
        // A null where no measurement can be missing is refused in one line that says where.
        std::fs::write(dir.path().join(write::METRICS_JSON), text.replacen("\"steps\": 200", "\"steps\": null", 1)).expect("write");
        let refused = rerender(dir.path()).expect_err("a null step").to_string();
        assert!(refused.starts_with("cannot read ") && refused.contains("line") && !refused.contains('\n'), "{refused}");
    }

    /// What a study never writes, and the figures would turn into a panic (a division by the
    /// evaluation interval, a probe without its units), an image the host cannot hold or a
    /// step count past u64, is refused on reading in one line; extreme but finite values draw
    /// (plotters' tick search never ends on an infinite range).
    #[test]
    fn a_summary_the_figures_cannot_draw_is_refused_and_extremes_draw() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let refused = |edit: &dyn Fn(&mut ReproduceSummary)| {
            let mut s = sample(200, 50, 100);
            edit(&mut s);
            write::write_json(&s, dir.path()).expect("metrics.json");
            rerender(dir.path()).expect_err("refused").to_string()
        };
        assert!(refused(&|s| s.comparison.eval_every = 0).contains("evaluation interval is 0"));
        assert!(refused(&|s| s.comparison.bn.probes[1].neurons.truncate(2)).contains("holds 2 units, not the 5 probed"));
        assert!(refused(&|s| s.comparison.probe_neurons = 1_000_000).contains("probed units"));
        assert!(refused(&|s| s.comparison.steps = u64::MAX).contains("beyond the"));
        assert!(refused(&|s| s.test_time.first_batch.class_histogram = vec![0; 100_000]).contains("classes"));

        let mut s = sample(200, 50, 100);
        s.comparison.bn.history[1].test_accuracy = 1e307;
        for point in &mut s.comparison.plain.probes {
            point.neurons[0] = ProbeStats { mean: 1e308, p15: 1e308, p50: 1e308, p85: 1e308 };
        }
        s.comparison.bn.probes[0].neurons[1] = ProbeStats { mean: -1e308, p15: -1e308, p50: 1e308, p85: 1e308 };
        s.test_time.first_batch.class_histogram[3] = 4_000_000_000;
        write::write_json(&s, dir.path()).expect("metrics.json");
        rerender(dir.path()).expect("extreme but finite values draw");
    }
}
