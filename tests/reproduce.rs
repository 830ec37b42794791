//! `reproduce --quick` end to end on the CPU: every output file exists and parses, and every
//! number in report.md equals the one in metrics.json.
//!
//! Two variants: a small synthetic dataset (always runs) and real MNIST (runs when the files
//! are found through `BNTRAIN_DATA` or the cache, without downloading; skipped loudly
//! otherwise). Outputs stay in `target/tmp/reproduce-quick-*` for inspection.

// Skip notices go to stderr directly, past the test harness's capture, so a run shows them.
mod support;

use std::io::Write as _;
use bntrain::backend::Backend;
use bntrain::cpu::CpuBackend;
use bntrain::data::{load_dir, Dataset, DatasetKind, Split};
use bntrain::model::checkpoint::Checkpoint;
use bntrain::model::{ModelConfig, ModelParams, TrainConfig};
use bntrain::report::{partial_dir, reproduce, ReportError, ReproduceOptions, ReproduceSummary};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Ten classes of 8×8 "images": a random prototype per class plus noise. Labels cycle 0..9,
/// so a net that predicts one class for everything scores exactly 0.1.
fn synthetic(train: usize, test: usize) -> Dataset {
    let features = 64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let prototypes: Vec<Vec<f64>> = (0..10).map(|_| (0..features).map(|_| (next() % 256) as f64).collect()).collect();
    let mut split = |count: usize| {
        let mut images = Vec::with_capacity(count * features);
        let labels: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
        for &label in &labels {
            for &p in &prototypes[label as usize] {
                let noise = (next() % 161) as f64 - 80.0;
                images.push((p + noise).clamp(0.0, 255.0) as u8);
            }
        }
        Split { images, labels, count, features, classes: 10 }
    };
    let train = split(train);
    let test = split(test);
    Dataset { kind: DatasetKind::Mnist, train, test, source: PathBuf::from("synthetic (tests/reproduce.rs)") }
}

fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn run_quick(data: Dataset, dir: PathBuf) -> ReproduceSummary {
    let data = Arc::new(data);
    let opts = ReproduceOptions::quick(dir);
    let shared = Arc::clone(&data);
    let mut open = move |model: ModelConfig, train: TrainConfig, params: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
        Ok(Box::new(CpuBackend::<f32>::new(model, train, Arc::clone(&shared), params)?))
    };
    let started = Instant::now();
    let summary = reproduce(&opts, data, &mut open, None).expect("reproduce --quick");
    eprintln!("reproduce --quick on {}: {:.1} s\n{}", summary.dataset_source, started.elapsed().as_secs_f64(), summary.table());
    summary
}

