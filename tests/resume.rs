//! Interrupting a session between two evaluation points and resuming it gives bitwise the
//! same parameters, statistics, optimizer state and metric history as an unbroken run.

mod support;

use bntrain::device::{DeviceChoice, Precision};
use bntrain::model::checkpoint::Checkpoint;
use bntrain::model::{ModelConfig, TrainConfig};
use bntrain::session::{self, Start, TrainRequest};
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

    let resumed = session::run(&request(Start::Resume(dir.path().join("broken")), "broken"), data, None, &mut |_| {}).unwrap();
    assert_eq!(resumed.outcome, Outcome::Finished { step: 250 });
    let a = Checkpoint::load(&dir.path().join("full")).unwrap();
    let b = Checkpoint::load(&dir.path().join("broken")).unwrap();
    assert_eq!(a.params, b.params);
    assert_eq!(a.velocity, b.velocity);
    assert_eq!(a.progress, b.progress);
    assert_eq!(full.history, resumed.history);
}
