//! Compiles every `cuda/*.cu` to PTX with nvcc and writes `$OUT_DIR/kernels.rs`:
//!
//! ```ignore
//! pub const KERNELS: Option<&[(&str, &str)]>;  // (module name, PTX text), None without nvcc
//! pub const PTX_ARCH: &str;                     // the -arch the PTX was written for
//! pub const NVCC_VERSION: Option<&str>;         // e.g. "Cuda compilation tools, release 13.0, V13.0.88"
//! ```
//!
//! nvcc is looked for in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `$PATH`, then
//! `/usr/local/cuda/bin`. Without it the crate still builds (CPU only) and says so.
//! `BNTRAIN_PTX_ARCH` picks the virtual architecture (default `compute_75`, the oldest
//! nvcc 13 accepts; the driver JIT-compiles the PTX for the GPU it finds). Math stays IEEE
//! (no `--use_fast_math`): the kernels are checked against a CPU reference.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "BNTRAIN_PTX_ARCH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = env::var("BNTRAIN_PTX_ARCH").unwrap_or_else(|_| "compute_75".to_string());

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
            format!("pub const KERNELS: Option<&[(&str, &str)]> = None;\npub const PTX_ARCH: &str = {arch:?};\npub const NVCC_VERSION: Option<&str> = None;\n")
        }
        Some((nvcc, version)) => {
            let mut entries = String::new();
            for source in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "cu")) {
                let name = source.file_stem().and_then(|s| s.to_str()).expect("UTF-8 file name");
                let ptx = out_dir.join(format!("{name}.ptx"));
                compile(&nvcc, &source_arch(source, &arch), source, &ptx);
                entries.push_str(&format!("    ({name:?}, include_str!({:?})),\n", ptx.display().to_string()));
            }
            format!("pub const KERNELS: Option<&[(&str, &str)]> = Some(&[\n{entries}]);\npub const PTX_ARCH: &str = {arch:?};\npub const NVCC_VERSION: Option<&str> = Some({version:?});\n")
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
    let number = |a: &str| a.strip_prefix("compute_").and_then(|n| n.parse::<u32>().ok());
    let first = fs::read_to_string(source).unwrap_or_default().lines().next().unwrap_or("").to_string();
    match first.trim().strip_prefix("// bntrain: ptx-arch ").map(str::trim) {
        Some(wanted) if number(wanted).is_some_and(|w| number(arch).is_none_or(|a| w > a)) => wanted.to_string(),
        _ => arch.to_string(),
    }
}

/// nvcc -ptx; a failure stops the build with nvcc's own diagnostics.
fn compile(nvcc: &Path, arch: &str, source: &Path, ptx: &Path) {
    let output = Command::new(nvcc)
        .args(["-ptx", &format!("-arch={arch}"), "-lineinfo", "-Wno-deprecated-gpu-targets", "-Icuda", "-o"])
        .arg(ptx)
        .arg(source)
        .output()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
    if !output.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
