//! The GEMM algorithm of each product shape, chosen by timing on the device
//! (`BNTRAIN_GEMM_TUNE=1`; off by default: 1 % on the wide f32 step of an H100, docs/perf.md).
//!
//! Why: cuBLAS's sgemm runs the one kernel its heuristics rank first. For the wide
//! network's products (1024×1024×1024 and 1024×784×1024) those took 396.8 µs of a step's
//! kernel time on an H200 against an fp32 floor of about 150 µs (docs/perf.md, third run):
//! a 128×128 tile gives 64 blocks for 132 SMs. cublasLt offers the heuristics' other
//! candidates too (other tiles, split-K); which is fastest is a measurement, not a rule.
//!
//! How: the first time a shape (with its transposes, precision, accumulation and operand
//! alignment) is multiplied outside a graph capture, [`algorithm`] runs cuBLAS's own sgemm
//! (or GemmEx) and each cublasLt candidate on a scratch output, a few times each, timed by
//! events, and keeps the fastest for the rest of the process (one table for the process:
//! two backends of one run multiply alike, which the bitwise-determinism tests rely on).
//! [`choose`] keeps cuBLAS's own kernel unless another is clearly faster, and among near
//! ties the heuristics' earlier rank, so that a rerun tends to pick the same. The winner
//! must match cuBLAS's own result to rounding (cuBLASLt has had split-K kernels that drop
//! part of a sum) and give bitwise the same result twice; a different algorithm adds in a different
//! order, so tuned results differ from untuned ones in the last bits (the GPU tests check
//! them against the CPU reference with the same tolerance). A shape first met while a
//! graph is being captured runs cuBLAS's kernel and is tuned at its next eager use.

use super::context::Gpu;
use super::CudaError;
use crate::backend::GemmPrecision;
use cudarc::cublas::result as blas_result;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublaslt::{result as lt_result, sys as lt};
use cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Products smaller than this many multiply-adds keep cuBLAS's own kernel untimed: the
/// seed network's (at most 4.7M) run fused or as a graph, where a few microseconds of
/// tuning per shape would buy nothing; the wide network's are 10.5M to 1.07G.
pub const TUNE_MIN_MACS: usize = 1 << 23;
/// How many cublasLt candidates are timed, at most.
const LT_CANDIDATES: usize = 8;
/// Timed batches per candidate (the fastest batch counts) and products per batch, after
/// one untimed product.
const TIMED_BATCHES: usize = 3;
const PRODUCTS_PER_BATCH: usize = 4;
/// cuBLAS's own kernel stays unless another is faster by more than this factor...
const KEEP_CUBLAS_WITHIN: f64 = 1.05;
/// ...and among the cublasLt candidates, the heuristics' earliest within this of the fastest.
const PREFER_EARLIER_WITHIN: f64 = 1.02;

/// A product as cuBLAS sees it: column-major C (m × n, ldc) = op(A)·op(B) (+ C when
/// `accumulate`), A being the row-major product's second operand (see [`super::gemm::matmul`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlasShape {
    pub precision: GemmPrecision,
    pub transpose_a: bool,
    pub transpose_b: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub lda: i32,
    pub ldb: i32,
    pub ldc: i32,
    pub accumulate: bool,
    /// The largest power of two (≤ 256) dividing the addresses of A, B and C, in bytes:
    /// cublasLt's kernels may assume it.
    pub alignment: [u32; 3],
}

impl BlasShape {
    pub fn macs(&self) -> usize {
        [self.m, self.n, self.k].iter().map(|&d| d as usize).product()
    }

    /// e.g. `1024×1024×1024 f32 NT` (cuBLAS's m×n×k, transposes of its A and B).
    pub fn label(&self) -> String {
        let t = |t: bool| if t { 'T' } else { 'N' };
        let acc = if self.accumulate { " +C" } else { "" };
        format!("{}×{}×{} {} {}{}{acc}", self.m, self.n, self.k, self.precision.label(), t(self.transpose_a), t(self.transpose_b))
    }

    fn operand_type(&self) -> cudaDataType_t {
        if self.precision == GemmPrecision::Bf16 { cudaDataType_t::CUDA_R_16BF } else { cudaDataType_t::CUDA_R_32F }
    }
}

