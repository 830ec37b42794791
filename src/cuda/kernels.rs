//! One launcher per kernel of `cuda/*.cu`. Each checks its preconditions (lengths, sizes,
//! what the kernel's grid assumes) and returns [`CudaError::Launch`] instead of launching
//! something that could read or write out of bounds; then it launches on the [`Gpu`]'s
//! stream without waiting. The math of every kernel is the CPU reference's op of the same
//! name in [`crate::cpu::ops`]; see the comment at the top of each `.cu` file.
//!
//! Buffers are passed as views (`slice.as_view()`, `slice.slice(a..b)`), allocated on
//! [`Gpu::stream`]; row-major `[rows, width]` buffers may be longer than `rows·width` (a
//! buffer sized for the largest batch serves smaller ones). `None` passes a null pointer for
//! an optional output.

use super::context::Gpu;
use super::{describe_driver_error, CudaError};
use crate::model::{Activation, Averaging, StatsEstimator, VarianceKind};
use cudarc::driver::{sys, CudaFunction, CudaSlice, CudaView, CudaViewMut, DriverError, LaunchArgs, LaunchConfig, PushKernelArg};

/// A null device pointer, for optional kernel arguments.
static NULL: u64 = 0;
/// Threads per block of the elementwise and gather kernels.
const BLOCK: u32 = 256;
/// Upper bound on blocks for grid-stride kernels (enough to fill an H100/H200 several times).
const MAX_BLOCKS: usize = 4096;
/// Column kernels: block (TILE_COLS, TILE_ROWS); must match common.cuh.
const TILE_COLS: u32 = 8;
const TILE_ROWS: u32 = 64;
/// Threads per block of softmax_xent_f32; must match SOFTMAX_THREADS in softmax_xent.cu.
const SOFTMAX_THREADS: u32 = 256;
const _: () = assert!(super::context::MAX_CLASSES <= SOFTMAX_THREADS as usize, "a softmax block must cover every class");

/// Blocks of softmax_xent_f32 for `rows` rows: one per 256 rows, at most
/// SOFTMAX_MAX_BLOCKS (the row split, and so the order of every sum, depends on `rows` only).
pub fn softmax_blocks(rows: usize) -> u32 {
    rows.div_ceil(SOFTMAX_THREADS as usize).clamp(1, super::context::SOFTMAX_MAX_BLOCKS) as u32
}

/// The kernels' activation code; must match ACT_* in common.cuh.
fn activation_code(activation: Activation) -> i32 {
    match activation {
        Activation::Sigmoid => 0,
        Activation::Relu => 1,
    }
}

/// Fails with a precondition message for `kernel` unless `ok`.
fn require(kernel: &'static str, ok: bool, message: impl FnOnce() -> String) -> Result<(), CudaError> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::Launch { kernel, message: format!("precondition failed: {}", message()) })
    }
}

/// `value` as a kernel's 32-bit size argument, at least 1.
fn size_u32(kernel: &'static str, what: &str, value: usize) -> Result<u32, CudaError> {
    require(kernel, value >= 1, || format!("{what} must be at least 1"))?;
    u32::try_from(value).ok().filter(|&v| v <= i32::MAX as u32).ok_or_else(|| CudaError::Launch {
        kernel,
        message: format!("precondition failed: {what} = {value} exceeds the kernel's 31-bit range"),
    })
}

/// A grid's x dimension for `blocks` blocks (the driver takes at most 2³¹ − 1) covering
/// `m`×`n` outputs.
fn grid_blocks(kernel: &'static str, blocks: usize, m: usize, n: usize) -> Result<u32, CudaError> {
    u32::try_from(blocks).ok().filter(|&b| b <= i32::MAX as u32).ok_or_else(|| CudaError::Launch {
        kernel,
        message: format!("precondition failed: {m}×{n} outputs need {blocks} blocks, more than a grid holds"),
    })
}

/// Checks that buffer `what` holds at least `needed` elements.
fn require_len(kernel: &'static str, what: &str, len: usize, needed: usize) -> Result<(), CudaError> {
    require(kernel, len >= needed, || format!("{what} holds {len} elements, needs {needed}"))
}

/// Checks that each buffer (name, length) holds at least `needed` elements.
fn require_lens(kernel: &'static str, needed: usize, buffers: &[(&str, usize)]) -> Result<(), CudaError> {
    buffers.iter().try_for_each(|&(what, len)| require_len(kernel, what, len, needed))
}

/// `rows·width`, checked against overflow.
fn elements(kernel: &'static str, rows: usize, width: usize) -> Result<usize, CudaError> {
    rows.checked_mul(width).ok_or_else(|| CudaError::Launch { kernel, message: format!("precondition failed: {rows}×{width} overflows") })
}

fn launch_error(kernel: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |e| CudaError::Launch { kernel, message: format!("launch failed: {}", describe_driver_error(e)) }
}

/// [`launch_error`], except where the driver refused the launch's shape or resources, which
/// it reports at the call, before anything runs, and which leaves the context usable:
/// [`CudaError::LaunchRefused`]. (A fault of earlier work, reported at a launch, is not one
/// of these codes.)
fn refusable_launch_error(kernel: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |e| if is_refusal(e.0) { CudaError::LaunchRefused { kernel, message: describe_driver_error(e) } } else { launch_error(kernel)(e) }
}

/// The codes with which the driver refuses a launch at the call, for its cluster size,
/// shared memory or other resources.
fn is_refusal(code: sys::CUresult) -> bool {
    matches!(
        code,
        sys::CUresult::CUDA_ERROR_INVALID_CLUSTER_SIZE
            | sys::CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
            | sys::CUresult::CUDA_ERROR_INVALID_VALUE
            | sys::CUresult::CUDA_ERROR_NOT_SUPPORTED
    )
}

/// Grid-stride launch shape for `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Column-kernel launch shape for `width` features (common.cuh): one block per TILE_COLS features.
fn columns(width: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (width.div_ceil(TILE_COLS), 1, 1), block_dim: (TILE_COLS, TILE_ROWS, 1), shared_mem_bytes: 0 }
}

fn builder<'a>(gpu: &'a Gpu, function: &'a CudaFunction) -> LaunchArgs<'a> {
    gpu.stream().launch_builder(function)
}

/// Pushes an optional read-only buffer (null when absent).
fn opt<'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a CudaView<'_, T>>) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

/// Pushes an optional output buffer (null when absent).
fn opt_mut<'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a mut CudaViewMut<'_, T>>) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

