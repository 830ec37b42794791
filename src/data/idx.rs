//! Reading IDX files (the format of MNIST and Fashion-MNIST), raw or gzip-compressed.
//!
//! An IDX file is a big-endian header (magic, then one u32 per dimension) followed by the
//! data. We trust nothing in the header: every size is checked against the file and against
//! the memory available before any buffer is sized from it, so a corrupt or hostile file
//! yields a [`DataError`] naming the file, never a panic or an allocation the host cannot
//! hold. (A `.gz` can honestly decompress to 1032 times its size — all zeros — and a body
//! that fits in memory is read as it arrives, never reserved from the header.)

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use flate2::bufread::GzDecoder;

use super::DataError;

/// Magic number of an IDX file of unsigned bytes with three dimensions (count, rows, cols).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with one dimension (count).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Far above any image a dense MLP could take (MNIST has 784); a larger header is corrupt.
const MAX_PIXELS_PER_IMAGE: u64 = 1 << 20;
/// DEFLATE cannot expand data more than about 1032:1, so a `.gz` announcing more
/// decompressed bytes than this allows is lying, and we can refuse before reading it.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Reading the body in chunks of at most this much keeps a lying gzip from making us
/// reserve the announced size up front; raw files are size-checked first and read at once.
const MAX_INITIAL_CAPACITY: u64 = 64 << 20;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The decompressed bytes of a gzip file's members, one after another (concatenated gzips,
/// as `gzip -d` reads them). What follows the last member and is not one is an error that
/// says so ([`TrailingBytes`]), and a later member that begins but breaks off is one that
/// says that ([`CutMember`]), not a bare "invalid gzip header", whichever byte the input's
/// buffer happens to end on.
pub(crate) struct GzMembers<R: BufRead> {
    member: Option<GzDecoder<MemberStart<R>>>,
    /// The current member follows another.
    follower: bool,
    /// Zero padding follows the last member: only zeros may come.
    padding: bool,
}

impl<R: BufRead> GzMembers<R> {
    pub(crate) fn new(compressed: R) -> Self {
        GzMembers { member: Some(GzDecoder::new(MemberStart { inner: compressed, head: [0; 2], seen: 0 })), follower: false, padding: false }
    }
}

/// The compressed input, keeping the first two bytes the current member consumed: whether a
/// member that failed began with gzip's magic, when the look ahead saw one byte only.
struct MemberStart<R> {
    inner: R,
    head: [u8; 2],
    seen: usize,
}

impl<R> MemberStart<R> {
    fn note(&mut self, consumed: &[u8]) {
        let take = (self.head.len() - self.seen).min(consumed.len());
        self.head[self.seen..self.seen + take].copy_from_slice(&consumed[..take]);
        self.seen += take;
    }

    fn began_like_a_member(&self) -> bool {
        self.seen == GZIP_MAGIC.len() && self.head == GZIP_MAGIC
    }
}

impl<R: BufRead> Read for MemberStart<R> {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(into)?;
        self.note(&into[..read]);
        Ok(read)
    }
}

impl<R: BufRead> BufRead for MemberStart<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        if self.seen < self.head.len() && amount > 0 {
            // The bytes being consumed are buffered already: this reads nothing.
            let mut head = [0; 2];
            let mut buffered = 0;
            if let Ok(buffer) = self.inner.fill_buf() {
                buffered = buffer.len().min(amount).min(head.len());
                head[..buffered].copy_from_slice(&buffer[..buffered]);
            }
            self.note(&head[..buffered]);
        }
        self.inner.consume(amount)
    }
}

