//! Property tests of the reference batch-norm operations (`cpu::ops`, in f64) on random
//! shapes: batch 2..=64, width 1..=40, features of random scale (1e-2..1e2) and offset (up
//! to ±1e4), random γ, β, ε and upstream gradient.
//!
//! Every "≈" below is `tolerance::check_close` with a bound derived from the conditioning of
//! the case, not a fixed fudge: with offset 1e4 and scale 1e-2 the normalized values can only
//! be as exact as B·ε_mach·max|z|/σ allows, and the bound says so.
//!
//! The invariants (per feature j, over the batch b):
//! - forward: mean_b x̂ = 0 and Var_b x̂ = σ²/(σ²+ε) with σ² the biased batch variance;
//!   y = γx̂ + β has mean β and variance γ²·Var(x̂);
//! - backward: Σ_b dz = 0 (shifting z changes nothing); Σ_b dz·x̂ = γ·dγ·ε/(σ²+ε)^{3/2}, the
//!   derivative along a scaling of z about its mean, which is 0 only when ε = 0 (with ε > 0
//!   BN is not exactly scale-invariant) and is checked at ε = 0 too; dβ = Σ_b dy and
//!   dγ = Σ_b dy·x̂;
//! - running statistics: after an EMA (or cumulative) update each running value lies between
//!   its old value and the batch statistic (the batch variance scaled by B/(B−1) when the
//!   estimator is unbiased).

use bntrain::cpu::ops;
use bntrain::model::{Averaging, StatsEstimator, VarianceKind};
use bntrain::tolerance::{check_close, Tolerance};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const EPS: f64 = f64::EPSILON;

/// One random case: `z` is `[batch, width]` row-major.
#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    width: usize,
    z: Vec<f64>,
    gamma: Vec<f64>,
    beta: Vec<f64>,
    epsilon: f64,
    dy: Vec<f64>,
}

fn offset() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        -10.0..10.0f64,
        -1e4..1e4f64,
        Just(1e4),
        Just(-1e4)
    ]
}

fn case_with(epsilon: impl Strategy<Value = f64>) -> impl Strategy<Value = Case> {
    (2..=64usize, 1..=40usize, epsilon).prop_flat_map(|(batch, width, epsilon)| {
        (
            vec(-1.0..1.0f64, batch * width),
            vec(-2.0..2.0f64, width), // log10 of each feature's scale
            vec(offset(), width),
            vec(prop_oneof![-5.0..5.0f64, Just(1.0)], width),
            vec(-10.0..10.0f64, width),
            vec(-1.0..1.0f64, batch * width),
        )
            .prop_map(move |(u, log_scale, offset, gamma, beta, dy)| {
                let z = u
                    .iter()
                    .enumerate()
                    .map(|(i, v)| offset[i % width] + 10f64.powf(log_scale[i % width]) * v)
                    .collect();
                Case {
                    batch,
                    width,
                    z,
                    gamma,
                    beta,
                    epsilon,
                    dy,
                }
            })
    })
}

/// ε from 1e-5 to 1e-1, log-uniform (the seed uses 1e-3).
fn case() -> impl Strategy<Value = Case> {
    case_with((-5.0..-1.0f64).prop_map(|e| 10f64.powf(e)))
}

/// The forward pass's outputs.
struct Forward {
    mean: Vec<f64>,
    var: Vec<f64>,
    inv_std: Vec<f64>,
    x_hat: Vec<f64>,
    y: Vec<f64>,
}

fn forward(c: &Case) -> Forward {
    let n = c.batch * c.width;
    let mut f = Forward {
        mean: vec![0.0; c.width],
        var: vec![0.0; c.width],
        inv_std: vec![0.0; c.width],
        x_hat: vec![0.0; n],
        y: vec![0.0; n],
    };
    ops::batch_norm_forward_train(
        &c.z,
        &c.gamma,
        &c.beta,
        c.epsilon,
        &mut f.mean,
        &mut f.var,
        &mut f.inv_std,
        &mut f.x_hat,
        &mut f.y,
    );
    f
}

/// Column `j` of a `[batch, width]` matrix.
fn column(m: &[f64], width: usize, j: usize) -> Vec<f64> {
    m.iter().skip(j).step_by(width).copied().collect()
}

/// Two-pass mean and biased variance: the test's own, independent of `ops`.
fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (
        mean,
        v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n,
    )
}

/// `actual ≈ expected` within `tol`, as a proptest failure naming `what` on mismatch.
fn close(what: String, actual: f64, expected: f64, tol: Tolerance) -> Result<(), TestCaseError> {
    let result = check_close(&what, [actual], [expected], tol);
    prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    Ok(())
}