/// `gather_rows_f32` (cpu::ops::gather_batch): `x[r,:]` = `images[idx(r),:]`/255 and
/// `batch_labels[r]` = `labels[idx(r)]`, with idx(r) = `order[base + r]` (or base + r without an
/// order) and base = first + `cursor[0]`·rows (cursor: the device batch counter; without
/// one, base = first).
/// images: `[count, features]` u8 with count = labels.len(); x: `[rows, features]`.
#[allow(clippy::too_many_arguments)]
pub fn gather_rows(
    gpu: &Gpu, images: &CudaView<u8>, labels: &CudaView<u8>, features: usize,
    order: Option<&CudaView<u32>>, cursor: Option<&CudaView<u32>>, first: usize, rows: usize,
    x: &mut CudaViewMut<f32>, batch_labels: &mut CudaViewMut<u8>,
) -> Result<(), CudaError> {
    const K: &str = "gather_rows_f32";
    let count = labels.len();
    let (count_u, features_u, rows_u) = (size_u32(K, "count", count)?, size_u32(K, "features", features)?, size_u32(K, "rows", rows)?);
    require_len(K, "images", images.len(), elements(K, count, features)?)?;
    require_len(K, "x", x.len(), elements(K, rows, features)?)?;
    require_len(K, "batch_labels", batch_labels.len(), rows)?;
    let order_len = order.map_or(0, |o| o.len());
    let order_len_u = u32::try_from(order_len).map_err(|_| CudaError::Launch { kernel: K, message: "precondition failed: order longer than 2^32".into() })?;
    if cursor.is_none() {
        // Without a device cursor the rows read are known here: check them.
        let end = first.saturating_add(rows);
        let available = if order.is_some() { order_len } else { count };
        require(K, end <= available, || format!("rows {first}..{end} lie past the {} ({available} entries)", if order.is_some() { "order" } else { "split" }))?;
    }
    // (With a cursor, rows past the order or indices ≥ count become NaN rows on the device.)
    let first_u = u32::try_from(first).map_err(|_| CudaError::Launch { kernel: K, message: "precondition failed: first ≥ 2^32".into() })?;
    let cfg = LaunchConfig { grid_dim: (rows_u, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let mut b = builder(gpu, &gpu.functions.gather_rows);
    b.arg(images).arg(labels).arg(&count_u).arg(&features_u);
    opt(&mut b, order);
    b.arg(&order_len_u);
    opt(&mut b, cursor);
    b.arg(&first_u).arg(&rows_u).arg(x).arg(batch_labels);
    // SAFETY: argument types and order match the kernel's signature; images holds
    // count·features bytes, x rows·features floats and batch_labels rows bytes (checked);
    // the kernel reads order only below order_len and images only for indices < count.
    unsafe { b.launch(cfg) }.map(drop).map_err(launch_error(K))
}

/// `bn_act_fwd_train_f32` (cpu::ops::batch_norm_forward_train, then activation_forward):
/// batch mean, biased variance, inv_std = 1/√(σ²+ε), x̂, y = γx̂+β, a = act(y).
/// z, x_hat, y, a: `[rows, width]`; gamma, beta, mean, var, inv_std: `[width]`.
#[allow(clippy::too_many_arguments)]
pub fn bn_act_fwd_train(
    gpu: &Gpu, z: &CudaView<f32>, gamma: &CudaView<f32>, beta: &CudaView<f32>, epsilon: f32,
    activation: Activation, rows: usize, width: usize,
    mean: &mut CudaViewMut<f32>, var: &mut CudaViewMut<f32>, inv_std: &mut CudaViewMut<f32>,
    x_hat: &mut CudaViewMut<f32>, y: Option<&mut CudaViewMut<f32>>, a: &mut CudaViewMut<f32>,
) -> Result<(), CudaError> {
    const K: &str = "bn_act_fwd_train_f32";
    let (rows_u, width_u) = (size_u32(K, "rows", rows)?, size_u32(K, "width", width)?);
    let n = elements(K, rows, width)?;
    require_lens(K, n, &[("z", z.len()), ("x_hat", x_hat.len()), ("a", a.len())])?;
    if let Some(y) = &y {
        require_len(K, "y", y.len(), n)?;
    }
    require_lens(K, width, &[("gamma", gamma.len()), ("beta", beta.len()), ("mean", mean.len()), ("var", var.len()), ("inv_std", inv_std.len())])?;
    let act = activation_code(activation);
    let mut b = builder(gpu, &gpu.functions.bn_act_fwd_train);
    b.arg(z).arg(gamma).arg(beta).arg(&epsilon).arg(&act).arg(&rows_u).arg(&width_u);
    b.arg(mean).arg(var).arg(inv_std).arg(x_hat);
    opt_mut(&mut b, y);
    b.arg(a);
    // SAFETY: types and order match the kernel; every [rows, width] buffer holds rows·width
    // floats and every per-feature buffer width floats (checked); the grid covers the
    // columns with blocks of (TILE_COLS, TILE_ROWS) threads, the shape of its shared tile.
    unsafe { b.launch(columns(width_u)) }.map(drop).map_err(launch_error(K))
}

/// Rows a part of the split BN forward covers ([`bn_column_moments`]): 40 parts for the
/// 10 000 test images, 520 blocks with the seed's 100 features, about four an SM.
pub const BN_PART_ROWS: usize = 256;

/// Batches of more rows than this take the split BN forward ([`bn_column_moments`], then
/// [`bn_act_fwd_train_parts`]; [`bn_forward_in_parts`]); the configurations' training batches (up to the wide
/// network's 1024) keep the one-launch column kernel, whose ceil(width/8) blocks then suffice.
pub const BN_SPLIT_ROWS: usize = 1024;

/// The most parts a split BN forward has: the driver's limit on grid.y.
const BN_MAX_PARTS: usize = 65_535;

/// Whether a BN training forward over `rows` rows takes the split kernels: more than
/// [`BN_SPLIT_ROWS`] rows, in at most [`BN_MAX_PARTS`] parts (a taller batch, over 16.7
/// million rows, keeps the column kernel, which has no such limit).
pub fn bn_forward_in_parts(rows: usize) -> bool {
    rows > BN_SPLIT_ROWS && rows.div_ceil(BN_PART_ROWS) <= BN_MAX_PARTS
}

/// Floats of the split BN forward's moments for `rows` rows of `width` features: [2, parts,
/// width].
pub fn bn_moments_len(rows: usize, width: usize) -> usize {
    2usize.saturating_mul(rows.div_ceil(BN_PART_ROWS)).saturating_mul(width)
}

/// The split forward's launch shape: one block per TILE_COLS features (x) and part (y).
fn column_parts(kernel: &'static str, rows: usize, width: u32) -> Result<LaunchConfig, CudaError> {
    let parts = rows.div_ceil(BN_PART_ROWS);
    require(kernel, (1..=BN_MAX_PARTS).contains(&parts), || format!("{rows} rows make {parts} parts of {BN_PART_ROWS}, not 1 to {BN_MAX_PARTS}"))?;
    Ok(LaunchConfig { grid_dim: (width.div_ceil(TILE_COLS), parts as u32, 1), ..columns(width) })
}

/// Tickets of the split BN forward for `width` features: one per column group of
/// TILE_COLS, zero before the first launch ([`bn_column_moments`] leaves them so).
pub fn bn_tickets_len(width: usize) -> usize {
    width.div_ceil(TILE_COLS as usize)
}

/// `bn_column_moments_f32`, the split BN forward's first kernel: every part of
/// [`BN_PART_ROWS`] rows' column means and sums of squared deviations from them, into
/// `moments` ([2, parts, width], [`bn_moments_len`]); then the last block of each column
/// group to finish merges them into the batch mean, biased variance and inv_std = 1/√(σ²+ε)
/// (as [`bn_act_fwd_train`] gives them, summed in another order). z: `[rows, width]`;
/// mean, var, inv_std: `[width]`; tickets: [`bn_tickets_len`], all zero.
#[allow(clippy::too_many_arguments)]
pub fn bn_column_moments(
    gpu: &Gpu, z: &CudaView<f32>, rows: usize, width: usize, epsilon: f32, moments: &mut CudaViewMut<f32>,
    tickets: &mut CudaViewMut<u32>, mean: &mut CudaViewMut<f32>, var: &mut CudaViewMut<f32>, inv_std: &mut CudaViewMut<f32>,
) -> Result<(), CudaError> {
    const K: &str = "bn_column_moments_f32";
    let (rows_u, width_u) = (size_u32(K, "rows", rows)?, size_u32(K, "width", width)?);
    require_len(K, "z", z.len(), elements(K, rows, width)?)?;
    require_len(K, "moments", moments.len(), bn_moments_len(rows, width))?;
    require_len(K, "tickets", tickets.len(), bn_tickets_len(width))?;
    require_lens(K, width, &[("mean", mean.len()), ("var", var.len()), ("inv_std", inv_std.len())])?;
    let shape = column_parts(K, rows, width_u)?;
    let part_rows = BN_PART_ROWS as u32;
    let mut b = builder(gpu, &gpu.functions.bn_column_moments);
    b.arg(z).arg(&rows_u).arg(&width_u).arg(&part_rows).arg(&epsilon).arg(moments).arg(tickets);
    b.arg(mean).arg(var).arg(inv_std);
    // SAFETY: types and order match the kernel; z holds rows·width floats, moments
    // 2·parts·width, tickets one per column group and every per-feature buffer width floats
    // (checked); grid.y is the number of parts of part_rows rows, each of which holds at least
    // one row, and the block is the (TILE_COLS, TILE_ROWS) of its shared tiles. Tickets
    // not zero would give wrong statistics, never an access out of bounds.
    unsafe { b.launch(shape) }.map(drop).map_err(launch_error(K))
}

/// `bn_act_fwd_train_parts_f32`, the split BN forward's second kernel: x̂, y and a with the
/// batch statistics [`bn_column_moments`] merged (its mean and inv_std, read here).
/// z, x_hat, y, a: `[rows, width]`; gamma, beta, mean, inv_std: `[width]`.
#[allow(clippy::too_many_arguments)]
pub fn bn_act_fwd_train_parts(
    gpu: &Gpu, z: &CudaView<f32>, gamma: &CudaView<f32>, beta: &CudaView<f32>, activation: Activation,
    rows: usize, width: usize, mean: &CudaView<f32>, inv_std: &CudaView<f32>,
    x_hat: &mut CudaViewMut<f32>, y: Option<&mut CudaViewMut<f32>>, a: &mut CudaViewMut<f32>,
) -> Result<(), CudaError> {
    const K: &str = "bn_act_fwd_train_parts_f32";
    let (rows_u, width_u) = (size_u32(K, "rows", rows)?, size_u32(K, "width", width)?);
    let n = elements(K, rows, width)?;
    require_lens(K, n, &[("z", z.len()), ("x_hat", x_hat.len()), ("a", a.len())])?;
    if let Some(y) = &y {
        require_len(K, "y", y.len(), n)?;
    }
    require_lens(K, width, &[("gamma", gamma.len()), ("beta", beta.len()), ("mean", mean.len()), ("inv_std", inv_std.len())])?;
    let shape = column_parts(K, rows, width_u)?;
    let (act, part_rows) = (activation_code(activation), BN_PART_ROWS as u32);
    let mut b = builder(gpu, &gpu.functions.bn_act_fwd_train_parts);
    b.arg(z).arg(gamma).arg(beta).arg(&act).arg(&rows_u).arg(&width_u).arg(&part_rows).arg(mean).arg(inv_std).arg(x_hat);
    opt_mut(&mut b, y);
    b.arg(a);
    // SAFETY: types and order match the kernel; every [rows, width] buffer holds rows·width
    // floats and every per-feature buffer width floats (checked); grid.y is the number of
    // parts of part_rows rows, each of which holds at least one row.
    unsafe { b.launch(shape) }.map(drop).map_err(launch_error(K))
}

/// `bn_act_fwd_infer_f32` (cpu::ops::batch_norm_forward_infer, then activation_forward):
/// y = (z − μ)·γ/√(σ²+ε) + β with population μ, σ²; a = act(y).
/// z, y, a: `[rows, width]`; gamma, beta, mean, var: `[width]`.
#[allow(clippy::too_many_arguments)]
pub fn bn_act_fwd_infer(
    gpu: &Gpu, z: &CudaView<f32>, gamma: &CudaView<f32>, beta: &CudaView<f32>,
    mean: &CudaView<f32>, var: &CudaView<f32>, epsilon: f32, activation: Activation,
    rows: usize, width: usize, y: Option<&mut CudaViewMut<f32>>, a: &mut CudaViewMut<f32>,
) -> Result<(), CudaError> {
    const K: &str = "bn_act_fwd_infer_f32";
    let (rows_u, width_u) = (size_u32(K, "rows", rows)?, size_u32(K, "width", width)?);
    let n = elements(K, rows, width)?;
    require_len(K, "z", z.len(), n)?;
    require_len(K, "a", a.len(), n)?;
    if let Some(y) = &y {
        require_len(K, "y", y.len(), n)?;
    }
    require_lens(K, width, &[("gamma", gamma.len()), ("beta", beta.len()), ("mean", mean.len()), ("var", var.len())])?;
    let act = activation_code(activation);
    let mut b = builder(gpu, &gpu.functions.bn_act_fwd_infer);
    b.arg(z).arg(gamma).arg(beta).arg(mean).arg(var).arg(&epsilon).arg(&act).arg(&rows_u).arg(&width_u);
    opt_mut(&mut b, y);
    b.arg(a);
    // SAFETY: types and order match the kernel; buffers hold rows·width or width floats
    // (checked); the kernel is grid-stride over rows·width, so any grid is valid.
    unsafe { b.launch(elementwise(n)) }.map(drop).map_err(launch_error(K))
}

/// `act_bn_bwd_f32` (cpu::ops::activation_backward, then batch_norm_backward):
/// dy = act'(da) from the saved a; dβ = Σ dy, dγ = Σ dy·x̂, dz = (γ·inv_std/B)(B·dy − dβ − x̂·dγ).
/// da, a, x_hat, dz: `[rows, width]`; gamma, inv_std, d_gamma, d_beta: `[width]`.
#[allow(clippy::too_many_arguments)]
pub fn act_bn_bwd(
    gpu: &Gpu, da: &CudaView<f32>, a: &CudaView<f32>, x_hat: &CudaView<f32>,
    gamma: &CudaView<f32>, inv_std: &CudaView<f32>, activation: Activation, rows: usize, width: usize,
    dz: &mut CudaViewMut<f32>, d_gamma: &mut CudaViewMut<f32>, d_beta: &mut CudaViewMut<f32>,
) -> Result<(), CudaError> {
    const K: &str = "act_bn_bwd_f32";
    let (rows_u, width_u) = (size_u32(K, "rows", rows)?, size_u32(K, "width", width)?);
    let n = elements(K, rows, width)?;
    require_lens(K, n, &[("da", da.len()), ("a", a.len()), ("x_hat", x_hat.len()), ("dz", dz.len())])?;
    require_lens(K, width, &[("gamma", gamma.len()), ("inv_std", inv_std.len()), ("d_gamma", d_gamma.len()), ("d_beta", d_beta.len())])?;
    let act = activation_code(activation);
    let mut b = builder(gpu, &gpu.functions.act_bn_bwd);
    b.arg(da).arg(a).arg(x_hat).arg(gamma).arg(inv_std).arg(&act).arg(&rows_u).arg(&width_u);
    b.arg(dz).arg(d_gamma).arg(d_beta);
    // SAFETY: types and order match the kernel; buffers hold rows·width or width floats
    // (checked); grid and block are the column-kernel shape the shared tile assumes.
    unsafe { b.launch(columns(width_u)) }.map(drop).map_err(launch_error(K))
}

/// `bias_act_fwd_f32` (cpu::ops::linear_forward's bias add, then activation_forward):
/// y = z + bias (y = z without a bias), a = act(y).  z, y, a: `[rows, width]`; bias: `[width]`.
#[allow(clippy::too_many_arguments)]
pub fn bias_act_fwd(
    gpu: &Gpu, z: &CudaView<f32>, bias: Option<&CudaView<f32>>, activation: Activation,
    rows: usize, width: usize, y: Option<&mut CudaViewMut<f32>>, a: &mut CudaViewMut<f32>,
) -> Result<(), CudaError> {
    const K: &str = "bias_act_fwd_f32";
    let (rows_u, width_u) = (size_u32(K, "rows", rows)?, size_u32(K, "width", width)?);
    let n = elements(K, rows, width)?;
    require_len(K, "z", z.len(), n)?;
    require_len(K, "a", a.len(), n)?;
    if let Some(y) = &y {
        require_len(K, "y", y.len(), n)?;
    }
    if let Some(bias) = bias {
        require_len(K, "bias", bias.len(), width)?;
    }
    let act = activation_code(activation);
    let mut b = builder(gpu, &gpu.functions.bias_act_fwd);
    b.arg(z);
    opt(&mut b, bias);
    b.arg(&act).arg(&rows_u).arg(&width_u);
    opt_mut(&mut b, y);
    b.arg(a);
    // SAFETY: types and order match the kernel; buffers hold rows·width or width floats
    // (checked); grid-stride over rows·width, so any grid is valid.
    unsafe { b.launch(elementwise(n)) }.map(drop).map_err(launch_error(K))
}

/// `act_bwd_bias_grad_f32` (cpu::ops::activation_backward, then the bias part of
/// linear_backward): dz = act'(da) from the saved a, dbias = Σ_rows dz.
/// da, a, dz: `[rows, width]`; dbias: `[width]`.
#[allow(clippy::too_many_arguments)]
pub fn act_bwd_bias_grad(
    gpu: &Gpu, da: &CudaView<f32>, a: &CudaView<f32>, activation: Activation, rows: usize, width: usize,
    dz: &mut CudaViewMut<f32>, dbias: Option<&mut CudaViewMut<f32>>,
) -> Result<(), CudaError> {
    const K: &str = "act_bwd_bias_grad_f32";
    let (rows_u, width_u) = (size_u32(K, "rows", rows)?, size_u32(K, "width", width)?);
    let n = elements(K, rows, width)?;
    require_lens(K, n, &[("da", da.len()), ("a", a.len()), ("dz", dz.len())])?;
    if let Some(dbias) = &dbias {
        require_len(K, "dbias", dbias.len(), width)?;
    }
    let act = activation_code(activation);
    let mut b = builder(gpu, &gpu.functions.act_bwd_bias_grad);
    b.arg(da).arg(a).arg(&act).arg(&rows_u).arg(&width_u).arg(dz);
    opt_mut(&mut b, dbias);
    // SAFETY: types and order match the kernel; buffers hold rows·width or width floats
    // (checked); grid and block are the column-kernel shape the shared tile assumes.
    unsafe { b.launch(columns(width_u)) }.map(drop).map_err(launch_error(K))
}

/// `softmax_xent_f32` (cpu::ops::softmax_cross_entropy and argmax, with the output layer's
/// bias add and bias gradient): logits = z + bias; `loss_sum[0]` += Σ ℓ (f64),
/// `correct[0]` += #(argmax = label); dlogits = (softmax − onehot)·grad_scale;
/// dbias = Σ_rows dlogits (needs dlogits); `predicted[r]` = argmax.
/// z, dlogits: `[rows, classes]`; bias, dbias: `[classes]`; labels, predicted: `[rows]`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_xent(
    gpu: &Gpu, z: &CudaView<f32>, bias: Option<&CudaView<f32>>, labels: &CudaView<u8>,
    rows: usize, classes: usize, grad_scale: f32,
    dlogits: Option<&mut CudaViewMut<f32>>, dbias: Option<&mut CudaViewMut<f32>>,
    predicted: Option<&mut CudaViewMut<u8>>,
    loss_sum: &mut CudaViewMut<f64>, correct: &mut CudaViewMut<u64>,
) -> Result<(), CudaError> {
    const K: &str = "softmax_xent_f32";
    let (rows_u, classes_u) = (size_u32(K, "rows", rows)?, size_u32(K, "classes", classes)?);
    require(K, classes <= super::context::MAX_CLASSES, || format!("{classes} classes do not fit the u8 predictions"))?;
    // The bias gradient gives each class at least one thread of the block (below it, it
    // would be silently zero); MAX_CLASSES ≤ SOFTMAX_THREADS makes this hold (asserted at SOFTMAX_THREADS).
    require(K, classes <= SOFTMAX_THREADS as usize, || format!("{classes} classes exceed the block's {SOFTMAX_THREADS} threads"))?;
    let n = elements(K, rows, classes)?;
    require_len(K, "z", z.len(), n)?;
    require_len(K, "labels", labels.len(), rows)?;
    if let Some(bias) = bias {
        require_len(K, "bias", bias.len(), classes)?;
    }
    if let Some(d) = &dlogits {
        require_len(K, "dlogits", d.len(), n)?;
    }
    if let Some(d) = &dbias {
        require(K, dlogits.is_some(), || "the bias gradient is summed from dlogits, which is missing".into())?;
        require_len(K, "dbias", d.len(), classes)?;
    }
    if let Some(p) = &predicted {
        require_len(K, "predicted", p.len(), rows)?;
    }
    require_len(K, "loss_sum", loss_sum.len(), 1)?;
    require_len(K, "correct", correct.len(), 1)?;
    let mut b = builder(gpu, &gpu.functions.softmax_xent);
    b.arg(z);
    opt(&mut b, bias);
    b.arg(labels).arg(&rows_u).arg(&classes_u).arg(&grad_scale);
    opt_mut(&mut b, dlogits);
    opt_mut(&mut b, dbias);
    opt_mut(&mut b, predicted);
    b.arg(loss_sum).arg(correct);
    let mut partials = gpu.softmax_partials.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let partials = &mut *partials;
    b.arg(&mut partials.loss).arg(&mut partials.correct).arg(&mut partials.dbias).arg(&mut partials.ticket);
    let blocks = softmax_blocks(rows);
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (SOFTMAX_THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: types and order match the kernel; buffers hold rows·classes, classes or rows
    // elements and the accumulators one each (checked). The grid is softmax_blocks(rows) ≤
    // SOFTMAX_MAX_BLOCKS blocks of SOFTMAX_THREADS threads, as the kernel's row split
    // assumes; the scratch holds SOFTMAX_MAX_BLOCKS partial sums and SOFTMAX_MAX_BLOCKS ×
    // MAX_CLASSES ≥ blocks × classes bias partials (Gpu::open), and its ticket is zero
    // (allocated so, and every launch leaves it so; launches on the one stream never overlap).
    unsafe { b.launch(cfg) }.map(drop).map_err(launch_error(K))
}

/// The BN layers and estimators the running statistics cover, uploaded once. Layer `l`
/// owns features `[offset_l, offset_l + width_l)` of `total`; statistics buffers are
/// `[estimators, total]` and the batch counts `[estimators, layers]`.
pub struct RunningStatsLayout {
    widths: Vec<usize>,
    total: usize,
    estimators: usize,
    offsets_dev: CudaSlice<u32>,
    widths_dev: CudaSlice<u32>,
    /// Per estimator: (decay, or −1 for the cumulative average; 1 if unbiased else 0).
    table_dev: CudaSlice<f64>,
}

impl RunningStatsLayout {
    /// Lays out BN layers of the given widths (concatenated) for `estimators`.
    pub fn new(gpu: &Gpu, widths: &[usize], estimators: &[StatsEstimator]) -> Result<Self, CudaError> {
        const K: &str = "running_stats_update_f32";
        require(K, !widths.is_empty() && widths.iter().all(|&w| w >= 1), || "needs at least one BN layer, each of width ≥ 1".into())?;
        require(K, !estimators.is_empty(), || "needs at least one estimator".into())?;
        let total: usize = widths.iter().sum();
        size_u32(K, "total BN width", total)?;
        let mut offsets = Vec::with_capacity(widths.len());
        let mut acc = 0u32;
        for &w in widths {
            offsets.push(acc);
            acc += w as u32;
        }
        let widths_u: Vec<u32> = widths.iter().map(|&w| w as u32).collect();
        let mut table = Vec::with_capacity(2 * estimators.len());
        for e in estimators {
            let decay = match e.averaging {
                Averaging::Ema { decay } => {
                    require(K, decay > 0.0 && decay < 1.0, || format!("EMA decay {decay} is not in (0, 1)"))?;
                    decay
                }
                Averaging::Cumulative => -1.0,
            };
            table.push(decay);
            table.push(if e.variance == VarianceKind::Unbiased { 1.0 } else { 0.0 });
        }
        let stream = gpu.stream();
        Ok(RunningStatsLayout {
            widths: widths.to_vec(),
            total,
            estimators: estimators.len(),
            offsets_dev: stream.clone_htod(&offsets)?,
            widths_dev: stream.clone_htod(&widths_u)?,
            table_dev: stream.clone_htod(&table)?,
        })
    }

    /// Sum of the BN layers' widths.
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn layers(&self) -> usize {
        self.widths.len()
    }
    pub fn estimators(&self) -> usize {
        self.estimators
    }
}

/// `running_stats_update_f32` (cpu::ops::update_running_stats for every BN layer and
/// estimator at once): folds the batch statistics into every running estimate and adds 1
/// to every batch count.
/// batch_mean, batch_var: `[total]`; running_mean, running_var: `[estimators, total]`;
/// batches: `[estimators, layers]`.
#[allow(clippy::too_many_arguments)]
pub fn running_stats_update(
    gpu: &Gpu, layout: &RunningStatsLayout, batch_size: usize,
    batch_mean: &CudaView<f32>, batch_var: &CudaView<f32>,
    running_mean: &mut CudaViewMut<f32>, running_var: &mut CudaViewMut<f32>, batches: &mut CudaViewMut<u64>,
) -> Result<(), CudaError> {
    const K: &str = "running_stats_update_f32";
    let batch_u = size_u32(K, "batch size", batch_size)?;
    // The unbiased variance divides by B − 1 (TrainConfig::validate refuses BN with batch 1).
    require(K, batch_size >= 2, || format!("batch statistics of {batch_size} example(s) have no variance"))?;
    let (total, e, layers) = (layout.total, layout.estimators, layout.layers());
    require_len(K, "batch_mean", batch_mean.len(), total)?;
    require_len(K, "batch_var", batch_var.len(), total)?;
    require_len(K, "running_mean", running_mean.len(), e * total)?;
    require_len(K, "running_var", running_var.len(), e * total)?;
    require_len(K, "batches", batches.len(), e * layers)?;
    let (total_u, e_u, layers_u) = (total as u32, e as u32, layers as u32);
    let mut b = builder(gpu, &gpu.functions.running_stats_update);
    b.arg(batch_mean).arg(batch_var).arg(&layout.offsets_dev).arg(&layout.widths_dev).arg(&total_u);
    b.arg(&layout.table_dev).arg(&e_u).arg(&batch_u).arg(running_mean).arg(running_var).arg(batches);
    let cfg = LaunchConfig { grid_dim: (layers_u, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: types and order match the kernel; the layout's offsets and widths tile
    // [0, total) by construction, so every index is below total (or estimators·total, or
    // estimators·layers for the counts), and those lengths are checked above; one block per
    // layer, as the kernel's race-free count update requires.
    unsafe { b.launch(cfg) }.map(drop).map_err(launch_error(K))
}

/// `sgd_update_f32` (cpu::ops::sgd_update over one flat buffer): v ← μv + g, w ← w − lr·v
/// (w ← w − lr·g without velocity); then `cursor[0]` += 1 when a cursor is given.
/// w, g, v: the same length.
pub fn sgd_update(
    gpu: &Gpu, w: &mut CudaViewMut<f32>, g: &CudaView<f32>, v: Option<&mut CudaViewMut<f32>>,
    lr: f32, momentum: f32, cursor: Option<&mut CudaViewMut<u32>>,
) -> Result<(), CudaError> {
    const K: &str = "sgd_update_f32";
    let n = w.len();
    require(K, n >= 1, || "no parameters".into())?;
    require(K, g.len() == n, || format!("gradient length {} differs from the parameters' {n}", g.len()))?;
    if let Some(v) = &v {
        require(K, v.len() == n, || format!("velocity length {} differs from the parameters' {n}", v.len()))?;
    }
    if let Some(c) = &cursor {
        require_len(K, "cursor", c.len(), 1)?;
    }
    let n_u = n as u64;
    let mut b = builder(gpu, &gpu.functions.sgd_update);
    b.arg(w).arg(g);
    opt_mut(&mut b, v);
    b.arg(&n_u).arg(&lr).arg(&momentum);
    opt_mut(&mut b, cursor);
    // SAFETY: types and order match the kernel; w, g and v hold n floats (checked) and the
    // kernel is grid-stride below n, so any grid is valid.
    unsafe { b.launch(elementwise(n)) }.map(drop).map_err(launch_error(K))
}

/// `count_non_finite_f32`: `count[0]` += the number of NaN and ±∞ values in `x` (the caller
/// zeroes the count once before a series of launches).
pub fn count_non_finite(gpu: &Gpu, x: &CudaView<f32>, count: &mut CudaViewMut<u32>) -> Result<(), CudaError> {
    const K: &str = "count_non_finite_f32";
    let n = x.len();
    require(K, n >= 1, || "an empty buffer".into())?;
    require_len(K, "count", count.len(), 1)?;
    let n_u = n as u64;
    let mut b = builder(gpu, &gpu.functions.count_non_finite);
    b.arg(x).arg(&n_u).arg(count);
    // SAFETY: types and order match the kernel; x holds n floats and the kernel is
    // grid-stride below n; count holds one u32 (checked).
    unsafe { b.launch(elementwise(n)) }.map(drop).map_err(launch_error(K))
}

/// Threads per block of the small-GEMM kernels, and outputs per block of the dot form;
/// must match SMALL_GEMM_THREADS and SMALL_GEMM_LANES in small_gemm.cu.
const SMALL_GEMM_THREADS: u32 = 256;
const SMALL_GEMM_OUTPUTS_PER_BLOCK: usize = 256 / 32;

/// Checks a small GEMM's sizes and operand lengths (a: m·k, b: k·n, c: m·n) and returns
/// (m, n, k) as kernel arguments and m·n.
#[allow(clippy::too_many_arguments)]
fn small_gemm_shape(
    kernel: &'static str, m: usize, n: usize, k: usize, a: &CudaView<f32>, b: &CudaView<f32>, c: &CudaViewMut<f32>,
) -> Result<(u32, u32, u32, usize), CudaError> {
    let (m_u, n_u, k_u) = (size_u32(kernel, "m", m)?, size_u32(kernel, "n", n)?, size_u32(kernel, "k", k)?);
    require_len(kernel, "a", a.len(), elements(kernel, m, k)?)?;
    require_len(kernel, "b", b.len(), elements(kernel, k, n)?)?;
    let outputs = elements(kernel, m, n)?;
    require_len(kernel, "c", c.len(), outputs)?;
    Ok((m_u, n_u, k_u, outputs))
}

/// `small_gemm_dot_f32`: c ← a·bᵀ (+ c when `accumulate`) with a stored `[m, k]` and b
/// stored `[n, k]` (the transposes [`super::gemm::matmul`] calls (false, true)); one warp
/// per output.
#[allow(clippy::too_many_arguments)]
pub fn small_gemm_dot(
    gpu: &Gpu, m: usize, n: usize, k: usize, a: &CudaView<f32>, b: &CudaView<f32>, c: &mut CudaViewMut<f32>, accumulate: bool,
) -> Result<(), CudaError> {
    const K: &str = "small_gemm_dot_f32";
    let (m_u, n_u, k_u, outputs) = small_gemm_shape(K, m, n, k, a, b, c)?;
    let blocks = grid_blocks(K, outputs.div_ceil(SMALL_GEMM_OUTPUTS_PER_BLOCK), m, n)?;
    let acc = i32::from(accumulate);
    let mut args = builder(gpu, &gpu.functions.small_gemm_dot);
    args.arg(a).arg(b).arg(c).arg(&m_u).arg(&n_u).arg(&k_u).arg(&acc);
    // SAFETY: types and order match the kernel; a holds m·k, b n·k and c m·n floats
    // (checked); the grid gives every one of the m·n outputs a group of 32 lanes, and
    // groups past the last output only write shared memory.
    let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (SMALL_GEMM_THREADS, 1, 1), shared_mem_bytes: 0 };
    unsafe { args.launch(config) }.map(drop).map_err(launch_error(K))
}

/// `small_gemm_outer_f32`: c ← a'·b' (+ c when `accumulate`) with the transposes and
/// layouts of [`super::gemm::matmul`]; one thread per output.
#[allow(clippy::too_many_arguments)]
pub fn small_gemm_outer(
    gpu: &Gpu, transpose_a: bool, transpose_b: bool, m: usize, n: usize, k: usize,
    a: &CudaView<f32>, b: &CudaView<f32>, c: &mut CudaViewMut<f32>, accumulate: bool,
) -> Result<(), CudaError> {
    const K: &str = "small_gemm_outer_f32";
    let (m_u, n_u, k_u, outputs) = small_gemm_shape(K, m, n, k, a, b, c)?;
    let blocks = grid_blocks(K, outputs.div_ceil(SMALL_GEMM_THREADS as usize), m, n)?;
    let (ta, tb, acc) = (i32::from(transpose_a), i32::from(transpose_b), i32::from(accumulate));
    let mut args = builder(gpu, &gpu.functions.small_gemm_outer);
    args.arg(a).arg(b).arg(c).arg(&m_u).arg(&n_u).arg(&k_u).arg(&ta).arg(&tb).arg(&acc);
    // SAFETY: types and order match the kernel; a holds m·k, b k·n and c m·n floats
    // (checked), which bound every index the kernel forms for either transpose; threads
    // past the m·n outputs return at once.
    let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (SMALL_GEMM_THREADS, 1, 1), shared_mem_bytes: 0 };
    unsafe { args.launch(config) }.map(drop).map_err(launch_error(K))
}

/// `round_to_bf16`: `out[i]` ← the bf16 bits of `x[i]` rounded to nearest even (NaN stays
/// NaN), i.e. [`crate::backend::GemmPrecision::round`] for bf16, for every element of `x`.
pub fn round_to_bf16(gpu: &Gpu, x: &CudaView<f32>, out: &mut CudaViewMut<u16>) -> Result<(), CudaError> {
    const K: &str = "round_to_bf16";
    let n = x.len();
    require(K, n >= 1, || "an empty buffer".into())?;
    require_len(K, "out", out.len(), n)?;
    let n_u = n as u64;
    let mut b = builder(gpu, &gpu.functions.round_to_bf16);
    b.arg(x).arg(&n_u).arg(out);
    // SAFETY: types and order match the kernel; x holds n floats, out at least n u16
    // (checked), and the kernel is grid-stride below n.
    unsafe { b.launch(elementwise(n)) }.map(drop).map_err(launch_error(K))
}

/// Threads per block `fused_train_steps_f32` may be launched with (FusedPlan::new's
/// `threads`): powers of two up to FUSED_MAX_THREADS in fused_step.cu (its launch bounds).
pub const FUSED_BLOCK_THREADS: [u32; 3] = [256, 512, 1024];
/// Threads per block of the staged and the pair kernels; must match FUSED_STAGED_THREADS in
/// fused_step.cu (their launch bounds).
const FUSED_STAGED_THREADS: u32 = 256;
/// Ints per layer of its layer table; must match LAYER_FIELDS in fused_step.cu.
const FUSED_LAYER_FIELDS: usize = 10;
/// Most steps per launch: bounds one kernel's run time (a few ms for the seed network).
pub const FUSED_MAX_STEPS: usize = 1024;

/// One layer as `fused_train_steps_f32` reads it: offsets into the flat parameter buffer
/// (and, identically, the gradient and velocity buffers), and into the BN statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedLayer {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: usize,
    pub bias: Option<usize>,
    /// γ and β offsets, and the layer's first feature in the concatenated BN statistics.
    pub batch_norm: Option<(usize, usize, usize)>,
}

/// Threads per block of the cluster kernels; must match CLUSTER_THREADS in fused_cluster.cu.
const CLUSTER_THREADS: u32 = 256;

/// What a fused plan asks of the thread-block-cluster kernels (cuda/fused_cluster.cu).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterRequest {
    /// The grid kernels (fused_step.cu).
    #[default]
    Off,
    /// Clusters of 16 blocks where they fit, else of 8.
    Auto,
    /// Clusters of exactly this many blocks (8 or 16).
    Blocks(u32),
}

