//! The CPU reference, tested to the bone in f64: finite-difference gradients of every
//! operation and of the whole network, BN's properties, the running-statistics closed forms.

mod support;

use bntrain::backend::{Backend, SplitKind, StatsMode};
use bntrain::cpu::{ops, CpuBackend};
use bntrain::model::{
    Activation, Averaging, LossReduction, ModelConfig, ModelParams, StatsEstimator, TrainConfig, VarianceKind,
};
use bntrain::tolerance::{assert_close, Tolerance};
use std::sync::Arc;
use support::{lockstep_losses, synthetic_dataset, uniform};

/// Central differences in f64 with h = 1e-6 have truncation error O(h²·f''') ≈ 1e-12 and
/// rounding error O(ε·|f|/h) ≈ 1e-10·|f|: gradients agree to ~1e-7 relative.
const FD: Tolerance = Tolerance::new(1e-6, 1e-5);
const H: f64 = 1e-6;

/// One batch's (mean, variance) per feature.
type Moments = (Vec<f64>, Vec<f64>);
/// A change that makes a configuration invalid.
type Mutation = dyn Fn(&mut TrainConfig, &mut ModelConfig);

/// ∂f/∂x_i for every i, by central differences.
fn numeric_gradient(x: &[f64], f: &mut dyn FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let keep = x[i];
            x[i] = keep + H;
            let up = f(&x);
            x[i] = keep - H;
            let down = f(&x);
            x[i] = keep;
            (up - down) / (2.0 * H)
        })
        .collect()
}

#[test]
fn batch_norm_backward_matches_finite_differences() {
    for &(batch, width) in &[(2usize, 1usize), (5, 3), (60, 7)] {
        let z = uniform(batch * width, -3.0, 3.0, 1);
        let gamma = uniform(width, 0.5, 2.0, 2);
        let beta = uniform(width, -1.0, 1.0, 3);
        let weights = uniform(batch * width, -1.0, 1.0, 4); // L = Σ weights ⊙ y
        let eps = 1e-3;
        let forward = |z: &[f64], gamma: &[f64], beta: &[f64]| {
            let (mut m, mut v, mut s) = (vec![0.0; width], vec![0.0; width], vec![0.0; width]);
            let (mut xh, mut y) = (vec![0.0; z.len()], vec![0.0; z.len()]);
            ops::batch_norm_forward_train(z, gamma, beta, eps, &mut m, &mut v, &mut s, &mut xh, &mut y);
            (y, xh, s)
        };
        let loss = |y: &[f64]| y.iter().zip(&weights).map(|(a, b)| a * b).sum::<f64>();

        let (_, x_hat, inv_std) = forward(&z, &gamma, &beta);
        let (mut dz, mut dg, mut db) = (vec![0.0; z.len()], vec![0.0; width], vec![0.0; width]);
        ops::batch_norm_backward(&weights, &x_hat, &gamma, &inv_std, &mut dz, &mut dg, &mut db);

        let num_dz = numeric_gradient(&z, &mut |z| loss(&forward(z, &gamma, &beta).0));
        let num_dg = numeric_gradient(&gamma, &mut |g| loss(&forward(&z, g, &beta).0));
        let num_db = numeric_gradient(&beta, &mut |b| loss(&forward(&z, &gamma, b).0));
        assert_close(&format!("dz {batch}x{width}"), dz, num_dz, FD);
        assert_close("dgamma", dg, num_dg, FD);
        assert_close("dbeta", db, num_db, FD);
    }
}

