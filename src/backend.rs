//! The interface the training loop is generic over. A backend owns the dataset, the
//! parameters, the gradients, the optimizer state and every statistic, wherever it keeps them
//! (host memory for the CPU reference, device memory for CUDA); the loop only tells it which
//! examples to visit and asks for numbers at evaluation points.

use crate::model::ModelParams;
use crate::Result;

/// Which part of the dataset an operation reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitKind {
    Train,
    Test,
}

/// Which statistics BN normalizes with at prediction time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsMode {
    /// The running (population) estimates: inference as it should be.
    Population,
    /// The statistics of the batch being predicted, as in training mode. For
    /// [`Backend::evaluate`] the batch is the whole split (what the source's training curves
    /// measure); for [`Backend::predict_each`] it is one example, whose normalized values
    /// are all 0, so the network predicts one class for every input.
    Batch,
}

/// How a backend's GEMMs read their operands. Everything else (master weights, BN
/// statistics, activations, accumulation) stays in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum GemmPrecision {
    /// Full f32 operands.
    #[default]
    F32,
    /// Operands in TF32 (f32's 8-bit exponent, 10 mantissa bits): cuBLAS's
    /// `CUBLAS_COMPUTE_32F_FAST_TF32` on tensor cores. cuBLAS does not document how it
    /// rounds them (the hardware may truncate, PTX's conversion rounds ties away);
    /// [`GemmPrecision::round`] and the CPU emulation round to nearest even.
    Tf32,
    /// Operands in bfloat16 (8-bit exponent, 7 mantissa bits): `CUBLAS_COMPUTE_32F_FAST_16BF`.
    Bf16,
}

impl GemmPrecision {
    /// `x` as this precision holds it, rounded to nearest, ties to even. NaN and ±∞ pass
    /// through; a finite value may round to ±∞ at the top of the range, as in hardware.
    pub fn round(self, x: f32) -> f32 {
        match self {
            GemmPrecision::F32 => x,
            GemmPrecision::Bf16 => half::bf16::from_f32(x).to_f32(),
            GemmPrecision::Tf32 => {
                if !x.is_finite() {
                    return x;
                }
                // Keep the top 10 of 23 mantissa bits: add half of the dropped range (less
                // one unless the kept part is odd, so ties go to even), then clear it.
                let bits = x.to_bits();
                let odd = (bits >> 13) & 1;
                f32::from_bits(bits.wrapping_add(0x0fff + odd) & !0x1fff)
            }
        }
    }

    /// A short label for device names and reports: `f32`, `tf32`, `bf16`.
    pub fn label(self) -> &'static str {
        match self {
            GemmPrecision::F32 => "f32",
            GemmPrecision::Tf32 => "tf32",
            GemmPrecision::Bf16 => "bf16",
        }
    }
}

/// What the training steps since the last call produced, summed over examples.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepStats {
    pub steps: u64,
    pub examples: u64,
    /// Σ per-example cross-entropy, whatever the loss reduction.
    pub loss_sum: f64,
    pub correct: u64,
}

impl StepStats {
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.examples.max(1) as f64
    }
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }
}

/// Which pre-activation values to record during an evaluation (Figure 1(b,c)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    /// 0-based hidden layer.
    pub layer: usize,
    /// The first `neurons` units of that layer.
    pub neurons: usize,
}

impl Probe {
    /// Whether `probe` (if any) asks for units `model` has: every backend's check.
    pub fn check(probe: Option<Probe>, model: &crate::model::ModelConfig) -> Result<(), crate::model::ConfigError> {
        match probe {
            Some(p) if p.layer >= model.hidden.len() || p.neurons > model.hidden[p.layer] => Err(crate::model::ConfigError::Invalid(format!(
                "probe of {} units in hidden layer {} does not fit the model",
                p.neurons,
                p.layer + 1
            ))),
            _ => Ok(()),
        }
    }
}

/// Inference-mode results on a whole split.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    pub examples: u64,
    pub loss_sum: f64,
    pub correct: u64,
    /// `[examples, probe.neurons]` row-major: the activation's input of the probed units.
    pub probe: Vec<f32>,
}

impl Evaluation {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.examples.max(1) as f64
    }
}

