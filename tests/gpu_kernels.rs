//! Every CUDA kernel, through its public launcher, against the CPU reference op of the same
//! name run in f64 on the same (f32) inputs, at awkward sizes (1, 2, 60, 100, 127, 1000+
//! rows and features). Outputs are poisoned with NaN before each launch and carry a NaN tail
//! that must survive (no write past the end). Skips without a usable GPU (fails instead with
//! BNTRAIN_REQUIRE_GPU=1).
//!
//! Tolerances: the GPU computes in f32 (IEEE, no fast math; FMA contraction allowed), the
//! reference in f64, so an elementwise result differs by a few f32 ulps (≈1e-7 relative,
//! checked at 1e-5). A sum over rows in f32 carries an absolute error that grows with the
//! terms summed, not with the result (which may cancel to near 0): such outputs are checked
//! with an absolute tolerance of 1e-5 × the largest Σ|term| (≈ 100 ulps of the worst partial
//! sum, far above f32 rounding and far below any indexing mistake, which is O(1) off).

mod gpu_support;

use bntrain::backend::GemmPrecision;
use bntrain::cpu::ops;
use bntrain::cuda::gemm::matmul;
use bntrain::cuda::kernels::{self, RunningStatsLayout};
use bntrain::cuda::{CudaError, Gpu};
use bntrain::model::{Activation, Averaging, LossReduction, StatsEstimator, VarianceKind};
use bntrain::tolerance::{assert_close, Tolerance};
use cudarc::driver::CudaSlice;
use gpu_support::*;

/// (rows, width) pairs: every awkward size in both roles, column tiles with remainders.
const SHAPES: &[(usize, usize)] = &[
    (1, 1), (1, 1000), (2, 2), (2, 127), (60, 100), (60, 10), (100, 60), (127, 127), (127, 33),
    (1000, 1), (1030, 100), (1030, 1000),
];
const ACTIVATIONS: [Activation; 2] = [Activation::Sigmoid, Activation::Relu];
const ELEMENTWISE: Tolerance = Tolerance::new(1e-6, 1e-5);

/// Max over columns of Σ_rows |m[r, c]| for a [rows, width] matrix.
fn max_column_abs_sum(m: &[f64], width: usize) -> f64 {
    let mut sums = vec![0.0f64; width];
    for row in m.chunks_exact(width) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v.abs();
        }
    }
    sums.into_iter().fold(f64::MIN_POSITIVE, f64::max)
}

fn reduction_tolerance(column_abs_sum: f64) -> Tolerance {
    Tolerance::new(1e-5 * column_abs_sum, 1e-4)
}

fn what(kernel: &str, rows: usize, width: usize, output: &str) -> String {
    format!("{kernel} [{rows}×{width}] {output}")
}

#[test]
fn gather_rows_matches_gather_batch() {
    let Some(gpu) = gpu() else { return };
    let count = 1100;
    for (seed, &features) in [1usize, 2, 60, 784, 1000].iter().enumerate() {
        let seed = seed as u64 * 10;
        let images = random_u8(count * features, seed);
        let labels: Vec<u8> = random_below(count, 10, seed + 1).into_iter().map(|l| l as u8).collect();
        let (images_d, labels_d) = (upload(&gpu, &images), upload(&gpu, &labels));
        for &rows in &[1usize, 2, 60, 100, 127, 1030] {
            let order = random_below(2 * rows + 5, count as u32, seed + 2);
            // Training form: order + device cursor at batch 1, so rows rows..2·rows are read.
            // Evaluation form: no order, no cursor, the last `rows` examples of the split.
            let cursor = upload(&gpu, &[1u32]);
            let forms: [(Vec<u32>, bool); 2] = [(order[rows..2 * rows].to_vec(), true), (((count - rows) as u32..count as u32).collect(), false)];
            for (indices, trained) in forms {
                let mut x = poisoned(&gpu, rows * features);
                let mut batch_labels: CudaSlice<u8> = upload(&gpu, &vec![0xEEu8; rows + TAIL]);
                let order_d = upload(&gpu, &order);
                let (order_v, cursor_v) = (order_d.as_view(), cursor.as_view());
                kernels::gather_rows(
                    &gpu, &images_d.as_view(), &labels_d.as_view(), features,
                    trained.then_some(&order_v), trained.then_some(&cursor_v), if trained { 0 } else { count - rows }, rows,
                    &mut x.as_view_mut(), &mut batch_labels.as_view_mut(),
                )
                .unwrap();
                let mut expected = vec![0.0f64; rows * features];
                ops::gather_batch(&images, features, &indices, &mut expected);
                // p·(1/255) in f32: two roundings, ≤ 1.2e-7 relative.
                assert_close(&what("gather_rows_f32", rows, features, "x"), read(&gpu, "x", &x, rows * features), expected, Tolerance::new(0.0, 1e-6));
                let got = fetch(&gpu, &batch_labels);
                let want: Vec<u8> = indices.iter().map(|&i| labels[i as usize]).collect();
                assert_eq!(&got[..rows], &want[..], "gather_rows_f32 labels, {rows} rows");
                assert!(got[rows..].iter().all(|&v| v == 0xEE), "gather_rows_f32 wrote labels past row {rows}");
            }
        }
    }
}

#[test]
fn gather_rows_past_the_order_gives_nan_rows_not_wild_reads() {
    let Some(gpu) = gpu() else { return };
    let (count, features, rows) = (10, 3, 4);
    let images = upload(&gpu, &random_u8(count * features, 1));
    let labels = upload(&gpu, &vec![1u8; count]);
    let order = upload(&gpu, &[0u32, 1, 2, 3, 4, 5]); // one full batch and half of the next
    let cursor = upload(&gpu, &[1u32]);
    let mut x = poisoned(&gpu, rows * features);
    let mut batch_labels: CudaSlice<u8> = upload(&gpu, &vec![0u8; rows]);
    kernels::gather_rows(
        &gpu, &images.as_view(), &labels.as_view(), features, Some(&order.as_view()), Some(&cursor.as_view()), 0, rows,
        &mut x.as_view_mut(), &mut batch_labels.as_view_mut(),
    )
    .unwrap();
    let x = read(&gpu, "x", &x, rows * features);
    assert!(x[..2 * features].iter().all(|v| v.is_finite()) && x[2 * features..].iter().all(|v| v.is_nan()), "{x:?}");
    assert_eq!(fetch(&gpu, &batch_labels), vec![1, 1, 255, 255]);
}