#[test]
fn softmax_cross_entropy_matches_finite_differences_and_closed_form() {
    let classes = 10;
    let logits = uniform(7 * classes, -4.0, 4.0, 5);
    let labels: Vec<u8> = vec![0, 3, 9, 1, 1, 7, 4];
    for reduction in [LossReduction::Sum, LossReduction::Mean] {
        let mut grad = vec![0.0; logits.len()];
        ops::softmax_cross_entropy(&logits, &labels, classes, reduction, &mut grad);
        let mut scratch = vec![0.0; logits.len()];
        let scale = if reduction == LossReduction::Mean { 1.0 / 7.0 } else { 1.0 };
        let num = numeric_gradient(&logits, &mut |l| {
            ops::softmax_cross_entropy(l, &labels, classes, reduction, &mut scratch).0 * scale
        });
        assert_close(&format!("dlogits {reduction:?}"), grad, num, FD);
    }
    // Closed form on one row: uniform logits give ln(K); a correct confident one ≈ 0.
    let mut g = vec![0.0; classes];
    let (loss, correct) = ops::softmax_cross_entropy(&vec![0.0; classes], &[3], classes, LossReduction::Sum, &mut g);
    assert_close("uniform loss", [loss], [(classes as f64).ln()], Tolerance::new(1e-12, 0.0));
    assert_eq!(correct, 0, "ties go to class 0, not the label 3");
    let mut confident = vec![0.0; classes];
    confident[3] = 50.0;
    let (loss, correct) = ops::softmax_cross_entropy(&confident, &[3], classes, LossReduction::Sum, &mut g);
    assert!(loss < 1e-20 && correct == 1);
}

#[test]
fn activation_and_linear_backward_match_finite_differences() {
    let (batch, inputs, outputs) = (4, 5, 3);
    let x = uniform(batch * inputs, -1.0, 1.0, 6);
    let w = uniform(outputs * inputs, -1.0, 1.0, 7);
    let bias = uniform(outputs, -1.0, 1.0, 8);
    let weights = uniform(batch * outputs, -1.0, 1.0, 9);
    for activation in [Activation::Sigmoid, Activation::Relu] {
        let f = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut z = vec![0.0; batch * outputs];
            ops::linear_forward(x, w, Some(b), inputs, outputs, &mut z);
            let mut a = vec![0.0; z.len()];
            ops::activation_forward(activation, &z, &mut a);
            a.iter().zip(&weights).map(|(p, q)| p * q).sum::<f64>()
        };
        let mut z = vec![0.0; batch * outputs];
        ops::linear_forward(&x, &w, Some(&bias), inputs, outputs, &mut z);
        let mut a = vec![0.0; z.len()];
        ops::activation_forward(activation, &z, &mut a);
        let mut dz = vec![0.0; z.len()];
        ops::activation_backward(activation, &a, &weights, &mut dz);
        let (mut dw, mut db, mut dx) = (vec![0.0; w.len()], vec![0.0; outputs], vec![0.0; x.len()]);
        ops::linear_backward(&dz, &x, &w, inputs, outputs, &mut dw, Some(&mut db), Some(&mut dx));
        assert_close(&format!("dx {activation:?}"), dx, numeric_gradient(&x, &mut |x| f(x, &w, &bias)), FD);
        assert_close(&format!("dw {activation:?}"), dw, numeric_gradient(&w, &mut |w| f(&x, w, &bias)), FD);
        assert_close(&format!("db {activation:?}"), db, numeric_gradient(&bias, &mut |b| f(&x, &w, b)), FD);
    }
}