/// A stop request ends the study at the next step boundary with `Error::Interrupted` (inside `Error::Kept`, which names where); what
/// it wrote stays in `<name>.partial` and nothing reaches the output directory. Meanwhile a
/// second study into the same directory is refused rather than let delete those outputs.
#[test]
fn a_stopped_study_keeps_its_partial_outputs_and_a_concurrent_one_is_refused() {
    let data = Arc::new(synthetic(600, 200));
    let dir = out_dir("reproduce-stopped");
    let _ = std::fs::remove_dir_all(partial_dir(&dir));
    let opts = ReproduceOptions::quick(dir.clone());
    let stop = AtomicBool::new(false);
    let shared = Arc::clone(&data);
    let (mut opened, mut concurrent) = (0, None);
    let mut open = |model: ModelConfig, train: TrainConfig, params: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
        opened += 1;
        // The comparison's two networks and the test-time network have trained, and the
        // last is saved; its restored copy is next.
        if opened == 4 {
            let mut refused = |_: ModelConfig, _: TrainConfig, _: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
                panic!("a study refused at the start opens no network")
            };
            concurrent = Some(reproduce(&opts, Arc::clone(&shared), &mut refused, None));
            stop.store(true, Ordering::Relaxed);
        }
        Ok(Box::new(CpuBackend::<f32>::new(model, train, Arc::clone(&shared), params)?))
    };
    let result = reproduce(&opts, Arc::clone(&data), &mut open, Some(&stop));
    match result {
        Err(bntrain::Error::Kept { failed, kept }) => {
            assert!(matches!(*failed, bntrain::Error::Interrupted { .. }), "{failed}");
            assert_eq!(kept, partial_dir(&dir), "the partial directory, holding what it wrote");
        }
        other => panic!("not stopped with its partial outputs kept: {:?}", other.map(|s| s.files)),
    }
    match concurrent {
        Some(Err(bntrain::Error::Report(ReportError::Busy(busy)))) => assert_eq!(busy, dir),
        other => panic!("the concurrent study was not refused: {:?}", other.map(|r| r.map(|s| s.files))),
    }
    assert!(partial_dir(&dir).join("bn_net.safetensors").is_file(), "the stopped study's partial outputs are kept");
    // Nothing reached the output directory, which the study made: it went, empty.
    assert!(!dir.exists(), "nothing reaches the output directory");
    // The lock went with the study: the next one runs.
    let mut open = |model: ModelConfig, train: TrainConfig, params: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
        Ok(Box::new(CpuBackend::<f32>::new(model, train, Arc::clone(&shared), params)?))
    };
    let quick = ReproduceOptions { steps_compare: 20, steps_bn: 20, eval_every: 10, seeds: 1, ..opts.clone() };
    reproduce(&quick, Arc::clone(&data), &mut open, None).expect("a study after the stopped one");
    assert!(dir.join("report.md").is_file() && !partial_dir(&dir).exists());
}

/// A study that fails removes the directories it made where it left them empty (the run
/// directory and the parents `--out` named that did not exist), and says where what it wrote
/// is kept; a concurrent study refused meanwhile touches nothing of it.
#[test]
fn a_failed_study_tidies_only_its_own_directories() {
    let data = Arc::new(synthetic(600, 200));
    for fail_at in [1, 4] {
        let base = out_dir(&format!("reproduce-failed-{fail_at}"));
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("made").join("by-the-study");
        let _ = std::fs::remove_dir_all(partial_dir(&dir));
        let opts = ReproduceOptions::quick(dir.clone());
        let shared = Arc::clone(&data);
        let (mut opened, mut concurrent) = (0, None);
        let mut open = |model: ModelConfig, train: TrainConfig, params: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
            opened += 1;
            if opened == 1 {
                let mut refused = |_: ModelConfig, _: TrainConfig, _: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
                    panic!("a study refused at the start opens no network")
                };
                concurrent = Some(reproduce(&opts, Arc::clone(&shared), &mut refused, None));
                assert!(partial_dir(&dir).is_dir(), "the refused study left the running one's partial directory");
            }
            if opened == fail_at {
                return Err(bntrain::Error::io("opening a network", std::io::Error::other("a test's failure")));
            }
            Ok(Box::new(CpuBackend::<f32>::new(model, train, Arc::clone(&shared), params)?))
        };
        let failed = reproduce(&opts, Arc::clone(&data), &mut open, None).map(|s| s.files).unwrap_err();
        assert!(matches!(concurrent, Some(Err(bntrain::Error::Report(ReportError::Busy(_))))), "fail at {fail_at}");
        let partial = partial_dir(&dir);
        let kept = partial.is_dir() && std::fs::read_dir(&partial).unwrap().next().is_some();
        let message = failed.to_string();
        assert!(message.contains("a test's failure"), "{message}");
        if kept {
            assert!(matches!(failed, bntrain::Error::Kept { .. }) && message.contains(&partial.display().to_string()), "{message}");
            assert!(base.join("made").is_dir(), "fail at {fail_at}: the directory that holds what is kept stays");
        } else {
            assert!(!matches!(failed, bntrain::Error::Kept { .. }), "{message}");
            assert!(!partial.exists() && !base.join("made").exists(), "fail at {fail_at}: empty directories left");
        }
        assert!(base.is_dir(), "fail at {fail_at}: a directory that was there before the study stays");
        assert_eq!(kept, fail_at == 4, "the test-time network's checkpoint is written before the restore opens a network");
    }
}