#[test]
fn bn_act_fwd_train_matches_batch_norm_forward_train() {
    let Some(gpu) = gpu() else { return };
    check_bn_forward_train(&gpu, SHAPES, false);
}

/// The split forward (bn_column_moments, then bn_act_fwd_train_parts) at every shape, in one
/// part or several (a short last part of 1 row; 10 000 rows, the test split's 40 parts; 79),
/// twice from the same tickets.
#[test]
fn bn_act_fwd_train_in_parts_matches_batch_norm_forward_train() {
    let Some(gpu) = gpu() else { return };
    // (20 000, 9): 79 parts, more than the merge's 64 thread rows, so a row merges two.
    let tall = [(256, 9), (257, 33), (2049, 100), (10_000, 100), (10_000, 1), (20_000, 9)];
    check_bn_forward_train(&gpu, &[SHAPES, &tall].concat(), true);
}

fn check_bn_forward_train(gpu: &Gpu, shapes: &[(usize, usize)], in_parts: bool) {
    let epsilon = 1e-3f32;
    let kernel = if in_parts { "bn_act_fwd_train_parts_f32" } else { "bn_act_fwd_train_f32" };
    for (i, &(rows, width)) in shapes.iter().enumerate() {
        for activation in ACTIVATIONS {
            let seed = 100 + 10 * i as u64;
            // An offset mean (values in [1, 3]) exercises the two-pass variance.
            let z = uniform(rows * width, 1.0, 3.0, seed);
            let gamma = uniform(width, 0.5, 2.0, seed + 1);
            let beta = uniform(width, -1.0, 1.0, seed + 2);
            let n = rows * width;
            let (mut mean, mut var, mut inv_std) = (poisoned(gpu, width), poisoned(gpu, width), poisoned(gpu, width));
            let (mut x_hat, mut y, mut a) = (poisoned(gpu, n), poisoned(gpu, n), poisoned(gpu, n));
            let (z_d, gamma_d, beta_d) = (upload(gpu, &z), upload(gpu, &gamma), upload(gpu, &beta));
            if in_parts {
                let mut moments = poisoned(gpu, kernels::bn_moments_len(rows, width));
                let mut tickets = upload(gpu, &vec![0u32; kernels::bn_tickets_len(width)]);
                // Twice from the same scratch, as evaluations run: the first launch must
                // leave every ticket at zero for the second to merge.
                for _ in 0..2 {
                    (mean, var, inv_std) = (poisoned(gpu, width), poisoned(gpu, width), poisoned(gpu, width));
                    (x_hat, y, a) = (poisoned(gpu, n), poisoned(gpu, n), poisoned(gpu, n));
                    kernels::bn_column_moments(
                        gpu, &z_d.as_view(), rows, width, epsilon, &mut moments.as_view_mut(), &mut tickets.as_view_mut(),
                        &mut mean.as_view_mut(), &mut var.as_view_mut(), &mut inv_std.as_view_mut(),
                    )
                    .unwrap();
                    kernels::bn_act_fwd_train_parts(
                        gpu, &z_d.as_view(), &gamma_d.as_view(), &beta_d.as_view(), activation, rows, width,
                        &mean.as_view(), &inv_std.as_view(), &mut x_hat.as_view_mut(), Some(&mut y.as_view_mut()), &mut a.as_view_mut(),
                    )
                    .unwrap();
                    let left = fetch(gpu, &tickets);
                    assert!(left.iter().all(|&t| t == 0), "{}: tickets left at {left:?}", what(kernel, rows, width, "tickets"));
                }
            } else {
                kernels::bn_act_fwd_train(
                    gpu, &z_d.as_view(), &gamma_d.as_view(), &beta_d.as_view(), epsilon,
                    activation, rows, width, &mut mean.as_view_mut(), &mut var.as_view_mut(), &mut inv_std.as_view_mut(),
                    &mut x_hat.as_view_mut(), Some(&mut y.as_view_mut()), &mut a.as_view_mut(),
                )
                .unwrap();
            }
            let mut r = [vec![0.0f64; width], vec![0.0; width], vec![0.0; width]];
            let (mut rx, mut ry, mut ra) = (vec![0.0f64; n], vec![0.0f64; n], vec![0.0f64; n]);
            let [rm, rv, rs] = &mut r;
            ops::batch_norm_forward_train(&wide(&z), &wide(&gamma), &wide(&beta), f64::from(epsilon), rm, rv, rs, &mut rx, &mut ry);
            ops::activation_forward(activation, &ry, &mut ra);
            // Column sums of ≤1030 values ≈ 2 in f32 (64 strided partials of ≤17 values, then
            // a tree over the 64): ≤ ~25 roundings deep, ≈1e-5 relative at worst; x̂ = (z−μ)·inv_std inherits
            // |δμ|·inv_std ≈ 1e-5·|z|·inv_std in absolute terms. In parts: sums of ≤256 values
            // so, then merges by a tree 6 deep (after a chain of up to 2 a thread row for 79
            // parts), each a few roundings of μ and M2.
            let stats = Tolerance::new(1e-6, 2e-5);
            let normalized = Tolerance::new(1e-4, 1e-4);
            let w = |o: &str| what(kernel, rows, width, o);
            assert_close(&w("mean"), read(gpu, "mean", &mean, width), rm.clone(), stats);
            assert_close(&w("var"), read(gpu, "var", &var, width), rv.clone(), stats);
            assert_close(&w("inv_std"), read(gpu, "inv_std", &inv_std, width), rs.clone(), stats);
            assert_close(&w("x_hat"), read(gpu, "x_hat", &x_hat, n), rx, normalized);
            assert_close(&w("y"), read(gpu, "y", &y, n), ry, normalized);
            assert_close(&w("a"), read(gpu, "a", &a, n), ra, normalized);
        }
    }
}

