//! Opening the GPU: the driver and cuBLAS libraries are loaded at run time (cudarc's dynamic
//! loading), so a machine without them runs the CPU backend; this module checks for them
//! before the first driver call (which would panic otherwise), opens device 0, creates one
//! stream and one cuBLAS handle on it (with a workspace of its own, so that cuBLAS calls can
//! be captured into a CUDA graph), and loads every kernel module `build.rs` compiled (fat
//! binaries: PTX, and machine code for the GPUs build.rs was asked for).

use super::{built, describe_driver_error, fatbin, CudaError};
use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::cublaslt::{result as lt_result, sys as lt_sys};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The handles of every kernel in `cuda/*.cu`, loaded from their modules (a clone shares
/// the modules).
#[derive(Clone)]
pub(crate) struct Functions {
    pub gather_rows: CudaFunction,
    pub bn_act_fwd_train: CudaFunction,
    pub bn_column_moments: CudaFunction,
    pub bn_act_fwd_train_parts: CudaFunction,
    pub bn_act_fwd_infer: CudaFunction,
    pub act_bn_bwd: CudaFunction,
    pub bias_act_fwd: CudaFunction,
    pub act_bwd_bias_grad: CudaFunction,
    pub softmax_xent: CudaFunction,
    pub running_stats_update: CudaFunction,
    pub sgd_update: CudaFunction,
    pub fused_train_steps: CudaFunction,
    /// The same kernel bounded by blocks of 512 threads, not 1024 (more registers a thread).
    pub fused_train_steps_512: CudaFunction,
    pub fused_train_steps_staged: CudaFunction,
    pub fused_train_pair: CudaFunction,
    pub fused_train_pair_staged: CudaFunction,
    /// The one-barrier kernel (cuda/fused_replicated.cuh) and its shared-memory layout query.
    pub fused_train_steps_replicated: CudaFunction,
    pub fused_replicated_layout_bytes: CudaFunction,
    pub count_non_finite: CudaFunction,
    pub round_to_bf16: CudaFunction,
    pub small_gemm_dot: CudaFunction,
    pub small_gemm_outer: CudaFunction,
    /// cuda/fused_cluster.cu, on GPUs of compute capability 9.0 and newer only.
    pub fused_cluster: Option<ClusterFunctions>,
}

/// The thread-block-cluster kernels (cuda/fused_cluster.cu).
#[derive(Clone)]
pub(crate) struct ClusterFunctions {
    pub layout_bytes: CudaFunction,
    /// One network: clusters of 8 and of 16 blocks.
    pub one: [CudaFunction; 2],
    /// Two networks, a cluster each: of 8 and of 16 blocks.
    pub pair: [CudaFunction; 2],
}

/// An open GPU: context, the one stream everything runs on (in order, so no events are
/// needed), a cuBLAS handle bound to that stream with its workspace, and the kernels.
/// [`Gpu::open_lane`] opens a second one on the same context and modules, with a stream,
/// handle and scratch of its own; work crossing the two is ordered by events.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Bound to `stream` once: cublasSetStream would also reset the workspace below.
    pub(crate) blas: CudaBlas,
    /// A cublasLt handle for tuned GEMMs (see [`super::gemm_tuning`]), created on first use;
    /// `None` where libcublasLt is missing or its handle could not be created (GEMMs then
    /// stay on cuBLAS).
    lt: std::sync::OnceLock<Option<LtHandle>>,
    /// The handles' workspace (cuBLAS's, and cublasLt's products': one stream orders them).
    /// Declared after both handles so that it is freed after they are destroyed (fields
    /// drop in declaration order).
    blas_workspace: CudaSlice<u8>,
    blas_workspace_ptr: u64,
    pub(crate) functions: Functions,
    /// The fused kernels' module, for its `fused_trace` pointer (see [`Gpu::set_fused_trace`]).
    fused_module: Arc<CudaModule>,
    /// Compute capability (major, minor).
    capability: (i32, i32),
    name: String,
    /// bf16 GEMMs: the two operands rounded to bf16 (cuda/bf16.cu), see
    /// [`Gpu::reserve_bf16_operands`]. Allocated on first use, grown when too small.
    bf16_operands: Mutex<Option<Bf16Operands>>,
    /// How many times the bf16 scratch was (re)allocated: a CUDA graph captured before the
    /// last time holds freed addresses (see [`Gpu::bf16_operands_generation`]).
    bf16_operands_generation: AtomicU64,
    /// Whether small f32 GEMMs go to cuda/small_gemm.cu instead of cuBLAS: off unless
    /// `BNTRAIN_SMALL_GEMM=1` (on an H100 and an H200 they beat cuBLAS only under eager
    /// launches, see [`super::gemm::SMALL_GEMM_MAX_MACS`]).
    small_gemm: AtomicBool,
    /// Whether large GEMMs pick their algorithm by timing (a backend sets it from
    /// [`super::CudaOptions::gemm_tuning`]).
    gemm_tuning: AtomicBool,
    /// The softmax's scratch (a lock only because launches take `&Gpu`: one stream orders
    /// the launches that use it).
    pub(crate) softmax_partials: Mutex<SoftmaxPartials>,
}

