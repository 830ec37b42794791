//! The CUDA backend as a whole against the CPU reference (CpuBackend<f64>) on synthetic
//! data: one training step (loss, every gradient, every parameter, running statistics,
//! momentum), 200 shuffled steps with evaluations every 50, inference (probes, batch and
//! population statistics, one-by-one prediction), bitwise determinism, and the step replayed
//! from a CUDA graph against eager launches (bitwise). Skips without a usable GPU (fails
//! instead with BNTRAIN_REQUIRE_GPU=1).
//!
//! Tolerances (f32 on the GPU against f64): a layer's z = x·wᵀ sums 784 products of
//! |x| ≤ 1, |w| ~ 1 in f32 (≈1e-6 relative); BN's backward dz = (γ·inv_std/B)(B·dy − dβ −
//! x̂·dγ) cancels, amplifying that by up to the ratio of its terms to its result, and
//! dW = dzᵀ·x sums again, so individual weight gradients near 0 carry errors of ~1e-5 of
//! the tensor's largest gradient: gradients are checked to 1e-4 × max|g| absolute and 1e-3
//! relative. Parameters are checked through their update w₁ − w₀ (lr·g, same tolerance)
//! plus one f32 ulp of w. Sigmoid units saturated to exactly 1.0 in f32 have σ' = 0 where
//! f64 keeps ~1e-8: absolute tolerances cover those.

mod gpu_support;
mod support;

use bntrain::backend::{measure_point, Backend, Evaluation, GemmPrecision, Probe, SplitKind, StatsMode, StepStats, TimelineSpan};
use bntrain::cpu::{CpuBackend, CpuOptions};
use bntrain::cuda::{self, ClusterRequest, CudaBackend, CudaOptions, StepLaunch, FUSED_AUTO_MAX_BATCH, FUSED_AUTO_MAX_WIDTH};
use bntrain::data::Dataset;
use bntrain::model::{
    Activation, Averaging, BatchOrder, LossReduction, ModelConfig, ModelParams, StatsEstimator, TrainConfig, VarianceKind,
};
use bntrain::tolerance::{assert_close, Tolerance};
use bntrain::train::{batches_per_epoch, epoch_order, Schedule};
use support::{points_measured_at_once, points_queued};
use gpu_support::*;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const GRADIENT: (f64, f64) = (1e-4, 1e-3);

/// The tests that open the GPU run one at a time. They share the process's primary context,
/// and a call that synchronizes the whole device from one thread (cublasDestroy does, when
/// a test drops its backend) while another thread captures a training step into a CUDA
/// graph invalidates that capture (the backend then falls back to eager launches, which the
/// graph tests would report as a failure) or fails itself.
static GPU_TESTS: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    // A failed test must not fail the others: the lock guards no data.
    GPU_TESTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lock of the GPU tests, held, where there is a usable GPU; None (after `gpu` printed
/// why) where there is none and the test returns.
fn serial_gpu() -> Option<MutexGuard<'static, ()>> {
    serial_gpu_where(|_| true)
}

/// [`serial_gpu`] where the GPU also `suits` the test (which prints why not). The GPU handle
/// is dropped here, under the lock: its cuBLAS handle's destruction synchronizes the device.
fn serial_gpu_where(suits: impl FnOnce(&cuda::Gpu) -> bool) -> Option<MutexGuard<'static, ()>> {
    let serial = serial();
    let gpu = gpu()?;
    suits(&gpu).then_some(serial)
}

fn dataset() -> Arc<Dataset> {
    Arc::new(synthetic_dataset(2000, 500, 784, 42))
}

/// The seed, plus variants covering relu, momentum, mean loss, odd widths and batch sizes,
/// several estimators, and the plain network.
fn configurations() -> Vec<(&'static str, ModelConfig, TrainConfig)> {
    let seed_model = ModelConfig::seed(true);
    let seed_train = TrainConfig::seed();
    let plain = ModelConfig::seed(false);
    let relu_bn = ModelConfig { hidden: vec![127, 1, 60], activation: Activation::Relu, ..ModelConfig::seed(true) };
    let relu_train = TrainConfig {
        momentum: 0.9,
        batch_size: 127,
        loss: LossReduction::Mean,
        extra_estimators: vec![
            StatsEstimator { averaging: Averaging::Cumulative, variance: VarianceKind::Unbiased },
            StatsEstimator { averaging: Averaging::Ema { decay: 0.9 }, variance: VarianceKind::Unbiased },
        ],
        ..TrainConfig::seed()
    };
    let plain_relu = ModelConfig { hidden: vec![100, 33], activation: Activation::Relu, ..ModelConfig::seed(false) };
    let plain_train = TrainConfig { momentum: 0.5, batch_size: 2, ..TrainConfig::seed() };
    // One hidden layer: the fused kernel's step ends right after that layer's backward.
    let one_hidden = ModelConfig { hidden: vec![64], ..ModelConfig::seed(true) };
    let one_hidden_train = TrainConfig { momentum: 0.9, batch_size: 33, ..TrainConfig::seed() };
    vec![
        ("seed BN", seed_model, seed_train.clone()),
        ("seed plain", plain, seed_train),
        ("relu BN, momentum, mean loss, 3 estimators", relu_bn, relu_train),
        ("plain relu, momentum, batch 2", plain_relu, plain_train),
        ("one hidden layer, momentum, batch 33", one_hidden, one_hidden_train),
    ]
}

/// Opens the backend under test: the GPU one, or (to check these comparisons themselves on
/// any machine) the CPU one in f32, whose distance from f64 is of the same kind.
type Maker = fn(&ModelConfig, &TrainConfig, &Arc<Dataset>, &ModelParams) -> Box<dyn Backend>;

/// The unfused CUDA backend (CUDA graphs of the per-kernel step), named so: the default
/// (`Auto`) would fuse these small networks, and the fused kernels have tests (and, in
/// gpu-check.sh, a process) of their own.
fn cuda_backend(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    Box::new(cuda_with(StepLaunch::Graph, model, train, data, params))
}

fn cpu_f32_backend(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    Box::new(CpuBackend::<f32>::new(model.clone(), train.clone(), Arc::clone(data), params).unwrap())
}

/// The backend under test and the f64 reference, from the same parameters.
fn backends(make: Maker, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> (Box<dyn Backend>, CpuBackend<f64>) {
    let reference = CpuBackend::<f64>::new(model.clone(), train.clone(), Arc::clone(data), params).unwrap();
    (make(model, train, data, params), reference)
}

/// Weights scaled by 1/√fan-in: sigmoids that are not saturated.
fn scaled_init(model: &ModelConfig, train: &TrainConfig) -> ModelParams {
    let mut params = ModelParams::init(model, train.seed, train.estimators().len());
    for layer in &mut params.layers {
        let s = 1.0 / (layer.inputs as f64).sqrt();
        layer.weight.iter_mut().for_each(|w| *w *= s);
    }
    params
}

fn gradient_tolerance(reference: &[f64]) -> Tolerance {
    scaled(reference, GRADIENT.0, GRADIENT.1)
}

#[test]
fn one_step_matches_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    check_one_step(cuda_backend);
}

/// The three comparisons with the CPU reference below, for a backend other than the unfused
/// CUDA one (which has a test for each).
fn check_all(make: Maker) {
    check_one_step(make);
    check_two_hundred_steps(make);
    check_inference(make);
}

fn check_one_step(make: Maker) {
    let data = dataset();
    for (name, model, train) in configurations() {
        let before = ModelParams::init(&model, train.seed, train.estimators().len());
        let (mut gpu, mut cpu) = backends(make, &model, &train, &data, &before);
        let order = epoch_order(BatchOrder::Shuffled, 7, 0, data.train.count);
        for net in [&mut *gpu, &mut cpu as &mut dyn Backend] {
            net.set_epoch_order(&order).unwrap();
            net.train_step(1).unwrap(); // not batch 0: the device cursor must be set
        }
        let (gs, cs) = (gpu.take_step_stats().unwrap(), cpu.take_step_stats().unwrap());
        assert_eq!((gs.steps, gs.examples), (cs.steps, cs.examples), "{name}: step counts");
        assert_close(&format!("{name}: loss"), [gs.loss_sum], [cs.loss_sum], Tolerance::new(1e-6, 1e-4));
        // A near tie between two logits could flip one prediction between f32 and f64.
        assert!(gs.correct.abs_diff(cs.correct) <= 1, "{name}: correct {} vs {}", gs.correct, cs.correct);

        let names: Vec<String> = before.trainable_tensors().into_iter().map(|(n, _)| n).collect();
        let (gg, cg) = (gpu.gradients().unwrap(), cpu.gradients().unwrap());
        assert_eq!(gg.len(), cg.len(), "{name}: gradient count");
        for ((g, c), tensor) in gg.iter().zip(&cg).zip(&names) {
            assert_close(&format!("{name}: grad {tensor}"), g.iter().copied(), c.iter().copied(), gradient_tolerance(c));
        }
        let (gv, cv) = (gpu.velocity().unwrap(), cpu.velocity().unwrap());
        assert_eq!(gv.len(), cv.len(), "{name}: velocity count");
        for ((g, c), tensor) in gv.iter().zip(&cv).zip(&names) {
            assert_close(&format!("{name}: velocity {tensor}"), g.iter().copied(), c.iter().copied(), gradient_tolerance(c));
        }

        let (gp, cp) = (gpu.params().unwrap(), cpu.params().unwrap());
        let (gt, ct, bt) = (gp.named_tensors(), cp.named_tensors(), before.named_tensors());
        assert_eq!(gt.len(), ct.len(), "{name}: tensor count");
        for (((tensor, g), (_, c)), (_, b)) in gt.iter().zip(&ct).zip(&bt) {
            let what = format!("{name}: {tensor} after one step");
            if tensor.contains("running") {
                // running ← keep·running + take·batch statistic: f32 products of values ≈|z|.
                assert_close(&what, g.iter().copied(), c.iter().copied(), scaled(c, 1e-5, 1e-5));
            } else {
                // Compare the updates (lr·g, or lr·v), plus one f32 ulp of the parameter.
                let dg: Vec<f64> = g.iter().zip(b.iter()).map(|(a, b)| a - b).collect();
                let dc: Vec<f64> = c.iter().zip(b.iter()).map(|(a, b)| a - b).collect();
                let ulp = 2.4e-7 * b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let tol = gradient_tolerance(&dc);
                assert_close(&what, dg, dc, Tolerance::new(tol.atol + ulp, tol.rtol));
            }
        }
        for (g, c) in gp.layers.iter().zip(&cp.layers) {
            if let (Some(g), Some(c)) = (&g.batch_norm, &c.batch_norm) {
                let counts = |bn: &bntrain::model::BatchNormParams| bn.running.iter().map(|s| s.batches).collect::<Vec<_>>();
                assert_eq!(counts(g), counts(c), "{name}: batch counts");
            }
        }
    }
}