/// A run directory the outputs could not move into is found before the study: nothing of
/// the probe is left behind, and the error does not say the study wrote anything.
#[test]
fn a_failed_move_probe_leaves_nothing() {
    let data = Arc::new(synthetic(600, 200));
    let dir = out_dir("reproduce-probe");
    // A directory where the probe file would go makes its move fail.
    std::fs::create_dir_all(dir.join(".bntrain-move-probe")).unwrap();
    let mut open = |_: ModelConfig, _: TrainConfig, _: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
        panic!("a study that cannot move its outputs opens no network")
    };
    let failed = reproduce(&ReproduceOptions::quick(dir.clone()), data, &mut open, None).map(|s| s.files).unwrap_err();
    assert!(!matches!(failed, bntrain::Error::Kept { .. }), "{failed}");
    assert!(failed.to_string().contains("cannot move outputs into"), "{failed}");
    assert!(!partial_dir(&dir).exists(), "the partial directory, empty, goes");
    assert!(dir.join(".bntrain-move-probe").is_dir(), "what was there stays");
}

/// The cells of a markdown table row, trimmed (None for lines that are not table rows).
fn cells(line: &str) -> Option<Vec<String>> {
    let line = line.trim();
    if !line.starts_with('|') || !line.ends_with('|') || line.starts_with("|---") {
        return None;
    }
    Some(line[1..line.len() - 1].split('|').map(|c| c.trim().to_string()).collect())
}

fn f4(v: &Value) -> String {
    format!("{:.4}", v.as_f64().unwrap_or_else(|| panic!("{v} is not a number")))
}

/// Test accuracy of a comparison curve at `step`, from the JSON.
fn curve_at(json: &Value, net: &str, step: u64) -> String {
    let history = json["comparison"][net]["history"].as_array().expect("history");
    let point = history.iter().find(|p| p["step"].as_u64() == Some(step)).unwrap_or_else(|| panic!("no {net} point at step {step}"));
    f4(&point["test_accuracy"])
}

/// Do the references measure this run's setup (784-100-100-10 on MNIST, 60000 / 10000)?
fn anchors_apply(json: &Value) -> bool {
    json["dataset"] == "mnist" && json["model"]["hidden"] == serde_json::json!([100, 100]) && json["train_examples"] == 60_000 && json["test_examples"] == 10_000
}

/// PyTorch's (BN, plain) anchor where it applies at `step` of a run of `run_steps` steps, as
/// report.md should show it: measured at exactly that step, or its last evaluation (39950)
/// for the end of a 40000-step run; "—" elsewhere.
fn torch_at(json: &Value, step: u64, run_steps: u64) -> (String, String) {
    let curve = json["references"]["pytorch_curve"].as_array().expect("pytorch_curve");
    let anchor = curve.iter().find(|a| a[0].as_u64() == Some(step)).or_else(|| curve.last().filter(|_| step == run_steps && run_steps == 40_000));
    match anchor.filter(|_| anchors_apply(json)) {
        Some(a) => (f4(&a[1]), f4(&a[2])),
        None => ("—".into(), "—".into()),
    }
}

/// A reference that applies regardless of the step, as report.md should show it.
fn reference(json: &Value, v: &Value) -> String {
    if anchors_apply(json) { f4(v) } else { "—".into() }
}