#[test]
fn bn_act_fwd_train_without_y_and_with_one_row_gives_beta() {
    let Some(gpu) = gpu() else { return };
    // One example normalized by its own statistics: μ = z, σ² = 0, x̂ = 0, y = β exactly.
    let width = 100;
    let z = uniform(width, -50.0, 50.0, 7);
    let beta = uniform(width, -1.0, 1.0, 8);
    let (mut mean, mut var, mut inv_std) = (poisoned(&gpu, width), poisoned(&gpu, width), poisoned(&gpu, width));
    let (mut x_hat, mut a) = (poisoned(&gpu, width), poisoned(&gpu, width));
    kernels::bn_act_fwd_train(
        &gpu, &upload(&gpu, &z).as_view(), &upload(&gpu, &vec![1.5f32; width]).as_view(), &upload(&gpu, &beta).as_view(), 1e-3,
        Activation::Relu, 1, width, &mut mean.as_view_mut(), &mut var.as_view_mut(), &mut inv_std.as_view_mut(),
        &mut x_hat.as_view_mut(), None, &mut a.as_view_mut(),
    )
    .unwrap();
    assert_eq!(read(&gpu, "x_hat", &x_hat, width), vec![0.0f32; width]);
    assert_eq!(read(&gpu, "var", &var, width), vec![0.0f32; width]);
    assert_eq!(read(&gpu, "mean", &mean, width), z);
    let relu: Vec<f32> = beta.iter().map(|&b| b.max(0.0)).collect();
    assert_eq!(read(&gpu, "a", &a, width), relu);
}

#[test]
fn bn_act_fwd_infer_matches_batch_norm_forward_infer() {
    let Some(gpu) = gpu() else { return };
    let epsilon = 1e-3f32;
    for (i, &(rows, width)) in SHAPES.iter().enumerate() {
        for (j, activation) in ACTIVATIONS.into_iter().enumerate() {
            let seed = 200 + 10 * i as u64 + j as u64;
            let z = uniform(rows * width, -3.0, 3.0, seed);
            let gamma = uniform(width, 0.5, 2.0, seed + 1);
            let beta = uniform(width, -1.0, 1.0, seed + 2);
            let mean = uniform(width, -1.0, 1.0, seed + 3);
            let var = uniform(width, 0.1, 2.0, seed + 4);
            let n = rows * width;
            let (mut ry, mut ra) = (vec![0.0f64; n], vec![0.0f64; n]);
            ops::batch_norm_forward_infer(&wide(&z), &wide(&gamma), &wide(&beta), &wide(&mean), &wide(&var), f64::from(epsilon), &mut ry);
            ops::activation_forward(activation, &ry, &mut ra);
            // y = (z − μ)·s + β adds terms up to |z − μ|·s ≈ 25 that may cancel: the
            // absolute error follows the terms (a few ulps of 25), not y.
            let tol = scaled(&ry, 1e-6, 1e-5);
            // With y, then without (the evaluation's form), each into buffers of its own: the
            // second's a is checked apart from the first's, and its y is never written.
            for with_y in [true, false] {
                let (mut y, mut a) = (poisoned(&gpu, n), poisoned(&gpu, n));
                let mut y_view = y.as_view_mut();
                let y_arg = if with_y { Some(&mut y_view) } else { None };
                kernels::bn_act_fwd_infer(
                    &gpu, &upload(&gpu, &z).as_view(), &upload(&gpu, &gamma).as_view(), &upload(&gpu, &beta).as_view(),
                    &upload(&gpu, &mean).as_view(), &upload(&gpu, &var).as_view(), epsilon, activation, rows, width,
                    y_arg, &mut a.as_view_mut(),
                )
                .unwrap();
                let form = if with_y { "" } else { " (no y)" };
                assert_close(&format!("{}{form}", what("bn_act_fwd_infer_f32", rows, width, "a")), read(&gpu, "a", &a, n), ra.clone(), tol);
                let y_back = read(&gpu, "y", &y, n);
                if with_y {
                    assert_close(&what("bn_act_fwd_infer_f32", rows, width, "y"), y_back, ry.clone(), tol);
                } else {
                    assert!(y_back.iter().all(|v| v.is_nan()), "bn_act_fwd_infer_f32 without y wrote into a y it was not given");
                }
            }
        }
    }
}

/// Saved activation outputs as the forward pass would leave them.
fn saved_outputs(activation: Activation, n: usize, seed: u64) -> Vec<f32> {
    match activation {
        Activation::Sigmoid => uniform(n, 0.01, 0.99, seed),
        // Relu outputs: about half exactly 0.
        Activation::Relu => uniform(n, -1.0, 1.0, seed).into_iter().map(|v| v.max(0.0)).collect(),
    }
}

