//! The CPU reference backend: the oracle of every GPU test and a usable trainer.
//!
//! It computes in `F` (f32 to train, f64 to check) with the operations of [`ops`], one per
//! CUDA kernel, so a failing GPU test points at one function here.

pub mod float;
pub mod ops;
pub mod sparse;

use crate::backend::{no_point_queued, Backend, Evaluation, GemmPrecision, PendingPoint, PointResults, Probe, SplitKind, StatsMode, StepStats};
use crate::data::{Dataset, Split};
use crate::model::{BatchNormParams, ConfigError, LayerParams, ModelConfig, ModelParams, RunningStats, TrainConfig};
use crate::Result;
pub use float::Float;
use sparse::{ColumnScratch, SparseImages};
use std::borrow::Cow;
use std::sync::Arc;

/// Rows per chunk when evaluating a whole split: bounds the workspace, keeps GEMMs large.
pub const EVAL_CHUNK: usize = 1000;

struct BatchNorm<F> {
    gamma: Vec<F>,
    beta: Vec<F>,
    /// (mean, var, batches folded in) per estimator; index 0 is used for inference.
    running: Vec<(Vec<F>, Vec<F>, u64)>,
    grad_gamma: Vec<F>,
    grad_beta: Vec<F>,
}

struct Layer<F> {
    inputs: usize,
    outputs: usize,
    weight: Vec<F>,
    bias: Option<Vec<F>>,
    batch_norm: Option<BatchNorm<F>>,
    grad_weight: Vec<F>,
    grad_bias: Option<Vec<F>>,
}

impl<F: Float> Layer<F> {
    /// A copy of what inference and the non-finite check read (parameters and every running
    /// statistic), without the gradients.
    fn inference_copy(&self) -> Self {
        Layer {
            inputs: self.inputs,
            outputs: self.outputs,
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            batch_norm: self.batch_norm.as_ref().map(|bn| BatchNorm {
                gamma: bn.gamma.clone(),
                beta: bn.beta.clone(),
                running: bn.running.clone(),
                grad_gamma: Vec::new(),
                grad_beta: Vec::new(),
            }),
            grad_weight: Vec::new(),
            grad_bias: None,
        }
    }
}

/// What one forward pass keeps for the backward pass, for `rows` examples.
struct Activations<F> {
    rows: usize,
    /// The network's input: [rows, inputs].
    x: Vec<F>,
    /// Per layer: the linear output z, the normalized x̂, the activation input y and output a
    /// ([rows, outputs] each; the output layer only uses z as logits), and BN's batch
    /// statistics ([outputs] each).
    z: Vec<Vec<F>>,
    x_hat: Vec<Vec<F>>,
    y: Vec<Vec<F>>,
    a: Vec<Vec<F>>,
    mean: Vec<Vec<F>>,
    var: Vec<Vec<F>>,
    inv_std: Vec<Vec<F>>,
}

impl<F: Float> Activations<F> {
    /// Buffers for `rows` examples; `x` only for a dense first layer (the sparse one reads
    /// the indexed images).
    fn new(config: &ModelConfig, rows: usize, dense_input: bool) -> Self {
        let widths = config.widths();
        let per_layer = |f: &dyn Fn(usize) -> usize| widths[1..].iter().map(|&w| vec![F::ZERO; f(w)]).collect();
        Activations {
            rows,
            x: if dense_input { vec![F::ZERO; rows * config.inputs] } else { Vec::new() },
            z: per_layer(&|w| rows * w),
            x_hat: per_layer(&|w| rows * w),
            y: per_layer(&|w| rows * w),
            a: per_layer(&|w| rows * w),
            mean: per_layer(&|w| w),
            var: per_layer(&|w| w),
            inv_std: per_layer(&|w| w),
        }
    }
}

/// How the first layer reads its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InputPath {
    /// Gather the batch as dense rows and multiply with the GEMM.
    Dense,
    /// Visit only the non-zero pixels ([`sparse`]).
    Sparse,
    /// Sparse when at most [`SPARSE_DENSITY_LIMIT`] of the training pixels are non-zero and
    /// the CPU has hardware FMA ([`sparse::fast_on_this_cpu`]).
    #[default]
    Auto,
}

/// Construction options of a [`CpuBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CpuOptions {
    pub input: InputPath,
    /// Operands of every GEMM rounded as the GPU's tensor cores read them: an emulation of
    /// `--precision tf32|bf16` for measuring its effect on accuracy (dense path only).
    pub gemm: GemmPrecision,
}

