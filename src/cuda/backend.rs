//! [`CudaBackend`]: the network trained entirely on the device.
//!
//! Residency: both splits (u8 pixels and labels) are uploaded once; every trainable tensor
//! lives in ONE flat f32 buffer (gradients and velocities in buffers of the same layout, so
//! one SGD launch updates everything); running statistics of every estimator, their batch
//! counts, the activations and the loss/accuracy accumulators live on the device too.
//! `train_step` only launches (no synchronization, no readback): the batch it reads comes
//! from a device-side counter advanced by the SGD kernel, so a step has no per-step host
//! argument and is captured once into a CUDA graph, then replayed (see [`StepLaunch`]). The
//! host reads back only in `take_step_stats`, `evaluate`, `predict_each`, `params`,
//! `gradients` and `velocity`, and collects an evaluation point (`begin_point` queues it:
//! a copy of the state, its evaluation, and copies of the results into pinned memory) only
//! in `finish_point`, once the next steps are queued behind it.
//!
//! One training step (seed network: 16 launches, 8 of them cuBLAS GEMMs): gather; per layer GEMM + fused
//! BN/bias + activation; softmax-CE (with the output bias and its gradient); per layer
//! GEMM dW, GEMM dX, fused activation' + BN/bias backward; SGD; running statistics.
//!
//! The graph bakes in every device address and every by-value kernel argument of the step.
//! All buffers the step touches are allocated once, in `new`, and only copied into later
//! (`set_params`, `set_velocity`, `restore_step_stats`, `take_step_stats`), except the epoch
//! order: `set_epoch_order` drops the graph when it reallocates the order or changes its
//! length (the gather kernel takes the length by value), and the next step captures anew.

use super::context::Gpu;
use super::gemm::matmul;
use super::kernels::{self, ClusterRequest, FusedBuffers, FusedHyper, FusedLayer, FusedPlan, ReplicatedRequest, RunningStatsLayout};
use super::options::{CudaOptions, StepLaunch};
use super::timeline::{Mark, Timeline};
use super::{describe_driver_error, phase_trace, CudaError};
use crate::backend::{measure_point, no_point_queued, Backend, Evaluation, GemmPrecision, PendingPoint, PhaseTiming, PointResults, Probe, SplitKind, StatsMode, StepStats, TimelineSpan};
use crate::cpu::check_params_match;
use crate::data::{Dataset, Split};
use crate::model::{BatchNormParams, ConfigError, LayerParams, LossReduction, ModelConfig, ModelParams, RunningStats, TrainConfig};
use crate::Result;
use cudarc::driver::{result as driver_result, sys, CudaEvent, CudaGraph, CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use std::io::Write as _;
use std::ops::Range;
use std::sync::Arc;

/// Rows per chunk when evaluating a whole split, by default: all of MNIST's test set at
/// once, so an evaluation is ~7 launches rather than ten times as many (at ~4.5 µs each,
/// a third of a millisecond per evaluation point, of which the study has 1600); its buffers
/// take ~60 MB for the seed network.
pub const EVAL_CHUNK: usize = 10_000;
/// Every tensor in the flat buffers starts on a 64-float (256-byte) boundary, which cuBLAS
/// and vector loads like; the padding stays 0 (its gradient is never written).
const ALIGN: usize = 64;

/// Where a BN layer's tensors live.
#[derive(Clone, Debug)]
struct BnSlots {
    gamma: Range<usize>,
    beta: Range<usize>,
    /// This layer's features within the concatenated BN statistics (`[total]`).
    stats: Range<usize>,
}

/// Where a layer's tensors live in the flat parameter buffer (and, identically, in the
/// gradient and velocity buffers).
#[derive(Clone, Debug)]
struct LayerSlots {
    inputs: usize,
    outputs: usize,
    weight: Range<usize>,
    bias: Option<Range<usize>>,
    bn: Option<BnSlots>,
}

impl LayerSlots {
    /// The trainable tensors in [`ModelParams::trainable_tensors`] order.
    fn trainable(&self) -> Vec<Range<usize>> {
        let mut out = vec![self.weight.clone()];
        out.extend(self.bias.clone());
        if let Some(bn) = &self.bn {
            out.push(bn.gamma.clone());
            out.push(bn.beta.clone());
        }
        out
    }
}

/// Lays the model out: returns the layers, the flat buffer's length and the total BN width.
fn layout(model: &ModelConfig) -> (Vec<LayerSlots>, usize, usize) {
    let widths = model.widths();
    let hidden = model.hidden.len();
    let mut next = 0;
    let mut take = |len: usize| {
        let range = next..next + len;
        next = (next + len).div_ceil(ALIGN) * ALIGN;
        range
    };
    let mut stats = 0;
    let mut layers = Vec::with_capacity(widths.len() - 1);
    for (l, pair) in widths.windows(2).enumerate() {
        let (inputs, outputs) = (pair[0], pair[1]);
        let normalized = l < hidden && model.batch_norm;
        let weight = take(inputs * outputs);
        let bias = (!normalized).then(|| take(outputs));
        let bn = normalized.then(|| {
            let slots = BnSlots { gamma: take(outputs), beta: take(outputs), stats: stats..stats + outputs };
            stats += outputs;
            slots
        });
        layers.push(LayerSlots { inputs, outputs, weight, bias, bn });
    }
    (layers, next, stats)
}

/// A zeroed device buffer of `len` elements (at least one, so nothing is a null pointer).
fn zeros<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, len: usize) -> Result<CudaSlice<T>, CudaError> {
    let len = len.max(1);
    gpu.stream().alloc_zeros::<T>(len).map_err(|e| match CudaError::from(e) {
        CudaError::OutOfMemory { .. } => CudaError::OutOfMemory { bytes_needed: len * std::mem::size_of::<T>() },
        other => other,
    })
}

/// A device copy of `host` (padded to one element when empty).
fn upload<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, host: &[T]) -> Result<CudaSlice<T>, CudaError> {
    let mut buf = zeros::<T>(gpu, host.len())?;
    if !host.is_empty() {
        gpu.stream().memcpy_htod(host, &mut buf.slice_mut(..host.len()))?;
    }
    Ok(buf)
}

/// Copies a device buffer to the host and waits for it (a readback point: this is where
/// any asynchronous kernel fault of the queued work is reported).
fn read<T: DeviceRepr, S: DevicePtr<T>>(gpu: &Gpu, src: &S) -> Result<Vec<T>, CudaError> {
    let host = gpu.stream().clone_dtoh(src)?;
    gpu.synchronize()?;
    Ok(host)
}

/// Packs the first `columns` of the first `rows` rows of a row-major `[rows, width]` device
/// matrix into `packed` as a `[rows, columns]` matrix, on `gpu`'s stream: cuBLAS's geam keeps
/// the columns on the device, and one contiguous copy brings them over. A probe keeps 5 of
/// 100 units, 200 kB of 4 MB for 10 000 rows. (A strided cuMemcpy2D would move 20-byte rows
/// one by one, at a speed the driver does not document.)
fn pack_columns(gpu: &Gpu, src: &CudaSlice<f32>, rows: usize, width: usize, columns: usize, packed: &mut CudaViewMut<f32>) -> Result<(), CudaError> {
    const GEAM: &str = "cublasSgeam";
    let fail = |message: String| CudaError::Launch { kernel: GEAM, message: format!("precondition failed: {message}") };
    if columns > width {
        return Err(fail(format!("{columns} columns asked of a matrix {width} wide")));
    }
    if rows.checked_mul(width).is_none_or(|floats| floats > src.len()) {
        return Err(fail(format!("{rows} rows of {width} floats overrun a buffer of {}", src.len())));
    }
    if rows * columns > packed.len() {
        return Err(fail(format!("{rows} rows of {columns} columns overrun a packed buffer of {}", packed.len())));
    }
    if rows == 0 || columns == 0 {
        return Ok(());
    }
    let int = |what: &str, v: usize| i32::try_from(v).map_err(|_| fail(format!("{what} = {v} exceeds 2^31")));
    let (rows_i, width_i, columns_i) = (int("rows", rows)?, int("width", width)?, int("columns", columns)?);
    gpu.context().bind_to_thread()?;
    let stream = gpu.stream();
    let (src_ptr, _record_src) = src.device_ptr(stream);
    let (packed_ptr, _record_packed) = packed.device_ptr_mut(stream);
    let (one, zero) = (1.0f32, 0.0f32);
    // Column-major, as cuBLAS sees them, `src` is [width, rows] with leading dimension width
    // and `packed` [columns, rows] with leading dimension columns: C = 1·A + 0·B over the
    // first `columns` of A's rows, B = C (geam's documented in-place form; with beta 0 it
    // is not read).
    // SAFETY: A spans (rows − 1)·width + columns ≤ rows·width floats of `src`, C and B
    // rows·columns floats of `packed` (both checked); the handle runs on `gpu`'s stream,
    // which orders the geam after the kernels that wrote `src` and before whatever reads
    // `packed`; the caller keeps both alive until that stream has passed them. alpha and
    // beta are host f32 values (host pointer mode), read during the call.
    unsafe {
        cudarc::cublas::sys::cublasSgeam(
            *gpu.blas.handle(), cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N, cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            columns_i, rows_i, &one, src_ptr as *const f32, width_i, &zero, packed_ptr as *const f32, columns_i,
            packed_ptr as *mut f32, columns_i,
        )
    }
    .result()?;
    Ok(())
}

/// Queues, on `gpu`'s stream, the count of non-finite values among the flat parameters and
/// (BN networks) the running statistics into `count`, zeroed first.
fn queue_non_finite_count(
    gpu: &Gpu, params: &CudaSlice<f32>, statistics: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>, count: &mut CudaSlice<u32>,
) -> Result<(), CudaError> {
    gpu.stream().memset_zeros(count)?;
    let tensors = std::iter::once(params).chain(statistics.into_iter().flat_map(|(mean, var)| [mean, var]));
    for tensor in tensors {
        kernels::count_non_finite(gpu, &tensor.as_view(), &mut count.as_view_mut())?;
    }
    Ok(())
}