#[test]
fn act_bn_bwd_matches_activation_and_batch_norm_backward() {
    let Some(gpu) = gpu() else { return };
    for (i, &(rows, width)) in SHAPES.iter().enumerate() {
        for activation in ACTIVATIONS {
            let seed = 300 + 10 * i as u64;
            let n = rows * width;
            let da = uniform(n, -1.0, 1.0, seed);
            let a = saved_outputs(activation, n, seed + 1);
            let x_hat = uniform(n, -2.0, 2.0, seed + 2);
            let gamma = uniform(width, 0.5, 2.0, seed + 3);
            let inv_std = uniform(width, 0.5, 3.0, seed + 4);
            let (mut dz, mut dg, mut db) = (poisoned(&gpu, n), poisoned(&gpu, width), poisoned(&gpu, width));
            kernels::act_bn_bwd(
                &gpu, &upload(&gpu, &da).as_view(), &upload(&gpu, &a).as_view(), &upload(&gpu, &x_hat).as_view(),
                &upload(&gpu, &gamma).as_view(), &upload(&gpu, &inv_std).as_view(), activation, rows, width,
                &mut dz.as_view_mut(), &mut dg.as_view_mut(), &mut db.as_view_mut(),
            )
            .unwrap();
            let mut dy = vec![0.0f64; n];
            ops::activation_backward(activation, &wide(&a), &wide(&da), &mut dy);
            let (mut rdz, mut rdg, mut rdb) = (vec![0.0f64; n], vec![0.0f64; width], vec![0.0f64; width]);
            let (x64, g64, s64) = (wide(&x_hat), wide(&gamma), wide(&inv_std));
            ops::batch_norm_backward(&dy, &x64, &g64, &s64, &mut rdz, &mut rdg, &mut rdb);
            // dβ, dγ: sums over rows. dz = (γ·inv_std/B)(B·dy − dβ − x̂·dγ) inherits their
            // absolute errors times γ·inv_std·(1 + |x̂|)/B, bounded via the same Σ|terms|.
            let dy_x: Vec<f64> = dy.iter().zip(&x64).map(|(d, x)| d * x).collect();
            let sum_dy = max_column_abs_sum(&dy, width);
            let sum_dyx = max_column_abs_sum(&dy_x, width);
            let k_max = g64.iter().zip(&s64).map(|(g, s)| g * s).fold(0.0f64, f64::max) / rows as f64;
            let dz_scale = k_max * (rows as f64 * dy.iter().fold(0.0f64, |m, v| m.max(v.abs())) + sum_dy + 2.0 * sum_dyx);
            let w = |o: &str| what("act_bn_bwd_f32", rows, width, o);
            assert_close(&w("d_beta"), read(&gpu, "d_beta", &db, width), rdb, reduction_tolerance(sum_dy));
            assert_close(&w("d_gamma"), read(&gpu, "d_gamma", &dg, width), rdg, reduction_tolerance(sum_dyx));
            assert_close(&w("dz"), read(&gpu, "dz", &dz, n), rdz, Tolerance::new(1e-5 * dz_scale, 1e-4));
        }
    }
}

#[test]
fn bias_act_fwd_matches_bias_add_and_activation_forward() {
    let Some(gpu) = gpu() else { return };
    for (i, &(rows, width)) in SHAPES.iter().enumerate() {
        for activation in ACTIVATIONS {
            for with_bias in [true, false] {
                let seed = 400 + 10 * i as u64;
                let n = rows * width;
                let z = uniform(n, -4.0, 4.0, seed);
                let bias = uniform(width, -1.0, 1.0, seed + 1);
                let (mut y, mut a) = (poisoned(&gpu, n), poisoned(&gpu, n));
                let bias_d = upload(&gpu, &bias);
                let bias_v = bias_d.as_view();
                kernels::bias_act_fwd(
                    &gpu, &upload(&gpu, &z).as_view(), with_bias.then_some(&bias_v), activation, rows, width,
                    Some(&mut y.as_view_mut()), &mut a.as_view_mut(),
                )
                .unwrap();
                // The reference adds the bias in f32, as the CPU's f32 linear_forward would,
                // then compares activations in f64.
                let y32: Vec<f32> = z.iter().enumerate().map(|(e, &v)| if with_bias { v + bias[e % width] } else { v }).collect();
                let mut ra = vec![0.0f64; n];
                ops::activation_forward(activation, &wide(&y32), &mut ra);
                let w = |o: &str| what("bias_act_fwd_f32", rows, width, o);
                assert_eq!(read(&gpu, "y", &y, n), y32, "{}", w("y"));
                assert_close(&w("a"), read(&gpu, "a", &a, n), ra, ELEMENTWISE);
            }
        }
    }
}

