//! What a kernel module's fat binary holds: its PTX, for which virtual architecture and PTX
//! ISA, and the GPU architectures it carries machine code (SASS) for. `build.rs` writes one
//! fat binary per `cuda/*.cu`; the host reads them to leave out a module the GPU cannot run,
//! to say when the driver must compile PTX first (half a minute at start-up), and for
//! `bntrain info`. Loading itself is the driver's business and does not depend on this.
//!
//! NVIDIA does not document the layout; this is how `cuobjdump` (CUDA 13.0) reads nvcc
//! 13.0's output, checked by the tests below against the images built into this binary:
//!
//! ```text
//! header  (16 bytes): u32 magic 0xBA55ED50, u16 version, u16 header size,
//!                     u64 size of the entries that follow
//! entry:  +0x00 u16 kind (1 PTX, 2 ELF machine code)     +0x04 u32 entry header size
//!         +0x08 u64 payload size (padded; the next entry follows it)
//!         +0x18 u16 minor, u16 major (PTX: the ISA, 9.0)  +0x1c u32 architecture (75, 90)
//! ```
//!
//! An entry of another kind is passed over (by its header and payload sizes). Every read is
//! bounds-checked: anything else gives `None`, never a panic.

/// What an entry of a fat binary is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// PTX for a virtual architecture (`compute_NN`), which the driver compiles for the GPU.
    Ptx,
    /// Machine code for one GPU architecture (`sm_NN`).
    Sass,
}

/// One entry of a fat binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub code: Code,
    /// 75 for compute_75 or sm_75.
    pub arch: u32,
    /// (major, minor): the PTX ISA for PTX (9.0 from nvcc 13.0).
    pub version: (u16, u16),
}

const MAGIC: u32 = 0xBA55_ED50;
const KIND_PTX: u16 = 1;
const KIND_ELF: u16 = 2;

