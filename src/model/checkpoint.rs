//! Checkpoints: safetensors files that PyTorch can load into an `nn.Sequential` of
//! `nn.Linear` / `nn.BatchNorm1d` / activation modules, plus what bntrain needs to resume.
//!
//! Tensor names (hidden layer l = 0, 1, …; with BN each hidden layer takes three Sequential
//! slots — Linear, BatchNorm1d, activation — without BN two):
//! - `{i}.weight` `[out, in]`, `{i}.bias` `[out]` for a Linear at slot i (no bias before BN);
//! - `{j}.weight` (γ), `{j}.bias` (β), `{j}.running_mean`, `{j}.running_var`,
//!   `{j}.num_batches_tracked` (i64) for a BatchNorm1d at slot j;
//! - `bntrain.*` for the rest (further estimators, momentum buffers): drop these keys before
//!   `load_state_dict`.
//!
//! Metadata: `format` = `bntrain-checkpoint`, `format_version`, `model` and `train` (the
//! configuration as JSON), `progress` (step and metric history as JSON), `dtype`,
//! `trained_on` (the arithmetic and the dataset, JSON; absent in older files), and
//! `checksum`: SHA-256 over every tensor's name, dtype, shape and bytes in name order, then
//! (from format version 2) every other metadata entry's key and value in key order, so a
//! flipped byte anywhere is caught. Version 1 files, whose checksum covers the tensors alone,
//! still load. Files are written to a temporary file and renamed.

use super::config::{ConfigError, ModelConfig, TrainConfig};
use super::params::{ModelParams, RunningStats};
use crate::atomic_file::{write_atomically, write_through_links};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const FORMAT: &str = "bntrain-checkpoint";
pub const FORMAT_VERSION: u32 = 2;
/// The first version, whose checksum covers the tensors but not the metadata.
const TENSORS_ONLY_CHECKSUM_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write checkpoint {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a safetensors file ({reason})")]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("{path} is a safetensors file but not a bntrain checkpoint ({reason})")]
    Foreign { path: PathBuf, reason: String },
    #[error("{path} has checkpoint format version {found}; this bntrain reads versions {TENSORS_ONLY_CHECKSUM_VERSION} to {FORMAT_VERSION}")]
    Version { path: PathBuf, found: String },
    #[error("{path} is corrupted: its checksum does not match its contents")]
    Corrupted { path: PathBuf },
    #[error("{path}: {problem}")]
    Malformed { path: PathBuf, problem: String },
    #[error("cannot encode checkpoint: {0}")]
    Encode(String),
}

/// The floating-point type tensors are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoredPrecision {
    #[default]
    F32,
    F64,
}

/// What a run trained with beyond its configuration, so that a resumed run goes on the same
/// way and an evaluation reads the same data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainedOn {
    /// The arithmetic of the steps (f32, f64, or f32 with tf32 / bf16 GEMM operands).
    pub precision: crate::device::Precision,
    pub dataset: crate::data::DatasetKind,
}

/// One evaluation point of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    pub step: u64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
}

/// Where a run stands: enough, with the configuration, to continue it exactly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    pub step: u64,
    pub history: Vec<HistoryPoint>,
    /// Training statistics since the last evaluation point, when the run was interrupted
    /// between two of them.
    #[serde(default)]
    pub pending: crate::backend::StepStats,
}

/// Everything a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub params: ModelParams,
    /// Momentum buffers in trainable-tensor order (empty without momentum).
    pub velocity: Vec<Vec<f64>>,
    pub progress: TrainProgress,
    pub precision: StoredPrecision,
    /// None in checkpoints written before it was recorded.
    pub trained_on: Option<TrainedOn>,
}

struct Slot {
    linear: usize,
    batch_norm: Option<usize>,
}

