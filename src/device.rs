//! Choosing where to train: the CPU reference, the CUDA backend, or whichever works.

use crate::backend::Backend;
use crate::backend::GemmPrecision;
use crate::cpu::{CpuBackend, CpuOptions, InputPath};
use crate::cuda::{CudaBackend, CudaOptions};
use crate::data::Dataset;
use crate::model::{ConfigError, ModelConfig, ModelParams, TrainConfig};
use crate::Result;
use std::str::FromStr;
use std::sync::Arc;

/// `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU and the kernels are there, else the CPU (with a notice).
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(format!("unknown device `{s}`: expected cpu, cuda or auto")),
        }
    }
}

/// The arithmetic a backend uses. The CPU computes in f32 or f64; CUDA in f32. With tf32 and
/// bf16 the GEMMs read their operands in that format (tensor cores on the GPU, an emulation
/// on the CPU) and everything else stays f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F64,
    Tf32,
    Bf16,
}

impl Precision {
    /// What the GEMMs read.
    pub fn gemm(self) -> GemmPrecision {
        match self {
            Precision::F32 | Precision::F64 => GemmPrecision::F32,
            Precision::Tf32 => GemmPrecision::Tf32,
            Precision::Bf16 => GemmPrecision::Bf16,
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "f64" | "fp64" => Ok(Precision::F64),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision `{s}`: expected f32, f64, tf32 or bf16")),
        }
    }
}

/// Resolves `--device auto` once: the device to use and, when falling back, why.
pub fn resolve(choice: DeviceChoice) -> (DeviceChoice, Option<String>) {
    match choice {
        DeviceChoice::Auto => match crate::cuda::cuda_available() {
            Ok(_) => (DeviceChoice::Cuda, None),
            Err(why) => (DeviceChoice::Cpu, Some(format!("no usable GPU, computing on the CPU: {}", why.reason()))),
        },
        other => (other, None),
    }
}

/// Opens a backend on a resolved device (`resolve` first for `Auto`).
pub fn open(
    device: DeviceChoice,
    precision: Precision,
    model: ModelConfig,
    train: TrainConfig,
    data: Arc<Dataset>,
    params: &ModelParams,
) -> Result<Box<dyn Backend>> {
    open_with(device, precision, InputPath::Auto, model, train, data, params)
}

/// [`open`], with the CPU backend's first-layer input path chosen (ignored by CUDA).
pub fn open_with(
    device: DeviceChoice,
    precision: Precision,
    cpu_input: InputPath,
    model: ModelConfig,
    train: TrainConfig,
    data: Arc<Dataset>,
    params: &ModelParams,
) -> Result<Box<dyn Backend>> {
    let cpu = CpuOptions { input: cpu_input, gemm: precision.gemm() };
    Ok(match (device, precision) {
        (DeviceChoice::Cpu, Precision::F64) => Box::new(CpuBackend::<f64>::with_options(model, train, data, params, cpu)?),
        (DeviceChoice::Cpu, _) => Box::new(CpuBackend::<f32>::with_options(model, train, data, params, cpu)?),
        (DeviceChoice::Cuda, Precision::F32 | Precision::Tf32 | Precision::Bf16) => {
            let options = CudaOptions { gemm: precision.gemm(), ..CudaOptions::from_env()? };
            Box::new(CudaBackend::with_options(model, train, data, params, options)?)
        }
        (DeviceChoice::Cuda, Precision::F64) => {
            return Err(ConfigError::Invalid("the CUDA backend computes in f32; use --precision f32, or --device cpu for f64".into()).into())
        }
        (DeviceChoice::Auto, _) => {
            let (resolved, _) = resolve(DeviceChoice::Auto);
            return open_with(resolved, precision, cpu_input, model, train, data, params);
        }
    })
}

/// Fails, before anything is allocated, where training `model` with batches of `batch`
/// would take more host memory than this machine has available (Linux's MemAvailable; no
/// check elsewhere): a failed allocation aborts the process instead of returning an error.
/// Counted, as a lower bound: the parameters in f64 (the copy every backend opens from), on
/// the CPU also the weights, gradients, momentum and an evaluation's copy in the backend's
/// float, and a batch's activations (z, BN's output and x̂, the activation, two gradients).
pub fn check_host_memory(model: &ModelConfig, batch: usize, device: DeviceChoice, precision: Precision) -> Result<()> {
    let Some(available) = available_host_bytes() else { return Ok(()) };
    let float = if precision == Precision::F64 { 8 } else { 4 };
    let (per_parameter, per_activation) = match device {
        DeviceChoice::Cpu => (8 + 4 * float, 6 * float),
        // The device holds the rest; the host converts the parameters once.
        DeviceChoice::Cuda | DeviceChoice::Auto => (8 + 4, 0),
    };
    let parameters = model.parameter_count().unwrap_or(usize::MAX) as f64;
    let activations = batch as f64 * model.widths().iter().sum::<usize>() as f64;
    let needed = parameters * per_parameter as f64 + activations * per_activation as f64;
    if needed > available as f64 {
        let gb = |bytes: f64| bytes / 1e9;
        return Err(ConfigError::Invalid(format!(
            "{model} with batches of {batch} needs at least {:.1} GB of memory to train ({parameters:.3e} parameters); this machine has {:.1} GB available",
            gb(needed), gb(available as f64)
        )).into());
    }
    Ok(())
}

/// Linux's estimate of the memory available to a new process, in bytes.
pub(crate) fn available_host_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}