/// Device addresses of a product's operands, as cuBLAS names them.
#[derive(Clone, Copy, Debug)]
pub struct BlasOperands {
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

/// The alignment [`BlasShape::alignment`] records for an address.
pub fn alignment(ptr: u64) -> u32 {
    if ptr == 0 { 256 } else { (1u64 << ptr.trailing_zeros().min(8)) as u32 }
}

/// How a product runs.
#[derive(Clone)]
pub enum Algorithm {
    /// cuBLAS's own choice: `cublasSgemm` for f32, `cublasGemmEx` otherwise.
    Cublas,
    /// A cublasLt candidate, with the descriptors it was chosen for (built once per shape).
    Lt(Arc<LtPlan>),
}

/// A cublasLt algorithm for one shape: its descriptors, the algorithm and the workspace it
/// needs (within the handle's).
pub struct LtPlan {
    problem: Arc<LtProblem>,
    algo: lt::cublasLtMatmulAlgo_t,
    workspace: usize,
}

/// What tuning found for one shape: for the report of `bntrain bench`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TunedGemm {
    pub shape: String,
    /// µs per product: cuBLAS's own kernel first, then each cublasLt candidate in the
    /// heuristics' order (NaN: it failed, or gave different bits twice).
    pub us: Vec<f64>,
    /// Index into `us` of the one kept.
    pub chosen: usize,
}

struct Tuned {
    algorithm: Algorithm,
    report: TunedGemm,
}

static TUNED: Mutex<BTreeMap<BlasShape, Tuned>> = Mutex::new(BTreeMap::new());

fn tuned() -> std::sync::MutexGuard<'static, BTreeMap<BlasShape, Tuned>> {
    TUNED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every shape tuned so far in this process, in shape order (not those that could not be:
/// no memory for the scratch outputs).
pub fn tuned_gemms() -> Vec<TunedGemm> {
    tuned().values().filter(|t| !t.report.us.is_empty()).map(|t| t.report.clone()).collect()
}

/// The candidate to keep, given each one's time (index 0: cuBLAS's own kernel; NaN or ∞:
/// unusable): cuBLAS's unless the fastest beats it by more than [`KEEP_CUBLAS_WITHIN`],
/// else the earliest within [`PREFER_EARLIER_WITHIN`] of the fastest.
pub fn choose(us: &[f64]) -> usize {
    let best = us.iter().copied().filter(|t| t.is_finite()).fold(f64::INFINITY, f64::min);
    if !best.is_finite() || us.first().is_some_and(|&t| t.is_finite() && t <= best * KEEP_CUBLAS_WITHIN) {
        return 0;
    }
    us.iter().position(|&t| t.is_finite() && t <= best * PREFER_EARLIER_WITHIN).unwrap_or(0)
}

/// The algorithm for `shape`: tuned before (or now, if tuning is on, the shape is large
/// enough and the stream is not capturing), else cuBLAS's own.
pub fn algorithm(gpu: &Gpu, shape: &BlasShape, operands: BlasOperands) -> Result<Algorithm, CudaError> {
    // Without a cublasLt handle of its own, a GPU stays on cuBLAS even for shapes another
    // one tuned (the table is the process's).
    if !gpu.gemm_tuning() || shape.macs() < TUNE_MIN_MACS || gpu.lt_handle().is_none() {
        return Ok(Algorithm::Cublas);
    }
    if let Some(t) = tuned().get(shape) {
        return Ok(t.algorithm.clone());
    }
    if gpu.stream().capture_status()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Ok(Algorithm::Cublas);
    }
    let tuned_now = tune(gpu, shape, operands)?;
    // Another thread may have tuned the shape meanwhile: the first result stays.
    Ok(tuned().entry(*shape).or_insert(tuned_now).algorithm.clone())
}

/// Runs one product with `algorithm`.
pub fn run(gpu: &Gpu, shape: &BlasShape, algorithm: &Algorithm, operands: BlasOperands) -> Result<(), CudaError> {
    match algorithm {
        Algorithm::Cublas => run_cublas(gpu, shape, operands),
        Algorithm::Lt(plan) => run_lt(gpu, shape, plan, operands),
    }
}