/// A fused plan's cluster launch: blocks per network (the cluster), and the dynamic shared
/// memory the kernel asked for this network (fused_cluster_layout_bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedCluster {
    pub blocks: u32,
    pub bytes: usize,
}

impl FusedCluster {
    /// Index of the kernel of this cluster size in [`super::context::ClusterFunctions`].
    fn kernel(&self) -> usize {
        usize::from(self.blocks == 16)
    }

    /// The cluster launch for these layers, if the request, the device and the kernel's
    /// limits allow one: each size tried, largest first, must fit its shared memory and one
    /// cluster on the device (two networks need not run at once: their clusters never wait
    /// for each other). Anything the driver refuses rules that size out.
    fn choose(gpu: &Gpu, request: ClusterRequest, info: &[i32], layers: &[FusedLayer], batch: usize) -> Result<Option<FusedCluster>, CudaError> {
        let sizes: &[u32] = match request {
            ClusterRequest::Off => return Ok(None),
            ClusterRequest::Auto => &[16, 8],
            ClusterRequest::Blocks(16) => &[16],
            ClusterRequest::Blocks(8) => &[8],
            ClusterRequest::Blocks(n) => {
                return Err(CudaError::Launch { kernel: "fused_cluster8_f32", message: format!("clusters of {n} blocks: 8 or 16") })
            }
        };
        let Some(functions) = gpu.functions.fused_cluster.as_ref() else { return Ok(None) };
        let stream = gpu.stream();
        let table = stream.clone_htod(info)?;
        let mut answer = stream.alloc_zeros::<u32>(1)?;
        let features = layers[0].inputs as u32;
        for &blocks in sizes {
            let layer_count = layers.len() as u32;
            let batch_u = batch as u32;
            let mut b = builder(gpu, &functions.layout_bytes);
            b.arg(&table).arg(&layer_count).arg(&batch_u).arg(&features).arg(&blocks).arg(&CLUSTER_THREADS).arg(&mut answer);
            // SAFETY: the table holds layers·LAYER_FIELDS ints (built by FusedPlan::new), and
            // the answer one u32; one block reads the table and writes the answer.
            unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }) }.map_err(launch_error("fused_cluster_layout_bytes"))?;
            let bytes = stream.clone_dtoh(&answer)?[0] as usize;
            if bytes == 0 {
                continue;
            }
            let candidate = FusedCluster { blocks, bytes };
            let k = candidate.kernel();
            let allowed = [&functions.one[k], &functions.pair[k]].into_iter().all(|function| {
                let shared = function.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, i32::try_from(bytes).unwrap_or(i32::MAX)).is_ok();
                let size = blocks <= 8 || function.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1).is_ok();
                shared && size
            });
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (CLUSTER_THREADS, 1, 1), shared_mem_bytes: bytes as u32 };
            if allowed && functions.one[k].occupancy_max_active_clusters(cfg, stream).unwrap_or(0) >= 1 {
                return Ok(Some(candidate));
            }
        }
        Ok(None)
    }
}

