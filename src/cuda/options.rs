//! How the CUDA backend runs a step and what it is built with: [`StepLaunch`] (eager
//! launches, a CUDA graph, or whole steps in one kernel) and [`CudaOptions`], with their
//! environment variables (`BNTRAIN_CUDA_STEP` and the `BNTRAIN_FUSED_*` family).

use super::backend::EVAL_CHUNK;
use super::kernels::{self, ClusterRequest};
use crate::backend::GemmPrecision;
use crate::model::{ConfigError, ModelConfig};

/// How [`CudaBackend::train_step`](crate::backend::Backend::train_step) submits a step's operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepLaunch {
    /// Every operation launched on its own, every step (16 launches for the seed network).
    Eager,
    /// The step captured once into a CUDA graph, then one graph launch per step. The first
    /// step after construction runs eagerly (a warm-up: kernels and cuBLAS initialize
    /// outside the capture); the second is captured. If capture fails, every step runs
    /// eagerly from then on, after a one-line notice on stderr. Capture wants the process's
    /// other threads to leave the device alone meanwhile: a device-wide synchronization from
    /// another thread (cudaDeviceSynchronize, or cublasDestroy, which calls it) invalidates
    /// it, and the backend falls back.
    Graph,
    /// Whole steps in one cooperative kernel (cuda/fused_step.cu): one launch per step, or
    /// per run of steps through [`Backend::train_steps`](crate::backend::Backend::train_steps). f32 GEMMs only; where the device
    /// or the request does not allow it (no cooperative launch, tf32/bf16, no hidden
    /// layer), the backend says so on stderr and captures graphs instead.
    Fused,
    /// The default: [`StepLaunch::Fused`] for networks of the seed's scale (f32, hidden
    /// layers at most [`FUSED_AUTO_MAX_WIDTH`] wide, batches of at most
    /// [`FUSED_AUTO_MAX_BATCH`]), where one block per neuron keeps the GPU busy enough
    /// (seed step on an H200: 42.5 µs fused, 62.6 µs as a graph); [`StepLaunch::Graph`]
    /// otherwise (wide network: 372.5 µs as a graph, 3348.3 µs fused), and also, silently,
    /// where the fused kernel cannot run.
    Auto,
}

/// [`StepLaunch::Auto`] fuses networks whose hidden layers are at most this wide…
pub const FUSED_AUTO_MAX_WIDTH: usize = 256;
/// …and whose batches are at most this large: between the two measured networks (hidden
/// 100, batch 60, where fusing wins 1.5×; hidden 1024, batch 1024, where it loses 7×), a
/// block per neuron does work proportional to batch × inputs, serially over a few warps.
pub const FUSED_AUTO_MAX_BATCH: usize = 256;

impl StepLaunch {
    /// What [`StepLaunch::Auto`] means for this network and GEMM precision; the others as
    /// they are.
    pub fn resolve(self, model: &ModelConfig, batch: usize, gemm: GemmPrecision) -> StepLaunch {
        match self {
            StepLaunch::Auto => {
                let small = !model.hidden.is_empty() && model.hidden.iter().all(|&w| w <= FUSED_AUTO_MAX_WIDTH) && batch <= FUSED_AUTO_MAX_BATCH;
                if small && gemm == GemmPrecision::F32 { StepLaunch::Fused } else { StepLaunch::Graph }
            }
            chosen => chosen,
        }
    }
}

