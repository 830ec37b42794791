//! Checkpoints: exact round trips, PyTorch-compatible names, atomic writes, and one clear
//! error for every kind of bad file.

use bntrain::data::DatasetKind;
use bntrain::device::Precision;
use bntrain::model::checkpoint::{Checkpoint, StoredPrecision, TrainProgress, TrainedOn};
use bntrain::model::{Averaging, CheckpointError, ModelConfig, ModelParams, StatsEstimator, TrainConfig, VarianceKind};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;

fn sample(precision: StoredPrecision, momentum: f64) -> Checkpoint {
    let model = ModelConfig::seed(true);
    let mut train = TrainConfig::seed();
    train.momentum = momentum;
    train.extra_estimators = vec![StatsEstimator { averaging: Averaging::Cumulative, variance: VarianceKind::Unbiased }];
    let mut params = ModelParams::init(&model, 7, 2);
    // Make every value f32-representable so the f32 round trip is exact.
    let round = |v: &mut Vec<f64>| v.iter_mut().for_each(|x| *x = *x as f32 as f64);
    for layer in &mut params.layers {
        round(&mut layer.weight);
        if let Some(bn) = &mut layer.batch_norm {
            bn.running[1].mean.iter_mut().enumerate().for_each(|(i, m)| *m = i as f64 * 0.25);
            bn.running[1].batches = 17;
        }
    }
    let velocity = if momentum > 0.0 { params.trainable_tensors().iter().map(|(_, t)| vec![0.5; t.len()]).collect() } else { vec![] };
    let mut progress = TrainProgress { step: 1234, ..Default::default() };
    progress.pending.steps = 34;
    progress.pending.loss_sum = 12.5;
    Checkpoint { model, train, params, velocity, progress, precision, trained_on: None }
}

#[test]
fn round_trips_exactly_in_f32_and_f64() {
    let dir = tempfile::tempdir().unwrap();
    // With what it trained on recorded, and without (as files written before it was).
    let recorded = [None, Some(TrainedOn { precision: Precision::Bf16, dataset: DatasetKind::FashionMnist })];
    for ((precision, momentum), trained_on) in [(StoredPrecision::F32, 0.0), (StoredPrecision::F64, 0.9)].into_iter().zip(recorded) {
        let ckpt = Checkpoint { trained_on, ..sample(precision, momentum) };
        let path = dir.path().join("c.safetensors");
        ckpt.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back, ckpt);
        // Nothing but the checkpoint is left in the directory (the temporary file was renamed).
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.safetensors")]);
    }
}

#[test]
fn uses_pytorch_sequential_names_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    sample(StoredPrecision::F32, 0.0).save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let shape = |n: &str| file.tensor(n).unwrap().shape().to_vec();
    // nn.Sequential(Linear(784,100,bias=False), BatchNorm1d(100), Sigmoid(), Linear(100,100,bias=False),
    //               BatchNorm1d(100), Sigmoid(), Linear(100,10))
    assert_eq!(shape("0.weight"), vec![100, 784]);
    assert_eq!(shape("1.weight"), vec![100]);
    assert_eq!(shape("1.bias"), vec![100]);
    assert_eq!(shape("1.running_mean"), vec![100]);
    assert_eq!(shape("1.running_var"), vec![100]);
    assert_eq!(file.tensor("1.num_batches_tracked").unwrap().dtype(), Dtype::I64);
    assert_eq!(shape("3.weight"), vec![100, 100]);
    assert_eq!(shape("4.running_var"), vec![100]);
    assert_eq!(shape("6.weight"), vec![10, 100]);
    assert_eq!(shape("6.bias"), vec![10]);
    assert!(file.tensor("0.bias").is_err(), "no bias before BN");
    let extra: Vec<_> = file.names().into_iter().filter(|n| !n.chars().next().unwrap().is_ascii_digit()).collect();
    assert!(extra.iter().all(|n| n.starts_with("bntrain.")), "{extra:?}");
}