impl<R: BufRead> Read for GzMembers<R> {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(member) = self.member.as_mut() else { return Ok(0) };
            let read = match member.read(into) {
                Ok(read) => read,
                // A failed member ends the stream: a read after the error is not allowed to go
                // on with the next member as if this one had ended well.
                Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                    let began_like_a_member = member.get_ref().began_like_a_member();
                    self.member = None;
                    let not_a_member = matches!(
                        e.kind(),
                        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::UnexpectedEof
                    );
                    if self.follower && not_a_member {
                        return Err(if began_like_a_member {
                            io::Error::new(io::ErrorKind::InvalidData, CutMember)
                        } else {
                            io::Error::new(io::ErrorKind::InvalidData, TrailingBytes)
                        });
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            if read > 0 || into.is_empty() {
                return Ok(read);
            }
            // The member ended (its CRC and length checked): another, the end, or junk. The
            // input is looked at in place, so that an interrupted look can be retried.
            let next = member.get_mut().fill_buf()?;
            if next.is_empty() {
                self.member = None;
                return Ok(0);
            }
            if next[0] == 0 || self.padding {
                // Zero padding (tape or `dd` blocks), which `gzip -d` passes over silently,
                // to the end; anything else after it is junk.
                let zeros = next.iter().take_while(|&&byte| byte == 0).count();
                if zeros < next.len() {
                    self.member = None;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, TrailingBytes));
                }
                member.get_mut().consume(zeros);
                self.padding = true;
                continue;
            }
            if !GZIP_MAGIC.starts_with(&next[..next.len().min(GZIP_MAGIC.len())]) {
                self.member = None;
                return Err(io::Error::new(io::ErrorKind::InvalidData, TrailingBytes));
            }
            let Some(ended) = self.member.take() else { return Ok(0) };
            let mut input = ended.into_inner();
            input.seen = 0;
            self.member = Some(GzDecoder::new(input));
            self.follower = true;
        }
    }
}

/// Bytes after a gzip file's last member that begin no other.
#[derive(Debug)]
struct TrailingBytes;

impl std::fmt::Display for TrailingBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes that begin no gzip member follow its compressed data; bntrain refuses such a file (`gzip -d` warns of trailing garbage, or fails on it)")
    }
}

impl std::error::Error for TrailingBytes {}

/// A member after the first that begins with gzip's magic and breaks off or is corrupt.
#[derive(Debug)]
struct CutMember;

impl std::fmt::Display for CutMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a gzip member after the first is cut short or corrupt (`gzip -d` fails on it too)")
    }
}

impl std::error::Error for CutMember {}

/// Images as stored: `count` images of `rows`×`cols` u8 pixels, row-major, image after image.
/// Pixels stay u8 here; scaling to [0, 1] is the model's business.
#[derive(Clone, PartialEq, Eq)]
pub struct Images {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Prints the shape, not the megabytes of pixels.
impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Images {{ count: {}, rows: {}, cols: {}, .. }}",
            self.count, self.rows, self.cols
        )
    }
}

/// Reads an IDX images file (magic 0x00000803), raw or `.gz` (decided by the extension).
pub fn read_idx_images(path: &Path) -> Result<Images, DataError> {
    images_from(IdxSource::open(path)?)
}

/// Parses the bytes of an IDX images file already in memory, gzip-compressed when
/// `compressed`; `path` only names the file in errors. Never panics (the fuzz target's entry).
pub fn parse_idx_images(bytes: &[u8], path: &Path, compressed: bool) -> Result<Images, DataError> {
    images_from(IdxSource::from_bytes(bytes, path, compressed))
}

fn images_from(mut source: IdxSource<'_>) -> Result<Images, DataError> {
    let path = source.path;
    let header: [u8; 16] = source.read_header(IMAGES_MAGIC)?;
    let [count, rows, cols] = [4, 8, 12].map(|at| u64::from(be_u32(&header, at)));
    let bad_header = |problem: String| DataError::BadHeader {
        path: path.to_path_buf(),
        problem,
    };
    if rows == 0 || cols == 0 {
        return Err(bad_header(format!(
            "images of {rows}x{cols} pixels are empty"
        )));
    }
    let pixels_per_image = rows * cols;
    if pixels_per_image > MAX_PIXELS_PER_IMAGE {
        return Err(bad_header(format!(
            "images of {rows}x{cols} pixels are absurdly large (limit {MAX_PIXELS_PER_IMAGE} pixels)"
        )));
    }
    let body_len = count.checked_mul(pixels_per_image).ok_or_else(|| {
        bad_header(format!(
            "{count} images of {rows}x{cols} overflow a 64-bit size"
        ))
    })?;
    let pixels = source.read_body(header.len() as u64, body_len)?;
    // The three values were checked to fit the body we just read, so they fit in usize.
    Ok(Images {
        count: count as usize,
        rows: rows as usize,
        cols: cols as usize,
        pixels,
    })
}