/// How far rounding can move one x̂ of feature `j`: the batch mean of values as large as
/// max|z| is exact to about B·ε_mach·max|z|, which x̂ multiplies by 1/σ; the variance and the
/// product add a relative B·ε_mach to values as large as √B.
fn x_hat_error(c: &Case, f: &Forward, j: usize) -> f64 {
    let b = c.batch as f64;
    let max_z = column(&c.z, c.width, j)
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    4.0 * b * EPS * (max_z * f.inv_std[j] + b.sqrt())
}

fn check_forward(c: &Case) -> Result<(), TestCaseError> {
    let f = forward(c);
    let b = c.batch as f64;
    for j in 0..c.width {
        let (mean_z, var_z) = moments(&column(&c.z, c.width, j));
        let max_z = column(&c.z, c.width, j)
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()));
        // A mean off by e moves Σ(z − mean)²/B by e² (no linear term): that, and rounding.
        let mean_error = 2.0 * b * EPS * max_z;
        close(
            format!("batch mean of feature {j}"),
            f.mean[j],
            mean_z,
            Tolerance::new(mean_error, 0.0),
        )?;
        let var_tol = Tolerance::new(4.0 * mean_error * mean_error, 4.0 * b * EPS);
        close(
            format!("batch variance of feature {j}"),
            f.var[j],
            var_z,
            var_tol,
        )?;

        let delta = x_hat_error(c, &f, j);
        let (mean_x, var_x) = moments(&column(&f.x_hat, c.width, j));
        close(
            format!("mean of x̂ for feature {j}"),
            mean_x,
            0.0,
            Tolerance::new(delta, 0.0),
        )?;
        let want_var = var_z / (var_z + c.epsilon);
        close(
            format!("variance of x̂ for feature {j}"),
            var_x,
            want_var,
            Tolerance::new(4.0 * delta, 4.0 * b * EPS),
        )?;

        let (g, be) = (c.gamma[j], c.beta[j]);
        let (mean_y, var_y) = moments(&column(&f.y, c.width, j));
        // y = γx̂ + β rounds to ε_mach·(|γ|√B + |β|) per element.
        let y_round = 4.0 * b * EPS * (g.abs() * b.sqrt() + be.abs());
        close(
            format!("mean of y for feature {j}"),
            mean_y,
            be,
            Tolerance::new(g.abs() * delta + y_round, 0.0),
        )?;
        close(
            format!("variance of y for feature {j}"),
            var_y,
            g * g * var_x,
            Tolerance::new(4.0 * y_round * (g.abs() + y_round), 4.0 * b * EPS),
        )?;
    }
    Ok(())
}

fn check_backward(c: &Case) -> Result<(), TestCaseError> {
    let f = forward(c);
    let mut dz = vec![0.0; c.batch * c.width];
    let (mut d_gamma, mut d_beta) = (vec![0.0; c.width], vec![0.0; c.width]);
    ops::batch_norm_backward(
        &c.dy,
        &f.x_hat,
        &c.gamma,
        &f.inv_std,
        &mut dz,
        &mut d_gamma,
        &mut d_beta,
    );
    let b = c.batch as f64;
    for j in 0..c.width {
        let (dy, x_hat, dz) = (
            column(&c.dy, c.width, j),
            column(&f.x_hat, c.width, j),
            column(&dz, c.width, j),
        );
        let abs_dy: f64 = dy.iter().map(|v| v.abs()).sum();
        let abs_dy_x: f64 = dy.iter().zip(&x_hat).map(|(d, x)| (d * x).abs()).sum();
        close(
            format!("dβ of feature {j}"),
            d_beta[j],
            dy.iter().sum(),
            Tolerance::new(b * EPS * abs_dy, 0.0),
        )?;
        close(
            format!("dγ of feature {j}"),
            d_gamma[j],
            dy.iter().zip(&x_hat).map(|(d, x)| d * x).sum(),
            Tolerance::new(b * EPS * abs_dy_x, 0.0),
        )?;

        // dz_b = γ·s/B·(B·dy_b − dβ − x̂_b·dγ): each term rounds relative to its size, and
        // the sums below are exact identities of the computed x̂ up to its mean (≈ 0 within
        // δ) and its mean square (σ²/(σ²+ε) within about 4δ).
        let (g, s) = (c.gamma[j], f.inv_std[j]);
        let delta = x_hat_error(c, &f, j);
        let terms: f64 = dy
            .iter()
            .zip(&x_hat)
            .map(|(d, x)| b * d.abs() + d_beta[j].abs() + (x * d_gamma[j]).abs())
            .sum();
        let rounding = 8.0 * b * EPS * (g * s / b).abs() * terms * (1.0 + b.sqrt());
        close(
            format!("Σ_b dz of feature {j} (shift invariance)"),
            dz.iter().sum(),
            0.0,
            Tolerance::new(rounding + (g * s * d_gamma[j]).abs() * delta, 0.0),
        )?;
        let scaling = g * d_gamma[j] * c.epsilon * s * s * s;
        close(
            format!("Σ_b dz·x̂ of feature {j} (scaling about the mean)"),
            dz.iter().zip(&x_hat).map(|(d, x)| d * x).sum(),
            scaling,
            Tolerance::new(
                rounding * b.sqrt()
                    + (g * s * d_beta[j]).abs() * delta
                    + 4.0 * (g * s * d_gamma[j]).abs() * delta,
                4.0 * b * EPS,
            ),
        )?;
    }
    Ok(())
}