/// Trains every net in lockstep on the same shuffled batches (as `train::train_lockstep`
/// does), evaluating on the test set every `every` steps. Returns, per net, the training
/// statistics and the evaluation at each point.
fn lockstep(nets: &mut [&mut dyn Backend], train: &TrainConfig, examples: usize, steps: u64, every: u64) -> Vec<Vec<(StepStats, Evaluation)>> {
    let per_epoch = batches_per_epoch(examples, train.batch_size);
    let mut points = vec![Vec::new(); nets.len()];
    let mut step = 0;
    while step < steps {
        let (epoch, batch) = (step / per_epoch, step % per_epoch);
        if batch == 0 {
            let order = epoch_order(BatchOrder::Shuffled, train.seed, epoch, examples);
            nets.iter_mut().for_each(|n| n.set_epoch_order(&order).unwrap());
        }
        // Runs of steps to the next evaluation or the epoch's end, as train_lockstep hands
        // them out (one launch per run for the fused kernel).
        let run = (per_epoch - batch).min(every - step % every).min(steps - step);
        nets.iter_mut().for_each(|n| n.train_steps(batch as usize, run as usize).unwrap());
        step += run;
        if step % every == 0 {
            for (net, out) in nets.iter_mut().zip(&mut points) {
                let stats = net.take_step_stats().unwrap();
                out.push((stats, net.evaluate(SplitKind::Test, StatsMode::Population, None).unwrap()));
            }
        }
    }
    points
}

#[test]
fn two_hundred_steps_track_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    check_two_hundred_steps(cuda_backend);
}

fn check_two_hundred_steps(make: Maker) {
    let data = dataset();
    let (train, bn, plain) = (TrainConfig::seed(), ModelConfig::seed(true), ModelConfig::seed(false));
    // The BN net from the seed's N(0,1) weights; the plain net from 1/√fan-in weights: from
    // N(0,1) its sigmoids saturate (a = 1.0 exactly in f32, σ' = 0, where f64 keeps ~1e-8),
    // and CpuBackend<f32> and <f64> then drift apart chaotically (20% apart in loss after
    // 200 steps), so no comparison of precisions can hold there.
    let runs = [
        ("seed BN", ModelParams::init(&bn, train.seed, 1), bn),
        ("plain, scaled init", scaled_init(&plain, &train), plain),
    ];
    for (name, params, model) in runs {
        let (mut gpu, mut cpu) = backends(make, &model, &train, &data, &params);
        let points = lockstep(&mut [&mut *gpu, &mut cpu], &train, data.train.count, 200, 50);
        assert_eq!(points[0].len(), 4);
        for (k, ((gs, ge), (cs, ce))) in points[0].iter().zip(&points[1]).enumerate() {
            let at = format!("{name}, step {}", 50 * (k + 1));
            // Measured with CpuBackend<f32> against <f64> on this data: losses within
            // ~1e-6 relative and identical accuracies at every point. Checked at 1e-3
            // relative (GPU reductions round differently from either CPU), and accuracies
            // within 1% (5 of 500 test examples, 6 of 600 training examples).
            let loss = Tolerance::new(1e-6, 1e-3);
            assert_close(&format!("{at}: train loss"), [gs.mean_loss()], [cs.mean_loss()], loss);
            assert_close(&format!("{at}: test loss"), [ge.mean_loss()], [ce.mean_loss()], loss);
            assert_close(&format!("{at}: train accuracy"), [gs.accuracy()], [cs.accuracy()], Tolerance::new(0.01, 0.0));
            assert_close(&format!("{at}: test accuracy"), [ge.accuracy()], [ce.accuracy()], Tolerance::new(0.01, 0.0));
            assert_eq!((ge.examples, gs.examples), (ce.examples, cs.examples));
        }
    }
}

#[test]
fn inference_matches_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    check_inference(cuda_backend);
    // Evaluation in chunks of 128 rows (500 test, 2000 training examples: several
    // chunks and a short last one), where the default chunk takes a split at once.
    check_inference(|model, train, data, params| {
        let options = CudaOptions { step_launch: StepLaunch::Graph, eval_chunk: 128, ..Default::default() };
        Box::new(CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap())
    });
}

fn check_inference(make: Maker) {
    let data = dataset();
    let (name, model, train) = configurations().remove(0);
    let params = ModelParams::init(&model, train.seed, 1);
    let (mut gpu, mut cpu) = backends(make, &model, &train, &data, &params);
    lockstep(&mut [&mut *gpu, &mut cpu], &train, data.train.count, 20, 20);
    let probe = Probe { layer: 1, neurons: 5 };
    for mode in [StatsMode::Population, StatsMode::Batch] {
        for split in [SplitKind::Test, SplitKind::Train] {
            let at = format!("{name}: evaluate {split:?} {mode:?}");
            let (g, c) = (gpu.evaluate(split, mode, Some(probe)).unwrap(), cpu.evaluate(split, mode, Some(probe)).unwrap());
            assert_eq!(g.examples, c.examples, "{at}");
            assert_close(&format!("{at}: loss"), [g.loss_sum], [c.loss_sum], Tolerance::new(1e-6, 1e-4));
            assert_close(&format!("{at}: accuracy"), [g.accuracy()], [c.accuracy()], Tolerance::new(0.01, 0.0));
            let reference: Vec<f64> = c.probe.iter().map(|&v| f64::from(v)).collect();
            assert_close(&format!("{at}: probe"), g.probe.iter().map(|&v| f64::from(v)), reference.clone(), scaled(&reference, 1e-5, 1e-4));
        }
    }
    // One by one: with population statistics nearly every prediction agrees; with batch
    // statistics every input normalizes to 0 and both predict the same single class.
    let (gp, cp) = (gpu.predict_each(SplitKind::Test, 100, StatsMode::Population).unwrap(), cpu.predict_each(SplitKind::Test, 100, StatsMode::Population).unwrap());
    let agree = gp.iter().zip(&cp).filter(|(a, b)| a == b).count();
    assert!(agree >= 98, "{name}: population one-by-one predictions agree on {agree}/100");
    let (gb, cb) = (gpu.predict_each(SplitKind::Test, 100, StatsMode::Batch).unwrap(), cpu.predict_each(SplitKind::Test, 100, StatsMode::Batch).unwrap());
    assert!(gb.iter().all(|&p| p == gb[0]), "{name}: batch-statistics predictions differ: {gb:?}");
    assert_eq!(gb, cb, "{name}: batch-statistics one-by-one predictions");
    assert!(gpu.predict_each(SplitKind::Test, 501, StatsMode::Population).is_err());
    assert_eq!(gpu.predict_each(SplitKind::Test, 0, StatsMode::Batch).unwrap(), Vec::<u8>::new());
    // The evaluation keeps its last gather of a split's rows: the same split again skips it;
    // after one-by-one predictions (which gathered their rows there) or the other split, it
    // gathers again. Every one of them must give what the CPU gives.
    let test = gpu.evaluate(SplitKind::Test, StatsMode::Batch, Some(probe)).unwrap();
    // The training split's 2000 rows take the split BN forward (in parts), the test split's
    // 500 the column kernel: a kept gather under each.
    let mut train = None;
    for (at, split) in [("again", SplitKind::Test), ("", SplitKind::Train), ("again", SplitKind::Train), ("after the training split", SplitKind::Test)] {
        let (g, c) = (gpu.evaluate(split, StatsMode::Batch, Some(probe)).unwrap(), cpu.evaluate(split, StatsMode::Batch, Some(probe)).unwrap());
        assert_close(&format!("{name}: evaluate {split:?} {at}: loss"), [g.loss_sum], [c.loss_sum], Tolerance::new(1e-6, 1e-4));
        let first = if split == SplitKind::Test { &test } else { train.get_or_insert_with(|| g.clone()) };
        assert_eq!(&g, first, "{name}: evaluate {split:?} {at}");
    }
    gpu.predict_each(SplitKind::Test, 7, StatsMode::Population).unwrap();
    assert_eq!(gpu.evaluate(SplitKind::Test, StatsMode::Batch, Some(probe)).unwrap(), test, "{name}: evaluate Test after one-by-one predictions");
}

#[test]
fn parameters_round_trip_and_runs_are_bitwise_deterministic() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    for (name, model, train) in configurations() {
        let params = ModelParams::init(&model, 3, train.estimators().len());
        let mut a = cuda_with(StepLaunch::Graph, &model, &train, &data, &params);
        // b starts from other parameters: only set_params makes it a's twin.
        let mut b = cuda_with(StepLaunch::Graph, &model, &train, &data, &ModelParams::init(&model, 4, train.estimators().len()));
        assert_ne!(b.params().unwrap(), a.params().unwrap(), "{name}: two seeds gave the same parameters");
        // f32 values survive the f64 round trip exactly; a fresh backend starts from them.
        let exported = a.params().unwrap();
        b.set_params(&exported).unwrap();
        assert_eq!(b.params().unwrap(), exported, "{name}: set_params/params round trip");
        let points = lockstep(&mut [&mut a, &mut b], &train, data.train.count, 100, 50);
        for (pa, pb) in points[0].iter().zip(&points[1]) {
            assert_eq!(pa.0.loss_sum.to_bits(), pb.0.loss_sum.to_bits(), "{name}: training loss bits");
            assert_eq!(pa.1, pb.1, "{name}: evaluations");
        }
        assert_eq!(a.params().unwrap(), b.params().unwrap(), "{name}: parameters after 100 steps");
        assert_eq!(a.gradients().unwrap(), b.gradients().unwrap(), "{name}: gradients after 100 steps");
        assert_eq!(a.velocity().unwrap(), b.velocity().unwrap(), "{name}: velocity after 100 steps");
        // Velocity round trip (empty without momentum), into a backend that has not trained
        // (its velocity zero).
        let v = a.velocity().unwrap();
        let mut fresh = cuda_with(StepLaunch::Graph, &model, &train, &data, &params);
        assert!(v.iter().all(|t| t.iter().all(|&x| x == 0.0)) || fresh.velocity().unwrap() != v, "{name}: a fresh velocity equals a trained one");
        fresh.set_velocity(&v).unwrap();
        assert_eq!(fresh.velocity().unwrap(), v, "{name}: set_velocity/velocity round trip");
    }
}

#[test]
fn bad_requests_are_errors() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let (_, model, train) = configurations().remove(0);
    let mut gpu = cuda_backend(&model, &train, &data, &ModelParams::init(&model, 0, 1));
    assert!(gpu.train_step(0).is_err(), "no epoch order yet");
    assert!(gpu.set_epoch_order(&[0, 1, 2000]).is_err(), "index past the training set");
    gpu.set_epoch_order(&(0..120).collect::<Vec<u32>>()).unwrap();
    gpu.train_step(1).unwrap();
    assert!(gpu.train_step(2).is_err(), "batch past the order");
    assert!(gpu.evaluate(SplitKind::Test, StatsMode::Population, Some(Probe { layer: 2, neurons: 1 })).is_err());
    assert!(gpu.evaluate(SplitKind::Test, StatsMode::Population, Some(Probe { layer: 0, neurons: 101 })).is_err());
    let wrong = ModelParams::init(&ModelConfig::seed(false), 0, 1);
    assert!(gpu.set_params(&wrong).is_err());
    let bad_data = Arc::new(synthetic_dataset(100, 10, 10, 1));
    let params = ModelParams::init(&model, 0, 1);
    assert!(CudaBackend::new(model, train, bad_data, &params).is_err(), "dataset width differs from the model's");
}

