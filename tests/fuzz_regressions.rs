//! Replays the fuzz corpus and every crash case found by fuzzing through the public parsers:
//! each file of `fuzz/seeds/*/`, `fuzz/corpus/*/` and `fuzz/artifacts/*/` goes through the
//! IDX reader (images and labels, raw and gzip) and the checkpoint loader (as is, and with its
//! header length repaired as the checkpoint fuzz target does). Errors are expected; a panic
//! fails the test.
//!
//! The fuzz targets themselves live in `fuzz/` (a separate cargo-fuzz crate); run them with
//! `scripts/fuzz.sh`. The hand-made seeds are written by the ignored test below:
//! `cargo test --test fuzz_regressions -- --ignored write_seed_corpus`.

use bntrain::data::{parse_idx_images, parse_idx_labels, IMAGES_MAGIC, LABELS_MAGIC};
use bntrain::model::checkpoint::{Checkpoint, StoredPrecision, TrainProgress};
use bntrain::model::{
    Activation, Averaging, ModelConfig, ModelParams, StatsEstimator, TrainConfig, VarianceKind,
};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The fuzz crate's input shaping, shared so that corpus files replay as they were fuzzed.
#[path = "../fuzz/src/lib.rs"]
mod fuzz_input;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every regular file under `dir`, recursively, in a stable order (none if it is absent).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // libFuzzer's temporary files, editor litter
        }
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Runs one input through every parser; returns a description of each panic.
fn replay(bytes: &[u8], origin: &Path) -> Vec<String> {
    let mut panics = Vec::new();
    let mut guard = |what: &str, f: &mut dyn FnMut()| {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            panics.push(format!("{}: {what} panicked: {message}", origin.display()));
        }
    };
    for compressed in [false, true] {
        let name = Path::new(if compressed { "replay.gz" } else { "replay" });
        guard(&format!("parse_idx_images(gz={compressed})"), &mut || {
            if let Ok(images) = parse_idx_images(bytes, name, compressed) {
                assert_eq!(
                    images.pixels.len(),
                    images.count * images.rows * images.cols
                );
            }
        });
        guard(&format!("parse_idx_labels(gz={compressed})"), &mut || {
            let _ = parse_idx_labels(bytes, name, compressed);
        });
    }
    guard("Checkpoint::from_bytes", &mut || {
        let _ = Checkpoint::from_bytes(bytes, Path::new("replay.safetensors"));
    });
    if let Some(repaired) = fuzz_input::with_repaired_header_length(bytes) {
        guard(
            "Checkpoint::from_bytes (header length repaired)",
            &mut || {
                let _ = Checkpoint::from_bytes(&repaired, Path::new("replay.safetensors"));
            },
        );
    }
    guard(
        "Checkpoint::from_bytes (as the configuration of the template)",
        &mut || {
            let _ = Checkpoint::from_bytes(
                &fuzz_input::template_with_config(bytes),
                Path::new("replay.safetensors"),
            );
        },
    );
    panics
}

/// The `checkpoint_config` target gets past the checksum: the template with its own
/// configuration loads, and one with a changed configuration fails later, in its checks,
/// not as corrupted (else the target would fuzz nothing beyond the checksum).
#[test]
fn the_config_target_reaches_past_the_checksum() {
    let path = Path::new("template.safetensors");
    let (_, header) = safetensors::SafeTensors::read_metadata(fuzz_input::TEMPLATE).unwrap();
    let own = header.metadata().clone().unwrap();
    let input = fuzz_input::CONFIG_KEYS.map(|key| own[key].as_str()).join("\0");
    let sealed = fuzz_input::template_with_config(input.as_bytes());
    Checkpoint::from_bytes(&sealed, path).expect("the template loads");
    // Sealed in the current format, whatever the template's (a template written anew by
    // write_seed_corpus would otherwise stop every input at the checksum).
    let (_, header) = safetensors::SafeTensors::read_metadata(&sealed).unwrap();
    let version = header.metadata().as_ref().unwrap()["format_version"].clone();
    assert_eq!(version, bntrain::model::checkpoint::FORMAT_VERSION.to_string());
    let err = Checkpoint::from_bytes(&fuzz_input::template_with_config(b"{\"inputs\":0}"), path).unwrap_err();
    assert!(!matches!(err, bntrain::model::CheckpointError::Corrupted { .. }), "{err}");
}

#[test]
fn corpus_and_crash_cases_never_panic() {
    let root = fuzz_dir();
    let mut panics = Vec::new();
    let mut replayed = 0;
    for sub in [
        "seeds/idx",
        "seeds/checkpoint",
        "seeds/checkpoint_config",
        "corpus/idx",
        "corpus/checkpoint",
        "corpus/checkpoint_config",
        "artifacts",
    ] {
        let files = files_under(&root.join(sub));
        if !sub.starts_with("artifacts") {
            assert!(
                !files.is_empty(),
                "{} is empty: the seed corpus is missing",
                root.join(sub).display()
            );
        }
        for path in files {
            let bytes = std::fs::read(&path).unwrap();
            panics.extend(replay(&bytes, &path));
            replayed += 1;
        }
    }
    assert!(
        panics.is_empty(),
        "{} of {replayed} inputs panicked:\n{}",
        panics.len(),
        panics.join("\n")
    );
}