/// The environment switch that turns the small-GEMM kernels on (`1`).
pub const SMALL_GEMM_ENV: &str = "BNTRAIN_SMALL_GEMM";

/// A cublasLt handle, destroyed on drop.
struct LtHandle(lt_sys::cublasLtHandle_t);

// SAFETY: the handle is not tied to the thread that created it, and cuBLAS documents its
// handles as usable from several host threads as long as their configuration does not
// change, which this one's never does (each product brings its own descriptors).
unsafe impl Send for LtHandle {}
unsafe impl Sync for LtHandle {}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle`, destroyed once, after its last product
        // (a `Gpu` drops it before its workspace, and the stream's work holds no handle).
        let _ = unsafe { lt_result::destroy_handle(self.0) };
    }
}

/// Scratch for one bf16 GEMM's operands: `len` bf16 values (u16 bits) each.
pub(crate) struct Bf16Operands {
    pub a: CudaSlice<u16>,
    pub b: CudaSlice<u16>,
    pub len: usize,
}

/// Scratch of the multi-block softmax (cuda/softmax_xent.cu): per-block partial sums and
/// the ticket that elects the block adding them up (zero between launches). Sized once, in
/// [`Gpu::open`], for the most blocks and classes the launcher allows, so its address never
/// changes: a captured step keeps it.
pub(crate) struct SoftmaxPartials {
    pub loss: CudaSlice<f64>,
    pub correct: CudaSlice<u64>,
    pub dbias: CudaSlice<f32>,
    pub ticket: CudaSlice<u32>,
}

/// Blocks of the multi-block softmax at most; must match SOFTMAX_MAX_BLOCKS.
pub(crate) const SOFTMAX_MAX_BLOCKS: usize = 128;
/// Classes the kernels handle at most (predictions are bytes).
pub(crate) const MAX_CLASSES: usize = 256;

thread_local! {
    /// Set while [`panic_as_message`] runs on this thread: its panics are reported as errors.
    static PANIC_BECOMES_ERROR: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Where the last such panic happened: the report the quiet hook does not print keeps it.
    static CAUGHT_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f`, turning a panic into its message and where it happened. The panic hook stays
/// quiet for it: the default hook would print "thread 'main' panicked at …" and a backtrace
/// note above the one-line error the caller makes of it. Panics elsewhere, or on this thread
/// outside `f`, are reported by whatever hook was installed before.
fn panic_as_message<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if PANIC_BECOMES_ERROR.with(std::cell::Cell::get) {
                CAUGHT_AT.with(|at| *at.borrow_mut() = info.location().map(|l| format!("{}:{}", l.file(), l.line())));
            } else {
                previous(info);
            }
        }));
    });
    let was = PANIC_BECOMES_ERROR.with(|flag| flag.replace(true));
    // Only this call's panic: not one that `f` caught itself earlier.
    let outcome = std::panic::catch_unwind(|| {
        CAUGHT_AT.with(|at| at.borrow_mut().take());
        f()
    });
    PANIC_BECOMES_ERROR.with(|flag| flag.set(was));
    outcome.map_err(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        match CAUGHT_AT.with(|at| at.borrow_mut().take()) {
            Some(at) => format!("{what} (at {at})"),
            None => what,
        }
    })
}

