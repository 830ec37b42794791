//! `--precision tf32|bf16`: the operand rounding and the CPU's emulation of reduced-precision
//! GEMMs (the GPU side is in tests/gpu_training.rs).

mod support;

use bntrain::backend::{Backend, GemmPrecision};
use bntrain::cpu::{CpuBackend, CpuOptions, InputPath};
use bntrain::model::{ModelConfig, ModelParams, TrainConfig};
use bntrain::tolerance::{assert_close, Tolerance};
use std::sync::Arc;
use support::{synthetic_dataset, uniform};

/// x rounded to `bits` significant bits, ties to even, by f64 arithmetic: an implementation
/// independent of the bit manipulation under test (normal f32 values only).
fn round_significant(x: f32, bits: i32) -> f32 {
    let x = x as f64;
    let exponent = x.abs().log2().floor() as i32;
    let quantum = 2.0f64.powi(exponent - (bits - 1));
    ((x / quantum).round_ties_even() * quantum) as f32
}

#[test]
fn operands_round_to_nearest_even() {
    let (tf32, bf16) = (GemmPrecision::Tf32, GemmPrecision::Bf16);
    let one = |ulps: f32, bits: i32| 1.0 + ulps * 2.0f32.powi(-bits);
    // Halfway cases go to the even neighbour: down from 1 + ½ulp, up from 1 + 1½ulp.
    assert_eq!(tf32.round(one(0.5, 10)), 1.0);
    assert_eq!(tf32.round(one(1.5, 10)), one(2.0, 10));
    assert_eq!(bf16.round(one(0.5, 7)), 1.0);
    assert_eq!(bf16.round(one(1.5, 7)), one(2.0, 7));
    assert_eq!(tf32.round(one(0.75, 10)), one(1.0, 10));
    assert_eq!(bf16.round(-one(0.25, 7)), -1.0);
    for p in [tf32, bf16, GemmPrecision::F32] {
        assert!(p.round(f32::NAN).is_nan());
        assert_eq!(p.round(f32::INFINITY), f32::INFINITY);
        assert_eq!(p.round(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(p.round(-0.0).to_bits(), (-0.0f32).to_bits());
    }
    assert_eq!(tf32.round(f32::MAX), f32::INFINITY, "rounds up past the largest finite value");
    assert_eq!(GemmPrecision::F32.round(0.1), 0.1);

    let values: Vec<f32> = uniform(20_000, -1.0, 1.0, 3).into_iter().zip(uniform(20_000, -30.0, 30.0, 4)).map(|(m, e)| (m * 2f64.powf(e)) as f32).collect();
    for (p, bits, low_mask) in [(tf32, 11, 0x1fffu32), (bf16, 8, 0xffff)] {
        for &x in values.iter().filter(|x| x.is_normal()) {
            let r = p.round(x);
            assert_eq!(r, round_significant(x, bits), "{} of {x:e}", p.label());
            assert_eq!(r.to_bits() & low_mask, 0, "{} of {x:e} keeps dropped bits", p.label());
            assert_eq!(p.round(r), r, "rounding is idempotent");
        }
    }
}

fn one_step(gemm: GemmPrecision) -> (f64, Vec<Vec<f64>>) {
    let data = Arc::new(synthetic_dataset(600, 100, 784, 11));
    let model = ModelConfig::seed(true);
    let train = TrainConfig::seed();
    let params = ModelParams::init(&model, 2, 1);
    let options = CpuOptions { gemm, ..Default::default() };
    let mut net = CpuBackend::<f32>::with_options(model, train.clone(), Arc::clone(&data), &params, options).unwrap();
    net.set_epoch_order(&bntrain::train::epoch_order(train.order, 0, 0, data.train.count)).unwrap();
    net.train_step(0).unwrap();
    (net.take_step_stats().unwrap().loss_sum, net.gradients().unwrap())
}

#[test]
fn the_cpu_emulation_moves_a_step_by_rounding_sized_amounts() {
    let (loss, gradients) = one_step(GemmPrecision::F32);
    for (gemm, ulp) in [(GemmPrecision::Tf32, 2.0f64.powi(-11)), (GemmPrecision::Bf16, 2.0f64.powi(-8))] {
        let (l, g) = one_step(gemm);
        // Each product carries up to 2 operand roundings; sums of many such products keep the
        // relative error near that size, while BN's backward cancellation amplifies it.
        assert_close(&format!("{} loss", gemm.label()), [l], [loss], Tolerance::new(0.0, 4.0 * ulp));
        for (t, (a, b)) in g.iter().zip(&gradients).enumerate() {
            let max = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert_close(&format!("{} gradient {t}", gemm.label()), a.iter().copied(), b.iter().copied(), Tolerance::new(64.0 * ulp * max, 0.0));
        }
        assert_ne!(g, gradients, "{}: no operand was rounded", gemm.label());
    }
}

#[test]
fn reduced_precision_runs_on_the_dense_path_and_says_so() {
    let data = Arc::new(synthetic_dataset(120, 20, 784, 5));
    let model = ModelConfig::seed(true);
    let params = ModelParams::init(&model, 0, 1);
    let open = |options| CpuBackend::<f32>::with_options(model.clone(), TrainConfig::seed(), Arc::clone(&data), &params, options);
    let net = open(CpuOptions { input: InputPath::Auto, gemm: GemmPrecision::Bf16 }).unwrap();
    assert_eq!(net.input_path(), InputPath::Dense);
    assert_eq!(net.device_name(), "cpu f32, bf16 GEMMs emulated");
    let err = open(CpuOptions { input: InputPath::Sparse, gemm: GemmPrecision::Tf32 }).err().expect("sparse + tf32 is refused");
    assert!(err.to_string().contains("dense path only"), "{err}");
}

/// One step of the emulation (in f64, so that no operand lands on another side of a rounding
/// boundary by f32 arithmetic) against a reference written out here: every GEMM operand —
/// forward x and W, backward dz, x and W — rounded on the host before an f64 product, the
/// bias gradients from the unrounded dz. Where the emulation left any of them unrounded, its
/// gradients would differ by rounding-sized amounts (~2⁻⁹ relative for bf16), far past
/// the summation-order differences allowed here.
#[test]
fn the_emulation_rounds_every_gemm_operand_forward_and_backward() {
    use bntrain::cpu::ops;
    let data = Arc::new(synthetic_dataset(600, 100, 784, 11));
    let train = TrainConfig::seed();
    for (model, gemm) in [(ModelConfig::seed(true), GemmPrecision::Bf16), (ModelConfig::seed(false), GemmPrecision::Tf32)] {
        let what = format!("{}, {}", if model.batch_norm { "BN" } else { "plain" }, gemm.label());
        let params = ModelParams::init(&model, 2, 1);
        let options = CpuOptions { gemm, ..Default::default() };
        let mut net = CpuBackend::<f64>::with_options(model.clone(), train.clone(), Arc::clone(&data), &params, options).unwrap();
        let order = bntrain::train::epoch_order(train.order, 0, 0, data.train.count);
        net.set_epoch_order(&order).unwrap();
        net.train_step(0).unwrap();
        let emulated = net.gradients().unwrap();

        let round = |v: &[f64]| v.iter().map(|&x| f64::from(gemm.round(x as f32))).collect::<Vec<f64>>();
        let b = train.batch_size;
        let indices = &order[..b];
        let labels: Vec<u8> = indices.iter().map(|&i| data.train.labels[i as usize]).collect();
        let mut inputs = vec![vec![0.0; b * 784]]; // each layer's input
        ops::gather_batch(&data.train.images, 784, indices, &mut inputs[0]);
        let (mut x_hats, mut inv_stds) = (Vec::new(), Vec::new());
        let layers = &params.layers;
        let mut logits = Vec::new();
        for (l, layer) in layers.iter().enumerate() {
            let mut z = vec![0.0; b * layer.outputs];
            ops::linear_forward(&round(&inputs[l]), &round(&layer.weight), layer.bias.as_deref(), layer.inputs, layer.outputs, &mut z);
            if l + 1 == layers.len() {
                logits = z;
                break;
            }
            let mut y = z.clone();
            if let Some(bn) = &layer.batch_norm {
                let width = layer.outputs;
                let (mut mean, mut var, mut inv_std, mut x_hat) = (vec![0.0; width], vec![0.0; width], vec![0.0; width], vec![0.0; b * width]);
                ops::batch_norm_forward_train(&z, &bn.gamma, &bn.beta, model.epsilon, &mut mean, &mut var, &mut inv_std, &mut x_hat, &mut y);
                x_hats.push(x_hat);
                inv_stds.push(inv_std);
            }
            let mut a = vec![0.0; y.len()];
            ops::activation_forward(model.activation, &y, &mut a);
            inputs.push(a);
        }
        let mut dz = vec![0.0; logits.len()];
        ops::softmax_cross_entropy(&logits, &labels, model.classes, train.loss, &mut dz);
        let mut expected = vec![Vec::new(); emulated.len()];
        let mut tensor = emulated.len();
        for (l, layer) in layers.iter().enumerate().rev() {
            let mut dw = vec![0.0; layer.weight.len()];
            let mut dx = vec![0.0; b * layer.inputs];
            ops::linear_backward(&round(&dz), &round(&inputs[l]), &round(&layer.weight), layer.inputs, layer.outputs, &mut dw, None, (l > 0).then_some(&mut dx[..]));
            // This layer's tensors in `gradients` order: weight, bias, then γ and β.
            let mut own = vec![dw];
            if layer.bias.is_some() {
                let mut db = vec![0.0; layer.outputs];
                ops::bias_gradient(&dz, &mut db);
                own.push(db);
            }
            if l == 0 {
                tensor -= own.len();
                expected.splice(tensor..tensor + own.len(), own);
                break;
            }
            // Through the activation and BN of the layer below.
            let below = &layers[l - 1];
            let mut dy = vec![0.0; dx.len()];
            ops::activation_backward(model.activation, &inputs[l], &dx, &mut dy);
            let mut below_dz = dy.clone();
            let mut bn_grads = Vec::new();
            if let Some(bn) = &below.batch_norm {
                let (mut dgamma, mut dbeta) = (vec![0.0; below.outputs], vec![0.0; below.outputs]);
                ops::batch_norm_backward(&dy, &x_hats[l - 1], &bn.gamma, &inv_stds[l - 1], &mut below_dz, &mut dgamma, &mut dbeta);
                bn_grads = vec![dgamma, dbeta];
            }
            tensor -= own.len();
            expected.splice(tensor..tensor + own.len(), own);
            // The layer below's γ and β come last among its tensors.
            tensor -= bn_grads.len();
            expected.splice(tensor..tensor + bn_grads.len(), bn_grads);
            dz = below_dz;
        }
        assert_eq!(tensor, 0, "{what}: every gradient tensor placed");
        for (t, (got, want)) in emulated.iter().zip(&expected).enumerate() {
            assert_close(&format!("{what}: gradient tensor {t}"), got.iter().copied(), want.iter().copied(), Tolerance::new(1e-12 * want.iter().fold(0.0f64, |m, v| m.max(v.abs())), 1e-9));
        }
    }
}