/// A GEMM operand as `gemm` reads it: borrowed unchanged in f32, else a rounded copy.
fn gemm_operand<F: Float>(gemm: GemmPrecision, values: &[F]) -> Cow<'_, [F]> {
    match gemm {
        GemmPrecision::F32 => Cow::Borrowed(values),
        rounded => Cow::Owned(values.iter().map(|&v| F::from_f64(rounded.round(v.to_f64() as f32) as f64)).collect()),
    }
}

/// The environment variable matrixmultiply reads once, at a process's first GEMM, for how
/// many threads its GEMMs use (default: the physical cores, at most 4).
pub const GEMM_THREADS_ENV: &str = "MATMUL_NUM_THREADS";

/// [`single_threaded_gemms_suit`] networks whose hidden layers are at most this wide.
pub const SINGLE_THREAD_GEMM_MAX_WIDTH: usize = 256;

/// Whether a CPU training run of a network with these hidden layers is faster with one GEMM
/// thread: where they are at most [`SINGLE_THREAD_GEMM_MAX_WIDTH`] wide, the steps' GEMMs are too small
/// to gain from a second thread, and the evaluation points' worker thread
/// ([`Backend::begin_point`]) takes the second core, where matrixmultiply's own threads
/// contend with it (docs/perf.md: `train --steps 10000` in 4.3–4.8 s with one GEMM thread,
/// 6.3–7.5 s with matrixmultiply's default, on 2 cores). Wider networks keep the default
/// (the wide step: 66 ms with two threads, 113 ms with one).
pub fn single_threaded_gemms_suit(hidden: &[usize]) -> bool {
    hidden.iter().all(|&w| w <= SINGLE_THREAD_GEMM_MAX_WIDTH)
}

/// Above this fraction of non-zero pixels the dense GEMM is as fast as visiting them one by
/// one (docs/perf.md: MNIST, 19% non-zero, 1.6–1.7× faster sparse; Fashion-MNIST, 49%, even).
pub const SPARSE_DENSITY_LIMIT: f64 = 0.4;

/// The first layer's sparse input: both splits indexed once (shared with evaluation points'
/// workers), and the backward scratch.
struct SparseInput {
    train: Arc<SparseImages>,
    test: Arc<SparseImages>,
    scratch: ColumnScratch,
}

/// The first layer's input for one forward pass.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// `Activations::x` holds the rows.
    Dense,
    /// The rows are these images; the first layer's weight is input-major.
    Sparse { images: &'a SparseImages, indices: &'a [u32] },
}

/// `src` `[rows, cols]` → `[cols, rows]`.
fn transpose<T: Copy>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..cols * rows).map(|i| src[(i % rows) * cols + i / rows]).collect()
}

/// How BN normalizes during a forward pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Normalize {
    WithBatchStats,
    WithPopulationStats,
}

/// What inference over a split reads: the layers' parameters, the model, how GEMMs round,
/// the data and, where the first layer is sparse, both splits' indexed images.
struct Inference<'a, F: Float> {
    layers: &'a [Layer<F>],
    model: &'a ModelConfig,
    gemm: GemmPrecision,
    data: &'a Dataset,
    /// (train, test).
    sparse: Option<(&'a SparseImages, &'a SparseImages)>,
}