/// Bytes of the cuBLAS workspace: the sizes cuBLAS's documentation recommends for
/// `cublasSetWorkspace` (32 MiB for Hopper, compute capability 9, and newer; 4 MiB before).
/// A workspace too small makes cuBLAS fail or pick slower algorithms.
fn blas_workspace_bytes(compute_major: i32) -> usize {
    if compute_major >= 9 { BLAS_WORKSPACE_MAX } else { 4 << 20 }
}

/// The largest workspace [`blas_workspace_bytes`] asks for (memory estimates count it).
pub(crate) const BLAS_WORKSPACE_MAX: usize = 32 << 20;

/// cuBLAS requires a workspace aligned to 256 bytes.
const BLAS_WORKSPACE_ALIGN: u64 = 256;

impl Gpu {
    /// Opens device 0. Fails (never panics) when the kernels were not built, when libcuda
    /// or libcublas is absent, when there is no device, or when the driver rejects the PTX.
    pub fn open() -> Result<Gpu, CudaError> {
        let modules = built::KERNELS.ok_or(CudaError::KernelsNotBuilt)?;
        // SAFETY: these only try to dlopen the libraries; nothing is called through them.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err(CudaError::Cublas("libcublas was not found on the library path (install the CUDA runtime libraries)".into()));
        }
        // cudarc resolves each symbol on first use and panics if the driver lacks it (a
        // driver far older than CUDA 13): turn that into an error instead of a crash.
        match panic_as_message(|| Self::open_device(modules)) {
            Ok(result) => result,
            Err(what) => Err(CudaError::Driver(format!("the CUDA libraries could not be used: {}", what.replace('\n', " ")))),
        }
    }

    fn open_device(modules: &[(&str, &[u8])]) -> Result<Gpu, CudaError> {
        // Before anything else: the machine code loads on an older driver of another major
        // version only to have cuBLAS fail later with an opaque NOT_INITIALIZED.
        if let Some(needed) = built::NVCC_VERSION.and_then(cuda_major) {
            let version = driver_version_code()?;
            if version / 1000 < needed {
                return Err(CudaError::DriverTooOld { driver: describe_version(version), needed: format!("{needed}.0") });
            }
        }
        if CudaContext::device_count()? < 1 {
            return Err(CudaError::NoDevice);
        }
        let ctx = CudaContext::new(0)?;
        // One stream, used in order by everything: cudarc's per-buffer event tracking is
        // pure overhead here (and would put event nodes into a captured graph).
        // SAFETY: disabled before any buffer exists, and every buffer, launch and copy of
        // this Gpu goes through `stream`, so work on a buffer is ordered by the stream.
        unsafe { ctx.disable_event_tracking() };
        // A non-default stream: the training step is captured into a CUDA graph on it (the
        // legacy default stream cannot be captured).
        let stream = ctx.new_stream()?;
        let name = ctx.name()?;

        // Modules first: a driver older than the PTX fails here with a message that says so,
        // where cuBLAS creation would fail first with an opaque NOT_INITIALIZED.
        let capability = (
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let (major, minor) = (capability.0.max(0) as u32, capability.1.max(0) as u32);
        // A module built for a newer GPU than this one (fused_cluster: compute_90, sm_90) is
        // left out; what needs it is then unavailable. (An image fatbin.rs cannot read is
        // loaded all the same: the driver decides.)
        let modules: Vec<(&str, &[u8], Vec<fatbin::Entry>)> = modules
            .iter()
            .map(|&(module, image)| (module, image, fatbin::entries(image).unwrap_or_default()))
            .filter(|(_, _, contents)| fatbin::runs_natively(contents, major, minor) || fatbin::ptx_target(contents).is_none_or(|target| target <= major * 10 + minor))
            .collect();
        if modules.iter().any(|(_, _, contents)| !contents.is_empty() && !fatbin::runs_natively(contents, major, minor)) {
            jit_notice(major, minor);
        }
        let mut loaded = Vec::with_capacity(modules.len());
        for (module, image, contents) in modules {
            let handle = match ctx.load_module(Ptx::from_binary(image.to_vec())) {
                Ok(handle) => handle,
                // The cluster kernels are optional: a GPU their image has no code for (should
                // the filter above have misread it) goes on without them.
                Err(e) if module == "fused_cluster" && e.0 == sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => continue,
                Err(e) => {
                    return Err(match e.0 {
                        sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => CudaError::PtxTooNew {
                            module: module.to_string(),
                            ptx_isa: fatbin::ptx_isa(&contents).unwrap_or_else(|| "unknown".into()),
                            driver: driver_version(),
                        },
                        _ => CudaError::Driver(format!("loading kernel module `{module}`: {}", describe_driver_error(e))),
                    })
                }
            };
            loaded.push((module, handle));
        }
        let function = |module: &str, name: &'static str| -> Result<CudaFunction, CudaError> {
            let (_, m) = loaded.iter().find(|(n, _)| *n == module).ok_or_else(|| CudaError::Launch {
                kernel: name,
                message: format!("module `{module}` is missing from the build (is cuda/{module}.cu there?)"),
            })?;
            m.load_function(name).map_err(|e| CudaError::Launch { kernel: name, message: format!("not found in module `{module}`: {}", describe_driver_error(e)) })
        };
        let functions = Functions {
            gather_rows: function("gather", "gather_rows_f32")?,
            bn_act_fwd_train: function("batchnorm", "bn_act_fwd_train_f32")?,
            bn_column_moments: function("batchnorm", "bn_column_moments_f32")?,
            bn_act_fwd_train_parts: function("batchnorm", "bn_act_fwd_train_parts_f32")?,
            bn_act_fwd_infer: function("batchnorm", "bn_act_fwd_infer_f32")?,
            act_bn_bwd: function("batchnorm", "act_bn_bwd_f32")?,
            bias_act_fwd: function("activation", "bias_act_fwd_f32")?,
            act_bwd_bias_grad: function("activation", "act_bwd_bias_grad_f32")?,
            softmax_xent: function("softmax_xent", "softmax_xent_f32")?,
            running_stats_update: function("running_stats", "running_stats_update_f32")?,
            sgd_update: function("sgd", "sgd_update_f32")?,
            fused_train_steps: function("fused_step", "fused_train_steps_f32")?,
            fused_train_steps_512: function("fused_step", "fused_train_steps_512_f32")?,
            fused_train_steps_staged: function("fused_step", "fused_train_steps_staged_f32")?,
            fused_train_pair: function("fused_step", "fused_train_pair_f32")?,
            fused_train_pair_staged: function("fused_step", "fused_train_pair_staged_f32")?,
            fused_train_steps_replicated: function("fused_step", "fused_train_steps_replicated_f32")?,
            fused_replicated_layout_bytes: function("fused_step", "fused_replicated_layout_bytes")?,
            count_non_finite: function("finite", "count_non_finite_f32")?,
            round_to_bf16: function("bf16", "round_to_bf16")?,
            small_gemm_dot: function("small_gemm", "small_gemm_dot_f32")?,
            small_gemm_outer: function("small_gemm", "small_gemm_outer_f32")?,
            fused_cluster: if loaded.iter().any(|(n, _)| *n == "fused_cluster") {
                Some(ClusterFunctions {
                    layout_bytes: function("fused_cluster", "fused_cluster_layout_bytes")?,
                    one: [function("fused_cluster", "fused_cluster8_f32")?, function("fused_cluster", "fused_cluster16_f32")?],
                    pair: [function("fused_cluster", "fused_cluster_pair8_f32")?, function("fused_cluster", "fused_cluster_pair16_f32")?],
                })
            } else {
                None
            },
        };
        let fused_module = loaded.iter().find(|(n, _)| *n == "fused_step").map(|(_, m)| Arc::clone(m)).ok_or_else(|| CudaError::Launch {
            kernel: "fused_train_steps_f32",
            message: "module `fused_step` is missing from the build".into(),
        })?;
        let small_gemm = std::env::var(SMALL_GEMM_ENV).is_ok_and(|v| v.trim() == "1");
        Self::on_stream(ctx, stream, functions, fused_module, capability, name, small_gemm)
    }

    /// A `Gpu` on `stream`: its cuBLAS handle, workspace and scratch, with the kernels given.
    fn on_stream(
        ctx: Arc<CudaContext>, stream: Arc<CudaStream>, functions: Functions, fused_module: Arc<CudaModule>,
        capability: (i32, i32), name: String, small_gemm: bool,
    ) -> Result<Gpu, CudaError> {
        let blas = CudaBlas::new(stream.clone())?;
        // SAFETY: `blas.handle()` is a live handle; both calls only set modes on it.
        unsafe {
            // Plain IEEE f32 (no TF32) and no atomics: sgemm results are then bitwise
            // reproducible run to run on the same GPU (cuBLAS's reproducibility guarantee).
            cublas_sys::cublasSetMathMode(*blas.handle(), cublas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH).result()?;
            cublas_sys::cublasSetAtomicsMode(*blas.handle(), cublas_sys::cublasAtomicsMode_t::CUBLAS_ATOMICS_NOT_ALLOWED).result()?;
        }
        // A workspace of our own: without one, cuBLAS may allocate (stream-ordered) inside a
        // captured step, which would put memory nodes into the graph; with one, a GEMM only
        // launches kernels. Set after `CudaBlas::new`'s cublasSetStream, which resets the
        // workspace to the default pool, and never changed afterwards. The eager path uses
        // the same workspace, so both paths run the same GEMM algorithms.
        let workspace_bytes = blas_workspace_bytes(capability.0);
        let blas_workspace = stream.alloc_zeros::<u8>(workspace_bytes)?;
        {
            let (ptr, _record) = blas_workspace.device_ptr(&stream);
            if ptr % BLAS_WORKSPACE_ALIGN != 0 {
                return Err(CudaError::Cublas(format!("the driver returned a workspace at {ptr:#x}, not aligned to {BLAS_WORKSPACE_ALIGN} bytes")));
            }
            // SAFETY: `ptr` is a live allocation of `workspace_bytes` bytes, 256-byte aligned
            // (checked), on the handle's stream; `Gpu` keeps it alive until after the handle
            // is destroyed, and nothing else uses it.
            unsafe { cublas_sys::cublasSetWorkspace_v2(*blas.handle(), ptr as usize as *mut std::ffi::c_void, workspace_bytes) }.result()?;
        }

        let blas_workspace_ptr = blas_workspace.device_ptr(&stream).0;
        let softmax_partials = Mutex::new(SoftmaxPartials {
            loss: stream.alloc_zeros(SOFTMAX_MAX_BLOCKS)?,
            correct: stream.alloc_zeros(SOFTMAX_MAX_BLOCKS)?,
            dbias: stream.alloc_zeros(SOFTMAX_MAX_BLOCKS * MAX_CLASSES)?,
            ticket: stream.alloc_zeros(1)?,
        });
        Ok(Gpu {
            ctx, stream, blas, lt: std::sync::OnceLock::new(), blas_workspace, blas_workspace_ptr, functions, fused_module, capability, name,
            bf16_operands: Mutex::new(None), bf16_operands_generation: AtomicU64::new(0), small_gemm: AtomicBool::new(small_gemm), gemm_tuning: AtomicBool::new(false),
            softmax_partials,
        })
    }

    /// A second lane on this GPU: the same context and kernels, a stream of its own with its
    /// own cuBLAS handle, workspace and scratch (the softmax's partial sums, bf16 operands),
    /// so that work on it can run beside this one's. The switches (small GEMMs, tuning) start
    /// as this one's. Nothing orders the two streams: callers join them with events.
    pub fn open_lane(&self) -> Result<Gpu, CudaError> {
        let lane = Self::on_stream(
            Arc::clone(&self.ctx), self.ctx.new_stream()?, self.functions.clone(), Arc::clone(&self.fused_module),
            self.capability, self.name.clone(), self.small_gemm(),
        )?;
        lane.set_gemm_tuning(self.gemm_tuning());
        Ok(lane)
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's compute capability, e.g. (9, 0) for an H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// The stream every launch, copy and allocation of this GPU goes through. Buffers used
    /// with the launchers of [`super::kernels`] must be allocated on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Whether small f32 GEMMs run on cuda/small_gemm.cu (see [`super::gemm::matmul`]).
    pub fn small_gemm(&self) -> bool {
        self.small_gemm.load(Ordering::Relaxed)
    }

    /// Routes small f32 GEMMs to cuda/small_gemm.cu (true) or to cuBLAS (false); tests
    /// check both. A captured step keeps the kernels it was captured with.
    pub fn set_small_gemm(&self, on: bool) {
        self.small_gemm.store(on, Ordering::Relaxed);
    }

    /// Whether GEMMs of at least [`super::gemm_tuning::TUNE_MIN_MACS`] multiply-adds pick
    /// their algorithm by timing (see [`super::gemm_tuning`]).
    pub fn gemm_tuning(&self) -> bool {
        self.gemm_tuning.load(Ordering::Relaxed)
    }

    /// Turns GEMM tuning on or off; tests check both. A captured step keeps the
    /// algorithms it was captured with.
    pub fn set_gemm_tuning(&self, on: bool) {
        self.gemm_tuning.store(on, Ordering::Relaxed);
    }

    /// Points the fused kernels' `fused_trace` at `trace` (a device address; 0 turns phase
    /// timing off), for the launches queued after this call on the stream.
    pub(crate) fn set_fused_trace(&self, trace: u64) -> Result<(), CudaError> {
        let mut global = self.fused_module.get_global("fused_trace", &self.stream)?;
        if global.len() != 8 {
            return Err(CudaError::Launch { kernel: "fused_train_steps_f32", message: format!("fused_trace holds {} bytes, not a pointer's 8", global.len()) });
        }
        self.stream.memcpy_htod(&trace.to_le_bytes(), &mut global)?;
        Ok(())
    }

    /// The cublasLt handle (created at the first call), if libcublasLt could be loaded.
    pub(crate) fn lt_handle(&self) -> Option<lt_sys::cublasLtHandle_t> {
        self.lt
            .get_or_init(|| {
                // SAFETY: only tries to dlopen the library (libcublas, loaded already, needs it).
                let present = unsafe { lt_sys::is_culib_present() };
                if present { lt_result::create_handle().ok().map(LtHandle) } else { None }
            })
            .as_ref()
            .map(|h| h.0)
    }

    /// The cuBLAS workspace: its address and size in bytes.
    pub(crate) fn blas_workspace(&self) -> (u64, usize) {
        (self.blas_workspace_ptr, self.blas_workspace.len())
    }

    /// Makes room for bf16 GEMM operands of up to `elements` values each. A backend calls
    /// this once with its largest operand, before the first step: a step captured into a
    /// CUDA graph must find the scratch allocated (and keep it: the graph holds its address).
    pub fn reserve_bf16_operands(&self, elements: usize) -> Result<(), CudaError> {
        let mut scratch = self.bf16_operands.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if scratch.as_ref().is_none_or(|s| s.len < elements) {
            *scratch = None; // free the old pair before the new one is allocated
            self.bf16_operands_generation.fetch_add(1, Ordering::Relaxed);
            *scratch = Some(Bf16Operands { a: self.stream.alloc_zeros(elements)?, b: self.stream.alloc_zeros(elements)?, len: elements });
        }
        Ok(())
    }

    /// Changes whenever the bf16 scratch moves (a larger operand than reserved grew it): a
    /// step graph captured under another value must be captured again before it replays.
    pub(crate) fn bf16_operands_generation(&self) -> u64 {
        self.bf16_operands_generation.load(Ordering::Relaxed)
    }

    /// The bf16 operand scratch, at least `elements` long each (grown if not).
    pub(crate) fn bf16_operands(&self, elements: usize) -> Result<std::sync::MutexGuard<'_, Option<Bf16Operands>>, CudaError> {
        self.reserve_bf16_operands(elements)?;
        Ok(self.bf16_operands.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Waits for all queued work; reports any asynchronous kernel fault.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(CudaError::from)
    }
}