/// A 64-bit FNV-1a hash of `values`: equal orders hash equal, and different ones differ
/// but by a 2⁻⁶⁴ accident.
fn fingerprint(values: &[u32]) -> u64 {
    values.iter().flat_map(|v| v.to_le_bytes()).fold(0xcbf2_9ce4_8422_2325, |h, byte| (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

fn graph_launch_error(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Launch { kernel: "cuGraphLaunch", message: format!("launch failed: {}", describe_driver_error(e)) }
}

/// Makes sure `stream` is out of capture mode after a failed capture, discarding what it
/// recorded: cudarc's `end_capture` returns early, before ending the capture, when the
/// context holds a stale error, and a stream left capturing would record instead of run
/// everything queued after. (The graph entry points exist in every driver that loads this
/// crate's PTX, which needs CUDA 13, so cudarc's lazy symbol lookup cannot panic here.)
fn leave_capture(stream: &CudaStream) {
    // SAFETY: `stream` is a live stream of the context bound to this thread; these calls
    // only query or end its capture, and a graph that ending returns is destroyed here, by
    // its only owner, before anything could instantiate or launch it.
    unsafe {
        if matches!(driver_result::stream::is_capturing(stream.cu_stream()), Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)) {
            return;
        }
        if let Ok(graph) = driver_result::stream::end_capture(stream.cu_stream()) {
            if !graph.is_null() {
                let _ = driver_result::graph::destroy(graph);
            }
        }
    }
}

/// What one forward pass over up to `rows` examples writes (and the backward pass reads).
struct Activations {
    rows: usize,
    /// `[rows, inputs]` and `[rows]`.
    x: CudaSlice<f32>,
    labels: CudaSlice<u8>,
    /// The examples `x` and `labels` hold (split, first, rows) where an evaluation gathered
    /// them (the dataset on the device never changes), so that the next one of the same rows,
    /// every evaluation point of a run, skips the gather (22 µs for the 10 000 test images
    /// on an H200).
    gathered: Option<(SplitKind, usize, usize)>,
    /// Per layer (the output layer's z are the logits without the bias): `[rows, outputs]`.
    z: Vec<CudaSlice<f32>>,
    /// Per hidden layer, `[rows, width]`: x̂ (BN nets only), the activation output a, and the
    /// activation input y (only in the evaluation buffers, for probes).
    x_hat: Vec<CudaSlice<f32>>,
    a: Vec<CudaSlice<f32>>,
    y: Vec<CudaSlice<f32>>,
    /// Batch statistics of every BN layer, concatenated: `[total BN width]`.
    mean: CudaSlice<f32>,
    var: CudaSlice<f32>,
    inv_std: CudaSlice<f32>,
    /// The split BN forward's moments (`kernels::bn_moments_len` of the widest hidden layer)
    /// for BN nets whose forward over `rows` takes it (`kernels::bn_forward_in_parts`);
    /// otherwise a one-float placeholder. With them, its tickets (`kernels::bn_tickets_len`).
    moments: CudaSlice<f32>,
    bn_tickets: CudaSlice<u32>,
}

impl Activations {
    fn new(gpu: &Gpu, model: &ModelConfig, rows: usize, bn_total: usize, with_y: bool) -> Result<Self, CudaError> {
        let hidden = &model.hidden;
        let per_hidden = |on: bool| -> Result<Vec<CudaSlice<f32>>, CudaError> {
            if on { hidden.iter().map(|&w| zeros(gpu, rows * w)).collect() } else { Ok(Vec::new()) }
        };
        Ok(Activations {
            rows,
            x: zeros(gpu, rows * model.inputs)?,
            labels: zeros(gpu, rows)?,
            gathered: None,
            z: model.widths()[1..].iter().map(|&w| zeros(gpu, rows * w)).collect::<Result<_, _>>()?,
            x_hat: per_hidden(model.batch_norm)?,
            a: per_hidden(true)?,
            y: per_hidden(with_y)?,
            mean: zeros(gpu, bn_total)?,
            var: zeros(gpu, bn_total)?,
            inv_std: zeros(gpu, bn_total)?,
            moments: zeros(gpu, split_bn_moments_len(model, rows))?,
            bn_tickets: zeros(gpu, split_bn_tickets_len(model, rows))?,
        })
    }
}

/// Floats of the split BN forward's moments that a forward over `rows` rows of `model`
/// needs (its widest hidden layer's): none unless it has BN and `rows` take the split.
fn split_bn_moments_len(model: &ModelConfig, rows: usize) -> usize {
    if model.batch_norm && kernels::bn_forward_in_parts(rows) {
        kernels::bn_moments_len(rows, widest_hidden(model))
    } else {
        0
    }
}

/// Tickets of the split BN forward that a forward over `rows` rows of `model` needs (as
/// [`split_bn_moments_len`]).
fn split_bn_tickets_len(model: &ModelConfig, rows: usize) -> usize {
    if split_bn_moments_len(model, rows) > 0 { kernels::bn_tickets_len(widest_hidden(model)) } else { 0 }
}

fn widest_hidden(model: &ModelConfig) -> usize {
    model.hidden.iter().copied().max().unwrap_or(0)
}

/// How BN normalizes during a forward pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Normalize {
    WithBatchStats,
    WithPopulationStats,
}

/// The read-only parts a forward pass needs, borrowed from the backend.
struct Net<'a> {
    gpu: &'a Gpu,
    gemm: GemmPrecision,
    model: &'a ModelConfig,
    layers: &'a [LayerSlots],
    params: &'a CudaSlice<f32>,
    /// Estimator 0's running statistics (the inference ones): `[total BN width]`.
    population: (&'a CudaSlice<f32>, &'a CudaSlice<f32>),
}

impl Net<'_> {
    /// Forward pass over `acts.x[..rows]` (already gathered) up to the output layer's z;
    /// writes y of hidden layer `probe_layer` when asked.
    fn forward(&self, acts: &mut Activations, rows: usize, normalize: Normalize, probe_layer: Option<usize>) -> Result<(), CudaError> {
        let (gpu, model) = (self.gpu, self.model);
        let epsilon = model.epsilon as f32;
        let hidden = model.hidden.len();
        for (l, layer) in self.layers.iter().enumerate() {
            let (inputs, outputs) = (layer.inputs, layer.outputs);
            let (done, rest) = acts.a.split_at_mut(l);
            let input = if l == 0 { acts.x.slice(..rows * inputs) } else { done[l - 1].slice(..rows * inputs) };
            let n = rows * outputs;
            // z = x·wᵀ  (x: [rows, in], w: [out, in], z: [rows, out])
            matmul(gpu, self.gemm, false, true, rows, outputs, inputs, &input, &self.params.slice(layer.weight.clone()), &mut acts.z[l].slice_mut(..n), false)?;
            if l == hidden {
                break; // the output layer's bias is added by the loss kernel
            }
            let z = acts.z[l].slice(..n);
            let mut a = rest[0].slice_mut(..n);
            let mut y = match probe_layer {
                Some(p) if p == l => Some(acts.y[l].slice_mut(..n)),
                _ => None,
            };
            match (&layer.bn, normalize) {
                // A tall batch (an evaluation) in parts, so that its few columns fill the GPU.
                (Some(bn), Normalize::WithBatchStats) if kernels::bn_forward_in_parts(rows) => {
                    kernels::bn_column_moments(
                        gpu, &z, rows, outputs, epsilon, &mut acts.moments.slice_mut(..kernels::bn_moments_len(rows, outputs)),
                        &mut acts.bn_tickets.slice_mut(..kernels::bn_tickets_len(outputs)),
                        &mut acts.mean.slice_mut(bn.stats.clone()), &mut acts.var.slice_mut(bn.stats.clone()),
                        &mut acts.inv_std.slice_mut(bn.stats.clone()),
                    )?;
                    kernels::bn_act_fwd_train_parts(
                        gpu, &z, &self.params.slice(bn.gamma.clone()), &self.params.slice(bn.beta.clone()), model.activation,
                        rows, outputs, &acts.mean.slice(bn.stats.clone()), &acts.inv_std.slice(bn.stats.clone()),
                        &mut acts.x_hat[l].slice_mut(..n), y.as_mut(), &mut a,
                    )?
                }
                (Some(bn), Normalize::WithBatchStats) => kernels::bn_act_fwd_train(
                    gpu, &z, &self.params.slice(bn.gamma.clone()), &self.params.slice(bn.beta.clone()), epsilon,
                    model.activation, rows, outputs,
                    &mut acts.mean.slice_mut(bn.stats.clone()), &mut acts.var.slice_mut(bn.stats.clone()),
                    &mut acts.inv_std.slice_mut(bn.stats.clone()), &mut acts.x_hat[l].slice_mut(..n), y.as_mut(), &mut a,
                )?,
                (Some(bn), Normalize::WithPopulationStats) => kernels::bn_act_fwd_infer(
                    gpu, &z, &self.params.slice(bn.gamma.clone()), &self.params.slice(bn.beta.clone()),
                    &self.population.0.slice(bn.stats.clone()), &self.population.1.slice(bn.stats.clone()), epsilon,
                    model.activation, rows, outputs, y.as_mut(), &mut a,
                )?,
                (None, _) => {
                    let bias = layer.bias.clone().map(|b| self.params.slice(b));
                    kernels::bias_act_fwd(gpu, &z, bias.as_ref(), model.activation, rows, outputs, y.as_mut(), &mut a)?
                }
            }
        }
        Ok(())
    }
}

/// The weight gradients' stream ([`CudaOptions::backward_streams`]): layer l's dW = dzᵀ·x
/// runs there while the training stream computes dx = dz·W and goes on down. Layer l's dz
/// sits in `grad_z[(L − l) % 2]` (L: the output layer), so that writing the next layer's dz
/// does not overwrite one the lane still reads; the training stream waits for the dW that
/// read a buffer before it writes it again, and for the last dW before the SGD update.
/// Under graph capture the events become the graph's fork and join edges.
struct BackwardLane {
    lane: Gpu,
    /// Per layer: recorded on the training stream once its dz is written.
    dz_ready: Vec<CudaEvent>,
    /// Per layer: recorded on the lane once its dW is written.
    dw_done: Vec<CudaEvent>,
    /// Recorded on the lane at the end of the backward: the training stream joins it.
    joined: CudaEvent,
    /// [`CudaBackend::delay_backward_lane`]'s µs (0: none).
    delay_us: u32,
}

/// The host function [`CudaBackend::delay_backward_lane`] queues: sleeps `micros` µs.
extern "C" fn sleep_on_stream(micros: *mut std::ffi::c_void) {
    std::thread::sleep(std::time::Duration::from_micros(micros as usize as u64));
}

/// Where evaluation points run ([`Backend::begin_point`]): a copy of the state they measure,
/// taken on the training stream when a point begins, so that the steps queued after it may
/// change the live one; the lane their work runs on; pinned host memory their results are
/// copied into without a synchronization.
struct PointState {
    /// A stream of its own ([`CudaOptions::eval_stream`]), where the point's evaluation runs
    /// beside the next steps; None: the training stream, after them in order.
    lane: Option<Gpu>,
    /// The flat parameters and every estimator's running statistics, as at the point.
    params: CudaSlice<f32>,
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    /// The training steps' loss and correct count up to the point (the live sums restart).
    step_loss: CudaSlice<f64>,
    step_correct: CudaSlice<u64>,
    /// Pinned copies of the results (each waits for the copy into it when read).
    host: PointHost,
    /// Recorded on the training stream once the copies are taken: the lane waits for it.
    taken: CudaEvent,
    /// Recorded on the lane after the point's last copy to the host (also where queuing
    /// the point failed): the host waits for it before it reads or frees the pinned
    /// results, the training stream before it writes what a point reads
    /// ([`CudaBackend::after_point`]).
    done: CudaEvent,
    /// The point queued and not yet finished.
    in_flight: Option<PointInFlight>,
}

/// Where a point's results arrive on the host.
struct PointHost {
    step_loss: PinnedHostSlice<f64>,
    step_correct: PinnedHostSlice<u64>,
    eval_loss: PinnedHostSlice<f64>,
    eval_correct: PinnedHostSlice<u64>,
    non_finite: PinnedHostSlice<u32>,
    /// `[examples, neurons]` of the largest probe so far.
    probe: Option<PinnedHostSlice<f32>>,
}

/// What the host remembers of a queued point.
#[derive(Clone, Copy, Debug)]
struct PointInFlight {
    steps: u64,
    examples: usize,
    probe: Option<Probe>,
}

/// Pinned host memory for `len` values, in cacheable pages (cudarc's default is
/// write-combined, which the host reads slowly).
fn pinned<T: DeviceRepr>(gpu: &Gpu, len: usize) -> Result<PinnedHostSlice<T>, CudaError> {
    // SAFETY: the memory is unset until a copy writes it. A point's results are read only
    // in `collect_point`, after the host has waited for the point's `done` event, which is
    // recorded behind every copy into them. (`as_slice`'s own wait does not cover these
    // copies: cudarc records a pinned buffer's event only with event tracking on, and it is
    // off, see `Gpu::open`.)
    Ok(unsafe { gpu.context().alloc_pinned_with_flags::<T>(len.max(1), 0) }?)
}

impl PointState {
    /// The GPU lane the point's work runs on: its own, else the training one.
    fn gpu<'a>(&'a self, training: &'a Gpu) -> &'a Gpu {
        self.lane.as_ref().unwrap_or(training)
    }

    fn new(gpu: &Gpu, lane: Option<Gpu>, flat_len: usize, stats_len: usize) -> Result<Self, CudaError> {
        Ok(PointState {
            params: zeros(gpu, flat_len)?,
            running_mean: zeros(gpu, stats_len.max(1))?,
            running_var: zeros(gpu, stats_len.max(1))?,
            step_loss: zeros(gpu, 1)?,
            step_correct: zeros(gpu, 1)?,
            host: PointHost {
                step_loss: pinned(gpu, 1)?,
                step_correct: pinned(gpu, 1)?,
                eval_loss: pinned(gpu, 1)?,
                eval_correct: pinned(gpu, 1)?,
                non_finite: pinned(gpu, 1)?,
                probe: None,
            },
            taken: gpu.context().new_event(None)?,
            done: gpu.context().new_event(None)?,
            in_flight: None,
            lane,
        })
    }
}