/// A small network whose loss, as a function of its flattened trainable parameters, is one
/// training-mode forward pass over batch 0.
fn network_loss_and_gradient(batch_norm: bool, activation: Activation, reduction: LossReduction) {
    let data = Arc::new(synthetic_dataset(12, 4, 6, 10));
    let model = ModelConfig { inputs: 6, hidden: vec![5, 4], classes: 10, activation, batch_norm, epsilon: 1e-3 };
    let mut train = TrainConfig::seed();
    train.batch_size = 6;
    train.loss = reduction;
    train.order = bntrain::model::BatchOrder::Sequential;
    let mut params = ModelParams::init(&model, 3, 1);
    // Unit-scale weights on 6 inputs keep the sigmoid out of saturation: a gradient check
    // where every gradient is 0 would prove nothing.
    for layer in &mut params.layers {
        layer.weight.iter_mut().for_each(|w| *w *= 0.5);
        if let Some(b) = &mut layer.bias {
            b.iter_mut().enumerate().for_each(|(i, v)| *v = 0.1 * i as f64 - 0.2);
        }
        if let Some(bn) = &mut layer.batch_norm {
            bn.gamma.iter_mut().enumerate().for_each(|(i, g)| *g = 0.8 + 0.1 * i as f64);
            bn.beta.iter_mut().enumerate().for_each(|(i, b)| *b = 0.05 * i as f64);
        }
    }
    let mut net = CpuBackend::<f64>::new(model.clone(), train.clone(), data.clone(), &params).unwrap();
    let order: Vec<u32> = (0..12).collect();
    net.set_epoch_order(&order).unwrap();
    net.train_step(0).unwrap();
    let analytic = net.gradients().unwrap();
    let stats = net.take_step_stats().unwrap();
    assert_eq!(stats.examples, 6);

    let loss_at = |p: &ModelParams| {
        let mut n = CpuBackend::<f64>::new(model.clone(), train.clone(), data.clone(), p).unwrap();
        n.set_epoch_order(&order).unwrap();
        n.train_step(0).unwrap();
        let s = n.take_step_stats().unwrap();
        match reduction {
            LossReduction::Sum => s.loss_sum,
            LossReduction::Mean => s.loss_sum / s.examples as f64,
        }
    };
    let names: Vec<String> = params.trainable_tensors().iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(names.len(), analytic.len());
    for (k, name) in names.iter().enumerate() {
        let flat = params.trainable_tensors()[k].1.clone();
        let numeric = numeric_gradient(&flat, &mut |values| {
            let mut p = params.clone();
            set_trainable(&mut p, k, values);
            loss_at(&p)
        });
        let nonzero = numeric.iter().filter(|v| v.abs() > 1e-8).count();
        assert!(nonzero > 0, "{name}: every numeric gradient is 0; the check would be vacuous");
        assert_close(&format!("{name} (bn {batch_norm}, {activation:?}, {reduction:?})"), analytic[k].clone(), numeric, FD);
    }
}

fn set_trainable(p: &mut ModelParams, index: usize, values: &[f64]) {
    let mut k = 0;
    for layer in &mut p.layers {
        let mut slots: Vec<&mut Vec<f64>> = vec![&mut layer.weight];
        slots.extend(layer.bias.as_mut());
        if let Some(bn) = &mut layer.batch_norm {
            slots.push(&mut bn.gamma);
            slots.push(&mut bn.beta);
        }
        for slot in slots {
            if k == index {
                slot.copy_from_slice(values);
                return;
            }
            k += 1;
        }
    }
    panic!("no trainable tensor {index}");
}

#[test]
fn whole_network_gradient_matches_finite_differences() {
    network_loss_and_gradient(true, Activation::Sigmoid, LossReduction::Sum);
    network_loss_and_gradient(false, Activation::Sigmoid, LossReduction::Sum);
    network_loss_and_gradient(true, Activation::Relu, LossReduction::Mean);
}