/// What an evaluation point measures of one network, before the training loop judges it
/// ([`crate::train::judge_point`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PointResults {
    /// The training steps since the previous point ([`Backend::take_step_stats`]).
    pub stats: StepStats,
    /// The first non-finite parameter or running statistic ([`Backend::first_non_finite`]).
    pub non_finite: Option<(String, f64)>,
    /// The test split, evaluated as [`Backend::evaluate`] does.
    pub eval: Evaluation,
}

/// An evaluation point measured at once, through [`Backend::take_step_stats`],
/// [`Backend::first_non_finite`] and [`Backend::evaluate`] on the test split.
pub fn measure_point<B: Backend + ?Sized>(net: &mut B, mode: StatsMode, probe: Option<Probe>) -> Result<PointResults> {
    let stats = net.take_step_stats()?;
    let non_finite = net.first_non_finite()?;
    let eval = net.evaluate(SplitKind::Test, mode, probe)?;
    Ok(PointResults { stats, non_finite, eval })
}

/// An evaluation point begun by [`Backend::begin_point`], to be handed to the same backend's
/// [`Backend::finish_point`].
#[derive(Debug)]
pub enum PendingPoint {
    /// Measured already (the default, synchronous [`Backend::begin_point`]).
    Measured(Box<PointResults>),
    /// Queued (on the device, on a worker thread); the backend holds what it needs to
    /// finish it.
    Queued,
}

/// The error of a [`Backend::finish_point`] handed [`PendingPoint::Queued`] where the
/// backend `device` has no point queued (a caller's mistake, not the device's).
pub fn no_point_queued(device: &str) -> crate::Error {
    crate::model::ConfigError::Invalid(format!("{device}: no evaluation point was queued on this backend")).into()
}

/// One phase of a training step (the work between two grid barriers of the fused CUDA
/// kernel), timed by [`Backend::phase_trace`]; microseconds, medians over the traced steps.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PhaseTiming {
    pub phase: String,
    /// From the first block leaving the previous barrier to the last arriving at this one.
    pub wall_us: f64,
    /// One block's work in the phase: the median block, and the slowest.
    pub block_work_us: f64,
    pub block_work_max_us: f64,
    /// The block that was slowest in most steps.
    pub slowest_block: usize,
    /// From the last block arriving at the barrier to the last leaving it.
    pub barrier_us: f64,
}

/// One kind of interval of a training run's device timeline ([`Backend::timeline`]):
/// how many there were, their total and their median, in microseconds (for runs of steps,
/// the median is per step).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TimelineSpan {
    pub what: &'static str,
    pub count: usize,
    pub total_us: f64,
    pub median_us: f64,
}

/// A device that trains and evaluates one network. Object safe, so a loop can drive a BN and
/// a plain network side by side as `&mut dyn Backend`.
pub trait Backend {
    /// What runs the computation, for logs and reports (e.g. `cpu f32`, `NVIDIA H200`).
    fn device_name(&self) -> String;

    /// Sets the order of training examples for the coming epoch: a permutation of the training
    /// indices (or a prefix of one). Batch `b` of the epoch is `order[b·B .. (b+1)·B]`.
    fn set_epoch_order(&mut self, order: &[u32]) -> Result<()>;

    /// One SGD step on batch `batch` of the current epoch order: forward, loss, backward,
    /// parameter update and running-statistics update.
    fn train_step(&mut self, batch: usize) -> Result<()>;

    /// `count` steps on batches `first, first+1, …` of the current epoch order: the same as
    /// [`Backend::train_step`] on each in turn, which is what this default does. A backend
    /// that can run several steps in one go (the CUDA backend's fused kernel) overrides it.
    fn train_steps(&mut self, first: usize, count: usize) -> Result<()> {
        for batch in first..first + count {
            self.train_step(batch)?;
        }
        Ok(())
    }

    /// `count` steps from batch `first` of this network and of `other` together, where the
    /// backend can run both in one go (two fused CUDA networks in one launch): the same as
    /// `train_steps` on each, and Ok(true). Ok(false), having done nothing, where it cannot
    /// (the default). Both must hold the same epoch order.
    fn train_steps_with(&mut self, _other: &mut dyn Backend, _first: usize, _count: usize) -> Result<bool> {
        Ok(false)
    }