/// The captured step, and the bf16 scratch generation it captured
/// ([`CudaBackend::scratch_generation`]). CUDA graphs are not internally synchronized: every
/// use of this one goes through `&mut CudaBackend`, which serializes them.
struct StepGraph(CudaGraph, u64);

// SAFETY: CUDA allows a graph to be used from any thread as long as calls on it are not
// concurrent; moving it between threads (Send) is therefore fine, and no method reachable
// through `&CudaBackend` touches it (Sync), so `CudaBackend` keeps the auto traits it had.
unsafe impl Send for StepGraph {}
// SAFETY: see above: nothing reads or launches the graph through a shared reference.
unsafe impl Sync for StepGraph {}

/// Where the step's graph stands.
enum GraphState {
    /// Eager launches: asked for, or capture failed (`fell_back`).
    Off { fell_back: bool },
    /// To be captured at the next step (after the warm-up step).
    Stale,
    Ready(StepGraph),
}

/// The CUDA backend (f32 on the device; parameters cross the host boundary as f64).
pub struct CudaBackend {
    gpu: Gpu,
    model: ModelConfig,
    train: TrainConfig,
    data: Arc<Dataset>,
    layers: Vec<LayerSlots>,
    /// Length of the flat parameter / gradient / velocity buffers.
    flat_len: usize,
    /// BN nets: the layout of the running statistics (None for a plain net).
    stats_layout: Option<RunningStatsLayout>,
    train_images: CudaSlice<u8>,
    train_labels: CudaSlice<u8>,
    test_images: CudaSlice<u8>,
    test_labels: CudaSlice<u8>,
    /// The epoch order (`[order_len]` used) and the device batch counter the gather reads.
    order: CudaSlice<u32>,
    order_len: usize,
    cursor: CudaSlice<u32>,
    /// The batch the device counter holds, as far as the host knows (None: unknown).
    cursor_batch: Option<usize>,
    params: CudaSlice<f32>,
    grads: CudaSlice<f32>,
    velocity: Option<CudaSlice<f32>>,
    /// `[estimators, total BN width]` and `[estimators, BN layers]`.
    running_mean: CudaSlice<f32>,
    running_var: CudaSlice<f32>,
    batches: CudaSlice<u64>,
    step: Activations,
    eval: Activations,
    /// Backward scratch, `[batch, widest layer]`: dL/da of the layer below, dL/dz of the current one
    /// (the second dz buffer only with a [`BackwardLane`], one element otherwise).
    grad_a: CudaSlice<f32>,
    grad_z: [CudaSlice<f32>; 2],
    backward: Option<BackwardLane>,
    /// Device accumulators: Σ loss and correct count of the steps since take_step_stats, and
    /// of the evaluation in progress.
    step_loss: CudaSlice<f64>,
    step_correct: CudaSlice<u64>,
    eval_loss: CudaSlice<f64>,
    eval_correct: CudaSlice<u64>,
    /// How many parameters and running statistics are not finite (first_non_finite).
    non_finite: CudaSlice<u32>,
    /// Evaluation points queued by `begin_point`.
    point: PointState,
    /// `BNTRAIN_TIMELINE=1`: timing events around every run of steps and point.
    timeline: Option<Timeline>,
    /// The probed units' activation inputs of the last evaluation, `[examples, neurons]`
    /// (packed by [`pack_columns`]), grown when a larger probe comes.
    probe_columns: CudaSlice<f32>,
    pending_steps: u64,
    graph: GraphState,
    /// What the GEMMs read (f32 unless `--precision tf32|bf16`).
    gemm: GemmPrecision,
    /// Whether a step has run eagerly (the warm-up before the first capture).
    warmed_up: bool,
    /// How many times the step has been captured.
    captures: u32,
    /// StepLaunch::Fused: the fused kernel's plan; `fused_unavailable` when it was asked for
    /// and could not be used (the backend captures graphs instead).
    fused: Option<FusedPlan>,
    fused_unavailable: bool,
    /// CudaOptions::fused_staging, for the fused plan.
    fused_staging: bool,
    /// Whether fused steps run on the thread-block-cluster kernels (see [`CudaOptions`]).
    fused_cluster: ClusterRequest,
    /// CudaOptions::fused_threads and fused_512_kernel, for the fused plan.
    fused_threads: u32,
    fused_512_kernel: bool,
    /// CudaOptions::fused_replicated and fused_replicated_grid, for the fused plan.
    fused_replicated: Option<ReplicatedRequest>,
    /// Set by [`CudaBackend::refuse_next_cluster_launch`].
    refuse_cluster_launch: bool,
    /// CudaOptions::fused_pairing.
    fused_pairing: bool,
    /// A hash of the epoch order last set: two networks train in one launch only on the same
    /// batches.
    order_fingerprint: u64,
    /// Whether steps of this network have run in one launch with another's (the device name
    /// says so).
    paired: bool,
}

// The graph wrapper must not cost the backend its auto traits.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CudaBackend>();
};

/// Elements of each of the two bf16 operand buffers a bf16 backend needs: its largest GEMM
/// operand, a batch (training or evaluation) of the widest layer input or output, or the
/// largest weight matrix.
fn bf16_operand_elements(model: &ModelConfig, batch: usize, eval_rows: usize) -> usize {
    let widest = *model.widths().iter().max().unwrap_or(&1);
    let activations = batch.max(eval_rows).saturating_mul(model.inputs.max(widest));
    let weights = model.widths().windows(2).map(|w| w[0].saturating_mul(w[1])).max().unwrap_or(1);
    activations.max(weights)
}

/// Cluster launches the driver refused in this process, each answered by
/// `leave_clusters` (the network went on with the grid kernel).
static CLUSTER_REFUSALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times in this process a network's cluster launch was refused and it went on with
/// the grid kernel: a test of the cluster kernels checks that its steps really ran on them.
pub fn cluster_refusals() -> usize {
    CLUSTER_REFUSALS.load(std::sync::atomic::Ordering::Relaxed)
}

/// An upper estimate of the device memory a [`CudaBackend`] allocates: the dataset (u8
/// pixels, labels, the epoch order), parameters with gradients and momentum, running
/// statistics (twice: evaluation points take a copy of them and of the parameters), the
/// activations of one training batch (twice: the fused kernel has its own) and one
/// evaluation chunk (with the split BN forward's moments and tickets), cuBLAS's workspace, and with bf16 GEMMs the operands' copies. Each
/// second stream ([`CudaOptions::eval_stream`], [`CudaOptions::backward_streams`]) brings
/// a workspace and bf16 operands of its own; the backward's also a second dz buffer.
pub fn device_bytes_needed(model: &ModelConfig, train: &TrainConfig, data: &Dataset, options: &CudaOptions) -> usize {
    let f32s = std::mem::size_of::<f32>();
    let dataset = (data.train.count + data.test.count) * (data.train.features + 1) + data.train.count * 4;
    // An overflowing count saturates, so the check that follows refuses it.
    let parameter_count = model.parameter_count().unwrap_or(usize::MAX);
    let parameters = parameter_count.saturating_mul(f32s * if train.momentum > 0.0 { 3 } else { 2 });
    let hidden: usize = model.hidden.iter().sum();
    let statistics = train.estimators().len() * hidden * 2 * f32s + hidden * 3 * f32s;
    let point_copy = parameter_count.saturating_mul(f32s).saturating_add(train.estimators().len() * hidden * 2 * f32s);
    // Per row: the input, and for every layer z, x̂, y and a, plus two gradient scratch rows.
    let widest = *model.widths().iter().max().unwrap_or(&1);
    let per_row = (model.inputs + 4 * model.widths()[1..].iter().sum::<usize>() + 2 * widest) * f32s;
    let eval_rows = options.eval_chunk.min(data.test.count.max(data.train.count)).max(1);
    let rows = 2 * train.batch_size + eval_rows;
    let bf16_operands = |rows: usize| match options.gemm {
        GemmPrecision::Bf16 => bf16_operand_elements(model, train.batch_size, rows).saturating_mul(2 * std::mem::size_of::<u16>()),
        _ => 0,
    };
    let workspace = super::context::BLAS_WORKSPACE_MAX;
    let eval_lane = if options.eval_stream { workspace.saturating_add(bf16_operands(eval_rows)) } else { 0 };
    let backward_lane = if options.second_backward_stream() {
        workspace.saturating_add(bf16_operands(0)).saturating_add(train.batch_size * widest * f32s)
    } else {
        0
    };
    let moments = split_bn_moments_len(model, eval_rows) * f32s + split_bn_tickets_len(model, eval_rows) * std::mem::size_of::<u32>();
    dataset
        .saturating_add(moments)
        .saturating_add(parameters)
        .saturating_add(statistics)
        .saturating_add(point_copy)
        .saturating_add(rows * per_row)
        .saturating_add(workspace)
        .saturating_add(bf16_operands(eval_rows))
        .saturating_add(eval_lane)
        .saturating_add(backward_lane)
}

impl CudaBackend {
    /// A backend that trains `params` on `data` on GPU 0, with [`CudaOptions::from_env`].
    /// The configuration is validated here, as by [`crate::cpu::CpuBackend::new`].
    pub fn new(model: ModelConfig, train: TrainConfig, data: Arc<Dataset>, params: &ModelParams) -> Result<Self> {
        Self::with_options(model, train, data, params, CudaOptions::from_env()?)
    }