#[test]
fn batch_norm_normalizes_each_feature_and_gamma_beta_set_scale_and_shift() {
    let (batch, width) = (60, 9);
    let z: Vec<f64> = uniform(batch * width, -5.0, 20.0, 11);
    let gamma = uniform(width, 0.5, 3.0, 12);
    let beta = uniform(width, -2.0, 2.0, 13);
    let eps = 1e-3;
    let (mut m, mut v, mut s) = (vec![0.0; width], vec![0.0; width], vec![0.0; width]);
    let (mut xh, mut y) = (vec![0.0; z.len()], vec![0.0; z.len()]);
    ops::batch_norm_forward_train(&z, &gamma, &beta, eps, &mut m, &mut v, &mut s, &mut xh, &mut y);
    let (zm, zv) = column_moments(&z, width);
    assert_close("batch mean", m.clone(), zm, Tolerance::new(1e-12, 1e-12));
    assert_close("batch variance (biased)", v.clone(), zv, Tolerance::new(1e-12, 1e-12));
    let (xm, xv) = column_moments(&xh, width);
    assert_close("mean of x̂", xm, vec![0.0; width], Tolerance::new(1e-12, 0.0));
    // Var(x̂) = σ²/(σ²+ε), just under 1.
    let expected: Vec<f64> = v.iter().map(|&s2| s2 / (s2 + eps)).collect();
    assert_close("variance of x̂", xv, expected.clone(), Tolerance::new(1e-12, 1e-12));
    let (ym, yv) = column_moments(&y, width);
    assert_close("mean of y = β", ym, beta.clone(), Tolerance::new(1e-12, 1e-12));
    let scaled: Vec<f64> = gamma.iter().zip(&expected).map(|(g, e)| g * g * e).collect();
    assert_close("variance of y = γ²·Var(x̂)", yv, scaled, Tolerance::new(1e-12, 1e-12));
    // Two-pass moments survive a large offset, where E[x²]−E[x]² would cancel.
    let offset: Vec<f64> = z.iter().map(|v| v + 1e8).collect();
    let (mut om, mut ov) = (vec![0.0; width], vec![0.0; width]);
    ops::batch_moments(&offset, width, &mut om, &mut ov);
    assert_close("variance under a 1e8 offset", ov, v, Tolerance::new(1e-6, 1e-7));
}

#[test]
fn running_statistics_follow_their_closed_forms() {
    let width = 3;
    let batches: Vec<(Vec<f64>, Vec<f64>)> = (0..50).map(|t| (uniform(width, -1.0, 1.0, 100 + t), uniform(width, 0.5, 2.0, 200 + t))).collect();
    let b = 60.0;
    for variance in [VarianceKind::Biased, VarianceKind::Unbiased] {
        let c = if variance == VarianceKind::Unbiased { b / (b - 1.0) } else { 1.0 };
        // EMA: r_n = d^n·r_0 + (1−d)·Σ_t d^{n−1−t}·s_t.
        let decay = 0.9;
        let ema = StatsEstimator { averaging: Averaging::Ema { decay }, variance };
        let (mut rm, mut rv) = (vec![0.0; width], vec![1.0; width]);
        for (t, (m, v)) in batches.iter().enumerate() {
            ops::update_running_stats(ema, 60, t as u64, &mut rm, &mut rv, m, v);
        }
        let n = batches.len() as i32;
        let closed = |init: f64, pick: &dyn Fn(&Moments) -> f64, scale: f64| {
            let mut r = decay.powi(n) * init;
            for (t, s) in batches.iter().enumerate() {
                r += (1.0 - decay) * decay.powi(n - 1 - t as i32) * pick(s) * scale;
            }
            r
        };
        for j in 0..width {
            assert_close("EMA mean", [rm[j]], [closed(0.0, &|s| s.0[j], 1.0)], Tolerance::new(1e-12, 1e-12));
            assert_close("EMA var", [rv[j]], [closed(1.0, &|s| s.1[j], c)], Tolerance::new(1e-12, 1e-12));
        }
        // Cumulative: the plain mean of every batch statistic, whatever the starting value.
        let cumulative = StatsEstimator { averaging: Averaging::Cumulative, variance };
        let (mut cm, mut cv) = (vec![123.0; width], vec![456.0; width]);
        for (t, (m, v)) in batches.iter().enumerate() {
            ops::update_running_stats(cumulative, 60, t as u64, &mut cm, &mut cv, m, v);
        }
        for j in 0..width {
            let mean_m = batches.iter().map(|s| s.0[j]).sum::<f64>() / batches.len() as f64;
            let mean_v = batches.iter().map(|s| s.1[j] * c).sum::<f64>() / batches.len() as f64;
            assert_close("cumulative mean", [cm[j]], [mean_m], Tolerance::new(1e-12, 1e-12));
            assert_close("cumulative var", [cv[j]], [mean_v], Tolerance::new(1e-12, 1e-12));
        }
    }
}