/// Block sizes of the one-barrier kernel (cuda/fused_replicated.cuh; REPLICATED_THREADS is
/// the largest).
pub const REPLICATED_BLOCK_THREADS: [u32; 2] = [256, 512];

/// What a fused plan asks of the one-barrier kernel: its block size (one of
/// [`REPLICATED_BLOCK_THREADS`]), and at most how many blocks (None: no cap of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicatedRequest {
    pub threads: u32,
    pub max_grid: Option<u32>,
}

/// A fused plan's launch of the one-barrier kernel (cuda/fused_replicated.cuh), which
/// computes the layers above the first whole in every block: its block size, and the dynamic
/// shared memory its own layout asked for at the plan's grid (fused_replicated_layout_bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedReplicated {
    pub threads: u32,
    pub bytes: usize,
}

impl FusedReplicated {
    /// The layout's bytes for these layers at `grid` blocks (0: beyond the kernel's limits),
    /// from the kernel's own layout function.
    fn layout_bytes(gpu: &Gpu, table: &CudaSlice<i32>, layers: usize, batch: usize, grid: u32) -> Result<usize, CudaError> {
        let stream = gpu.stream();
        let mut answer = stream.alloc_zeros::<u32>(1)?;
        let (layers, batch) = (layers as u32, batch as u32);
        let mut b = builder(gpu, &gpu.functions.fused_replicated_layout_bytes);
        b.arg(table).arg(&layers).arg(&batch).arg(&grid).arg(&mut answer);
        // SAFETY: the table holds layers·LAYER_FIELDS ints (built by FusedPlan::new), and the
        // answer one u32; one thread reads the table and writes the answer.
        unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }) }
            .map_err(launch_error("fused_replicated_layout_bytes"))?;
        Ok(stream.clone_dtoh(&answer)?[0] as usize)
    }

    /// The launch for these layers in blocks of `threads`, and its grid: one block per
    /// neuron of layer 0 and one more (the kernel's writer block, which then owns none: it
    /// adds the losses and writes the replicated layers back without delaying the others'
    /// layer-0 work) where that many stay resident and the request allows, else as many as do
    /// and it does (each then owns more columns, and the layout's scratch grows with them).
    /// None where the layout is beyond the kernel's limits or `dynamic_limit` (the device's
    /// shared memory per block).
    fn choose(
        gpu: &Gpu, request: ReplicatedRequest, info: &[i32], layers: &[FusedLayer], batch: usize, sms: u32, dynamic_limit: usize,
    ) -> Result<Option<(FusedReplicated, u32)>, CudaError> {
        let threads = request.threads;
        let table = gpu.stream().clone_htod(info)?;
        let function = &gpu.functions.fused_train_steps_replicated;
        let wanted = u32::try_from(layers[0].outputs).unwrap_or(u32::MAX).saturating_add(1);
        let mut grid = request.max_grid.map_or(wanted, |cap| wanted.min(cap.max(1)));
        // The grid shrinks at most a few times: the bytes grow with it only through the rows a
        // block owns (layer 0's columns, with the scratch; layer 1's rows' velocity).
        for _ in 0..4 {
            let bytes = Self::layout_bytes(gpu, &table, layers.len(), batch, grid)?;
            if bytes == 0 || bytes > dynamic_limit {
                return Ok(None);
            }
            let resident = sms.saturating_mul(function.occupancy_max_active_blocks_per_multiprocessor(threads, bytes, None)?);
            if resident == 0 {
                return Ok(None);
            }
            if grid <= resident {
                return Ok(Some((FusedReplicated { threads, bytes }, grid)));
            }
            grid = resident;
        }
        Ok(None)
    }
}