    /// [`CudaBackend::new`] with explicit options (the environment is not read).
    pub fn with_options(model: ModelConfig, train: TrainConfig, data: Arc<Dataset>, params: &ModelParams, options: CudaOptions) -> Result<Self> {
        model.validate()?;
        train.validate(&model, data.train.count)?;
        train.validate_in_f32(&model)?;
        if data.train.features != model.inputs || data.train.classes != model.classes || data.test.features != model.inputs {
            return Err(ConfigError::Invalid(format!(
                "the dataset has {} features and {} classes but the model expects {} and {}",
                data.train.features, data.train.classes, model.inputs, model.classes
            ))
            .into());
        }
        if model.classes > 256 {
            return Err(ConfigError::Invalid(format!("the CUDA backend handles at most 256 classes (got {})", model.classes)).into());
        }
        let gpu = Gpu::open()?;
        gpu.set_gemm_tuning(options.gemm_tuning);
        // Refuse up front, with the size, rather than fail on the n-th allocation.
        let needed = device_bytes_needed(&model, &train, &data, &options);
        let (free, _) = gpu.context().mem_get_info().map_err(CudaError::from)?;
        if needed > free {
            return Err(CudaError::OutOfMemory { bytes_needed: needed }.into());
        }
        let (layers, flat_len, bn_total) = layout(&model);
        let estimators = train.estimators();
        let stats_layout = if model.batch_norm && !model.hidden.is_empty() {
            Some(RunningStatsLayout::new(&gpu, &model.hidden, &estimators)?)
        } else {
            None
        };
        let bn_layers = stats_layout.as_ref().map_or(0, |s| s.layers());
        let batch = train.batch_size;
        let step_launch = options.step_launch.resolve(&model, batch, options.gemm);
        let widest = *model.widths().iter().max().unwrap_or(&1);
        let eval_rows = options.eval_chunk.min(data.test.count.max(data.train.count)).max(1);
        if options.gemm == GemmPrecision::Bf16 {
            gpu.reserve_bf16_operands(bf16_operand_elements(&model, batch, eval_rows))?;
        }
        // The evaluation points' lane, with its bf16 scratch for the evaluation chunk made
        // now rather than in the middle of a run.
        let eval_lane = |gpu: &Gpu| -> Result<Gpu, CudaError> {
            let lane = gpu.open_lane()?;
            if options.gemm == GemmPrecision::Bf16 {
                lane.reserve_bf16_operands(bf16_operand_elements(&model, batch, eval_rows))?;
            }
            Ok(lane)
        };
        let mut backend = CudaBackend {
            train_images: upload(&gpu, &data.train.images)?,
            train_labels: upload(&gpu, &data.train.labels)?,
            test_images: upload(&gpu, &data.test.images)?,
            test_labels: upload(&gpu, &data.test.labels)?,
            order: zeros(&gpu, data.train.count)?,
            order_len: 0,
            cursor: zeros(&gpu, 1)?,
            cursor_batch: None,
            params: zeros(&gpu, flat_len)?,
            grads: zeros(&gpu, flat_len)?,
            velocity: if train.momentum > 0.0 { Some(zeros(&gpu, flat_len)?) } else { None },
            running_mean: zeros(&gpu, estimators.len() * bn_total)?,
            running_var: zeros(&gpu, estimators.len() * bn_total)?,
            batches: zeros(&gpu, estimators.len() * bn_layers)?,
            step: Activations::new(&gpu, &model, batch, bn_total, false)?,
            eval: Activations::new(&gpu, &model, eval_rows, bn_total, true)?,
            grad_a: zeros(&gpu, batch * widest)?,
            grad_z: [zeros(&gpu, batch * widest)?, zeros(&gpu, 1)?],
            // Made below where steps are not fused.
            backward: None,
            step_loss: zeros(&gpu, 1)?,
            step_correct: zeros(&gpu, 1)?,
            eval_loss: zeros(&gpu, 1)?,
            eval_correct: zeros(&gpu, 1)?,
            non_finite: zeros(&gpu, 1)?,
            probe_columns: zeros(&gpu, 1)?,
            point: PointState::new(&gpu, if options.eval_stream { Some(eval_lane(&gpu)?) } else { None }, flat_len, estimators.len() * bn_total)?,
            timeline: options.timeline.then(Timeline::default),
            pending_steps: 0,
            graph: match step_launch {
                StepLaunch::Eager => GraphState::Off { fell_back: false },
                StepLaunch::Graph | StepLaunch::Auto => GraphState::Stale,
                // Unused while the fused plan serves; replaced if it cannot be built.
                StepLaunch::Fused => GraphState::Off { fell_back: false },
            },
            warmed_up: false,
            captures: 0,
            fused: None,
            fused_unavailable: false,
            fused_staging: options.fused_staging,
            fused_cluster: options.fused_cluster,
            fused_threads: options.fused_threads,
            fused_512_kernel: options.fused_512_kernel,
            fused_replicated: options.fused_replicated.map(|threads| ReplicatedRequest { threads, max_grid: options.fused_replicated_grid }),
            refuse_cluster_launch: false,
            fused_pairing: options.fused_pairing,
            order_fingerprint: 0,
            paired: false,
            gemm: options.gemm,
            gpu,
            model,
            train,
            data,
            layers,
            flat_len,
            stats_layout,
        };
        backend.set_params(params)?;
        if step_launch == StepLaunch::Fused {
            match backend.fused_plan() {
                Ok(plan) => {
                    if options.fused_cluster != ClusterRequest::Off && plan.cluster().is_none() {
                        let _ = writeln!(
                            std::io::stderr(),
                            "notice: thread-block clusters unavailable ({}: compute capability 9.0 and newer, batches of at most 64, at most 32 classes and 4 hidden layers, and room on the device); fused steps use {}",
                            backend.gpu.name(),
                            plan.kernel_name()
                        );
                    }
                    if options.fused_replicated.is_some() && plan.replicated().is_none() {
                        let why = if plan.cluster().is_some() {
                            "thread-block clusters, also asked for, take precedence".to_string()
                        } else {
                            // A cap leaves each block more of layer 0's weight rows to keep.
                            let cap = options.fused_replicated_grid.map_or(String::new(), |n| format!(", on at most {n} blocks ({})", CudaOptions::REPLICATED_GRID_ENV));
                            format!("it does not take this network ({}: at most 4 layers above the first, whose parameters and batch's activations, and the block's share of layer 0's weight rows, must fit a block's shared memory{cap})", backend.gpu.name())
                        };
                        let _ = writeln!(std::io::stderr(), "notice: the one-barrier kernel is not used: {why}; fused steps use {}", plan.kernel_name());
                    }
                    if options.fused_replicated_grid.is_some() && options.fused_replicated.is_none() {
                        static GRID_ALONE: std::sync::Once = std::sync::Once::new();
                        GRID_ALONE.call_once(|| {
                            let _ = writeln!(
                                std::io::stderr(),
                                "notice: {} caps the one-barrier kernel's grid, which {} turns on; fused steps use {}",
                                CudaOptions::REPLICATED_GRID_ENV, CudaOptions::REPLICATED_ENV, plan.kernel_name()
                            );
                        });
                    }
                    backend.fused = Some(plan);
                }
                // Auto chose fusing; it falls back to graphs without a word.
                Err(_) if options.step_launch == StepLaunch::Auto => backend.graph = GraphState::Stale,
                Err(why) => {
                    let _ = writeln!(std::io::stderr(), "notice: fused CUDA steps unavailable, capturing CUDA graphs instead: {why}");
                    backend.fused_unavailable = true;
                    backend.graph = GraphState::Stale;
                }
            }
        }
        if options.second_backward_stream() && backend.fused.is_none() {
            backend.open_backward_lane()?;
        }
        // Options asked for that this network's way of stepping has no use for: said once a
        // process, so that a run is not taken for what it did not do.
        static FUSED_ONLY: std::sync::Once = std::sync::Once::new();
        static NOT_FUSED: std::sync::Once = std::sync::Once::new();
        // (Pairing is on by default, so it is no sign of a request; nor is a default.)
        let defaults = CudaOptions::default();
        let fused_asked = options.fused_staging != defaults.fused_staging
            || options.fused_cluster != defaults.fused_cluster
            || options.fused_threads != defaults.fused_threads
            || options.fused_512_kernel != defaults.fused_512_kernel
            || options.fused_replicated != defaults.fused_replicated
            || options.fused_replicated_grid != defaults.fused_replicated_grid;
        if fused_asked && backend.fused.is_none() {
            FUSED_ONLY.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "notice: BNTRAIN_FUSED_STAGE, BNTRAIN_FUSED_CLUSTER, BNTRAIN_FUSED_THREADS, BNTRAIN_FUSED_512_KERNEL, BNTRAIN_FUSED_REPLICATED and BNTRAIN_FUSED_REPLICATED_GRID apply to fused steps only; this network's steps run as {}",
                    if matches!(backend.graph, GraphState::Off { .. }) { "eager launches" } else { "a cuda graph" }
                );
            });
        }
        if options.backward_streams == Some(true) && backend.fused.is_some() {
            NOT_FUSED.call_once(|| {
                let _ = writeln!(std::io::stderr(), "notice: BNTRAIN_BACKWARD_STREAMS applies to graph and eager steps only; fused steps run their whole backward in one kernel");
            });
        }
        Ok(backend)
    }

    /// Makes the [`BackwardLane`] and the second dz buffer it needs.
    fn open_backward_lane(&mut self) -> Result<(), CudaError> {
        let gpu = &self.gpu;
        let lane = gpu.open_lane()?;
        let batch = self.train.batch_size;
        if self.gemm == GemmPrecision::Bf16 {
            // A captured step keeps the scratch's address: allocated before it (the lane's
            // GEMMs are the training batch's).
            lane.reserve_bf16_operands(bf16_operand_elements(&self.model, batch, 0))?;
        }
        let event = || gpu.context().new_event(None).map_err(CudaError::from);
        let events = || (0..=self.model.hidden.len()).map(|_| event()).collect::<Result<Vec<_>, _>>();
        let widest = *self.model.widths().iter().max().unwrap_or(&1);
        self.grad_z[1] = zeros(gpu, batch * widest)?;
        self.backward = Some(BackwardLane { lane, dz_ready: events()?, dw_done: events()?, joined: event()?, delay_us: 0 });
        Ok(())
    }

    /// Test hook: before each weight gradient of an eager step, the backward's second stream
    /// first sleeps `micros` µs on the host (a host function queued on it), so that a
    /// missing wait on the training stream would let it overwrite a dz the lane has yet to
    /// read. No effect without the lane or under graph capture.
    #[doc(hidden)]
    pub fn delay_backward_lane(&mut self, micros: u32) {
        if let Some(side) = &mut self.backward {
            side.delay_us = micros;
        }
    }

    /// The fused kernel's layer table from this backend's layout (see cuda/fused_step.cu).
    fn fused_plan(&self) -> Result<FusedPlan, CudaError> {
        if self.gemm != GemmPrecision::F32 {
            return Err(CudaError::Launch {
                kernel: "fused_train_steps_f32",
                message: format!("it computes in f32; {} GEMMs need cuBLAS", self.gemm.label()),
            });
        }
        let layers = self
            .layers
            .iter()
            .map(|l| FusedLayer {
                inputs: l.inputs,
                outputs: l.outputs,
                weight: l.weight.start,
                bias: l.bias.as_ref().map(|b| b.start),
                batch_norm: l.bn.as_ref().map(|bn| (bn.gamma.start, bn.beta.start, bn.stats.start)),
            })
            .collect();
        let bn_total = self.stats_layout.as_ref().map_or(0, |s| s.total());
        FusedPlan::new(&self.gpu, layers, self.train.batch_size, self.flat_len, bn_total, self.fused_staging, self.fused_cluster, self.fused_threads, self.fused_512_kernel, self.fused_replicated)
    }

    /// Checks that batches `first..first+count` lie inside the epoch order and points the
    /// device counter at `first` unless it is there already (a memset queued before the
    /// steps, outside any graph).
    fn start_steps(&mut self, first: usize, count: usize) -> Result<()> {
        let end = first.checked_add(count).and_then(|n| n.checked_mul(self.train.batch_size)).unwrap_or(usize::MAX);
        if end > self.order_len {
            let batches = if count == 1 { format!("batch {first} lies") } else { format!("batches {first}..{} lie", first.saturating_add(count)) };
            return Err(ConfigError::Invalid(format!("{batches} past the epoch order ({} indices)", self.order_len)).into());
        }
        // Until these steps have launched completely, the device counter is not known.
        if self.cursor_batch.take() != Some(first) {
            self.set_cursor(first)?;
            self.cursor_batch = None;
        }
        Ok(())
    }

    /// After `count` steps from batch `first` have launched: the counter's batch and the
    /// steps the next statistics cover.
    fn finish_steps(&mut self, first: usize, count: usize) {
        self.cursor_batch = Some(first + count);
        self.pending_steps += count as u64;
    }

    /// Records `mark` on `lane` (the training stream if None) where the timeline is on.
    fn mark(&mut self, lane: Option<&Arc<CudaStream>>, mark: Mark) -> Result<(), CudaError> {
        match self.timeline.as_mut() {
            Some(timeline) => timeline.record(&self.gpu, lane.unwrap_or(self.gpu.stream()), mark),
            None => Ok(()),
        }
    }

    /// The fused kernel's hyperparameters of this network.
    fn fused_hyper(&self) -> FusedHyper {
        FusedHyper {
            epsilon: self.model.epsilon as f32,
            activation: self.model.activation,
            grad_scale: match self.train.loss {
                LossReduction::Sum => 1.0,
                LossReduction::Mean => 1.0 / self.train.batch_size as f32,
            },
            learning_rate: self.train.learning_rate as f32,
            momentum: self.train.momentum as f32,
        }
    }

    /// Calls `launch` with the GPU, the fused plan and this network's buffers as a fused
    /// launch reads them.
    fn with_fused_buffers<R>(
        &mut self, launch: impl FnOnce(&Gpu, &mut FusedPlan, FusedBuffers<'_, '_>) -> Result<R, CudaError>,
    ) -> Result<R, CudaError> {
        let Some(plan) = self.fused.as_mut() else {
            return Err(CudaError::Launch { kernel: "fused_train_steps_f32", message: "no fused plan".into() });
        };
        let (count, features) = (self.data.train.count, self.data.train.features);
        let (mut params, mut grads, mut cursor) = (self.params.as_view_mut(), self.grads.as_view_mut(), self.cursor.as_view_mut());
        let mut velocity = self.velocity.as_mut().map(|v| v.as_view_mut());
        let (mut mean, mut var, mut batches) = (self.running_mean.as_view_mut(), self.running_var.as_view_mut(), self.batches.as_view_mut());
        let (mut loss, mut correct) = (self.step_loss.as_view_mut(), self.step_correct.as_view_mut());
        let buffers = FusedBuffers {
            images: &self.train_images.slice(..count * features),
            labels: &self.train_labels.slice(..count),
            features,
            order: &self.order.slice(..self.order_len),
            cursor: &mut cursor,
            params: &mut params,
            grads: &mut grads,
            velocity: velocity.as_mut(),
            statistics: self.stats_layout.as_ref().map(|layout| (layout, &mut mean, &mut var, &mut batches)),
            loss_sum: &mut loss,
            correct: &mut correct,
        };
        launch(&self.gpu, plan, buffers)
    }

    /// Launches `steps` fused steps from the batch the device cursor holds (≤ FUSED_MAX_STEPS).
    fn launch_fused(&mut self, steps: usize) -> Result<(), CudaError> {
        let hyper = self.fused_hyper();
        let launch = |net: &mut Self| net.with_fused_buffers(|gpu, plan, buffers| kernels::fused_train_steps(gpu, plan, buffers, hyper, steps));
        match self.refused_cluster_launch().map_or_else(|| launch(self), Err) {
            Err(refused @ CudaError::LaunchRefused { .. }) if self.on_clusters() => {
                self.leave_clusters(&refused)?;
                launch(self)
            }
            done => done,
        }
    }

    /// One launch of `steps` fused steps of this network and `other` together (the caller
    /// has ordered their streams). Where the driver refuses the cluster kernels (nothing
    /// ran), both networks leave them for the grid kernels, which run the steps together
    /// where their plans still pair, else each network on its own stream. Ok(whether the
    /// steps ran together).
    fn launch_fused_pair(&mut self, other: &mut CudaBackend, hyper: FusedHyper, steps: usize) -> Result<bool, CudaError> {
        let launch = |a: &mut Self, b: &mut Self| {
            a.with_fused_buffers(|gpu, plan, buffers| {
                b.with_fused_buffers(|_, other_plan, other_buffers| kernels::fused_train_pair(gpu, (plan, buffers), (other_plan, other_buffers), hyper, steps))
            })
        };
        if !self.pairs_with(other) {
            // An earlier chunk's fallback parted them.
            return self.launch_fused_apart(other, steps).map(|()| false);
        }
        match self.refused_cluster_launch().map_or_else(|| launch(self, other), Err) {
            Err(refused @ CudaError::LaunchRefused { .. }) if self.on_clusters() || other.on_clusters() => {
                // Earlier chunks of this run, on this network's stream, may still use the
                // other's buffers, which its new plan replaces on its own stream.
                other.gpu.stream().join(self.gpu.stream())?;
                for net in [&mut *self, &mut *other] {
                    if net.on_clusters() {
                        net.leave_clusters(&refused)?;
                    }
                }
                if self.pairs_with(other) {
                    // The pair kernel runs on this network's stream and reads the other's
                    // new plan, which its stream has yet to allocate and fill.
                    self.gpu.stream().join(other.gpu.stream())?;
                    launch(self, other).map(|()| true)
                } else {
                    self.launch_fused_apart(other, steps).map(|()| false)
                }
            }
            done => done.map(|()| true),
        }
    }

    /// `steps` fused steps of this network and `other`, each launched on its own stream,
    /// the other's after whatever this one's stream has queued (earlier chunks of a pair).
    fn launch_fused_apart(&mut self, other: &mut CudaBackend, steps: usize) -> Result<(), CudaError> {
        other.gpu.stream().join(self.gpu.stream())?;
        self.launch_fused(steps)?;
        other.launch_fused(steps)
    }

    /// Whether fused steps run on the thread-block-cluster kernels.
    fn on_clusters(&self) -> bool {
        self.fused.as_ref().is_some_and(|plan| plan.cluster().is_some())
    }

    /// Answers a cluster launch the driver refused (nothing ran): this network's fused steps
    /// use the grid kernels (or the one-barrier kernel, if also asked for) from now on, after a
    /// notice.
    fn leave_clusters(&mut self, refused: &CudaError) -> Result<(), CudaError> {
        CLUSTER_REFUSALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cluster = std::mem::replace(&mut self.fused_cluster, ClusterRequest::Off);
        match self.fused_plan() {
            Ok(plan) => self.fused = Some(plan),
            Err(e) => {
                self.fused_cluster = cluster;
                return Err(e);
            }
        }
        let kernel = self.fused.as_ref().map_or("the grid kernel", |plan| plan.kernel_name());
        let _ = writeln!(std::io::stderr(), "notice: {}; fused steps use {kernel} from now on", refused.reason());
        Ok(())
    }

    /// The refusal [`CudaBackend::refuse_next_cluster_launch`] asked for, once, on clusters.
    fn refused_cluster_launch(&mut self) -> Option<CudaError> {
        (self.on_clusters() && std::mem::take(&mut self.refuse_cluster_launch))
            .then(|| CudaError::LaunchRefused { kernel: "fused_cluster_f32", message: "refused as a test asked".into() })
    }

    /// Makes the next launch of the cluster kernels fail as the driver refuses a launch,
    /// without launching: for tests of the fallback to the grid kernel.
    #[doc(hidden)]
    pub fn refuse_next_cluster_launch(&mut self) {
        self.refuse_cluster_launch = true;
    }

    /// Whether this network and `other` can train in one launch (kernels::fused_train_pair):
    /// both asked to, both fused with plans of the same shape, the same hyperparameters, and
    /// the same batches (the same dataset and epoch order: the kernel reads this network's).
    fn pairs_with(&self, other: &CudaBackend) -> bool {
        let (Some(mine), Some(theirs)) = (&self.fused, &other.fused) else { return false };
        self.fused_pairing
            && other.fused_pairing
            && mine.pairs_with(theirs)
            && self.fused_hyper() == other.fused_hyper()
            && Arc::ptr_eq(&self.data, &other.data)
            && self.order_len == other.order_len
            && self.order_fingerprint == other.order_fingerprint
    }

    fn split(&self, split: SplitKind) -> (&Split, &CudaSlice<u8>, &CudaSlice<u8>) {
        match split {
            SplitKind::Train => (&self.data.train, &self.train_images, &self.train_labels),
            SplitKind::Test => (&self.data.test, &self.test_images, &self.test_labels),
        }
    }

    fn bn_total(&self) -> usize {
        self.stats_layout.as_ref().map_or(0, |s| s.total())
    }

    /// Sizes of the trainable tensors, in [`ModelParams::trainable_tensors`] order.
    fn trainable_ranges(&self) -> Vec<Range<usize>> {
        self.layers.iter().flat_map(LayerSlots::trainable).collect()
    }

    /// Reads a flat buffer back as one f64 vector per trainable tensor.
    fn read_trainable(&self, buf: &CudaSlice<f32>) -> Result<Vec<Vec<f64>>> {
        let host: Vec<f32> = read(&self.gpu, buf)?;
        Ok(self.trainable_ranges().into_iter().map(|r| host[r].iter().map(|&v| f64::from(v)).collect()).collect())
    }

    /// Launches one training step's operations on the stream, reading the batch the device
    /// counter points at and advancing it. Nothing here synchronizes, allocates or copies
    /// from the host, and cudarc adds no events (its tracking is off, see [`Gpu::open`]);
    /// the only events are the [`BackwardLane`]'s fork and join, which a capture turns into
    /// edges. So the same sequence can be captured into a graph.
    fn launch_step(&mut self) -> Result<(), CudaError> {
        let b = self.train.batch_size;
        let gpu = &self.gpu;
        let gemm = self.gemm;
        let model = &self.model;
        let features = self.data.train.features;
        let count = self.data.train.count;
        let acts = &mut self.step;
        kernels::gather_rows(
            gpu, &self.train_images.slice(..count * features), &self.train_labels.slice(..count), features,
            Some(&self.order.slice(..self.order_len)), Some(&self.cursor.as_view()), 0, b,
            &mut acts.x.slice_mut(..b * features), &mut acts.labels.slice_mut(..b),
        )?;
        let net = Net { gpu, gemm, model, layers: &self.layers, params: &self.params, population: (&self.running_mean, &self.running_var) };
        net.forward(acts, b, Normalize::WithBatchStats, None)?;

        // Loss, dL/dlogits (into grad_z) and the output bias gradient.
        let hidden = model.hidden.len();
        let out = &self.layers[hidden];
        let classes = out.outputs;
        let grad_scale = match self.train.loss {
            LossReduction::Sum => 1.0f32,
            LossReduction::Mean => 1.0f32 / b as f32,
        };
        let side = self.backward.as_ref();
        // Which of the two dz buffers holds layer l's (always the first without a lane).
        let dz_buffer = |l: usize| if side.is_some() { (hidden - l) % 2 } else { 0 };
        {
            let bias = out.bias.clone().map(|r| self.params.slice(r));
            let mut dbias = out.bias.clone().map(|r| self.grads.slice_mut(r));
            kernels::softmax_xent(
                gpu, &acts.z[hidden].slice(..b * classes), bias.as_ref(), &acts.labels.slice(..b), b, classes, grad_scale,
                Some(&mut self.grad_z[dz_buffer(hidden)].slice_mut(..b * classes)), dbias.as_mut(), None,
                &mut self.step_loss.as_view_mut(), &mut self.step_correct.as_view_mut(),
            )?;
        }

        // Backward, from the output layer down; grad_z[dz_buffer(l)] holds dL/dz of layer l
        // on entry.
        let mut backward = || -> Result<(), CudaError> {
            for l in (0..=hidden).rev() {
                let layer = &self.layers[l];
                let (inputs, outputs) = (layer.inputs, layer.outputs);
                let input = if l == 0 { acts.x.slice(..b * inputs) } else { acts.a[l - 1].slice(..b * inputs) };
                let dz = &self.grad_z[dz_buffer(l)];
                // dW = dzᵀ·x  (dz: [B, out], x: [B, in], dW: [out, in]), on the lane if any.
                let mut dw = self.grads.slice_mut(layer.weight.clone());
                match side {
                    Some(side) => {
                        side.dz_ready[l].record(gpu.stream())?;
                        side.lane.stream().wait(&side.dz_ready[l])?;
                        if side.delay_us > 0 && side.lane.stream().capture_status()? == sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
                            // SAFETY: the callback takes its argument as a number (no memory
                            // behind it) and only sleeps: it makes no CUDA call, as host
                            // functions must not.
                            unsafe { sys::cuLaunchHostFunc(side.lane.stream().cu_stream(), Some(sleep_on_stream), side.delay_us as usize as *mut std::ffi::c_void) }.result()?;
                        }
                        matmul(&side.lane, gemm, true, false, outputs, inputs, b, &dz.slice(..b * outputs), &input, &mut dw, false)?;
                        side.dw_done[l].record(side.lane.stream())?;
                    }
                    None => matmul(gpu, gemm, true, false, outputs, inputs, b, &dz.slice(..b * outputs), &input, &mut dw, false)?,
                }
                if l == 0 {
                    break;
                }
                // dx = dz·W  (W: [out, in], dx: [B, in]) is dL/da of layer l−1.
                matmul(gpu, gemm, false, false, b, inputs, outputs, &dz.slice(..b * outputs), &self.params.slice(layer.weight.clone()), &mut self.grad_a.slice_mut(..b * inputs), false)?;
                // Layer l−1's dz goes where layer l+1's was: its dW must be done reading it.
                if let Some(side) = side.filter(|_| l < hidden) {
                    gpu.stream().wait(&side.dw_done[l + 1])?;
                }
                // Through the activation and BN (or bias) of layer l−1 to its z.
                let below = &self.layers[l - 1];
                let n = b * below.outputs;
                let mut dz_below = self.grad_z[dz_buffer(l - 1)].slice_mut(..n);
                match &below.bn {
                    Some(bn) => {
                        // γ lies before β in the layout: split the gradient buffer between them.
                        let (mut lo, mut hi) = self.grads.split_at_mut(bn.beta.start);
                        let mut d_gamma = lo.slice_mut(bn.gamma.clone());
                        let mut d_beta = hi.slice_mut(..bn.beta.len());
                        kernels::act_bn_bwd(
                            gpu, &self.grad_a.slice(..n), &acts.a[l - 1].slice(..n), &acts.x_hat[l - 1].slice(..n),
                            &self.params.slice(bn.gamma.clone()), &acts.inv_std.slice(bn.stats.clone()), model.activation,
                            b, below.outputs, &mut dz_below, &mut d_gamma, &mut d_beta,
                        )?;
                    }
                    None => {
                        let mut dbias = below.bias.clone().map(|r| self.grads.slice_mut(r));
                        kernels::act_bwd_bias_grad(
                            gpu, &self.grad_a.slice(..n), &acts.a[l - 1].slice(..n), model.activation, b, below.outputs,
                            &mut dz_below, dbias.as_mut(),
                        )?;
                    }
                }
            }
            Ok(())
        };
        let done = backward();
        // The lane joins the training stream again, on failure too (a capture in progress
        // must end with every stream it forked joined), before the update reads dW; the
        // backward's own error, if any, comes first.
        if let Some(side) = side {
            let recorded = side.joined.record(side.lane.stream());
            let joined = gpu.stream().wait(&side.joined);
            done.and(recorded.map_err(CudaError::from)).and(joined.map_err(CudaError::from))?;
        } else {
            done?;
        }

        // Every parameter at once, advancing the batch counter; then the running statistics.
        kernels::sgd_update(
            gpu, &mut self.params.as_view_mut(), &self.grads.as_view(), self.velocity.as_mut().map(|v| v.as_view_mut()).as_mut(),
            self.train.learning_rate as f32, self.train.momentum as f32, Some(&mut self.cursor.as_view_mut()),
        )?;
        if let Some(layout) = &self.stats_layout {
            let total = layout.total();
            kernels::running_stats_update(
                gpu, layout, b, &acts.mean.slice(..total), &acts.var.slice(..total),
                &mut self.running_mean.as_view_mut(), &mut self.running_var.as_view_mut(), &mut self.batches.as_view_mut(),
            )?;
        }
        Ok(())
    }

    /// Captures one step into a CUDA graph and launches it. While the stream captures,
    /// nothing it records runs, so when capture fails in any way the step is launched
    /// eagerly instead, and so is every later step (after a notice): the results are the
    /// same either way.
    fn capture_step(&mut self) -> Result<(), CudaError> {
        let stream = Arc::clone(self.gpu.stream());
        // A stale error an earlier drop left in the context is reported here, as an eager
        // launch would report it, rather than being taken for a capture failure.
        self.gpu.context().bind_to_thread()?;
        match self.record_step(&stream) {
            Ok(graph) => {
                // An error here is returned, not retried eagerly: the step may not run twice.
                graph.launch().map_err(graph_launch_error)?;
                self.graph = GraphState::Ready(StepGraph(graph, self.scratch_generation()));
                self.captures += 1;
                Ok(())
            }
            Err(why) => {
                // writeln, not eprintln: a closed stderr must not turn the notice into a panic.
                let _ = writeln!(std::io::stderr(), "notice: CUDA graph capture of the training step failed ({why}); launching its operations one by one instead");
                self.graph = GraphState::Off { fell_back: true };
                self.launch_step()
            }
        }
    }

    /// Records the step's launches into a graph and instantiates it; on failure, says why
    /// and leaves the stream out of capture mode with nothing queued.
    fn record_step(&mut self, stream: &Arc<CudaStream>) -> Result<CudaGraph, String> {
        // With event tracking, cudarc would record and wait on per-buffer events around every
        // launch: event nodes in the graph, and waits on events recorded before the capture,
        // which the capture rejects. `Gpu::open` turns it off; refuse rather than depend on it.
        if self.gpu.context().is_event_tracking() {
            return Err("cudarc's event tracking is on".into());
        }
        // Thread-local mode: a call that is illegal during capture (synchronization,
        // allocation) fails if this thread makes it, while other threads, with other streams
        // on the same primary context, are not restricted (a device-wide synchronization
        // from one of them still invalidates the capture, which then falls back).
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| format!("cuStreamBeginCapture: {}", describe_driver_error(e)))?;
        let launched = self.launch_step();
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let why = match (launched, ended) {
            (Ok(()), Ok(Some(graph))) => return Ok(graph),
            (Ok(()), Ok(None)) => "the capture recorded no work".to_string(),
            (Ok(()), Err(e)) => format!("cuStreamEndCapture or cuGraphInstantiate: {}", describe_driver_error(e)),
            (Err(e), _) => e.to_string().trim_end_matches("; use --device cpu").to_string(),
        };
        leave_capture(stream);
        Err(why)
    }

    /// How steps are launched now (never [`StepLaunch::Auto`]): fused, or as a graph unless
    /// eager launches were asked for or capture failed.
    pub fn step_launch(&self) -> StepLaunch {
        match self.graph {
            _ if self.fused.is_some() => StepLaunch::Fused,
            GraphState::Off { .. } => StepLaunch::Eager,
            GraphState::Stale | GraphState::Ready(_) => StepLaunch::Graph,
        }
    }

    /// What the fused kernel keeps in shared memory (None: steps are not fused).
    pub fn fused_staging(&self) -> Option<&kernels::FusedStaging> {
        self.fused.as_ref().map(FusedPlan::staging)
    }

    /// Whether this network's fused steps run alone on the kernel bounded by blocks of 512
    /// threads (`fused_train_steps_512_f32`).
    pub fn fused_512_kernel_in_use(&self) -> bool {
        self.fused.as_ref().is_some_and(|p| p.kernel_512() && p.cluster().is_none() && p.replicated().is_none() && !p.staging().any())
    }

    /// How many times the step has been captured into a graph (once, plus once per
    /// `set_epoch_order` that changed the order's length or reallocated it).
    pub fn graph_captures(&self) -> u32 {
        self.captures
    }

    /// Drops the captured step, so that the next step captures anew.
    fn invalidate_graph(&mut self) {
        if matches!(self.graph, GraphState::Ready(_)) {
            self.graph = GraphState::Stale;
        }
    }

    /// The bf16 scratch generations of the streams a step graph runs on: an evaluation with
    /// batch statistics over more rows than reserved grows the training stream's scratch,
    /// and frees the one a captured graph writes.
    fn scratch_generation(&self) -> u64 {
        let lane = self.backward.as_ref().map_or(0, |b| b.lane.bf16_operands_generation());
        self.gpu.bf16_operands_generation().wrapping_add(lane)
    }

    /// Sets the device batch counter (an asynchronous memset: no host synchronization).
    fn set_cursor(&mut self, batch: usize) -> Result<(), CudaError> {
        let value = u32::try_from(batch).map_err(|_| CudaError::Launch { kernel: "cuMemsetD32Async", message: format!("batch {batch} exceeds 2^32") })?;
        self.gpu.context().bind_to_thread()?;
        let stream = self.gpu.stream();
        let (ptr, _record) = self.cursor.device_ptr(stream);
        // SAFETY: `ptr` is the live 1-element u32 buffer `cursor`, written by one 32-bit
        // memset ordered on the stream every kernel that reads it runs on.
        unsafe { sys::cuMemsetD32Async(ptr, value, 1, stream.cu_stream()) }.result()?;
        self.cursor_batch = Some(batch);
        Ok(())
    }

    /// Gathers `rows` examples of `split` from `first` into the evaluation buffers and runs
    /// the forward pass and the loss kernel (accumulating into the evaluation accumulators),
    /// on the live state and the training stream, or with `at_point` on the point's copy of
    /// the state and its lane ([`PointState`]).
    #[allow(clippy::too_many_arguments)]
    fn infer_rows(
        &mut self, at_point: bool, split: SplitKind, first: usize, rows: usize, normalize: Normalize,
        probe_layer: Option<usize>, predicted: Option<&mut CudaSlice<u8>>,
    ) -> Result<(), CudaError> {
        let (data, images, labels) = match split {
            SplitKind::Train => (&self.data.train, &self.train_images, &self.train_labels),
            SplitKind::Test => (&self.data.test, &self.test_images, &self.test_labels),
        };
        let (gpu, params, population) = if at_point {
            let point = &self.point;
            (point.gpu(&self.gpu), &point.params, (&point.running_mean, &point.running_var))
        } else {
            (&self.gpu, &self.params, (&self.running_mean, &self.running_var))
        };
        let acts = &mut self.eval;
        debug_assert!(rows <= acts.rows);
        let (features, count) = (data.features, data.count);
        if acts.gathered != Some((split, first, rows)) {
            // (Forgotten first: a failed launch leaves them undefined.)
            acts.gathered = None;
            kernels::gather_rows(
                gpu, &images.slice(..count * features), &labels.slice(..count), features, None, None, first, rows,
                &mut acts.x.slice_mut(..rows * features), &mut acts.labels.slice_mut(..rows),
            )?;
            acts.gathered = Some((split, first, rows));
        }
        let net = Net { gpu, gemm: self.gemm, model: &self.model, layers: &self.layers, params, population };
        net.forward(acts, rows, normalize, probe_layer)?;
        let hidden = self.model.hidden.len();
        let out = &self.layers[hidden];
        let classes = out.outputs;
        let bias = out.bias.clone().map(|b| params.slice(b));
        let mut predicted = predicted.map(|p| p.slice_mut(first..first + rows));
        kernels::softmax_xent(
            gpu, &acts.z[hidden].slice(..rows * classes), bias.as_ref(), &acts.labels.slice(..rows),
            rows, classes, 1.0, None, None, predicted.as_mut(),
            &mut self.eval_loss.as_view_mut(), &mut self.eval_correct.as_view_mut(),
        )
    }

    /// Queues the evaluation of the first `count` examples of `split` in chunks of `chunk`
    /// rows (≤ the evaluation buffers' rows): loss and accuracy into the evaluation
    /// accumulators, the probe's columns into `probe_columns`. Live state or the point's, as
    /// [`CudaBackend::infer_rows`].
    fn queue_evaluation(&mut self, at_point: bool, split: SplitKind, count: usize, chunk: usize, normalize: Normalize, probe: Option<Probe>) -> Result<(), CudaError> {
        self.reserve_probe_columns(probe.map_or(0, |p| count * p.neurons))?;
        {
            let stream = if at_point { self.point.gpu(&self.gpu) } else { &self.gpu }.stream();
            stream.memset_zeros(&mut self.eval_loss)?;
            stream.memset_zeros(&mut self.eval_correct)?;
        }
        let mut start = 0;
        while start < count {
            let rows = chunk.min(count - start);
            self.infer_rows(at_point, split, start, rows, normalize, probe.map(|p| p.layer), None)?;
            if let Some(p) = probe {
                let gpu = if at_point { self.point.gpu(&self.gpu) } else { &self.gpu };
                let width = self.model.hidden[p.layer];
                let mut dst = self.probe_columns.slice_mut(start * p.neurons..(start + rows) * p.neurons);
                pack_columns(gpu, &self.eval.y[p.layer], rows, width, p.neurons, &mut dst)?;
            }
            start += rows;
        }
        Ok(())
    }

    /// Evaluates `count` examples of `split` on the live state and waits for the results.
    fn evaluate_in_chunks(&mut self, split: SplitKind, count: usize, chunk: usize, normalize: Normalize, probe: Option<Probe>) -> Result<Evaluation> {
        self.queue_evaluation(false, split, count, chunk, normalize, probe)?;
        let probe_values = match probe {
            Some(p) => read(&self.gpu, &self.probe_columns.slice(..count * p.neurons))?,
            None => Vec::new(),
        };
        Ok(Evaluation {
            examples: count as u64,
            loss_sum: read(&self.gpu, &self.eval_loss)?[0],
            correct: read(&self.gpu, &self.eval_correct)?[0],
            probe: probe_values,
        })
    }

    /// Grows `probe_columns` to at least `len` values, on the training stream. A point's lane
    /// must be ordered after this (its `taken` event recorded later); the buffer's last
    /// reader, a point's copy to the host, is behind the training stream: every caller has
    /// called [`CudaBackend::after_point`].
    fn reserve_probe_columns(&mut self, len: usize) -> Result<(), CudaError> {
        if self.probe_columns.len() < len {
            self.probe_columns = zeros(&self.gpu, len)?;
        }
        Ok(())
    }

    /// A point's work on `lane` (after its `taken` event): the non-finite count and the
    /// test split's evaluation on the point's copies, and every result copied to pinned
    /// memory.
    fn queue_point(&mut self, lane: &Arc<CudaStream>, mode: StatsMode, probe: Option<Probe>, count: usize) -> Result<(), CudaError> {
        let point = &self.point;
        let statistics = self.stats_layout.is_some().then_some((&point.running_mean, &point.running_var));
        queue_non_finite_count(point.gpu(&self.gpu), &point.params, statistics, &mut self.non_finite)?;
        let (chunk, normalize) = match mode {
            StatsMode::Population => (self.eval.rows, Normalize::WithPopulationStats),
            StatsMode::Batch => (count.max(1), Normalize::WithBatchStats),
        };
        self.queue_evaluation(true, SplitKind::Test, count, chunk, normalize, probe)?;
        let point = &mut self.point;
        let host = &mut point.host;
        lane.memcpy_dtoh(&point.step_loss, &mut host.step_loss)?;
        lane.memcpy_dtoh(&point.step_correct, &mut host.step_correct)?;
        lane.memcpy_dtoh(&self.eval_loss, &mut host.eval_loss)?;
        lane.memcpy_dtoh(&self.eval_correct, &mut host.eval_correct)?;
        lane.memcpy_dtoh(&self.non_finite, &mut host.non_finite)?;
        if let (Some(p), Some(dst)) = (probe, host.probe.as_mut()) {
            // `dst` holds exactly count × neurons values (begin_point sized it so), which is
            // what cuMemcpyDtoHAsync copies.
            lane.memcpy_dtoh(&self.probe_columns.slice(..count * p.neurons), dst)?;
        }
        Ok(())
    }

    /// Checks a probe against the model.
    fn check_probe(&self, probe: Option<Probe>) -> Result<()> {
        Ok(Probe::check(probe, &self.model)?)
    }

    /// Orders the training stream's next work after the last point's (a no-op where none was
    /// queued): before it writes what a point reads (the state's copy, the evaluation
    /// buffers and accumulators, the non-finite count).
    fn after_point(&self) -> Result<(), CudaError> {
        if self.point.lane.is_some() {
            self.gpu.stream().wait(&self.point.done)?;
        }
        Ok(())
    }

    /// The point's results, once its copies have arrived.
    fn collect_point(&mut self, flight: PointInFlight) -> Result<PointResults> {
        // Every copy into the pinned results is queued before `done` (see `pinned`).
        self.point.done.synchronize().map_err(CudaError::from)?;
        let point = &self.point;
        let host = &point.host;
        let value = |e: cudarc::driver::DriverError| CudaError::from(e);
        let probe = match (flight.probe, &host.probe) {
            (Some(p), Some(values)) => values.as_slice().map_err(value)?[..flight.examples * p.neurons].to_vec(),
            _ => Vec::new(),
        };
        let stats = StepStats {
            steps: flight.steps,
            examples: flight.steps * self.train.batch_size as u64,
            loss_sum: host.step_loss.as_slice().map_err(value)?[0],
            correct: host.step_correct.as_slice().map_err(value)?[0],
        };
        let eval = Evaluation {
            examples: flight.examples as u64,
            loss_sum: host.eval_loss.as_slice().map_err(value)?[0],
            correct: host.eval_correct.as_slice().map_err(value)?[0],
            probe,
        };
        let non_finite = host.non_finite.as_slice().map_err(value)?[0];
        // Only a diverged run pays for reading the copied state back, to name the tensor.
        let non_finite = if non_finite == 0 {
            None
        } else {
            // (The batch counts are integers: never non-finite, so not copied at the point.)
            let counts = vec![0; self.batches.len()];
            self.read_model_params(point.gpu(&self.gpu), &point.params, &point.running_mean, &point.running_var, &counts)?.first_non_finite()
        };
        Ok(PointResults { stats, non_finite, eval })
    }

    /// The parameters and running statistics in `flat`, `mean` and `var` (this backend's
    /// layouts), read back on `gpu`'s stream, with `counts` as the batch counts.
    fn read_model_params(
        &self, gpu: &Gpu, flat: &CudaSlice<f32>, mean: &CudaSlice<f32>, var: &CudaSlice<f32>, counts: &[u64],
    ) -> Result<ModelParams, CudaError> {
        let flat = read(gpu, flat)?;
        let (rm, rv) = if self.stats_layout.is_some() { (read(gpu, mean)?, read(gpu, var)?) } else { (Vec::new(), Vec::new()) };
        Ok(self.model_params(&flat, &rm, &rv, counts))
    }

    /// The parameters and running statistics from their flat host copies.
    fn model_params(&self, flat: &[f32], rm: &[f32], rv: &[f32], counts: &[u64]) -> ModelParams {
        let total = self.bn_total();
        let bn_layers = self.stats_layout.as_ref().map_or(0, |s| s.layers());
        let estimators = self.train.estimators().len();
        let to_f64 = |r: &Range<usize>, v: &[f32]| v[r.clone()].iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(l, s)| LayerParams {
                inputs: s.inputs,
                outputs: s.outputs,
                weight: to_f64(&s.weight, flat),
                bias: s.bias.as_ref().map(|r| to_f64(r, flat)),
                batch_norm: s.bn.as_ref().map(|bn| BatchNormParams {
                    gamma: to_f64(&bn.gamma, flat),
                    beta: to_f64(&bn.beta, flat),
                    running: (0..estimators)
                        .map(|e| {
                            let r = e * total + bn.stats.start..e * total + bn.stats.end;
                            RunningStats { mean: to_f64(&r, rm), var: to_f64(&r, rv), batches: counts[e * bn_layers + l] }
                        })
                        .collect(),
                }),
            })
            .collect();
        ModelParams { layers }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Let queued work finish before the buffers and modules go away.
        for lane in [self.point.lane.as_ref(), self.backward.as_ref().map(|b| &b.lane)].into_iter().flatten() {
            let _ = lane.synchronize();
        }
        let _ = self.gpu.synchronize();
        // The graph's kernel nodes refer to the modules `gpu` owns, and `gpu`, the first
        // field, drops first: destroy the graph before the modules are unloaded.
        self.graph = GraphState::Stale;
    }
}