impl<F: Float> Inference<'_, F> {
    /// Runs inference over `split` in chunks, calling `visit(first_row, acts)`, in the
    /// buffers `scratch` holds where they have the chunk's size (else new ones, left there):
    /// a study's 1600 evaluations then allocate (and page in) their ~35 MB once.
    fn for_each_chunk(
        &self, split: SplitKind, count: usize, chunk: usize, normalize: Normalize, scratch: &mut Option<Activations<F>>,
        mut visit: impl FnMut(usize, &Activations<F>),
    ) {
        let (data, sparse) = match split {
            SplitKind::Train => (&self.data.train, self.sparse.map(|s| s.0)),
            SplitKind::Test => (&self.data.test, self.sparse.map(|s| s.1)),
        };
        let mut start = 0;
        while start < count {
            let rows = chunk.min(count - start);
            if scratch.as_ref().is_some_and(|acts| acts.rows != rows) {
                *scratch = None; // freed before the new ones are made
            }
            let acts = scratch.get_or_insert_with(|| Activations::new(self.model, rows, sparse.is_none()));
            let indices: Vec<u32> = (start as u32..(start + rows) as u32).collect();
            let input = match sparse {
                Some(images) => Input::Sparse { images, indices: &indices },
                None => {
                    ops::gather_batch(&data.images, data.features, &indices, &mut acts.x);
                    Input::Dense
                }
            };
            CpuBackend::forward(self.layers, self.model, self.gemm, input, acts, normalize);
            visit(start, acts);
            start += rows;
        }
    }

    /// Loss and accuracy over a whole split (see [`Backend::evaluate`]), in `scratch`'s
    /// buffers (see [`Inference::for_each_chunk`]); the probe is checked by the caller.
    fn evaluate(&self, split: SplitKind, mode: StatsMode, probe: Option<Probe>, scratch: &mut Option<Activations<F>>) -> Evaluation {
        let data = match split {
            SplitKind::Train => &self.data.train,
            SplitKind::Test => &self.data.test,
        };
        let (count, classes, hidden) = (data.count, self.model.classes, self.model.hidden.len());
        let labels = &data.labels;
        // Batch statistics must cover the whole split, so that mode takes it in one chunk.
        let (chunk, normalize) = match mode {
            StatsMode::Population => (EVAL_CHUNK, Normalize::WithPopulationStats),
            StatsMode::Batch => (count, Normalize::WithBatchStats),
        };
        let mut eval = Evaluation { examples: count as u64, ..Default::default() };
        let mut grad_logits = vec![F::ZERO; chunk.min(count) * classes];
        self.for_each_chunk(split, count, chunk, normalize, scratch, |start, acts| {
            let rows = acts.rows;
            let (loss, correct) = ops::softmax_cross_entropy(
                &acts.z[hidden], &labels[start..start + rows], classes, crate::model::LossReduction::Sum, &mut grad_logits[..rows * classes],
            );
            eval.loss_sum += loss;
            eval.correct += correct;
            if let Some(p) = probe {
                let width = self.model.hidden[p.layer];
                for row in acts.y[p.layer].chunks_exact(width) {
                    eval.probe.extend(row[..p.neurons].iter().map(|v| v.to_f64() as f32));
                }
            }
        });
        eval
    }
}

/// An evaluation point's own copy of what it reads, so that a worker thread can evaluate it
/// while the backend trains on.
struct PointSnapshot<F: Float> {
    layers: Vec<Layer<F>>,
    model: ModelConfig,
    gemm: GemmPrecision,
    data: Arc<Dataset>,
    sparse: Option<(Arc<SparseImages>, Arc<SparseImages>)>,
    /// The backend's evaluation buffers, lent for the point and handed back.
    scratch: Option<Activations<F>>,
}

impl<F: Float> PointSnapshot<F> {
    fn inference(&self) -> Inference<'_, F> {
        Inference {
            layers: &self.layers,
            model: &self.model,
            gemm: self.gemm,
            data: &self.data,
            sparse: self.sparse.as_ref().map(|(train, test)| (&**train, &**test)),
        }
    }

    /// The point's non-finite check and test-split evaluation, and the buffers lent.
    fn measure(mut self, mode: StatsMode, probe: Option<Probe>) -> PointMeasured<F> {
        let non_finite = model_params(&self.layers, self.sparse.is_some()).first_non_finite();
        let mut scratch = self.scratch.take();
        let eval = self.inference().evaluate(SplitKind::Test, mode, probe, &mut scratch);
        PointMeasured { non_finite, eval, scratch }
    }
}

/// What a point's worker hands back.
struct PointMeasured<F: Float> {
    non_finite: Option<(String, f64)>,
    eval: Evaluation,
    scratch: Option<Activations<F>>,
}

/// A point being measured on a worker thread ([`Backend::begin_point`]).
struct CpuPoint<F: Float> {
    stats: StepStats,
    worker: std::thread::JoinHandle<PointMeasured<F>>,
}

/// The parameters and running statistics of `layers` in the canonical layout (the first
/// layer's weight is stored input-major where `input_major`).
fn model_params<F: Float>(layers: &[Layer<F>], input_major: bool) -> ModelParams {
    let to_f64 = |v: &[F]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
    let layers = layers
        .iter()
        .enumerate()
        .map(|(l, layer)| LayerParams {
            inputs: layer.inputs,
            outputs: layer.outputs,
            weight: if l == 0 && input_major { transpose(&to_f64(&layer.weight), layer.inputs, layer.outputs) } else { to_f64(&layer.weight) },
            bias: layer.bias.as_deref().map(to_f64),
            batch_norm: layer.batch_norm.as_ref().map(|bn| BatchNormParams {
                gamma: to_f64(&bn.gamma),
                beta: to_f64(&bn.beta),
                running: bn.running.iter().map(|(m, v, n)| RunningStats { mean: to_f64(m), var: to_f64(v), batches: *n }).collect(),
            }),
        })
        .collect();
    ModelParams { layers }
}