#[test]
fn act_bwd_bias_grad_matches_activation_backward_and_bias_gradient() {
    let Some(gpu) = gpu() else { return };
    for (i, &(rows, width)) in SHAPES.iter().enumerate() {
        for activation in ACTIVATIONS {
            let seed = 500 + 10 * i as u64;
            let n = rows * width;
            let da = uniform(n, -1.0, 1.0, seed);
            let a = saved_outputs(activation, n, seed + 1);
            let (mut dz, mut db) = (poisoned(&gpu, n), poisoned(&gpu, width));
            kernels::act_bwd_bias_grad(
                &gpu, &upload(&gpu, &da).as_view(), &upload(&gpu, &a).as_view(), activation, rows, width,
                &mut dz.as_view_mut(), Some(&mut db.as_view_mut()),
            )
            .unwrap();
            let mut rdz = vec![0.0f64; n];
            ops::activation_backward(activation, &wide(&a), &wide(&da), &mut rdz);
            let mut rdb = vec![0.0f64; width];
            for row in rdz.chunks_exact(width) {
                rdb.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            let w = |o: &str| what("act_bwd_bias_grad_f32", rows, width, o);
            assert_close(&w("dz"), read(&gpu, "dz", &dz, n), rdz.clone(), ELEMENTWISE);
            assert_close(&w("dbias"), read(&gpu, "dbias", &db, width), rdb, reduction_tolerance(max_column_abs_sum(&rdz, width)));
            // Without a bias gradient, dz alone.
            let mut dz2 = poisoned(&gpu, n);
            kernels::act_bwd_bias_grad(&gpu, &upload(&gpu, &da).as_view(), &upload(&gpu, &a).as_view(), activation, rows, width, &mut dz2.as_view_mut(), None).unwrap();
            assert_close(&w("dz (no bias)"), read(&gpu, "dz", &dz2, n), rdz, ELEMENTWISE);
        }
    }
}

#[test]
fn softmax_xent_matches_softmax_cross_entropy() {
    let Some(gpu) = gpu() else { return };
    // One block up to 256 rows, then one per 256 rows up to 128 (40000 rows: two a thread).
    let shapes: &[(usize, usize)] =
        &[(1, 2), (1, 10), (2, 10), (60, 10), (100, 3), (127, 127), (1030, 10), (300, 256), (1000, 1), (10_000, 10), (40_000, 3)];
    for (i, &(rows, classes)) in shapes.iter().enumerate() {
        for reduction in [LossReduction::Sum, LossReduction::Mean] {
            let seed = 600 + 10 * i as u64;
            let n = rows * classes;
            let z = uniform(n, -5.0, 5.0, seed);
            let bias = uniform(classes, -1.0, 1.0, seed + 1);
            let labels: Vec<u8> = random_below(rows, classes as u32, seed + 2).into_iter().map(|l| l as u8).collect();
            let grad_scale = match reduction {
                LossReduction::Sum => 1.0f32,
                LossReduction::Mean => 1.0 / rows as f32,
            };
            let (mut dl, mut db) = (poisoned(&gpu, n), poisoned(&gpu, classes));
            let mut predicted: CudaSlice<u8> = upload(&gpu, &vec![0xEEu8; rows + TAIL]);
            // The accumulators start non-zero: the kernel adds to them.
            let mut loss: CudaSlice<f64> = upload(&gpu, &[0.5f64]);
            let mut correct: CudaSlice<u64> = upload(&gpu, &[3u64]);
            kernels::softmax_xent(
                &gpu, &upload(&gpu, &z).as_view(), Some(&upload(&gpu, &bias).as_view()), &upload(&gpu, &labels).as_view(),
                rows, classes, grad_scale, Some(&mut dl.as_view_mut()), Some(&mut db.as_view_mut()), Some(&mut predicted.as_view_mut()),
                &mut loss.as_view_mut(), &mut correct.as_view_mut(),
            )
            .unwrap();
            // The logits the GPU sees: z + bias rounded to f32 (so argmax ties agree exactly).
            let logits32: Vec<f32> = z.iter().enumerate().map(|(e, &v)| v + bias[e % classes]).collect();
            let logits = wide(&logits32);
            let mut rdl = vec![0.0f64; n];
            let (rloss, rcorrect) = ops::softmax_cross_entropy(&logits, &labels, classes, reduction, &mut rdl);
            let mut rdb = vec![0.0f64; classes];
            for row in rdl.chunks_exact(classes) {
                rdb.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            let rpred: Vec<u8> = logits.chunks_exact(classes).map(|r| ops::argmax(r) as u8).collect();
            let w = |o: &str| what("softmax_xent_f32", rows, classes, o);
            // Per example ln Σe^{v−m} + m − v_t with |v| ≤ 6 and ≤ 256 exponentials in f32:
            // ≤ ~3e-5 absolute each (expf is within 2 ulps; the sum adds K roundings).
            let got_loss = fetch(&gpu, &loss)[0] - 0.5;
            assert_close(&w("loss"), [got_loss], [rloss], Tolerance::new(3e-5 * rows as f64, 1e-6));
            assert_eq!(fetch(&gpu, &correct)[0] - 3, rcorrect, "{}", w("correct"));
            let got_pred = fetch(&gpu, &predicted);
            assert_eq!(&got_pred[..rows], &rpred[..], "{}", w("predicted"));
            assert!(got_pred[rows..].iter().all(|&v| v == 0xEE), "{}: wrote past the end", w("predicted"));
            // Probabilities carry the relative error of the sum (≤ K+2 roundings).
            let prob_tol = Tolerance::new(3e-5 * f64::from(grad_scale), 1e-4);
            assert_close(&w("dlogits"), read(&gpu, "dlogits", &dl, n), rdl.clone(), prob_tol);
            assert_close(&w("dbias"), read(&gpu, "dbias", &db, classes), rdb, Tolerance::new(3e-5 * f64::from(grad_scale) * rows as f64, 1e-4));
        }
    }
}

/// Launched twice, with one block and with several (whose scratch's ticket must be reset by
/// the first launch for the second to add up), only the accumulators change.
#[test]
fn softmax_xent_without_gradients_only_accumulates() {
    let Some(gpu) = gpu() else { return };
    for rows in [127, 1030] {
        let classes = 10;
        let z = uniform(rows * classes, -5.0, 5.0, 1);
        let labels: Vec<u8> = random_below(rows, classes as u32, 2).into_iter().map(|l| l as u8).collect();
        let mut loss: CudaSlice<f64> = upload(&gpu, &[0.0f64]);
        let mut correct: CudaSlice<u64> = upload(&gpu, &[0u64]);
        let (z_d, labels_d) = (upload(&gpu, &z), upload(&gpu, &labels));
        for _ in 0..2 {
            kernels::softmax_xent(&gpu, &z_d.as_view(), None, &labels_d.as_view(), rows, classes, 1.0, None, None, None, &mut loss.as_view_mut(), &mut correct.as_view_mut()).unwrap();
        }
        let mut scratch = vec![0.0f64; rows * classes];
        let (rloss, rcorrect) = ops::softmax_cross_entropy(&wide(&z), &labels, classes, LossReduction::Sum, &mut scratch);
        assert_close(&format!("softmax_xent_f32 loss, {rows} rows, twice"), fetch(&gpu, &loss), [2.0 * rloss], Tolerance::new(3e-5 * 2.0 * rows as f64, 1e-6));
        assert_eq!(fetch(&gpu, &correct)[0], 2 * rcorrect, "{rows} rows");
    }
}

#[test]
fn softmax_blocks_split_rows_by_256_up_to_128_blocks() {
    assert_eq!([1, 60, 256, 257, 1024, 10_000, 32_768, 32_769, 60_000].map(kernels::softmax_blocks), [1, 1, 1, 2, 4, 40, 128, 128, 128]);
}

#[test]
fn running_stats_update_matches_update_running_stats() {
    let Some(gpu) = gpu() else { return };
    let estimators = [
        StatsEstimator { averaging: Averaging::Ema { decay: 0.999 }, variance: VarianceKind::Biased },
        StatsEstimator { averaging: Averaging::Ema { decay: 0.9 }, variance: VarianceKind::Unbiased },
        StatsEstimator { averaging: Averaging::Cumulative, variance: VarianceKind::Biased },
        StatsEstimator { averaging: Averaging::Cumulative, variance: VarianceKind::Unbiased },
    ];
    for (case, (widths, batch_size)) in [(vec![100usize, 1, 127], 60usize), (vec![1000], 2), (vec![2, 60], 127)].into_iter().enumerate() {
        let layout = RunningStatsLayout::new(&gpu, &widths, &estimators).unwrap();
        let total: usize = widths.iter().sum();
        let (e, layers) = (estimators.len(), widths.len());
        let seed = 700 + 10 * case as u64;
        let mut rm = uniform(e * total, -1.0, 1.0, seed);
        let mut rv = uniform(e * total, 0.5, 2.0, seed + 1);
        let mut counts: Vec<u64> = (0..e * layers).map(|i| (i % 5) as u64).collect();
        let (mut rm_d, mut rv_d, mut counts_d) = (upload(&gpu, &rm), upload(&gpu, &rv), upload(&gpu, &counts));
        let (mut rm64, mut rv64) = (wide(&rm), wide(&rv));
        for step in 0..3u64 {
            let bm = uniform(total, -2.0, 2.0, seed + 10 + step);
            let bv = uniform(total, 0.0, 3.0, seed + 20 + step);
            kernels::running_stats_update(
                &gpu, &layout, batch_size, &upload(&gpu, &bm).as_view(), &upload(&gpu, &bv).as_view(),
                &mut rm_d.as_view_mut(), &mut rv_d.as_view_mut(), &mut counts_d.as_view_mut(),
            )
            .unwrap();
            let mut offset = 0;
            for (l, &w) in widths.iter().enumerate() {
                for (k, est) in estimators.iter().enumerate() {
                    let r = k * total + offset..k * total + offset + w;
                    let (m, v) = (&mut rm64[r.clone()], &mut rv64[r]);
                    ops::update_running_stats(*est, batch_size, counts[k * layers + l], m, v, &wide(&bm[offset..offset + w]), &wide(&bv[offset..offset + w]));
                    counts[k * layers + l] += 1;
                }
                offset += w;
            }
        }
        // Two products and a sum per update in f32 (decay rounded to f32: ≈6e-8 relative).
        let tol = Tolerance::new(1e-6, 1e-5);
        rm = fetch(&gpu, &rm_d);
        rv = fetch(&gpu, &rv_d);
        assert_close(&format!("running_stats_update_f32 {widths:?} mean"), rm, rm64, tol);
        assert_close(&format!("running_stats_update_f32 {widths:?} var"), rv, rv64, tol);
        assert_eq!(fetch(&gpu, &counts_d), counts, "running_stats_update_f32 batch counts");
    }
}

#[test]
fn sgd_update_matches_sgd_update() {
    let Some(gpu) = gpu() else { return };
    for (i, &n) in [1usize, 2, 60, 127, 1000, 89_610].iter().enumerate() {
        for momentum in [0.0f32, 0.9] {
            let seed = 800 + 10 * i as u64;
            let w = uniform(n, -2.0, 2.0, seed);
            let g = uniform(n, -5.0, 5.0, seed + 1);
            let v = uniform(n, -1.0, 1.0, seed + 2);
            let lr = 0.01f32;
            let (mut w_d, mut v_d) = (upload(&gpu, &w), upload(&gpu, &v));
            let mut cursor: CudaSlice<u32> = upload(&gpu, &[7u32]);
            let use_v = momentum > 0.0;
            let mut v_view = v_d.as_view_mut();
            let v_arg = if use_v { Some(&mut v_view) } else { None };
            kernels::sgd_update(&gpu, &mut w_d.as_view_mut(), &upload(&gpu, &g).as_view(), v_arg, lr, momentum, Some(&mut cursor.as_view_mut())).unwrap();
            let (mut rw, mut rv) = (wide(&w), wide(&v));
            ops::sgd_update(&mut rw, &wide(&g), use_v.then_some(rv.as_mut_slice()), f64::from(lr), f64::from(momentum));
            let tol = Tolerance::new(1e-6, 1e-6);
            assert_close(&format!("sgd_update_f32 n={n} μ={momentum} w"), fetch(&gpu, &w_d), rw, tol);
            assert_close(&format!("sgd_update_f32 n={n} μ={momentum} v"), fetch(&gpu, &v_d), rv, tol);
            assert_eq!(fetch(&gpu, &cursor), vec![8], "sgd_update_f32 advances the cursor once");
        }
    }
}

/// With every operand 1 + ¼ulp of the format (1 + 2⁻¹² for TF32, 1 + 2⁻⁹ for bf16), the
/// format holds each as exactly 1, under round-to-nearest, ties away or truncation alike, so
/// every element of a 512×512×512 product is exactly 512; in f32 it is 512·(1 + 2·¼ulp).
/// (Large enough that cuBLAS takes its tensor-core kernels: the fast compute types allow
/// them, and a small product may still run in f32.)
#[test]
fn reduced_precision_gemms_drop_the_low_operand_bits() {
    let Some(gpu) = gpu() else { return };
    let n = 512;
    for (precision, operand) in [(GemmPrecision::Tf32, 1.0 + 2f32.powi(-12)), (GemmPrecision::Bf16, 1.0 + 2f32.powi(-9))] {
        let ones = upload(&gpu, &vec![operand; n * n]);
        for p in [precision, GemmPrecision::F32] {
            let mut c = poisoned(&gpu, n * n);
            matmul(&gpu, p, false, true, n, n, n, &ones.as_view(), &ones.as_view(), &mut c.as_view_mut(), false).unwrap();
            let c = read(&gpu, "c", &c, n * n);
            if p == GemmPrecision::F32 {
                assert!(c.iter().all(|&v| v > 512.0), "f32 keeps the operands' low bits: {}", c[0]);
            } else {
                assert!(c.iter().all(|&v| v == 512.0), "{}: operands not rounded to the format ({} ≠ 512)", p.label(), c[0]);
            }
        }
    }
}

/// Every transpose, accumulation and precision of [`check_matmul`], on small shapes.
#[test]
fn matmul_matches_cpu_matmul_for_every_transpose() {
    let Some(gpu) = gpu() else { return };
    let shapes: &[(usize, usize, usize)] = &[(1, 1, 1), (2, 3, 1), (60, 100, 784), (100, 784, 60), (60, 784, 100), (127, 1, 33), (1000, 10, 100), (1, 1000, 2), (33, 9, 65)];
    // Every shape is small enough for cuda/small_gemm.cu: once with it switched on (where the
    // routing allows: a·bᵀ with k ≥ 64, or k ≤ 128), once through cuBLAS.
    for (i, &shape, small) in shapes.iter().enumerate().flat_map(|(i, s)| [(i, s, true), (i, s, false)]) {
        gpu.set_small_gemm(small);
        check_matmul(&gpu, if small { "small-gemm kernels" } else { "cuBLAS" }, shape, 900 + 10 * i as u64, 0);
    }
}

/// With GEMM tuning on, products above its threshold run whichever of cuBLAS's kernel and
/// cublasLt's candidates was fastest: checked as above, also with operands 4 bytes off
/// alignment (cublasLt's kernels may assume 16 or more), and each tuned shape twice in a
/// row gives the same bits.
#[test]
fn tuned_matmul_matches_cpu_matmul() {
    let Some(gpu) = gpu() else { return };
    gpu.set_small_gemm(false);
    gpu.set_gemm_tuning(true);
    let shapes: &[(usize, usize, usize)] = &[(256, 300, 784), (1030, 129, 100)];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        assert!(m * n * k >= bntrain::cuda::gemm_tuning::TUNE_MIN_MACS, "{m}×{n}×{k} is below the tuning threshold");
        for offset in [0, 1] {
            check_matmul(&gpu, &format!("tuned, operands {offset} floats in"), (m, n, k), 2000 + 10 * i as u64, offset);
        }
        let (a, b) = (upload(&gpu, &uniform(m * k, -1.0, 1.0, 7)), upload(&gpu, &uniform(k * n, -1.0, 1.0, 8)));
        let twice: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                let mut c = poisoned(&gpu, m * n);
                matmul(&gpu, GemmPrecision::F32, false, true, m, n, k, &a.as_view(), &b.as_view(), &mut c.as_view_mut(), false).unwrap();
                read(&gpu, "c", &c, m * n)
            })
            .collect();
        assert!(twice[0].iter().zip(&twice[1]).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}×{n}×{k}: two tuned products differ");
    }
    let tuned = bntrain::cuda::gemm_tuning::tuned_gemms();
    gpu.set_gemm_tuning(false);
    // 2 shapes × 4 transposes × 2 accumulations × 3 precisions × 2 alignments.
    assert_eq!(tuned.len(), 96, "{tuned:#?}");
    for t in &tuned {
        assert!(t.chosen < t.us.len().max(1) && (t.us.is_empty() || t.us[t.chosen].is_finite()), "{t:?}");
    }
}