/// Reads an IDX labels file (magic 0x00000801), raw or `.gz`. The range of the labels is
/// not checked here (it depends on the dataset); [`super::load_dir`] checks it.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    labels_from(IdxSource::open(path)?)
}

/// Parses the bytes of an IDX labels file already in memory, like [`parse_idx_images`].
pub fn parse_idx_labels(bytes: &[u8], path: &Path, compressed: bool) -> Result<Vec<u8>, DataError> {
    labels_from(IdxSource::from_bytes(bytes, path, compressed))
}

fn labels_from(mut source: IdxSource<'_>) -> Result<Vec<u8>, DataError> {
    let header: [u8; 8] = source.read_header(LABELS_MAGIC)?;
    let count = u64::from(be_u32(&header, 4));
    source.read_body(header.len() as u64, count)
}

/// Opens `path` for reading its decompressed bytes: through gzip when it ends in `.gz`.
/// Returns the reader and whether it decompresses (read errors then mean a corrupt gzip).
pub(crate) fn open_decoded(path: &Path) -> Result<(Box<dyn Read>, bool, u64), DataError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => DataError::MissingFile {
            path: path.to_path_buf(),
            hint: "check the path, or pass `--data DIR` holding the four IDX files (raw or .gz)"
                .into(),
        },
        _ => DataError::io("cannot open", path, source),
    })?;
    let file_len = file
        .metadata()
        .map_err(|e| DataError::io("cannot stat", path, e))?
        .len();
    let compressed = path.extension().is_some_and(|ext| ext == "gz");
    let reader: Box<dyn Read> = if compressed {
        Box::new(GzMembers::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    Ok((reader, compressed, file_len))
}

/// Turns a read error into the error a user can act on: a corrupt gzip, or plain I/O.
pub(crate) fn read_error(path: &Path, compressed: bool, source: io::Error) -> DataError {
    if compressed {
        DataError::Gzip {
            path: path.to_path_buf(),
            reason: source.to_string(),
        }
    } else {
        DataError::io("cannot read", path, source)
    }
}

/// An open IDX file whose header has not been trusted yet.
struct IdxSource<'a> {
    path: &'a Path,
    reader: Box<dyn Read + 'a>,
    compressed: bool,
    /// Length on disk: compressed for a `.gz`, exact for a raw file.
    file_len: u64,
    /// The host memory a body may take (None where unknown: not Linux).
    memory_available: Option<u64>,
}

impl<'a> IdxSource<'a> {
    fn open(path: &'a Path) -> Result<Self, DataError> {
        let (reader, compressed, file_len) = open_decoded(path)?;
        Ok(IdxSource {
            path,
            reader,
            compressed,
            file_len,
            memory_available: crate::device::available_host_bytes(),
        })
    }

