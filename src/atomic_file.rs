//! Files that are never seen half-written: every file bntrain writes (checkpoints, the
//! downloaded dataset, reports) goes through a temporary sibling, flushed, then renamed.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary sibling and a rename. Where `path` is a
/// directory, a device or a pipe, it is refused: a rename would put a file in its place
/// (`--checkpoint /dev/null`, run as root, would replace the device).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    refuse_non_regular(path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An error where `path` exists and is not a regular file (or a link to one).
pub fn refuse_non_regular(path: &Path) -> std::io::Result<()> {
    // `dir/` names a directory even where none exists yet.
    if path.as_os_str().to_string_lossy().ends_with(['/', std::path::MAIN_SEPARATOR]) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "it names a directory (a trailing /)"));
    }
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "it is a directory")),
        Ok(meta) if !meta.is_file() => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")),
        _ => Ok(()),
    }
}