/// One shape in every transpose, accumulating or not, in each precision, against the f64
/// product: in f32 against the exact product; with TF32 or bf16 operands against the
/// product of the operands rounded on the host ([`GemmPrecision::round`], to nearest even).
/// TF32 operands are rounded by the hardware, which may round differently (truncate, or
/// round ties away): one ulp of the format per operand (2⁻¹⁰ relative) is allowed. bf16
/// operands are rounded by cuda/bf16.cu, bit for bit as on the host, and their products are
/// exact in f32: only the f32 accumulation differs, by at most an ulp of the terms' sum per
/// addition (k·2⁻²² of Σ|a||b|, whatever order or rounding the tensor cores use), so a
/// term dropped or added twice (about 0.25 on average) fails.
/// `reduced_precision_gemms_drop_the_low_operand_bits` shows the formats are used at all.
/// The operands and the output start `offset` floats into their buffers.
fn check_matmul(gpu: &Gpu, path: &str, (m, n, k): (usize, usize, usize), seed: u64, offset: usize) {
    // The tolerance beyond f32's, relative to Σ|a||b|.
    let accumulation = k as f64 * 2.0f64.powi(-22);
    let precisions = [(GemmPrecision::F32, 0.0), (GemmPrecision::Tf32, 2.0 * 2.0f64.powi(-10)), (GemmPrecision::Bf16, accumulation)];
    let with_offset = |v: Vec<f32>| [vec![f32::NAN; offset], v].concat();
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for (accumulate, &(precision, extra)) in [false, true].into_iter().flat_map(|acc| precisions.iter().map(move |p| (acc, p))) {
            let a = uniform(m * k, -1.0, 1.0, seed);
            let b = uniform(k * n, -1.0, 1.0, seed + 1);
            let c0 = uniform(m * n, -1.0, 1.0, seed + 2);
            let mut c = if accumulate {
                let mut host = with_offset(c0.clone());
                host.extend(std::iter::repeat_n(f32::NAN, TAIL));
                upload(gpu, &host)
            } else {
                poisoned(gpu, offset + m * n)
            };
            let (a_dev, b_dev) = (upload(gpu, &with_offset(a.clone())), upload(gpu, &with_offset(b.clone())));
            matmul(gpu, precision, ta, tb, m, n, k, &a_dev.slice(offset..), &b_dev.slice(offset..), &mut c.slice_mut(offset..), accumulate).unwrap();
            let mut rc = wide(&c0);
            let rounded = |v: &[f32]| wide(&v.iter().map(|&x| precision.round(x)).collect::<Vec<f32>>());
            ops::matmul(ta, tb, m, n, k, &rounded(&a), &rounded(&b), &mut rc, accumulate);
            // Bound the f32 sum by the magnitude of its terms: Σ_k |a||b| ≤ k.
            let mut abs_sum = vec![0.0f64; m * n];
            let (a_abs, b_abs): (Vec<f64>, Vec<f64>) = (a.iter().map(|v| f64::from(v.abs())).collect(), b.iter().map(|v| f64::from(v.abs())).collect());
            ops::matmul(ta, tb, m, n, k, &a_abs, &b_abs, &mut abs_sum, false);
            let scale = abs_sum.iter().fold(1.0f64, |s, v| s.max(*v));
            let mut got = read(gpu, "c", &c, offset + m * n);
            assert!(got[..offset].iter().all(|v| v.is_nan()), "matmul ({path}) {m}×{n}×{k}: wrote before c");
            got.drain(..offset);
            assert_close(
                &format!("matmul {} ({path}) {m}×{n}×{k} ta={ta} tb={tb} accumulate={accumulate}", precision.label()),
                got, rc, Tolerance::new((1e-6 + extra) * scale, 1e-5),
            );
        }
    }
}