/// The divergence check's device count: None for finite parameters; a NaN weight or an
/// infinite running variance is found and named.
#[test]
fn non_finite_parameters_are_found_on_the_device() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let (_, model, train) = configurations().remove(0);
    let mut params = ModelParams::init(&model, 0, 1);
    let mut gpu = cuda_backend(&model, &train, &data, &params);
    assert_eq!(gpu.first_non_finite().unwrap(), None);
    params.layers[1].weight[7] = f64::NAN;
    gpu.set_params(&params).unwrap();
    let (name, value) = gpu.first_non_finite().unwrap().expect("a NaN weight");
    assert!(name == "layer2.weight" && value.is_nan(), "{name} {value}");
    params.layers[1].weight[7] = 0.5;
    params.layers[0].batch_norm.as_mut().unwrap().running[0].var[3] = f64::INFINITY;
    gpu.set_params(&params).unwrap();
    let (name, value) = gpu.first_non_finite().unwrap().expect("an infinite running variance");
    assert!(name.contains("running_var") && value == f64::INFINITY, "{name} {value}");
}

/// A backend that launches its steps as asked (the environment switch is not read, so
/// tests running in parallel cannot disturb each other).
fn cuda_with(step_launch: StepLaunch, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> CudaBackend {
    CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, CudaOptions { step_launch, ..Default::default() }).unwrap()
}

/// A backend the scripted runs below drive: the CUDA one, or (to check the scripts
/// themselves on any machine) the CPU one, which has no launch variants.
trait Scripted: Backend {
    fn open(launch: StepLaunch, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Self;
    /// How steps were launched and how often the step was captured (None on the CPU).
    fn launches(&self) -> Option<(StepLaunch, u32)>;
}

impl Scripted for CudaBackend {
    fn open(launch: StepLaunch, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Self {
        cuda_with(launch, model, train, data, params)
    }
    fn launches(&self) -> Option<(StepLaunch, u32)> {
        Some((self.step_launch(), self.graph_captures()))
    }
}

impl Scripted for CpuBackend<f32> {
    fn open(_: StepLaunch, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Self {
        CpuBackend::<f32>::new(model.clone(), train.clone(), Arc::clone(data), params).unwrap()
    }
    fn launches(&self) -> Option<(StepLaunch, u32)> {
        None
    }
}

/// One step of a scripted run: the epoch order to load before it (if any) and its batch.
struct Planned {
    order: Option<Vec<u32>>,
    batch: usize,
}

/// Batches per epoch in these scripts: whole epochs, but at most 40 batches, so that a few
/// hundred steps cross several epoch boundaries in every configuration (batch 2 included).
fn epoch_batches(order_len: usize, batch_size: usize) -> usize {
    (order_len / batch_size).min(40)
}

/// `steps` steps over shuffled epochs. With `awkward`: one batch skipped at step 60 (the
/// device counter is set outside the graph), the first epoch from step 120 on is half an
/// order (the captured length changes), the first from step 180 on is two orders long (the
/// order buffer is reallocated). Returns the plan and how many order loads after step 1
/// (when the graph is first captured) change the order's length.
fn plan(count: usize, batch_size: usize, seed: u64, steps: usize, awkward: bool) -> (Vec<Planned>, u32) {
    let mut out: Vec<Planned> = Vec::with_capacity(steps);
    let (mut epoch, mut batch, mut batches, mut len) = (0u64, 0usize, 0usize, 0usize);
    let (mut short_done, mut long_done, mut changes) = (false, false, 0);
    while out.len() < steps {
        let step = out.len();
        if awkward && step == 60 {
            batch += 1;
        }
        let order = if batch >= batches {
            let mut order = epoch_order(BatchOrder::Shuffled, seed, epoch, count);
            if awkward && step >= 120 && !short_done {
                order.truncate(count / 2);
                short_done = true;
            } else if awkward && step >= 180 && !long_done {
                order.extend(epoch_order(BatchOrder::Shuffled, seed, epoch + 1000, count));
                long_done = true;
            }
            epoch += 1;
            batch = 0;
            batches = epoch_batches(order.len(), batch_size);
            if step >= 2 && order.len() != len {
                changes += 1;
            }
            len = order.len();
            Some(order)
        } else {
            None
        };
        out.push(Planned { order, batch });
        batch += 1;
    }
    (out, changes)
}

fn stats_bits(s: StepStats) -> (u64, u64, u64, u64) {
    (s.steps, s.examples, s.loss_sum.to_bits(), s.correct)
}

fn tensor_bits(tensors: &[Vec<f64>]) -> Vec<Vec<u64>> {
    tensors.iter().map(|t| t.iter().map(|v| v.to_bits()).collect()).collect()
}

fn params_bits(p: &ModelParams) -> Vec<(String, Vec<u64>)> {
    p.named_tensors().into_iter().map(|(name, t)| (name, t.iter().map(|v| v.to_bits()).collect())).collect()
}

fn evaluation_bits(e: &Evaluation) -> (u64, u64, u64, Vec<u32>) {
    (e.examples, e.loss_sum.to_bits(), e.correct, e.probe.iter().map(|v| v.to_bits()).collect())
}

/// Everything a scripted run leaves behind, as bits.
#[derive(Debug, Default, PartialEq)]
struct Trace {
    stats: Vec<(u64, u64, u64, u64)>,
    evaluations: Vec<(u64, u64, u64, Vec<u32>)>,
    params: Vec<(String, Vec<u64>)>,
    batch_counts: Vec<u64>,
    gradients: Vec<Vec<u64>>,
    velocity: Vec<Vec<u64>>,
}

/// Runs `plan[range]` on `net`, taking the step statistics every 50 steps; at step 100 also
/// evaluates (population statistics with a probe, and whole-split batch statistics, which
/// allocates buffers of its own) and round-trips the parameters through the host.
fn run_plan(net: &mut dyn Backend, plan: &[Planned], range: std::ops::Range<usize>, trace: &mut Trace) {
    for step in range {
        if let Some(order) = &plan[step].order {
            net.set_epoch_order(order).unwrap();
        }
        net.train_step(plan[step].batch).unwrap();
        let done = step + 1;
        if done % 50 == 0 {
            trace.stats.push(stats_bits(net.take_step_stats().unwrap()));
        }
        if done == 100 {
            let probe = Some(Probe { layer: 0, neurons: 3 });
            trace.evaluations.push(evaluation_bits(&net.evaluate(SplitKind::Test, StatsMode::Population, probe).unwrap()));
            trace.evaluations.push(evaluation_bits(&net.evaluate(SplitKind::Train, StatsMode::Batch, None).unwrap()));
            let params = net.params().unwrap();
            net.set_params(&params).unwrap();
            assert_eq!(params_bits(&net.params().unwrap()), params_bits(&params), "params/set_params round trip");
        }
    }
}

/// The end state of a run.
fn finish(net: &mut dyn Backend, mut trace: Trace) -> Trace {
    trace.stats.push(stats_bits(net.take_step_stats().unwrap()));
    let params = net.params().unwrap();
    trace.params = params_bits(&params);
    trace.batch_counts = params.layers.iter().flat_map(|l| l.batch_norm.iter().flat_map(|bn| bn.running.iter().map(|s| s.batches))).collect();
    trace.gradients = tensor_bits(&net.gradients().unwrap());
    trace.velocity = tensor_bits(&net.velocity().unwrap());
    trace
}

#[test]
fn options_follow_the_step_switch() {
    let with = |step_launch| CudaOptions { step_launch, ..Default::default() };
    assert_eq!(CudaOptions::default(), with(StepLaunch::Auto));
    for (value, expected) in [
        (None, StepLaunch::Auto), (Some(""), StepLaunch::Auto), (Some("AUTO"), StepLaunch::Auto), (Some("graph"), StepLaunch::Graph),
        (Some(" Eager "), StepLaunch::Eager), (Some("fused"), StepLaunch::Fused),
    ] {
        assert_eq!(CudaOptions::from_step_env(value).unwrap(), with(expected), "{value:?}");
    }
    let err = CudaOptions::from_step_env(Some("0")).unwrap_err().to_string();
    assert!(err.contains("BNTRAIN_CUDA_STEP=0") && err.contains("auto, graph, eager or fused"), "{err}");
    // The defaults are the choices measured faster on an H100 (docs/perf.md).
    let defaults = CudaOptions::default();
    assert!(
        !defaults.fused_staging && defaults.fused_pairing && !defaults.gemm_tuning && !defaults.eval_stream && defaults.backward_streams.is_none() && !defaults.timeline,
        "pairing on; staging, tuning, the evaluation stream and the timeline off; the backward's stream by precision"
    );
    for (gemm, expected) in [(GemmPrecision::F32, true), (GemmPrecision::Tf32, false), (GemmPrecision::Bf16, false)] {
        let options = CudaOptions { gemm, ..CudaOptions::default() };
        assert_eq!(options.second_backward_stream(), expected, "{gemm:?}");
        for asked in [false, true] {
            assert_eq!(CudaOptions { backward_streams: Some(asked), ..options }.second_backward_stream(), asked, "{gemm:?}, asked {asked}");
        }
    }
    let switches = [CudaOptions::STAGE_ENV, CudaOptions::PAIR_ENV, CudaOptions::GEMM_TUNE_ENV, CudaOptions::EVAL_STREAM_ENV, CudaOptions::BACKWARD_STREAMS_ENV, CudaOptions::TIMELINE_ENV];
    for name in switches {
        // Unset or empty: the default stands (None).
        for (value, expected) in [(None, None), (Some(""), None), (Some("0"), Some(false)), (Some(" 1 "), Some(true))] {
            assert_eq!(CudaOptions::switch_from_env(name, value).unwrap(), expected, "{name}={value:?}");
        }
        let err = CudaOptions::switch_from_env(name, Some("yes")).unwrap_err().to_string();
        assert!(err.contains(&format!("{name}=yes")) && err.contains("0 or 1"), "{err}");
    }
    assert_eq!(defaults.fused_cluster, ClusterRequest::Off, "clusters are off until measured");
    for (value, expected) in [
        (None, None), (Some(""), None), (Some("0"), Some(ClusterRequest::Off)), (Some(" 1"), Some(ClusterRequest::Auto)),
        (Some("8"), Some(ClusterRequest::Blocks(8))), (Some("16"), Some(ClusterRequest::Blocks(16))),
    ] {
        assert_eq!(CudaOptions::cluster_from_env(value).unwrap(), expected, "{value:?}");
    }
    let err = CudaOptions::cluster_from_env(Some("4")).unwrap_err().to_string();
    assert!(err.contains("BNTRAIN_FUSED_CLUSTER=4") && err.contains("0, 1, 8 or 16"), "{err}");
    assert_eq!(defaults.fused_threads, 512, "512 threads a fused block, measured faster than 256 on an H100 and an H200");
    assert!(defaults.fused_512_kernel, "blocks of 512 on the kernel bounded by them");
    for (value, expected) in [(None, None), (Some(""), None), (Some("256"), Some(256)), (Some(" 512"), Some(512)), (Some("1024 "), Some(1024))] {
        assert_eq!(CudaOptions::threads_from_env(value).unwrap(), expected, "{value:?}");
    }
    for bad in ["128", "2048", "-1", "many"] {
        let err = CudaOptions::threads_from_env(Some(bad)).unwrap_err().to_string();
        assert!(err.contains(&format!("BNTRAIN_FUSED_THREADS={bad}")) && err.contains("256, 512 or 1024"), "{err}");
    }
    assert_eq!(defaults.fused_replicated, None, "the one-barrier kernel is off until measured");
    for (value, expected) in [
        (None, None), (Some(""), None), (Some("0"), Some(None)), (Some(" 1"), Some(Some(512))), (Some("256"), Some(Some(256))),
        (Some("512 "), Some(Some(512))),
    ] {
        assert_eq!(CudaOptions::replicated_from_env(value).unwrap(), expected, "{value:?}");
    }
    for bad in ["128", "1024", "yes"] {
        let err = CudaOptions::replicated_from_env(Some(bad)).unwrap_err().to_string();
        assert!(err.contains(&format!("BNTRAIN_FUSED_REPLICATED={bad}")) && err.contains("0, 1, 256 or 512"), "{err}");
    }
    assert_eq!(defaults.fused_replicated_grid, None, "no cap on the one-barrier kernel's grid until measured");
    for (value, expected) in [(None, None), (Some(""), None), (Some("0"), Some(None)), (Some(" 66"), Some(Some(66))), (Some("1 "), Some(Some(1)))] {
        assert_eq!(CudaOptions::replicated_grid_from_env(value).unwrap(), expected, "{value:?}");
    }
    for bad in ["-1", "half", "4294967296"] {
        let err = CudaOptions::replicated_grid_from_env(Some(bad)).unwrap_err().to_string();
        assert!(err.contains(&format!("BNTRAIN_FUSED_REPLICATED_GRID={bad}")) && err.contains("a count of blocks"), "{err}");
    }
}

/// Auto fuses the seed network in f32 and nothing wider, larger-batched, reduced-precision or
/// without hidden layers; the explicit choices stay as asked.
#[test]
fn auto_fuses_networks_of_the_seeds_scale_only() {
    use GemmPrecision::{Bf16, F32};
    let seed = ModelConfig::seed(true);
    let with_hidden = |hidden: Vec<usize>| ModelConfig { hidden, ..ModelConfig::seed(true) };
    assert_eq!(StepLaunch::Auto.resolve(&seed, 60, F32), StepLaunch::Fused);
    assert_eq!(StepLaunch::Auto.resolve(&with_hidden(vec![FUSED_AUTO_MAX_WIDTH, 7]), FUSED_AUTO_MAX_BATCH, F32), StepLaunch::Fused);
    assert_eq!(StepLaunch::Auto.resolve(&seed, FUSED_AUTO_MAX_BATCH + 1, F32), StepLaunch::Graph);
    assert_eq!(StepLaunch::Auto.resolve(&with_hidden(vec![100, FUSED_AUTO_MAX_WIDTH + 1]), 60, F32), StepLaunch::Graph);
    assert_eq!(StepLaunch::Auto.resolve(&with_hidden(vec![1024, 1024]), 1024, F32), StepLaunch::Graph);
    assert_eq!(StepLaunch::Auto.resolve(&with_hidden(vec![]), 60, F32), StepLaunch::Graph);
    assert_eq!(StepLaunch::Auto.resolve(&seed, 60, Bf16), StepLaunch::Graph);
    for chosen in [StepLaunch::Eager, StepLaunch::Graph, StepLaunch::Fused] {
        assert_eq!(chosen.resolve(&with_hidden(vec![1024, 1024]), 1024, Bf16), chosen);
    }
}

fn cuda_fused_backend(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    let net = cuda_with(StepLaunch::Fused, model, train, data, params);
    assert!(net.device_name().ends_with("(fused steps)"), "the fused kernel is not in use: {}", net.device_name());
    Box::new(net)
}

/// The fused kernel (cuda/fused_step.cu) against the CPU reference: one step (single-step
/// launches) of every configuration, 200 steps in runs of up to 50 (one launch per run) with
/// evaluations, and inference after training; the tolerances are those of the unfused path.
#[test]
fn fused_steps_match_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    check_all(cuda_fused_backend);
}

/// A backend with `options` whose device name ends with `expected` (the variant asked for
/// is the one in use).
fn cuda_fused_as(options: CudaOptions, expected: &str, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    let net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap();
    assert!(net.device_name().ends_with(expected), "not {expected}: {}", net.device_name());
    Box::new(net)
}

fn cuda_fused_threads(threads: u32, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    let options = CudaOptions { step_launch: StepLaunch::Fused, fused_threads: threads, ..Default::default() };
    cuda_fused_as(options, &format!("(fused steps, {threads} threads a block)"), model, train, data, params)
}

fn cuda_fused_256(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    cuda_fused_threads(256, model, train, data, params)
}

/// Blocks of 512 threads on the kernel bounded by blocks of 1024 (BNTRAIN_FUSED_512_KERNEL=0).
fn cuda_fused_512_bounded(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    let options = CudaOptions { step_launch: StepLaunch::Fused, fused_threads: 512, fused_512_kernel: false, ..Default::default() };
    cuda_fused_as(options, "(fused steps, 512 threads a block, 64 registers a thread)", model, train, data, params)
}

fn cuda_fused_1024(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    cuda_fused_threads(1024, model, train, data, params)
}

/// The fused kernel in blocks of 256 and 1024 threads (`BNTRAIN_FUSED_THREADS`; the default
/// 512 is checked above): other lane counts, groups and sums through shared memory than 512
/// threads take, against the CPU reference with the same tolerances; and blocks of 512 on the
/// kernel bounded by 1024 (`BNTRAIN_FUSED_512_KERNEL=0`).
#[test]
fn fused_steps_in_other_blocks_match_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    check_all(cuda_fused_256);
    check_all(cuda_fused_1024);
    check_all(cuda_fused_512_bounded);
}

/// The kernel bounded by blocks of 512 (the default's) and the one bounded by 1024 run the
/// same code with other register budgets: in blocks of 512, 13 steps of each end bit for bit
/// the same, in every configuration.
#[test]
fn fused_512_kernel_equals_the_64_register_kernel_bitwise() {
    let Some(_serial) = serial_gpu() else { return };
    with_configurations(7, |name, model, train, data, params, order, steps| {
        let open = |fused_512_kernel: bool| {
            let options = CudaOptions { step_launch: StepLaunch::Fused, fused_threads: 512, fused_512_kernel, ..Default::default() };
            CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap()
        };
        let (mut own, mut bounded) = (open(true), open(false));
        assert!(own.fused_512_kernel_in_use() && !bounded.fused_512_kernel_in_use(), "{name}: {} / {}", own.device_name(), bounded.device_name());
        for net in [&mut own, &mut bounded] {
            net.set_epoch_order(order).unwrap();
            net.train_steps(0, steps).unwrap();
        }
        assert_same_state(name, &mut own, &mut bounded);
    });
}

/// The one-barrier kernel in blocks of `threads`, on at most `max_grid` blocks; the name must
/// say so, with a grid within the cap.
fn cuda_replicated(
    threads: u32, max_grid: Option<u32>, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams,
) -> Box<dyn Backend> {
    let options = CudaOptions { step_launch: StepLaunch::Fused, fused_replicated: Some(threads), fused_replicated_grid: max_grid, ..Default::default() };
    let net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap();
    let name = net.device_name();
    let prefix = format!("(fused steps, one barrier a step, {threads} threads a block, ");
    let blocks = name.rsplit_once(&prefix).and_then(|(_, rest)| rest.strip_suffix(" blocks)")).and_then(|n| n.parse::<u32>().ok());
    let blocks = blocks.unwrap_or_else(|| panic!("not {prefix}N blocks): {name}"));
    assert!(max_grid.is_none_or(|cap| blocks <= cap), "{blocks} blocks, over the cap {max_grid:?}: {name}");
    Box::new(net)
}

fn cuda_replicated_512(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    cuda_replicated(512, None, model, train, data, params)
}

fn cuda_replicated_256(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    cuda_replicated(256, None, model, train, data, params)
}

/// At most 34 blocks (`BNTRAIN_FUSED_REPLICATED_GRID=34`): a 100-wide layer 0 gives blocks
/// three or two of its columns and of layer 1's weight rows, unevenly, as the study's networks
/// capped at 50 blocks own two. (Fewer blocks would keep more weight rows each than a block's
/// shared memory holds: on 3 blocks the seed's layout takes 386 976 bytes; the configurations'
/// largest on 34, the ReLU BN network's, 206 208, with the 16 640 static bytes within the
/// 232 448 a Hopper block may have.)
fn cuda_replicated_34_blocks(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    cuda_replicated(512, Some(34), model, train, data, params)
}

/// Whether the one-barrier kernel takes the seed network on this GPU (its layout, ~204 KB of
/// shared memory a block with the static part, fits Hopper's 227 KB, not an A100's 163 KB;
/// the seed's is the largest of `configurations`); says so on stderr if not, or fails with
/// `BNTRAIN_REQUIRE_REPLICATED=1` (gpu-check.sh, on an H100 or H200).
fn replicated_runs() -> bool {
    let (model, train) = (ModelConfig::seed(true), TrainConfig::seed());
    let params = scaled_init(&model, &train);
    let options = CudaOptions { step_launch: StepLaunch::Fused, fused_replicated: Some(512), ..Default::default() };
    let name = CudaBackend::with_options(model, train, dataset(), &params, options).unwrap().device_name();
    let runs = name.contains("one barrier a step");
    if !runs {
        let why = format!("the one-barrier kernel does not fit this GPU's shared memory: {name}");
        if std::env::var("BNTRAIN_REQUIRE_REPLICATED").as_deref() == Ok("1") {
            panic!("BNTRAIN_REQUIRE_REPLICATED=1 but {why}");
        }
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("skipped: {why}\n").as_bytes());
    }
    runs
}