/// Construction options of a [`CudaBackend`](super::CudaBackend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    pub step_launch: StepLaunch,
    /// What cuBLAS's GEMMs read: f32 (the default, bitwise deterministic sgemm), or TF32 /
    /// bf16 operands on tensor cores with f32 accumulation.
    pub gemm: GemmPrecision,
    /// Rows per chunk when evaluating a whole split ([`EVAL_CHUNK`] by default).
    pub eval_chunk: usize,
    /// Fused steps keep layer inputs and weight rows in shared memory (the staged kernel of
    /// cuda/fused_step.cu). Off by default: slower on an H100 (docs/perf.md); `BNTRAIN_FUSED_STAGE=1`.
    pub fused_staging: bool,
    /// Two fused networks trained in lockstep (the study's comparison) run in one launch
    /// ([`Backend::train_steps_with`](crate::backend::Backend::train_steps_with)). On by default: the seed's BN+plain pair took 42.2
    /// and 42.5 µs a step in one launch against 46.7 and 46.9 µs in two (H100, two calls of
    /// scripts/gpu-check.sh, docs/perf.md); `BNTRAIN_FUSED_PAIR=0` turns it off.
    pub fused_pairing: bool,
    /// GEMMs of at least [`super::gemm_tuning::TUNE_MIN_MACS`] multiply-adds run the
    /// fastest of cuBLAS's kernel and cublasLt's candidates, timed on first use
    /// ([`super::gemm_tuning`]). Off by default: 1 % on the wide f32 step, and the study
    /// slower by its tuning (H100, docs/perf.md); `BNTRAIN_GEMM_TUNE=1`.
    pub gemm_tuning: bool,
    /// Fused steps in one thread-block cluster per network (cuda/fused_cluster.cu, compute
    /// capability 9.0 and newer) instead of the grid kernels. Off by default: slower on an H100;
    /// `BNTRAIN_FUSED_CLUSTER=1` (16 blocks where they fit, else 8), `=8` or `=16`.
    pub fused_cluster: ClusterRequest,
    /// Evaluation points ([`Backend::begin_point`](crate::backend::Backend::begin_point)) run on a stream of their own, on a copy
    /// of the state, beside the steps queued after them, rather than before those steps on
    /// the training stream. Off by default: within the noise on an H100; `BNTRAIN_EVAL_STREAM=1`.
    pub eval_stream: bool,
    /// Graph and eager steps compute each layer's weight gradient on a second stream,
    /// beside the gradient of the layer's input and what follows it on the training stream
    /// (cuBLAS's tiles for the wide network's 1024 × 1024 products fill half of an H100's
    /// SMs). None, the default: on with f32 GEMMs, off with tf32 and bf16 (H100, two calls:
    /// the wide f32 step 5.4 and 5.6 % faster, the seed's graph step 5 %, the wide tf32
    /// step 5 % slower; docs/perf.md); [`CudaOptions::second_backward_stream`] resolves it.
    /// `BNTRAIN_BACKWARD_STREAMS=1` or `0` sets it either way.
    pub backward_streams: Option<bool>,
    /// Threads per block of the unstaged fused kernel: 256, 512 (the default) or 1024 (more
    /// warps an SM to wait on L2 for a block's neuron). On an H100 512 made the seed step
    /// 6.5 % faster alone; on an H200 38.39 µs against 43.47 in blocks of 256 and 40.30 in
    /// blocks of 1024 (docs/perf.md, twenty-first session). The study's comparison in two
    /// launches took 3.62 s in blocks of 512 against 2.87 s paired (its two networks' blocks
    /// no longer share SMs). The staged, pair and cluster kernels keep 256 (so a paired study
    /// ignores it), and so does a network alone that must equal the pair kernel bit for bit.
    /// `BNTRAIN_FUSED_THREADS`.
    pub fused_threads: u32,
    /// Blocks of 512 threads run the kernel compiled for them (`fused_train_steps_512_f32`,
    /// one block an SM: up to 128 registers a thread) rather than the one bounded by blocks
    /// of 1024 (64 registers a thread): the same code and sums, bitwise the same results,
    /// with room for more loads in flight: on an H200 the seed step took 38.39 µs on it
    /// against 39.22 on the bounded one (docs/perf.md). On by default;
    /// `BNTRAIN_FUSED_512_KERNEL=0` runs the bounded kernel instead. Other block sizes run
    /// the bounded kernel whatever this says.
    pub fused_512_kernel: bool,
    /// Fused steps on the one-barrier kernel (cuda/fused_replicated.cuh: the layers above the
    /// first computed whole in every block, one grid barrier a step) in blocks of this many
    /// threads, where the network fits its layout; the study's two networks then take a launch
    /// each. Off (None) by default until a GPU has measured it; `BNTRAIN_FUSED_REPLICATED=1`
    /// (512 threads), `=256` or `=512`.
    pub fused_replicated: Option<u32>,
    /// At most this many blocks for the one-barrier kernel (None: one per neuron of the first
    /// layer and a writer, as many as the device keeps resident), each then owning more of the
    /// first layer's neurons. At one block an SM, the study's two networks (101 blocks each
    /// for the seed) cannot run at once on an H100's 132 SMs; at 50 each (two neurons a block)
    /// they can, if the driver runs their launches side by side, as it did the grid kernel's
    /// (docs/perf.md).
    /// Unset until measured; `BNTRAIN_FUSED_REPLICATED_GRID=N`.
    pub fused_replicated_grid: Option<u32>,
    /// Records a timing event around every run of steps and evaluation point, for
    /// [`Backend::timeline`](crate::backend::Backend::timeline) (`bntrain train` prints its
    /// rows). Off by default; `BNTRAIN_TIMELINE=1`.
    pub timeline: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            step_launch: StepLaunch::Auto,
            gemm: GemmPrecision::F32,
            eval_chunk: EVAL_CHUNK,
            fused_staging: false,
            fused_pairing: true,
            gemm_tuning: false,
            fused_cluster: ClusterRequest::Off,
            eval_stream: false,
            backward_streams: None,
            fused_threads: 512,
            fused_512_kernel: true,
            fused_replicated: None,
            fused_replicated_grid: None,
            timeline: false,
        }
    }
}