/// NaN and ±∞ are counted, the largest finite floats are not; counts add across launches.
#[test]
fn count_non_finite_counts_nan_and_infinities() {
    let Some(gpu) = gpu() else { return };
    for n in [1usize, 5, 1000, 70_001] {
        let mut x = uniform(n, -1e30, 1e30, n as u64);
        let mut want = 0u32;
        for i in (0..n).step_by(7) {
            x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
            want += 1;
        }
        if n > 3 {
            x[n - 2] = f32::MAX;
            x[n - 3] = f32::MIN;
        }
        let mut count = upload(&gpu, &[3u32]);
        let xs = upload(&gpu, &x);
        kernels::count_non_finite(&gpu, &xs.as_view(), &mut count.as_view_mut()).unwrap();
        kernels::count_non_finite(&gpu, &xs.as_view(), &mut count.as_view_mut()).unwrap();
        assert_eq!(fetch(&gpu, &count), vec![3 + 2 * want], "n = {n}");
    }
}

/// bf16 operand rounding, bit for bit the host's (`half`), on every float class: ties to
/// even both ways, carries into the exponent and to ±∞, NaN (kept NaN with its sign), ±0,
/// subnormals; the tail past n is left alone.
#[test]
fn round_to_bf16_matches_the_host_rounding_bitwise() {
    let Some(gpu) = gpu() else { return };
    let specials = [
        0x3F80_8000u32, 0x3F81_8000, 0x3F80_FFFF, 0x7F7F_FFFF, 0xFF7F_FFFF, 0x7F7F_8000, 0x7F80_0000, 0xFF80_0000,
        0x7FC0_0001, 0xFF80_0001, 0x0000_0000, 0x8000_0000, 0x0000_8000, 0x0001_8000,
    ];
    for n in [1usize, 14, 1000, 70_001] {
        let mut x = uniform(n, -3.0, 3.0, n as u64);
        for (v, bits) in x.iter_mut().zip(specials) {
            *v = f32::from_bits(bits);
        }
        let mut out = upload(&gpu, &vec![0xDEADu16; n + 3]);
        kernels::round_to_bf16(&gpu, &upload(&gpu, &x).as_view(), &mut out.as_view_mut()).unwrap();
        let got = fetch(&gpu, &out);
        for (i, &v) in x.iter().enumerate() {
            let want = half::bf16::from_f32(v).to_bits();
            assert_eq!(got[i], want, "n = {n}, element {i} ({:#010x})", v.to_bits());
        }
        assert_eq!(&got[n..], &[0xDEAD; 3], "n = {n}: wrote past the end");
    }
}

