//! The reference operations, one function per kernel of the CUDA backend, written to be read.
//! Shapes are given as `[rows, cols]`, row-major; `B` is the batch, `C` a layer's width.
//! Every GPU kernel test compares against the function of the same name here, run in f64.

use super::float::Float;
use crate::model::{Activation, Averaging, LossReduction, StatsEstimator, VarianceKind};

/// Row-major matrix product with optional transposes: c ← a'·b' (+ c when `accumulate`),
/// where a' is `[m, k]` and b' is `[k, n]` after the transposes. This is the one GEMM helper.
#[allow(clippy::too_many_arguments)]
pub fn matmul<F: Float>(
    transpose_a: bool, transpose_b: bool, m: usize, n: usize, k: usize,
    a: &[F], b: &[F], c: &mut [F], accumulate: bool,
) {
    // A stored row-major as [m,k] has strides (k,1); stored as [k,m] and read transposed, (1,m).
    let a_strides = if transpose_a { (1, m as isize) } else { (k as isize, 1) };
    let b_strides = if transpose_b { (1, k as isize) } else { (n as isize, 1) };
    let beta = if accumulate { F::ONE } else { F::ZERO };
    F::gemm_strided(m, k, n, F::ONE, a, a_strides, b, b_strides, beta, c, n as isize);
}

/// x[b, :] ← images[indices[b], :] / 255.
/// images: [N, D] u8; indices: [B]; x: [B, D].
pub fn gather_batch<F: Float>(images: &[u8], features: usize, indices: &[u32], x: &mut [F]) {
    let scale = F::from_f64(1.0 / 255.0);
    for (row, &index) in x.chunks_exact_mut(features).zip(indices) {
        let start = index as usize * features;
        for (v, &p) in row.iter_mut().zip(&images[start..start + features]) {
            *v = F::from_f64(p as f64) * scale;
        }
    }
}

/// z ← x·wᵀ (+ bias).  x: [B, in]; w: [out, in]; bias: [out]; z: [B, out].
pub fn linear_forward<F: Float>(x: &[F], w: &[F], bias: Option<&[F]>, inputs: usize, outputs: usize, z: &mut [F]) {
    let batch = x.len() / inputs;
    matmul(false, true, batch, outputs, inputs, x, w, z, false);
    if let Some(bias) = bias {
        for row in z.chunks_exact_mut(outputs) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

/// Per-feature mean and biased variance over the batch, in two passes (no E[x²]−E[x]²
/// cancellation).  z: [B, C]; mean, var: [C].
pub fn batch_moments<F: Float>(z: &[F], width: usize, mean: &mut [F], var: &mut [F]) {
    let batch = z.len() / width;
    let inv_batch = F::ONE / F::from_f64(batch as f64);
    mean.fill(F::ZERO);
    var.fill(F::ZERO);
    for row in z.chunks_exact(width) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m *= inv_batch);
    for row in z.chunks_exact(width) {
        for ((s, &v), &m) in var.iter_mut().zip(row).zip(mean.iter()) {
            let d = v - m;
            *s += d * d;
        }
    }
    var.iter_mut().for_each(|s| *s *= inv_batch);
}

/// Training-mode BN: x̂ = (z − μ_B)·inv_std, y = γ·x̂ + β, with inv_std = 1/√(σ²_B + ε).
/// z, x_hat, y: [B, C]; gamma, beta, mean, var, inv_std: [C]. Writes mean, var (biased),
/// inv_std and x̂ for the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_forward_train<F: Float>(
    z: &[F], gamma: &[F], beta: &[F], epsilon: F,
    mean: &mut [F], var: &mut [F], inv_std: &mut [F], x_hat: &mut [F], y: &mut [F],
) {
    let width = gamma.len();
    batch_moments(z, width, mean, var);
    for (s, &v) in inv_std.iter_mut().zip(var.iter()) {
        *s = F::ONE / (v + epsilon).sqrt();
    }
    for ((zr, xr), yr) in z.chunks_exact(width).zip(x_hat.chunks_exact_mut(width)).zip(y.chunks_exact_mut(width)) {
        for j in 0..width {
            xr[j] = (zr[j] - mean[j]) * inv_std[j];
            yr[j] = gamma[j] * xr[j] + beta[j];
        }
    }
}

