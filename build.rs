//! Compiles every `cuda/*.cu` with nvcc into a fat binary and writes `$OUT_DIR/kernels.rs`:
//!
//! ```ignore
//! pub const KERNELS: Option<&[(&str, &[u8])]>;  // (module name, fat binary), None without nvcc
//! pub const PTX_ARCH: &str;                     // the -arch the PTX was written for (tests)
//! pub const SASS_ARCHS: &[u32];                 // BNTRAIN_SASS_ARCHS, ascending (tests)
//! pub const NVCC_VERSION: Option<&str>;         // e.g. "Cuda compilation tools, release 13.0, V13.0.88"
//! ```
//!
//! A module's fat binary holds its PTX and, for each GPU architecture in
//! `BNTRAIN_SASS_ARCHS` (default `sm_80,sm_90`: A100, H100/H200), the machine code ptxas
//! makes from that same PTX. The driver loads the machine code where it fits the GPU
//! (sm_80's also runs on 8.6 and 8.9) and compiles the PTX on any other GPU at start-up,
//! which took 29 s on an H100 when builds carried PTX alone (docs/perf.md).
//! `BNTRAIN_SASS_ARCHS=none` embeds the PTX alone (quicker builds). Everything is compressed (`-Xfatbin -compress-all`).
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `$PATH`, then
//! `/usr/local/cuda/bin`. Without it the crate still builds (CPU only) and says so.
//! `BNTRAIN_PTX_ARCH` picks the virtual architecture (default `compute_75`, the oldest
//! nvcc 13 accepts). Math stays IEEE (no `--use_fast_math`): the kernels are checked
//! against a CPU reference.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "BNTRAIN_PTX_ARCH", "BNTRAIN_SASS_ARCHS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = env::var("BNTRAIN_PTX_ARCH").unwrap_or_else(|_| "compute_75".to_string());
    let sass = sass_archs(&env::var("BNTRAIN_SASS_ARCHS").unwrap_or_else(|_| "sm_80,sm_90".to_string()));

    let mut sources: Vec<PathBuf> = fs::read_dir("cuda")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")));
    sources.sort();
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let generated = match find_nvcc() {
        None => {
            println!("cargo:warning=nvcc not found: CUDA kernels left out; --device cuda will be unavailable. Install nvcc (see README) and rebuild");
            format!("pub const KERNELS: Option<&[(&str, &[u8])]> = None;\n{}pub const NVCC_VERSION: Option<&str> = None;\n", for_tests(&arch, &sass))
        }
        Some((nvcc, version)) => {
            let cu: Vec<&PathBuf> = sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")).collect();
            let base = arch_number(&arch);
            let dropped: Vec<String> = sass.iter().filter(|&&sm| base.is_some_and(|b| sm < b)).map(|sm| format!("sm_{sm}")).collect();
            if !dropped.is_empty() {
                println!("cargo:warning=BNTRAIN_SASS_ARCHS: no machine code for {} (older than the PTX target {arch})", dropped.join(", "));
            }
            // Cargo's job count of nvcc processes at once (fused_step's machine code alone
            // takes most of a minute), each taking sources off a shared list.
            let workers = env::var("NUM_JOBS").ok().and_then(|n| n.parse::<usize>().ok()).unwrap_or(1).clamp(1, cu.len().max(1));
            let next = std::sync::atomic::AtomicUsize::new(0);
            let results: Vec<(usize, Result<PathBuf, String>)> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..workers)
                    .map(|_| {
                        let (nvcc, arch, sass, cu, out_dir, next) = (&nvcc, &arch, &sass, &cu, &out_dir, &next);
                        scope.spawn(move || {
                            let mut done = Vec::new();
                            loop {
                                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let Some(source) = cu.get(i) else { break done };
                                let image = out_dir.join(format!("{}.fatbin", stem(source)));
                                done.push((i, compile(nvcc, &source_arch(source, arch), sass, source, &image).map(|()| image)));
                            }
                        })
                    })
                    .collect();
                workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|_| vec![(0, Err("an nvcc thread panicked".into()))])).collect()
            });
            let mut images: Vec<Result<PathBuf, String>> = vec![Err("an nvcc thread stopped early".into()); cu.len()];
            for (i, result) in results {
                images[i] = result;
            }
            // A failure stops the build with nvcc's own diagnostics.
            let images: Vec<PathBuf> = images.into_iter().collect::<Result<_, _>>().unwrap_or_else(|why| panic!("{why}"));
            let mut entries = String::new();
            for (source, image) in cu.iter().zip(&images) {
                entries.push_str(&format!("    ({:?}, include_bytes!({:?})),\n", stem(source), image.display().to_string()));
            }
            format!("pub const KERNELS: Option<&[(&str, &[u8])]> = Some(&[\n{entries}]);\n{}pub const NVCC_VERSION: Option<&str> = Some({version:?});\n", for_tests(&arch, &sass))
        }
    };
    fs::write(out_dir.join("kernels.rs"), generated).expect("write kernels.rs");
}

