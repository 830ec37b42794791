//! The tables and the report: `curves.csv`, `probes.csv`, `predictions.csv`,
//! `estimators.csv`, `metrics.json` (the whole [`ReproduceSummary`]) and `report.md`, which
//! shows the figures and puts every measured number next to the source's and PyTorch's.
//! Every number in `report.md` is printed from the summary with four decimals, so it equals
//! the one in `metrics.json` rounded the same way.

use super::figures::{ESTIMATORS, FIG1A, FIG1A_LEAD, FIG1B, FIG1C, TEST_TIME};
use super::{Curve, ReportError, ReproduceSummary};
use crate::atomic_file::write_atomically;
use std::fmt::Write as _;
use std::path::Path;

pub const CURVES_CSV: &str = "curves.csv";
pub const PROBES_CSV: &str = "probes.csv";
pub const PREDICTIONS_CSV: &str = "predictions.csv";
pub const ESTIMATORS_CSV: &str = "estimators.csv";
pub const METRICS_JSON: &str = "metrics.json";
pub const REPORT_MD: &str = "report.md";

fn save(dir: &Path, name: &str, contents: &str) -> Result<(), ReportError> {
    let path = dir.join(name);
    write_atomically(&path, contents.as_bytes()).map_err(|e| ReportError::Write { path, reason: e.to_string() })
}

/// What every formatter prints for a number that is not finite (NaN, ±∞): a measurement that
/// could not be made, rather than Rust's `NaN`, `inf` or a mangled `NaNe0`.
pub const NOT_A_NUMBER: &str = "n/a";

/// Four decimals: the one format of every accuracy in the report.
pub fn fmt4(v: f64) -> String {
    if !v.is_finite() {
        return NOT_A_NUMBER.into();
    }
    format!("{v:.4}")
}

/// Four decimals with a sign: a difference.
fn fmt_signed(v: f64) -> String {
    if !v.is_finite() {
        return NOT_A_NUMBER.into();
    }
    format!("{v:+.4}")
}

/// Four significant figures, in scientific notation below 0.001.
fn fmt_small(v: f64) -> String {
    if !v.is_finite() {
        NOT_A_NUMBER.into()
    } else if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e-3 {
        format!("{v:.4}")
    } else {
        // (Not v / 10^e: 10^-324 is 0 in f64, which would print a subnormal as `inf`.)
        format!("{v:.2e}")
    }
}

/// Writes the CSV files; returns their names.
pub fn write_tables(s: &ReproduceSummary, dir: &Path) -> Result<Vec<String>, ReportError> {
    // The statistics BN normalized the test set with: the comparison measures as the source
    // does (the test set's own), the test-time net with its running estimates.
    let mut curves = String::from("run,step,train_loss,train_accuracy,test_loss,test_accuracy,test_statistics\n");
    let runs: [(&str, &Curve, &str); 3] = [
        ("compare-bn", &s.comparison.bn, s.comparison.eval_mode.as_str()),
        ("compare-plain", &s.comparison.plain, "none"),
        ("test-time-bn", &s.test_time.curve, "population"),
    ];
    for (run, curve, statistics) in runs {
        for p in &curve.history {
            let _ = writeln!(curves, "{run},{},{},{},{},{},{statistics}", p.step, p.train_loss, p.train_accuracy, p.test_loss, p.test_accuracy);
        }
    }
    save(dir, CURVES_CSV, &curves)?;

    let mut probes = String::from("net,layer,unit,step,mean,p15,p50,p85\n");
    for (net, curve) in [("bn", &s.comparison.bn), ("plain", &s.comparison.plain)] {
        for point in &curve.probes {
            for (unit, n) in point.neurons.iter().enumerate() {
                let _ = writeln!(probes, "{net},{},{},{},{},{},{},{}", s.comparison.probe_layer + 1, unit + 1, point.step, n.mean, n.p15, n.p50, n.p85);
            }
        }
    }
    save(dir, PROBES_CSV, &probes)?;

    let t = &s.test_time;
    let mut predictions = String::from("index,label,population,batch\n");
    for (i, (p, b)) in t.first_population.predictions.iter().zip(&t.first_batch.predictions).enumerate() {
        // A summary from before the labels were kept has none: the column stays empty.
        let label = t.first_labels.get(i).map_or_else(String::new, u8::to_string);
        let _ = writeln!(predictions, "{i},{label},{p},{b}");
    }
    save(dir, PREDICTIONS_CSV, &predictions)?;

    let mut estimators = String::from("estimator,seed,test_accuracy\n");
    for row in &s.estimators.rows {
        for (seed, acc) in s.estimators.seeds.iter().zip(&row.accuracy) {
            let _ = writeln!(estimators, "{},{seed},{acc}", row.label);
        }
    }
    save(dir, ESTIMATORS_CSV, &estimators)?;
    Ok(vec![CURVES_CSV.into(), PROBES_CSV.into(), PREDICTIONS_CSV.into(), ESTIMATORS_CSV.into()])
}