/// The reference backend. `F` is the precision everything is computed and stored in.
pub struct CpuBackend<F: Float> {
    model: ModelConfig,
    train: TrainConfig,
    data: Arc<Dataset>,
    layers: Vec<Layer<F>>,
    /// Momentum buffers in trainable-tensor order; empty when momentum is 0.
    velocity: Vec<Vec<F>>,
    order: Vec<u32>,
    /// Some when the first layer visits only non-zero pixels; its weight, gradient and
    /// momentum are then stored input-major (`[in, out]`) and transposed at the boundary
    /// ([`Backend::params`], [`Backend::gradients`], ...).
    sparse: Option<SparseInput>,
    step_buffers: Activations<F>,
    /// Scratch for the backward pass: gradient w.r.t. the current layer's output a, and its
    /// y / z gradients ([B, widest layer]).
    grad_a: Vec<F>,
    grad_y: Vec<F>,
    grad_z: Vec<F>,
    pending: StepStats,
    gemm: GemmPrecision,
    /// The evaluation point begun and not yet finished.
    point: Option<CpuPoint<F>>,
    /// Evaluation buffers kept between evaluations (lent to a point's worker meanwhile).
    eval_scratch: Option<Activations<F>>,
}

impl<F: Float> CpuBackend<F> {
    /// A backend that trains `params` on `data`. The configuration is validated here.
    pub fn new(model: ModelConfig, train: TrainConfig, data: Arc<Dataset>, params: &ModelParams) -> Result<Self> {
        Self::with_options(model, train, data, params, CpuOptions::default())
    }

    /// [`CpuBackend::new`] with the first layer's input path and the GEMM precision chosen.
    pub fn with_options(
        model: ModelConfig, train: TrainConfig, data: Arc<Dataset>, params: &ModelParams, options: CpuOptions,
    ) -> Result<Self> {
        let path = match (options.input, options.gemm) {
            (input, GemmPrecision::F32) => input,
            (InputPath::Sparse, gemm) => {
                return Err(ConfigError::Invalid(format!(
                    "the CPU's sparse first layer reads its operands at full precision; {} GEMMs are emulated on the dense path only", gemm.label()
                ))
                .into())
            }
            _ => InputPath::Dense,
        };
        model.validate()?;
        train.validate(&model, data.train.count)?;
        train.validate_narrowed(&model, F::NAME, |value| F::from_f64(value).to_f64())?;
        if data.train.features != model.inputs || data.train.classes != model.classes {
            return Err(ConfigError::Invalid(format!(
                "the dataset has {} features and {} classes but the model expects {} and {}",
                data.train.features, data.train.classes, model.inputs, model.classes
            ))
            .into());
        }
        let widest = *model.widths().iter().max().unwrap_or(&1);
        let batch = train.batch_size;
        let sparse = {
            let index = |split: &Split| SparseImages::new(&split.images, split.features);
            let train_images = (path != InputPath::Dense).then(|| index(&data.train));
            match (path, train_images) {
                (InputPath::Sparse, Some(train)) => Some(train),
                (InputPath::Auto, Some(train)) if train.density() <= SPARSE_DENSITY_LIMIT && sparse::fast_on_this_cpu() => Some(train),
                _ => None,
            }
            .map(|train| SparseInput { train: Arc::new(train), test: Arc::new(index(&data.test)), scratch: ColumnScratch::default() })
        };
        let dense_input = sparse.is_none();
        let mut backend = CpuBackend {
            sparse,
            step_buffers: Activations::new(&model, batch, dense_input),
            grad_a: vec![F::ZERO; batch * widest],
            grad_y: vec![F::ZERO; batch * widest],
            grad_z: vec![F::ZERO; batch * widest],
            model,
            train,
            data,
            layers: Vec::new(),
            velocity: Vec::new(),
            order: Vec::new(),
            pending: StepStats::default(),
            gemm: options.gemm,
            point: None,
            eval_scratch: None,
        };
        backend.set_params(params)?;
        if backend.train.momentum > 0.0 {
            backend.velocity = backend.trainable().iter().map(|t| vec![F::ZERO; t.len()]).collect();
        }
        Ok(backend)
    }