/// Sequential slot indices of each layer's Linear and BatchNorm1d.
fn slots(model: &ModelConfig) -> Vec<Slot> {
    let per_hidden = if model.batch_norm { 3 } else { 2 };
    (0..=model.hidden.len())
        .map(|l| Slot {
            linear: l * per_hidden,
            batch_norm: (l < model.hidden.len() && model.batch_norm).then_some(l * per_hidden + 1),
        })
        .collect()
}

/// How many floating-point values a checkpoint of `model` stores (None on overflow): the
/// trainable tensors (twice with momentum buffers) and the running statistics per estimator.
fn stored_values(model: &ModelConfig, estimators: usize, momentum: bool) -> Option<usize> {
    let trainable = model.parameter_count()?.checked_mul(if momentum { 2 } else { 1 })?;
    let statistics = if model.batch_norm {
        model.hidden.iter().try_fold(0usize, |n, &w| n.checked_add(w))?.checked_mul(2)?.checked_mul(estimators.max(1))?
    } else {
        0
    };
    trainable.checked_add(statistics)
}

fn encode(values: &[f64], precision: StoredPrecision) -> Vec<u8> {
    match precision {
        StoredPrecision::F32 => values.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect(),
        StoredPrecision::F64 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

/// The `checksum` entry: over the tensors, then over `metadata` (every entry but `checksum`
/// itself, each key and value after its length, so that no two entries read alike); `None`
/// for version 1's tensors alone.
fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>, metadata: Option<&HashMap<String, String>>) -> String {
    let mut sorted: Vec<_> = tensors.collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Sha256::new();
    for (name, dtype, shape, data) in sorted {
        hasher.update(name.as_bytes());
        hasher.update(format!("{dtype:?}{shape:?}").as_bytes());
        hasher.update(data);
    }
    if let Some(metadata) = metadata {
        let mut entries: Vec<_> = metadata.iter().filter(|(key, _)| key.as_str() != "checksum").collect();
        entries.sort();
        for (key, value) in entries {
            for text in [key, value] {
                hasher.update((text.len() as u64).to_le_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Completes a checkpoint's `metadata` for its `tensors`: this format version and the
/// checksum [`Checkpoint::from_bytes`] expects over both. [`Checkpoint::save`] ends with it;
/// so do the fuzz targets, which put arbitrary configurations into a template. The checksum
/// guards against corruption, not forgery.
pub fn seal_metadata(tensors: &[(String, TensorView<'_>)], metadata: &mut HashMap<String, String>) {
    metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    let sum = checksum(tensors.iter().map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())), Some(metadata));
    metadata.insert("checksum".to_string(), sum);
}

impl Checkpoint {
    /// The named tensors as (name, dtype, shape, little-endian bytes).
    fn tensors(&self) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
        let dtype = match self.precision {
            StoredPrecision::F32 => Dtype::F32,
            StoredPrecision::F64 => Dtype::F64,
        };
        let mut out = BTreeMap::new();
        let mut put = |name: String, shape: Vec<usize>, values: &[f64]| {
            out.insert(name, (dtype, shape, encode(values, self.precision)));
        };
        let mut counters = Vec::new();
        for (layer, slot) in self.params.layers.iter().zip(slots(&self.model)) {
            let i = slot.linear;
            put(format!("{i}.weight"), vec![layer.outputs, layer.inputs], &layer.weight);
            if let Some(b) = &layer.bias {
                put(format!("{i}.bias"), vec![layer.outputs], b);
            }
            if let (Some(bn), Some(j)) = (&layer.batch_norm, slot.batch_norm) {
                put(format!("{j}.weight"), vec![layer.outputs], &bn.gamma);
                put(format!("{j}.bias"), vec![layer.outputs], &bn.beta);
                for (e, stats) in bn.running.iter().enumerate() {
                    let prefix = if e == 0 { format!("{j}.") } else { format!("bntrain.{j}.estimator{e}.") };
                    put(format!("{prefix}running_mean"), vec![layer.outputs], &stats.mean);
                    put(format!("{prefix}running_var"), vec![layer.outputs], &stats.var);
                    counters.push((format!("{prefix}num_batches_tracked"), stats.batches));
                }
            }
        }
        for (k, v) in self.velocity.iter().enumerate() {
            put(format!("bntrain.velocity.{k}"), vec![v.len()], v);
        }
        for (name, n) in counters {
            out.insert(name, (Dtype::I64, vec![], (n as i64).to_le_bytes().to_vec()));
        }
        out
    }

    /// Writes the checkpoint atomically: a temporary file in the same directory, flushed and
    /// renamed over `path`, so a crash leaves either the old file or the new one. A symbolic
    /// link at `path` is replaced ([`save_through_links`](Self::save_through_links) for a
    /// path the user named).
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let bytes = self.encode()?;
        write_atomically(path, &bytes).map_err(|source| CheckpointError::Write { path: path.to_path_buf(), source })
    }

    /// [`save`](Self::save) into the file `path` leads to, where it is a symbolic link.
    pub fn save_through_links(&self, path: &Path) -> Result<(), CheckpointError> {
        let bytes = self.encode()?;
        write_through_links(path, &bytes).map_err(|source| CheckpointError::Write { path: path.to_path_buf(), source })
    }

    /// The file's bytes: the tensors and the metadata, its checksum last.
    fn encode(&self) -> Result<Vec<u8>, CheckpointError> {
        if let Some((name, value)) = self.params.first_non_finite() {
            return Err(CheckpointError::Encode(format!("refusing to write {name}: it holds {value}")));
        }
        let tensors = self.tensors();
        let json = |v: &dyn erased::Json| v.to_json().map_err(|e| CheckpointError::Encode(e.to_string()));
        let mut metadata = HashMap::new();
        metadata.insert("format".to_string(), FORMAT.to_string());
        metadata.insert("model".to_string(), json(&self.model)?);
        metadata.insert("train".to_string(), json(&self.train)?);
        metadata.insert("progress".to_string(), json(&self.progress)?);
        metadata.insert("dtype".to_string(), json(&self.precision)?);
        if let Some(trained_on) = &self.trained_on {
            metadata.insert("trained_on".to_string(), json(trained_on)?);
        }
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, (dtype, shape, bytes))| {
                TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| CheckpointError::Encode(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        seal_metadata(&views, &mut metadata);
        safetensors::serialize(views, Some(metadata)).map_err(|e| CheckpointError::Encode(e.to_string()))
    }

    /// Reads and verifies a checkpoint: format, version, checksum, every tensor's dtype and
    /// shape against the configuration stored beside it.
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        // A device or pipe (/dev/zero) would be read until memory runs out.
        let bytes = crate::atomic_file::refuse_non_regular(path)
            .and_then(|()| std::fs::read(path))
            .map_err(|source| CheckpointError::Read { path: path.to_path_buf(), source })?;
        Self::from_bytes(&bytes, path)
    }

    /// [`load`](Self::load) for the bytes of a checkpoint already in memory; `path` only names
    /// it in errors. Never panics, whatever the bytes (the fuzz target's entry).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, CheckpointError> {
        let malformed = |problem: String| CheckpointError::Malformed { path: path.to_path_buf(), problem };
        let file = SafeTensors::deserialize(bytes)
            .map_err(|e| CheckpointError::NotSafetensors { path: path.to_path_buf(), reason: e.to_string() })?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| CheckpointError::NotSafetensors { path: path.to_path_buf(), reason: e.to_string() })?;
        let foreign = |reason: &str| CheckpointError::Foreign { path: path.to_path_buf(), reason: reason.to_string() };
        let meta = header.metadata().as_ref().ok_or_else(|| foreign("no metadata"))?;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(foreign("no `format: bntrain-checkpoint` entry in its metadata"));
        }
        let field = |key: &str| meta.get(key).ok_or_else(|| malformed(format!("metadata has no `{key}`")));
        let stored: Vec<(String, TensorView<'_>)> = file.tensors();
        let sum_of = |metadata: Option<&HashMap<String, String>>| {
            checksum(stored.iter().map(|(n, v)| (n.as_str(), v.dtype(), v.shape(), v.data())), metadata)
        };
        let version = field("format_version")?;
        let covers_metadata = if *version == FORMAT_VERSION.to_string() {
            true
        } else if *version == TENSORS_ONLY_CHECKSUM_VERSION.to_string() {
            false
        } else {
            // A file of a version this bntrain reads whose version entry alone was damaged is
            // corrupted, not from another bntrain: with the entry put back (version 2), or
            // over the tensors alone (version 1), its checksum matches.
            let mut restored = meta.clone();
            restored.insert("format_version".to_string(), FORMAT_VERSION.to_string());
            let stored = meta.get("checksum");
            if stored == Some(&sum_of(Some(&restored))) || stored == Some(&sum_of(None)) {
                return Err(CheckpointError::Corrupted { path: path.to_path_buf() });
            }
            return Err(CheckpointError::Version { path: path.to_path_buf(), found: version.clone() });
        };
        // First, so that a flipped byte is called corruption, not whatever it broke.
        if *field("checksum")? != sum_of(covers_metadata.then_some(meta)) {
            return Err(CheckpointError::Corrupted { path: path.to_path_buf() });
        }
        let parse_err = |key: &str, e: serde_json::Error| malformed(format!("metadata `{key}` does not parse: {e}"));
        let model: ModelConfig = serde_json::from_str(field("model")?).map_err(|e| parse_err("model", e))?;
        let train: TrainConfig = serde_json::from_str(field("train")?).map_err(|e| parse_err("train", e))?;
        let progress: TrainProgress = serde_json::from_str(field("progress")?).map_err(|e| parse_err("progress", e))?;
        if progress.step > super::config::MAX_STEPS {
            return Err(malformed(format!("its step {} is beyond the {} a run may reach", progress.step, super::config::MAX_STEPS)));
        }
        let precision: StoredPrecision = serde_json::from_str(field("dtype")?).map_err(|e| parse_err("dtype", e))?;
        let trained_on: Option<TrainedOn> = match meta.get("trained_on") {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| parse_err("trained_on", e))?),
            None => None,
        };
        model.validate().map_err(|e| malformed(e.to_string()))?;
        // Its training settings too: eval and predict open a backend with them, whose refusal
        // would name neither the file nor a setting the command line has.
        train.validate_settings(&model).map_err(|e| malformed(format!("training settings: {e}")))?;
        let computed_in_f64 = match (trained_on, precision) {
            (Some(t), _) => t.precision == crate::device::Precision::F64,
            (None, stored) => stored == StoredPrecision::F64,
        };
        if !computed_in_f64 {
            train
                .validate_in_f32(&model)
                .map_err(|e| malformed(format!("training settings no f32 run could have had: {e}")))?;
        }

        let want_dtype = match precision {
            StoredPrecision::F32 => Dtype::F32,
            StoredPrecision::F64 => Dtype::F64,
        };
        let floats = |name: &str, len: usize| -> Result<Vec<f64>, CheckpointError> {
            let view = file.tensor(name).map_err(|_| malformed(format!("tensor `{name}` is missing")))?;
            if view.dtype() != want_dtype || view.shape().iter().product::<usize>() != len {
                return Err(malformed(format!("tensor `{name}` is {:?}{:?}, expected {want_dtype:?} with {len} elements", view.dtype(), view.shape())));
            }
            Ok(match precision {
                StoredPrecision::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
                StoredPrecision::F64 => view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect(),
            })
        };
        let counter = |name: &str| -> Result<u64, CheckpointError> {
            let view = file.tensor(name).map_err(|_| malformed(format!("tensor `{name}` is missing")))?;
            let raw: [u8; 8] = view.data().try_into().map_err(|_| malformed(format!("tensor `{name}` is not one i64")))?;
            u64::try_from(i64::from_le_bytes(raw)).map_err(|_| malformed(format!("tensor `{name}` is negative")))
        };

        let estimators = train.estimators().len();
        // Every value the configuration implies is stored in the file: checking that before
        // allocating keeps a forged configuration from asking for terabytes (found by fuzzing).
        let value_bytes = match precision {
            StoredPrecision::F32 => 4,
            StoredPrecision::F64 => 8,
        };
        let needed = stored_values(&model, estimators, train.momentum > 0.0).and_then(|n| n.checked_mul(value_bytes));
        if needed.is_none_or(|n| n > bytes.len()) {
            return Err(malformed(format!("its configuration ({model}) needs more tensor data than the file's {} bytes hold", bytes.len())));
        }
        let mut params = ModelParams::init_shapes(&model, estimators);
        for (layer, slot) in params.layers.iter_mut().zip(slots(&model)) {
            let i = slot.linear;
            layer.weight = floats(&format!("{i}.weight"), layer.inputs * layer.outputs)?;
            if layer.bias.is_some() {
                layer.bias = Some(floats(&format!("{i}.bias"), layer.outputs)?);
            }
            if let (Some(bn), Some(j)) = (&mut layer.batch_norm, slot.batch_norm) {
                bn.gamma = floats(&format!("{j}.weight"), layer.outputs)?;
                bn.beta = floats(&format!("{j}.bias"), layer.outputs)?;
                for (e, stats) in bn.running.iter_mut().enumerate() {
                    let prefix = if e == 0 { format!("{j}.") } else { format!("bntrain.{j}.estimator{e}.") };
                    let var_name = format!("{prefix}running_var");
                    let var = floats(&var_name, layer.outputs)?;
                    // A negative variance makes every normalization NaN: refused like a NaN.
                    if let Some(v) = var.iter().find(|v| **v < 0.0) {
                        return Err(malformed(format!("tensor `{var_name}` holds the variance {v}, below 0")));
                    }
                    *stats = RunningStats {
                        mean: floats(&format!("{prefix}running_mean"), layer.outputs)?,
                        var,
                        batches: counter(&format!("{prefix}num_batches_tracked"))?,
                    };
                }
            }
        }
        let mut velocity = Vec::new();
        if train.momentum > 0.0 {
            for (k, (_, tensor)) in params.trainable_tensors().iter().enumerate() {
                velocity.push(floats(&format!("bntrain.velocity.{k}"), tensor.len())?);
            }
        }
        if let Some((name, value)) = params.first_non_finite() {
            return Err(malformed(format!("{name} holds {value}")));
        }
        Ok(Checkpoint { model, train, params, velocity, progress, precision, trained_on })
    }

    /// The arithmetic the run trained in, where the file says: recorded, or f64 where it
    /// stores f64 (only an f64 run writes that). None for an f32 file from before bntrain
    /// recorded it: it could have come from f32, tf32 or bf16 steps.
    pub fn recorded_precision(&self) -> Option<crate::device::Precision> {
        match (self.trained_on, self.precision) {
            (Some(t), _) => Some(t.precision),
            (None, StoredPrecision::F64) => Some(crate::device::Precision::F64),
            (None, StoredPrecision::F32) => None,
        }
    }

    /// Checks that this checkpoint's network is the one requested.
    pub fn check_model(&self, requested: &ModelConfig) -> Result<(), ConfigError> {
        if &self.model != requested {
            return Err(ConfigError::Mismatch(format!("the checkpoint holds {} (ε {}), the request is {} (ε {})", self.model, self.model.epsilon, requested, requested.epsilon)));
        }
        Ok(())
    }
}

/// Object-safe JSON encoding for the metadata fields.
mod erased {
    pub trait Json {
        fn to_json(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<String> {
            serde_json::to_string(self)
        }
    }
}