#[test]
fn running_statistics_in_training_are_the_batch_moments() {
    // With decay → the update keeps (1−d) of the batch statistics: after one step from
    // (0, 1) the running mean is (1−d)·μ_B of layer 1's z = x·Wᵀ.
    let data = Arc::new(synthetic_dataset(8, 4, 6, 20));
    let model = ModelConfig { inputs: 6, hidden: vec![3], classes: 10, activation: Activation::Sigmoid, batch_norm: true, epsilon: 1e-3 };
    let mut train = TrainConfig::seed();
    train.batch_size = 8;
    train.order = bntrain::model::BatchOrder::Sequential;
    let params = ModelParams::init(&model, 1, 1);
    let mut net = CpuBackend::<f64>::new(model, train, data.clone(), &params).unwrap();
    net.set_epoch_order(&(0..8).collect::<Vec<u32>>()).unwrap();
    net.train_step(0).unwrap();
    let after = net.params().unwrap();
    let mut x = vec![0.0; 8 * 6];
    ops::gather_batch(&data.train.images, 6, &(0..8).collect::<Vec<u32>>(), &mut x);
    let mut z = vec![0.0; 8 * 3];
    ops::linear_forward(&x, &params.layers[0].weight, None, 6, 3, &mut z);
    let (m, v) = column_moments(&z, 3);
    let stats = &after.layers[0].batch_norm.as_ref().unwrap().running[0];
    assert_close("running mean", stats.mean.clone(), m.iter().map(|v| 0.001 * v).collect::<Vec<_>>(), Tolerance::new(1e-12, 1e-9));
    assert_close("running var", stats.var.clone(), v.iter().map(|v| 0.999 + 0.001 * v).collect::<Vec<_>>(), Tolerance::new(1e-12, 1e-9));
    assert_eq!(stats.batches, 1);
}

#[test]
fn f32_and_f64_backends_agree_over_many_steps() {
    // The f32 trainer is the f64 oracle up to rounding: 100 steps of the seed's shape on
    // random data keep the loss within 1e-3 relative (rounding grows over steps but SGD on
    // a smooth loss does not amplify it much).
    let data = Arc::new(synthetic_dataset(600, 200, 784, 30));
    let model = ModelConfig::seed(true);
    let train = TrainConfig::seed();
    let params = ModelParams::init(&model, 0, 1);
    let mut a = CpuBackend::<f32>::new(model.clone(), train.clone(), data.clone(), &params).unwrap();
    let mut b = CpuBackend::<f64>::new(model, train.clone(), data.clone(), &params).unwrap();
    let losses = lockstep_losses(&mut a, &mut b, &train, data.train.count, 100, 25);
    assert_eq!(losses[0].len(), 8);
    assert_close("f32 vs f64 losses", losses[0].clone(), losses[1].clone(), Tolerance::new(1e-4, 1e-3));
}

#[test]
fn one_by_one_batch_statistics_predict_a_single_class() {
    let data = Arc::new(synthetic_dataset(120, 30, 784, 40));
    let model = ModelConfig::seed(true);
    let train = TrainConfig::seed();
    let params = ModelParams::init(&model, 0, 1);
    let net_data = Arc::clone(&data);
    let mut net = CpuBackend::<f64>::new(model, train, data, &params).unwrap();
    let batch = net.predict_each(SplitKind::Test, 30, StatsMode::Batch).unwrap();
    assert!(batch.iter().all(|&p| p == batch[0]), "x̂ = 0 for a single example: the output cannot depend on the input ({batch:?})");
    let population = net.predict_each(SplitKind::Test, 30, StatsMode::Population).unwrap();
    assert!(population.iter().any(|&p| p != population[0]), "population statistics keep the input's information");
    // predict_each agrees with a batched evaluation in population mode.
    let e = net.evaluate(SplitKind::Test, StatsMode::Population, None).unwrap();
    assert_eq!(e.examples, 30);
    let labels = &net_data.test.labels[..30];
    let correct = population.iter().zip(labels).filter(|(p, l)| p == l).count() as u64;
    assert_eq!(correct, e.correct, "one by one {population:?}, labels {labels:?}");
}