#[test]
fn launchers_refuse_bad_sizes_instead_of_launching() {
    let Some(gpu) = gpu() else { return };
    let small = upload(&gpu, &[0.0f32; 4]);
    let mut out = poisoned(&gpu, 4);
    let is_precondition = |r: Result<(), CudaError>| matches!(r, Err(CudaError::Launch { ref message, .. }) if message.contains("precondition"));
    // a [2, 3] activation does not fit in 4 floats.
    assert!(is_precondition(kernels::bias_act_fwd(&gpu, &small.as_view(), None, Activation::Sigmoid, 2, 3, None, &mut out.as_view_mut())));
    // width 0 and rows 0.
    assert!(is_precondition(kernels::bias_act_fwd(&gpu, &small.as_view(), None, Activation::Sigmoid, 0, 3, None, &mut out.as_view_mut())));
    assert!(is_precondition(matmul(&gpu, GemmPrecision::F32, false, false, 2, 2, 2, &small.as_view(), &small.slice(..3), &mut out.as_view_mut(), false)));
    // The evaluation gather must stay inside the split.
    let images = upload(&gpu, &[0u8; 6]);
    let labels = upload(&gpu, &[0u8; 3]);
    let mut bl: CudaSlice<u8> = upload(&gpu, &[0u8; 4]);
    let mut x = poisoned(&gpu, 8);
    assert!(is_precondition(kernels::gather_rows(&gpu, &images.as_view(), &labels.as_view(), 2, None, None, 2, 2, &mut x.as_view_mut(), &mut bl.as_view_mut())));
    // dbias without dlogits.
    let mut loss: CudaSlice<f64> = upload(&gpu, &[0.0f64]);
    let mut correct: CudaSlice<u64> = upload(&gpu, &[0u64]);
    assert!(is_precondition(kernels::softmax_xent(
        &gpu, &small.as_view(), None, &labels.slice(..2), 2, 2, 1.0, None, Some(&mut out.as_view_mut()), None,
        &mut loss.as_view_mut(), &mut correct.as_view_mut(),
    )));
    let _: &Gpu = &gpu;
}