/// Every number report.md shows equals the one in metrics.json, and every reference shown is
/// the one measured at the row's step on the same setup; returns how many were checked.
fn check_report_matches_json(report: &str, json: &Value) -> usize {
    let checked = std::cell::Cell::new(0usize);
    let eq = |what: &str, in_report: &str, in_json: String| {
        let in_report = in_report.trim_end_matches('¹');
        assert_eq!(in_report, in_json, "report.md and metrics.json disagree on {what}");
        checked.set(checked.get() + 1);
    };
    let t = &json["test_time"];
    let r = &json["references"];
    let mut in_fig1a_table = false;
    for line in report.lines() {
        let Some(c) = cells(line) else {
            if line.trim().is_empty() {
                in_fig1a_table = false;
            }
            continue;
        };
        let label = c[0].as_str();
        if label == "step" && c.get(1).map(String::as_str) == Some("BN") {
            in_fig1a_table = true;
            continue;
        }
        let run_steps = json["comparison"]["steps"].as_u64().expect("comparison steps");
        if in_fig1a_table {
            let step: u64 = label.parse().expect("a step");
            eq(&format!("BN at {step}"), &c[1], curve_at(json, "bn", step));
            eq(&format!("plain at {step}"), &c[2], curve_at(json, "plain", step));
            let (torch_bn, torch_plain) = torch_at(json, step, run_steps);
            eq(&format!("PyTorch BN at {step}"), &c[3], torch_bn);
            eq(&format!("PyTorch plain at {step}"), &c[4], torch_plain);
            continue;
        }
        for (prefix, net) in [("BN test accuracy at step ", "bn"), ("plain test accuracy at step ", "plain")] {
            if let Some(step) = label.strip_prefix(prefix) {
                let step: u64 = step.parse().expect("a step");
                eq(label, &c[1], curve_at(json, net, step));
                let (torch_bn, torch_plain) = torch_at(json, step, run_steps);
                eq(&format!("PyTorch beside {label}"), &c[3], if net == "bn" { torch_bn } else { torch_plain });
            }
        }
        if label.starts_with("restored BN net after") {
            let steps = t["steps"].as_u64().expect("test-time steps");
            eq(label, &c[1], f4(&t["accuracy_population"]));
            let source = if steps == 10_000 { reference(json, &r["source_final_accuracy_10000"]) } else { "—".into() };
            eq("source final accuracy", &c[2], source);
            // PyTorch's figure is batch statistics: beside settled population statistics only.
            let torch = if steps >= 10_000 { torch_at(json, steps, steps).0 } else { "—".into() };
            eq(&format!("PyTorch BN at {steps}"), &c[3], torch);
        }
        if label.starts_with("one-by-one, first") {
            let (ours, source, torch) = if label.ends_with("population statistics") {
                (&t["first_population"]["accuracy"], &r["source_one_by_one_population"], &r["pytorch_one_by_one_population"])
            } else {
                (&t["first_batch"]["accuracy"], &r["source_one_by_one_batch"], &r["pytorch_one_by_one_batch"])
            };
            eq(label, &c[1], f4(ours));
            // The references' nets trained 10000 (source) and 40000 (PyTorch) steps.
            let trained_as_long = t["steps"].as_u64().expect("test-time steps") >= 10_000;
            let shown = |v: &Value| if trained_as_long { reference(json, v) } else { "—".into() };
            eq(label, &c[2], shown(source));
            eq(label, &c[3], shown(torch));
        }
        if label.starts_with("batch statistics: share predicted as") {
            eq(label, &c[1], f4(&t["first_batch"]["majority_share"]));
            assert!(label.contains(&format!("\"{}\"", t["first_batch"]["majority_class"])), "{label}");
        }
        if label.starts_with("one-by-one, all") {
            eq(label, &c[1], f4(&t["all_batch"]));
        }
        if label.starts_with("restored BN net, whole test set as one batch") {
            eq(label, &c[1], f4(&t["accuracy_test_batch"]));
        }
        if label == "mean range" {
            eq("drift without BN", &c[1], f4(&json["comparison"]["drift_plain"]));
            eq("drift with BN", &c[2], f4(&json["comparison"]["drift_bn"]));
        }
        if label == "population statistics" || label == "batch statistics" {
            let key = if label == "population statistics" { "first_population" } else { "first_batch" };
            let hist: Vec<String> = t[key]["class_histogram"].as_array().expect("histogram").iter().map(|v| v.to_string()).collect();
            assert_eq!(c[1..].to_vec(), hist, "class histogram of {key}");
            checked.set(checked.get() + 1);
        }
        if let Some(name) = label.strip_prefix('`').and_then(|l| l.strip_suffix('`')) {
            let rows = json["estimators"]["rows"].as_array().expect("estimator rows");
            let row = rows.iter().find(|r| r["label"] == name).unwrap_or_else(|| panic!("estimator {name} not in metrics.json"));
            for (i, key) in ["mean", "std", "min", "max"].into_iter().enumerate() {
                eq(&format!("{name} {key}"), &c[1 + i], f4(&row[key]));
            }
            let per_seed: Vec<String> = row["accuracy"].as_array().expect("per seed").iter().map(f4).collect();
            assert_eq!(c[5], per_seed.join(", "), "per-seed accuracies of {name}");
        }
    }
    checked.get()
}