impl Backend for CudaBackend {
    /// The GPU's name and how steps are launched, e.g. `NVIDIA H100 80GB HBM3 (cuda graph,
    /// weight gradients on a second stream)`.
    fn device_name(&self) -> String {
        // Fused steps: on clusters, one barrier a step, staged, or on the grid kernel with its
        // block size.
        let fused = self.fused.as_ref().map(|plan| match plan.cluster() {
            Some(c) => format!("fused steps, clusters of {} blocks", c.blocks),
            None if plan.replicated().is_some() => format!("fused steps, one barrier a step, {} threads a block, {} blocks", plan.threads(), plan.grid()),
            None if plan.staging().any() => "fused steps, staged in shared memory".to_string(),
            None => {
                let mut name = String::from("fused steps");
                // The block size where it is not the default's, and the 64-register kernel
                // where blocks of 512 run on it. (A paired launch runs the pair kernel, whose
                // blocks have 256 threads.)
                let threads = plan.threads();
                let bounded_512 = threads == 512 && !plan.kernel_512();
                if !self.paired && (threads != CudaOptions::default().fused_threads || bounded_512) {
                    name += &format!(", {threads} threads a block");
                }
                if !self.paired && bounded_512 {
                    name += ", 64 registers a thread";
                }
                name
            }
        });
        let launch = match self.graph {
            _ if fused.is_some() => fused.as_deref().unwrap_or_default(),
            GraphState::Off { fell_back: false } => "eager launches",
            GraphState::Off { fell_back: true } => "eager launches: cuda graph capture failed",
            GraphState::Stale | GraphState::Ready(_) if self.fused_unavailable => "cuda graph: fused steps unavailable",
            GraphState::Stale | GraphState::Ready(_) => "cuda graph",
        };
        let launch = if self.paired { format!("{launch}, two networks a launch") } else { launch.to_string() };
        let mut extras = String::new();
        if self.gpu.gemm_tuning() {
            extras += ", GEMMs tuned";
        }
        if self.backward.is_some() && self.fused.is_none() {
            extras += ", weight gradients on a second stream";
        }
        if self.point.lane.is_some() {
            extras += ", evaluations on a stream of their own";
        }
        match self.gemm {
            GemmPrecision::F32 => format!("{} ({launch}{extras})", self.gpu.name()),
            rounded => format!("{} ({launch}, {} GEMMs{extras})", self.gpu.name(), rounded.label()),
        }
    }