    fn from_bytes(bytes: &'a [u8], path: &'a Path, compressed: bool) -> Self {
        let reader: Box<dyn Read + 'a> = if compressed {
            Box::new(GzMembers::new(bytes))
        } else {
            Box::new(bytes)
        };
        IdxSource {
            path,
            reader,
            compressed,
            file_len: bytes.len() as u64,
            memory_available: crate::device::available_host_bytes(),
        }
    }

    /// Reads the `N`-byte header. The magic number is checked first, so that a short file of
    /// the wrong kind (labels passed as images) is reported as such, not as truncated.
    fn read_header<const N: usize>(&mut self, magic: u32) -> Result<[u8; N], DataError> {
        let mut header = [0u8; N];
        let got = read_up_to(&mut self.reader, &mut header).map_err(|e| self.error(e))?;
        if got >= 4 {
            check_magic(self.path, be_u32(&header, 0), magic)?;
        }
        if got < N {
            return Err(DataError::ShortHeader {
                path: self.path.to_path_buf(),
                expected: N as u64,
                actual: got as u64,
            });
        }
        Ok(header)
    }

    /// Reads exactly `body_len` bytes after a `header_len`-byte header, and checks that
    /// nothing follows them. Sizes are checked against the file before anything is allocated.
    fn read_body(mut self, header_len: u64, body_len: u64) -> Result<Vec<u8>, DataError> {
        let expected_total = header_len.saturating_add(body_len);
        let path = self.path.to_path_buf();
        if !self.compressed && self.file_len < expected_total {
            return Err(DataError::Truncated {
                path,
                expected: expected_total,
                actual: self.file_len,
            });
        }
        if !self.compressed && self.file_len > expected_total {
            return Err(DataError::TooLong {
                path,
                expected: expected_total,
            });
        }
        let most_a_gzip_holds = self.file_len.saturating_mul(MAX_DEFLATE_RATIO);
        if self.compressed && expected_total > most_a_gzip_holds {
            return Err(DataError::BadHeader {
                path,
                problem: format!(
                    "it announces {expected_total} bytes, more than a {}-byte gzip can hold",
                    self.file_len
                ),
            });
        }
        if let Some(available) = self.memory_available.filter(|&a| body_len > a) {
            return Err(DataError::TooLarge { path, bytes: body_len, available });
        }
        let mut body = Vec::with_capacity(body_len.min(MAX_INITIAL_CAPACITY) as usize);
        let read = (&mut self.reader).take(body_len).read_to_end(&mut body);
        read.map_err(|e| self.error(e))?;
        if (body.len() as u64) < body_len {
            let actual = header_len + body.len() as u64;
            return Err(DataError::Truncated {
                path,
                expected: expected_total,
                actual,
            });
        }
        // Reading one byte more also makes the gzip decoder check its CRC and trailer.
        let extra = read_up_to(&mut self.reader, &mut [0u8; 1]).map_err(|e| self.error(e))?;
        if extra > 0 {
            if self.compressed {
                // A corrupt deflate stream often decodes to too much; reading on (bounded)
                // reaches the CRC check, which names the real problem.
                let drain_limit = expected_total.max(1 << 20);
                io::copy(&mut (&mut self.reader).take(drain_limit), &mut io::sink())
                    .map_err(|e| self.error(e))?;
            }
            return Err(DataError::TooLong {
                path,
                expected: expected_total,
            });
        }
        Ok(body)
    }

    fn error(&self, source: io::Error) -> DataError {
        read_error(self.path, self.compressed, source)
    }
}

