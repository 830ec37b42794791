//! Exact population statistics, recomputed after training: what the source recommends ("best
//! to estimate … after the weights are trained"), fvcore's PreciseBN and
//! `torch.optim.swa_utils.update_bn` do.
//!
//! One pass over the training set in f64 on the host, with the reference operations of
//! [`crate::cpu::ops`]: layer by layer, the input moments of each BN layer over every training
//! example, the layers below normalized with the statistics already recomputed for them
//! (which is what inference with these statistics will see).

use crate::cpu::ops;
use crate::data::Split;
use crate::model::{ModelConfig, ModelParams, RunningStats, VarianceKind};

/// Rows per GEMM chunk in the first layer (bounds the f64 copy of the images).
const CHUNK: usize = 2000;

/// The exact population moments of every BN layer's input, one entry per BN layer (input
/// layer first), for the biased (÷N) or unbiased (÷(N−1)) variance. `batches` is set to N.
pub fn exact_moments(model: &ModelConfig, params: &ModelParams, train: &Split, variance: VarianceKind) -> Vec<RunningStats> {
    let first = first_layer_outputs(params, train);
    moments_from(model, params, first, train.count, variance)
}

/// The exact moments for both variance kinds, sharing the first layer's product (the only
/// expensive part: N × inputs × width multiply-adds).
pub fn exact_moments_both(model: &ModelConfig, params: &ModelParams, train: &Split) -> (Vec<RunningStats>, Vec<RunningStats>) {
    let first = first_layer_outputs(params, train);
    let biased = moments_from(model, params, first.clone(), train.count, VarianceKind::Biased);
    let unbiased = moments_from(model, params, first, train.count, VarianceKind::Unbiased);
    (biased, unbiased)
}

/// Replaces the statistics in slot 0 of every BN layer with `stats` (one per BN layer).
pub fn with_slot0(params: &ModelParams, stats: &[RunningStats]) -> ModelParams {
    let mut p = params.clone();
    let mut next = stats.iter();
    for layer in &mut p.layers {
        if let Some(bn) = &mut layer.batch_norm {
            if let Some(s) = next.next() {
                bn.running[0] = s.clone();
            }
        }
    }
    p
}

/// z₀ = x·W₀ᵀ (+ b₀) for every training example, in f64.  Returns `[N, width₀]`.
fn first_layer_outputs(params: &ModelParams, train: &Split) -> Vec<f64> {
    let layer = &params.layers[0];
    let (inputs, outputs) = (layer.inputs, layer.outputs);
    let n = train.count;
    let mut z = vec![0.0f64; n * outputs];
    let mut x = vec![0.0f64; CHUNK.min(n) * inputs];
    let mut start = 0;
    while start < n {
        let rows = CHUNK.min(n - start);
        let indices: Vec<u32> = (start as u32..(start + rows) as u32).collect();
        ops::gather_batch(&train.images, train.features, &indices, &mut x[..rows * inputs]);
        ops::linear_forward(
            &x[..rows * inputs], &layer.weight, layer.bias.as_deref(), inputs, outputs,
            &mut z[start * outputs..(start + rows) * outputs],
        );
        start += rows;
    }
    z
}

/// Walks the hidden layers from the first one's outputs `z` (`[N, width₀]`): moments of z,
/// normalize with them, activation, next layer's z, and so on.
fn moments_from(model: &ModelConfig, params: &ModelParams, mut z: Vec<f64>, n: usize, variance: VarianceKind) -> Vec<RunningStats> {
    let epsilon = model.epsilon;
    let hidden = model.hidden.len();
    let mut out = Vec::new();
    for l in 0..hidden {
        let layer = &params.layers[l];
        let width = layer.outputs;
        let mut y = vec![0.0f64; n * width];
        match &layer.batch_norm {
            Some(bn) => {
                // Two-pass mean and biased variance in f64, over all N rows at once.
                let mut mean = vec![0.0f64; width];
                let mut var = vec![0.0f64; width];
                ops::batch_moments(&z, width, &mut mean, &mut var);
                if variance == VarianceKind::Unbiased && n > 1 {
                    let scale = n as f64 / (n as f64 - 1.0);
                    var.iter_mut().for_each(|v| *v *= scale);
                }
                ops::batch_norm_forward_infer(&z, &bn.gamma, &bn.beta, &mean, &var, epsilon, &mut y);
                out.push(RunningStats { mean, var, batches: n as u64 });
            }
            None => y.copy_from_slice(&z),
        }
        if l + 1 == hidden {
            break; // the output layer has no BN: nothing more to measure
        }
        let mut a = vec![0.0f64; n * width];
        ops::activation_forward(model.activation, &y, &mut a);
        drop(y);
        let next = &params.layers[l + 1];
        z = vec![0.0f64; n * next.outputs];
        ops::linear_forward(&a, &next.weight, next.bias.as_deref(), next.inputs, next.outputs, &mut z);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a single BN layer whose input is one feature, the moments are the plain mean and
    /// variance of x·w.
    #[test]
    fn one_layer_moments_match_hand_computation() {
        let model = ModelConfig { inputs: 1, hidden: vec![1], classes: 2, activation: crate::model::Activation::Sigmoid, batch_norm: true, epsilon: 1e-3 };
        let mut params = ModelParams::init(&model, 0, 1);
        params.layers[0].weight = vec![2.0];
        let pixels = [0u8, 51, 102, 255];
        let train = Split { images: pixels.to_vec(), labels: vec![0, 1, 0, 1], count: 4, features: 1, classes: 2 };
        let z: Vec<f64> = pixels.iter().map(|&p| 2.0 * p as f64 / 255.0).collect();
        let mean = z.iter().sum::<f64>() / 4.0;
        let ss: f64 = z.iter().map(|v| (v - mean) * (v - mean)).sum();
        let (biased, unbiased) = exact_moments_both(&model, &params, &train);
        assert!((biased[0].mean[0] - mean).abs() < 1e-15);
        assert!((biased[0].var[0] - ss / 4.0).abs() < 1e-15);
        assert!((unbiased[0].var[0] - ss / 3.0).abs() < 1e-15);
        assert_eq!(biased[0].batches, 4);
    }
}