/// The one-barrier kernel (cuda/fused_replicated.cuh, `BNTRAIN_FUSED_REPLICATED`): every
/// configuration here fits its layout where the seed's does (the backend's name says the
/// kernel is in use), and each is checked against the CPU reference as the grid kernel is,
/// in blocks of 512 and 256, and on at most 34 blocks.
#[test]
fn replicated_fused_steps_match_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    if !replicated_runs() {
        return;
    }
    check_all(cuda_replicated_512);
    check_all(cuda_replicated_256);
    check_all(cuda_replicated_34_blocks);
}

/// The one-barrier kernel's phase trace: five phases a step (its barrier, and its four marks),
/// and tracing changes nothing.
#[test]
fn replicated_phase_trace_has_five_phases_and_changes_nothing() {
    let Some(_serial) = serial_gpu() else { return };
    if !replicated_runs() {
        return;
    }
    let data = dataset();
    let (model, train) = (ModelConfig::seed(true), TrainConfig::seed());
    let params = scaled_init(&model, &train);
    let order = epoch_order(BatchOrder::Shuffled, 11, 0, data.train.count);
    let mut traced = cuda_replicated_512(&model, &train, &data, &params);
    let mut untraced = cuda_replicated_512(&model, &train, &data, &params);
    for net in [&mut traced, &mut untraced] {
        net.set_epoch_order(&order).unwrap();
    }
    let rows = traced.phase_trace(0, 5).unwrap().expect("fused steps are traced");
    untraced.train_steps(0, 5).unwrap();
    assert_same_state("traced", &mut *traced, &mut *untraced);
    assert_eq!(rows.len(), 5, "{rows:#?}");
    // A mark's phase may be shorter than a tick of the global timer (the walls' and barriers'
    // clock), and read 0 µs; the block work counts the SM clock's cycles.
    for row in &rows {
        let times = [row.wall_us, row.block_work_us, row.block_work_max_us, row.barrier_us];
        assert!(times.iter().all(|t| t.is_finite() && *t >= 0.0) && row.block_work_us > 0.0 && row.block_work_max_us >= row.block_work_us, "{row:?}");
    }
    assert!(rows.iter().map(|r| r.wall_us).sum::<f64>() > 0.0, "{rows:?}");
}