    fn set_epoch_order(&mut self, order: &[u32]) -> Result<()> {
        let n = self.data.train.count as u32;
        if let Some(bad) = order.iter().find(|&&i| i >= n) {
            return Err(ConfigError::Invalid(format!("epoch order holds index {bad} but the training set has {n} examples")).into());
        }
        // The captured gather baked in the order's address and length.
        if order.len() > self.order.len() {
            self.invalidate_graph();
            self.order = zeros(&self.gpu, order.len())?;
        }
        if order.len() != self.order_len {
            self.invalidate_graph();
        }
        if !order.is_empty() {
            self.gpu.stream().memcpy_htod(order, &mut self.order.slice_mut(..order.len())).map_err(CudaError::from)?;
        }
        self.order_len = order.len();
        self.order_fingerprint = fingerprint(order);
        self.cursor_batch = None;
        Ok(())
    }

    fn train_step(&mut self, batch: usize) -> Result<()> {
        self.start_steps(batch, 1)?;
        if matches!(&self.graph, GraphState::Ready(graph) if graph.1 != self.scratch_generation()) {
            self.graph = GraphState::Stale;
        }
        match &self.graph {
            _ if self.fused.is_some() => self.launch_fused(1)?,
            GraphState::Ready(graph) => graph.0.launch().map_err(graph_launch_error)?,
            GraphState::Stale if self.warmed_up => self.capture_step()?,
            GraphState::Stale | GraphState::Off { .. } => {
                self.launch_step()?;
                self.warmed_up = true;
            }
        }
        self.finish_steps(batch, 1);
        Ok(())
    }

