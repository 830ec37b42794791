//! Interrupting a session between two evaluation points and resuming it gives bitwise the
//! same parameters, statistics, optimizer state and metric history as an unbroken run.

mod support;

use bntrain::device::{DeviceChoice, Precision};
use bntrain::data::DatasetKind;
use bntrain::model::checkpoint::{Checkpoint, TrainedOn};
use bntrain::model::{ModelConfig, TrainConfig};
use bntrain::session::{self, Resumed, Start, TrainRequest};
use bntrain::train::{Event, Outcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn interrupted_and_resumed_equals_unbroken() {
    let data = Arc::new(support::synthetic_dataset(600, 100, 784, 5));
    let dir = tempfile::tempdir().unwrap();
    let mut train = TrainConfig::seed();
    train.momentum = 0.5;
    let request = |start: Start, checkpoint: &str| TrainRequest {
        model: ModelConfig::seed(true),
        train: train.clone(),
        steps: 250,
        eval_every: 40,
        start,
        checkpoint: Some(dir.path().join(checkpoint)),
        interrupt_checkpoint: None,
        device: DeviceChoice::Cpu,
        precision: Precision::F32,
    };
    let full = session::run(&request(Start::Fresh, "full"), data.clone(), None, &mut |_| {}).unwrap();
    assert_eq!(full.outcome, Outcome::Finished { step: 250 });

    // Stop after step 110, between the points at 80 and 120, as Ctrl-C would.
    let stop = AtomicBool::new(false);
    let broken = session::run(&request(Start::Fresh, "broken"), data.clone(), Some(&stop), &mut |e| {
        if let Event::Stepped { step: 110 } = e {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(matches!(broken.outcome, Outcome::Interrupted { step: 110, .. }), "{:?}", broken.outcome);
    let saved = Checkpoint::load(&dir.path().join("broken")).unwrap();
    assert_eq!(saved.progress.pending.steps, 30, "steps 81..=110 are carried to the next point");

    // The session starts from the checkpoint as read here, not from the file again: moved
    // away, it is not missed (the run saves back under its old name).
    let from = Resumed::load(dir.path().join("broken")).unwrap();
    std::fs::rename(dir.path().join("broken"), dir.path().join("broken.read")).unwrap();
    let resumed = session::run(&request(Start::Resume(from), "broken"), data, None, &mut |_| {}).unwrap();
    assert_eq!(resumed.outcome, Outcome::Finished { step: 250 });
    let a = Checkpoint::load(&dir.path().join("full")).unwrap();
    let b = Checkpoint::load(&dir.path().join("broken")).unwrap();
    assert_eq!(a.params, b.params);
    assert_eq!(a.velocity, b.velocity);
    assert_eq!(a.progress, b.progress);
    assert_eq!(full.history, resumed.history);
}

/// A resumed run goes on in the arithmetic it was trained in, whatever the request says
/// (bf16 GEMMs here: resumed as f32 it would differ from the unbroken run), and refuses data
/// other than what it was trained on, and f64 anywhere but the CPU.
#[test]
fn a_resumed_run_keeps_its_arithmetic_and_its_data() {
    let data = Arc::new(support::synthetic_dataset(600, 100, 784, 5));
    let dir = tempfile::tempdir().unwrap();
    let request = |start: Start, checkpoint: &str, precision: Precision| TrainRequest {
        model: ModelConfig::seed(true),
        train: TrainConfig::seed(),
        steps: 120,
        eval_every: 40,
        start,
        checkpoint: Some(dir.path().join(checkpoint)),
        interrupt_checkpoint: None,
        device: DeviceChoice::Cpu,
        precision,
    };
    session::run(&request(Start::Fresh, "full", Precision::Bf16), data.clone(), None, &mut |_| {}).unwrap();
    let stop = AtomicBool::new(false);
    session::run(&request(Start::Fresh, "broken", Precision::Bf16), data.clone(), Some(&stop), &mut |e| {
        if let Event::Stepped { step: 50 } = e {
            stop.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    let saved = Checkpoint::load(&dir.path().join("broken")).unwrap();
    assert_eq!(saved.trained_on, Some(TrainedOn { precision: Precision::Bf16, dataset: data.kind }));
    let resume = |precision| request(Start::Resume(Resumed::load(dir.path().join("broken")).unwrap()), "broken", precision);
    session::run(&resume(Precision::F32), data.clone(), None, &mut |_| {}).unwrap();
    let a = Checkpoint::load(&dir.path().join("full")).unwrap();
    let b = Checkpoint::load(&dir.path().join("broken")).unwrap();
    assert_eq!(a.params, b.params, "resumed in bf16, as it was trained");
    assert_eq!(b.trained_on, saved.trained_on);

    let other_kind = if data.kind == DatasetKind::Mnist { DatasetKind::FashionMnist } else { DatasetKind::Mnist };
    let other_data = Arc::new(bntrain::data::Dataset { kind: other_kind, ..(*data).clone() });
    let mut more = resume(Precision::F32);
    more.steps = 200;
    let err = session::run(&more, other_data, None, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains(&format!("was trained on {}, the data loaded is {other_kind}", data.kind)), "{err}");

    let f64_run = request(Start::Fresh, "f64", Precision::F64);
    session::run(&f64_run, data.clone(), None, &mut |_| {}).unwrap();
    let on_gpu = TrainRequest { steps: 200, device: DeviceChoice::Cuda, ..request(Start::Resume(Resumed::load(dir.path().join("f64")).unwrap()), "f64", Precision::F32) };
    let err = session::run(&on_gpu, data.clone(), None, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("trained in f64, which only the CPU computes: resume it with --device cpu"), "{err}");

    // A checkpoint from before `trained_on` was recorded: an f64 file stays f64, whatever the
    // request's default; other data is not refused (nothing says it is other).
    let old = Checkpoint { trained_on: None, ..Checkpoint::load(&dir.path().join("f64")).unwrap() };
    old.save(&dir.path().join("old")).unwrap();
    let resumed = TrainRequest { steps: 200, ..request(Start::Resume(Resumed::load(dir.path().join("old")).unwrap()), "old", Precision::F32) };
    session::run(&resumed, data, None, &mut |_| {}).unwrap();
    let saved = Checkpoint::load(&dir.path().join("old")).unwrap();
    assert_eq!((saved.precision, saved.trained_on.map(|t| t.precision)), (bntrain::model::checkpoint::StoredPrecision::F64, Some(Precision::F64)));
}