/// `bntrain bench --trace` as the CLI runs it, fused: its traced steps stay inside the
/// benchmark's epoch of twelve batches (15 traced steps past it failed the whole bench on
/// an H100), and it reports a row per phase of the seed step.
#[test]
fn bench_traces_the_fused_step_inside_its_epoch() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let mut open = |model: ModelConfig, train: TrainConfig, data: Arc<Dataset>, params: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
        let options = CudaOptions { step_launch: StepLaunch::Fused, ..Default::default() };
        Ok(Box::new(CudaBackend::with_options(model, train, data, params, options)?))
    };
    let nets = bntrain::bench::BenchNets::One { batch_norm: true };
    let report = bntrain::bench::run(bntrain::bench::BenchConfig::Seed, nets, bntrain::bench::BenchData::Real(&data), 2, 0.01, true, false, &mut open, &mut |_| {})
        .expect("bench --trace on fused steps");
    let phases = report.phases.expect("fused steps are traced");
    assert_eq!(phases.len(), bntrain::cuda::phase_trace::phase_names(2).len(), "{phases:?}");
    assert!(report.device.ends_with("(fused steps)"), "{}", report.device);
}

/// `bench --trace`'s phase timing: a row per phase of the seed step, every time positive
/// and finite, the slowest block one of the grid's; the traced steps train exactly as untraced
/// ones (bit for bit), and a backend whose steps are not fused declines, training nothing.
#[test]
fn fused_phase_trace_times_every_phase_and_changes_nothing() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let (model, train) = (ModelConfig::seed(true), TrainConfig::seed());
    let params = scaled_init(&model, &train);
    let order = epoch_order(BatchOrder::Shuffled, 11, 0, data.train.count);
    let mut traced = cuda_with(StepLaunch::Fused, &model, &train, &data, &params);
    let mut untraced = cuda_with(StepLaunch::Fused, &model, &train, &data, &params);
    for net in [&mut traced, &mut untraced] {
        net.set_epoch_order(&order).unwrap();
    }
    let steps = 5;
    let rows = traced.phase_trace(0, steps).unwrap().expect("fused steps are traced");
    untraced.train_steps(0, steps).unwrap();
    assert_same_state("traced", &mut traced, &mut untraced);
    assert_eq!(rows.len(), cuda::phase_trace::phase_names(model.hidden.len()).len(), "{rows:#?}");
    for row in &rows {
        let times = [row.wall_us, row.block_work_us, row.block_work_max_us, row.barrier_us];
        assert!(times.iter().all(|t| t.is_finite() && *t >= 0.0) && row.wall_us > 0.0 && row.block_work_max_us >= row.block_work_us, "{row:?}");
        assert!(row.slowest_block < 1024, "{row:?}");
    }
    let mut graph = cuda_with(StepLaunch::Graph, &model, &train, &data, &params);
    graph.set_epoch_order(&order).unwrap();
    assert!(graph.phase_trace(0, steps).unwrap().is_none());
    // The trace is off again: further fused steps still match.
    traced.train_steps(steps, 2).unwrap();
    untraced.train_steps(steps, 2).unwrap();
    assert_same_state("after the trace", &mut traced, &mut untraced);
}

/// A fused backend on the cluster kernels, of `blocks` blocks (0: as many as fit), which
/// every configuration within their limits (batch ≤ 64, ≤ 32 classes, ≤ 4 hidden layers) must
/// get on a GPU of compute capability 9.0 or newer.
fn cuda_cluster(blocks: u32, model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    let fused_cluster = if blocks == 0 { ClusterRequest::Auto } else { ClusterRequest::Blocks(blocks) };
    let options = CudaOptions { step_launch: StepLaunch::Fused, fused_cluster, ..Default::default() };
    let net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap();
    if train.batch_size <= 64 && model.classes <= 32 && model.hidden.len() <= 4 {
        let want = if blocks == 0 { "clusters of".to_string() } else { format!("clusters of {blocks} blocks") };
        assert!(net.device_name().contains(&want), "the cluster kernel is not in use: {}", net.device_name());
    }
    Box::new(net)
}

fn cuda_cluster_auto(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    cuda_cluster(0, model, train, data, params)
}

fn cuda_cluster_8(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    cuda_cluster(8, model, train, data, params)
}

/// Whether the GPU runs thread-block clusters (compute capability 9.0); says so on stderr if
/// not, or fails with `BNTRAIN_REQUIRE_CLUSTERS=1` (gpu-check.sh, on an H100 or H200).
fn clusters_run(gpu: &cuda::Gpu) -> bool {
    let runs = gpu.compute_capability() >= (9, 0);
    if !runs {
        let why = format!("thread-block clusters need compute capability 9.0, this GPU has {:?}", gpu.compute_capability());
        if std::env::var("BNTRAIN_REQUIRE_CLUSTERS").as_deref() == Ok("1") {
            panic!("BNTRAIN_REQUIRE_CLUSTERS=1 but {why}");
        }
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("skipped: {why}\n").as_bytes());
    }
    runs
}

/// The cluster kernels (cuda/fused_cluster.cu, BNTRAIN_FUSED_CLUSTER) against the CPU
/// reference, as the grid kernel is checked above, with the largest cluster that fits and
/// with clusters of 8 blocks.
#[test]
fn cluster_fused_steps_match_the_cpu_reference() {
    if let Some(_serial) = serial_gpu_where(clusters_run) {
        // A launch the driver refuses falls back to the grid kernel with a notice only: the
        // comparisons would then pass on the grid kernel.
        let refused = cuda::cluster_refusals();
        check_all(cuda_cluster_auto);
        check_one_step(cuda_cluster_8);
        assert_eq!(cuda::cluster_refusals(), refused, "a cluster launch was refused: the grid kernel ran instead");
    }
}

fn cuda_tuned_backend(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    let options = CudaOptions { step_launch: StepLaunch::Graph, gemm_tuning: true, ..Default::default() };
    let net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap();
    // (With f32 GEMMs the weight gradients' second stream, a default, may follow.)
    assert!(net.device_name().contains("(cuda graph, GEMMs tuned"), "{}", net.device_name());
    Box::new(net)
}

/// Steps as graphs with tuned GEMMs (BNTRAIN_GEMM_TUNE) against the CPU reference, as the
/// untuned ones are checked above: whichever algorithm won, with the same tolerances. The
/// ReLU configuration's layer-0 products (127×127×784) are above the tuning threshold,
/// forward and backward; they are tuned in its warm-up step and run in the captured graph.
#[test]
fn tuned_gemm_steps_match_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    check_all(cuda_tuned_backend);
    let tuned = cuda::gemm_tuning::tuned_gemms();
    assert!(tuned.iter().any(|t| t.shape.starts_with("127×127×784 ")), "no 127×127×784 product was tuned: {tuned:?}");
    for t in &tuned {
        assert!(t.chosen < t.us.len().max(1) && (t.us.is_empty() || t.us[t.chosen].is_finite()), "{t:?}");
    }
}