    fn train_steps(&mut self, first: usize, count: usize) -> Result<()> {
        self.mark(None, Mark::RunStart { steps: count })?;
        if self.fused.is_none() {
            for batch in first..first + count {
                self.train_step(batch)?;
            }
        } else {
            self.start_steps(first, count)?;
            let mut left = count;
            while left > 0 {
                let steps = left.min(kernels::FUSED_MAX_STEPS);
                self.launch_fused(steps)?;
                left -= steps;
            }
            self.finish_steps(first, count);
        }
        Ok(self.mark(None, Mark::RunEnd)?)
    }

    fn train_steps_with(&mut self, other: &mut dyn Backend, first: usize, count: usize) -> Result<bool> {
        let Some(other) = other.as_any_mut().and_then(|any| any.downcast_mut::<CudaBackend>()) else { return Ok(false) };
        if !self.pairs_with(other) {
            return Ok(false);
        }
        self.start_steps(first, count)?;
        other.start_steps(first, count)?;
        // One launch on this network's stream: it waits for the work queued on the other's
        // (its cursor, statistics), and the other's next work waits for it.
        let (mine, theirs) = (Arc::clone(self.gpu.stream()), Arc::clone(other.gpu.stream()));
        mine.join(&theirs).map_err(CudaError::from)?;
        // Both networks' timelines mark the run: its start on this stream, once it has waited
        // for both networks' work (a point of either); the other's end on its own stream,
        // once that has waited for the launch.
        other.mark(Some(&mine), Mark::RunStart { steps: count })?;
        self.mark(None, Mark::RunStart { steps: count })?;
        let hyper = self.fused_hyper();
        let (mut launched, mut together) = (Ok(()), true);
        let mut left = count;
        while left > 0 && launched.is_ok() {
            let steps = left.min(kernels::FUSED_MAX_STEPS);
            launched = self.launch_fused_pair(other, hyper, steps).map(|paired| together &= paired);
            left -= steps;
        }
        // Even after a failed launch: an earlier one may still use the other's buffers.
        theirs.join(&mine).map_err(CudaError::from)?;
        launched?;
        self.mark(None, Mark::RunEnd)?;
        other.mark(None, Mark::RunEnd)?;
        self.finish_steps(first, count);
        other.finish_steps(first, count);
        (self.paired, other.paired) = (together, together);
        Ok(true)
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn timeline(&mut self) -> Result<Option<Vec<TimelineSpan>>> {
        match &self.timeline {
            Some(timeline) => Ok(timeline.summarize()?),
            None => Ok(None),
        }
    }

    /// One launch of fused steps with `fused_trace` pointed at a record of its blocks'
    /// barriers (cuda/fused_step.cu), then the record summarized ([`phase_trace::summarize`]).
    fn phase_trace(&mut self, first: usize, steps: usize) -> Result<Option<Vec<PhaseTiming>>> {
        // (The cluster kernels record nothing: they have no grid barriers.)
        let Some(plan) = self.fused.as_ref().filter(|plan| plan.cluster().is_none()) else { return Ok(None) };
        let names = if plan.replicated().is_some() { phase_trace::replicated_phase_names() } else { phase_trace::phase_names(self.model.hidden.len()) };
        let steps = phase_trace::traceable_steps(names.len(), steps.min(kernels::FUSED_MAX_STEPS));
        let blocks = plan.grid() as usize;
        let record = zeros::<u64>(&self.gpu, blocks * phase_trace::TRACE_SLOTS * 4)?;
        // (No event tracking on this stream: the guard `device_ptr` returns records nothing.)
        let address = record.device_ptr(self.gpu.stream()).0;
        self.gpu.set_fused_trace(address)?;
        let trained = self.train_steps(first, steps);
        // Off again whatever happened: the next launches must not write to the record.
        let off = self.gpu.set_fused_trace(0);
        trained?;
        off?;
        let raw = read(&self.gpu, &record)?;
        let rows = phase_trace::summarize(&raw, blocks, steps, &names)
            .map_err(|why| CudaError::Launch { kernel: "fused_train_steps_f32", message: format!("its phase record does not add up: {why}") })?;
        Ok(Some(rows))
    }

    fn synchronize(&mut self) -> Result<()> {
        if let Some(lane) = &self.point.lane {
            lane.synchronize()?;
        }
        Ok(self.gpu.synchronize()?)
    }

    fn take_step_stats(&mut self) -> Result<StepStats> {
        let stream = self.gpu.stream().clone();
        let loss: Vec<f64> = read(&self.gpu, &self.step_loss)?;
        let correct: Vec<u64> = read(&self.gpu, &self.step_correct)?;
        stream.memset_zeros(&mut self.step_loss).map_err(CudaError::from)?;
        stream.memset_zeros(&mut self.step_correct).map_err(CudaError::from)?;
        let steps = std::mem::take(&mut self.pending_steps);
        Ok(StepStats { steps, examples: steps * self.train.batch_size as u64, loss_sum: loss[0], correct: correct[0] })
    }

    fn restore_step_stats(&mut self, stats: StepStats) -> Result<()> {
        let stream = self.gpu.stream().clone();
        stream.memcpy_htod(&[stats.loss_sum], &mut self.step_loss).map_err(CudaError::from)?;
        stream.memcpy_htod(&[stats.correct], &mut self.step_correct).map_err(CudaError::from)?;
        self.pending_steps = stats.steps;
        Ok(())
    }

    fn evaluate(&mut self, split: SplitKind, mode: StatsMode, probe: Option<Probe>) -> Result<Evaluation> {
        self.check_probe(probe)?;
        self.after_point()?;
        let count = self.split(split).0.count;
        // Batch statistics must cover the whole split, so that mode takes it in one chunk
        // (in buffers of that size, allocated for this call only).
        let (chunk, normalize) = match mode {
            StatsMode::Population => (self.eval.rows, Normalize::WithPopulationStats),
            StatsMode::Batch => (count.max(1), Normalize::WithBatchStats),
        };
        let saved = if chunk > self.eval.rows {
            let big = Activations::new(&self.gpu, &self.model, chunk, self.bn_total(), true)?;
            Some(std::mem::replace(&mut self.eval, big))
        } else {
            None
        };
        let result = self.evaluate_in_chunks(split, count, chunk, normalize, probe);
        if let Some(saved) = saved {
            self.eval = saved;
        }
        result
    }

    /// Queues the point: on the training stream, copies of the state and of the training
    /// sums (which restart); on the point's lane, after them, the non-finite count, the test
    /// split's evaluation on the copies and the results' copies to pinned memory. Where
    /// batch statistics need buffers larger than the evaluation's, it measures at once.
    fn begin_point(&mut self, mode: StatsMode, probe: Option<Probe>) -> Result<PendingPoint> {
        self.check_probe(probe)?;
        let count = self.data.test.count;
        if mode == StatsMode::Batch && count > self.eval.rows {
            self.mark(None, Mark::PointStart)?;
            let results = measure_point(self, mode, probe)?;
            self.mark(None, Mark::PointEnd)?;
            return Ok(PendingPoint::Measured(Box::new(results)));
        }
        // A point begun and never finished (its loop failed) is dropped.
        self.point.in_flight = None;
        self.after_point()?;
        let probed = probe.map_or(0, |p| count * p.neurons);
        self.reserve_probe_columns(probed)?;
        if probed > 0 && self.point.host.probe.as_ref().map_or(0, |h| h.len()) != probed {
            // The copy into the old buffer (of a point never finished) must be over before it
            // is freed; the new one is exactly the probe's size, which the copy fills.
            self.point.done.synchronize().map_err(CudaError::from)?;
            self.point.host.probe = Some(pinned(&self.gpu, probed)?);
        }
        let stream = self.gpu.stream().clone();
        self.mark(None, Mark::PointStart)?;
        {
            let point = &mut self.point;
            stream.memcpy_dtod(&self.params, &mut point.params).map_err(CudaError::from)?;
            if self.stats_layout.is_some() {
                stream.memcpy_dtod(&self.running_mean, &mut point.running_mean).map_err(CudaError::from)?;
                stream.memcpy_dtod(&self.running_var, &mut point.running_var).map_err(CudaError::from)?;
            }
            stream.memcpy_dtod(&self.step_loss, &mut point.step_loss).map_err(CudaError::from)?;
            stream.memcpy_dtod(&self.step_correct, &mut point.step_correct).map_err(CudaError::from)?;
            stream.memset_zeros(&mut self.step_loss).map_err(CudaError::from)?;
            stream.memset_zeros(&mut self.step_correct).map_err(CudaError::from)?;
            // The lane's work waits for all of the above (`probe_columns` grown included).
            point.taken.record(&stream).map_err(CudaError::from)?;
        }
        let lane = self.point.gpu(&self.gpu).stream().clone();
        lane.wait(&self.point.taken).map_err(CudaError::from)?;
        let queued = self.queue_point(&lane, mode, probe, count);
        // On every path: what the training stream and the host wait for.
        self.point.done.record(&lane).map_err(CudaError::from)?;
        queued?;
        self.mark(Some(&lane), Mark::PointEnd)?;
        let steps = std::mem::take(&mut self.pending_steps);
        self.point.in_flight = Some(PointInFlight { steps, examples: count, probe });
        Ok(PendingPoint::Queued)
    }

    fn finish_point(&mut self, pending: PendingPoint) -> Result<PointResults> {
        match pending {
            PendingPoint::Measured(results) => Ok(*results),
            PendingPoint::Queued => match self.point.in_flight.take() {
                Some(flight) => self.collect_point(flight),
                None => Err(no_point_queued(&self.device_name())),
            },
        }
    }


    fn predict_each(&mut self, split: SplitKind, count: usize, mode: StatsMode) -> Result<Vec<u8>> {
        let available = self.split(split).0.count;
        if count > available {
            return Err(ConfigError::Invalid(format!("asked for {count} predictions but the split has {available} examples")).into());
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        self.after_point()?;
        let normalize = match mode {
            StatsMode::Population => Normalize::WithPopulationStats,
            StatsMode::Batch => Normalize::WithBatchStats,
        };
        let mut predicted = zeros::<u8>(&self.gpu, count)?;
        // One example at a time: with batch statistics each is normalized by its own
        // mean and zero variance (x̂ = 0), exactly as the CPU does.
        for i in 0..count {
            self.infer_rows(false, split, i, 1, normalize, None, Some(&mut predicted))?;
        }
        let host = read(&self.gpu, &predicted.slice(..count))?;
        Ok(host)
    }

    fn first_non_finite(&mut self) -> Result<Option<(String, f64)>> {
        self.after_point()?;
        let statistics = self.stats_layout.is_some().then_some((&self.running_mean, &self.running_var));
        queue_non_finite_count(&self.gpu, &self.params, statistics, &mut self.non_finite)?;
        let count: Vec<u32> = read(&self.gpu, &self.non_finite)?;
        // Only a diverged run pays for reading everything back, to name the tensor.
        Ok(if count[0] == 0 { None } else { self.params()?.first_non_finite() })
    }

    fn params(&mut self) -> Result<ModelParams> {
        let counts = if self.stats_layout.is_some() { read(&self.gpu, &self.batches)? } else { Vec::new() };
        Ok(self.read_model_params(&self.gpu, &self.params, &self.running_mean, &self.running_var, &counts)?)
    }

    fn set_params(&mut self, params: &ModelParams) -> Result<()> {
        check_params_match(&self.model, &self.train, params)?;
        let mut flat = vec![0.0f32; self.flat_len];
        let total = self.bn_total();
        let bn_layers = self.stats_layout.as_ref().map_or(0, |s| s.layers());
        let estimators = self.train.estimators().len();
        let mut rm = vec![0.0f32; estimators * total];
        let mut rv = vec![0.0f32; estimators * total];
        let mut counts = vec![0u64; estimators * bn_layers];
        let put = |dst: &mut [f32], src: &[f64]| dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s as f32);
        for (l, (s, p)) in self.layers.iter().zip(&params.layers).enumerate() {
            put(&mut flat[s.weight.clone()], &p.weight);
            if let (Some(r), Some(b)) = (&s.bias, &p.bias) {
                put(&mut flat[r.clone()], b);
            }
            if let (Some(slots), Some(bn)) = (&s.bn, &p.batch_norm) {
                put(&mut flat[slots.gamma.clone()], &bn.gamma);
                put(&mut flat[slots.beta.clone()], &bn.beta);
                for (e, stats) in bn.running.iter().enumerate() {
                    let r = e * total + slots.stats.start..e * total + slots.stats.end;
                    put(&mut rm[r.clone()], &stats.mean);
                    put(&mut rv[r], &stats.var);
                    counts[e * bn_layers + l] = stats.batches;
                }
            }
        }
        let stream = self.gpu.stream().clone();
        stream.memcpy_htod(&flat, &mut self.params).map_err(CudaError::from)?;
        if self.stats_layout.is_some() {
            stream.memcpy_htod(&rm, &mut self.running_mean).map_err(CudaError::from)?;
            stream.memcpy_htod(&rv, &mut self.running_var).map_err(CudaError::from)?;
            stream.memcpy_htod(&counts, &mut self.batches).map_err(CudaError::from)?;
        }
        // Fresh parameters start with zero gradients, as on the CPU.
        stream.memset_zeros(&mut self.grads).map_err(CudaError::from)?;
        Ok(())
    }

    fn gradients(&mut self) -> Result<Vec<Vec<f64>>> {
        self.read_trainable(&self.grads)
    }

    fn velocity(&mut self) -> Result<Vec<Vec<f64>>> {
        match &self.velocity {
            Some(v) => self.read_trainable(v),
            None => Ok(Vec::new()),
        }
    }

    fn set_velocity(&mut self, velocity: &[Vec<f64>]) -> Result<()> {
        if self.velocity.is_none() {
            return Ok(());
        }
        let ranges = self.trainable_ranges();
        let shapes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        let given: Vec<usize> = velocity.iter().map(|v| v.len()).collect();
        if shapes != given {
            return Err(ConfigError::Mismatch(format!("momentum buffers have sizes {given:?}, the model needs {shapes:?}")).into());
        }
        let mut flat = vec![0.0f32; self.flat_len];
        for (r, v) in ranges.into_iter().zip(velocity) {
            flat[r].iter_mut().zip(v).for_each(|(d, &s)| *d = s as f32);
        }
        let stream = self.gpu.stream().clone();
        if let Some(buf) = &mut self.velocity {
            stream.memcpy_htod(&flat, buf).map_err(CudaError::from)?;
        }
        Ok(())
    }
}