/// Writes `metrics.json`: the whole summary.
pub fn write_json(s: &ReproduceSummary, dir: &Path) -> Result<(), ReportError> {
    let json = serde_json::to_string_pretty(s).map_err(|e| ReportError::Write { path: dir.join(METRICS_JSON), reason: e.to_string() })?;
    save(dir, METRICS_JSON, &(json + "\n"))
}

/// The steps at which the report tabulates the comparison: PyTorch's anchor steps that this
/// run reached, where the anchors apply (the last anchor, 39950, reads as the run's end), else
/// a handful spread over the run.
fn table_steps(s: &ReproduceSummary) -> Vec<u64> {
    let c = &s.comparison;
    let reached: Vec<u64> = s.references.pytorch_curve.iter().map(|r| r.0).filter(|&step| step <= c.steps).collect();
    if s.anchors_apply() && reached.len() >= 3 {
        return reached;
    }
    // Evaluation steps near each fifth, and the last step, evaluated whether or not the
    // interval divides it (a run shorter than one interval has that point only).
    let n = 5u64;
    let mut steps: Vec<u64> =
        (1..=n).map(|i| if i == n { c.steps } else { c.steps * i / n / c.eval_every * c.eval_every }).filter(|&st| st > 0).collect();
    steps.dedup();
    steps
}

/// Evaluation point at or before `step`, as (step, BN, plain).
fn both_at(s: &ReproduceSummary, step: u64) -> Option<(u64, f64, f64)> {
    let (at, bn) = s.comparison.bn.accuracy_at(step)?;
    let (_, plain) = s.comparison.plain.accuracy_at(at)?;
    Some((at, bn, plain))
}

/// Mean over the probed units of |test-set mean input| at the last evaluation: how far from
/// the sigmoid's center its inputs sit (NaN where nothing was probed).
fn distance_from_zero(curve: &Curve) -> f64 {
    let Some(last) = curve.probes.last().filter(|p| !p.neurons.is_empty()) else { return f64::NAN };
    last.neurons.iter().map(|n| n.mean.abs()).sum::<f64>() / last.neurons.len() as f64
}

/// The probed units' spread (85th less 15th percentile of their inputs), averaged over the
/// units, at the first and at the last evaluation point.
fn spread_first_last(curve: &Curve) -> (f64, f64) {
    let spread = |point: Option<&super::ProbePoint>| {
        let Some(point) = point.filter(|p| !p.neurons.is_empty()) else { return f64::NAN };
        point.neurons.iter().map(|n| n.p85 - n.p15).sum::<f64>() / point.neurons.len() as f64
    };
    (spread(curve.probes.first()), spread(curve.probes.last()))
}

/// Writes `report.md`.
pub fn write_report(s: &ReproduceSummary, dir: &Path) -> Result<(), ReportError> {
    save(dir, REPORT_MD, &render_report(s))
}