fn cuda_staged(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> CudaBackend {
    let options = CudaOptions { step_launch: StepLaunch::Fused, fused_staging: true, ..Default::default() };
    let net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap();
    assert!(net.fused_staging().is_some_and(|s| s.any()), "nothing is staged: {}", net.device_name());
    net
}

fn cuda_staged_backend(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    Box::new(cuda_staged(model, train, data, params))
}

/// The staged fused kernel (layer inputs and weight rows in shared memory) against the CPU
/// reference, as the unstaged one is checked above.
#[test]
fn staged_fused_steps_match_the_cpu_reference() {
    let Some(_serial) = serial_gpu() else { return };
    check_all(cuda_staged_backend);
}

/// Two backends that trained the same steps hold bit for bit the same step statistics,
/// parameters (running statistics included), gradients and momentum.
fn assert_same_state(name: &str, a: &mut dyn Backend, b: &mut dyn Backend) {
    assert_eq!(stats_bits(a.take_step_stats().unwrap()), stats_bits(b.take_step_stats().unwrap()), "{name}: step stats");
    assert_eq!(params_bits(&a.params().unwrap()), params_bits(&b.params().unwrap()), "{name}: parameters");
    assert_eq!(tensor_bits(&a.gradients().unwrap()), tensor_bits(&b.gradients().unwrap()), "{name}: gradients");
    assert_eq!(tensor_bits(&a.velocity().unwrap()), tensor_bits(&b.velocity().unwrap()), "{name}: momentum");
}

/// For the bitwise comparisons of fused launches below: calls `check` with each
/// configuration, its scaled initial parameters, an epoch order shuffled with `seed` and
/// the number of steps to run (13, or the epoch if shorter).
fn with_configurations(seed: u64, mut check: impl FnMut(&str, &ModelConfig, &TrainConfig, &Arc<Dataset>, &ModelParams, &[u32], usize)) {
    let data = dataset();
    for (name, model, train) in configurations() {
        let params = scaled_init(&model, &train);
        let order = epoch_order(BatchOrder::Shuffled, seed, 0, data.train.count);
        let steps = batches_per_epoch(data.train.count, train.batch_size).min(13) as usize;
        check(name, &model, &train, &data, &params, &order, steps);
    }
}

/// Staging changes where the kernel reads its operands, not what it adds up or in which
/// order: 13 steps staged equal 13 steps unstaged bit for bit, in every configuration.
#[test]
fn staged_fused_steps_equal_unstaged_bitwise() {
    let Some(_serial) = serial_gpu() else { return };
    with_configurations(5, |name, model, train, data, params, order, steps| {
        let mut staged = cuda_staged(model, train, data, params);
        // In the staged kernel's blocks of 256 (other block sizes add in another order).
        let options = CudaOptions { step_launch: StepLaunch::Fused, fused_threads: 256, ..Default::default() };
        let mut unstaged = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap();
        assert!(!unstaged.fused_staging().is_some_and(|s| s.any()), "{name}: staged without being asked");
        if name == "seed BN" {
            // On any GPU with ≥ 100 KB of shared memory a block, the seed network stages all.
            let staging = staged.fused_staging().unwrap();
            assert!(staging.weight_row.is_some() && staging.inputs.iter().all(Option::is_some), "{name}: {staging:?}");
        }
        for net in [&mut staged, &mut unstaged] {
            net.set_epoch_order(order).unwrap();
            net.train_steps(0, steps).unwrap();
        }
        assert_same_state(name, &mut staged, &mut unstaged);
    });
}

/// The options of fused steps with everything else at its default.
fn fused_options() -> CudaOptions {
    CudaOptions { step_launch: StepLaunch::Fused, ..Default::default() }
}

/// The BN and the plain network trained in one launch (BNTRAIN_FUSED_PAIR, through
/// `train_steps_with`, unstaged and staged) end bit for bit where each ends trained alone in
/// the pair kernel's blocks of 256.
#[test]
fn paired_fused_networks_equal_networks_trained_alone() {
    let Some(_serial) = serial_gpu() else { return };
    check_pairs(&[fused_options(), CudaOptions { fused_staging: true, ..fused_options() }]);
}

/// As above, for the cluster kernels: a cluster a network in one launch.
#[test]
fn paired_cluster_networks_equal_networks_trained_alone() {
    if let Some(_serial) = serial_gpu_where(clusters_run) {
        check_pairs(&[CudaOptions { fused_cluster: ClusterRequest::Auto, ..fused_options() }]);
    }
}

/// A cluster launch the driver refuses (simulated: `refuse_next_cluster_launch` fails the
/// launch before it runs, as the driver's refusals do) moves the network to the grid kernel,
/// alone and as a pair in one launch, and loses nothing: the steps equal those of twins on
/// the grid kernel from the start, bit for bit.
#[test]
fn a_refused_cluster_launch_falls_back_to_the_grid_kernel() {
    let Some(_serial) = serial_gpu_where(clusters_run) else { return };
    let data = dataset();
    let train = TrainConfig::seed();
    let order = epoch_order(BatchOrder::Shuffled, 9, 0, data.train.count);
    let steps = batches_per_epoch(data.train.count, train.batch_size).min(13) as usize;
    let open = |batch_norm: bool, fused_cluster: ClusterRequest, fused_pairing: bool| {
        let model = ModelConfig::seed(batch_norm);
        let params = scaled_init(&model, &train);
        // Alone in the pair kernel's blocks of 256 (other block sizes add in another order).
        let options = CudaOptions { step_launch: StepLaunch::Fused, fused_pairing, fused_cluster, fused_threads: 256, ..Default::default() };
        let mut net = CudaBackend::with_options(model, train.clone(), Arc::clone(&data), &params, options).unwrap();
        net.set_epoch_order(&order).unwrap();
        net
    };
    // One network.
    let (mut refused, mut grid) = (open(true, ClusterRequest::Auto, false), open(true, ClusterRequest::Off, false));
    assert!(refused.device_name().contains("clusters of"), "{}", refused.device_name());
    refused.refuse_next_cluster_launch();
    refused.train_steps(0, steps).unwrap();
    grid.train_steps(0, steps).unwrap();
    assert!(refused.device_name().ends_with("(fused steps, 256 threads a block)"), "{}", refused.device_name());
    assert_same_state("one network", &mut refused, &mut grid);
    // A pair in one launch: both leave the clusters, and train together on the grid kernel.
    let (mut bn, mut plain) = (open(true, ClusterRequest::Auto, true), open(false, ClusterRequest::Auto, true));
    bn.refuse_next_cluster_launch();
    assert!(bn.train_steps_with(&mut plain, 0, steps).unwrap());
    for net in [&bn, &plain] {
        assert!(net.device_name().ends_with("(fused steps, two networks a launch)"), "{}", net.device_name());
    }
    let (mut bn_grid, mut plain_grid) = (open(true, ClusterRequest::Off, false), open(false, ClusterRequest::Off, false));
    bn_grid.train_steps(0, steps).unwrap();
    plain_grid.train_steps(0, steps).unwrap();
    assert_same_state("pair, BN", &mut bn, &mut bn_grid);
    assert_same_state("pair, plain", &mut plain, &mut plain_grid);
}

/// The BN and the plain seed network, trained in one launch with each variant's options
/// (pairing aside), against each trained alone.
fn check_pairs(variants: &[CudaOptions]) {
    let data = dataset();
    let train = TrainConfig::seed();
    let order = epoch_order(BatchOrder::Shuffled, 9, 0, data.train.count);
    let steps = batches_per_epoch(data.train.count, train.batch_size).min(13) as usize;
    for &variant in variants {
        let (fused_staging, fused_cluster) = (variant.fused_staging, variant.fused_cluster);
        let open = |batch_norm: bool, fused_pairing: bool| {
            let model = ModelConfig::seed(batch_norm);
            let params = scaled_init(&model, &train);
            // Alone in the pair kernel's blocks of 256 (other block sizes add in another order).
            let options = CudaOptions { fused_pairing, fused_threads: 256, ..variant };
            let mut net = CudaBackend::with_options(model, train.clone(), Arc::clone(&data), &params, options).unwrap();
            net.set_epoch_order(&order).unwrap();
            net
        };
        let (mut bn, mut plain) = (open(true, true), open(false, true));
        let what = |net: &str| format!("staging {fused_staging}, {fused_cluster:?}, {net}");
        assert!(bn.train_steps_with(&mut plain, 0, steps).unwrap(), "{}: the pair did not train together", what("BN"));
        assert_eq!(bn.device_name().contains("clusters of"), fused_cluster != ClusterRequest::Off, "{}", bn.device_name());
        assert!(bn.device_name().ends_with("two networks a launch)") && plain.device_name().ends_with("two networks a launch)"), "{}", bn.device_name());
        // Without the switch, or with different orders, the pair declines and leaves both alone.
        let (mut bn_alone, mut plain_alone) = (open(true, false), open(false, false));
        assert!(!bn_alone.train_steps_with(&mut plain_alone, 0, steps).unwrap());
        assert!(!bn_alone.device_name().contains("two networks"), "{}", bn_alone.device_name());
        bn_alone.train_steps(0, steps).unwrap();
        plain_alone.train_steps(0, steps).unwrap();
        assert_same_state(&what("BN"), &mut bn, &mut bn_alone);
        assert_same_state(&what("plain"), &mut plain, &mut plain_alone);
        let mut other_order = open(false, true);
        other_order.set_epoch_order(&epoch_order(BatchOrder::Shuffled, 10, 0, data.train.count)).unwrap();
        assert!(!bn.train_steps_with(&mut other_order, 0, 1).unwrap(), "paired with a network on other batches");
    }
}

/// A run of steps in one launch equals the same steps launched one at a time, bit for bit
/// (the kernel defers each weight update to the next step's forward or the launch's end).
#[test]
fn fused_runs_equal_fused_single_steps_bitwise() {
    let Some(_serial) = serial_gpu() else { return };
    with_configurations(3, |name, model, train, data, params, order, steps| {
        let mut run = cuda_with(StepLaunch::Fused, model, train, data, params);
        let mut single = cuda_with(StepLaunch::Fused, model, train, data, params);
        run.set_epoch_order(order).unwrap();
        single.set_epoch_order(order).unwrap();
        run.train_steps(0, steps).unwrap();
        for batch in 0..steps {
            single.train_step(batch).unwrap();
        }
        assert_same_state(name, &mut run, &mut single);
    });
}

#[test]
fn graph_replay_matches_eager_launches_bitwise() {
    let Some(_serial) = serial_gpu() else { return };
    check_graph_vs_eager::<CudaBackend>();
}

/// 250 steps across epochs (with a skipped batch, a shorter and a longer order), an
/// evaluation and a parameter round trip: graph replay and eager launches leave bitwise the
/// same statistics, evaluations, parameters, running statistics, gradients and momentum.
fn check_graph_vs_eager<B: Scripted>() {
    let data = dataset();
    for (name, model, train) in configurations() {
        let params = ModelParams::init(&model, 11, train.estimators().len());
        let (steps, changes) = plan(data.train.count, train.batch_size, train.seed, 250, true);
        assert!(changes >= 2, "{name}: the plan changes the order's length {changes} times");
        let mut traces = Vec::new();
        for launch in [StepLaunch::Graph, StepLaunch::Eager] {
            let mut net = B::open(launch, &model, &train, &data, &params);
            let mut trace = Trace::default();
            run_plan(&mut net, &steps, 0..steps.len(), &mut trace);
            if let Some((launched, captures)) = net.launches() {
                // Without this the comparison could be eager against eager.
                assert_eq!(launched, launch, "{name}: the {launch:?} backend ended as {}", net.device_name());
                let expected = if launch == StepLaunch::Graph { 1 + changes } else { 0 };
                assert_eq!(captures, expected, "{name}: captures of the {launch:?} backend");
            }
            traces.push(finish(&mut net, trace));
        }
        assert_eq!(traces[0].stats.len(), 6, "{name}: statistics at 50, 100, …, 250 and at the end");
        assert_eq!(traces[0], traces[1], "{name}: graph replay vs eager launches");
    }
}

/// Weight gradients on a second stream (`CudaOptions::backward_streams`), captured into a
/// graph (fork and join edges) and launched eagerly, against one stream's eager launches:
/// bitwise the same run of `check_graph_vs_eager` (the same GEMMs on the same operands,
/// only their order in time differs), and the graph is captured, not fallen back from. The
/// eager run's lane sleeps 0.5 ms before each weight gradient, so that a missing wait on the
/// training stream would let it overwrite a dz the lane has yet to read. Also with tf32 and
/// bf16 GEMMs on the seed network.
#[test]
fn weight_gradients_on_a_second_stream_change_nothing() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let seed = configurations().into_iter().next().unwrap();
    let reduced = [GemmPrecision::Tf32, GemmPrecision::Bf16].map(|gemm| (seed.0, seed.1.clone(), seed.2.clone(), gemm));
    let all = configurations().into_iter().map(|(name, model, train)| (name, model, train, GemmPrecision::F32)).chain(reduced);
    for (name, model, train, gemm) in all {
        let name = format!("{name}, {}", gemm.label());
        let params = ModelParams::init(&model, 11, train.estimators().len());
        let (steps, changes) = plan(data.train.count, train.batch_size, train.seed, 250, true);
        let run = |step_launch, backward_streams| {
            let options = CudaOptions { step_launch, backward_streams: Some(backward_streams), gemm, ..Default::default() };
            let mut net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(&data), &params, options).unwrap();
            net.delay_backward_lane(500);
            let mut trace = Trace::default();
            run_plan(&mut net, &steps, 0..steps.len(), &mut trace);
            let launched = (net.step_launch(), net.graph_captures());
            let expected = if step_launch == StepLaunch::Graph { (StepLaunch::Graph, 1 + changes) } else { (StepLaunch::Eager, 0) };
            assert_eq!(launched, expected, "{name}: {step_launch:?} steps, second stream {backward_streams}: {}", net.device_name());
            assert_eq!(net.device_name().contains("weight gradients on a second stream"), backward_streams, "{}", net.device_name());
            finish(&mut net, trace)
        };
        let reference = run(StepLaunch::Eager, false);
        assert_eq!(run(StepLaunch::Eager, true), reference, "{name}: eager launches, weight gradients on a second stream");
        assert_eq!(run(StepLaunch::Graph, true), reference, "{name}: graph replay, weight gradients on a second stream");
    }
}

/// bf16 graph steps around an evaluation with batch statistics over more rows than the
/// evaluation chunk, which grows the bf16 scratch a captured step writes (and frees the old
/// one): the step is captured again before it replays, and the run is bitwise the eager one.
#[test]
fn a_step_graph_is_captured_again_when_the_bf16_scratch_grows() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let (name, model, train) = configurations().into_iter().next().unwrap();
    let params = ModelParams::init(&model, 11, train.estimators().len());
    let (steps, changes) = plan(data.train.count, train.batch_size, train.seed, 250, true);
    let run = |step_launch| {
        // run_plan's whole-split evaluation at step 100 covers 2000 rows, 20 chunks' worth.
        let options = CudaOptions { step_launch, gemm: GemmPrecision::Bf16, eval_chunk: 100, ..Default::default() };
        let mut net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(&data), &params, options).unwrap();
        let mut trace = Trace::default();
        run_plan(&mut net, &steps, 0..steps.len(), &mut trace);
        (net.step_launch(), net.graph_captures(), finish(&mut net, trace))
    };
    let (launch, captures, graph) = run(StepLaunch::Graph);
    // At step 2, at each change of the order's length, and once after the scratch grew.
    assert_eq!((launch, captures), (StepLaunch::Graph, 2 + changes), "{name}: graph launches and captures");
    let (launch, _, eager) = run(StepLaunch::Eager);
    assert_eq!(launch, StepLaunch::Eager);
    assert_eq!(graph, eager, "{name}: graph replay vs eager launches, bf16, the scratch grown at step 100");
}