fn estimator() -> impl Strategy<Value = StatsEstimator> {
    let averaging = prop_oneof![
        (0.0..1.0f64).prop_map(|decay| Averaging::Ema { decay }),
        Just(Averaging::Cumulative)
    ];
    let variance = prop_oneof![Just(VarianceKind::Biased), Just(VarianceKind::Unbiased)];
    (averaging, variance).prop_map(|(averaging, variance)| StatsEstimator {
        averaging,
        variance,
    })
}

/// `value` lies in the closed interval between `a` and `b`, up to a few ulps.
fn between(what: String, value: f64, a: f64, b: f64) -> Result<(), TestCaseError> {
    let (lo, hi) = (a.min(b), a.max(b));
    close(
        what,
        value,
        value.clamp(lo, hi),
        Tolerance::new(0.0, 4.0 * EPS),
    )
}

fn check_running_stats(
    c: &Case,
    estimator: StatsEstimator,
    batches_so_far: u64,
    old_mean: &[f64],
    old_var: &[f64],
) -> Result<(), TestCaseError> {
    let f = forward(c);
    let (mut mean, mut var) = (old_mean[..c.width].to_vec(), old_var[..c.width].to_vec());
    ops::update_running_stats(
        estimator,
        c.batch,
        batches_so_far,
        &mut mean,
        &mut var,
        &f.mean,
        &f.var,
    );
    let correction = match estimator.variance {
        VarianceKind::Biased => 1.0,
        VarianceKind::Unbiased => c.batch as f64 / (c.batch as f64 - 1.0),
    };
    let keep = match estimator.averaging {
        Averaging::Ema { decay } => decay,
        Averaging::Cumulative => batches_so_far as f64 / (batches_so_far as f64 + 1.0),
    };
    for j in 0..c.width {
        let batch_var = f.var[j] * correction;
        between(
            format!("running mean of feature {j}"),
            mean[j],
            old_mean[j],
            f.mean[j],
        )?;
        between(
            format!("running variance of feature {j}"),
            var[j],
            old_var[j],
            batch_var,
        )?;
        prop_assert!(
            var[j] >= 0.0,
            "running variance of feature {j} is negative: {}",
            var[j]
        );
        let scale = old_mean[j].abs() + f.mean[j].abs();
        close(
            format!("running mean of feature {j} = keep·old + (1−keep)·batch"),
            mean[j],
            keep * old_mean[j] + (1.0 - keep) * f.mean[j],
            Tolerance::new(4.0 * EPS * scale, 0.0),
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn forward_normalizes_each_feature(c in case()) {
        check_forward(&c)?;
    }

    #[test]
    fn backward_is_orthogonal_to_shifts_and_matches_the_scaling_derivative(c in case()) {
        check_backward(&c)?;
    }

    /// With ε = 0 BN is invariant under scaling about the mean too, so Σ_b dz·x̂ = 0.
    #[test]
    fn backward_without_epsilon_is_orthogonal_to_scalings(c in case_with(Just(0.0)).prop_filter(
        "with ε = 0 a constant feature has no defined x̂",
        |c| (0..c.width).all(|j| moments(&column(&c.z, c.width, j)).1 > 0.0),
    )) {
        check_backward(&c)?;
    }

    #[test]
    fn running_stats_stay_between_old_and_batch(
        c in case(),
        estimator in estimator(),
        batches_so_far in 0..1000u64,
        old_mean in vec(-1e4..1e4f64, 40),
        old_var in vec(0.0..1e4f64, 40),
    ) {
        check_running_stats(&c, estimator, batches_so_far, &old_mean, &old_var)?;
    }
}