    /// A weight (or its gradient or momentum) of layer `l` as stored → `[out, in]`.
    fn canonical_weight(&self, l: usize, stored: Vec<f64>) -> Vec<f64> {
        match (l, &self.sparse) {
            (0, Some(_)) => transpose(&stored, self.layers[0].inputs, self.layers[0].outputs),
            _ => stored,
        }
    }

    /// Whether the first layer visits only non-zero pixels (see [`InputPath`]).
    pub fn input_path(&self) -> InputPath {
        if self.sparse.is_some() { InputPath::Sparse } else { InputPath::Dense }
    }

    fn split(&self, split: SplitKind) -> &Split {
        match split {
            SplitKind::Train => &self.data.train,
            SplitKind::Test => &self.data.test,
        }
    }

    /// The trainable tensors in the canonical order (weight, bias, γ, β per layer).
    fn trainable(&self) -> Vec<&Vec<F>> {
        let mut out = Vec::new();
        for layer in &self.layers {
            out.push(&layer.weight);
            out.extend(layer.bias.as_ref());
            if let Some(bn) = &layer.batch_norm {
                out.push(&bn.gamma);
                out.push(&bn.beta);
            }
        }
        out
    }

    /// Forward pass over `input`, keeping what the backward pass needs.
    fn forward(layers: &[Layer<F>], model: &ModelConfig, gemm: GemmPrecision, input: Input<'_>, acts: &mut Activations<F>, normalize: Normalize) {
        let epsilon = F::from_f64(model.epsilon);
        let hidden = model.hidden.len();
        for (l, layer) in layers.iter().enumerate() {
            let (done, rest) = acts.a.split_at_mut(l);
            let z = &mut acts.z[l];
            match (l, input) {
                (0, Input::Sparse { images, indices }) => {
                    sparse::forward(images, indices, &layer.weight, layer.bias.as_deref(), layer.outputs, z)
                }
                _ => {
                    let rows: &[F] = if l == 0 { &acts.x } else { &done[l - 1] };
                    let (rows, weight) = (gemm_operand(gemm, rows), gemm_operand(gemm, &layer.weight));
                    ops::linear_forward(&rows, &weight, layer.bias.as_deref(), layer.inputs, layer.outputs, z)
                }
            }
            if l == hidden {
                break; // the output layer's z are the logits
            }
            let y = &mut acts.y[l];
            match (&layer.batch_norm, normalize) {
                (Some(bn), Normalize::WithBatchStats) => ops::batch_norm_forward_train(
                    z, &bn.gamma, &bn.beta, epsilon,
                    &mut acts.mean[l], &mut acts.var[l], &mut acts.inv_std[l], &mut acts.x_hat[l], y,
                ),
                (Some(bn), Normalize::WithPopulationStats) => {
                    let (mean, var, _) = &bn.running[0];
                    ops::batch_norm_forward_infer(z, &bn.gamma, &bn.beta, mean, var, epsilon, y)
                }
                (None, _) => y.copy_from_slice(z),
            }
            ops::activation_forward(model.activation, y, &mut rest[0]);
        }
    }

    /// What inference over a split reads, borrowed from this backend.
    fn inference(&self) -> Inference<'_, F> {
        Inference {
            layers: &self.layers,
            model: &self.model,
            gemm: self.gemm,
            data: &self.data,
            sparse: self.sparse.as_ref().map(|s| (&*s.train, &*s.test)),
        }
    }

    fn check_probe(&self, probe: Option<Probe>) -> Result<()> {
        Ok(Probe::check(probe, &self.model)?)
    }
}

impl<F: Float> Backend for CpuBackend<F> {
    fn device_name(&self) -> String {
        let input = if self.sparse.is_some() { ", sparse input" } else { "" };
        let gemm = match self.gemm {
            GemmPrecision::F32 => String::new(),
            rounded => format!(", {} GEMMs emulated", rounded.label()),
        };
        format!("cpu {}{input}{gemm}", F::NAME)
    }

    fn set_epoch_order(&mut self, order: &[u32]) -> Result<()> {
        let n = self.data.train.count as u32;
        if let Some(bad) = order.iter().find(|&&i| i >= n) {
            return Err(ConfigError::Invalid(format!("epoch order holds index {bad} but the training set has {n} examples")).into());
        }
        self.order = order.to_vec();
        Ok(())
    }