#[test]
fn a_resumed_graph_run_matches_an_unbroken_eager_run_bitwise() {
    let Some(_serial) = serial_gpu() else { return };
    check_resume::<CudaBackend>();
}

/// A graph run interrupted after step 70 (between the statistics taken at 50 and 100) and
/// resumed on a fresh backend from what a checkpoint holds — parameters, running
/// statistics, momentum, the pending step statistics, the epoch order — ends bitwise where
/// an unbroken eager run does.
fn check_resume<B: Scripted>() {
    let data = dataset();
    let with_momentum = configurations().into_iter().filter(|(_, _, t)| t.momentum > 0.0).collect::<Vec<_>>();
    assert!(!with_momentum.is_empty());
    for (name, model, train) in with_momentum {
        let params = ModelParams::init(&model, 13, train.estimators().len());
        let (steps, _) = plan(data.train.count, train.batch_size, train.seed, 130, false);
        let mut unbroken = B::open(StepLaunch::Eager, &model, &train, &data, &params);
        let mut expected = Trace::default();
        run_plan(&mut unbroken, &steps, 0..steps.len(), &mut expected);
        let expected = finish(&mut unbroken, expected);

        let mut first = B::open(StepLaunch::Graph, &model, &train, &data, &params);
        let mut trace = Trace::default();
        run_plan(&mut first, &steps, 0..70, &mut trace);
        let (saved, velocity, pending) = (first.params().unwrap(), first.velocity().unwrap(), first.take_step_stats().unwrap());
        if let Some(launches) = first.launches() {
            assert_eq!(launches, (StepLaunch::Graph, 1), "{name}: first part");
        }
        drop(first);
        let mut resumed = B::open(StepLaunch::Graph, &model, &train, &data, &saved);
        resumed.set_velocity(&velocity).unwrap();
        resumed.restore_step_stats(pending).unwrap();
        // The epoch the interruption fell in: the order loaded last before step 70.
        let current = steps[..70].iter().rev().find_map(|p| p.order.as_ref()).unwrap();
        resumed.set_epoch_order(current).unwrap();
        run_plan(&mut resumed, &steps, 70..steps.len(), &mut trace);
        if let Some(launches) = resumed.launches() {
            assert_eq!(launches, (StepLaunch::Graph, 1), "{name}: resumed part");
        }
        let trace = finish(&mut resumed, trace);
        assert!(!trace.velocity.is_empty(), "{name}: momentum buffers");
        assert_eq!(trace, expected, "{name}: resumed graph run vs unbroken eager run");
    }
}

/// Runs on every machine: the two scripts above are valid runs (no batch past an order),
/// and on the CPU, which has one way to launch, they hold trivially — so a failure on the
/// GPU points at the graph, not at the script.
#[test]
fn the_graph_scripts_hold_for_cpu_f32() {
    check_graph_vs_eager::<CpuBackend<f32>>();
    check_resume::<CpuBackend<f32>>();
}

/// Runs on every machine: the comparisons above, with CpuBackend<f32> standing in for the
/// GPU, hold — so their tolerances are achievable by an f32 backend and a failure on the
/// GPU points at the GPU.
#[test]
fn the_comparisons_hold_for_cpu_f32() {
    // The reduced-precision check with the emulation on both sides: its tolerances pass
    // trivially here, so this part checks only that the emulation rounds (its step must
    // differ from f32's), not that the tolerances are achievable.
    check_reduced_precision(
        |model, train, data, params, gemm| {
            let options = CpuOptions { gemm, ..Default::default() };
            Box::new(CpuBackend::<f32>::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap())
        },
        true,
    );
    check_all(cpu_f32_backend);
}

/// `--precision tf32|bf16`: one step of the seed network with the GEMMs on tensor cores
/// against the CPU's emulation (the same operands rounded the same way, f32 elsewhere). The
/// two differ by accumulation order and, for TF32, where the hardware rounds an operand
/// differently from round-to-nearest-even (truncates, or rounds ties away), by one ulp of
/// that operand (2⁻¹⁰ relative): that sets TF32's tolerances, with BN's backward
/// cancellation amplifying them as for f32 above (×8 of the largest gradient, ×20 relative).
/// bf16's operands are rounded by cuda/bf16.cu bit for bit as on the host, so they differ
/// only where an activation or a gradient computed in a different order lands on the other
/// side of a rounding boundary (2⁻⁷ relative, for that element): ×4 of the largest gradient
/// and ×2 relative, which a gradient 5 % off at its largest element fails.
/// That the formats are used at all is tests/gpu_kernels.rs's
/// `reduced_precision_gemms_drop_the_low_operand_bits`, on a larger product: cuBLAS's fast
/// compute types allow tensor cores and may still pick an f32 kernel for a GEMM as small as
/// these, so the GPU step need not differ from f32's. Then five steps replayed from a CUDA
/// graph must equal five eager ones bit for bit, as in f32.
#[test]
fn reduced_precision_gemms_match_the_cpu_emulation() {
    let Some(_serial) = serial_gpu() else { return };
    check_reduced_precision(
        |model, train, data, params, gemm| {
            let options = CudaOptions { step_launch: StepLaunch::Eager, gemm, ..Default::default() };
            Box::new(CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(data), params, options).unwrap())
        },
        false,
    );
    let data = dataset();
    let (_, model, train) = configurations().remove(0);
    let params = scaled_init(&model, &train);
    let order = epoch_order(BatchOrder::Shuffled, 7, 0, data.train.count);
    for gemm in [GemmPrecision::Tf32, GemmPrecision::Bf16] {
        let run = |step_launch| {
            let options = CudaOptions { step_launch, gemm, ..Default::default() };
            let mut net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(&data), &params, options).unwrap();
            net.set_epoch_order(&order).unwrap();
            for batch in 0..5 {
                net.train_step(batch).unwrap();
            }
            (params_bits(&net.params().unwrap()), net.device_name())
        };
        let ((eager, _), (graph, name)) = (run(StepLaunch::Eager), run(StepLaunch::Graph));
        assert!(name.contains("cuda graph") && !name.contains("failed"), "{}: {name}", gemm.label());
        assert!(graph == eager, "{}: graph replay differs from eager launches", gemm.label());
    }
}

type PrecisionMaker = fn(&ModelConfig, &TrainConfig, &Arc<Dataset>, &ModelParams, GemmPrecision) -> Box<dyn Backend>;

fn check_reduced_precision(make: PrecisionMaker, must_differ_from_f32: bool) {
    let data = dataset();
    let (_, model, train) = configurations().remove(0);
    let params = scaled_init(&model, &train);
    let order = epoch_order(BatchOrder::Shuffled, 7, 0, data.train.count);
    let step = |net: &mut dyn Backend| {
        net.set_epoch_order(&order).unwrap();
        net.train_step(1).unwrap();
        (net.take_step_stats().unwrap(), net.gradients().unwrap())
    };
    let (_, f32_gradients) = step(&mut *make(&model, &train, &data, &params, GemmPrecision::F32));
    // (precision, its ulp, the loss's and the gradients' multiples of it: see above)
    for (gemm, ulp, loss_ulps, (abs_ulps, rel_ulps)) in [(GemmPrecision::Tf32, 2.0f64.powi(-10), 4.0, (8.0, 20.0)), (GemmPrecision::Bf16, 2.0f64.powi(-7), 2.0, (4.0, 2.0))] {
        let emulated = CpuOptions { gemm, ..Default::default() };
        let mut cpu = CpuBackend::<f32>::with_options(model.clone(), train.clone(), Arc::clone(&data), &params, emulated).unwrap();
        let (cs, cg) = step(&mut cpu);
        let (gs, gg) = step(&mut *make(&model, &train, &data, &params, gemm));
        let label = gemm.label();
        assert_close(&format!("{label}: loss"), [gs.loss_sum], [cs.loss_sum], Tolerance::new(1e-6, loss_ulps * ulp));
        for (t, (g, c)) in gg.iter().zip(&cg).enumerate() {
            assert_close(&format!("{label}: gradient of tensor {t}"), g.iter().copied(), c.iter().copied(), scaled(c, abs_ulps * ulp, rel_ulps * ulp));
        }
        if must_differ_from_f32 {
            assert_ne!(gg, f32_gradients, "{label}: the step's gradients equal f32's bit for bit: nothing was rounded");
        }
    }
}

/// Runs on every machine: without a usable GPU, everything CUDA fails with a one-line
/// message pointing at the CPU backend instead of panicking.
#[test]
fn without_a_usable_gpu_the_backend_fails_cleanly() {
    let _serial = serial();
    assert!(!cuda::build_info().is_empty());
    match cuda::cuda_available() {
        Ok(name) => eprintln!("GPU present: {name}"),
        Err(e) => {
            let message = e.to_string();
            assert!(message.ends_with("use --device cpu") && !message.contains('\n'), "{message}");
            let (model, train) = (ModelConfig::seed(true), TrainConfig::seed());
            let params = ModelParams::init(&model, 0, 1);
            let err = CudaBackend::new(model, train, dataset(), &params).err().expect("no GPU, so no backend");
            assert!(err.to_string().ends_with("use --device cpu"), "{err}");
        }
    }
}

#[test]
fn queued_evaluation_points_equal_points_measured_at_once() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let train = TrainConfig::seed();
    let examples = data.train.count;
    // 230 steps, evaluated every 50: runs cut at epoch ends (33 batches) and a last point
    // off the grid; probes of either layer; the whole test set's batch statistics and the
    // population's. A BN and a plain network in lockstep, as the study's comparison trains
    // them (in one launch where paired).
    let cases = [
        ("batch statistics, probe", StatsMode::Batch, Some(Probe { layer: 1, neurons: 5 })),
        ("population statistics, probe", StatsMode::Population, Some(Probe { layer: 0, neurons: 3 })),
        ("population statistics", StatsMode::Population, None),
    ];
    let variants = [(StepLaunch::Fused, false), (StepLaunch::Fused, true), (StepLaunch::Graph, false)];
    for (name, eval_mode, probe) in cases {
        let schedule = Schedule { probe, eval_mode, ..Schedule::new(230, 50) };
        for (step_launch, fused_pairing) in variants {
            for eval_stream in [false, true] {
                let at = format!("{name}, {step_launch:?} steps, paired {fused_pairing}, evaluation stream {eval_stream}");
                // Paired, in the pair kernel's blocks of 256, so that a network measured alone
                // adds in the pair's order (other block sizes add in another).
                let fused_threads = if fused_pairing { 256 } else { CudaOptions::default().fused_threads };
                let options = CudaOptions { step_launch, eval_stream, fused_pairing, fused_threads, ..Default::default() };
                let open = |batch_norm: bool| {
                    let model = ModelConfig::seed(batch_norm);
                    let params = ModelParams::init(&model, train.seed, 1);
                    CudaBackend::with_options(model, train.clone(), Arc::clone(&data), &params, options).unwrap()
                };
                let (mut bn, mut plain) = (open(true), open(false));
                let got = points_queued(&mut [&mut bn, &mut plain], &train, examples, &schedule).unwrap();
                for (index, net) in [&bn, &plain].into_iter().enumerate() {
                    let name = net.device_name();
                    assert_eq!(name.contains("evaluations on a stream of their own"), eval_stream, "{at}: {name}");
                    assert_eq!(name.contains("two networks a launch"), fused_pairing, "{at}: {name}");
                    assert_eq!(got[index].len(), 5, "{at}");
                    assert!(got[index].iter().all(|r| r.probe.len() == probe.map_or(0, |p| 500 * p.neurons)), "{at}: probe sizes");
                }
                for (index, (batch_norm, mut queued)) in [(true, bn), (false, plain)].into_iter().enumerate() {
                    let at = format!("{at}, BN {batch_norm}");
                    let mut measured = open(batch_norm);
                    let expected = points_measured_at_once(&mut measured, &train, examples, &schedule).unwrap();
                    // Bit for bit: the same kernels on the same state, on another stream or not.
                    assert_eq!(got[index], expected, "{at}");
                    assert_eq!(queued.params().unwrap(), measured.params().unwrap(), "{at}: parameters after training");
                    assert_eq!(
                        queued.evaluate(SplitKind::Test, eval_mode, probe).unwrap(),
                        measured.evaluate(SplitKind::Test, eval_mode, probe).unwrap(),
                        "{at}: evaluation after training"
                    );
                }
            }
        }
    }
}

