//! The CUDA backend: everything lives on the device (dataset, parameters, gradients, running
//! statistics, momentum, activations, loss accumulators); the host only launches and, at
//! evaluation points, reads back.
//!
//! - [`context`]: opening device 0 safely (no panic without a driver), loading the kernel
//!   modules that `build.rs` compiled from `cuda/*.cu`;
//! - [`fatbin`]: what those modules' fat binaries hold (PTX, machine code for which GPUs);
//! - [`kernels`]: one checked launcher per CUDA kernel (public so tests can drive them);
//! - [`gemm`]: the one row-major GEMM helper over cuBLAS;
//! - `backend`: [`CudaBackend`], the [`crate::backend::Backend`] implementation, whose
//!   training step is captured into a CUDA graph and replayed ([`StepLaunch`]).

mod backend;
pub mod context;
pub mod fatbin;
pub mod gemm;
pub mod gemm_tuning;
pub mod kernels;
mod options;
pub mod phase_trace;
pub mod timeline;

pub use backend::{cluster_refusals, device_bytes_needed, CudaBackend};
pub use options::{CudaOptions, StepLaunch, FUSED_AUTO_MAX_BATCH, FUSED_AUTO_MAX_WIDTH};
pub use kernels::ClusterRequest;
pub use context::Gpu;

use cudarc::driver::{result::DriverError, sys::CUresult};
use thiserror::Error;

/// What `build.rs` produced: `KERNELS` (module name, fat binary) or `None` without nvcc,
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
    #[error("the CUDA driver (version {driver}) is older than CUDA {needed}, which this build's kernels and cuBLAS need: update the driver; use --device cpu")]
    DriverTooOld { driver: String, needed: String },
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

/// One line on how the kernels were built, for `bntrain info`: the PTX target, the GPUs
/// with machine code, and the modules that differ (fused_cluster: compute_90, sm_90).
pub fn build_info() -> String {
    match (built::KERNELS, built::NVCC_VERSION) {
        (Some(modules), Some(nvcc)) => {
            let contents: Vec<(&str, Vec<fatbin::Entry>)> = modules.iter().map(|&(name, image)| (name, fatbin::entries(image).unwrap_or_default())).collect();
            let describe = |entries: &[fatbin::Entry]| -> String {
                let sass = fatbin::sass_archs(entries);
                let ptx = fatbin::ptx_target(entries).map_or_else(|| "unreadable".to_string(), |t| format!("compute_{t}"));
                if sass.is_empty() {
                    format!("PTX {ptx}, no machine code")
                } else {
                    format!("PTX {ptx}, machine code for {}", sass.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(", "))
                }
            };
            // The most common description is the build's; the others are listed by module.
            let mut kinds: Vec<(String, usize)> = Vec::new();
            for (_, entries) in &contents {
                let d = describe(entries);
                match kinds.iter_mut().find(|(k, _)| *k == d) {
                    Some((_, n)) => *n += 1,
                    None => kinds.push((d, 1)),
                }
            }
            let common = kinds.iter().max_by_key(|(_, n)| *n).map(|(k, _)| k.clone()).unwrap_or_default();
            let others: Vec<String> = contents.iter().map(|(name, e)| (name, describe(e))).filter(|(_, d)| *d != common).map(|(name, d)| format!("{name}: {d}")).collect();
            let others = if others.is_empty() { String::new() } else { format!("; {}", others.join("; ")) };
            format!("CUDA kernels: {} modules, {common}{others} ({nvcc})", modules.len())
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