/// The grid kernels' dynamic shared memory (see cuda/fused_step.cu): the softmax's region at
/// offset 0 (every kernel), then which layers' inputs `fused_train_steps_staged_f32` keeps in
/// shared memory, as byte offsets into it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FusedStaging {
    /// Per layer, its staged input's offset (None: read from global memory).
    pub inputs: Vec<Option<usize>>,
    /// The weight row a block computes with (None: read from global memory).
    pub weight_row: Option<usize>,
    /// Dynamic shared memory a block needs: the softmax's region and the staged ones.
    pub bytes: usize,
}

impl FusedStaging {
    /// Regions start on 16-byte boundaries (the kernel copies 16 bytes a load).
    const ALIGN: usize = 16;

    fn align(n: usize) -> usize {
        n.div_ceil(Self::ALIGN) * Self::ALIGN
    }

    /// Nothing staged: the softmax's region alone, the batch's logits (then dlogits),
    /// `batch × classes` floats, which every block computes whole.
    fn unstaged(layers: &[FusedLayer], batch: usize) -> Self {
        let classes = layers.last().map_or(0, |l| l.outputs);
        FusedStaging { inputs: vec![None; layers.len()], weight_row: None, bytes: Self::align(batch * classes * 4) }
    }

    /// The regions that could be staged, in the order they are offered: the weight row
    /// (widest hidden layer's inputs), layer 0's image indices and pixel rows (rows padded to
    /// 16 bytes), then each further layer's input, `batch × inputs` floats.
    fn candidates(layers: &[FusedLayer], batch: usize) -> Vec<(Option<usize>, usize)> {
        let hidden = layers.len() - 1;
        let widest = layers[..hidden].iter().map(|l| l.inputs).max().unwrap_or(0);
        let mut regions = vec![(None, Self::align(widest * 4))];
        for (l, layer) in layers.iter().enumerate() {
            let bytes = if l == 0 { Self::align(batch * 4) + batch * Self::align(layer.inputs) } else { batch * layer.inputs * 4 };
            regions.push((Some(l), Self::align(bytes)));
        }
        regions
    }

    /// Offers each candidate region in turn, after the softmax's, and keeps it if
    /// `fits(total bytes)` says the layout still fits (shared memory per block, and the grid
    /// it allows).
    fn choose(layers: &[FusedLayer], batch: usize, mut fits: impl FnMut(usize) -> Result<bool, CudaError>) -> Result<Self, CudaError> {
        let mut staging = Self::unstaged(layers, batch);
        for (layer, bytes) in Self::candidates(layers, batch) {
            if !fits(staging.bytes + bytes)? {
                continue;
            }
            match layer {
                Some(l) => staging.inputs[l] = Some(staging.bytes),
                None => staging.weight_row = Some(staging.bytes),
            }
            staging.bytes += bytes;
        }
        Ok(staging)
    }

    /// Whether anything is staged.
    pub fn any(&self) -> bool {
        self.weight_row.is_some() || self.inputs.iter().any(Option::is_some)
    }
}

/// The unstaged single-network kernel, and its name for errors: the one bounded by blocks of
/// 512 threads, or by 1024.
fn unstaged_kernel(gpu: &Gpu, kernel_512: bool) -> (&CudaFunction, &'static str) {
    if kernel_512 {
        (&gpu.functions.fused_train_steps_512, "fused_train_steps_512_f32")
    } else {
        (&gpu.functions.fused_train_steps, "fused_train_steps_f32")
    }
}