/// A point measures the state at its step, whatever happens to the live state between its
/// begin and its finish: there, parameters replaced (with an infinite running variance),
/// a synchronous evaluation, the non-finite check and one-by-one predictions of the new
/// state, and steps trained.
#[test]
fn a_queued_point_measures_the_state_at_its_step() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let train = TrainConfig::seed();
    let model = ModelConfig::seed(true);
    let params = ModelParams::init(&model, train.seed, 1);
    let mut changed = scaled_init(&model, &train);
    changed.layers[0].batch_norm.as_mut().unwrap().running[0].var[3] = f64::INFINITY;
    let order = epoch_order(BatchOrder::Shuffled, 5, 0, data.train.count);
    let probe = Some(Probe { layer: 0, neurons: 4 });
    for eval_stream in [false, true] {
        for mode in [StatsMode::Population, StatsMode::Batch] {
            let at = format!("evaluation stream {eval_stream}, {mode:?}");
            let options = CudaOptions { eval_stream, ..Default::default() };
            let open = |params: &ModelParams| {
                let mut net = CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(&data), params, options).unwrap();
                net.set_epoch_order(&order).unwrap();
                net
            };
            let (mut queued, mut measured, mut other) = (open(&params), open(&params), open(&changed));
            for net in [&mut queued, &mut measured] {
                net.train_steps(0, 20).unwrap();
            }
            let pending = queued.begin_point(mode, probe).unwrap();
            queued.set_params(&changed).unwrap();
            let between = queued.evaluate(SplitKind::Test, mode, probe).unwrap();
            assert_eq!(between, other.evaluate(SplitKind::Test, mode, probe).unwrap(), "{at}: evaluation of the new state");
            let non_finite = queued.first_non_finite().unwrap();
            assert!(non_finite.as_ref().is_some_and(|(name, v)| name.contains("var") && v.is_infinite()), "{at}: {non_finite:?}");
            assert_eq!(queued.predict_each(SplitKind::Test, 7, mode).unwrap(), other.predict_each(SplitKind::Test, 7, mode).unwrap(), "{at}");
            queued.train_steps(20, 3).unwrap();
            let got = queued.finish_point(pending).unwrap();
            let expected = measure_point(&mut measured, mode, probe).unwrap();
            assert_eq!(got, expected, "{at}: the point measured the state at its step");
            assert!(got.non_finite.is_none() && got.stats.steps == 20, "{at}: {:?}", got.stats);
        }
    }
}

#[test]
fn a_queued_point_names_what_went_non_finite_at_its_step() {
    let Some(_serial) = serial_gpu() else { return };
    let data = dataset();
    let train = TrainConfig::seed();
    let model = ModelConfig::seed(true);
    // An infinite running variance leaves training (batch statistics) alone, so the point
    // finds it in the state's copy, with the next run already queued.
    let mut params = ModelParams::init(&model, train.seed, 1);
    params.layers[1].batch_norm.as_mut().unwrap().running[0].var[7] = f64::INFINITY;
    let schedule = Schedule::new(150, 50);
    for eval_stream in [false, true] {
        let options = CudaOptions { eval_stream, ..Default::default() };
        let open = || CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(&data), &params, options).unwrap();
        let (mut queued, mut measured) = (open(), open());
        let got = points_queued(&mut [&mut queued], &train, data.train.count, &schedule).unwrap_err().to_string();
        let expected = points_measured_at_once(&mut measured, &train, data.train.count, &schedule).unwrap_err().to_string();
        assert_eq!(got, expected, "evaluation stream {eval_stream}");
        assert!(got.contains("training diverged at step 50") && got.contains("non-finite value (inf)"), "{got}");
    }
}

/// `BNTRAIN_TIMELINE=1` (CudaOptions::timeline) through train_lockstep, 20 steps with a point
/// every 5, fused and on graphs, and a BN and a plain network fused in one launch: each
/// network's timeline has four points, every run counted, and the kinds' totals add up to
/// the whole span (each interval between marks in one row); off, no rows.
#[test]
fn the_timeline_counts_every_run_and_point() {
    let Some(_gpu) = serial_gpu() else { return };
    let train = TrainConfig::seed();
    let data = dataset();
    let cases = [(StepLaunch::Fused, true, false), (StepLaunch::Graph, true, false), (StepLaunch::Fused, false, false), (StepLaunch::Fused, true, true)];
    for (step_launch, timeline, paired) in cases {
        let options = CudaOptions { step_launch, timeline, ..Default::default() };
        let models: Vec<ModelConfig> = if paired { vec![ModelConfig::seed(true), ModelConfig::seed(false)] } else { vec![ModelConfig::seed(true)] };
        let mut nets: Vec<CudaBackend> = models
            .iter()
            .map(|model| CudaBackend::with_options(model.clone(), train.clone(), Arc::clone(&data), &scaled_init(model, &train), options).unwrap())
            .collect();
        let mut runs = 0;
        let mut count_runs = |event: bntrain::train::Event<'_>| runs += matches!(event, bntrain::train::Event::Stepped { .. }) as usize;
        let mut dyn_nets: Vec<&mut dyn Backend> = nets.iter_mut().map(|net| net as &mut dyn Backend).collect();
        bntrain::train::train_lockstep(&mut dyn_nets, &train, data.train.count, 0, &Schedule::new(20, 5), None, &mut count_runs).unwrap();
        // (The second network's timeline holds events on the first's stream.)
        nets.iter_mut().for_each(|net| net.synchronize().unwrap());
        let mut run_totals = Vec::new();
        for (index, net) in nets.iter_mut().enumerate() {
            assert_eq!(net.device_name().contains("two networks a launch"), paired, "{step_launch:?}: {}", net.device_name());
            let spans = net.timeline().unwrap();
            run_totals.extend(spans.as_deref().map(|spans| runs_in(spans).1));
            check_timeline(&format!("{step_launch:?}, network {index} of {}, timeline {timeline}", models.len()), spans, timeline, runs);
        }
        if let [first, second] = run_totals[..] {
            // The same launches, timed from the same stream's events but for the second's end.
            assert_close("the paired networks' runs, µs", vec![second], vec![first], Tolerance::new(50.0, 0.05));
        }
    }
}

/// A timeline's runs of steps, right after a point or not: how many, and their µs.
fn runs_in(spans: &[TimelineSpan]) -> (usize, f64) {
    spans.iter().filter(|s| s.what.starts_with("run ")).fold((0, 0.0), |(count, us), s| (count + s.count, us + s.total_us))
}

/// `reproduce`'s comparison with the timeline on (its two networks in one fused launch, a
/// point every 5 of 20 steps): a timeline for each network, BN first, each with four points
/// and the same runs, at least one before each point; off, none.
#[test]
fn the_comparison_reads_each_networks_timeline() {
    let Some(_gpu) = serial_gpu() else { return };
    let data = dataset();
    for timeline in [true, false] {
        let opts = bntrain::report::ReproduceOptions { steps_compare: 20, eval_every: 5, ..bntrain::report::ReproduceOptions::quick("unused") };
        let mut open = |model: ModelConfig, train: TrainConfig, params: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
            let options = CudaOptions { step_launch: StepLaunch::Fused, timeline, ..Default::default() };
            Ok(Box::new(CudaBackend::with_options(model, train, Arc::clone(&data), params, options)?))
        };
        let run = bntrain::report::study::run_comparison(&opts, &data, &mut open, None).unwrap();
        assert!(run.device.contains("two networks a launch"), "{}", run.device);
        if !timeline {
            assert!(run.timeline.is_empty(), "rows without the switch: {:?}", run.timeline);
            continue;
        }
        let labels: Vec<&str> = run.timeline.iter().map(|(label, _)| label.as_str()).collect();
        assert_eq!(labels, ["BN", "plain"]);
        // (The loop may split a run where the first steps were slow: at least one a point.)
        let runs = runs_in(&run.timeline[0].1).0;
        assert!(runs >= 4, "{:?}", run.timeline[0].1);
        let totals: Vec<f64> = run.timeline.iter().map(|(_, rows)| runs_in(rows).1).collect();
        assert_close("the comparison's networks' runs, µs", vec![totals[1]], vec![totals[0]], Tolerance::new(50.0, 0.05));
        for (label, rows) in run.timeline {
            check_timeline(&format!("the comparison's {label} network"), Some(rows), true, runs);
        }
    }
}

/// The checks of [`the_timeline_counts_every_run_and_point`] on one network's rows.
fn check_timeline(case: &str, spans: Option<Vec<TimelineSpan>>, timeline: bool, runs: usize) {
    let Some(spans) = spans else {
        assert!(!timeline, "{case}: the timeline was asked for and gave no rows");
        return;
    };
    assert!(timeline, "{case}: rows without the switch: {spans:?}");
    let row = |what: &str| spans.iter().find(|s| s.what == what);
    let count = |what: &str| row(what).map_or(0, |s| s.count);
    assert_eq!(count("point"), 4, "{case}: {spans:?}");
    assert_eq!(count("run right after a point (per step)") + count("run not right after a point (per step)"), runs, "{case}: {spans:?}");
    assert_eq!(count("other interval"), 0, "{case}: {spans:?}");
    assert!(spans.iter().all(|s| s.total_us >= 0.0 && s.median_us >= 0.0 && s.total_us.is_finite()), "{case}: {spans:?}");
    let whole = row("whole span").expect("a whole span").total_us;
    let parts: f64 = spans.iter().filter(|s| s.what != "whole span").map(|s| s.total_us).sum();
    assert_close(&format!("{case}: the kinds' totals against the whole span"), vec![parts], vec![whole], Tolerance::new(1e-3, 1e-6));
    assert!(row("point").unwrap().median_us > 0.0, "{case}: a point of the test split took no time: {spans:?}");
}