fn op(transpose: bool) -> cublasOperation_t {
    if transpose { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N }
}

fn scalars(shape: &BlasShape) -> (f32, f32) {
    (1.0, if shape.accumulate { 1.0 } else { 0.0 })
}

fn run_cublas(gpu: &Gpu, shape: &BlasShape, o: BlasOperands) -> Result<(), CudaError> {
    let (alpha, beta) = scalars(shape);
    let handle = *gpu.blas.handle();
    let (ta, tb) = (op(shape.transpose_a), op(shape.transpose_b));
    let BlasShape { m, n, k, lda, ldb, ldc, .. } = *shape;
    let compute = match shape.precision {
        // SAFETY (both calls): the caller's operands hold what an m×n×k product with these
        // transposes and leading dimensions reads (A, B) and writes (C), in
        // `shape.operand_type()` (C in f32), on the handle's stream; alpha and beta are
        // host f32 values (host pointer mode), read before the call returns.
        GemmPrecision::F32 => {
            return unsafe {
                blas_result::sgemm(handle, ta, tb, m, n, k, &alpha, o.a as *const f32, lda, o.b as *const f32, ldb, &beta, o.c as *mut f32, ldc)
            }
            .map_err(CudaError::from)
        }
        GemmPrecision::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        GemmPrecision::Bf16 => cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let operand_type = shape.operand_type();
    unsafe {
        blas_result::gemm_ex(
            handle, ta, tb, m, n, k,
            (&alpha) as *const f32 as *const c_void, o.a as *const c_void, operand_type, lda,
            o.b as *const c_void, operand_type, ldb,
            (&beta) as *const f32 as *const c_void, o.c as *mut c_void, cudaDataType_t::CUDA_R_32F, ldc,
            compute, cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(CudaError::from)
}

impl From<lt_result::CublasError> for CudaError {
    fn from(e: lt_result::CublasError) -> Self {
        CudaError::Cublas(format!("cublasLt: {:?}", e.0))
    }
}

/// cublasLt's descriptors of one product (destroyed on drop).
pub struct LtProblem {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: [lt::cublasLtMatrixLayout_t; 3],
}

impl LtProblem {
    fn new(shape: &BlasShape) -> Result<Self, CudaError> {
        let compute = match shape.precision {
            GemmPrecision::Tf32 => lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            GemmPrecision::F32 | GemmPrecision::Bf16 => lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let operand_type = match shape.precision {
            GemmPrecision::Bf16 => lt::cudaDataType_t::CUDA_R_16BF,
            GemmPrecision::F32 | GemmPrecision::Tf32 => lt::cudaDataType_t::CUDA_R_32F,
        };
        let desc = lt_result::create_matmul_desc(compute, lt::cudaDataType_t::CUDA_R_32F)?;
        // Built field by field so that a failure part way destroys what exists.
        let mut problem = LtProblem { desc, layouts: [std::ptr::null_mut(); 3] };
        for (attr, transpose) in [
            (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, shape.transpose_a),
            (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, shape.transpose_b),
        ] {
            let value = op(transpose) as i32;
            // SAFETY: `desc` is live; TRANSA/TRANSB take a cublasOperation_t (an int32).
            unsafe { lt_result::set_matmul_desc_attribute(problem.desc, attr, (&value) as *const i32 as *const c_void, std::mem::size_of::<i32>()) }?;
        }
        let (m, n, k) = (shape.m as u64, shape.n as u64, shape.k as u64);
        // Stored (rows, columns) of each operand, column-major: op(A) is m × k, op(B) k × n.
        let a = if shape.transpose_a { (k, m) } else { (m, k) };
        let b = if shape.transpose_b { (n, k) } else { (k, n) };
        let stored = [(operand_type, a, shape.lda), (operand_type, b, shape.ldb), (lt::cudaDataType_t::CUDA_R_32F, (m, n), shape.ldc)];
        for (slot, (data_type, (rows, cols), ld)) in stored.into_iter().enumerate() {
            problem.layouts[slot] = lt_result::create_matrix_layout(data_type, rows, cols, i64::from(ld))?;
        }
        Ok(problem)
    }

    /// Up to [`LT_CANDIDATES`] algorithms in the heuristics' order, each with its workspace.
    fn candidates(&self, gpu: &Gpu, shape: &BlasShape, handle: lt::cublasLtHandle_t) -> Result<Vec<(lt::cublasLtMatmulAlgo_t, usize)>, CudaError> {
        let pref = Preference(lt_result::create_matmul_pref()?);
        let workspace = gpu.blas_workspace().1 as u64;
        // SAFETY: `pref` is live, and each value has the type cublasLt declares for its
        // attribute (uint64 for the workspace, uint32 for the alignments), passed with its size.
        unsafe {
            let attr = lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES;
            lt_result::set_matmul_pref_attribute(pref.0, attr, (&workspace) as *const u64 as *const c_void, std::mem::size_of::<u64>())?;
            let [align_a, align_b, align_c] = shape.alignment;
            for (attr, value) in [
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a),
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b),
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_c),
                (lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_c),
            ] {
                lt_result::set_matmul_pref_attribute(pref.0, attr, (&value) as *const u32 as *const c_void, std::mem::size_of::<u32>())?;
            }
        }
        let mut results = [lt::cublasLtMatmulHeuristicResult_t { algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] }, workspaceSize: 0, state: lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS, wavesCount: 0.0, reserved: [0; 4] }; LT_CANDIDATES];
        let mut found = 0;
        let [a, b, c] = self.layouts;
        // SAFETY: every descriptor is live; `results` has room for the count asked for.
        let status = unsafe { lt::cublasLtMatmulAlgoGetHeuristic(handle, self.desc, a, b, c, c, pref.0, LT_CANDIDATES as i32, results.as_mut_ptr(), &mut found) };
        if status != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Ok(Vec::new()); // no candidate for this shape: cuBLAS's own kernel it is
        }
        Ok(results[..(found.max(0) as usize).min(LT_CANDIDATES)]
            .iter()
            .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize as u64 <= workspace)
            .map(|r| (r.algo, r.workspaceSize))
            .collect())
    }
}