fn check_csv(path: &Path, columns: usize) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header = lines.next().expect("a header");
    assert_eq!(header.split(',').count(), columns, "{}: header {header}", path.display());
    let mut rows = 0;
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), columns, "{}: row {line}", path.display());
        for (name, f) in header.split(',').zip(&fields).skip(1) {
            if name == "test_statistics" {
                assert!(["batch", "population", "none"].contains(f), "{}: `{f}` in `{line}`", path.display());
            } else {
                f.parse::<f64>().unwrap_or_else(|_| panic!("{}: `{f}` in `{line}` is not a number", path.display()));
            }
        }
        rows += 1;
    }
    assert!(rows > 0, "{} has no rows", path.display());
    rows
}

fn check_outputs(summary: &ReproduceSummary, dir: &Path) {
    // Every file the summary lists, and the ones the issue asks for, exist.
    let expected = [
        "metrics.json", "report.md", "curves.csv", "probes.csv", "estimators.csv", "predictions.csv", "bn_net.safetensors",
        "fig1a_accuracy.png", "fig1a_accuracy.svg", "fig1a_lead.png", "fig1a_lead.svg", "fig1b_input_means.png", "fig1b_input_means.svg",
        "fig1c_input_percentiles.png", "fig1c_input_percentiles.svg", "test_time_predictions.png",
        "test_time_predictions.svg", "estimators.png", "estimators.svg",
    ];
    for name in expected {
        assert!(summary.files.iter().any(|f| f == name), "{name} missing from the summary's file list");
    }
    // The names a study checks before it starts are the ones it writes.
    let (mut listed, mut written) = (bntrain::report::output_names(), summary.files.clone());
    listed.sort();
    written.sort();
    assert_eq!(listed, written);
    for name in &summary.files {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!bytes.is_empty(), "{} is empty", path.display());
        if name.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name} is not a PNG");
            assert!(bytes.len() > 10_000, "{name} is suspiciously small ({} bytes)", bytes.len());
        }
        if name.ends_with(".svg") {
            let text = String::from_utf8(bytes).expect("SVG is UTF-8");
            assert!(text.trim_start().starts_with("<svg"), "{name} does not open with <svg");
            assert!(text.trim_end().ends_with("</svg>"), "{name} does not close");
            assert!(text.contains("<text"), "{name} has no text");
        }
    }

    // CSV: header, rows, numbers.
    let evals = summary.comparison.bn.history.len();
    assert_eq!(check_csv(&dir.join("curves.csv"), 7), 2 * evals + summary.test_time.curve.history.len());
    assert_eq!(check_csv(&dir.join("probes.csv"), 8), 2 * evals * summary.comparison.probe_neurons);
    assert_eq!(check_csv(&dir.join("predictions.csv"), 4), summary.test_time.first_batch.count);
    // The labels beside the predictions give the accuracy back.
    let t = &summary.test_time;
    let right = t.first_labels.iter().zip(&t.first_population.predictions).filter(|(l, p)| l == p).count();
    assert_eq!(right as f64 / t.first_population.count as f64, t.first_population.accuracy);
    assert_eq!(check_csv(&dir.join("estimators.csv"), 3), summary.estimators.rows.len() * summary.estimators.seeds.len());

    // JSON: parses, round-trips into the summary type, equals what reproduce returned.
    let text = std::fs::read_to_string(dir.join("metrics.json")).expect("metrics.json");
    let json: Value = serde_json::from_str(&text).expect("metrics.json parses");
    let _: ReproduceSummary = serde_json::from_value(json.clone()).expect("metrics.json is a ReproduceSummary");
    let expected = serde_json::to_string_pretty(summary).expect("the summary serializes") + "\n";
    assert!(text == expected, "metrics.json is not the summary reproduce returned");

    // report.md: embeds every figure and agrees with the JSON.
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    for fig in ["fig1a_accuracy.png", "fig1a_lead.png", "fig1b_input_means.png", "fig1c_input_percentiles.png", "test_time_predictions.png", "estimators.png"] {
        assert!(report.contains(&format!("]({fig})")), "report.md does not embed {fig}");
    }
    let checked = check_report_matches_json(&report, &json);
    let min_expected = 20 + 5 * summary.estimators.rows.len();
    assert!(checked >= min_expected, "only {checked} numbers of report.md were checked (expected at least {min_expected})");

    // The checkpoint restores.
    let checkpoint = Checkpoint::load(&dir.join("bn_net.safetensors")).expect("checkpoint loads");
    assert_eq!(checkpoint.progress.step, summary.test_time.steps);
    assert_eq!(checkpoint.params.estimator_count(), 6);

    // Shape of the study.
    let c = &summary.comparison;
    assert_eq!(c.bn.history.last().map(|p| p.step), Some(c.steps));
    assert_eq!(c.probe_layer, 1);
    assert_eq!(c.probe_neurons, 5);
    assert_eq!(summary.estimators.seeds.len(), 2);
    assert_eq!(summary.estimators.rows.len(), 8);
    let t = &summary.test_time;
    // A batch of one normalizes every value to 0: one class for every input.
    assert_eq!(t.first_batch.majority_share, 1.0, "batch statistics should collapse to one class: {:?}", t.first_batch.class_histogram);
    assert!(t.first_batch.accuracy <= 0.15, "batch-statistics accuracy {}", t.first_batch.accuracy);
    assert!(t.first_population.accuracy > t.first_batch.accuracy);
    assert_eq!(t.accuracy_before_save, t.accuracy_population, "restoring changed the network");
    assert!(!summary.table().is_empty());
}