/// Inference-mode BN with population statistics: y = γ·(z − μ)/√(σ² + ε) + β.
/// z, y: [B, C]; gamma, beta, mean, var: [C].
pub fn batch_norm_forward_infer<F: Float>(
    z: &[F], gamma: &[F], beta: &[F], mean: &[F], var: &[F], epsilon: F, y: &mut [F],
) {
    let width = gamma.len();
    let scale: Vec<F> = gamma.iter().zip(var).map(|(&g, &v)| g / (v + epsilon).sqrt()).collect();
    for (zr, yr) in z.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
        for j in 0..width {
            yr[j] = (zr[j] - mean[j]) * scale[j] + beta[j];
        }
    }
}

/// BN backward from the saved x̂ and inv_std:
///   dβ = Σ_b dy,  dγ = Σ_b dy·x̂,
///   dz = (inv_std / B)·(B·γ·dy − γ·dβ − x̂·γ·dγ).
/// dy, x_hat, dz: [B, C]; gamma, inv_std, d_gamma, d_beta: [C].
pub fn batch_norm_backward<F: Float>(
    dy: &[F], x_hat: &[F], gamma: &[F], inv_std: &[F],
    dz: &mut [F], d_gamma: &mut [F], d_beta: &mut [F],
) {
    let width = gamma.len();
    let batch = F::from_f64((dy.len() / width) as f64);
    d_gamma.fill(F::ZERO);
    d_beta.fill(F::ZERO);
    for (dr, xr) in dy.chunks_exact(width).zip(x_hat.chunks_exact(width)) {
        for j in 0..width {
            d_beta[j] += dr[j];
            d_gamma[j] += dr[j] * xr[j];
        }
    }
    for ((dr, xr), zr) in dy.chunks_exact(width).zip(x_hat.chunks_exact(width)).zip(dz.chunks_exact_mut(width)) {
        for j in 0..width {
            zr[j] = gamma[j] * inv_std[j] / batch * (batch * dr[j] - d_beta[j] - xr[j] * d_gamma[j]);
        }
    }
}

/// Folds one batch's statistics into a running estimate.
///   EMA:        r ← decay·r + (1−decay)·s
///   cumulative: r ← (n·r + s)/(n+1)
/// with s the batch mean, and the batch variance biased or scaled by B/(B−1).
/// running_mean, running_var, batch_mean, batch_var: [C].
pub fn update_running_stats<F: Float>(
    estimator: StatsEstimator, batch_size: usize, batches_so_far: u64,
    running_mean: &mut [F], running_var: &mut [F], batch_mean: &[F], batch_var: &[F],
) {
    let correction = match estimator.variance {
        VarianceKind::Biased => F::ONE,
        VarianceKind::Unbiased => F::from_f64(batch_size as f64 / (batch_size as f64 - 1.0)),
    };
    let keep = match estimator.averaging {
        Averaging::Ema { decay } => F::from_f64(decay),
        Averaging::Cumulative => {
            let n = batches_so_far as f64;
            F::from_f64(n / (n + 1.0))
        }
    };
    let take = F::ONE - keep;
    for j in 0..running_mean.len() {
        running_mean[j] = keep * running_mean[j] + take * batch_mean[j];
        running_var[j] = keep * running_var[j] + take * (batch_var[j] * correction);
    }
}

/// a = σ(y) = 1/(1+e^{−y}) or max(y, 0).  y, a: [B, C].
pub fn activation_forward<F: Float>(activation: Activation, y: &[F], a: &mut [F]) {
    for (o, &v) in a.iter_mut().zip(y) {
        *o = match activation {
            Activation::Sigmoid => F::ONE / (F::ONE + (-v).exp()),
            Activation::Relu => if v > F::ZERO { v } else { F::ZERO },
        };
    }
}