// SAFETY: the descriptors are host objects that nothing changes after `LtProblem::new`;
// cublasLtMatmul only reads them, so products on any thread may share them.
unsafe impl Send for LtProblem {}
unsafe impl Sync for LtProblem {}

impl Drop for LtProblem {
    fn drop(&mut self) {
        // SAFETY: each was created by `new` (or is null, never created) and is destroyed once.
        unsafe {
            for layout in self.layouts {
                if !layout.is_null() {
                    let _ = lt_result::destroy_matrix_layout(layout);
                }
            }
            let _ = lt_result::destroy_matmul_desc(self.desc);
        }
    }
}

struct Preference(lt::cublasLtMatmulPreference_t);

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt_result::destroy_matmul_pref(self.0) };
    }
}

fn run_lt(gpu: &Gpu, shape: &BlasShape, plan: &LtPlan, o: BlasOperands) -> Result<(), CudaError> {
    let LtPlan { problem, algo, workspace } = plan;
    let (problem, workspace) = (&**problem, *workspace);
    let (alpha, beta) = scalars(shape);
    let (workspace_ptr, workspace_bytes) = gpu.blas_workspace();
    if workspace > workspace_bytes {
        return Err(CudaError::Cublas(format!("cublasLt algorithm needs {workspace} bytes of workspace, the handle has {workspace_bytes}")));
    }
    let handle = gpu.lt_handle().ok_or_else(|| CudaError::Cublas("cublasLt is not loaded".into()))?;
    let [a, b, c] = problem.layouts;
    // SAFETY: the operands hold what the layouts describe (the caller's, as for sgemm), D is
    // C (in place, as cublasLt allows with the same layout), the workspace is the handle's
    // (live as long as `gpu`, at least `workspace` bytes, used by one product at a time on
    // the one stream), and the algorithm came from the heuristics for these descriptors
    // (a shape's key includes everything they are built from). alpha and beta are host
    // f32 values, read before the call returns.
    unsafe {
        lt_result::matmul(
            handle, problem.desc,
            (&alpha) as *const f32 as *const c_void, (&beta) as *const f32 as *const c_void,
            o.a as *const c_void, a, o.b as *const c_void, b, o.c as *const c_void, c, o.c as *mut c_void, c,
            algo, workspace_ptr as *mut c_void, workspace,
            gpu.stream().cu_stream() as lt::cudaStream_t,
        )
    }
    .map_err(CudaError::from)
}

