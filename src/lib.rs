//! bntrain: a batch-normalized MLP trainer with a CUDA backend and a CPU reference.
//!
//! The crate is laid out by concern:
//! - [`data`]: IDX reading, dataset location, download and checksum verification;
//! - [`model`]: configuration, parameters and safetensors checkpoints;
//! - [`cpu`]: the reference backend (readable, f64-capable: the oracle of every GPU test);
//! - [`cuda`]: the device-resident backend (cudarc kernels and cuBLAS);
//! - [`backend`]: the trait the training loop is generic over;
//! - [`train`]: the training loop, evaluation and metrics;
//! - [`report`]: figures, CSV/JSON and the reproduction report;
//! - [`tolerance`]: the one numeric comparison helper;
//! - [`progress`]: a run's progress on stderr, a bar or plain lines;
//! - [`interrupt`]: the work a prompt exit on a second Ctrl-C waits for.

pub mod atomic_file;
pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod device;
pub mod error;
pub mod interrupt;
pub mod model;
pub mod bench;
pub mod progress;
pub mod report;
pub mod session;
pub mod tolerance;
pub mod train;

pub use error::{Error, Result};
