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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
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
            Err(why) => (DeviceChoice::Cpu, Some(format!("no usable GPU, training on the CPU ({why})"))),
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