    /// This backend as `Any`, so that a backend's [`Backend::train_steps_with`] can recognize
    /// a partner of its own kind; None by default.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }

    /// Trains up to `steps` steps from batch `first` with their phases timed, where the
    /// backend runs whole steps in one kernel whose phases it can time (fused CUDA steps;
    /// fewer steps where the record is full), and returns a row per phase of a step. Ok(None),
    /// having trained nothing, elsewhere (the default).
    fn phase_trace(&mut self, _first: usize, _steps: usize) -> Result<Option<Vec<PhaseTiming>>> {
        Ok(None)
    }

    /// Where the device's time went between the runs of steps and the evaluation points
    /// queued so far, once they have finished (call [`Backend::synchronize`] first), where the
    /// backend was asked to record it (CUDA with `BNTRAIN_TIMELINE=1`); Ok(None) elsewhere.
    fn timeline(&mut self) -> Result<Option<Vec<TimelineSpan>>> {
        Ok(None)
    }

    /// Waits until all queued work has finished (a no-op on the CPU, whose steps run when
    /// called); benchmarks call it before reading the clock. An evaluation point is
    /// collected by [`Backend::finish_point`], not by this.
    fn synchronize(&mut self) -> Result<()>;

    /// Loss and accuracy of the training steps since the previous call (resets them).
    fn take_step_stats(&mut self) -> Result<StepStats>;

    /// Replaces those running sums: a run resumed between two evaluation points continues
    /// the sums it was interrupted in, so its next point equals the unbroken run's bit for bit
    /// (adding the two parts afterwards would round differently).
    fn restore_step_stats(&mut self, stats: StepStats) -> Result<()>;

    /// Loss and accuracy over a whole split, normalizing with population statistics or with
    /// the statistics of the whole split taken as one batch (running statistics untouched).
    fn evaluate(&mut self, split: SplitKind, mode: StatsMode, probe: Option<Probe>) -> Result<Evaluation>;

    /// Begins an evaluation point at the current step: takes the training statistics since
    /// the last point, looks for non-finite parameters and running statistics, and evaluates
    /// the test split with `mode` and `probe`, each as its own method does, on the state as
    /// it is now. A backend may queue this work and return at once, so that the next steps,
    /// queued before [`Backend::finish_point`] collects the results, run meanwhile; steps
    /// queued in between do not change what the point measures. The default does it all
    /// here. At most one point is pending per backend.
    fn begin_point(&mut self, mode: StatsMode, probe: Option<Probe>) -> Result<PendingPoint> {
        Ok(PendingPoint::Measured(Box::new(measure_point(self, mode, probe)?)))
    }

    /// The results of the point `pending` began, waiting for them where they were queued.
    fn finish_point(&mut self, pending: PendingPoint) -> Result<PointResults> {
        match pending {
            PendingPoint::Measured(results) => Ok(*results),
            PendingPoint::Queued => Err(no_point_queued(&self.device_name())),
        }
    }

    /// Predicts the first `count` examples of a split one at a time (batch of one), with
    /// population or per-example batch statistics. Returns the predicted classes.
    fn predict_each(&mut self, split: SplitKind, count: usize, mode: StatsMode) -> Result<Vec<u8>>;

    /// Copies every parameter and running statistic to the host.
    fn params(&mut self) -> Result<ModelParams>;

    /// The first NaN or ±∞ among the parameters and running statistics, as (tensor name,
    /// value); checked at every evaluation point. The default reads everything; a backend
    /// that can count on its device first reads one number instead.
    fn first_non_finite(&mut self) -> Result<Option<(String, f64)>> {
        Ok(self.params()?.first_non_finite())
    }

    /// Replaces every parameter and running statistic (shapes must match the model).
    fn set_params(&mut self, params: &ModelParams) -> Result<()>;

    /// Gradients of the last step, one tensor per trainable tensor in
    /// [`ModelParams::trainable_tensors`] order.
    fn gradients(&mut self) -> Result<Vec<Vec<f64>>>;

    /// Momentum buffers in the same order (empty when momentum is 0).
    fn velocity(&mut self) -> Result<Vec<Vec<f64>>>;

    /// Restores momentum buffers written by [`Backend::velocity`].
    fn set_velocity(&mut self, velocity: &[Vec<f64>]) -> Result<()>;
}
