//! Host-side parameters of a network, in f64 whatever the backend computes in: f32 values
//! round-trip through f64 exactly, so a backend can export and re-import without loss.
//!
//! Layouts follow PyTorch so that checkpoints load into `nn.Linear` / `nn.BatchNorm1d`:
//! a weight is `[outputs, inputs]` row-major; vectors are `[outputs]`.

use super::config::ModelConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Running (population) statistics of one BN layer, for one estimator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunningStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    /// Batches folded in so far: the cumulative average needs it; PyTorch stores it too.
    pub batches: u64,
}

impl RunningStats {
    /// The usual starting point (PyTorch's and the seed's): mean 0, variance 1.
    pub fn initial(width: usize) -> Self {
        RunningStats { mean: vec![0.0; width], var: vec![1.0; width], batches: 0 }
    }
}

/// Batch normalization's parameters: y = γ·x̂ + β, and its population statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNormParams {
    pub gamma: Vec<f64>,
    pub beta: Vec<f64>,
    /// One entry per estimator of the training configuration; index 0 is used for inference.
    pub running: Vec<RunningStats>,
}

/// One linear layer and what follows it before the activation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerParams {
    pub inputs: usize,
    pub outputs: usize,
    /// `[outputs, inputs]` row-major.
    pub weight: Vec<f64>,
    /// Present on plain hidden layers and on the output layer: BN's β replaces it otherwise.
    pub bias: Option<Vec<f64>>,
    pub batch_norm: Option<BatchNormParams>,
}

/// Every parameter and statistic of a network, input layer first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelParams {
    pub layers: Vec<LayerParams>,
}

impl ModelParams {
    /// Weights drawn N(0,1), unscaled, from a ChaCha8 stream seeded by `seed`, layer by layer in
    /// row-major order: the draws depend only on the widths, so a BN net and a plain net with
    /// the same seed start from the same weights. Biases and β are 0, γ is 1.
    pub fn init(config: &ModelConfig, seed: u64, estimators: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let widths = config.widths();
        let hidden_layers = config.hidden.len();
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(l, pair)| {
                let (inputs, outputs) = (pair[0], pair[1]);
                let weight: Vec<f64> =
                    (0..inputs * outputs).map(|_| StandardNormal.sample(&mut rng)).collect();
                let normalized = l < hidden_layers && config.batch_norm;
                LayerParams {
                    inputs,
                    outputs,
                    weight,
                    bias: (!normalized).then(|| vec![0.0; outputs]),
                    batch_norm: normalized.then(|| BatchNormParams {
                        gamma: vec![1.0; outputs],
                        beta: vec![0.0; outputs],
                        running: vec![RunningStats::initial(outputs); estimators.max(1)],
                    }),
                }
            })
            .collect();
        ModelParams { layers }
    }

    /// Zero-filled parameters with the shapes of `config` (γ = 1, running variance = 1): the
    /// frame a checkpoint is read into.
    pub fn init_shapes(config: &ModelConfig, estimators: usize) -> Self {
        let mut p = Self::init(config, 0, estimators);
        p.layers.iter_mut().for_each(|l| l.weight.fill(0.0));
        p
    }

    /// Every tensor with a readable name: the trainable ones, then each BN layer's running
    /// statistics (`layer2.running_var[0]`, …). Used to find non-finite values.
    pub fn named_tensors(&self) -> Vec<(String, &[f64])> {
        let mut out: Vec<(String, &[f64])> =
            self.trainable_tensors().into_iter().map(|(name, t)| (name, t.as_slice())).collect();
        for (l, layer) in self.layers.iter().enumerate() {
            for (e, stats) in layer.batch_norm.iter().flat_map(|bn| bn.running.iter().enumerate()) {
                out.push((format!("layer{}.running_mean[{e}]", l + 1), &stats.mean));
                out.push((format!("layer{}.running_var[{e}]", l + 1), &stats.var));
            }
        }
        out
    }

    /// The first non-finite value, as (tensor name, value).
    pub fn first_non_finite(&self) -> Option<(String, f64)> {
        self.named_tensors().into_iter().find_map(|(name, t)| {
            t.iter().find(|v| !v.is_finite()).map(|&v| (name, v))
        })
    }

    /// The trainable tensors (weight, bias, γ, β per layer, in that order): the order of
    /// gradients and momentum buffers everywhere.
    pub fn trainable_tensors(&self) -> Vec<(String, &Vec<f64>)> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let n = l + 1;
            out.push((format!("layer{n}.weight"), &layer.weight));
            if let Some(b) = &layer.bias {
                out.push((format!("layer{n}.bias"), b));
            }
            if let Some(bn) = &layer.batch_norm {
                out.push((format!("layer{n}.gamma"), &bn.gamma));
                out.push((format!("layer{n}.beta"), &bn.beta));
            }
        }
        out
    }

    /// Makes estimator `index` the one used for inference (swaps it into slot 0).
    pub fn with_estimator(&self, index: usize) -> Self {
        let mut p = self.clone();
        for layer in &mut p.layers {
            if let Some(bn) = &mut layer.batch_norm {
                bn.running.swap(0, index);
            }
        }
        p
    }

    /// Number of running-statistics slots (0 for a plain network).
    pub fn estimator_count(&self) -> usize {
        self.layers.iter().find_map(|l| l.batch_norm.as_ref()).map_or(0, |bn| bn.running.len())
    }
}