/// The exact population moments, recomputed in f64 on the host, are the statistics of the
/// whole training set as one batch: inference with them equals the backend's whole-split
/// batch-statistics evaluation.
fn check_exact_moments(data: Arc<Dataset>, dir: &Path) {
    use bntrain::backend::{SplitKind, StatsMode};
    use bntrain::model::VarianceKind;
    use bntrain::report::population;
    let ck = Checkpoint::load(&dir.join("bn_net.safetensors")).expect("checkpoint");
    let exact = population::exact_moments(&ck.model, &ck.params, &data.train, VarianceKind::Biased);
    let params = population::with_slot0(&ck.params, &exact);
    let mut net = CpuBackend::<f64>::new(ck.model.clone(), ck.train.clone(), Arc::clone(&data), &params).expect("backend");
    let with_exact = net.evaluate(SplitKind::Train, StatsMode::Population, None).expect("evaluate");
    let as_one_batch = net.evaluate(SplitKind::Train, StatsMode::Batch, None).expect("evaluate");
    assert_eq!(with_exact.correct, as_one_batch.correct);
    let rel = (with_exact.loss_sum - as_one_batch.loss_sum).abs() / as_one_batch.loss_sum;
    assert!(rel < 1e-9, "loss with the exact moments {} vs the training set as one batch {}", with_exact.loss_sum, as_one_batch.loss_sum);
}

