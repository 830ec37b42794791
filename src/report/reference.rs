//! The numbers the report puts next to its own: what the source reports and what a PyTorch run
//! of the same setup measured. Hard-coded on purpose: they are citations, not computations.

use serde::{Deserialize, Serialize};

/// The source: R2RT, "Implementing Batch Normalization in TensorFlow" (2016),
/// <https://r2rt.com/implementing-batch-normalization-in-tensorflow.html>, retelling
/// Ioffe & Szegedy 2015, §4.1 and Figure 1 (<https://arxiv.org/abs/1502.03167>).
pub const SOURCE: &str = "R2RT 2016, \"Implementing Batch Normalization in TensorFlow\"";

/// Source: its "final accuracy", the last test evaluation of its 10000-step training loop
/// (after its step 9950), run with is_training=True: the test set normalized by its own batch
/// statistics, not the population statistics it restores afterwards (its published code).
pub const SOURCE_FINAL_ACCURACY_10000: f64 = 0.9721;
/// Source: the steps after which [`SOURCE_FINAL_ACCURACY_10000`] was measured.
pub const SOURCE_FINAL_STEPS: u64 = 10_000;
/// Source: one-by-one predictions of the first 100 test images, population statistics.
pub const SOURCE_ONE_BY_ONE_POPULATION: f64 = 0.99;
/// Source: the same with batch statistics (every prediction the same class).
pub const SOURCE_ONE_BY_ONE_BATCH: f64 = 0.02;
/// Source: the class every batch-statistics prediction collapsed to.
pub const SOURCE_COLLAPSED_CLASS: u8 = 8;
/// Source: how many test images were predicted one by one.
pub const SOURCE_ONE_BY_ONE_COUNT: usize = 100;

/// PyTorch anchor: `docs/anchors/torch.jsonl` (torch_anchor.py, NVIDIA H200, 2026-11-26,
/// fp32, TF32 off), the same seed setup in PyTorch with CUDA graphs. A test holds every
/// `PYTORCH_*` figure here to that file.
pub const PYTORCH: &str = "docs/anchors/torch.jsonl (torch_anchor.py, NVIDIA H200, 2026-11-26, fp32)";

/// PyTorch anchor: the length of its comparison run.
pub const PYTORCH_STEPS: u64 = 40_000;

/// PyTorch anchor: test accuracy (BN, plain) at these steps of the 40000-step comparison
/// (`acc_at_steps` of the `seed-experiment` line; its last point is step 39950).
pub const PYTORCH_CURVE: [(u64, f64, f64); 7] = [
    (500, 0.8768, 0.8542),
    (1000, 0.8986, 0.8798),
    (2000, 0.9160, 0.9059),
    (5000, 0.9344, 0.9317),
    (10000, 0.9535, 0.9430),
    (20000, 0.9638, 0.9504),
    (39950, 0.9689, 0.9548),
];
/// PyTorch anchor: BN and plain test accuracy at 10000 steps.
pub const PYTORCH_BN_10000: f64 = 0.9535;
pub const PYTORCH_PLAIN_10000: f64 = 0.9430;
/// PyTorch anchor: BN and plain test accuracy at the end of the 40000-step comparison.
pub const PYTORCH_BN_40000: f64 = 0.9689;
pub const PYTORCH_PLAIN_40000: f64 = 0.9548;
/// PyTorch anchor: one-by-one accuracy on the first 100 test images (`seed-single`).
pub const PYTORCH_ONE_BY_ONE_POPULATION: f64 = 0.98;
pub const PYTORCH_ONE_BY_ONE_BATCH: f64 = 0.02;

/// The reference numbers as they appear in `metrics.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct References {
    pub source: String,
    pub source_final_accuracy_10000: f64,
    pub source_one_by_one_population: f64,
    pub source_one_by_one_batch: f64,
    pub source_collapsed_class: u8,
    pub pytorch: String,
    pub pytorch_bn_10000: f64,
    pub pytorch_plain_10000: f64,
    pub pytorch_bn_40000: f64,
    pub pytorch_plain_40000: f64,
    pub pytorch_one_by_one_population: f64,
    pub pytorch_one_by_one_batch: f64,
    /// (step, BN, plain).
    pub pytorch_curve: Vec<(u64, f64, f64)>,
}

impl Default for References {
    fn default() -> Self {
        References {
            source: SOURCE.into(),
            source_final_accuracy_10000: SOURCE_FINAL_ACCURACY_10000,
            source_one_by_one_population: SOURCE_ONE_BY_ONE_POPULATION,
            source_one_by_one_batch: SOURCE_ONE_BY_ONE_BATCH,
            source_collapsed_class: SOURCE_COLLAPSED_CLASS,
            pytorch: PYTORCH.into(),
            pytorch_bn_10000: PYTORCH_BN_10000,
            pytorch_plain_10000: PYTORCH_PLAIN_10000,
            pytorch_bn_40000: PYTORCH_BN_40000,
            pytorch_plain_40000: PYTORCH_PLAIN_40000,
            pytorch_one_by_one_population: PYTORCH_ONE_BY_ONE_POPULATION,
            pytorch_one_by_one_batch: PYTORCH_ONE_BY_ONE_BATCH,
            pytorch_curve: PYTORCH_CURVE.to_vec(),
        }
    }
}