/// The entries of `image`, in order; `None` where it is not a fat binary as described above.
pub fn entries(image: &[u8]) -> Option<Vec<Entry>> {
    let bytes = |at: usize, n: usize| image.get(at..at.checked_add(n)?);
    let u16_at = |at: usize| bytes(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| bytes(at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at: usize| bytes(at, 8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
    if u32_at(0)? != MAGIC {
        return None;
    }
    let start = usize::from(u16_at(6)?);
    let end = start.checked_add(usize::try_from(u64_at(8)?).ok()?)?;
    if end > image.len() {
        return None;
    }
    let mut found = Vec::new();
    let mut at = start;
    while at < end {
        let header = usize::try_from(u32_at(at + 4)?).ok()?;
        let payload = usize::try_from(u64_at(at + 8)?).ok()?;
        let version = (u16_at(at + 0x1a)?, u16_at(at + 0x18)?);
        let arch = u32_at(at + 0x1c)?;
        match u16_at(at)? {
            KIND_PTX => found.push(Entry { code: Code::Ptx, arch, version }),
            KIND_ELF => found.push(Entry { code: Code::Sass, arch, version }),
            _ => {}
        }
        // An entry that does not advance would loop forever.
        let next = at.checked_add(header)?.checked_add(payload)?;
        if header < 0x20 || next > end {
            return None;
        }
        at = next;
    }
    Some(found)
}

/// The virtual architecture of the module's PTX (the oldest, if several).
pub fn ptx_target(entries: &[Entry]) -> Option<u32> {
    entries.iter().filter(|e| e.code == Code::Ptx).map(|e| e.arch).min()
}

/// The ISA of the module's PTX, e.g. `9.0` (of the oldest, as [`ptx_target`]).
pub fn ptx_isa(entries: &[Entry]) -> Option<String> {
    entries.iter().filter(|e| e.code == Code::Ptx).min_by_key(|e| e.arch).map(|e| format!("{}.{}", e.version.0, e.version.1))
}

/// The architectures the module carries machine code for, ascending.
pub fn sass_archs(entries: &[Entry]) -> Vec<u32> {
    let mut archs: Vec<u32> = entries.iter().filter(|e| e.code == Code::Sass).map(|e| e.arch).collect();
    archs.sort_unstable();
    archs.dedup();
    archs
}

/// Whether machine code in the module runs on a GPU of compute capability
/// `major.minor`: code for sm_XY runs on devices of major X and minor at least Y.
pub fn runs_natively(entries: &[Entry], major: u32, minor: u32) -> bool {
    sass_archs(entries).iter().any(|&arch| arch / 10 == major && arch % 10 <= minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fat binary of the given (kind, arch, major, minor, payload length) entries.
    fn image(parts: &[(u16, u32, u16, u16, usize)]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(kind, arch, major, minor, payload) in parts {
            let mut header = vec![0u8; 0x40];
            header[0..2].copy_from_slice(&kind.to_le_bytes());
            header[4..8].copy_from_slice(&0x40u32.to_le_bytes());
            header[8..16].copy_from_slice(&(payload as u64).to_le_bytes());
            header[0x18..0x1a].copy_from_slice(&minor.to_le_bytes());
            header[0x1a..0x1c].copy_from_slice(&major.to_le_bytes());
            header[0x1c..0x20].copy_from_slice(&arch.to_le_bytes());
            body.extend(header);
            body.extend(vec![0xAB; payload]);
        }
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend(1u16.to_le_bytes());
        out.extend(16u16.to_le_bytes());
        out.extend((body.len() as u64).to_le_bytes());
        out.extend(body);
        out
    }

    #[test]
    fn entries_are_read_in_order_with_their_architectures() {
        let fat = image(&[(1, 75, 9, 0, 24), (2, 80, 1, 8, 40), (2, 90, 1, 8, 8)]);
        let found = entries(&fat).expect("a well-formed image");
        assert_eq!(
            found,
            vec![
                Entry { code: Code::Ptx, arch: 75, version: (9, 0) },
                Entry { code: Code::Sass, arch: 80, version: (1, 8) },
                Entry { code: Code::Sass, arch: 90, version: (1, 8) },
            ]
        );
        assert_eq!((ptx_target(&found), ptx_isa(&found).as_deref(), sass_archs(&found)), (Some(75), Some("9.0"), vec![80, 90]));
        // sm_80 code runs on 8.0, 8.6 and 8.9; sm_90's on 9.0; nothing runs on 7.5 or 10.0.
        assert!(runs_natively(&found, 8, 0) && runs_natively(&found, 8, 9) && runs_natively(&found, 9, 0));
        assert!(!runs_natively(&found, 7, 5) && !runs_natively(&found, 10, 0));
    }

    #[test]
    fn entries_of_other_kinds_are_passed_over() {
        let fat = image(&[(1, 75, 9, 0, 24), (7, 0, 0, 0, 16), (2, 90, 1, 8, 8)]);
        let found = entries(&fat).expect("a well-formed image");
        assert_eq!(found.iter().map(|e| (e.code, e.arch)).collect::<Vec<_>>(), vec![(Code::Ptx, 75), (Code::Sass, 90)]);
    }

    #[test]
    fn anything_malformed_gives_none_without_a_panic() {
        let fat = image(&[(1, 75, 9, 0, 24), (2, 90, 1, 8, 40)]);
        assert!(entries(&fat).is_some());
        // Every truncation, a bad magic, an entry past the end, an entry header too short to
        // advance.
        for len in 0..fat.len() {
            assert_eq!(entries(&fat[..len]), None, "truncated to {len} bytes");
        }
        let mut bad = fat.clone();
        bad[0] ^= 1;
        assert_eq!(entries(&bad), None);
        let mut bad = fat.clone();
        bad[16 + 8] = 0xFF;
        assert_eq!(entries(&bad), None);
        let mut bad = fat.clone();
        bad[16 + 4..16 + 8].copy_from_slice(&0u32.to_le_bytes());
        bad[16 + 8..16 + 16].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(entries(&bad), None);
        let mut bad = fat;
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(entries(&bad), None);
        assert_eq!(entries(b".version 9.0\n.target sm_75\n"), None);
    }

    /// The images nvcc built into this binary (when it found nvcc) read as build.rs asked:
    /// PTX for `PTX_ARCH` and machine code for `SASS_ARCHS` (by default sm_80 and sm_90) in
    /// each module, fused_cluster PTX for compute_90 and no code older than sm_90. The
    /// synthetic images above share the parser's offsets; this pins them to nvcc's output.
    #[test]
    fn the_built_kernel_images_hold_ptx_and_machine_code() {
        let Some(modules) = super::super::built::KERNELS else {
            // Straight to stderr (the harness captures eprintln!), so that the skip shows in
            // CI's log and its count; CI, which installs nvcc, makes it a failure.
            assert!(std::env::var_os("BNTRAIN_REQUIRE_NVCC").is_none_or(|v| v != "1"), "built without nvcc, and BNTRAIN_REQUIRE_NVCC=1");
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "skipped: built without nvcc");
            return;
        };
        let base: u32 = super::super::built::PTX_ARCH.trim_start_matches("compute_").parse().expect("PTX_ARCH");
        // nvcc 13.0 (the pinned one) writes PTX ISA 9.0, which pins the version's offsets.
        let isa_13_0 = super::super::built::NVCC_VERSION.is_some_and(|v| v.contains("release 13.0,"));
        for (name, image) in modules {
            let found = entries(image).unwrap_or_else(|| panic!("{name}: not a fat binary as fatbin.rs reads it"));
            let target = if *name == "fused_cluster" { base.max(90) } else { base };
            assert_eq!(ptx_target(&found), Some(target), "{name}: {found:?}");
            if isa_13_0 {
                assert_eq!(ptx_isa(&found).as_deref(), Some("9.0"), "{name}: {found:?}");
            }
            let sass: Vec<u32> = super::super::built::SASS_ARCHS.iter().copied().filter(|&sm| sm >= target).collect();
            assert_eq!(sass_archs(&found), sass, "{name}: {found:?}");
        }
    }
}