/// Says, once a process, that the driver compiles the kernels' PTX before the first run on
/// this GPU: this build carries no machine code for it (build.rs, `BNTRAIN_SASS_ARCHS`).
fn jit_notice(major: u32, minor: u32) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        // writeln, not eprintln: a closed stderr must not turn the notice into a panic.
        let _ = writeln!(
            std::io::stderr(),
            "notice: this build has no machine code for sm_{major}{minor}: the CUDA driver compiles the kernels' PTX first (29 s on an H100 before builds carried its code), and normally caches the result for later runs"
        );
    }
}

/// The CUDA major version of nvcc's `release` line (`Cuda compilation tools, release 13.0,
/// V13.0.88` → 13): the drivers of that major version and newer load what it built (minor
/// version compatibility), as they run the cuBLAS of that major version.
fn cuda_major(nvcc: &str) -> Option<i32> {
    nvcc.split("release ").nth(1)?.split('.').next()?.trim().parse().ok()
}

/// The driver's CUDA version, e.g. `12.4`.
fn driver_version() -> String {
    driver_version_code().map_or_else(|_| "unknown".into(), describe_version)
}

/// The driver's CUDA version as it reports it (13000 for 13.0).
fn driver_version_code() -> Result<i32, cudarc::driver::DriverError> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (checked in `Gpu::open`) and `v` is a valid out pointer.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result()?;
    Ok(v)
}