#[test]
fn configuration_errors_are_caught_up_front() {
    let data = Arc::new(synthetic_dataset(10, 4, 6, 50));
    let model = ModelConfig { inputs: 6, hidden: vec![3], classes: 10, activation: Activation::Sigmoid, batch_norm: true, epsilon: 1e-3 };
    let params = ModelParams::init(&model, 0, 1);
    let try_train = |edit: &dyn Fn(&mut TrainConfig, &mut ModelConfig)| {
        let (mut t, mut m) = (TrainConfig::seed(), model.clone());
        t.batch_size = 5;
        edit(&mut t, &mut m);
        let p = if m == model { params.clone() } else { ModelParams::init(&m, 0, 1) };
        CpuBackend::<f64>::new(m, t, data.clone(), &p).err().map(|e| e.to_string())
    };
    assert!(try_train(&|_, _| {}).is_none());
    let cases: Vec<(&str, Box<Mutation>)> = vec![
        ("batch size 1 with batch normalization", Box::new(|t, _| t.batch_size = 1)),
        ("larger than the training set", Box::new(|t, _| t.batch_size = 11)),
        ("learning rate must be positive", Box::new(|t, _| t.learning_rate = 0.0)),
        ("learning rate must be positive", Box::new(|t, _| t.learning_rate = -1.0)),
        ("decay must be strictly between 0 and 1", Box::new(|t, _| t.estimator.averaging = Averaging::Ema { decay: 1.0 })),
        ("width 0", Box::new(|_, m| m.hidden = vec![3, 0])),
        ("momentum must be in", Box::new(|t, _| t.momentum = 1.5)),
    ];
    for (needle, edit) in cases {
        let msg = try_train(&*edit).unwrap_or_else(|| panic!("expected an error containing `{needle}`"));
        assert!(msg.contains(needle), "`{msg}` should contain `{needle}`");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    // Values an f64 backend takes, which are infinite, 0 or 1 as the f32 another computes in.
    let narrow_cases: Vec<(&str, Box<Mutation>)> = vec![
        ("epsilon 1e39 is inf in f32, where it must be positive and finite", Box::new(|_, m| m.epsilon = 1e39)),
        ("epsilon 1e-300 is 0 in f32", Box::new(|_, m| m.epsilon = 1e-300)),
        ("learning rate 1e-300 is 0 in f32", Box::new(|t, _| t.learning_rate = 1e-300)),
        ("momentum 0.999999999999 is 1 in f32, where it must be below 1", Box::new(|t, _| t.momentum = 1.0 - 1e-12)),
        ("decay 0.999999999999 is 1 in f32", Box::new(|t, _| t.estimator.averaging = Averaging::Ema { decay: 1.0 - 1e-12 })),
    ];
    let try_train_f32 = |edit: &dyn Fn(&mut TrainConfig, &mut ModelConfig)| {
        let (mut t, mut m) = (TrainConfig::seed(), model.clone());
        t.batch_size = 5;
        edit(&mut t, &mut m);
        let p = ModelParams::init(&m, 0, 1);
        CpuBackend::<f32>::new(m, t, data.clone(), &p).err().map(|e| e.to_string())
    };
    for (needle, edit) in narrow_cases {
        assert_eq!(try_train(&*edit), None, "f64 takes it: {needle}");
        let msg = try_train_f32(&*edit).unwrap_or_else(|| panic!("expected an error containing `{needle}`"));
        assert!(msg.contains(needle), "`{msg}` should contain `{needle}`");
    }
}

/// The CPU backend's queued points (a worker thread evaluates a copy of the state while the
/// next steps train) against points measured at once: a BN and a plain network in
/// lockstep, both statistics modes, probes of either layer, the sparse and the dense first
/// layer; records and parameters bit for bit.
#[test]
fn queued_evaluation_points_equal_points_measured_at_once() {
    use bntrain::backend::Probe;
    use bntrain::cpu::{CpuOptions, InputPath};
    use bntrain::train::Schedule;
    // 2500 test examples: population statistics take them in chunks of 1000, 1000 and 500.
    let data = Arc::new(synthetic_dataset(2000, 2500, 784, 42));
    let train = TrainConfig::seed();
    let cases = [
        (StatsMode::Batch, Some(Probe { layer: 1, neurons: 5 }), InputPath::Sparse),
        (StatsMode::Batch, None, InputPath::Dense),
        (StatsMode::Population, Some(Probe { layer: 0, neurons: 3 }), InputPath::Dense),
        (StatsMode::Population, None, InputPath::Sparse),
    ];
    for (eval_mode, probe, input) in cases {
        let at = format!("{eval_mode:?}, {probe:?}, {input:?}");
        let schedule = Schedule { probe, eval_mode, ..Schedule::new(130, 50) };
        let open = |batch_norm: bool| {
            let model = ModelConfig::seed(batch_norm);
            let params = ModelParams::init(&model, train.seed, 1);
            let options = CpuOptions { input, ..CpuOptions::default() };
            CpuBackend::<f32>::with_options(model, train.clone(), Arc::clone(&data), &params, options).unwrap()
        };
        let (mut bn, mut plain) = (open(true), open(false));
        let got = support::points_queued(&mut [&mut bn, &mut plain], &train, data.train.count, &schedule).unwrap();
        for (index, (batch_norm, mut queued)) in [(true, bn), (false, plain)].into_iter().enumerate() {
            let mut measured = open(batch_norm);
            let expected = support::points_measured_at_once(&mut measured, &train, data.train.count, &schedule).unwrap();
            assert_eq!(got[index].len(), 3, "{at}");
            assert!(got[index].iter().all(|r| r.probe.len() == probe.map_or(0, |p| 2500 * p.neurons)), "{at}: probe sizes");
            assert_eq!(got[index], expected, "{at}, BN {batch_norm}");
            assert_eq!(queued.params().unwrap(), measured.params().unwrap(), "{at}, BN {batch_norm}: parameters");
        }
    }
}

/// A point measures the state at its step, whatever happens to the live state between its
/// begin and its finish (parameters replaced, evaluated and predicted with, steps trained),
/// and names a non-finite value of the copy it took.
#[test]
fn a_queued_point_measures_the_state_at_its_step() {
    use bntrain::backend::{measure_point, Probe};
    let data = Arc::new(synthetic_dataset(2000, 500, 784, 42));
    let train = TrainConfig::seed();
    let model = ModelConfig::seed(true);
    let params = ModelParams::init(&model, train.seed, 1);
    let mut changed = params.clone();
    changed.layers[0].weight[5] += 0.25;
    let mut infinite = params.clone();
    infinite.layers[1].batch_norm.as_mut().unwrap().running[0].var[2] = f64::INFINITY;
    let order = bntrain::train::epoch_order(bntrain::model::BatchOrder::Shuffled, 5, 0, data.train.count);
    let probe = Some(Probe { layer: 0, neurons: 4 });
    let open = |params: &ModelParams| {
        let mut net = CpuBackend::<f32>::new(model.clone(), train.clone(), Arc::clone(&data), params).unwrap();
        net.set_epoch_order(&order).unwrap();
        net
    };
    for mode in [StatsMode::Population, StatsMode::Batch] {
        let (mut queued, mut measured, mut other) = (open(&params), open(&params), open(&changed));
        for net in [&mut queued, &mut measured] {
            net.train_steps(0, 20).unwrap();
        }
        let pending = queued.begin_point(mode, probe).unwrap();
        assert!(matches!(pending, bntrain::backend::PendingPoint::Queued), "the worker thread measures it");
        queued.set_params(&changed).unwrap();
        assert_eq!(queued.evaluate(SplitKind::Test, mode, probe).unwrap(), other.evaluate(SplitKind::Test, mode, probe).unwrap(), "{mode:?}");
        assert_eq!(queued.predict_each(SplitKind::Test, 7, mode).unwrap(), other.predict_each(SplitKind::Test, 7, mode).unwrap(), "{mode:?}");
        queued.train_steps(20, 3).unwrap();
        let got = queued.finish_point(pending).unwrap();
        assert_eq!(got, measure_point(&mut measured, mode, probe).unwrap(), "{mode:?}: the point measured the state at its step");
        assert_eq!(got.stats.steps, 20);
        // The copy's non-finite value is named, whatever the live state holds by then.
        let mut diverged = open(&infinite);
        let pending = diverged.begin_point(mode, None).unwrap();
        assert!(matches!(pending, bntrain::backend::PendingPoint::Queued));
        diverged.set_params(&params).unwrap();
        let named = diverged.finish_point(pending).unwrap().non_finite;
        assert_eq!(named, Some(("layer2.running_var[0]".to_string(), f64::INFINITY)), "{mode:?}");
    }
    // Two non-finite first-layer weights whose order differs between the sparse path's
    // input-major storage and the canonical [out, in] layout: the point names the first in
    // canonical order, as `params` does.
    let mut weights = params.clone();
    let inputs = model.inputs;
    weights.layers[0].weight[inputs] = f64::NEG_INFINITY; // [1, 0]: input-major position 1
    weights.layers[0].weight[3] = f64::NAN; // [0, 3]: input-major position 3 · 100
    let mut net = CpuBackend::<f32>::with_options(model.clone(), train.clone(), Arc::clone(&data), &weights, bntrain::cpu::CpuOptions { input: bntrain::cpu::InputPath::Sparse, ..Default::default() }).unwrap();
    let pending = net.begin_point(StatsMode::Population, None).unwrap();
    let named = net.finish_point(pending).unwrap().non_finite;
    assert_eq!(named.as_ref().map(|(name, v)| (name.as_str(), v.is_nan())), Some(("layer1.weight", true)), "{named:?}");
    assert_eq!(named.map(|(n, _)| n), net.params().unwrap().first_non_finite().map(|(n, _)| n));
}

#[test]
fn one_gemm_thread_suits_networks_of_the_seeds_scale_only() {
    use bntrain::cpu::{single_threaded_gemms_suit, SINGLE_THREAD_GEMM_MAX_WIDTH};
    assert!(single_threaded_gemms_suit(&ModelConfig::seed(true).hidden));
    assert!(single_threaded_gemms_suit(&[SINGLE_THREAD_GEMM_MAX_WIDTH, 7]));
    assert!(single_threaded_gemms_suit(&[]));
    assert!(!single_threaded_gemms_suit(&[100, SINGLE_THREAD_GEMM_MAX_WIDTH + 1]));
    assert!(!single_threaded_gemms_suit(&[1024, 1024]));
}

/// Per-column mean and biased variance of a row-major [rows, width] matrix, two passes: the
/// tests' own, apart from `ops::batch_moments`, which the code under test calls.
fn column_moments(z: &[f64], width: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = (z.len() / width) as f64;
    let mean: Vec<f64> = (0..width).map(|j| z.iter().skip(j).step_by(width).sum::<f64>() / rows).collect();
    let var = (0..width).map(|j| z.iter().skip(j).step_by(width).map(|v| (v - mean[j]).powi(2)).sum::<f64>() / rows).collect();
    (mean, var)
}