/// An environment variable's value; None where it is unset, an error where it is not text
/// (rather than reading it as unset and silently taking the default).
fn env_text(name: &str) -> Result<Option<String>, ConfigError> {
    text_of(name, std::env::var_os(name))
}

/// [`env_text`] for the value `value` of `name`.
fn text_of(name: &str, value: Option<std::ffi::OsString>) -> Result<Option<String>, ConfigError> {
    value
        .map(|value| value.into_string().map_err(|value| ConfigError::Invalid(format!("{name}={} is not valid UTF-8", value.to_string_lossy()))))
        .transpose()
}

impl CudaOptions {
    /// The environment switch read by [`CudaOptions::from_env`].
    pub const STEP_ENV: &'static str = "BNTRAIN_CUDA_STEP";
    /// The switch for [`CudaOptions::fused_staging`]: `1` on, `0` or unset off.
    pub const STAGE_ENV: &'static str = "BNTRAIN_FUSED_STAGE";
    /// The switch for [`CudaOptions::fused_pairing`]: `0` off, `1` or unset on.
    pub const PAIR_ENV: &'static str = "BNTRAIN_FUSED_PAIR";
    /// The switch for [`CudaOptions::gemm_tuning`]: `1` on, `0` or unset off.
    pub const GEMM_TUNE_ENV: &'static str = "BNTRAIN_GEMM_TUNE";
    /// The switch for [`CudaOptions::fused_cluster`]: `0` or unset off, `1`, `8` or `16`.
    pub const CLUSTER_ENV: &'static str = "BNTRAIN_FUSED_CLUSTER";
    /// The switch for [`CudaOptions::eval_stream`]: `1` on, `0` or unset off.
    pub const EVAL_STREAM_ENV: &'static str = "BNTRAIN_EVAL_STREAM";
    /// The switch for [`CudaOptions::timeline`]: `1` on, `0` or unset off.
    pub const TIMELINE_ENV: &'static str = "BNTRAIN_TIMELINE";
    /// The switch for [`CudaOptions::backward_streams`]: `1` on, `0` off, unset: with f32 GEMMs only.
    pub const BACKWARD_STREAMS_ENV: &'static str = "BNTRAIN_BACKWARD_STREAMS";
    /// The switch for [`CudaOptions::fused_threads`]: `256`, `512` or `1024`.
    pub const FUSED_THREADS_ENV: &'static str = "BNTRAIN_FUSED_THREADS";
    /// The switch for [`CudaOptions::fused_512_kernel`]: `0` off, `1` or unset on.
    pub const FUSED_512_KERNEL_ENV: &'static str = "BNTRAIN_FUSED_512_KERNEL";
    /// The switch for [`CudaOptions::fused_replicated`]: `0` or unset off, `1` (512 threads),
    /// `256` or `512`.
    pub const REPLICATED_ENV: &'static str = "BNTRAIN_FUSED_REPLICATED";
    /// The switch for [`CudaOptions::fused_replicated_grid`]: a count of blocks, `0` or unset
    /// for no cap.
    pub const REPLICATED_GRID_ENV: &'static str = "BNTRAIN_FUSED_REPLICATED_GRID";

