//! What a network is and how it is trained. Validation happens here, up front, so that an
//! impossible configuration fails in one line before any data is loaded or memory allocated.

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// The most steps a run may reach: far beyond any run (2^48 steps of 15 µs are 134 years),
/// and small enough that step arithmetic (epochs, evaluation points, a resumed count) stays
/// exact in u64 and in the f64 of JSON.
pub const MAX_STEPS: u64 = 1 << 48;

/// A configuration that cannot be trained, or a request that disagrees with a checkpoint.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("checkpoint does not match the request: {0}")]
    Mismatch(String),
}

/// The nonlinearity after each hidden layer (after BN when BN is on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    #[default]
    Sigmoid,
    Relu,
}

/// How the running (population) statistics follow the batch statistics during training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Averaging {
    /// running ← decay·running + (1−decay)·batch  (PyTorch momentum = 1 − decay).
    Ema { decay: f64 },
    /// running ← mean of every batch statistic seen so far (PyTorch `momentum=None`).
    Cumulative,
}

/// Which variance feeds the running variance: the biased batch variance (the seed, TF) or
/// the unbiased m/(m−1) one (PyTorch, cuDNN, BN2015 §3.1). Normalization in training always
/// uses the biased one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VarianceKind {
    #[default]
    Biased,
    Unbiased,
}

/// One way of estimating population statistics during training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsEstimator {
    pub averaging: Averaging,
    pub variance: VarianceKind,
}

impl StatsEstimator {
    pub const SEED: StatsEstimator =
        StatsEstimator { averaging: Averaging::Ema { decay: 0.999 }, variance: VarianceKind::Biased };

    /// A short label used in reports and CSV headers, e.g. `ema0.999-biased`.
    pub fn label(&self) -> String {
        let avg = match self.averaging {
            Averaging::Ema { decay } => format!("ema{decay}"),
            Averaging::Cumulative => "cumulative".to_string(),
        };
        let var = match self.variance {
            VarianceKind::Biased => "biased",
            VarianceKind::Unbiased => "unbiased",
        };
        format!("{avg}-{var}")
    }
}

/// The loss over a batch: the seed sums the per-example cross-entropy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossReduction {
    #[default]
    Sum,
    Mean,
}

/// The order in which training examples are visited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BatchOrder {
    /// A fresh permutation of the training set every epoch, from the seeded RNG.
    #[default]
    Shuffled,
    /// 0, 1, 2, … every epoch.
    Sequential,
}

/// The network: input → hidden layers (linear, BN or bias, activation) → linear → softmax.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub inputs: usize,
    pub hidden: Vec<usize>,
    pub classes: usize,
    pub activation: Activation,
    pub batch_norm: bool,
    /// Added to the variance before the square root.
    pub epsilon: f64,
}

impl ModelConfig {
    /// The seed network: 784-100-100-10, sigmoid, BN before each sigmoid, ε = 1e-3.
    pub fn seed(batch_norm: bool) -> Self {
        ModelConfig {
            inputs: 784,
            hidden: vec![100, 100],
            classes: 10,
            activation: Activation::Sigmoid,
            batch_norm,
            epsilon: 1e-3,
        }
    }

    /// Layer widths from input to output, e.g. [784, 100, 100, 10].
    pub fn widths(&self) -> Vec<usize> {
        let mut w = Vec::with_capacity(self.hidden.len() + 2);
        w.push(self.inputs);
        w.extend_from_slice(&self.hidden);
        w.push(self.classes);
        w
    }

    /// Number of trainable scalars (weights, biases, γ, β); None when it overflows, as a
    /// forged or absurd configuration can make it.
    pub fn parameter_count(&self) -> Option<usize> {
        let mut n = 0usize;
        for (l, pair) in self.widths().windows(2).enumerate() {
            let normalized = l < self.hidden.len() && self.batch_norm;
            let layer = pair[0].checked_mul(pair[1])?.checked_add(pair[1].checked_mul(if normalized { 2 } else { 1 })?)?;
            n = n.checked_add(layer)?;
        }
        Some(n)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.inputs == 0 || self.classes < 2 {
            return Err(ConfigError::Invalid(format!(
                "need at least one input and two classes (got {} inputs, {} classes)",
                self.inputs, self.classes
            )));
        }
        self.validate_layers()
    }

    /// What [`validate`](Self::validate) checks that the data does not decide (the hidden
    /// layers, ε): checkable before the data is loaded, or downloaded.
    pub fn validate_layers(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(i) = self.hidden.iter().position(|&h| h == 0) {
            return bad(format!("hidden layer {} has width 0; every layer needs at least one unit", i + 1));
        }
        if self.hidden.iter().any(|&h| h > 1 << 16) {
            return bad("a hidden layer is wider than 65536 units".into());
        }
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return bad(format!("epsilon must be positive and finite (got {})", self.epsilon));
        }
        Ok(())
    }
}

impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths: Vec<String> = self.widths().iter().map(|w| w.to_string()).collect();
        write!(
            f,
            "{} {:?}{}",
            widths.join("-"),
            self.activation,
            if self.batch_norm { " with BN" } else { " plain" }
        )
    }
}

/// How the network is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub learning_rate: f64,
    /// Classical momentum μ: v ← μ·v + g, w ← w − lr·v. 0 is plain SGD (the seed).
    pub momentum: f64,
    pub batch_size: usize,
    pub loss: LossReduction,
    pub order: BatchOrder,
    pub seed: u64,
    /// The estimator used at inference and stored in checkpoints as `running_mean/var`.
    pub estimator: StatsEstimator,
    /// Further estimators kept side by side during training, for comparison only.
    pub extra_estimators: Vec<StatsEstimator>,
}

impl TrainConfig {
    /// The seed's optimizer: plain SGD, lr 0.01, batch 60, summed loss, EMA 0.999, biased.
    pub fn seed() -> Self {
        TrainConfig {
            learning_rate: 0.01,
            momentum: 0.0,
            batch_size: 60,
            loss: LossReduction::Sum,
            order: BatchOrder::Shuffled,
            seed: 0,
            estimator: StatsEstimator::SEED,
            extra_estimators: Vec::new(),
        }
    }

    /// All estimators, the primary first.
    pub fn estimators(&self) -> Vec<StatsEstimator> {
        let mut all = vec![self.estimator];
        all.extend_from_slice(&self.extra_estimators);
        all
    }

    /// Checks the optimizer settings against the model and the training-set size.
    pub fn validate(&self, model: &ModelConfig, train_examples: usize) -> Result<(), ConfigError> {
        self.validate_settings(model)?;
        if self.batch_size > train_examples {
            return Err(ConfigError::Invalid(format!(
                "batch size {} is larger than the training set ({} examples)",
                self.batch_size, train_examples
            )));
        }
        Ok(())
    }

    /// [`TrainConfig::validate_narrowed`] in f32, the arithmetic of the CUDA backend and of
    /// the CPU's f32 path.
    pub fn validate_in_f32(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        self.validate_narrowed(model, "f32", |value| value as f32 as f64)
    }

    /// The settings (and `model`'s epsilon) as a backend that computes in a narrower type
    /// than f64 takes them: `narrow` rounds an f64 to that type (`type_name`) and back. In
    /// f32, 1e39 is infinite, 1e-300 is 0 and 1 − 1e-12 is 1, whatever they are as f64.
    pub fn validate_narrowed(&self, model: &ModelConfig, type_name: &str, narrow: impl Fn(f64) -> f64) -> Result<(), ConfigError> {
        let show = |v: f64| if v != 0.0 && v.is_finite() && !(1e-4..1e6).contains(&v.abs()) { format!("{v:e}") } else { format!("{v}") };
        let bad = |what: &str, value: f64, must: &str| {
            Err(ConfigError::Invalid(format!(
                "{what} {} is {} in {type_name}, where it must be {must}",
                show(value),
                show(narrow(value))
            )))
        };
        let positive_and_finite = |value: f64| narrow(value) > 0.0 && narrow(value).is_finite();
        if !positive_and_finite(model.epsilon) {
            return bad("epsilon", model.epsilon, "positive and finite");
        }
        if !positive_and_finite(self.learning_rate) {
            return bad("learning rate", self.learning_rate, "positive and finite");
        }
        if narrow(self.momentum) >= 1.0 {
            return bad("momentum", self.momentum, "below 1");
        }
        for e in self.estimators() {
            if let Averaging::Ema { decay } = e.averaging {
                if !(narrow(decay) > 0.0 && narrow(decay) < 1.0) {
                    return bad("decay", decay, "strictly between 0 and 1");
                }
            }
        }
        Ok(())
    }

    /// What [`validate`](Self::validate) checks that the data does not decide: all but the
    /// batch's fit in the training set.
    pub fn validate_settings(&self, model: &ModelConfig) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!("learning rate must be positive and finite (got {})", self.learning_rate));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum must be in [0, 1) (got {})", self.momentum));
        }
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if model.batch_norm && self.batch_size == 1 {
            return bad("batch size 1 with batch normalization: the batch variance is 0 and every normalized value is 0; use a batch of 2 or more, or --no-bn".into());
        }
        for e in self.estimators() {
            if let Averaging::Ema { decay } = e.averaging {
                if !(decay > 0.0 && decay < 1.0) {
                    return bad(format!("decay must be strictly between 0 and 1 (got {decay})"));
                }
            }
        }
        Ok(())
    }
}