/// What the fused kernel needs besides the backend's own buffers: the layer table and its
/// workspaces, sized for one batch, and the grid every block of which stays resident.
pub struct FusedPlan {
    layers: Vec<FusedLayer>,
    batch: usize,
    flat_len: usize,
    grid: u32,
    /// Threads per block of the unstaged single-network kernel (the staged and pair kernels
    /// take FUSED_STAGED_THREADS).
    threads: u32,
    /// Whether that kernel is `fused_train_steps_512_f32` (blocks of 512 threads, asked for),
    /// not `fused_train_steps_f32`.
    kernel_512: bool,
    staging: FusedStaging,
    /// Whether twice the grid is co-resident for the pair kernel (fused_train_pair).
    pair_fits: bool,
    /// The thread-block-cluster kernels' launch instead of the grid kernels', if asked for
    /// and possible.
    cluster: Option<FusedCluster>,
    /// The one-barrier kernel's launch instead of the grid kernels', if asked for and possible.
    replicated: Option<FusedReplicated>,
    info_dev: CudaSlice<i32>,
    acts: CudaSlice<f32>,
    xhat: CudaSlice<f32>,
    dz: CudaSlice<f32>,
    inv_std: CudaSlice<f32>,
    row_loss: CudaSlice<f64>,
    row_correct: CudaSlice<u32>,
    barrier: CudaSlice<u32>,
}

impl FusedPlan {
    /// Checks that the layers tile `flat_len` parameters without overlap and chain (each
    /// layer's inputs are the outputs of the one below), and that the device can keep a
    /// grid of blocks resident for a cooperative launch; allocates the workspaces. With
    /// `stage`, the staged kernel keeps every layer input (and the weight row) in shared
    /// memory that fits without shrinking the grid. `threads` (one of [`FUSED_BLOCK_THREADS`])
    /// is the unstaged kernel's block size; the grid is the one that kernel keeps resident.
    /// With `kernel_512`, blocks of 512 run the kernel bounded by them (more registers a
    /// thread; bitwise the same results). `replicated` asks for the one-barrier kernel instead, where the layers fit its layout
    /// (clusters, if also asked for, win).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu, layers: Vec<FusedLayer>, batch: usize, flat_len: usize, bn_total: usize, stage: bool, cluster: ClusterRequest, threads: u32,
        kernel_512: bool, replicated: Option<ReplicatedRequest>,
    ) -> Result<Self, CudaError> {
        const K: &str = "fused_train_steps_f32";
        require(K, layers.len() >= 2, || "needs at least one hidden layer".into())?;
        require(K, FUSED_BLOCK_THREADS.contains(&threads), || format!("blocks of {threads} threads: {FUSED_BLOCK_THREADS:?}"))?;
        if let Some(ReplicatedRequest { threads: n, .. }) = replicated {
            require(K, REPLICATED_BLOCK_THREADS.contains(&n), || format!("replicated blocks of {n} threads: {REPLICATED_BLOCK_THREADS:?}"))?;
        }
        size_u32(K, "batch", batch)?;
        let hidden = layers.len() - 1;
        let mut info = Vec::with_capacity(layers.len() * FUSED_LAYER_FIELDS);
        let (mut act, mut claimed) = (0usize, vec![false; flat_len]);
        let mut claim = |what: &str, start: usize, len: usize| -> Result<i32, CudaError> {
            let end = start.checked_add(len).filter(|&e| e <= flat_len);
            require(K, end.is_some(), || format!("{what} [{start}, +{len}) lies past the {flat_len} parameters"))?;
            require(K, !claimed[start..start + len].iter().any(|&c| c), || format!("{what} overlaps another tensor"))?;
            claimed[start..start + len].iter_mut().for_each(|c| *c = true);
            i32::try_from(start).map_err(|_| CudaError::Launch { kernel: K, message: format!("precondition failed: offset {start} exceeds 2^31") })
        };
        for (l, layer) in layers.iter().enumerate() {
            require(K, layer.inputs >= 1 && layer.outputs >= 1, || format!("layer {l} has an empty side"))?;
            if l > 0 {
                require(K, layer.inputs == layers[l - 1].outputs, || format!("layer {l}'s inputs differ from layer {}'s outputs", l - 1))?;
            }
            let is_output = l == hidden;
            require(K, layer.batch_norm.is_none() || !is_output, || "the output layer has no BN".into())?;
            require(K, layer.batch_norm.is_some() != layer.bias.is_some(), || format!("layer {l} needs exactly one of a bias and BN"))?;
            let weight = claim("weight", layer.weight, layer.inputs * layer.outputs)?;
            let bias = match layer.bias { Some(b) => claim("bias", b, layer.outputs)?, None => -1 };
            let (gamma, beta, col) = match layer.batch_norm {
                Some((g, b, col)) => {
                    require(K, col + layer.outputs <= bn_total, || format!("layer {l}'s BN features lie past the {bn_total} statistics"))?;
                    (claim("gamma", g, layer.outputs)?, claim("beta", b, layer.outputs)?, col as i32)
                }
                None => (-1, -1, 0),
            };
            let bn_index = if layer.batch_norm.is_some() { l as i32 } else { -1 };
            info.extend([layer.inputs as i32, layer.outputs as i32, weight, bias, gamma, beta, act as i32, col, bn_index, -1]);
            act += batch * layer.outputs;
            size_u32(K, "activation workspace", act)?;
        }
        // Every block must stay resident (blocks spin at the grid barriers): no more blocks
        // than the device holds at once, and no more than the widest hidden layer has neurons
        // plus the output layer's rows, which the kernel gives to the last blocks (the first
        // hold the hidden neurons), so that their work runs beside the hidden layers'.
        let ctx = gpu.context();
        let attr = |a| ctx.attribute(a).map_err(CudaError::from);
        require(K, attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)? == 1, || "the device does not support cooperative launches".into())?;
        let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(0) as u32;
        let wanted = u32::try_from(layers[..hidden].iter().map(|l| l.outputs).max().unwrap_or(1) + layers[hidden].outputs).unwrap_or(u32::MAX);
        let grid_with = |function: &CudaFunction, threads: u32, dynamic: usize| -> Result<u32, CudaError> {
            let per_sm = function.occupancy_max_active_blocks_per_multiprocessor(threads, dynamic, None)?;
            Ok(wanted.min(sms.saturating_mul(per_sm)))
        };
        // A cluster launch, where asked for and possible, replaces the grid kernels (and their
        // staging).
        let cluster = FusedCluster::choose(gpu, cluster, &info, &layers, batch)?;
        // Shared memory beyond 48 KB a block must be opted into, up to the device's limit
        // less the kernel's static shared memory: the function's dynamic limit, opted into.
        let optin = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?.max(0) as usize;
        let static_bytes = |function: &CudaFunction| -> Result<usize, CudaError> {
            Ok(function.get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?.max(0) as usize)
        };
        let dynamic_limit = |function: &CudaFunction| -> Result<usize, CudaError> {
            let limit = optin.saturating_sub(static_bytes(function)?);
            function.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, i32::try_from(limit).unwrap_or(i32::MAX))?;
            Ok(limit)
        };
        // Whether a block of `function` may take `dynamic` bytes: without opting in up to 48 KB
        // with its static shared memory (the unstaged kernels' softmax region, a few KB, keeps
        // the driver's defaults), else opted into.
        const DEFAULT_SHARED: usize = 48 * 1024;
        let allows = |function: &CudaFunction, dynamic: usize| -> Result<bool, CudaError> {
            Ok(static_bytes(function)? + dynamic <= DEFAULT_SHARED || dynamic <= dynamic_limit(function)?)
        };
        // The unstaged kernel's grid, with the softmax's region; staging may not shrink it.
        let unstaged = FusedStaging::unstaged(&layers, batch);
        let kernel_512 = kernel_512 && threads == 512;
        let (plain, _) = unstaged_kernel(gpu, kernel_512);
        require(K, allows(plain, unstaged.bytes)?, || {
            format!("the batch's logits ({batch} × {} floats, {} bytes) do not fit a block's shared memory", layers[hidden].outputs, unstaged.bytes)
        })?;
        let grid = grid_with(plain, threads, unstaged.bytes)?;
        require(K, grid >= 1, || format!("no block of {threads} threads fits on the device ({sms} SMs)"))?;
        // The one-barrier kernel, where asked for and possible, replaces the grid kernels (and
        // their staging) with a grid of its own.
        let replicated = match replicated {
            Some(request) if cluster.is_none() => {
                let limit = dynamic_limit(&gpu.functions.fused_train_steps_replicated)?;
                // An optional kernel: whatever fails in choosing it leaves the grid kernels.
                FusedReplicated::choose(gpu, request, &info, &layers, batch, sms, limit).unwrap_or(None)
            }
            _ => None,
        };
        let (replicated, grid) = match replicated {
            Some((r, g)) => (Some(r), g),
            None => (None, grid),
        };
        let staging = if stage && cluster.is_none() && replicated.is_none() {
            let staged = &gpu.functions.fused_train_steps_staged;
            let limit = dynamic_limit(staged)?;
            FusedStaging::choose(&layers, batch, |bytes| Ok(bytes <= limit && grid_with(staged, FUSED_STAGED_THREADS, bytes)? >= grid))?
        } else {
            unstaged
        };
        // Whether two such networks fit on the device at once in one launch (fused_train_pair);
        // a failed query only rules the pair out.
        let pair = plan_pair_function(gpu, &staging);
        let dynamic = staging.bytes;
        let pair_opted_in = allows(pair, dynamic).unwrap_or(false);
        let pair_per_sm = pair.occupancy_max_active_blocks_per_multiprocessor(FUSED_STAGED_THREADS, dynamic, None).unwrap_or(0);
        let pair_fits = replicated.is_none() && pair_opted_in && grid.saturating_mul(2) <= sms.saturating_mul(pair_per_sm);
        for (l, offset) in staging.inputs.iter().enumerate() {
            if let Some(offset) = offset {
                info[l * FUSED_LAYER_FIELDS + FUSED_LAYER_FIELDS - 1] = i32::try_from(*offset).unwrap_or(i32::MAX);
            }
        }
        let stream = gpu.stream();
        let zeros_f32 = |n: usize| stream.alloc_zeros::<f32>(n.max(1)).map_err(CudaError::from);
        Ok(FusedPlan {
            info_dev: stream.clone_htod(&info)?,
            acts: zeros_f32(act)?,
            // The one-barrier kernel keeps layer 1's weights there between steps (by parity,
            // with params' own), and nothing else.
            xhat: zeros_f32(if replicated.is_some() { act.max(layers[1].inputs * layers[1].outputs) } else { act })?,
            dz: zeros_f32(act)?,
            inv_std: zeros_f32(bn_total)?,
            row_loss: stream.alloc_zeros::<f64>(batch)?,
            row_correct: stream.alloc_zeros::<u32>(batch)?,
            barrier: stream.alloc_zeros::<u32>(1)?,
            layers,
            batch,
            flat_len,
            grid,
            threads,
            kernel_512,
            staging,
            pair_fits,
            cluster,
            replicated,
        })
    }

    /// The cluster launch, if the plan has one.
    pub fn cluster(&self) -> Option<&FusedCluster> {
        self.cluster.as_ref()
    }

    /// The one-barrier kernel's launch, if the plan has one.
    pub fn replicated(&self) -> Option<&FusedReplicated> {
        self.replicated.as_ref()
    }

    /// Which kernels the plan's launches run, for notices.
    pub fn kernel_name(&self) -> &'static str {
        if self.cluster.is_some() {
            "the thread-block-cluster kernel"
        } else if self.replicated.is_some() {
            "the one-barrier kernel"
        } else {
            "the grid kernel"
        }
    }

    /// Blocks per launch.
    pub fn grid(&self) -> u32 {
        self.grid
    }

    /// Whether blocks of 512 threads run `fused_train_steps_512_f32` (not the kernel bounded
    /// by blocks of 1024).
    pub fn kernel_512(&self) -> bool {
        self.kernel_512
    }

    /// Threads per block of the launches of this plan's network alone (the staged kernel
    /// takes 256 whatever the plan asked for).
    pub fn threads(&self) -> u32 {
        match self.replicated {
            Some(r) => r.threads,
            None if self.staging.any() => FUSED_STAGED_THREADS,
            None => self.threads,
        }
    }

    /// The launches' dynamic shared memory: the softmax's region, and what they stage
    /// (nothing unless the plan was made to stage).
    pub fn staging(&self) -> &FusedStaging {
        &self.staging
    }

    /// Whether `other` can share a launch with this plan ([`fused_train_pair`]): the same
    /// layer count, batch, grid and staging, and both grids resident at once.
    pub fn pairs_with(&self, other: &FusedPlan) -> bool {
        (self.pair_fits || self.cluster.is_some())
            && self.replicated.is_none()
            && other.replicated.is_none()
            && self.cluster.map(|c| c.blocks) == other.cluster.map(|c| c.blocks)
            && self.layers.len() == other.layers.len()
            && self.batch == other.batch
            && self.grid == other.grid
            && self.staging == other.staging
    }
}