    /// The defaults, with the step's launch from `BNTRAIN_CUDA_STEP` (`auto`, the default;
    /// `graph`; `eager`; `fused`), staging from `BNTRAIN_FUSED_STAGE`, pairing from
    /// `BNTRAIN_FUSED_PAIR`, GEMM tuning from `BNTRAIN_GEMM_TUNE`, clusters from
    /// `BNTRAIN_FUSED_CLUSTER`, the evaluation stream from `BNTRAIN_EVAL_STREAM`, the
    /// backward's second stream from `BNTRAIN_BACKWARD_STREAMS`, the block size from
    /// `BNTRAIN_FUSED_THREADS` (its kernel from `BNTRAIN_FUSED_512_KERNEL`) and the one-barrier kernel from `BNTRAIN_FUSED_REPLICATED`
    /// (its grid's cap from `BNTRAIN_FUSED_REPLICATED_GRID`); each unset (or empty) variable
    /// leaves [`CudaOptions::default`]'s choice.
    pub fn from_env() -> Result<Self, ConfigError> {
        let options = Self::from_step_env(env_text(Self::STEP_ENV)?.as_deref())?;
        let switch = |name: &str, default: bool| Ok::<_, ConfigError>(Self::switch_from_env(name, env_text(name)?.as_deref())?.unwrap_or(default));
        Ok(CudaOptions {
            fused_staging: switch(Self::STAGE_ENV, options.fused_staging)?,
            fused_pairing: switch(Self::PAIR_ENV, options.fused_pairing)?,
            gemm_tuning: switch(Self::GEMM_TUNE_ENV, options.gemm_tuning)?,
            eval_stream: switch(Self::EVAL_STREAM_ENV, options.eval_stream)?,
            timeline: switch(Self::TIMELINE_ENV, options.timeline)?,
            backward_streams: Self::switch_from_env(Self::BACKWARD_STREAMS_ENV, env_text(Self::BACKWARD_STREAMS_ENV)?.as_deref())?
                .or(options.backward_streams),
            fused_cluster: Self::cluster_from_env(env_text(Self::CLUSTER_ENV)?.as_deref())?.unwrap_or(options.fused_cluster),
            fused_threads: Self::threads_from_env(env_text(Self::FUSED_THREADS_ENV)?.as_deref())?.unwrap_or(options.fused_threads),
            fused_512_kernel: switch(Self::FUSED_512_KERNEL_ENV, options.fused_512_kernel)?,
            fused_replicated: Self::replicated_from_env(env_text(Self::REPLICATED_ENV)?.as_deref())?.unwrap_or(options.fused_replicated),
            fused_replicated_grid: Self::replicated_grid_from_env(env_text(Self::REPLICATED_GRID_ENV)?.as_deref())?
                .unwrap_or(options.fused_replicated_grid),
            ..options
        })
    }

    /// Whether graph and eager steps put the weight gradients on a second stream: as asked,
    /// else with f32 GEMMs only (see [`CudaOptions::backward_streams`]).
    pub fn second_backward_stream(&self) -> bool {
        self.backward_streams.unwrap_or(self.gemm == GemmPrecision::F32)
    }