/// dy = da·σ'(y) with σ' = a(1−a) for the sigmoid, 1[y>0] for relu; computed from the saved
/// output `a` (a > 0 ⇔ y > 0 for relu).  a, da, dy: [B, C].
pub fn activation_backward<F: Float>(activation: Activation, a: &[F], da: &[F], dy: &mut [F]) {
    for ((o, &out), &g) in dy.iter_mut().zip(a).zip(da) {
        *o = match activation {
            Activation::Sigmoid => g * out * (F::ONE - out),
            Activation::Relu => if out > F::ZERO { g } else { F::ZERO },
        };
    }
}

/// Softmax cross-entropy in one pass: per example ℓ = logsumexp(z) − z[label], the gradient
/// dz = softmax(z) − onehot(label) (divided by B for the mean), and whether argmax(z) = label
/// (ties go to the lowest index, like `argmax` everywhere else here).
/// logits, d_logits: [B, K]; labels: [B]. Returns (Σ ℓ, correct count).
pub fn softmax_cross_entropy<F: Float>(
    logits: &[F], labels: &[u8], classes: usize, reduction: LossReduction, d_logits: &mut [F],
) -> (f64, u64) {
    let batch = labels.len();
    let grad_scale = match reduction {
        LossReduction::Sum => F::ONE,
        LossReduction::Mean => F::ONE / F::from_f64(batch as f64),
    };
    let (mut loss, mut correct) = (0.0f64, 0u64);
    for ((row, grad), &label) in logits.chunks_exact(classes).zip(d_logits.chunks_exact_mut(classes)).zip(labels) {
        let label = label as usize;
        let best = argmax(row);
        correct += u64::from(best == label);
        let max = row[best];
        let mut denom = F::ZERO;
        for (g, &v) in grad.iter_mut().zip(row) {
            *g = (v - max).exp();
            denom += *g;
        }
        for (k, g) in grad.iter_mut().enumerate() {
            let p = *g / denom;
            *g = (p - if k == label { F::ONE } else { F::ZERO }) * grad_scale;
        }
        loss += (denom.ln() + max - row[label]).to_f64();
    }
    (loss, correct)
}

/// Index of the largest value, the first one on ties.
pub fn argmax<F: Float>(row: &[F]) -> usize {
    let mut best = 0;
    for (k, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = k;
        }
    }
    best
}

/// Gradients of z = x·wᵀ + b:  dw = dzᵀ·x, db = Σ_b dz, and dx = dz·w when asked.
/// dz: [B, out]; x: [B, in]; w, dw: [out, in]; db: [out]; dx: [B, in].
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<F: Float>(
    dz: &[F], x: &[F], w: &[F], inputs: usize, outputs: usize,
    dw: &mut [F], db: Option<&mut [F]>, dx: Option<&mut [F]>,
) {
    let batch = dz.len() / outputs;
    matmul(true, false, outputs, inputs, batch, dz, x, dw, false);
    if let Some(db) = db {
        bias_gradient(dz, db);
    }
    if let Some(dx) = dx {
        matmul(false, false, batch, inputs, outputs, dz, w, dx, false);
    }
}

/// db = Σ_b dz[b, :].  dz: [B, out]; db: [out].
pub fn bias_gradient<F: Float>(dz: &[F], db: &mut [F]) {
    db.fill(F::ZERO);
    for row in dz.chunks_exact(db.len()) {
        for (d, &g) in db.iter_mut().zip(row) {
            *d += g;
        }
    }
}

/// SGD with classical momentum: v ← μ·v + g; w ← w − lr·v. With μ = 0 the velocity is not
/// touched and this is w ← w − lr·g.  w, g, v: same length.
pub fn sgd_update<F: Float>(w: &mut [F], g: &[F], velocity: Option<&mut [F]>, lr: F, momentum: F) {
    match velocity {
        Some(v) => {
            for ((w, &g), v) in w.iter_mut().zip(g).zip(v.iter_mut()) {
                *v = momentum * *v + g;
                *w -= lr * *v;
            }
        }
        None => {
            for (w, &g) in w.iter_mut().zip(g) {
                *w -= lr * g;
            }
        }
    }
}