fn expect_err(path: &std::path::Path) -> CheckpointError {
    let err = Checkpoint::load(path).expect_err("loading should fail");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(msg.contains(&path.display().to_string()), "names the file: {msg}");
    err
}

/// A file of format version 1 (checksum over the tensors alone), written by bntrain at
/// 7981a29 (`train --hidden 4,3 --steps 5` on MNIST), still loads.
#[test]
fn reads_format_version_1() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint-v1.safetensors");
    let ckpt = Checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.model.hidden, vec![4, 3]);
    assert_eq!(ckpt.progress.step, 5);
    // Its checksum covers every tensor: a flipped weight is refused as in version 2.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    assert!(matches!(Checkpoint::from_bytes(&bytes, &path), Err(CheckpointError::Corrupted { .. })));
    // So is a flipped version entry: the tensors still check out, so the file is version 1's.
    let mut bytes = std::fs::read(&path).unwrap();
    let entry = br#""format_version":"1""#;
    let at = bytes.windows(entry.len()).position(|w| w == entry).expect("the version entry");
    bytes[at + entry.len() - 2] = b'7';
    assert!(matches!(Checkpoint::from_bytes(&bytes, &path), Err(CheckpointError::Corrupted { .. })));
}

/// A step count no run could reach (a forged or damaged file) is refused on loading: resumed,
/// it would wrap the step arithmetic.
#[test]
fn a_step_beyond_any_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("far.safetensors");
    let mut far = sample(StoredPrecision::F32, 0.0);
    far.progress.step = bntrain::model::config::MAX_STEPS + 1;
    far.save(&path).unwrap();
    let refused = Checkpoint::load(&path).unwrap_err().to_string();
    assert!(refused.contains("is beyond the 281474976710656 a run may reach"), "{refused}");
    far.progress.step = bntrain::model::config::MAX_STEPS;
    far.save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path).unwrap().progress.step, bntrain::model::config::MAX_STEPS);
}

/// Training settings no run could have (a forged file) are refused on loading, naming the
/// file: eval and predict would otherwise fail opening a backend with a message about a
/// setting their command line does not have.
#[test]
fn training_settings_no_run_could_have_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("forged.safetensors");
    for (forge, needle) in [
        (Box::new(|c: &mut Checkpoint| c.train.learning_rate = 0.0) as Box<dyn Fn(&mut Checkpoint)>, "learning rate must be positive"),
        (Box::new(|c: &mut Checkpoint| c.train.momentum = 1.5), "momentum must be in [0, 1)"),
        (Box::new(|c: &mut Checkpoint| c.train.batch_size = 0), "batch size must be at least 1"),
        (Box::new(|c: &mut Checkpoint| c.train.learning_rate = 1e-300), "learning rate 1e-300 is 0 in f32"),
    ] {
        let mut forged = sample(StoredPrecision::F32, 0.0);
        forge(&mut forged);
        forged.save(&path).unwrap();
        let refused = Checkpoint::load(&path).unwrap_err();
        assert!(matches!(refused, CheckpointError::Malformed { .. }), "{refused}");
        let message = refused.to_string();
        assert!(message.contains("forged.safetensors") && message.contains(needle), "{message}");
    }
    // An f64 file keeps what only f32 cannot hold: it is evaluated in f64 on the CPU.
    let mut wide_range = sample(StoredPrecision::F64, 0.0);
    wide_range.train.learning_rate = 1e-300;
    wide_range.save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path).unwrap().train.learning_rate, 1e-300);
}