impl References {
    /// PyTorch's (BN, plain) test accuracy at `step` of a run of `run_steps` steps: its anchor
    /// at exactly that step, or, at the end of a run as long as PyTorch's, its last evaluation
    /// (39950: it evaluated every 50 steps from step 0, so never at 40000). None elsewhere: an
    /// anchor from another step would compare two different points of training.
    pub fn pytorch_at(&self, step: u64, run_steps: u64) -> Option<(f64, f64)> {
        if let Some(&(_, bn, plain)) = self.pytorch_curve.iter().find(|anchor| anchor.0 == step) {
            return Some((bn, plain));
        }
        let at_the_end = step == run_steps && run_steps == PYTORCH_STEPS;
        at_the_end.then(|| self.pytorch_curve.last().map(|&(_, bn, plain)| (bn, plain))).flatten()
    }

    /// Whether the references measured on trained nets (the one-by-one figures of the
    /// source's net after 10000 steps and PyTorch's after 40000; PyTorch's BN accuracy beside
    /// the 10000-step net) compare with a net trained `steps` steps: one trained at least as
    /// long as the source's. A shorter run's population statistics have not settled (its EMA
    /// still holds its initial values), so its figures are not theirs to compare with.
    pub fn trained_long_enough_for_references(&self, steps: u64) -> bool {
        steps >= SOURCE_FINAL_STEPS
    }

    /// The source's "final accuracy" (see [`SOURCE_FINAL_ACCURACY_10000`]), where ours trained
    /// as many steps.
    pub fn source_final_at(&self, steps: u64) -> Option<f64> {
        (steps == SOURCE_FINAL_STEPS).then_some(self.source_final_accuracy_10000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_found_at_their_own_step_only() {
        let r = References::default();
        assert_eq!(r.pytorch_at(1000, 1000), Some((0.8986, 0.8798)));
        assert_eq!(r.pytorch_at(10_000, 40_000), Some((PYTORCH_BN_10000, PYTORCH_PLAIN_10000)));
        assert_eq!(r.pytorch_at(39_950, 40_000), Some((PYTORCH_BN_40000, PYTORCH_PLAIN_40000)));
        // The end of a 40000-step run is PyTorch's last evaluation; no other run's end is.
        assert_eq!(r.pytorch_at(40_000, 40_000), Some((PYTORCH_BN_40000, PYTORCH_PLAIN_40000)));
        assert_eq!(r.pytorch_at(15_000, 15_000), None);
        assert_eq!(r.pytorch_at(3000, 10_000), None);
        assert_eq!(r.source_final_at(10_000), Some(SOURCE_FINAL_ACCURACY_10000));
        assert_eq!(r.source_final_at(500), None);
        assert!(r.trained_long_enough_for_references(10_000) && r.trained_long_enough_for_references(40_000) && !r.trained_long_enough_for_references(500));
    }

    /// The citations are the measurements, to the four decimals the report prints.
    #[test]
    fn pytorch_figures_are_those_of_the_anchor_file() {
        let lines: Vec<serde_json::Value> = include_str!("../../docs/anchors/torch.jsonl")
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
            .collect();
        let line = |kind: &str, mode: Option<&str>| {
            lines.iter().find(|l| l["kind"] == kind && mode.is_none_or(|m| l["mode"] == m)).unwrap_or_else(|| panic!("a {kind} line"))
        };
        let four = |v: &serde_json::Value| (v.as_f64().expect("a number") * 1e4).round() / 1e4;
        let experiment = line("seed-experiment", None);
        assert_eq!(experiment["steps"].as_u64(), Some(PYTORCH_STEPS));
        let measured: Vec<(u64, f64, f64)> = experiment["acc_at_steps"]
            .as_object()
            .expect("acc_at_steps")
            .iter()
            .map(|(step, plain_bn)| (step.parse().expect("a step"), four(&plain_bn[1]), four(&plain_bn[0])))
            .collect();
        let mut measured = measured;
        measured.sort_by_key(|point| point.0);
        assert_eq!(measured, PYTORCH_CURVE.to_vec());
        assert_eq!((four(&experiment["final_acc_bn"]), four(&experiment["final_acc_plain"])), (PYTORCH_BN_40000, PYTORCH_PLAIN_40000));
        let at_10000 = &experiment["acc_at_steps"]["10000"];
        assert_eq!((four(&at_10000[1]), four(&at_10000[0])), (PYTORCH_BN_10000, PYTORCH_PLAIN_10000));
        assert_eq!(four(&line("seed-single", Some("eval"))["acc"]), PYTORCH_ONE_BY_ONE_POPULATION);
        assert_eq!(four(&line("seed-single", Some("batch-stats"))["acc"]), PYTORCH_ONE_BY_ONE_BATCH);
        assert!(experiment["device"].as_str().is_some_and(|d| PYTORCH.contains(d)), "{PYTORCH}");
    }
}
