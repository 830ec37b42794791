//! Where the data lives, how it gets there, and how we know it is the real thing.
//!
//! Search order of [`locate`]: `--data DIR`, then `$BNTRAIN_DATA`, then (Fashion-MNIST only)
//! the Debian package's directory, then the cache, then (MNIST only, if allowed) a download
//! into the cache. Downloads are verified against the SHA-256 of the *decompressed* files,
//! since mirrors compress differently, and land atomically so an interrupted download never
//! leaves a half file that looks complete.

use std::fs;
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::idx::{open_decoded, read_error, GzMembers};
use crate::atomic_file::write_atomically;
use super::{find_idx_file, require_idx_file, DataError, DatasetKind, IDX_FILES};

/// Mirrors of the MNIST `.gz` files, tried in order: torchvision's first choice, TensorFlow's,
/// then the original site (torchvision's fallback, which often refuses scripted downloads).
pub const MNIST_MIRRORS: &[&str] = &[
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
];

/// Where Debian's `dataset-fashion-mnist` package installs the four `.gz` files.
pub const FASHION_MNIST_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// An original MNIST file: its name, decompressed length and SHA-256 (from DATA.md).
struct KnownFile {
    name: &'static str,
    len: u64,
    sha256: &'static str,
}

const MNIST_FILES: [KnownFile; 4] = [
    KnownFile {
        name: "train-images-idx3-ubyte",
        len: 16 + 60_000 * 784,
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    KnownFile {
        name: "train-labels-idx1-ubyte",
        len: 8 + 60_000,
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    KnownFile {
        name: "t10k-images-idx3-ubyte",
        len: 16 + 10_000 * 784,
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    KnownFile {
        name: "t10k-labels-idx1-ubyte",
        len: 8 + 10_000,
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

/// What [`fetch`] did, file by file (raw IDX names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchReport {
    pub dir: PathBuf,
    pub downloaded: Vec<String>,
    pub already_present: Vec<String>,
}

/// The cache directory of `kind`: `$BNTRAIN_CACHE/<name>` if set, else
/// `$XDG_CACHE_HOME/bntrain/<name>`, else `$HOME/.cache/bntrain/<name>` (name: `mnist`,
/// `fashion-mnist`). The dataset name is always appended so the two datasets never mix.
pub fn cache_dir(kind: DatasetKind) -> PathBuf {
    let env_dir = |var: &str| {
        std::env::var_os(var)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    };
    let root = env_dir("BNTRAIN_CACHE")
        .or_else(|| {
            env_dir("XDG_CACHE_HOME")
                .filter(|dir| dir.is_absolute())
                .map(|dir| dir.join("bntrain"))
        })
        .or_else(|| env_dir("HOME").map(|home| home.join(".cache").join("bntrain")))
        .unwrap_or_else(|| PathBuf::from(".bntrain-cache"));
    root.join(kind.name())
}

/// Finds the directory holding `kind`'s four IDX files (see the module docs for the order).
/// A directory named explicitly (`explicit`, then `$BNTRAIN_DATA`) must be complete: an
/// incomplete one is an error rather than a silent fall-back to another copy.
pub fn locate(
    explicit: Option<&Path>,
    kind: DatasetKind,
    allow_fetch: bool,
) -> Result<PathBuf, DataError> {
    let from_env = std::env::var_os("BNTRAIN_DATA")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from);
    let named = match (explicit, from_env) {
        (Some(dir), _) => Some((dir.to_path_buf(), "")),
        (None, Some(dir)) => Some((dir, " (the directory BNTRAIN_DATA names)")),
        (None, None) => None,
    };
    if let Some((dir, whence)) = named {
        if dir.exists() && !dir.is_dir() {
            let why = io::Error::new(io::ErrorKind::NotADirectory, format!("it is not a directory{whence}"));
            return Err(DataError::io("cannot read the data in", &dir, why));
        }
        for name in IDX_FILES {
            require_idx_file(&dir, name).map_err(|e| match e {
                DataError::MissingFile { path, hint } => DataError::MissingFile { path, hint: format!("{hint}{whence}") },
                DataError::NotAFile { path, hint } => DataError::NotAFile { path, hint: format!("{hint}{whence}") },
                other => other,
            })?;
        }
        return Ok(dir);
    }
    let is_complete = |dir: &Path| {
        IDX_FILES
            .iter()
            .all(|name| find_idx_file(dir, name).is_some())
    };
    let cache = cache_dir(kind);
    let mut searched = vec!["--data", "BNTRAIN_DATA"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    if kind == DatasetKind::FashionMnist {
        let system_dir = Path::new(FASHION_MNIST_SYSTEM_DIR);
        if is_complete(system_dir) {
            return Ok(system_dir.to_path_buf());
        }
        searched.push(FASHION_MNIST_SYSTEM_DIR.to_string());
    }
    if is_complete(&cache) {
        return Ok(cache);
    }
    searched.push(cache.display().to_string());
    match kind {
        DatasetKind::Mnist if allow_fetch => {
            fetch(kind, &cache, io::stderr().is_terminal())?;
            Ok(cache)
        }
        DatasetKind::Mnist => {
            // A cache that holds some of the files: which it lacks.
            let lacking: Vec<&str> = IDX_FILES.iter().copied().filter(|name| find_idx_file(&cache, name).is_none()).collect();
            // Or a file where the cache's directory would be (BNTRAIN_CACHE naming a file).
            let blocked = cache.ancestors().find(|dir| dir.exists()).filter(|dir| !dir.is_dir());
            let missing = match blocked {
                Some(file) => format!("; {} is a file, where the cache's directory would be", file.display()),
                None if lacking.len() < IDX_FILES.len() => format!("; the cache lacks {}", lacking.join(", ")),
                None => String::new(),
            };
            Err(DataError::NotFound { kind, searched: searched.join(", "), cache, missing })
        }
        DatasetKind::FashionMnist => Err(DataError::FashionNotFound { searched: searched.join(", ") }),
    }
}

/// Downloads `kind` into `dest` as raw IDX files (MNIST only: Fashion-MNIST comes from the
/// Debian package), skipping files already there with the right checksum.
pub fn fetch(kind: DatasetKind, dest: &Path, progress: bool) -> Result<FetchReport, DataError> {
    match kind {
        DatasetKind::Mnist => fetch_from(MNIST_MIRRORS, dest, progress),
        DatasetKind::FashionMnist => Err(DataError::NoFashionFetch),
    }
}

/// [`fetch`] of MNIST from the given mirrors (URL prefixes of the `.gz` files), for private
/// mirrors and tests. A mirror that fails once is not tried again for the other files, so a
/// dead mirror costs one timeout, not four.
pub fn fetch_from(mirrors: &[&str], dest: &Path, progress: bool) -> Result<FetchReport, DataError> {
    if dest.exists() && !dest.is_dir() {
        return Err(DataError::io("cannot download into", dest, io::Error::new(io::ErrorKind::NotADirectory, "it is not a directory")));
    }
    // The directories this fetch makes, deepest first: a failed fetch leaves none behind
    // (those still empty; a file written meanwhile keeps its directory).
    let made: Vec<PathBuf> = dest.ancestors().take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists()).map(Path::to_path_buf).collect();
    fs::create_dir_all(dest).map_err(|e| DataError::io("cannot create", dest, e))?;
    let fetched = fetch_into(mirrors, dest, progress);
    if fetched.is_err() {
        made.iter().for_each(|dir| drop(fs::remove_dir(dir)));
    }
    fetched
}

/// [`fetch_from`] into the existing directory `dest`.
fn fetch_into(mirrors: &[&str], dest: &Path, progress: bool) -> Result<FetchReport, DataError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(Duration::from_secs(15)))
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_recv_response(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(30)))
        .timeout_global(Some(Duration::from_secs(600)))
        .user_agent(concat!("bntrain/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut report = FetchReport {
        dir: dest.to_path_buf(),
        downloaded: vec![],
        already_present: vec![],
    };
    let mut mirror_failures: Vec<Option<String>> = vec![None; mirrors.len()];
    for file in &MNIST_FILES {
        let target = dest.join(file.name);
        // The file as the data directory may hold it, raw or compressed; a download is
        // written raw (and read before a .gz of the same name).
        if let Some(present) = find_idx_file(dest, file.name) {
            // A file that is not the original (or cannot be read) is downloaded again, and
            // replaced only once the download is verified.
            match sha256_of_decoded(&present, file.len) {
                Ok(sum) if sum == file.sha256 => {
                    report.already_present.push(file.name.to_string());
                    continue;
                }
                // Not eprintln!: a closed stderr must not panic the download.
                Ok(_) => {
                    let _ = writeln!(io::stderr(), "notice: {} is not the original (SHA-256 differs): downloading it again", present.display());
                }
                Err(e) => {
                    let _ = writeln!(io::stderr(), "notice: {e}: downloading it again");
                }
            }
        }
        let mut contents = None;
        for (mirror, failure) in mirrors
            .iter()
            .zip(mirror_failures.iter_mut())
            .filter(|(_, f)| f.is_none())
        {
            let url = format!("{}/{}.gz", mirror.trim_end_matches('/'), file.name);
            match download_verified(&agent, &url, file, progress) {
                Ok(bytes) => {
                    contents = Some(bytes);
                    break;
                }
                Err(reason) => {
                    *failure = Some(format!("{url}: {}", reason.replace(['\n', '\r'], " ")))
                }
            }
        }
        let Some(contents) = contents else {
            let tried = mirror_failures
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; ");
            let tried = if tried.is_empty() {
                "no mirror given".to_string()
            } else {
                tried
            };
            return Err(DataError::Offline {
                file: file.name,
                tried,
            });
        };
        write_atomically(&target, &contents).map_err(|e| DataError::io("cannot write", &target, e))?;
        report.downloaded.push(file.name.to_string());
    }
    Ok(report)
}

/// Downloads one `.gz`, decompresses it (bounded by the known length) and checks its
/// SHA-256. The error is a reason to record before trying the next mirror.
fn download_verified(
    agent: &ureq::Agent,
    url: &str,
    file: &KnownFile,
    progress: bool,
) -> Result<Vec<u8>, String> {
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let bar = match (progress, response.body().content_length()) {
        (false, _) => indicatif::ProgressBar::hidden(),
        (true, Some(total)) => indicatif::ProgressBar::new(total),
        (true, None) => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template(
        "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(file.name);
    // The compressed file is smaller than the raw one; a server that decompressed it for us
    // (Content-Encoding) sends exactly the raw length. Anything beyond that is not MNIST.
    let body = response.body_mut().with_config().limit(file.len).reader();
    let mut downloaded = Vec::new();
    let read = bar.wrap_read(body).read_to_end(&mut downloaded);
    bar.finish_and_clear();
    read.map_err(|e| e.to_string())?;
    let contents = if downloaded.starts_with(&[0x1f, 0x8b]) {
        let mut contents = Vec::with_capacity(file.len as usize);
        let decoder = GzMembers::new(downloaded.as_slice());
        decoder
            .take(file.len + 1)
            .read_to_end(&mut contents)
            .map_err(|e| format!("corrupt gzip: {e}"))?;
        contents
    } else {
        downloaded
    };
    if contents.len() as u64 != file.len {
        return Err(format!(
            "got {} bytes once decompressed, expected {}",
            contents.len(),
            file.len
        ));
    }
    let actual = hex(&Sha256::digest(&contents));
    if actual != file.sha256 {
        return Err(format!("SHA-256 {actual}, expected {}", file.sha256));
    }
    Ok(contents)
}

/// Checks that `dir` holds the original MNIST files (raw or `.gz`), by the SHA-256 of
/// their decompressed contents.
pub fn verify_checksums(dir: &Path) -> Result<(), DataError> {
    for file in &MNIST_FILES {
        let path = require_idx_file(dir, file.name)?;
        let actual = sha256_of_decoded(&path, file.len)?;
        if actual != file.sha256 {
            return Err(DataError::Checksum {
                path,
                expected: file.sha256,
                actual,
            });
        }
    }
    Ok(())
}

/// SHA-256 of a file's decompressed contents, reading at most one byte more than
/// `expected_len` (enough to change the hash) so a gzip bomb cannot keep us busy.
fn sha256_of_decoded(path: &Path, expected_len: u64) -> Result<String, DataError> {
    let (reader, compressed, _) = open_decoded(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut reader.take(expected_len + 1), &mut hasher)
        .map_err(|e| read_error(path, compressed, e))?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