/// The pair kernel for a plan's staging (blocks of FUSED_STAGED_THREADS, whatever the plan's
/// block size alone).
fn plan_pair_function<'g>(gpu: &'g Gpu, staging: &FusedStaging) -> &'g CudaFunction {
    if staging.any() { &gpu.functions.fused_train_pair_staged } else { &gpu.functions.fused_train_pair }
}

/// A BN network's running statistics as a fused launch updates them: the layout, running
/// mean and variance (`[estimators, total]`) and the batch counts (`[estimators, layers]`).
pub type FusedStatistics<'a, 'b> =
    (&'a RunningStatsLayout, &'a mut CudaViewMut<'b, f32>, &'a mut CudaViewMut<'b, f32>, &'a mut CudaViewMut<'b, u64>);

/// The backend's buffers a fused launch reads and writes.
pub struct FusedBuffers<'a, 'b> {
    pub images: &'a CudaView<'b, u8>,
    pub labels: &'a CudaView<'b, u8>,
    pub features: usize,
    pub order: &'a CudaView<'b, u32>,
    pub cursor: &'a mut CudaViewMut<'b, u32>,
    pub params: &'a mut CudaViewMut<'b, f32>,
    pub grads: &'a mut CudaViewMut<'b, f32>,
    pub velocity: Option<&'a mut CudaViewMut<'b, f32>>,
    /// With BN: the layout, running mean and variance (`[estimators, total]`), batch counts.
    pub statistics: Option<FusedStatistics<'a, 'b>>,
    pub loss_sum: &'a mut CudaViewMut<'b, f64>,
    pub correct: &'a mut CudaViewMut<'b, u64>,
}

/// The training hyperparameters a fused launch applies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedHyper {
    pub epsilon: f32,
    pub activation: Activation,
    pub grad_scale: f32,
    pub learning_rate: f32,
    pub momentum: f32,
}

/// One network's arguments of a fused launch, checked against its plan: the scalars held
/// here and the buffers borrowed, pushed in the kernels' order by [`FusedArgs::push`].
struct FusedArgs<'a, 'b> {
    plan: &'a mut FusedPlan,
    buffers: FusedBuffers<'a, 'b>,
    hyper: FusedHyper,
    activation: i32,
    weight_row_stage: i32,
    /// count, features, order length, layers, batch, steps.
    sizes: [u32; 6],
    /// Estimators, BN features, BN layers (0 without BN).
    statistics: [u32; 3],
}

impl<'a, 'b> FusedArgs<'a, 'b> {
    fn new(plan: &'a mut FusedPlan, buffers: FusedBuffers<'a, 'b>, hyper: FusedHyper, steps: usize) -> Result<Self, CudaError> {
        const K: &str = "fused_train_steps_f32";
        require(K, (1..=FUSED_MAX_STEPS).contains(&steps), || format!("{steps} steps: launch 1..={FUSED_MAX_STEPS} at a time"))?;
        let FusedBuffers { images, labels, features, order, cursor, params, grads, velocity, statistics, loss_sum, correct } = &buffers;
        let count = labels.len();
        require(K, *features == plan.layers[0].inputs, || format!("{features} features, the first layer takes {}", plan.layers[0].inputs))?;
        require_len(K, "images", images.len(), count.saturating_mul(*features))?;
        size_u32(K, "examples", count)?;
        size_u32(K, "order length", order.len())?;
        require_len(K, "cursor", cursor.len(), 1)?;
        require_len(K, "params", params.len(), plan.flat_len)?;
        require_len(K, "grads", grads.len(), plan.flat_len)?;
        if let Some(v) = velocity {
            require_len(K, "velocity", v.len(), plan.flat_len)?;
        }
        require_len(K, "loss_sum", loss_sum.len(), 1)?;
        require_len(K, "correct", correct.len(), 1)?;
        let classes = plan.layers.last().map_or(0, |l| l.outputs);
        require(K, classes <= 256, || format!("{classes} classes: labels are bytes"))?;
        let has_bn = plan.layers.iter().any(|l| l.batch_norm.is_some());
        require(K, has_bn == statistics.is_some(), || "running statistics are needed exactly when the layers have BN".into())?;
        let stats = match statistics {
            Some((layout, mean, var, batches)) => {
                let (e, total) = (layout.estimators(), layout.total());
                require_len(K, "running_mean", mean.len(), e * total)?;
                require_len(K, "running_var", var.len(), e * total)?;
                require_len(K, "batches", batches.len(), e * layout.layers())?;
                require(K, layout.layers() == plan.layers.len() - 1, || "every hidden layer must have BN".into())?;
                [e as u32, total as u32, layout.layers() as u32]
            }
            None => [0, 0, 0],
        };
        let sizes = [count as u32, *features as u32, order.len() as u32, plan.layers.len() as u32, plan.batch as u32, steps as u32];
        let weight_row_stage = plan.staging.weight_row.map_or(-1, |o| i32::try_from(o).unwrap_or(i32::MAX));
        Ok(FusedArgs { activation: activation_code(hyper.activation), weight_row_stage, sizes, statistics: stats, plan, buffers, hyper })
    }

    /// Pushes this network's arguments (the kernels' FUSED_PARAMS, in order).
    fn push<'s>(&'s mut self, b: &mut LaunchArgs<'s>) {
        let [count, features, order_len, layers, batch, steps] = &self.sizes;
        let [estimators, total, bn_layers] = &self.statistics;
        let FusedBuffers { images, labels, order, cursor, params, grads, velocity, statistics, loss_sum, correct, .. } = &mut self.buffers;
        let plan = &mut *self.plan;
        b.arg(*images).arg(*labels).arg(count).arg(features).arg(*order).arg(order_len).arg(&mut **cursor);
        b.arg(&plan.info_dev).arg(layers).arg(&self.weight_row_stage).arg(batch).arg(&self.hyper.epsilon).arg(&self.activation);
        b.arg(&self.hyper.grad_scale).arg(&self.hyper.learning_rate).arg(&self.hyper.momentum).arg(&mut **params).arg(&mut **grads);
        match velocity {
            Some(v) => b.arg(&mut **v),
            None => b.arg(&NULL),
        };
        match statistics {
            Some((layout, mean, var, batches)) => {
                b.arg(&layout.table_dev).arg(estimators).arg(total).arg(bn_layers).arg(&mut **mean).arg(&mut **var).arg(&mut **batches);
            }
            None => {
                b.arg(&NULL).arg(estimators).arg(total).arg(bn_layers).arg(&NULL).arg(&NULL).arg(&NULL);
            }
        }
        b.arg(&mut plan.acts).arg(&mut plan.xhat).arg(&mut plan.dz).arg(&mut plan.inv_std).arg(&mut plan.row_loss).arg(&mut plan.row_correct);
        b.arg(&mut **loss_sum).arg(&mut **correct).arg(&mut plan.barrier).arg(steps);
    }
}

// SAFETY (shared by both launchers below): types and order match the kernels (FusedArgs::push).
// The layer table was checked by FusedPlan::new: every tensor lies inside the flat_len
// parameters (and params, grads, velocity hold flat_len, checked by FusedArgs::new), BN
// features inside the statistics' total (running buffers hold estimators·total, checked),
// activation offsets inside the workspaces sized batch·Σ outputs. Rows index `order` below
// its length and examples below `count` (checked in the kernel, NaN otherwise); labels are
// read below count. The grid is at most the device's co-resident block count, which a
// cooperative launch requires (and the driver checks) for the spinning grid barrier. The
// softmax's region ([batch, classes] floats, which the kernel writes) and the staged regions
// lie inside the dynamic shared memory given (FusedStaging sums them), which FusedPlan::new
// allowed with the function attribute and counted in that block count.

