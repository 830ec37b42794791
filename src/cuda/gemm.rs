//! The one GEMM helper: row-major matrices over cuBLAS (sgemm in f32; GemmEx with a
//! TF32 or bf16 compute type on tensor cores).

use super::context::Gpu;
use super::CudaError;
use crate::backend::GemmPrecision;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::{result as blas_result, Gemm, GemmConfig};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

/// Row-major matrix product with optional transposes, like [`crate::cpu::ops::matmul`]:
/// c ← a'·b' (+ c when `accumulate`), where a' = a (stored `[m, k]`) or aᵀ (a stored
/// `[k, m]`), b' = b (stored `[k, n]`) or bᵀ (b stored `[n, k]`), c stored `[m, n]`.
///
/// cuBLAS is column-major: a row-major `[r, c]` buffer *is* the column-major `[c, r]`
/// matrix (its transpose) with leading dimension `c`. So the row-major C = A'·B' is computed
/// as the column-major Cᵀ = B'ᵀ·A'ᵀ, an `n × m` result with ldc = n:
/// - cuBLAS's first operand is our `b`: stored `[k, n]` it already reads as B'ᵀ (`OP_N`,
///   lda = n); stored `[n, k]` (transpose_b) it reads as B', so `OP_T`, lda = k;
/// - cuBLAS's second operand is our `a`: stored `[m, k]` it reads as A'ᵀ (`OP_N`, ldb = k);
///   stored `[k, m]` (transpose_a) it reads as A', so `OP_T`, ldb = m.
///
/// With `accumulate` false, beta = 0 and c is never read (it may hold NaN). Deterministic:
/// the handle has atomics disallowed, default (non-TF32) math and a fixed workspace of its
/// own, see [`Gpu::open`]. Capturable into a CUDA graph: host pointer mode, so alpha and
/// beta are captured by value, and the workspace spares cuBLAS any allocation.
///
/// `precision` TF32 or bf16: `cublasGemmEx` on the same f32 buffers with the compute type
/// `CUBLAS_COMPUTE_32F_FAST_TF32` or `_FAST_16BF`, which lets cuBLAS round a and b to that
/// format for the tensor cores and accumulate in f32; c stays f32.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    gpu: &Gpu, precision: GemmPrecision, transpose_a: bool, transpose_b: bool, m: usize, n: usize, k: usize,
    a: &CudaView<f32>, b: &CudaView<f32>, c: &mut CudaViewMut<f32>, accumulate: bool,
) -> Result<(), CudaError> {
    let fail = |message: String| CudaError::Launch { kernel: "cublasSgemm", message: format!("precondition failed: {message}") };
    let dim = |what: &str, v: usize| -> Result<i32, CudaError> {
        i32::try_from(v).ok().filter(|&v| v >= 1).ok_or_else(|| fail(format!("{what} = {v} must be in 1..2^31")))
    };
    let (m_i, n_i, k_i) = (dim("m", m)?, dim("n", n)?, dim("k", k)?);
    for (what, len, needed) in [("a", a.len(), m.checked_mul(k)), ("b", b.len(), k.checked_mul(n)), ("c", c.len(), m.checked_mul(n))] {
        match needed {
            Some(needed) if len >= needed => {}
            _ => return Err(fail(format!("{what} holds {len} elements, a {m}×{n}×{k} product needs more"))),
        }
    }
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let cfg = GemmConfig {
        transa: op(transpose_b),
        transb: op(transpose_a),
        m: n_i,
        n: m_i,
        k: k_i,
        alpha: 1.0f32,
        lda: if transpose_b { k_i } else { n_i },
        ldb: if transpose_a { m_i } else { k_i },
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: n_i,
    };
    gpu.context().bind_to_thread()?;
    let compute = match precision {
        // SAFETY: a holds m·k, b k·n and c m·n floats (checked above), which is exactly what
        // the column-major (n×m) = (n×k)·(k×m) product with these leading dimensions
        // touches; all three live on the handle's stream.
        GemmPrecision::F32 => return unsafe { gpu.blas.gemm(cfg, b, a, c) }.map_err(CudaError::from),
        GemmPrecision::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        GemmPrecision::Bf16 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
    };
    let stream = gpu.stream();
    let (b_ptr, _record_b) = b.device_ptr(stream);
    let (a_ptr, _record_a) = a.device_ptr(stream);
    let (c_ptr, _record_c) = c.device_ptr_mut(stream);
    let f32_type = cudaDataType_t::CUDA_R_32F;
    // SAFETY: the same operands, shapes and leading dimensions as the sgemm above (bounds
    // checked above), all f32 (CUDA_R_32F) on the handle's stream; alpha and beta are host
    // f32 values, as the handle's host pointer mode and a 32F compute type expect, read
    // before the call returns (captured by value under graph capture).
    unsafe {
        blas_result::gemm_ex(
            *gpu.blas.handle(), cfg.transa, cfg.transb, cfg.m, cfg.n, cfg.k,
            (&cfg.alpha) as *const f32 as *const _, b_ptr as *const _, f32_type, cfg.lda,
            a_ptr as *const _, f32_type, cfg.ldb,
            (&cfg.beta) as *const f32 as *const _, c_ptr as *mut _, f32_type, cfg.ldc,
            compute, cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(CudaError::from)
}
