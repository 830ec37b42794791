//! The CUDA backend: everything lives on the device (dataset, parameters, gradients, running
//! statistics, momentum, activations, loss accumulators); the host only launches and, at
//! evaluation points, reads back.
//!
//! - [`context`]: opening device 0 safely (no panic without a driver), loading the PTX
//!   modules that `build.rs` compiled from `cuda/*.cu`;
//! - [`kernels`]: one checked launcher per CUDA kernel (public so tests can drive them);
//! - [`gemm`]: the one row-major GEMM helper over cuBLAS;
//! - `backend`: [`CudaBackend`], the [`crate::backend::Backend`] implementation, whose
//!   training step is captured into a CUDA graph and replayed ([`StepLaunch`]).

mod backend;
pub mod context;
pub mod gemm;
pub mod gemm_tuning;
pub mod kernels;
pub mod phase_trace;

pub use backend::{cluster_refusals, device_bytes_needed, CudaBackend, CudaOptions, StepLaunch, FUSED_AUTO_MAX_BATCH, FUSED_AUTO_MAX_WIDTH};
pub use kernels::ClusterRequest;
pub use context::Gpu;

use cudarc::driver::{result::DriverError, sys::CUresult};
use thiserror::Error;

/// What `build.rs` produced: `KERNELS` (module name, PTX) or `None` without nvcc,
/// `PTX_ARCH` and `NVCC_VERSION`.
mod built {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Why the GPU cannot be used, or what failed on it. Every message is one line that ends by
/// pointing at the CPU backend.
#[derive(Debug, Error)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda was not found on the library path (on Docker, run with --gpus all); use --device cpu")]
    NoDriver,
    #[error("the CUDA driver sees no GPU; use --device cpu")]
    NoDevice,
    #[error("built without CUDA kernels: install nvcc and rebuild (see README); use --device cpu")]
    KernelsNotBuilt,
    #[error("the CUDA driver (version {driver}) is older than the PTX ISA {ptx_isa} of kernel module `{module}`: rebuild with an older nvcc or update the driver; use --device cpu")]
    PtxTooNew { module: String, ptx_isa: String, driver: String },
    #[error("out of GPU memory{}: free the GPU or use a smaller model or batch; use --device cpu", describe_bytes(*.bytes_needed))]
    OutOfMemory { bytes_needed: usize },
    #[error("CUDA kernel {kernel}: {message}; use --device cpu")]
    Launch { kernel: &'static str, message: String },
    /// The driver refused a launch for its shape or resources (cluster size, shared memory,
    /// registers) before running anything: nothing is lost, and the caller may launch
    /// another kernel instead.
    #[error("CUDA kernel {kernel}: the driver refused the launch: {message}; use --device cpu")]
    LaunchRefused { kernel: &'static str, message: String },
    #[error("CUDA driver error: {0}; use --device cpu")]
    Driver(String),
    #[error("cuBLAS error: {0}; use --device cpu")]
    Cublas(String),
}

/// What every [`CudaError`] message ends with.
const CPU_ADVICE: &str = "; use --device cpu";

impl CudaError {
    /// The message without its closing advice, for notices that already act on it (falling
    /// back to the CPU, or to another kernel).
    pub fn reason(&self) -> String {
        let message = self.to_string();
        message.strip_suffix(CPU_ADVICE).map_or_else(|| message.clone(), str::to_string)
    }
}

fn describe_bytes(bytes: usize) -> String {
    if bytes == 0 {
        String::new()
    } else {
        format!(" (needs {:.1} MiB)", bytes as f64 / (1 << 20) as f64)
    }
}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        match e.0 {
            CUresult::CUDA_ERROR_OUT_OF_MEMORY => CudaError::OutOfMemory { bytes_needed: 0 },
            CUresult::CUDA_ERROR_NO_DEVICE => CudaError::NoDevice,
            _ => CudaError::Driver(describe_driver_error(e)),
        }
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Cublas(format!("{:?}", e.0))
    }
}

/// `CUDA_ERROR_NAME (description)` on one line.
pub(crate) fn describe_driver_error(e: DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// Whether `build.rs` found nvcc and compiled the kernels into this binary.
pub fn kernels_built() -> bool {
    built::KERNELS.is_some()
}

/// Whether the CUDA driver library can be loaded (a `dlopen`, no driver call): where not,
/// `--device auto` runs on the CPU, and nothing of CUDA has started in this process.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library; nothing is called through it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// One line on how the kernels were built, for `bntrain info`.
pub fn build_info() -> String {
    match (built::KERNELS, built::NVCC_VERSION) {
        (Some(modules), Some(nvcc)) => {
            // Modules that asked build.rs for a newer target (fused_cluster: sm_90).
            let base = built::PTX_ARCH.strip_prefix("compute_").and_then(|n| n.parse::<u32>().ok());
            let newer: Vec<String> = modules
                .iter()
                .filter_map(|(name, ptx)| context::ptx_target(ptx).filter(|&t| base.is_some_and(|b| t > b)).map(|t| format!("{name}: compute_{t}")))
                .collect();
            let newer = if newer.is_empty() { String::new() } else { format!("; {}", newer.join(", ")) };
            format!("CUDA kernels: {} PTX modules for {}{newer} ({nvcc})", modules.len(), built::PTX_ARCH)
        }
        _ => "CUDA kernels: not built (nvcc was not found at build time)".to_string(),
    }
}

/// Opens the GPU exactly as [`CudaBackend::new`] would (driver, device 0, cuBLAS, every
/// kernel module) and returns the device's name. Never panics; used by `--device auto`
/// and `bntrain info`.
pub fn cuda_available() -> Result<String, CudaError> {
    Gpu::open().map(|gpu| gpu.name().to_string())
}