    fn train_step(&mut self, batch: usize) -> Result<()> {
        let b = self.train.batch_size;
        let range = batch * b..(batch + 1) * b;
        if range.end > self.order.len() {
            return Err(ConfigError::Invalid(format!("batch {batch} lies past the epoch order ({} indices)", self.order.len())).into());
        }
        let data = Arc::clone(&self.data);
        let indices = &self.order[range];
        let labels: Vec<u8> = indices.iter().map(|&i| data.train.labels[i as usize]).collect();
        let acts = &mut self.step_buffers;
        let input = match &self.sparse {
            Some(sparse) => Input::Sparse { images: &sparse.train, indices },
            None => {
                ops::gather_batch(&data.train.images, data.train.features, indices, &mut acts.x);
                Input::Dense
            }
        };
        Self::forward(&self.layers, &self.model, self.gemm, input, acts, Normalize::WithBatchStats);

        // Loss and the gradient of the logits.
        let hidden = self.model.hidden.len();
        let classes = self.model.classes;
        let grad_logits = &mut self.grad_z[..b * classes];
        let (loss, correct) = ops::softmax_cross_entropy(&acts.z[hidden], &labels, classes, self.train.loss, grad_logits);
        self.pending.steps += 1;
        self.pending.examples += b as u64;
        self.pending.loss_sum += loss;
        self.pending.correct += correct;

        // Backward, from the output layer down; grad_z holds dL/dz of layer l on entry.
        for l in (0..=hidden).rev() {
            let layer = &mut self.layers[l];
            let (inputs, outputs) = (layer.inputs, layer.outputs);
            let grad_z = &self.grad_z[..b * outputs];
            match (l, self.sparse.as_mut()) {
                (0, Some(sparse)) => {
                    sparse::weight_gradient(&sparse.train, indices, grad_z, outputs, &mut layer.grad_weight, &mut sparse.scratch);
                    if let Some(db) = layer.grad_bias.as_deref_mut() {
                        ops::bias_gradient(grad_z, db);
                    }
                }
                _ => {
                    let input: &[F] = if l == 0 { &acts.x } else { &acts.a[l - 1] };
                    let grad_input = (l > 0).then(|| &mut self.grad_a[..b * inputs]);
                    let gemm = self.gemm;
                    let (dz, x, w) = (gemm_operand(gemm, grad_z), gemm_operand(gemm, input), gemm_operand(gemm, &layer.weight));
                    // The bias gradient is no GEMM: it sums the unrounded dz.
                    ops::linear_backward(&dz, &x, &w, inputs, outputs, &mut layer.grad_weight, None, grad_input);
                    if let Some(db) = layer.grad_bias.as_deref_mut() {
                        ops::bias_gradient(grad_z, db);
                    }
                }
            }
            if l == 0 {
                break;
            }
            // Through the activation and BN of layer l−1 to its z.
            let below = &mut self.layers[l - 1];
            let n = b * below.outputs;
            ops::activation_backward(self.model.activation, &acts.a[l - 1], &self.grad_a[..n], &mut self.grad_y[..n]);
            match &mut below.batch_norm {
                Some(bn) => ops::batch_norm_backward(
                    &self.grad_y[..n], &acts.x_hat[l - 1], &bn.gamma, &acts.inv_std[l - 1],
                    &mut self.grad_z[..n], &mut bn.grad_gamma, &mut bn.grad_beta,
                ),
                None => self.grad_z[..n].copy_from_slice(&self.grad_y[..n]),
            }
        }

        // Parameter update, then running statistics from this step's batch statistics.
        let lr = F::from_f64(self.train.learning_rate);
        let momentum = F::from_f64(self.train.momentum);
        let mut velocity = self.velocity.iter_mut();
        let mut update = |w: &mut [F], g: &[F]| ops::sgd_update(w, g, velocity.next().map(|v| v.as_mut_slice()), lr, momentum);
        let estimators = self.train.estimators();
        for (l, layer) in self.layers.iter_mut().enumerate() {
            update(&mut layer.weight, &layer.grad_weight);
            if let (Some(bias), Some(grad)) = (&mut layer.bias, &layer.grad_bias) {
                update(bias, grad);
            }
            if let Some(bn) = &mut layer.batch_norm {
                update(&mut bn.gamma, &bn.grad_gamma);
                update(&mut bn.beta, &bn.grad_beta);
                for (estimator, (mean, var, batches)) in estimators.iter().zip(&mut bn.running) {
                    ops::update_running_stats(*estimator, b, *batches, mean, var, &acts.mean[l], &acts.var[l]);
                    *batches += 1;
                }
            }
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    fn take_step_stats(&mut self) -> Result<StepStats> {
        Ok(std::mem::take(&mut self.pending))
    }

    fn restore_step_stats(&mut self, stats: StepStats) -> Result<()> {
        self.pending = stats;
        Ok(())
    }

    fn evaluate(&mut self, split: SplitKind, mode: StatsMode, probe: Option<Probe>) -> Result<Evaluation> {
        self.check_probe(probe)?;
        let mut scratch = self.eval_scratch.take();
        let eval = self.inference().evaluate(split, mode, probe, &mut scratch);
        self.eval_scratch = scratch;
        Ok(eval)
    }

    /// Takes the training statistics, copies the parameters and running statistics, and
    /// hands the copy's non-finite check and test evaluation to a worker thread: the next
    /// steps train on this thread meanwhile (on a machine with a core to spare, the
    /// evaluation costs no time). The worker runs the same code on the same values as
    /// [`Backend::evaluate`]: the results are bitwise the same.
    fn begin_point(&mut self, mode: StatsMode, probe: Option<Probe>) -> Result<PendingPoint> {
        self.check_probe(probe)?;
        // A point begun and never finished (its loop failed) is dropped, once its worker
        // has handed the evaluation buffers back.
        if let Some(abandoned) = self.point.take() {
            if let Ok(measured) = abandoned.worker.join() {
                self.eval_scratch = measured.scratch;
            }
        }
        let snapshot = PointSnapshot {
            layers: self.layers.iter().map(Layer::inference_copy).collect(),
            model: self.model.clone(),
            gemm: self.gemm,
            data: Arc::clone(&self.data),
            sparse: self.sparse.as_ref().map(|s| (Arc::clone(&s.train), Arc::clone(&s.test))),
            scratch: self.eval_scratch.take(),
        };
        let worker = std::thread::Builder::new()
            .name("bntrain-eval".into())
            .spawn(move || snapshot.measure(mode, probe))
            .map_err(|e| crate::Error::io("starting an evaluation thread", e))?;
        self.point = Some(CpuPoint { stats: std::mem::take(&mut self.pending), worker });
        Ok(PendingPoint::Queued)
    }

    fn finish_point(&mut self, pending: PendingPoint) -> Result<PointResults> {
        let point = match pending {
            PendingPoint::Measured(results) => return Ok(*results),
            PendingPoint::Queued => self.point.take(),
        };
        let Some(CpuPoint { stats, worker }) = point else {
            return Err(no_point_queued(&self.device_name()));
        };
        let PointMeasured { non_finite, eval, scratch } = worker.join().map_err(|panic| {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            crate::Error::io("the evaluation thread", std::io::Error::other(format!("it panicked: {what}")))
        })?;
        self.eval_scratch = scratch;
        Ok(PointResults { stats, non_finite, eval })
    }

    fn predict_each(&mut self, split: SplitKind, count: usize, mode: StatsMode) -> Result<Vec<u8>> {
        let available = self.split(split).count;
        if count > available {
            return Err(ConfigError::Invalid(format!("asked for {count} predictions but the split has {available} examples")).into());
        }
        let normalize = match mode {
            StatsMode::Population => Normalize::WithPopulationStats,
            StatsMode::Batch => Normalize::WithBatchStats,
        };
        let hidden = self.model.hidden.len();
        let mut predictions = Vec::with_capacity(count);
        // One row's buffers of their own: the evaluation's stay as they are.
        self.inference().for_each_chunk(split, count, 1, normalize, &mut None, |_, acts| {
            predictions.push(ops::argmax(&acts.z[hidden]) as u8);
        });
        Ok(predictions)
    }

    fn params(&mut self) -> Result<ModelParams> {
        Ok(model_params(&self.layers, self.sparse.is_some()))
    }

    fn set_params(&mut self, params: &ModelParams) -> Result<()> {
        check_params_match(&self.model, &self.train, params)?;
        let from_f64 = |v: &[f64]| v.iter().map(|&x| F::from_f64(x)).collect::<Vec<F>>();
        let input_major = self.sparse.is_some();
        self.layers = params
            .layers
            .iter()
            .enumerate()
            .map(|(l, p)| Layer {
                inputs: p.inputs,
                outputs: p.outputs,
                weight: if l == 0 && input_major { transpose(&from_f64(&p.weight), p.outputs, p.inputs) } else { from_f64(&p.weight) },
                bias: p.bias.as_deref().map(from_f64),
                batch_norm: p.batch_norm.as_ref().map(|bn| BatchNorm {
                    gamma: from_f64(&bn.gamma),
                    beta: from_f64(&bn.beta),
                    running: bn.running.iter().map(|s| (from_f64(&s.mean), from_f64(&s.var), s.batches)).collect(),
                    grad_gamma: vec![F::ZERO; p.outputs],
                    grad_beta: vec![F::ZERO; p.outputs],
                }),
                grad_weight: vec![F::ZERO; p.weight.len()],
                grad_bias: p.bias.as_ref().map(|b| vec![F::ZERO; b.len()]),
            })
            .collect();
        Ok(())
    }

    fn gradients(&mut self) -> Result<Vec<Vec<f64>>> {
        let mut out = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            out.push(self.canonical_weight(l, layer.grad_weight.iter().map(|x| x.to_f64()).collect()));
            out.extend(layer.grad_bias.as_ref().map(|g| g.iter().map(|x| x.to_f64()).collect()));
            if let Some(bn) = &layer.batch_norm {
                out.push(bn.grad_gamma.iter().map(|x| x.to_f64()).collect());
                out.push(bn.grad_beta.iter().map(|x| x.to_f64()).collect());
            }
        }
        Ok(out)
    }

    fn velocity(&mut self) -> Result<Vec<Vec<f64>>> {
        // The first trainable tensor is the first layer's weight.
        Ok(self.velocity.iter().enumerate().map(|(t, v)| {
            let v = v.iter().map(|x| x.to_f64()).collect();
            if t == 0 { self.canonical_weight(0, v) } else { v }
        }).collect())
    }

    fn set_velocity(&mut self, velocity: &[Vec<f64>]) -> Result<()> {
        if self.train.momentum == 0.0 {
            return Ok(());
        }
        let shapes: Vec<usize> = self.trainable().iter().map(|t| t.len()).collect();
        let given: Vec<usize> = velocity.iter().map(|v| v.len()).collect();
        if shapes != given {
            return Err(ConfigError::Mismatch(format!("momentum buffers have sizes {given:?}, the model needs {shapes:?}")).into());
        }
        self.velocity = velocity.iter().map(|v| v.iter().map(|&x| F::from_f64(x)).collect()).collect();
        if self.sparse.is_some() {
            let first = &self.layers[0];
            self.velocity[0] = transpose(&self.velocity[0], first.outputs, first.inputs);
        }
        Ok(())
    }
}

/// Checks that `params` has the shapes and the number of estimators the configuration asks
/// for; shared by every backend's `set_params`.
pub fn check_params_match(model: &ModelConfig, train: &TrainConfig, params: &ModelParams) -> Result<(), ConfigError> {
    let widths = model.widths();
    let hidden = model.hidden.len();
    let mismatch = |m: String| Err(ConfigError::Mismatch(m));
    if params.layers.len() != widths.len() - 1 {
        return mismatch(format!("{} layers given, the model {} has {}", params.layers.len(), model, widths.len() - 1));
    }
    for (l, (p, pair)) in params.layers.iter().zip(widths.windows(2)).enumerate() {
        let n = l + 1;
        if (p.inputs, p.outputs) != (pair[0], pair[1]) || p.weight.len() != pair[0] * pair[1] {
            return mismatch(format!("layer {n} is {}→{}, the model needs {}→{}", p.inputs, p.outputs, pair[0], pair[1]));
        }
        let normalized = l < hidden && model.batch_norm;
        if normalized != p.batch_norm.is_some() || normalized == p.bias.is_some() {
            return mismatch(format!("layer {n}: batch normalization is {} in the parameters but {} in the model", if p.batch_norm.is_some() { "on" } else { "off" }, if normalized { "on" } else { "off" }));
        }
        if p.bias.as_ref().is_some_and(|b| b.len() != p.outputs) {
            return mismatch(format!("layer {n}: bias has the wrong length"));
        }
        if let Some(bn) = &p.batch_norm {
            let wanted = train.estimators().len();
            if bn.gamma.len() != p.outputs || bn.beta.len() != p.outputs {
                return mismatch(format!("layer {n}: γ/β have the wrong length"));
            }
            if bn.running.len() != wanted {
                return mismatch(format!("layer {n}: {} running-statistics slots, the configuration has {wanted} estimators", bn.running.len()));
            }
            if bn.running.iter().any(|s| s.mean.len() != p.outputs || s.var.len() != p.outputs) {
                return mismatch(format!("layer {n}: running statistics have the wrong length"));
            }
        }
    }
    Ok(())
}