/// `fused_train_steps_f32`: `steps` whole training steps (forward, loss, backward, SGD,
/// running statistics) on the batches `cursor[0]`, `cursor[0]+1`, ... of the order, in one
/// cooperative launch; advances the cursor by `steps`. The batches must lie inside the order
/// (the host checks its batch numbers against it, as for the unfused step).
pub fn fused_train_steps(gpu: &Gpu, plan: &mut FusedPlan, buffers: FusedBuffers<'_, '_>, hyper: FusedHyper, steps: usize) -> Result<(), CudaError> {
    let mut args = FusedArgs::new(plan, buffers, hyper, steps)?;
    if let Some(cluster) = args.plan.cluster {
        let functions = gpu.functions.fused_cluster.as_ref().ok_or_else(|| CudaError::Launch { kernel: "fused_cluster8_f32", message: "the cluster kernels are not loaded".into() })?;
        let cfg = LaunchConfig { grid_dim: (cluster.blocks, 1, 1), block_dim: (CLUSTER_THREADS, 1, 1), shared_mem_bytes: cluster.bytes as u32 };
        let function = &functions.one[cluster.kernel()];
        // An error cudarc kept from an earlier call is reported as what it is, not taken
        // for this launch's refusal.
        gpu.context().check_err().map_err(launch_error("fused_cluster_f32"))?;
        // Again at each launch: another plan on this GPU may have set a smaller size.
        function
            .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, i32::try_from(cluster.bytes).unwrap_or(i32::MAX))
            .map_err(refusable_launch_error("fused_cluster_f32"))?;
        let mut b = builder(gpu, function);
        args.push(&mut b);
        // SAFETY: see above, for the tensors; the grid is one cluster of the size compiled
        // into the kernel (__cluster_dims__), which FusedCluster::choose allowed (non-portable
        // size, shared memory) and found room for; the dynamic shared memory is what the
        // kernel's own layout asked for this network (it traps on less).
        return unsafe { b.launch(cfg) }.map(drop).map_err(refusable_launch_error("fused_cluster_f32"));
    }
    // The grid barrier counts arrivals over the launch, from zero (a memset on the stream,
    // ordered after the previous launch, which left G × its barriers there).
    gpu.stream().memset_zeros(&mut args.plan.barrier)?;
    if let Some(replicated) = args.plan.replicated {
        let function = &gpu.functions.fused_train_steps_replicated;
        let cfg = LaunchConfig {
            grid_dim: (args.plan.grid, 1, 1),
            block_dim: (replicated.threads, 1, 1),
            shared_mem_bytes: u32::try_from(replicated.bytes).unwrap_or(u32::MAX),
        };
        let mut b = builder(gpu, function);
        args.push(&mut b);
        // SAFETY: see above, for the tensors (the replicated layers' acts and dz blocks go
        // unused; layer 0's a of odd steps goes to dz's layer-0 block, batch × width; xhat holds
        // layer 1's weights, inputs × outputs floats, which FusedPlan::new allocated); the
        // grid is at most the co-resident block count at the layout's bytes, which
        // FusedPlan::new opted into (the function's dynamic limit) and which the kernel's own
        // layout function computed for this grid (the kernel recomputes it from the same
        // table and gridDim, and traps where it would be 0).
        return unsafe { b.launch_cooperative(cfg) }.map(drop).map_err(launch_error("fused_train_steps_replicated_f32"));
    }
    // The staged kernel whenever the plan stages anything (it reads the offsets).
    let (function, name) =
        if args.plan.staging.any() { (&gpu.functions.fused_train_steps_staged, "fused_train_steps_staged_f32") } else { unstaged_kernel(gpu, args.plan.kernel_512) };
    let cfg = LaunchConfig {
        grid_dim: (args.plan.grid, 1, 1),
        block_dim: (args.plan.threads(), 1, 1),
        shared_mem_bytes: u32::try_from(args.plan.staging.bytes).unwrap_or(u32::MAX),
    };
    let mut b = builder(gpu, function);
    args.push(&mut b);
    // SAFETY: see above.
    unsafe { b.launch_cooperative(cfg) }.map(drop).map_err(launch_error(name))
}

/// `fused_train_pair_f32`: [`fused_train_steps`] for two networks in one cooperative launch
/// of both their grids, on `gpu`'s stream: the BN and the plain network of the study's
/// comparison, whose two launches might otherwise run one after the other. They must have
/// the same layer count, batch, grid and staging, train with the same hyperparameters and
/// on the same batches: the kernel reads the images, labels and order of the first (the
/// caller's buffers must hold the same data; the second's are checked for size only).
pub fn fused_train_pair(
    gpu: &Gpu, first: (&mut FusedPlan, FusedBuffers<'_, '_>), second: (&mut FusedPlan, FusedBuffers<'_, '_>), hyper: FusedHyper, steps: usize,
) -> Result<(), CudaError> {
    const K: &str = "fused_train_pair_f32";
    let mut a = FusedArgs::new(first.0, first.1, hyper, steps)?;
    let mut b_args = FusedArgs::new(second.0, second.1, hyper, steps)?;
    let (pa, pb) = (&*a.plan, &*b_args.plan);
    require(K, pa.pairs_with(pb), || "the two networks' plans differ (layers, batch, grid, staging) or do not fit on the device at once".into())?;
    require(K, a.sizes == b_args.sizes, || "the two networks train on data of different sizes".into())?;
    if let Some(cluster) = pa.cluster {
        let functions = gpu.functions.fused_cluster.as_ref().ok_or_else(|| CudaError::Launch { kernel: "fused_cluster_pair8_f32", message: "the cluster kernels are not loaded".into() })?;
        // Both networks' layouts fit the larger of their byte counts.
        let bytes = cluster.bytes.max(pb.cluster.map_or(0, |c| c.bytes));
        let cfg = LaunchConfig { grid_dim: (2 * cluster.blocks, 1, 1), block_dim: (CLUSTER_THREADS, 1, 1), shared_mem_bytes: bytes as u32 };
        let function = &functions.pair[cluster.kernel()];
        gpu.context().check_err().map_err(launch_error("fused_cluster_pair_f32"))?;
        function
            .set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, i32::try_from(bytes).unwrap_or(i32::MAX))
            .map_err(refusable_launch_error("fused_cluster_pair_f32"))?;
        let mut b = builder(gpu, function);
        a.push(&mut b);
        b_args.push(&mut b);
        // SAFETY: as for one network, a cluster each; each cluster reads its own network's
        // parameters, gradients, statistics and counters, and the first's batches (images,
        // labels, order, sizes) and hyperparameters, which `a.sizes == b_args.sizes` and
        // pairs_with made the same.
        return unsafe { b.launch(cfg) }.map(drop).map_err(refusable_launch_error("fused_cluster_pair_f32"));
    }
    let function = plan_pair_function(gpu, &pa.staging);
    let grid = pa.grid.saturating_mul(2);
    let dynamic = u32::try_from(pa.staging.bytes).unwrap_or(u32::MAX);
    // The first network's barrier serves both (the kernel ignores the second's).
    gpu.stream().memset_zeros(&mut a.plan.barrier)?;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (FUSED_STAGED_THREADS, 1, 1), shared_mem_bytes: dynamic };
    let mut b = builder(gpu, function);
    a.push(&mut b);
    b_args.push(&mut b);
    // SAFETY: see above, for each network; the grid is both networks' (co-resident, as
    // FusedPlan::new checked for pairs_with, which also opted into the staged dynamic shared
    // memory), and each half reads its own network's buffers.
    unsafe { b.launch_cooperative(cfg) }.map(drop).map_err(launch_error(K))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_launch_time_codes_and_faults_are_not() {
        use sys::CUresult as R;
        for code in [R::CUDA_ERROR_INVALID_CLUSTER_SIZE, R::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, R::CUDA_ERROR_INVALID_VALUE, R::CUDA_ERROR_NOT_SUPPORTED] {
            assert!(is_refusal(code), "{code:?}");
        }
        // Faults of earlier asynchronous work, reported at a later call, leave the context
        // unusable: never a refusal to work around.
        for code in [R::CUDA_ERROR_ILLEGAL_ADDRESS, R::CUDA_ERROR_LAUNCH_FAILED, R::CUDA_ERROR_HARDWARE_STACK_ERROR, R::CUDA_ERROR_ILLEGAL_INSTRUCTION, R::CUDA_ERROR_MISALIGNED_ADDRESS, R::CUDA_ERROR_LAUNCH_TIMEOUT, R::CUDA_ERROR_ASSERT, R::CUDA_ERROR_UNKNOWN, R::CUDA_ERROR_OUT_OF_MEMORY] {
            assert!(!is_refusal(code), "{code:?}");
        }
    }

    fn seed_layers() -> Vec<FusedLayer> {
        let layer = |inputs, outputs| FusedLayer { inputs, outputs, weight: 0, bias: None, batch_norm: None };
        vec![layer(784, 100), layer(100, 100), layer(100, 10)]
    }

    /// The layout the emulation (tests/kernel_emulation/fused.inc) and the kernel's header
    /// describe: 16-byte aligned regions, the softmax's first (the batch's logits), then the
    /// weight row, then each layer's input.
    #[test]
    fn staging_regions_follow_the_kernels_layout() {
        let softmax = 60 * 10 * 4; // 2400 bytes, a multiple of 16
        assert_eq!(FusedStaging::unstaged(&seed_layers(), 60), FusedStaging { inputs: vec![None; 3], weight_row: None, bytes: softmax });
        let staging = FusedStaging::choose(&seed_layers(), 60, |_| Ok(true)).unwrap();
        let weight_row = 784 * 4;
        let pixels = 240 + 60 * 784; // 60 image indices (240 bytes, a multiple of 16), rows of 784
        assert_eq!(staging.weight_row, Some(softmax));
        let first = softmax + weight_row;
        assert_eq!(staging.inputs, vec![Some(first), Some(first + pixels), Some(first + pixels + 24_000)]);
        assert_eq!(staging.bytes, first + pixels + 2 * 24_000);
        // Odd sizes round up: 5 rows of 2 classes take 48 bytes (40 rounded up); a 5-row batch
        // of 3 features takes 32 bytes of indices (20 rounded up) and five 16-byte rows; 5
        // floats of a 1-wide layer take 32 bytes.
        let layer = |inputs, outputs| FusedLayer { inputs, outputs, weight: 0, bias: None, batch_norm: None };
        let odd = FusedStaging::choose(&[layer(3, 1), layer(1, 2)], 5, |_| Ok(true)).unwrap();
        assert_eq!((odd.weight_row, odd.inputs.clone(), odd.bytes), (Some(48), vec![Some(48 + 16), Some(48 + 16 + 112)], 48 + 16 + 112 + 32));
    }

    /// A region that does not fit is skipped, and later, smaller ones still go in; the
    /// softmax's region is always there, and is not staging.
    #[test]
    fn staging_skips_what_does_not_fit() {
        let softmax = 2400;
        let limit = softmax + 784 * 4 + 30_000; // the weight row and one 24 000-byte layer, not the pixels
        let staging = FusedStaging::choose(&seed_layers(), 60, |bytes| Ok(bytes <= limit)).unwrap();
        assert_eq!((staging.weight_row, staging.inputs.clone()), (Some(softmax), vec![None, Some(softmax + 784 * 4), None]));
        assert!(staging.any());
        let none = FusedStaging::choose(&seed_layers(), 60, |_| Ok(false)).unwrap();
        assert!(!none.any() && none.inputs == vec![None; 3] && none.weight_row.is_none() && none.bytes == softmax);
        let failing = FusedStaging::choose(&seed_layers(), 60, |_| Err(CudaError::NoDevice));
        assert!(failing.is_err());
    }
}