/// 13000 → `13.0`, 12040 → `12.4`.
fn describe_version(code: i32) -> String {
    format!("{}.{}", code / 1000, (code % 1000) / 10)
}

#[cfg(test)]
mod tests {
    use super::{cuda_major, describe_version, panic_as_message};

    /// The panic is the error's message, and the hook that was there before stays silent
    /// for it (checked in a child process: the hook is global to the process, and the test
    /// harness's parallel tests would see a hook swapped here).
    #[test]
    fn a_panic_becomes_its_message_without_a_panic_report() {
        if std::env::var_os("BNTRAIN_PANIC_HOOK_CHILD").is_some() {
            let line = line!() + 1;
            assert_eq!(panic_as_message(|| -> u8 { panic!("no symbol cuFoo") }), Err(format!("no symbol cuFoo (at {}:{line})", file!())));
            let formatted = panic_as_message(|| -> u8 { panic!("{} of {}", 1, 2) }).unwrap_err();
            assert!(formatted.starts_with("1 of 2 (at ") && formatted.contains("context.rs"), "{formatted}");
            assert_eq!(panic_as_message(|| 7), Ok(7));
            eprintln!("CHILD-DONE");
            // After it, panics are reported again, on this thread and on others.
            let _ = std::thread::spawn(|| panic!("reported from another thread")).join();
            let _ = std::panic::catch_unwind(|| panic!("reported on this thread"));
            return;
        }
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cuda::context::tests::a_panic_becomes_its_message_without_a_panic_report", "--nocapture", "--test-threads=1"])
            .env("BNTRAIN_PANIC_HOOK_CHILD", "1")
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&child.stderr);
        assert!(child.status.success(), "{stderr}");
        let (during, after) = stderr.split_once("CHILD-DONE").unwrap_or_else(|| panic!("the child did not finish: {stderr}"));
        assert!(!during.contains("panicked"), "a caught panic was reported: {during}");
        assert!(after.contains("reported from another thread") && after.contains("reported on this thread"), "{after}");
    }

    #[test]
    fn cuda_versions_are_read_from_nvccs_release_line_and_the_drivers_code() {
        assert_eq!(cuda_major("Cuda compilation tools, release 13.0, V13.0.88"), Some(13));
        assert_eq!(cuda_major("Cuda compilation tools, release 12.8, V12.8.93"), Some(12));
        assert_eq!(cuda_major("unknown version"), None);
        assert_eq!((describe_version(13000), describe_version(12040)), ("13.0".to_string(), "12.4".to_string()));
    }
}
