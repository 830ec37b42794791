//! The one GEMM helper: row-major matrices over cuBLAS (sgemm in f32; GemmEx on tensor
//! cores with TF32 rounding, or on operands rounded to bf16).

use super::context::Gpu;
use super::kernels;
use super::CudaError;
use crate::backend::GemmPrecision;
use super::gemm_tuning::{self, alignment, BlasOperands, BlasShape};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

/// With [`Gpu::set_small_gemm`] on (`BNTRAIN_SMALL_GEMM=1`), f32 products of at most this
/// many multiply-adds run on cuda/small_gemm.cu: every GEMM of the seed network's step (the
/// largest is 60×100×784 = 4.7M), not a 10000-row evaluation chunk's (≥ 800M). Measured on
/// an H200 (docs/perf.md): the seed step takes 79.9 µs with them against 100.7 µs on cuBLAS
/// when launched eagerly, but 65.3 against 62.6 µs as a CUDA graph, where cuBLAS's kernels
/// are the faster ones. So they are off by default, kept for eager launches and as the
/// base for faster small kernels.
pub const SMALL_GEMM_MAX_MACS: usize = 1 << 24;
/// The warp-per-output form needs enough terms per output to give 32 lanes work.
const SMALL_GEMM_DOT_MIN_K: usize = 64;
/// The thread-per-output form walks k serially: for the wide network's output layer
/// (k = 1024, 10.5M multiply-adds) its two calls took 201.6 µs of kernel time a step under
/// Nsight Compute on an H100 (docs/perf.md), where cuBLAS's take a few each.
const SMALL_GEMM_OUTER_MAX_K: usize = 128;

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
/// Small f32 products (≤ [`SMALL_GEMM_MAX_MACS`], when switched on) skip cuBLAS: one warp
/// per output when both operands run along k (a·bᵀ), else, for k ≤ 128, one thread per
/// output (cuda/small_gemm.cu).
///
/// With `accumulate` false, beta = 0 and c is never read (it may hold NaN). Deterministic:
/// the small kernels add in a fixed order; the cuBLAS handle has atomics disallowed,
/// default (non-TF32) math and a fixed workspace of its own, see [`Gpu::open`].
/// Capturable into a CUDA graph: host pointer mode, so alpha and beta are captured by
/// value, and the workspace spares cuBLAS any allocation.
///
/// `precision` TF32: `cublasGemmEx` on the same f32 buffers with the compute type
/// `CUBLAS_COMPUTE_32F_FAST_TF32`, which rounds a and b to TF32 for the tensor cores and
/// accumulates in f32. bf16: a and b are first rounded to bf16 into the [`Gpu`]'s operand
/// scratch (cuda/bf16.cu, to nearest even, as [`GemmPrecision::round`]), then `cublasGemmEx`
/// multiplies the bf16 operands with f32 accumulation (`CUBLAS_COMPUTE_32F`). The compute
/// type `_FAST_16BF` on f32 buffers would only *allow* cuBLAS to use bf16: on an H100 it
/// picked TF32 kernels instead (docs/perf.md). c stays f32 in every case.
///
/// With GEMM tuning on ([`Gpu::set_gemm_tuning`], `BNTRAIN_GEMM_TUNE=1`), products of at
/// least [`gemm_tuning::TUNE_MIN_MACS`] multiply-adds run whichever of cuBLAS's own kernel
/// and cublasLt's candidates was fastest when the shape was first multiplied eagerly
/// ([`gemm_tuning`]); each is as capturable and as reproducible as the sgemm.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    gpu: &Gpu, precision: GemmPrecision, transpose_a: bool, transpose_b: bool, m: usize, n: usize, k: usize,
    a: &CudaView<f32>, b: &CudaView<f32>, c: &mut CudaViewMut<f32>, accumulate: bool,
) -> Result<(), CudaError> {
    let fail = |message: String| CudaError::Launch { kernel: "matmul", message: format!("precondition failed: {message}") };
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
    gpu.context().bind_to_thread()?;
    if precision == GemmPrecision::F32 && gpu.small_gemm() && m.saturating_mul(n).saturating_mul(k) <= SMALL_GEMM_MAX_MACS {
        if !transpose_a && transpose_b && k >= SMALL_GEMM_DOT_MIN_K {
            return kernels::small_gemm_dot(gpu, m, n, k, a, b, c, accumulate);
        }
        if k <= SMALL_GEMM_OUTER_MAX_K {
            return kernels::small_gemm_outer(gpu, transpose_a, transpose_b, m, n, k, a, b, c, accumulate);
        }
    }
    let stream = gpu.stream();
    let (c_ptr, _record_c) = c.device_ptr_mut(stream);
    // The operands as cuBLAS reads them: the f32 buffers, or their bf16 copies.
    let mut scratch;
    let (b_ptr, a_ptr) = if precision == GemmPrecision::Bf16 {
        let (a_len, b_len) = (m * k, k * n);
        scratch = gpu.bf16_operands(a_len.max(b_len))?;
        let operands = scratch.as_mut().expect("bf16_operands allocates the scratch");
        kernels::round_to_bf16(gpu, &a.slice(..a_len), &mut operands.a.slice_mut(..a_len))?;
        kernels::round_to_bf16(gpu, &b.slice(..b_len), &mut operands.b.slice_mut(..b_len))?;
        (operands.b.device_ptr(stream).0, operands.a.device_ptr(stream).0)
    } else {
        (b.device_ptr(stream).0, a.device_ptr(stream).0)
    };
    let shape = BlasShape {
        precision,
        transpose_a: transpose_b,
        transpose_b: transpose_a,
        m: n_i,
        n: m_i,
        k: k_i,
        lda: if transpose_b { k_i } else { n_i },
        ldb: if transpose_a { m_i } else { k_i },
        ldc: n_i,
        accumulate,
        alignment: [alignment(b_ptr), alignment(a_ptr), alignment(c_ptr)],
    };
    // Operands that hold at least m·k (a) and k·n (b) elements of the shape's operand type
    // (the f32 buffers, bounds checked above, or their bf16 copies of exactly those lengths)
    // and c with m·n f32, all on the handle's stream, which orders the rounding before the
    // product and keeps the scratch from being overwritten before the product has read it.
    let operands = BlasOperands { a: b_ptr, b: a_ptr, c: c_ptr };
    let algorithm = gemm_tuning::algorithm(gpu, &shape, operands)?;
    gemm_tuning::run(gpu, &shape, &algorithm, operands)
}