/// The first nvcc that runs, with its `release` line (e.g. `Cuda compilation tools, release
/// 13.0, V13.0.88`).
fn find_nvcc() -> Option<(PathBuf, String)> {
    let from_env = |var: &str, rel: &str| env::var_os(var).map(|v| PathBuf::from(v).join(rel));
    let mut candidates: Vec<PathBuf> = Vec::new();
    candidates.extend(env::var_os("NVCC").map(PathBuf::from));
    candidates.extend(from_env("CUDA_HOME", "bin/nvcc"));
    candidates.extend(from_env("CUDA_PATH", "bin/nvcc"));
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.into_iter().filter(|c| c.is_file()).find_map(|nvcc| {
        let output = Command::new(&nvcc).arg("--version").output().ok()?;
        if !output.status.success() {
            println!("cargo:warning={} --version failed; skipping it", nvcc.display());
            return None;
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let version = text.lines().find(|l| l.contains("release")).unwrap_or("unknown version").trim().to_string();
        Some((nvcc, version))
    })
}

/// The -arch for one source: `arch`, unless its first line asks for a newer one
/// (`// bntrain: ptx-arch compute_90`: thread-block clusters need it), which the host then
/// loads only on devices of that compute capability.
fn source_arch(source: &Path, arch: &str) -> String {
    let first = fs::read_to_string(source).unwrap_or_default().lines().next().unwrap_or("").to_string();
    match first.trim().strip_prefix("// bntrain: ptx-arch ").map(str::trim) {
        Some(wanted) if arch_number(wanted).is_some_and(|w| arch_number(arch).is_none_or(|a| w > a)) => wanted.to_string(),
        _ => arch.to_string(),
    }
}

/// `PTX_ARCH` and `SASS_ARCHS`, which fatbin.rs's tests check the images against.
fn for_tests(arch: &str, sass: &[u32]) -> String {
    format!("#[allow(dead_code)]\npub const PTX_ARCH: &str = {arch:?};\n#[allow(dead_code)]\npub const SASS_ARCHS: &[u32] = &{sass:?};\n")
}

/// 75 for `compute_75`.
fn arch_number(arch: &str) -> Option<u32> {
    arch.strip_prefix("compute_").and_then(|n| n.parse().ok())
}

fn stem(source: &Path) -> &str {
    source.file_stem().and_then(|s| s.to_str()).expect("UTF-8 file name")
}

/// The GPU architectures of `BNTRAIN_SASS_ARCHS` as numbers, ascending and once each
/// (`sm_90,sm_80` → 80, 90); `none` or nothing: none. A malformed list stops the build.
fn sass_archs(list: &str) -> Vec<u32> {
    let list = list.trim();
    if list.is_empty() || list == "none" {
        return Vec::new();
    }
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.strip_prefix("sm_").unwrap_or(t).parse::<u32>().unwrap_or_else(|_| {
                panic!("BNTRAIN_SASS_ARCHS: `{t}` is not a GPU architecture (expected e.g. `sm_80,sm_90`, or `none`)")
            })
        })
        .collect::<std::collections::BTreeSet<u32>>()
        .into_iter()
        .collect()
}

/// nvcc -fatbin: the PTX for `arch` and machine code for each of `sass` that is at least
/// `arch` (a module that asks for compute_90 gets no sm_80 code), assembled by ptxas from
/// that same PTX, as the driver would at run time. On failure, nvcc's own diagnostics.
fn compile(nvcc: &Path, arch: &str, sass: &[u32], source: &Path, image: &Path) -> Result<(), String> {
    let virtual_number = arch_number(arch).unwrap_or(0);
    let mut codes = vec![arch.to_string()];
    codes.extend(sass.iter().filter(|&&sm| sm >= virtual_number).map(|sm| format!("sm_{sm}")));
    let output = Command::new(nvcc)
        .args(["-fatbin", "-lineinfo", "-Wno-deprecated-gpu-targets", "-Icuda", "-Xfatbin", "-compress-all", "-t", "0"])
        .arg(format!("-gencode=arch={arch},code=[{}]", codes.join(",")))
        .arg("-o")
        .arg(image)
        .arg(source)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {}:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