/// The report's text.
pub fn render_report(s: &ReproduceSummary) -> String {
    let r = &s.references;
    let c = &s.comparison;
    let t = &s.test_time;
    let e = &s.estimators;
    let mut md = String::new();
    let mut w = |line: String| {
        md.push_str(&line);
        md.push('\n');
    };
    let dash = "—".to_string();

    w("# Batch normalization, reproduced".into());
    w(String::new());
    w("Ioffe & Szegedy 2015 (<https://arxiv.org/abs/1502.03167>), §4.1 and Figure 1, as retold in R2RT's \
       \"Implementing Batch Normalization in TensorFlow\" (2016, <https://r2rt.com/implementing-batch-normalization-in-tensorflow.html>), \
       run end to end by `bntrain reproduce`. Every number below is in `metrics.json`."
        .into());
    w(String::new());
    if s.options.quick {
        w("> **Quick run** (`--quick`): far fewer steps than the source; references appear only where they measured the same step, and the run exists to test the pipeline.".into());
        w(String::new());
    }
    if let Some(why) = s.anchors_left_out() {
        w(format!("> {}{}.", why[..1].to_uppercase(), &why[1..]));
        w(String::new());
    }
    w("| setting | value |".into());
    w("|---|---|".into());
    w(format!("| device | {} |", s.device));
    w(format!("| dataset | {}, {} training / {} test examples (`{}`) |", s.dataset, s.train_examples, s.test_examples, s.dataset_source));
    w(format!("| network | {}: BN (ε = {}) before each sigmoid, no pre-BN bias; the plain net has biases; N(0,1) weights, the same draws for both |", s.model.widths().iter().map(|w| w.to_string()).collect::<Vec<_>>().join("-"), s.model.epsilon));
    w(format!("| training | SGD lr {}, batch {}, summed cross-entropy, seed {}, running statistics `{}` |", s.train.learning_rate, s.train.batch_size, s.options.seed, s.train.estimator.label()));
    w(format!("| runs | {} steps side by side (test accuracy every {} steps); BN {} steps, saved and restored; estimators over {} seed(s) |", c.steps, c.eval_every, t.steps, e.seeds.len()));
    w(format!(
        "| wall time | {:.1} s in all: comparison {:.1} s, test time {:.1} s, estimators {:.1} s, outputs {:.1} s |",
        s.timings.total_s, s.timings.comparison_s, s.timings.test_time_s, s.timings.estimators_s, s.timings.outputs_s
    ));
    w(String::new());

    // Headline table.
    w("## Headline numbers".into());
    w(String::new());
    w(format!("| quantity | bntrain | source ({}) | PyTorch anchor |", "R2RT 2016"));
    w("|---|---:|---:|---:|".into());
    // A reference is shown only where it measured the same setup at the row's step.
    let anchors = s.anchors_apply();
    let cell = |v: Option<f64>| v.filter(|_| anchors).map_or_else(|| dash.clone(), fmt4);
    let torch_at = |step: u64, run_steps: u64| r.pytorch_at(step, run_steps).filter(|_| anchors);
    let at_10000 = both_at(s, 10_000);
    let mut comparison_rows = vec![];
    comparison_rows.extend(at_10000);
    if c.steps > 10_000 || at_10000.map(|x| x.0) != Some(c.steps) {
        comparison_rows.extend(both_at(s, c.steps).filter(|end| Some(end.0) != at_10000.map(|x| x.0)));
    }
    // PyTorch's last evaluation, step 39950, stands for the end of its 40000-step run: said
    // in the cell.
    let torch_cell = |at: u64, v: Option<f64>| {
        let shown = cell(v);
        if v.is_some() && anchors && at == super::reference::PYTORCH_STEPS { format!("{shown} (step 39950)") } else { shown }
    };
    for (at, bn, plain) in comparison_rows {
        let torch = torch_at(at, c.steps);
        w(format!("| BN test accuracy at step {at} | {} | {dash} | {} |", fmt4(bn), torch_cell(at, torch.map(|x| x.0))));
        w(format!("| plain test accuracy at step {at} | {} | {dash} | {} |", fmt4(plain), torch_cell(at, torch.map(|x| x.1))));
    }
    // The source's "final accuracy" is the last evaluation of its 10000-step training loop,
    // which normalizes the test set with its own batch statistics (is_training=True): beside
    // bntrain's BN net after as many steps, measured the same way, and PyTorch's comparison
    // run at that step (batch statistics too).
    let torch_final = torch_at(t.steps, c.steps).map(|x| x.0);
    let source_final = r.source_final_at(t.steps);
    w(format!(
        "| BN net after {} steps, whole test set as one batch (batch statistics){} | {} | {} | {} |",
        t.steps, if source_final.is_some() && anchors { ": the source's \"final accuracy\"¹" } else { "" },
        fmt4(t.accuracy_test_batch), cell(source_final), cell(torch_final)
    ));
    w(format!("| restored BN net after {} steps, test accuracy (population statistics) | {} | {dash} | {dash} |", t.steps, fmt4(t.accuracy_population)));
    let one_by_one = |v: f64| cell(Some(v).filter(|_| r.trained_long_enough_for_references(t.steps)));
    w(format!("| one-by-one, first {} test images, population statistics | {} | {} | {} |", t.first_population.count, fmt4(t.first_population.accuracy), one_by_one(r.source_one_by_one_population), one_by_one(r.pytorch_one_by_one_population)));
    w(format!("| one-by-one, first {} test images, batch statistics | {} | {} | {} |", t.first_batch.count, fmt4(t.first_batch.accuracy), one_by_one(r.source_one_by_one_batch), one_by_one(r.pytorch_one_by_one_batch)));
    // The source prints all 100 predictions; PyTorch's anchor kept its first 20.
    let long_enough = anchors && r.trained_long_enough_for_references(t.steps);
    let (source_collapsed, torch_collapsed) = if long_enough {
        let class = r.source_collapsed_class;
        (format!("{} (all \"{class}\")", fmt4(1.0)), format!("all \"{class}\" (the 20 it recorded)"))
    } else {
        (dash.clone(), dash.clone())
    };
    w(format!(
        "| batch statistics: share predicted as \"{}\" | {} | {source_collapsed} | {torch_collapsed} |",
        t.first_batch.majority_class, fmt4(t.first_batch.majority_share)
    ));
    w(format!("| one-by-one, all {} test images, batch statistics | {} | {dash} | {dash} |", t.all_count, fmt4(t.all_batch)));
    w(String::new());
    if anchors {
        let mut notes = format!(
            "References are shown at the steps they were measured at, — elsewhere. \
             PyTorch's accuracies are from its {}-step comparison run, at steps {} (its last evaluation, 39950, stands for the end of a {}-step run); \
             its one-by-one figures are from that run's net after {} steps, the source's from its net after {} steps.",
            super::reference::PYTORCH_STEPS,
            r.pytorch_curve.iter().map(|x| x.0.to_string()).collect::<Vec<_>>().join(", "), super::reference::PYTORCH_STEPS,
            super::reference::PYTORCH_STEPS, super::reference::SOURCE_FINAL_STEPS
        );
        if source_final.is_some() {
            let _ = write!(
                notes,
                " ¹ The source prints as its \"final accuracy\" the last test evaluation of its {}-step training loop (after its step 9950), \
                 which runs the graph with is_training=True: the test set normalized by its own batch statistics, as in this row, not by the \
                 population statistics it restores later. It trained on TensorFlow's 55000-image training split of MNIST (5000 held out for \
                 validation) in TensorFlow's shuffled order; bntrain trains on all {} training images in its own seeded order. \
                 Neither bntrain nor PyTorch's anchor reaches its accuracy at that step.",
                super::reference::SOURCE_FINAL_STEPS, s.train_examples
            );
        }
        let _ = write!(notes, " PyTorch numbers: {}.", r.pytorch);
        w(notes);
        w(String::new());
    }

    // Figure 1(a).
    w("## Figure 1(a): test accuracy with and without BN".into());
    w(String::new());
    w(format!("![Figure 1(a)]({FIG1A}.png)"));
    w(String::new());
    w(format!("![BN's lead over plain]({FIG1A_LEAD}.png)"));
    w(String::new());
    let above = |points: &[(f64, f64)]| points.iter().filter(|(b, p)| b > p).count();
    let pairs: Vec<(f64, f64)> = c.bn.history.iter().zip(&c.plain.history).map(|(b, p)| (b.test_accuracy, p.test_accuracy)).collect();
    let first = |fraction: usize| (pairs.len() / fraction).max(1).min(pairs.len());
    let (early, quarter) = (first(20), first(4));
    // Each group named by the step it reaches: with few points, "the first 5%" would not be.
    let to_step = |n: usize| c.bn.history.get(n.saturating_sub(1)).map_or(0, |p| p.step);
    let for_good = match c.bn_ahead_from() {
        Some(step) if Some(step) != c.bn.history.first().map(|p| p.step) => format!(" From step {step} on, BN is above plain at every evaluation."),
        Some(_) => " BN is above plain at every evaluation.".to_string(),
        None => String::new(),
    };
    // The groups that say something: with few points the first 5% and the first quarter are
    // the same points, or all of them.
    let mut groups: Vec<String> = Vec::new();
    for n in [early, quarter] {
        if n >= 2 && n < pairs.len() && !groups.iter().any(|g| g.contains(&format!("(to step {})", to_step(n)))) {
            groups.push(format!("{} of the first {n} (to step {})", above(&pairs[..n]), to_step(n)));
        }
    }
    let all = match pairs.len() {
        1 => format!("at the one evaluation point: {}", if above(&pairs) == 1 { "yes" } else { "no" }),
        n => format!("at {} of all {n} evaluation points", above(&pairs)),
    };
    let groups = if groups.is_empty() { String::new() } else { format!(" ({})", groups.join(", ")) };
    w(format!("BN is above plain {all}{groups}.{for_good}"));
    if let Some((at, bn, plain)) = both_at(s, c.steps) {
        let ends = match bn.partial_cmp(&plain) {
            Some(std::cmp::Ordering::Greater) => "BN ends higher",
            Some(std::cmp::Ordering::Less) => "BN ends lower",
            Some(std::cmp::Ordering::Equal) => "the two end level",
            None => "the two do not compare (a value is not a number)",
        };
        w(format!("At the last evaluation (step {at}) BN is at {} and plain at {}: {ends}.", fmt4(bn), fmt4(plain)));
    }
    w(String::new());
    let floor = super::figures::accuracy_floor(&[&c.bn, &c.plain]);
    let below = |history: &[crate::model::checkpoint::HistoryPoint]| history.iter().filter(|p| p.test_accuracy < floor).count();
    let (below_bn, below_plain) = (below(&c.bn.history), below(&c.plain.history));
    let measured = match c.eval_mode.as_str() {
        "batch" => "measured as the source and PyTorch's anchor measure it: BN normalizes the test set with the statistics of the whole test set taken as one batch".to_string(),
        "population" => "measured with BN's population statistics (the running estimates), not as the source and PyTorch's anchor measure it (the whole test set's own batch statistics)".to_string(),
        other => format!("with BN's test-time statistics `{other}`"),
    };
    let when = if c.steps < c.eval_every { format!("at the last step ({}, before the first interval of {})", c.steps, c.eval_every) } else { format!("every {} steps", c.eval_every) };
    w(format!(
        "Test accuracy {when}, {measured} (`eval_mode: {}`). \
         The accuracy axis runs from {floor:.2} to 1{}; early points below it: {below_bn} of BN's, {below_plain} of plain's.",
        c.eval_mode, if floor == 0.8 { " as in the source" } else { " (lowered from the source's 0.8 to show this run)" }
    ));
    w(String::new());
    w("Some of those points, every one in `curves.csv`:".into());
    w(String::new());
    w("| step | BN | plain | PyTorch BN | PyTorch plain |".into());
    w("|---:|---:|---:|---:|---:|".into());
    for step in table_steps(s) {
        if let Some((at, bn, plain)) = both_at(s, step) {
            let torch = torch_at(at, c.steps);
            w(format!("| {at} | {} | {} | {} | {} |", fmt4(bn), fmt4(plain), cell(torch.map(|x| x.0)), cell(torch.map(|x| x.1))));
        }
    }
    w(String::new());

    // Figure 1(b,c).
    w("## Figure 1(b,c): the sigmoid's inputs over training".into());
    w(String::new());
    let (level_plain, level_bn) = (distance_from_zero(&c.plain), distance_from_zero(&c.bn));
    let level = match level_plain.partial_cmp(&level_bn) {
        Some(std::cmp::Ordering::Greater) => "the plain net's sit farther from 0 (unscaled N(0,1) weights push the sigmoid toward saturation)",
        Some(std::cmp::Ordering::Less) => "BN's sit farther from 0",
        Some(std::cmp::Ordering::Equal) => "both sit as far from 0",
        None => "they do not compare (a value is not a number)",
    };
    let wander = match c.drift_bn.partial_cmp(&c.drift_plain) {
        _ if c.bn.probes.len() < 2 || c.plain.probes.len() < 2 => "With a single evaluation point, how far they wander over training is not measured",
        Some(std::cmp::Ordering::Less) => "With BN their means wander less over training than without",
        Some(std::cmp::Ordering::Greater) => "With BN their means wander more over training than without",
        Some(std::cmp::Ordering::Equal) => "With and without BN their means wander as much over training",
        None => "How far they wander does not compare (a value is not a number)",
    };
    let ((spread_plain_first, spread_plain_last), (spread_bn_first, spread_bn_last)) = (spread_first_last(&c.plain), spread_first_last(&c.bn));
    let growth = |first: f64, last: f64| if first > 0.0 { format!(" (×{:.1})", last / first) } else { String::new() };
    // With the test set's own batch statistics, BN's output has, per unit, the mean β and the
    // standard deviation γ (up to ε) exactly: the means plotted are β's path.
    let by_construction = if c.eval_mode == "batch" {
        " With BN, measured with the test set's own batch statistics, a unit's mean input over the test set is its learned shift β and its spread follows its learned scale γ: the BN panels trace the two parameters."
    } else {
        ""
    };
    w(format!(
        "The inputs to the sigmoid of {} of hidden layer {} over training, on the test set. \
         The post's view: their mean. The paper's view: their 15th, 50th and 85th percentiles. \
         The two panels of a row share their scale, each centered on its own values, so how far the inputs wander compares directly. \
         At the last evaluation the units' mean input is {} from 0 without BN and {} with BN, averaged over the units: {level}. \
         {wander} (the table: the range of each unit's mean input over training, averaged over the units). \
         Their spread, the 85th less the 15th percentile averaged over the units, goes from {} to {}{} without BN and from {} to {}{} with BN \
         between the first and the last evaluation.{by_construction}",
        if c.probe_neurons == 1 { "the first unit".to_string() } else { format!("the first {} units", c.probe_neurons) },
        c.probe_layer + 1, fmt4(level_plain), fmt4(level_bn),
        fmt4(spread_plain_first), fmt4(spread_plain_last), growth(spread_plain_first, spread_plain_last),
        fmt4(spread_bn_first), fmt4(spread_bn_last), growth(spread_bn_first, spread_bn_last)
    ));
    w(String::new());
    w(format!("![Figure 1(b,c), means]({FIG1B}.png)"));
    w(String::new());
    w(format!("![Figure 1(b,c), percentiles]({FIG1C}.png)"));
    w(String::new());
    w("| drift: range of a unit's test-set mean input over training, averaged over the units | without BN | with BN |".into());
    w("|---|---:|---:|".into());
    w(format!("| mean range | {} | {} |", fmt4(c.drift_plain), fmt4(c.drift_bn)));
    w(format!("| spread (85th − 15th percentile) at the first evaluation | {} | {} |", fmt4(spread_plain_first), fmt4(spread_bn_first)));
    w(format!("| spread at the last evaluation | {} | {} |", fmt4(spread_plain_last), fmt4(spread_bn_last)));
    w(String::new());

    // Test time.
    w("## Test time: population statistics, not batch statistics".into());
    w(String::new());
    let (population, batch) = (&t.first_population, &t.first_batch);
    let right = |one: &super::OneByOne| (one.accuracy * one.count as f64).round();
    let compared = match population.accuracy.partial_cmp(&batch.accuracy) {
        Some(std::cmp::Ordering::Greater) => "does better",
        Some(std::cmp::Ordering::Equal) => "does no better",
        Some(std::cmp::Ordering::Less) => "does worse",
        None => "does not compare (a value is not a number)",
    };
    w(format!(
        "The BN net trained for {} steps was saved to `{}`, restored into a fresh backend and asked to predict the first {} test images one at a time. \
         With batch statistics every normalized value of a batch of one is 0, so the net sees the same input whatever the image: \
         {} of {} predictions are \"{}\", {} right. With population statistics it {compared}: {} of {} right. \
         (After {} steps the EMA of the population statistics still gives weight {} to its initial values, mean 0 and variance 1.)",
        t.steps, t.checkpoint, batch.count,
        (batch.majority_share * batch.count as f64).round(), batch.count, batch.majority_class, right(batch),
        right(population), population.count,
        t.steps, fmt_small(t.ema_initial_weight)
    ));
    w(String::new());
    w(format!("![One-by-one predictions]({TEST_TIME}.png)"));
    w(String::new());
    w("| predicted class | ".to_string() + &(0..t.first_batch.class_histogram.len()).map(|k| k.to_string()).collect::<Vec<_>>().join(" | ") + " |");
    w("|---|".to_string() + &"---:|".repeat(t.first_batch.class_histogram.len()));
    for (name, one) in [("population statistics", &t.first_population), ("batch statistics", &t.first_batch)] {
        w(format!("| {name} | {} |", one.class_histogram.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" | ")));
    }
    w(String::new());
    w(format!(
        "Test accuracy before saving {} and after restoring {} (population statistics, the whole test set at once).",
        fmt4(t.accuracy_before_save), fmt4(t.accuracy_population)
    ));
    w(String::new());

    // Estimators.
    w("## Beyond the source: which population statistics?".into());
    w(String::new());
    w(format!(
        "On the same trained weights (BN, {} steps; seeds {}), each estimator's statistics are swapped in for inference and the test set is evaluated. \
         The running estimators were maintained side by side during training; the exact moments were recomputed afterwards in one f64 pass over the {} training images, \
         layer by layer, each layer's input normalized by the statistics already recomputed below it. \
         Errors are against the exact moments of the same variance kind, averaged over BN units and seeds (a unit whose exact variance is 0 has no relative error and is left out of that column).",
        e.steps, e.seeds.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "), s.train_examples
    ));
    w(String::new());
    w(format!("![Estimators]({ESTIMATORS}.png)"));
    w(String::new());
    w("| estimator | mean | std (over seeds, ÷N) | min | max | per seed | mean abs error of μ | mean rel. error of σ² | what |".into());
    w("|---|---:|---:|---:|---:|---|---:|---:|---|".into());
    for row in &e.rows {
        w(format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
            // A spread over one seed is no measurement.
            row.label, fmt4(row.mean), if e.seeds.len() < 2 { dash.clone() } else { fmt4(row.std) }, fmt4(row.min), fmt4(row.max),
            row.accuracy.iter().map(|a| fmt4(*a)).collect::<Vec<_>>().join(", "),
            fmt_small(row.mean_error), fmt_small(row.var_rel_error), row.description
        ));
    }
    w(String::new());
    if let (Some(ema), Some(cum)) = (e.row("ema0.999-biased"), e.row("cumulative-biased")) {
        let delta = cum.mean - ema.mean;
        let spread = (ema.max - ema.min).max(cum.max - cum.min);
        // The claim is about an EMA that has forgotten its start (mean 0, variance 1): until
        // then the EMA's deficit is its warm-up, not the averaging.
        let start_weight = 0.999f64.powf(e.steps as f64);
        let warming = format!(
            "cannot judge it here: after {} steps the EMA 0.999 still gives weight {} to its initial mean 0 and variance 1, so the gap is its warm-up (train longer: after 5000 steps the weight is under 0.01)",
            e.steps, fmt_small(start_weight)
        );
        let verdict = if !delta.is_finite() {
            "cannot judge it: a mean accuracy is not a number"
        } else if start_weight > 0.01 {
            warming.as_str()
        } else if e.seeds.len() == 1 {
            if delta > 0.0 {
                "leans its way on one seed (`--seeds N` measures the spread)"
            } else if delta == 0.0 {
                "finds no difference on one seed (`--seeds N` measures the spread)"
            } else {
                "goes against it on one seed (`--seeds N` measures the spread)"
            }
        } else if delta > 0.0 && delta > spread {
            "bears it out: the simple average is better by more than the spread across seeds"
        } else if delta > 0.0 {
            "leans its way, but the difference is within the spread across seeds"
        } else if delta == 0.0 {
            "finds no difference"
        } else {
            "does not bear it out: the EMA is at least as good here"
        };
        w(format!(
            "The source claims a simple average of the batch statistics would be marginally better than the EMA. Cumulative average {} vs EMA 0.999 {} (difference {}, over {} seed(s)): this run {}.",
            fmt4(cum.mean), fmt4(ema.mean), fmt_signed(delta), e.seeds.len(), verdict
        ));
        w(String::new());
        w("The cumulative average weighs the batch statistics of early training, when the weights below were different, as much as the latest ones; \
           an EMA forgets them, and its decay sets how fast (0.999 also forgets its initial mean 0 and variance 1 slowly, which shows after few steps). \
           The exact moments, recomputed once the weights are fixed, need no forgetting: the ideal the running estimates approximate."
            .into());
        w(String::new());
    }

    w("## Files".into());
    w(String::new());
    for f in &s.files {
        w(format!("- `{f}`"));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::sample;

    /// The cells of the report's table row whose label starts with `label`.
    fn row(report: &str, label: &str) -> Vec<String> {
        let line = report.lines().find(|l| l.starts_with(&format!("| {label}"))).unwrap_or_else(|| panic!("no row `{label}` in\n{report}"));
        line.trim().trim_matches('|').split('|').map(|c| c.trim().to_string()).collect()
    }

    /// Where BN pulls ahead for good is the point after its last evaluation at or below plain.
    #[test]
    fn the_text_says_from_where_bn_stays_ahead() {
        let mut s = sample(1000, 50, 500);
        assert!(render_report(&s).contains("BN is above plain at every evaluation."));
        // Plain ties BN at step 300 and leads at step 150: BN is ahead for good from 350.
        for (i, at) in [(2, 0.5), (5, 1.0)] {
            s.comparison.plain.history[i].test_accuracy = s.comparison.bn.history[i].test_accuracy.max(at);
        }
        s.comparison.plain.history[5].test_accuracy = s.comparison.bn.history[5].test_accuracy;
        assert!(render_report(&s).contains("From step 350 on, BN is above plain at every evaluation."));
        // A point that is not a number is not one where BN is ahead.
        s.comparison.bn.history[7].test_accuracy = f64::NAN;
        assert!(render_report(&s).contains("From step 450 on, BN is above plain at every evaluation."));
        assert_eq!(s.comparison.bn_ahead_from(), Some(450));
        // Behind at the last point: no such step.
        let last = s.comparison.plain.history.len() - 1;
        s.comparison.plain.history[last].test_accuracy = 1.0;
        assert!(!render_report(&s).contains("above plain at every evaluation"));
    }

    /// The table of points has a row even for a run shorter than one evaluation interval
    /// (its only point is its last step), and ends at the last step where the interval does
    /// not divide it.
    #[test]
    fn the_table_of_points_ends_at_the_last_step() {
        let mut s = sample(200, 50, 100);
        s.references.pytorch_curve.clear();
        let rows = |s: &ReproduceSummary| -> Vec<String> {
            let report = render_report(s);
            let table = report.split("Some of those points").nth(1).expect("the table").to_string();
            let table = table.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|'));
            table.skip(2).map(|l| l.split('|').nth(1).unwrap().trim().to_string()).collect()
        };
        assert_eq!(rows(&s), ["50", "100", "150", "200"]);
        for curve in [&mut s.comparison.bn, &mut s.comparison.plain] {
            curve.history.truncate(4);
            let mut last = curve.history[3].clone();
            last.step = 230;
            curve.history.push(last);
        }
        s.comparison.steps = 230;
        assert_eq!(rows(&s), ["50", "100", "150", "230"]);
        for curve in [&mut s.comparison.bn, &mut s.comparison.plain] {
            curve.history.truncate(1);
            curve.history[0].step = 30;
        }
        s.comparison.steps = 30;
        assert_eq!(rows(&s), ["30"]);
        // The text of a run shorter than one interval: its one point, said once.
        let report = render_report(&s);
        assert!(report.contains("BN is above plain at the one evaluation point: yes."), "{report}");
        assert!(report.contains("Test accuracy at the last step (30, before the first interval of 50)"), "{report}");
    }

    /// Counts of the early points, each group once and only where it is not all of them.
    #[test]
    fn the_early_points_are_counted_once_each() {
        let report = render_report(&sample(1000, 50, 500));
        assert!(report.contains("BN is above plain at 20 of all 20 evaluation points (5 of the first 5 (to step 250))."), "{report}");
        let report = render_report(&sample(40000, 50, 500));
        assert!(report.contains("at 800 of all 800 evaluation points (40 of the first 40 (to step 2000), 200 of the first 200 (to step 10000))."), "{report}");
    }

    #[test]
    fn non_finite_numbers_print_as_not_available() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(fmt_small(v), "n/a");
            assert_eq!(fmt4(v), "n/a");
            assert_eq!(fmt_signed(v), "n/a");
        }
        assert_eq!(fmt_small(2.5e-5), "2.50e-5");
        assert_eq!(fmt_signed(0.01), "+0.0100");
    }

    #[test]
    fn the_headline_pairs_each_row_with_the_anchor_at_its_step() {
        let quick = render_report(&sample(1000, 50, 500));
        assert_eq!(row(&quick, "BN test accuracy at step 1000")[1..], ["0.9500", "—", "0.8986"]);
        assert_eq!(row(&quick, "plain test accuracy at step 1000")[3], "0.8798");
        // The restored net's population statistics have no reference beside them; its
        // batch-statistics accuracy has PyTorch's at the same step.
        assert_eq!(row(&quick, "restored BN net after 500 steps")[2..], ["—", "—"]);
        assert_eq!(row(&quick, "BN net after 500 steps, whole test set")[2..], ["—", "0.8768"]);
        let longer = render_report(&sample(15_000, 50, 3000));
        assert_eq!(row(&longer, "BN test accuracy at step 10000")[3], "0.9535");
        assert_eq!(row(&longer, "BN test accuracy at step 15000")[3], "—");
        assert_eq!(row(&longer, "plain test accuracy at step 15000")[3], "—");
        assert_eq!(row(&longer, "restored BN net after 3000 steps")[2..], ["—", "—"]);
        assert_eq!(row(&longer, "BN net after 3000 steps, whole test set")[2..], ["—", "—"]);
        assert!(!longer.contains("¹"), "a footnote for no reference");
        // The source's "final accuracy" beside the same measurement, with its footnote.
        let source = render_report(&sample(15_000, 50, 10_000));
        assert_eq!(row(&source, "BN net after 10000 steps, whole test set")[2..], ["0.9721", "0.9535"]);
        assert!(row(&source, "BN net after 10000 steps, whole test set")[0].ends_with("the source's \"final accuracy\"¹"));
        assert!(source.contains("¹ The source prints as its \"final accuracy\""));
        assert_eq!(row(&source, "restored BN net after 10000 steps")[2..], ["—", "—"]);
        // PyTorch's 39950 beside a 40000-step run's end, said in the cell.
        let full = render_report(&sample(40_000, 50, 10_000));
        assert_eq!(row(&full, "BN test accuracy at step 40000")[3], "0.9689 (step 39950)");
    }

    #[test]
    fn references_are_left_out_where_they_do_not_apply() {
        let mut s = sample(10_000, 50, 10_000);
        s.model.hidden = vec![50, 50];
        let report = render_report(&s);
        for label in ["BN test accuracy at step 10000", "BN net after 10000 steps, whole test set", "one-by-one, first 100 test images, population", "one-by-one, first 100 test images, batch", "batch statistics: share", "10000 |"] {
            let cells = row(&report, label);
            assert_eq!(cells[cells.len() - 2..], ["—", "—"], "a reference where none applies: {cells:?}");
        }
        assert_eq!(report.matches("are for 784-100-100-10 on MNIST").count(), 1, "why, once");
        assert!(!report.contains(crate::report::reference::PYTORCH), "no PyTorch citation for numbers not shown");
    }

    /// Every claim of the text follows what was measured: here the opposite of the source's
    /// story (plain ends higher, BN's inputs wander more and sit farther from 0, population
    /// statistics no better than batch ones), measured with population statistics.
    #[test]
    fn the_text_claims_only_what_was_measured() {
        let mut s = sample(1000, 50, 500);
        let c = &mut s.comparison;
        std::mem::swap(&mut c.bn, &mut c.plain);
        std::mem::swap(&mut c.drift_bn, &mut c.drift_plain);
        c.eval_mode = "population".into();
        s.test_time.first_population.accuracy = 0.09;
        let report = render_report(&s);
        for claim in ["BN trains faster", "ends higher", "stay put", "they stay near 0", "classifies as it should", "taken as one batch", "the plain net's sit farther"] {
            assert!(!report.contains(claim), "the report claims `{claim}` against the data:\n{report}");
        }
        for measured in ["BN ends lower", "With BN their means wander more", "BN's sit farther from 0", "it does no better: 9 of 100 right", "population statistics (the running estimates)"] {
            assert!(report.contains(measured), "the report does not say `{measured}`:\n{report}");
        }
        let story = render_report(&sample(1000, 50, 500));
        for measured in ["BN ends higher", "With BN their means wander less", "the plain net's sit farther from 0", "it does better: 97 of 100 right", "taken as one batch"] {
            assert!(story.contains(measured), "the report does not say `{measured}`:\n{story}");
        }
    }

    #[test]
    fn a_tie_on_one_seed_is_no_difference() {
        let mut s = sample(40_000, 50, 10_000);
        let ema = s.estimators.rows[0].clone();
        s.estimators.rows[1] = crate::report::EstimatorRow { label: "cumulative-biased".into(), ..ema };
        let report = render_report(&s);
        assert!(report.contains("finds no difference on one seed") && !report.contains("goes against it"), "{report}");
        assert!(report.contains("(difference +0.0000, over 1 seed(s))"), "{report}");
    }

    /// After 500 steps the EMA 0.999 still holds 61% of its start: its gap to the cumulative
    /// average is its warm-up, and the report does not judge the source's claim on it.
    #[test]
    fn an_ema_still_warming_up_does_not_judge_the_claim() {
        let mut s = sample(1000, 50, 500);
        s.estimators.rows[0].mean = 0.59;
        s.estimators.rows[1] = crate::report::EstimatorRow { label: "cumulative-biased".into(), mean: 0.87, ..s.estimators.rows[0].clone() };
        let report = render_report(&s);
        assert!(report.contains("cannot judge it here: after 500 steps the EMA 0.999 still gives weight 0.6064"), "{report}");
        assert!(!report.contains("bears it out") && !report.contains("leans its way"), "{report}");
    }

    /// One evaluation point measures no drift: the report says so instead of comparing zeros.
    #[test]
    fn a_single_evaluation_point_measures_no_drift() {
        let mut s = sample(50, 50, 500);
        for curve in [&mut s.comparison.bn, &mut s.comparison.plain] {
            curve.probes.truncate(1);
        }
        s.comparison.drift_bn = crate::report::study::drift(&s.comparison.bn);
        s.comparison.drift_plain = crate::report::study::drift(&s.comparison.plain);
        let report = render_report(&s);
        assert!(report.contains("With a single evaluation point, how far they wander over training is not measured"), "{report}");
        assert!(report.contains("| mean range | n/a | n/a |"), "{report}");
    }
}
