//! The CPU backend's sparse first layer (src/cpu/sparse.rs) against the dense reference
//! operations it replaces, and the backend with it against the backend without it.

mod support;

use bntrain::backend::{Backend, SplitKind, StatsMode};
use bntrain::cpu::sparse::{self, ColumnScratch, SparseImages};
use bntrain::cpu::{ops, CpuBackend, CpuOptions, InputPath};
use bntrain::data::{Dataset, DatasetKind, Split, CLASSES};
use bntrain::model::{ModelConfig, ModelParams, TrainConfig};
use bntrain::tolerance::{assert_close, Tolerance};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use support::{lockstep_losses, synthetic_dataset, uniform};

/// In f64 the sparse and dense paths add the same non-zero products in different orders
/// (and the zero products the dense one adds are exact): they agree to rounding, ~1e-15
/// relative per sum of ≤ 784 terms of magnitude ≤ 1.
const REORDERED_F64: Tolerance = Tolerance::new(1e-12, 1e-12);

/// `count` images of `features` pixels, each zero with probability 1 − density, else 1..=255.
fn sparse_bytes(count: usize, features: usize, density: f64, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count * features)
        .map(|_| if rng.random::<f64>() < density { rng.random_range(1..=255u8) } else { 0 })
        .collect()
}

/// A dataset shaped like MNIST with 19% non-zero pixels (MNIST's own fraction).
fn mnist_like(train: usize, test: usize, seed: u64) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut split = |count: usize, seed: u64| Split {
        images: sparse_bytes(count, 784, 0.19, seed),
        labels: (0..count).map(|_| rng.random_range(0..CLASSES as u8)).collect(),
        count,
        features: 784,
        classes: CLASSES,
    };
    let (train, test) = (split(train, seed + 1), split(test, seed + 2));
    Dataset { kind: DatasetKind::Mnist, train, test, source: "mnist-like".into() }
}

fn sparse_options() -> CpuOptions {
    CpuOptions { input: InputPath::Sparse, ..Default::default() }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(m: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols * rows).map(|i| m[(i % rows) * cols + i / rows]).collect()
}

#[test]
fn sparse_first_layer_matches_the_dense_gemm() {
    // Widths around every column block (64, 56, …, 8) and the overlapping and scalar tails.
    let widths = [1usize, 3, 7, 8, 9, 36, 60, 63, 64, 65, 100, 127, 130, 200];
    // One scratch for every shape: what an earlier call left in it must not leak.
    let mut scratch = ColumnScratch::default();
    let mut case = 0u64;
    for &features in &[1usize, 5, 784] {
        for &density in &[0.0, 0.19, 1.0] {
            let images = sparse_bytes(40, features, density, case);
            let index = SparseImages::new(&images, features);
            // A batch with a repeated image and the first and last ones.
            let indices: Vec<u32> = vec![7, 0, 39, 3, 3, 21, 12, 38, 1, 30, 5, 17, 9];
            let rows = indices.len();
            let mut x = vec![0.0; rows * features];
            ops::gather_batch(&images, features, &indices, &mut x);
            for &outputs in &widths {
                case += 1;
                let what = format!("{features} pixels at density {density} → {outputs} outputs");
                let w = uniform(outputs * features, -1.0, 1.0, case); // [out, in]
                let w_t = transpose(&w, outputs, features);
                let bias = uniform(outputs, -1.0, 1.0, case + 1000);
                for bias in [Some(&bias[..]), None] {
                    let mut expected = vec![0.0; rows * outputs];
                    ops::linear_forward(&x, &w, bias, features, outputs, &mut expected);
                    let mut z = vec![f64::NAN; rows * outputs];
                    sparse::forward(&index, &indices, &w_t, bias, outputs, &mut z);
                    assert_close(&format!("z, {what}, bias {}", bias.is_some()), z, expected, REORDERED_F64);
                }
                let dz = uniform(rows * outputs, -1.0, 1.0, case + 2000);
                let mut expected = vec![0.0; outputs * features];
                ops::linear_backward(&dz, &x, &w, features, outputs, &mut expected, None, None);
                let mut dw_t = vec![f64::NAN; features * outputs];
                sparse::weight_gradient(&index, &indices, &dz, outputs, &mut dw_t, &mut scratch);
                assert_close(&format!("dW, {what}"), transpose(&dw_t, features, outputs), expected, REORDERED_F64);
            }
        }
    }
}

#[test]
fn sparse_images_index_the_non_zero_pixels() {
    let images = sparse_bytes(50, 784, 0.19, 9);
    let index = SparseImages::new(&images, 784);
    let nonzero = images.iter().filter(|&&p| p != 0).count() as f64 / images.len() as f64;
    assert_eq!(index.density(), nonzero);
    assert!((0.17..0.21).contains(&index.density()), "density {}", index.density());
    assert_eq!(SparseImages::new(&[], 784).density(), 1.0, "nothing to skip in an empty set");
    assert_eq!(SparseImages::new(&[0; 784 * 3], 784).density(), 0.0);
}