#[test]
fn reproduce_quick_on_synthetic_data() {
    let dir = out_dir("reproduce-quick-synthetic");
    let data = synthetic(3000, 500);
    let summary = run_quick(data.clone(), dir.clone());
    check_outputs(&summary, &dir);
    check_exact_moments(Arc::new(data), &dir);
    assert_eq!(summary.test_time.first_batch.accuracy, 0.1);
    assert!(summary.test_time.accuracy_population > 0.5, "the synthetic task is easy: {}", summary.test_time.accuracy_population);
}

#[test]
fn reproduce_quick_on_mnist() {
    let Some(dir) = support::real_mnist() else { return };
    let data = load_dir(&dir, DatasetKind::Mnist).expect("MNIST loads");
    let out = out_dir("reproduce-quick-mnist");
    let summary = run_quick(data, out.clone());
    check_outputs(&summary, &out);
    let c = &summary.comparison;
    assert!(c.bn.final_accuracy() > 0.8 && c.plain.final_accuracy() > 0.6, "BN {} plain {}", c.bn.final_accuracy(), c.plain.final_accuracy());
    // Figure 1(a): BN above plain early in training.
    let early = c.bn.history.iter().zip(&c.plain.history).take(c.bn.history.len() / 2);
    let above = early.clone().filter(|(b, p)| b.test_accuracy > p.test_accuracy).count();
    assert!(above * 4 >= early.count() * 3, "BN is above plain at only {above} early points");
    // Figure 1(b,c): BN inputs steadier than plain ones.
    assert!(c.drift_bn < c.drift_plain, "drift BN {} vs plain {}", c.drift_bn, c.drift_plain);
}

/// The full default study on the CPU (minutes): `cargo test --test reproduce -- --ignored`.
/// Outputs in `target/tmp/reproduce-full-mnist`.
#[test]
#[ignore]
fn reproduce_full_on_mnist() {
    let Some(dir) = support::real_mnist() else { return };
    let data = Arc::new(load_dir(&dir, DatasetKind::Mnist).expect("MNIST loads"));
    let out = out_dir("reproduce-full-mnist");
    let opts = ReproduceOptions { progress: true, ..ReproduceOptions::new(out.clone()) };
    let shared = Arc::clone(&data);
    let mut open = move |model: ModelConfig, train: TrainConfig, params: &ModelParams| -> bntrain::Result<Box<dyn Backend>> {
        Ok(Box::new(CpuBackend::<f32>::new(model, train, Arc::clone(&shared), params)?))
    };
    let summary = reproduce(&opts, data, &mut open, None).expect("reproduce");
    eprintln!("{}", summary.table());
    check_outputs_full(&summary, &out);
}

fn check_outputs_full(summary: &ReproduceSummary, dir: &Path) {
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).expect("metrics.json")).expect("parses");
    assert!(check_report_matches_json(&report, &json) > 40);
    let t = &summary.test_time;
    // The acceptance: batch statistics collapse, population statistics work.
    assert!(t.first_batch.accuracy <= 0.15, "batch statistics: {}", t.first_batch.accuracy);
    assert!(t.first_population.accuracy >= 0.95, "population statistics: {}", t.first_population.accuracy);
}

/// Redraws the figures and rewrites the tables and report of an existing run from its
/// metrics.json: `BNTRAIN_RERENDER=runs/x cargo test --test reproduce rerender -- --ignored`.
#[test]
#[ignore]
fn rerender() {
    let Some(dir) = std::env::var_os("BNTRAIN_RERENDER") else {
        let _ = writeln!(std::io::stderr(), "skipped: set BNTRAIN_RERENDER to a run directory");
        return;
    };
    let summary = bntrain::report::rerender(Path::new(&dir)).expect("rerender");
    check_outputs_full(&summary, Path::new(&dir));
}
