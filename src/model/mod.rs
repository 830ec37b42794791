//! The network: its configuration, its parameters and their checkpoints.

pub mod checkpoint;
pub mod config;
pub mod params;

pub use checkpoint::CheckpointError;
pub use config::{
    Activation, Averaging, BatchOrder, ConfigError, LossReduction, ModelConfig, StatsEstimator,
    TrainConfig, VarianceKind,
};
pub use params::{BatchNormParams, LayerParams, ModelParams, RunningStats};
