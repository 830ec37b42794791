//! Files that are never seen half-written: every file bntrain writes (checkpoints, the
//! downloaded dataset, reports) goes through a temporary sibling, flushed, then renamed,
//! and a prompt exit on a second Ctrl-C waits for the write to end ([`crate::interrupt`]).

use std::io::Write;
use std::path::{Path, PathBuf};

/// [`write_atomically`] into the file `path` leads to where it is a symbolic link (the
/// temporary file goes beside that file), so that the link stays. For paths the user names
/// (`--resume link`); not for names bntrain picks in a shared directory, where a link
/// another user planted would steer the write.
pub fn write_through_links(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    refuse_non_regular(path)?;
    let target = link_target(path)?;
    write_atomically(target.as_deref().unwrap_or(path), bytes)
}

/// Writes `bytes` to `path` through a temporary sibling and a rename. Where `path` is a
/// directory, a device or a pipe, it is refused: a rename would put a file in its place
/// (`--checkpoint /dev/null`, run as root, would replace the device). A symbolic link at
/// `path` is replaced, not followed ([`write_through_links`] follows it).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    refuse_non_regular(path)?;
    // A second Ctrl-C waits for the write (a checkpoint saved on the first one) to end.
    let _whole = crate::interrupt::Critical::enter();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    // A fresh name, made exclusively: containers sharing a volume all run as PID 1, and a
    // writer that truncated another's temporary file would leave zeros in its content.
    let (tmp, mut f) = loop {
        let tmp = dir.join(format!(".{name}.tmp-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            opened => break (tmp, opened?),
        }
    };
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where `path` is a symbolic link, the path it leads to, through every link on the way (a
/// link to a file not there yet leads to where it would be); `None` where it is no link.
pub fn link_target(path: &Path) -> std::io::Result<Option<PathBuf>> {
    let mut at = path.to_path_buf();
    // Linux gives up after 40 links: a loop is an error, not a hang.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let next = std::fs::read_link(&at)?;
                // A relative link is relative to the directory that holds it.
                at = at.parent().map_or(next.clone(), |dir| dir.join(&next));
            }
            _ => return Ok((at != path).then_some(at)),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A write holds one section a second Ctrl-C waits for ([`crate::interrupt`]).
    #[test]
    fn a_write_holds_a_critical_section() {
        let dir = tempfile::tempdir().unwrap();
        let before = crate::interrupt::sections_entered_on_this_thread();
        write_atomically(&dir.path().join("data.bin"), b"bytes").unwrap();
        assert_eq!(crate::interrupt::sections_entered_on_this_thread(), before + 1);
    }

    /// A link is written through, and stays a link: `--resume link` saves back into the file
    /// the link leads to (relative or absolute, through a chain, or to a file not there yet).
    /// A plain atomic write replaces a link instead.
    #[cfg(unix)]
    #[test]
    fn a_link_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        std::fs::write(store.join("real.bin"), b"old").unwrap();
        let link = dir.path().join("link.bin");
        std::os::unix::fs::symlink("store/real.bin", &link).unwrap();
        let chain = dir.path().join("chain.bin");
        std::os::unix::fs::symlink(&link, &chain).unwrap();
        write_through_links(&chain, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(std::fs::symlink_metadata(&chain).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(store.join("real.bin")).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["real.bin"], "no temporary file left");
        let dangling = dir.path().join("dangling.bin");
        std::os::unix::fs::symlink("store/later.bin", &dangling).unwrap();
        write_through_links(&dangling, b"first").unwrap();
        assert_eq!(std::fs::read(store.join("later.bin")).unwrap(), b"first");
        let looped = dir.path().join("loop.bin");
        std::os::unix::fs::symlink("loop.bin", &looped).unwrap();
        assert!(write_through_links(&looped, b"x").is_err());
        let planted = dir.path().join("planted.bin");
        std::os::unix::fs::symlink("store/real.bin", &planted).unwrap();
        write_atomically(&planted, b"plain").unwrap();
        assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_file(), "the link is replaced");
        assert_eq!(std::fs::read(store.join("real.bin")).unwrap(), b"new", "not written through");
    }

    /// Writers of one path that share a process id (threads here; containers sharing a
    /// volume, where each is PID 1) each succeed, and the file ends whole: exactly one
    /// writer's bytes, no temporary file left.
    #[test]
    fn concurrent_writers_of_one_path_never_mix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        for round in 0..10u8 {
            let contents: Vec<Vec<u8>> = (0..6u8).map(|w| vec![round.wrapping_mul(31) ^ (w + 1); 1 << 18]).collect();
            std::thread::scope(|s| {
                for bytes in &contents {
                    let path = &path;
                    s.spawn(move || write_atomically(path, bytes).expect("every writer succeeds"));
                }
            });
            let written = std::fs::read(&path).unwrap();
            assert!(contents.contains(&written), "round {round}: the file is no writer's whole content");
            let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(names, ["data.bin"], "round {round}: temporary files left");
        }
    }
}