#[test]
fn bad_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    sample(StoredPrecision::F32, 0.0).save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let missing = dir.path().join("missing.safetensors");
    assert!(matches!(expect_err(&missing), CheckpointError::Read { .. }));

    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(expect_err(&truncated), CheckpointError::NotSafetensors { .. }));

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(expect_err(&empty), CheckpointError::NotSafetensors { .. }));

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, vec![0xffu8; 4096]).unwrap();
    assert!(matches!(expect_err(&garbage), CheckpointError::NotSafetensors { .. }));

    let corrupted = dir.path().join("corrupted.safetensors");
    let mut flipped = bytes.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    std::fs::write(&corrupted, &flipped).unwrap();
    assert!(matches!(expect_err(&corrupted), CheckpointError::Corrupted { .. }));

    let data = vec![0u8; 16];
    let view = TensorView::new(Dtype::F32, vec![4], &data).unwrap();
    let foreign = dir.path().join("foreign.safetensors");
    std::fs::write(&foreign, safetensors::serialize([("weight", view.clone())], None).unwrap()).unwrap();
    assert!(matches!(expect_err(&foreign), CheckpointError::Foreign { .. }));

    // One byte of the header changed: where `pattern` starts, plus `at`, becomes `to`.
    let edited = |name: &str, pattern: &[u8], at: usize, to: u8| {
        let start = bytes.windows(pattern.len()).position(|w| w == pattern).expect("the pattern in the metadata");
        let mut changed = bytes.clone();
        changed[start + at] = to;
        let path = dir.path().join(name);
        std::fs::write(&path, &changed).unwrap();
        path
    };
    // A flipped byte in the metadata, not in a tensor: ε from 0.001 to 0.901 still parses,
    // and would evaluate another network, so the checksum covers the metadata too.
    // (The model's JSON is a string inside the header's JSON: its quotes are escaped.)
    let metadata_flip = edited("metadata-flip.safetensors", br#"\"epsilon\":0.001"#, 14, b'9');
    assert!(matches!(expect_err(&metadata_flip), CheckpointError::Corrupted { .. }));
    // Nor does calling the file version 1 (whose checksum covers the tensors alone) pass.
    let relabelled = edited("relabelled.safetensors", br#""format_version":"2""#, 18, b'1');
    assert!(matches!(expect_err(&relabelled), CheckpointError::Corrupted { .. }));
    // A flip that makes the version one this bntrain does not know is corruption too: the
    // file checks out as version 2 but for that entry. (A real future file, below, does not.)
    let version_flip = edited("version-flip.safetensors", br#""format_version":"2""#, 18, b'6');
    assert!(matches!(expect_err(&version_flip), CheckpointError::Corrupted { .. }));
    let no_version = edited("no-version.safetensors", br#""format_version":"2""#, 7, b'X');
    assert!(expect_err(&no_version).to_string().contains("metadata has no `format_version`"));

    let future = dir.path().join("future.safetensors");
    let meta = HashMap::from([("format".to_string(), "bntrain-checkpoint".to_string()), ("format_version".to_string(), "99".to_string())]);
    std::fs::write(&future, safetensors::serialize([("weight", view)], Some(meta)).unwrap()).unwrap();
    assert!(matches!(expect_err(&future), CheckpointError::Version { .. }));
}

#[test]
fn refuses_to_write_non_finite_values_and_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let good = sample(StoredPrecision::F32, 0.0);
    good.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad.params.layers[1].weight[5] = f64::NAN;
    let err = bad.save(&path).unwrap_err().to_string();
    assert!(err.contains("layer2.weight"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// A negative running variance (only a hand-edited file holds one) would make every
/// normalization NaN: it is refused on loading, naming the tensor.
#[test]
fn a_negative_running_variance_is_refused_on_loading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    let mut ckpt = sample(StoredPrecision::F32, 0.0);
    ckpt.params.layers[0].batch_norm.as_mut().unwrap().running[0].var[3] = -5.0;
    ckpt.save(&path).unwrap();
    let err = expect_err(&path).to_string();
    assert!(err.contains("`1.running_var` holds the variance -5, below 0"), "{err}");
}

#[test]
fn a_checkpoint_for_another_network_is_refused() {
    let ckpt = sample(StoredPrecision::F32, 0.0);
    let mut other = ckpt.model.clone();
    other.hidden = vec![100, 100, 100];
    let err = ckpt.check_model(&other).unwrap_err().to_string();
    assert!(err.contains("784-100-100-10") && err.contains("784-100-100-100-10"), "{err}");
}