/// Trains a sparse and a dense f64 backend side by side and compares everything.
fn compare_paths(batch_norm: bool, momentum: f64) {
    let data = Arc::new(mnist_like(600, 100, 3));
    let model = ModelConfig::seed(batch_norm);
    let mut train = TrainConfig::seed();
    train.momentum = momentum;
    let params = ModelParams::init(&model, 5, train.estimators().len());
    let open = |path| CpuBackend::<f64>::with_options(model.clone(), train.clone(), data.clone(), &params, CpuOptions { input: path, ..Default::default() }).unwrap();
    let (mut sparse, mut dense) = (open(InputPath::Sparse), open(InputPath::Dense));
    assert_eq!((sparse.input_path(), dense.input_path()), (InputPath::Sparse, InputPath::Dense));
    let what = |s: &str| format!("{s} (BN {batch_norm}, momentum {momentum})");

    // Parameters go in and come out in the canonical [out, in] layout.
    assert_eq!(sparse.params().unwrap(), params, "{}", what("set_params then params"));
    let order = bntrain::train::epoch_order(train.order, train.seed, 0, data.train.count);
    for net in [&mut sparse as &mut dyn Backend, &mut dense] {
        net.set_epoch_order(&order).unwrap();
        net.train_step(0).unwrap();
    }
    let (gs, gd) = (sparse.gradients().unwrap(), dense.gradients().unwrap());
    for (t, (s, d)) in gs.into_iter().zip(gd).enumerate() {
        assert_close(&what(&format!("gradient of trainable tensor {t} after one step")), s, d, REORDERED_F64);
    }
    for step in 1..40 {
        sparse.train_step(step % 10).unwrap();
        dense.train_step(step % 10).unwrap();
    }
    // 40 steps of SGD carry the rounding differences along without amplifying them much.
    let tol = Tolerance::new(1e-10, 1e-9);
    let (ps, pd) = (sparse.params().unwrap(), dense.params().unwrap());
    for (l, (s, d)) in ps.layers.iter().zip(&pd.layers).enumerate() {
        assert_close(&what(&format!("layer {l} weight after 40 steps")), s.weight.clone(), d.weight.clone(), tol);
        if let (Some(s), Some(d)) = (&s.batch_norm, &d.batch_norm) {
            assert_close(&what("running mean"), s.running[0].mean.clone(), d.running[0].mean.clone(), tol);
            assert_close(&what("running variance"), s.running[0].var.clone(), d.running[0].var.clone(), tol);
        }
    }
    let (vs, vd) = (sparse.velocity().unwrap(), dense.velocity().unwrap());
    assert_eq!(vs.len(), vd.len());
    for (s, d) in vs.into_iter().zip(vd) {
        assert_close(&what("momentum"), s, d, tol);
    }
    let (ss, sd) = (sparse.take_step_stats().unwrap(), dense.take_step_stats().unwrap());
    assert_close(&what("training loss"), [ss.loss_sum], [sd.loss_sum], tol);
    for mode in [StatsMode::Population, StatsMode::Batch] {
        let (es, ed) = (
            sparse.evaluate(SplitKind::Test, mode, None).unwrap(),
            dense.evaluate(SplitKind::Test, mode, None).unwrap(),
        );
        assert_close(&what(&format!("test loss, {mode:?} statistics")), [es.loss_sum], [ed.loss_sum], tol);
        assert_eq!(es.correct, ed.correct, "{}", what("test accuracy"));
    }
    assert_eq!(
        sparse.predict_each(SplitKind::Test, 20, StatsMode::Population).unwrap(),
        dense.predict_each(SplitKind::Test, 20, StatsMode::Population).unwrap()
    );
}

#[test]
fn sparse_and_dense_backends_train_alike() {
    compare_paths(true, 0.0);
    compare_paths(false, 0.9);
}

#[test]
fn sparse_backend_round_trips_momentum() {
    let data = Arc::new(mnist_like(120, 20, 4));
    let model = ModelConfig::seed(true);
    let mut train = TrainConfig::seed();
    train.momentum = 0.5;
    let params = ModelParams::init(&model, 1, 1);
    let mut net = CpuBackend::<f64>::with_options(model, train, data, &params, sparse_options()).unwrap();
    let velocity: Vec<Vec<f64>> = net.velocity().unwrap().iter().enumerate().map(|(t, v)| uniform(v.len(), -1.0, 1.0, t as u64)).collect();
    net.set_velocity(&velocity).unwrap();
    assert_eq!(net.velocity().unwrap(), velocity, "momentum goes in and comes out in the canonical layout");
}

#[test]
fn f32_sparse_backend_follows_the_f64_dense_oracle() {
    // As f32_and_f64_backends_agree_over_many_steps (tests/cpu_reference.rs), on mostly-zero
    // pixels where the f32 trainer takes the sparse path.
    let data = Arc::new(mnist_like(600, 200, 8));
    let model = ModelConfig::seed(true);
    let train = TrainConfig::seed();
    let params = ModelParams::init(&model, 0, 1);
    let mut a = CpuBackend::<f32>::with_options(model.clone(), train.clone(), data.clone(), &params, sparse_options()).unwrap();
    let mut b = CpuBackend::<f64>::with_options(model, train.clone(), data.clone(), &params, CpuOptions { input: InputPath::Dense, ..Default::default() }).unwrap();
    let losses = lockstep_losses(&mut a, &mut b, &train, data.train.count, 100, 25);
    assert_eq!(losses[0].len(), 8);
    assert_close("f32 sparse vs f64 dense losses", losses[0].clone(), losses[1].clone(), Tolerance::new(1e-4, 1e-3));
}

#[test]
fn auto_takes_the_sparse_path_for_mostly_zero_pixels_only() {
    let model = ModelConfig::seed(true);
    let train = TrainConfig::seed();
    let params = ModelParams::init(&model, 0, 1);
    let open = |data: Dataset| CpuBackend::<f32>::new(model.clone(), train.clone(), Arc::new(data), &params).unwrap();
    let expected = if sparse::fast_on_this_cpu() { InputPath::Sparse } else { InputPath::Dense };
    assert_eq!(open(mnist_like(120, 20, 5)).input_path(), expected);
    assert_eq!(open(synthetic_dataset(120, 20, 784, 5)).input_path(), InputPath::Dense, "uniform noise is 255/256 non-zero");
}
