//! The CUDA backend as a whole against the CPU reference (CpuBackend<f64>) on synthetic
//! data: one training step (loss, every gradient, every parameter, running statistics,
//! momentum), 200 shuffled steps with evaluations every 50, inference (probes, batch and
//! population statistics, one-by-one prediction), bitwise determinism. Skips without a
//! usable GPU (fails instead with BNTRAIN_REQUIRE_GPU=1).
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

use bntrain::backend::{Backend, Evaluation, Probe, SplitKind, StatsMode, StepStats};
use bntrain::cpu::CpuBackend;
use bntrain::cuda::{self, CudaBackend};
use bntrain::data::Dataset;
use bntrain::model::{
    Activation, Averaging, BatchOrder, LossReduction, ModelConfig, ModelParams, StatsEstimator, TrainConfig, VarianceKind,
};
use bntrain::tolerance::{assert_close, Tolerance};
use bntrain::train::{batches_per_epoch, epoch_order};
use gpu_support::*;
use std::sync::Arc;

const GRADIENT: (f64, f64) = (1e-4, 1e-3);

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
    vec![
        ("seed BN", seed_model, seed_train.clone()),
        ("seed plain", plain, seed_train),
        ("relu BN, momentum, mean loss, 3 estimators", relu_bn, relu_train),
        ("plain relu, momentum, batch 2", plain_relu, plain_train),
    ]
}

/// Opens the backend under test: the GPU one, or (to check these comparisons themselves on
/// any machine) the CPU one in f32, whose distance from f64 is of the same kind.
type Maker = fn(&ModelConfig, &TrainConfig, &Arc<Dataset>, &ModelParams) -> Box<dyn Backend>;

fn cuda_backend(model: &ModelConfig, train: &TrainConfig, data: &Arc<Dataset>, params: &ModelParams) -> Box<dyn Backend> {
    Box::new(CudaBackend::new(model.clone(), train.clone(), Arc::clone(data), params).unwrap())
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
    if gpu().is_some() {
        check_one_step(cuda_backend);
    }
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
    for step in 0..steps {
        let (epoch, batch) = (step / per_epoch, (step % per_epoch) as usize);
        if batch == 0 {
            let order = epoch_order(BatchOrder::Shuffled, train.seed, epoch, examples);
            nets.iter_mut().for_each(|n| n.set_epoch_order(&order).unwrap());
        }
        nets.iter_mut().for_each(|n| n.train_step(batch).unwrap());
        if (step + 1) % every == 0 {
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
    if gpu().is_some() {
        check_two_hundred_steps(cuda_backend);
    }
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
    if gpu().is_some() {
        check_inference(cuda_backend);
    }
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
}

#[test]
fn parameters_round_trip_and_runs_are_bitwise_deterministic() {
    if gpu().is_none() {
        return;
    }
    let data = dataset();
    for (name, model, train) in configurations() {
        let params = ModelParams::init(&model, 3, train.estimators().len());
        let mut a = CudaBackend::new(model.clone(), train.clone(), Arc::clone(&data), &params).unwrap();
        let mut b = CudaBackend::new(model.clone(), train.clone(), Arc::clone(&data), &params).unwrap();
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
        // Velocity round trip (empty without momentum).
        let v = a.velocity().unwrap();
        b.set_velocity(&v).unwrap();
        assert_eq!(b.velocity().unwrap(), v);
    }
}

#[test]
fn bad_requests_are_errors() {
    if gpu().is_none() {
        return;
    }
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

/// Runs on every machine: the comparisons above, with CpuBackend<f32> standing in for the
/// GPU, hold — so their tolerances are achievable by an f32 backend and a failure on the
/// GPU points at the GPU.
#[test]
fn the_comparisons_hold_for_cpu_f32() {
    check_one_step(cpu_f32_backend);
    check_two_hundred_steps(cpu_f32_backend);
    check_inference(cpu_f32_backend);
}

/// Runs on every machine: without a usable GPU, everything CUDA fails with a one-line
/// message pointing at the CPU backend instead of panicking.
#[test]
fn without_a_usable_gpu_the_backend_fails_cleanly() {
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