/// The seeds parse: a sanity check that the corpus starts from valid files, so the fuzzer
/// mutates its way from the accepting paths outwards.
#[test]
fn valid_seeds_are_accepted() {
    let root = fuzz_dir();
    for (name, compressed) in [("valid-images", false), ("valid-images.gz", true)] {
        let bytes = std::fs::read(root.join("seeds/idx").join(name)).unwrap();
        let images = parse_idx_images(&bytes, Path::new(name), compressed).unwrap();
        assert_eq!((images.count, images.rows, images.cols), (3, 4, 5));
    }
    for (name, compressed) in [("valid-labels", false), ("valid-labels.gz", true)] {
        let bytes = std::fs::read(root.join("seeds/idx").join(name)).unwrap();
        assert_eq!(
            parse_idx_labels(&bytes, Path::new(name), compressed).unwrap(),
            vec![0, 7, 9]
        );
    }
    for (name, _) in checkpoint_seeds() {
        let bytes = std::fs::read(root.join("seeds/checkpoint").join(&name)).unwrap();
        Checkpoint::from_bytes(&bytes, Path::new(&name)).unwrap();
    }
}

fn idx_bytes(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut out = magic.to_be_bytes().to_vec();
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(body);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Small checkpoints covering each branch of the loader: BN or not, f32 or f64, momentum
/// buffers, a second estimator.
fn checkpoint_seeds() -> Vec<(String, Checkpoint)> {
    let mut seeds = Vec::new();
    for (batch_norm, precision, momentum, extra) in [
        (true, StoredPrecision::F32, 0.0, false),
        (true, StoredPrecision::F64, 0.9, true),
        (false, StoredPrecision::F32, 0.5, false),
    ] {
        let model = ModelConfig {
            inputs: 4,
            hidden: vec![3, 2],
            classes: 2,
            activation: if batch_norm {
                Activation::Sigmoid
            } else {
                Activation::Relu
            },
            batch_norm,
            epsilon: 1e-3,
        };
        let mut train = TrainConfig::seed();
        train.momentum = momentum;
        if extra {
            train.extra_estimators = vec![StatsEstimator {
                averaging: Averaging::Cumulative,
                variance: VarianceKind::Unbiased,
            }];
        }
        let mut params = ModelParams::init(&model, 3, train.estimators().len());
        for layer in &mut params.layers {
            layer
                .weight
                .iter_mut()
                .for_each(|w| *w = (*w * 8.0).round() / 8.0);
        }
        let velocity = if momentum > 0.0 {
            params
                .trainable_tensors()
                .iter()
                .map(|(_, t)| vec![0.25; t.len()])
                .collect()
        } else {
            Vec::new()
        };
        let progress = TrainProgress {
            step: 42,
            ..Default::default()
        };
        let name = format!(
            "valid-{}-{:?}{}{}.safetensors",
            if batch_norm { "bn" } else { "plain" },
            precision,
            if momentum > 0.0 { "-momentum" } else { "" },
            if extra { "-two-estimators" } else { "" },
        )
        .to_lowercase();
        seeds.push((
            name,
            Checkpoint {
                model,
                train,
                params,
                velocity,
                progress,
                precision,
                trained_on: None,
            },
        ));
    }
    seeds
}

/// Writes the hand-made seeds into `fuzz/seeds/{idx,checkpoint}/`. Run it when the formats
/// change; the files are committed.
#[test]
#[ignore = "writes the seed corpus into fuzz/seeds"]
fn write_seed_corpus() {
    let root = fuzz_dir();
    let idx_dir = root.join("seeds/idx");
    let ckpt_dir = root.join("seeds/checkpoint");
    std::fs::create_dir_all(&idx_dir).unwrap();
    std::fs::create_dir_all(&ckpt_dir).unwrap();

    let pixels: Vec<u8> = (0..60u8).map(|i| i.wrapping_mul(37)).collect();
    let images = idx_bytes(IMAGES_MAGIC, &[3, 4, 5], &pixels);
    let labels = idx_bytes(LABELS_MAGIC, &[3], &[0, 7, 9]);
    let idx_seeds: Vec<(&str, Vec<u8>)> = vec![
        ("valid-images", images.clone()),
        ("valid-labels", labels.clone()),
        ("valid-images.gz", gzip(&images)),
        ("valid-labels.gz", gzip(&labels)),
        ("empty-images", idx_bytes(IMAGES_MAGIC, &[0, 28, 28], &[])),
        ("truncated-images", images[..images.len() - 7].to_vec()),
        ("too-long-labels", idx_bytes(LABELS_MAGIC, &[2], &[1, 2, 3])),
        (
            "huge-count-images",
            idx_bytes(IMAGES_MAGIC, &[u32::MAX, 28, 28], &pixels),
        ),
        (
            "huge-count-labels.gz",
            gzip(&idx_bytes(LABELS_MAGIC, &[u32::MAX], &[1, 2, 3])),
        ),
        (
            "concatenated.gz",
            [gzip(&labels[..6]), gzip(&labels[6..])].concat(),
        ),
    ];
    for (name, bytes) in idx_seeds {
        std::fs::write(idx_dir.join(name), bytes).unwrap();
    }
    let config_dir = root.join("seeds/checkpoint_config");
    std::fs::create_dir_all(&config_dir).unwrap();
    for (name, checkpoint) in checkpoint_seeds() {
        checkpoint.save(&ckpt_dir.join(&name)).unwrap();
        // The same configuration as the checkpoint_config target reads it: the metadata
        // texts of fuzz_input::CONFIG_KEYS joined by NUL bytes.
        let bytes = std::fs::read(ckpt_dir.join(&name)).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().clone().unwrap();
        let texts: Vec<&[u8]> = fuzz_input::CONFIG_KEYS
            .iter()
            .map(|k| metadata[*k].as_bytes())
            .collect();
        std::fs::write(
            config_dir.join(name.replace(".safetensors", ".config")),
            texts.join(&0u8),
        )
        .unwrap();
    }
}