    /// [`CudaOptions::fused_threads`] for a value of `BNTRAIN_FUSED_THREADS`; None where it
    /// is unset or empty (the default stands).
    pub fn threads_from_env(value: Option<&str>) -> Result<Option<u32>, ConfigError> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if kernels::FUSED_BLOCK_THREADS.contains(&n) => Ok(Some(n)),
                _ => Err(ConfigError::Invalid(format!("{}={v}: expected 256, 512 or 1024", Self::FUSED_THREADS_ENV))),
            },
        }
    }

    /// [`CudaOptions::fused_replicated`] for a value of `BNTRAIN_FUSED_REPLICATED`; None where
    /// it is unset or empty (the default stands).
    pub fn replicated_from_env(value: Option<&str>) -> Result<Option<Option<u32>>, ConfigError> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some("0") => Ok(Some(None)),
            Some("1") => Ok(Some(Some(kernels::REPLICATED_BLOCK_THREADS[1]))),
            Some(v) => match v.parse::<u32>() {
                Ok(n) if kernels::REPLICATED_BLOCK_THREADS.contains(&n) => Ok(Some(Some(n))),
                _ => Err(ConfigError::Invalid(format!("{}={v}: expected 0, 1, 256 or 512", Self::REPLICATED_ENV))),
            },
        }
    }

    /// [`CudaOptions::fused_replicated_grid`] for a value of `BNTRAIN_FUSED_REPLICATED_GRID`;
    /// None where it is unset or empty (the default stands).
    pub fn replicated_grid_from_env(value: Option<&str>) -> Result<Option<Option<u32>>, ConfigError> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) => match v.parse::<u32>() {
                Ok(0) => Ok(Some(None)),
                Ok(n) => Ok(Some(Some(n))),
                Err(_) => Err(ConfigError::Invalid(format!("{}={v}: expected a count of blocks (0 for no cap)", Self::REPLICATED_GRID_ENV))),
            },
        }
    }

    /// [`CudaOptions::fused_cluster`] for a value of `BNTRAIN_FUSED_CLUSTER`; None where it
    /// is unset or empty (the default stands).
    pub fn cluster_from_env(value: Option<&str>) -> Result<Option<ClusterRequest>, ConfigError> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some("0") => Ok(Some(ClusterRequest::Off)),
            Some("1") => Ok(Some(ClusterRequest::Auto)),
            Some("8") => Ok(Some(ClusterRequest::Blocks(8))),
            Some("16") => Ok(Some(ClusterRequest::Blocks(16))),
            Some(other) => Err(ConfigError::Invalid(format!("{}={other}: expected 0, 1, 8 or 16", Self::CLUSTER_ENV))),
        }
    }

    /// An on/off switch `name` for its value; None where it is unset or empty (the default
    /// stands), so that `0` turns off an option that becomes a default.
    pub fn switch_from_env(name: &str, value: Option<&str>) -> Result<Option<bool>, ConfigError> {
        match value.map(str::trim) {
            None | Some("") => Ok(None),
            Some("0") => Ok(Some(false)),
            Some("1") => Ok(Some(true)),
            Some(other) => Err(ConfigError::Invalid(format!("{name}={other}: expected 0 or 1"))),
        }
    }

    /// [`CudaOptions::from_env`] for a given value of the switch (None: unset).
    pub fn from_step_env(value: Option<&str>) -> Result<Self, ConfigError> {
        let step_launch = match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => StepLaunch::Auto,
            Some("graph") => StepLaunch::Graph,
            Some("eager") => StepLaunch::Eager,
            Some("fused") => StepLaunch::Fused,
            Some(other) => {
                return Err(ConfigError::Invalid(format!("{}={other}: expected auto, graph, eager or fused", Self::STEP_ENV)))
            }
        };
        Ok(CudaOptions { step_launch, ..Self::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that is not text is refused, not read as unset (which would take the default).
    #[test]
    fn an_environment_value_that_is_not_text_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let name = "BNTRAIN_FUSED_THREADS";
        assert_eq!(text_of(name, None).unwrap(), None);
        let err = text_of(name, Some(std::ffi::OsStr::from_bytes(b"1\xff").to_os_string())).unwrap_err().to_string();
        assert!(err.contains("BNTRAIN_FUSED_THREADS=1\u{fffd} is not valid UTF-8"), "{err}");
        assert_eq!(text_of(name, Some("512".into())).unwrap().as_deref(), Some("512"));
    }
}