/// Like `read_exact`, but reports how much it got instead of failing at end of file,
/// so that a short file can be reported as truncated with its actual length.
fn read_up_to(reader: &mut dyn Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Checks the magic number, and when it is wrong guesses the likely mix-up for the message.
fn check_magic(path: &Path, found: u32, expected: u32) -> Result<(), DataError> {
    if found == expected {
        return Ok(());
    }
    let hint = if found.to_be_bytes()[..2] == GZIP_MAGIC {
        "; it looks gzip-compressed: give it a .gz name"
    } else if found == IMAGES_MAGIC {
        "; this is an images file: images and labels swapped?"
    } else if found == LABELS_MAGIC {
        "; this is a labels file: images and labels swapped?"
    } else {
        ""
    };
    let what = if expected == IMAGES_MAGIC {
        "images"
    } else {
        "labels"
    };
    Err(DataError::BadMagic {
        path: path.to_path_buf(),
        what,
        found,
        expected,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write as _;

    /// A `.gz` of 100 images of 28×28 zeros: about 1000 times smaller than its content.
    fn zeros_gz() -> Vec<u8> {
        let mut idx = Vec::from(IMAGES_MAGIC.to_be_bytes());
        [100u32, 28, 28].iter().for_each(|d| idx.extend(d.to_be_bytes()));
        idx.resize(16 + 100 * 784, 0);
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        encoder.write_all(&idx).unwrap();
        encoder.finish().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// What follows the last member is named the same whatever the input's buffer holds when
    /// the next member is looked for (a buffer of one byte shows a lone 0x1f that could begin
    /// one): junk where it does not begin with gzip's magic, a cut member where it does.
    #[test]
    fn what_follows_a_member_is_named_whatever_the_buffer_size() {
        let member = gzip(&[2; 300]);
        let cases: [(&[u8], bool); 7] = [
            (&[0x1f, 0x00], false),
            (&[0x00, 0x00, 0x07], false),
            (&[0x1f], false),
            (&[0x00, 0x1f, 0x8b], false),
            (&[0x1f, 0x8b, 0x08, 0x00], true),
            (&member[..10], true),
            (&member[..member.len() - 4], true),
        ];
        for (after, cut) in cases {
            let file = [gzip(&[1; 300]), after.to_vec()].concat();
            for capacity in [1, 2, 3, 8 << 10] {
                let mut reader = GzMembers::new(io::BufReader::with_capacity(capacity, file.as_slice()));
                let error = reader.read_to_end(&mut Vec::new()).unwrap_err();
                let named = error.get_ref().is_some_and(|inner| if cut { inner.is::<CutMember>() } else { inner.is::<TrailingBytes>() });
                assert!(named, "{} bytes after the member ({:02x?}…), buffer of {capacity}: {error}", after.len(), &after[..after.len().min(4)]);
            }
        }
        // Whole members after the first, an empty one among them, read as one stream, and
        // zero padding after the last is passed over, as `gzip -d` does.
        let file = [gzip(&[1; 300]), gzip(&[]), member.clone(), vec![0; 5000]].concat();
        for capacity in [1, 2, 3, 8 << 10] {
            let mut out = Vec::new();
            GzMembers::new(io::BufReader::with_capacity(capacity, file.as_slice())).read_to_end(&mut out).unwrap();
            assert_eq!(out, [vec![1; 300], vec![2; 300]].concat(), "buffer of {capacity}");
        }
    }

    /// A member that fails its CRC ends the stream: reading on does not go on with the next
    /// member as if it had ended well.
    #[test]
    fn no_member_is_read_after_a_failed_one() {
        let mut first = gzip(&[1; 300]);
        let crc = first.len() - 8;
        first[crc] ^= 0xff;
        let two = [first, gzip(&[2; 300])].concat();
        let mut reader = GzMembers::new(two.as_slice());
        let mut out = Vec::new();
        assert!(reader.read_to_end(&mut out).is_err(), "the CRC is wrong");
        let mut after = Vec::new();
        assert_eq!(reader.read_to_end(&mut after).unwrap(), 0);
        assert!(!after.contains(&2), "the second member was read after the error");
    }

    /// Input that is interrupted while the next member is looked for (EINTR) is retried, not
    /// taken for the end of the file.
    #[test]
    fn an_interrupted_look_for_the_next_member_is_retried() {
        struct InterruptOnce<'a> { inner: &'a [u8], interrupt_at: usize, done: &'a std::cell::Cell<bool> }
        impl Read for InterruptOnce<'_> {
            fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
                let n = std::cmp::min(into.len(), self.inner.len());
                into[..n].copy_from_slice(&self.inner[..n]);
                self.inner = &self.inner[n..];
                Ok(n)
            }
        }
        impl BufRead for InterruptOnce<'_> {
            fn fill_buf(&mut self) -> io::Result<&[u8]> {
                if !self.done.get() && self.inner.len() == self.interrupt_at {
                    self.done.set(true);
                    return Err(io::Error::from(io::ErrorKind::Interrupted));
                }
                Ok(self.inner)
            }
            fn consume(&mut self, amount: usize) {
                self.inner = &self.inner[amount..];
            }
        }
        let second = gzip(&[2; 300]);
        let two = [gzip(&[1; 300]), second.clone()].concat();
        let interrupted = std::cell::Cell::new(false);
        let mut reader = GzMembers::new(InterruptOnce { inner: &two, interrupt_at: second.len(), done: &interrupted });
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert!(interrupted.get(), "the look for the second member was interrupted");
        assert_eq!(out, [vec![1; 300], vec![2; 300]].concat());
    }

    /// A body that deflate can honestly hold but the host could not is refused from the
    /// header, before anything is read or reserved; the same file within the budget loads.
    #[test]
    fn a_body_larger_than_the_memory_available_is_refused_before_reading() {
        let gz = zeros_gz();
        let path = Path::new("bomb-images.gz");
        let within = |memory_available| IdxSource { memory_available, ..IdxSource::from_bytes(&gz, path, true) };
        let loaded = images_from(within(Some(100 * 784))).expect("a body that fits the budget exactly");
        assert_eq!((loaded.count, loaded.pixels.len()), (100, 100 * 784));
        assert!(images_from(within(None)).is_ok(), "no budget known: no limit");
        let refused = images_from(within(Some(100 * 784 - 1))).unwrap_err().to_string();
        assert!(refused.contains("its 78400 bytes of data do not fit the 78399 bytes of memory available"), "{refused}");
        assert!(refused.contains("bomb-images.gz"), "{refused}");
    }
}