/// Times every candidate on scratch outputs and picks one (see the module's documentation).
/// Anything cublasLt refuses leaves the shape on cuBLAS's own kernel.
fn tune(gpu: &Gpu, shape: &BlasShape, operands: BlasOperands) -> Result<Tuned, CudaError> {
    let keep_cublas = |us: Vec<f64>| Tuned { algorithm: Algorithm::Cublas, report: TunedGemm { shape: shape.label(), us, chosen: 0 } };
    let Some(handle) = gpu.lt_handle() else { return Ok(keep_cublas(Vec::new())) };
    // Every candidate shares the shape's descriptors; the one kept stays in the table with them.
    let plans: Vec<Arc<LtPlan>> = match LtProblem::new(shape).and_then(|problem| Ok((problem.candidates(gpu, shape, handle)?, problem))) {
        Ok((candidates, problem)) => {
            let problem = Arc::new(problem);
            candidates.into_iter().map(|(algo, workspace)| Arc::new(LtPlan { problem: Arc::clone(&problem), algo, workspace })).collect()
        }
        Err(_) => Vec::new(),
    };
    // Scratch outputs, so that timing leaves the real C alone: `first` for the candidates,
    // `second` for cuBLAS's result, which the winner must match. Too little memory for them:
    // no tuning (and no entry in the report).
    let elements = shape.ldc as usize * shape.n as usize;
    let stream = gpu.stream();
    let (Ok(mut first), Ok(mut second)) = (stream.alloc_zeros::<f32>(elements), stream.alloc_zeros::<f32>(elements)) else {
        return Ok(keep_cublas(Vec::new()));
    };
    let first_ptr = { use cudarc::driver::DevicePtrMut; first.device_ptr_mut(stream).0 };
    let second_ptr = { use cudarc::driver::DevicePtrMut; second.device_ptr_mut(stream).0 };
    let on = |c: u64| BlasOperands { c, ..operands };
    let mut algorithms = vec![Algorithm::Cublas];
    algorithms.extend(plans.into_iter().map(Algorithm::Lt));
    let product = |algorithm: &Algorithm, c: u64| run(gpu, shape, algorithm, on(c));
    let ctx = gpu.context();
    let (start, end) = (ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
    let mut us = Vec::with_capacity(algorithms.len());
    for algorithm in &algorithms {
        // One product: Ok(false) where a cublasLt candidate fails (the heuristics' list is
        // advisory: it is left out); cuBLAS's own failing is an error.
        let one = || match (algorithm, product(algorithm, first_ptr)) {
            (Algorithm::Lt(_), Err(_)) => Ok(false),
            (_, done) => done.map(|()| true),
        };
        // Accumulating products pile up in `first` here; only the time counts. The events'
        // errors are the stream's, never the candidate's.
        let timed = || -> Result<f64, CudaError> {
            if !one()? {
                return Ok(f64::NAN);
            }
            let mut best = f64::INFINITY;
            for _ in 0..TIMED_BATCHES {
                start.record(stream)?;
                for _ in 0..PRODUCTS_PER_BATCH {
                    if !one()? {
                        return Ok(f64::NAN);
                    }
                }
                end.record(stream)?;
                end.synchronize()?;
                best = best.min(f64::from(start.elapsed_ms(&end)?) * 1e3 / PRODUCTS_PER_BATCH as f64);
            }
            Ok(best)
        };
        us.push(timed()?);
    }
    gpu.synchronize()?;
    // cuBLAS's result from zero, the reference the winner must match.
    stream.memset_zeros(&mut second)?;
    product(&Algorithm::Cublas, second_ptr)?;
    let reference = stream.clone_dtoh(&second)?;
    // The winner must match cuBLAS's result to rounding and repeat itself bit for bit:
    // otherwise the next one.
    loop {
        let chosen = choose(&us);
        let keep = |algorithm: &Algorithm, us| Ok(Tuned { algorithm: algorithm.clone(), report: TunedGemm { shape: shape.label(), us, chosen } });
        if chosen == 0 {
            return keep(&algorithms[0], us);
        }
        // A candidate whose own product fails here is dropped like one that disagrees; the
        // stream's errors are returned.
        let product_failed = std::cell::Cell::new(false);
        let checked = |c| product(&algorithms[chosen], c).inspect_err(|_| product_failed.set(true));
        match agrees(gpu, shape, checked, &mut first, first_ptr, &reference) {
            Ok(true) => return keep(&algorithms[chosen], us),
            Ok(false) => {}
            Err(_) if product_failed.get() => {}
            Err(e) => return Err(e),
        }
        us[chosen] = f64::NAN;
    }
}

/// Whether a candidate's product from zero matches cuBLAS's (`reference`) within rounding of
/// the shape's precision, and a second one gives the same bits. An algorithm that drops part
/// of a sum, or writes where it should not, is off by O(1) of the largest output; two
/// orders of summation differ by far less than the bound (the operands' rounding is the same:
/// both read the same TF32 or bf16 values).
fn agrees(
    gpu: &Gpu, shape: &BlasShape, product: impl Fn(u64) -> Result<(), CudaError>, scratch: &mut cudarc::driver::CudaSlice<f32>, scratch_ptr: u64,
    reference: &[f32],
) -> Result<bool, CudaError> {
    let stream = gpu.stream();
    let mut runs = Vec::with_capacity(2);
    for _ in 0..2 {
        stream.memset_zeros(scratch)?;
        product(scratch_ptr)?;
        runs.push(stream.clone_dtoh(scratch)?);
    }
    let same_bits = runs[0].iter().zip(&runs[1]).all(|(x, y)| x.to_bits() == y.to_bits());
    let largest = reference.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
    let relative = match shape.precision {
        GemmPrecision::F32 => 1e-4,
        GemmPrecision::Tf32 => 2e-3,
        GemmPrecision::Bf16 => 1e-2,
    };
    let tolerance = crate::tolerance::Tolerance::new(relative * largest, relative);
    let close = crate::tolerance::check_close("tuned GEMM", runs[0].iter().map(|&v| f64::from(v)), reference.iter().map(|&v| f64::from(v)), tolerance).is_ok();
    Ok(same_bits && close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cublas_stays_unless_clearly_beaten() {
        assert_eq!(choose(&[100.0]), 0);
        assert_eq!(choose(&[100.0, 96.0, 97.0]), 0, "4 % faster is within the 5 % kept for cuBLAS");
        assert_eq!(choose(&[100.0, 80.0, 60.0]), 2);
        assert_eq!(choose(&[f64::NAN, 80.0, 60.0]), 2, "a failed cuBLAS run is no reason to keep it");
    }

    #[test]
    fn near_ties_go_to_the_heuristics_earlier_rank() {
        assert_eq!(choose(&[100.0, 61.0, 60.0]), 1, "61 is within 2 % of 60");
        assert_eq!(choose(&[100.0, 62.0, 60.0]), 2);
        assert_eq!(choose(&[100.0, f64::NAN, 60.0, 60.5]), 2);
    }

    #[test]
    fn nothing_usable_keeps_cublas() {
        assert_eq!(choose(&[]), 0);
        assert_eq!(choose(&[f64::NAN, f64::NAN]), 0);
        assert_eq!(choose(&[f64::INFINITY, f64::NAN]), 0);
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1004), 4);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0), 256);
    }

    #[test]
    fn labels_name_the_product() {
        let shape = BlasShape {
            precision: GemmPrecision::F32, transpose_a: true, transpose_b: false, m: 1024, n: 512, k: 784,
            lda: 784, ldb: 784, ldc: 1024, accumulate: true, alignment: [256; 3],
        };
        assert_eq!(shape.label(), "1024×512×784 f32 TN +C");
        assert_eq!(shape.macs(), 1024 * 512 * 784);
    }
}
