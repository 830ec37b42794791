//! Choosing where to train: the CPU reference, the CUDA backend, or whichever works.

use crate::backend::Backend;
use crate::backend::GemmPrecision;
use crate::cpu::{CpuBackend, CpuOptions, InputPath};
use crate::cuda::{CudaBackend, CudaOptions};
use crate::data::Dataset;
use crate::model::{ConfigError, ModelConfig, ModelParams, TrainConfig};
use crate::Result;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

/// `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when a usable GPU and the kernels are there, else the CPU (with a notice).
    Auto,
}

impl DeviceChoice {
    /// The name `--device` takes.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Auto => "auto",
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(format!("unknown device `{s}`: expected cpu, cuda or auto")),
        }
    }
}

/// The arithmetic a backend uses. The CPU computes in f32 or f64; CUDA in f32. With tf32 and
/// bf16 the GEMMs read their operands in that format (tensor cores on the GPU, an emulation
/// on the CPU) and everything else stays f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    F64,
    Tf32,
    Bf16,
}

impl Precision {
    /// What the GEMMs read.
    pub fn gemm(self) -> GemmPrecision {
        match self {
            Precision::F32 | Precision::F64 => GemmPrecision::F32,
            Precision::Tf32 => GemmPrecision::Tf32,
            Precision::Bf16 => GemmPrecision::Bf16,
        }
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "f64" | "fp64" => Ok(Precision::F64),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision `{s}`: expected f32, f64, tf32 or bf16")),
        }
    }
}

/// Resolves `--device auto` once: the device to use and, when falling back, why.
pub fn resolve(choice: DeviceChoice) -> (DeviceChoice, Option<String>) {
    match choice {
        DeviceChoice::Auto => match crate::cuda::cuda_available() {
            Ok(_) => (DeviceChoice::Cuda, None),
            Err(why) => (DeviceChoice::Cpu, Some(format!("no usable GPU, computing on the CPU: {}", why.reason()))),
        },
        other => (other, None),
    }
}

/// Opens a backend on a resolved device (`resolve` first for `Auto`).
pub fn open(
    device: DeviceChoice,
    precision: Precision,
    model: ModelConfig,
    train: TrainConfig,
    data: Arc<Dataset>,
    params: &ModelParams,
) -> Result<Box<dyn Backend>> {
    open_with(device, precision, InputPath::Auto, model, train, data, params)
}

/// [`open`], with the CPU backend's first-layer input path chosen (ignored by CUDA).
pub fn open_with(
    device: DeviceChoice,
    precision: Precision,
    cpu_input: InputPath,
    model: ModelConfig,
    train: TrainConfig,
    data: Arc<Dataset>,
    params: &ModelParams,
) -> Result<Box<dyn Backend>> {
    let cpu = CpuOptions { input: cpu_input, gemm: precision.gemm() };
    Ok(match (device, precision) {
        (DeviceChoice::Cpu, Precision::F64) => Box::new(CpuBackend::<f64>::with_options(model, train, data, params, cpu)?),
        (DeviceChoice::Cpu, _) => Box::new(CpuBackend::<f32>::with_options(model, train, data, params, cpu)?),
        (DeviceChoice::Cuda, Precision::F32 | Precision::Tf32 | Precision::Bf16) => {
            let options = CudaOptions { gemm: precision.gemm(), ..CudaOptions::from_env()? };
            Box::new(CudaBackend::with_options(model, train, data, params, options)?)
        }
        (DeviceChoice::Cuda, Precision::F64) => {
            return Err(ConfigError::Invalid("the CUDA backend computes in f32; use --precision f32, or --device cpu for f64".into()).into())
        }
        (DeviceChoice::Auto, _) => {
            let (resolved, _) = resolve(DeviceChoice::Auto);
            return open_with(resolved, precision, cpu_input, model, train, data, params);
        }
    })
}

/// Rows of activations a run holds beside a training batch's: `evaluated` at the same time,
/// in the backend's float (an evaluation chunk, or a whole split where it is evaluated with
/// its own batch statistics; on CUDA on the device), and `exact` in a later phase, in f64 on
/// the host (the exact population statistics' pass over the training set, which `reproduce`
/// makes after its training).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldRows {
    pub evaluated: usize,
    pub exact: usize,
}

/// How many networks train side by side: `model` alone, or `model` (the BN network) and its
/// plain twin (the study's comparison, `bench --pair`), each with its own parameters, batch
/// and evaluated rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Networks {
    One,
    WithPlainTwin,
}

/// Fails, before anything is allocated, where training `model` with batches of `batch`
/// (and the rows `held` beside them) would take more host memory than this process may still
/// have ([`available_host_bytes`]; no check off Linux): a failed allocation aborts the
/// process, and a cgroup over its limit is killed, instead of returning an error.
pub fn check_host_memory(model: &ModelConfig, networks: Networks, batch: usize, held: HeldRows, device: DeviceChoice, precision: Precision) -> Result<()> {
    let Some(available) = available_host_bytes() else { return Ok(()) };
    let needed = host_bytes_needed(model, networks, batch, held, device, precision);
    let parameters = model.parameter_count().unwrap_or(usize::MAX) as f64;
    if needed > available as f64 {
        let gb = |bytes: f64| bytes / 1e9;
        let (what, needs, each) = match networks {
            Networks::One => (model.to_string(), "needs", ""),
            Networks::WithPlainTwin => (format!("{model} and its plain twin"), "need", " a network"),
        };
        return Err(ConfigError::Invalid(format!(
            "{what} with batches of {batch} {needs} at least {:.1} GB of memory to train and evaluate ({parameters:.3e} parameters{each}); this process has {:.1} GB available",
            gb(needed), gb(available as f64)
        )).into());
    }
    Ok(())
}

/// [`check_host_memory`]'s estimate, a lower bound: the parameters in f64 (the copy every
/// backend opens from), on the CPU also the weights, gradients, momentum and an evaluation's
/// copy in the backend's float; then the larger of two phases: training, with the activations
/// of a batch and of the evaluated rows (the input once; for every other unit z, BN's output
/// and x̂, the activation, two gradients), and the exact pass, which holds its hidden layers
/// only (the first layer's z twice, then a layer's output, activation and the next z).
/// With a plain twin, the parameters and the training phase twice (the twin counted at the
/// BN network's size, which has a parameter more a unit); the exact pass, of the BN network
/// alone, once.
pub fn host_bytes_needed(model: &ModelConfig, networks: Networks, batch: usize, held: HeldRows, device: DeviceChoice, precision: Precision) -> f64 {
    let float = if precision == Precision::F64 { 8.0 } else { 4.0 };
    let (per_parameter, per_input, per_unit) = match device {
        DeviceChoice::Cpu => (8.0 + 4.0 * float, float, 6.0 * float),
        // The device holds the rest; the host converts the parameters once.
        DeviceChoice::Cuda | DeviceChoice::Auto => (8.0 + 4.0, 0.0, 0.0),
    };
    let parameters = model.parameter_count().unwrap_or(usize::MAX) as f64;
    let units = model.widths()[1..].iter().sum::<usize>() as f64;
    let training = (batch as f64 + held.evaluated as f64) * (model.inputs as f64 * per_input + units * per_unit);
    let first = model.hidden.first().copied().unwrap_or(0) as f64;
    let widest = model.hidden.iter().copied().max().unwrap_or(0) as f64;
    let exact_pass = held.exact as f64 * 8.0 * (2.0 * first + 3.0 * widest);
    let copies = match networks {
        Networks::One => 1.0,
        Networks::WithPlainTwin => 2.0,
    };
    copies * parameters * per_parameter + (copies * training).max(exact_pass)
}

/// The memory this process may still take, in bytes: the least of Linux's estimate for the
/// machine (MemAvailable), what its memory cgroups still allow (a container's `--memory`),
/// and what its address-space limit (`ulimit -v`) leaves; `None` where none can be read.
pub(crate) fn available_host_bytes() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let machine = read("/proc/meminfo").and_then(|m| meminfo_available(&m));
    let cgroups = read("/proc/self/cgroup").and_then(|c| cgroup_headroom(&c, Path::new("/sys/fs/cgroup")));
    let address_space = match (read("/proc/self/limits"), read("/proc/self/status")) {
        (Some(limits), Some(status)) => address_space_headroom(&limits, &status),
        _ => None,
    };
    [machine, cgroups, address_space].into_iter().flatten().min()
}

/// MemAvailable of `/proc/meminfo`, in bytes.
fn meminfo_available(meminfo: &str) -> Option<u64> {
    kilobytes_field(meminfo, "MemAvailable:")
}

/// A `Name:   N kB` line's N, in bytes.
fn kilobytes_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok()?.checked_mul(1024)
}

/// What the memory cgroups of `/proc/self/cgroup` (text `proc_cgroup`, hierarchies mounted
/// under `root`) still allow: over the process's group and each group above it, in cgroup
/// v2 (`0::/path`) and in v1's memory hierarchy, the least limit less usage. Usage leaves
/// out the file cache, which the kernel reclaims before it kills, but not the shared memory
/// counted in it, which it cannot drop. A group with no limit, or whose files are not there,
/// does not count; in a container the mount's root is the container's own group. (This
/// guards against a certain failure, so it errs towards letting a run start.)
fn cgroup_headroom(proc_cgroup: &str, root: &Path) -> Option<u64> {
    let read = |path: &Path| std::fs::read_to_string(path).ok();
    let number = |path: &Path| read(path).and_then(|t| t.trim().parse::<u64>().ok());
    let stat_field = |stat: &str, name: &str| {
        stat.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse::<u64>().ok()))
    };
    let mut least: Option<u64> = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else { continue };
        let (mount, limit, usage, cache, shared) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max", "memory.current", "file", "shmem")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache", "total_shmem")
        } else {
            continue;
        };
        // A group outside the namespace's view (`/../x`) is not under the mount.
        if path.split('/').any(|part| part == "..") {
            continue;
        }
        let mut group = mount.join(path.trim_start_matches('/'));
        loop {
            if let (Some(limit), Some(usage)) = (number(&group.join(limit)), number(&group.join(usage))) {
                let stat = read(&group.join("memory.stat")).unwrap_or_default();
                let reclaimable = stat_field(&stat, cache).unwrap_or(0).saturating_sub(stat_field(&stat, shared).unwrap_or(0));
                let headroom = limit.saturating_sub(usage.saturating_sub(reclaimable));
                least = Some(least.map_or(headroom, |l| l.min(headroom)));
            }
            if group == mount || !group.pop() {
                break;
            }
        }
    }
    least
}

/// What the address-space limit (`Max address space` of `/proc/self/limits`, the soft one)
/// leaves beyond the process's present size (`VmSize` of `/proc/self/status`).
fn address_space_headroom(limits: &str, status: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line.trim_start_matches("Max address space").split_whitespace().next()?.parse().ok()?;
    Some(soft.saturating_sub(kilobytes_field(status, "VmSize:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed study's estimate stays under what it was measured to take (`/usr/bin/time -v
    /// bntrain --device cpu reproduce --quick`: 347 MB resident at most), so that a small
    /// machine is not refused what it can run; the training phase and the exact pass are
    /// phases, not a sum.
    #[test]
    fn the_seed_study_is_estimated_below_what_it_takes() {
        let model = ModelConfig::seed(true);
        let held = HeldRows { evaluated: 10_000, exact: 60_000 };
        let needed = host_bytes_needed(&model, Networks::WithPlainTwin, 60, held, DeviceChoice::Cpu, Precision::F32);
        assert!((200e6..347e6).contains(&needed), "{needed}");
        // The exact pass: the first layer's z twice and three widest layers, in f64.
        let exact_only = host_bytes_needed(&model, Networks::One, 0, HeldRows { evaluated: 0, exact: 60_000 }, DeviceChoice::Cuda, Precision::F32);
        let parameters = model.parameter_count().unwrap() as f64;
        assert_eq!(exact_only, parameters * 12.0 + 60_000.0 * 8.0 * (2.0 * 100.0 + 3.0 * 100.0));
    }

    /// A plain twin (`bench --pair`, the study) doubles the parameters and the training phase,
    /// which dominate the wide network's needs; the exact pass is the BN network's alone.
    #[test]
    fn a_plain_twin_doubles_the_training_needs() {
        let model = ModelConfig { hidden: vec![1024, 1024], ..ModelConfig::seed(true) };
        let held = HeldRows { evaluated: 10_000, exact: 0 };
        for device in [DeviceChoice::Cpu, DeviceChoice::Cuda] {
            let one = host_bytes_needed(&model, Networks::One, 1024, held, device, Precision::F32);
            let two = host_bytes_needed(&model, Networks::WithPlainTwin, 1024, held, device, Precision::F32);
            assert_eq!(two, 2.0 * one, "{device:?}");
        }
        let exact = HeldRows { evaluated: 0, exact: 60_000 };
        let alone = host_bytes_needed(&model, Networks::One, 0, exact, DeviceChoice::Cuda, Precision::F32);
        let paired = host_bytes_needed(&model, Networks::WithPlainTwin, 0, exact, DeviceChoice::Cuda, Precision::F32);
        let parameters = model.parameter_count().unwrap() as f64;
        assert_eq!(paired - alone, parameters * 12.0);
    }

    #[test]
    fn reads_the_machine_and_the_address_space_limit() {
        assert_eq!(meminfo_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n"), Some(2048 * 1024));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max address space         3072000000           unlimited            bytes\n";
        assert_eq!(address_space_headroom(limits, "VmSize:\t  1000 kB\n"), Some(3_072_000_000 - 1_024_000));
        let unlimited = limits.replace("3072000000", "unlimited");
        assert_eq!(address_space_headroom(&unlimited, "VmSize:\t  1000 kB\n"), None);
    }

    /// cgroup v2 and v1 trees as a container or a systemd slice lays them out: the tightest
    /// group binds, the file cache less shared memory counts as free, and "max", a missing
    /// group or one outside the namespace's view does not count.
    #[test]
    fn reads_the_tightest_memory_cgroup() {
        let root = tempfile::tempdir().unwrap();
        let put = |path: &str, text: &str| {
            let file = root.path().join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
        };
        // v2: the root's limit binds (a container's), the process's own group has none.
        put("memory.max", "1000000\n");
        put("memory.current", "400000\n");
        put("memory.stat", "anon 1\nfile 150000\nshmem 50000\nfile_mapped 7\n");
        put("app/job/memory.max", "max\n");
        put("app/job/memory.current", "300000\n");
        assert_eq!(cgroup_headroom("0::/app/job\n", root.path()), Some(1000000 - (400000 - 100000)));
        // A tighter group below it binds instead.
        put("app/memory.max", "500000\n");
        put("app/memory.current", "450000\n");
        assert_eq!(cgroup_headroom("0::/app/job\n", root.path()), Some(50000));
        // A process outside any mounted group: nothing to read.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(cgroup_headroom("0::/elsewhere\n", empty.path()), None);
        assert_eq!(cgroup_headroom("0::/../outside\n", root.path()), None);
        // v1: the memory hierarchy's own files, its limit "unlimited" as a huge number.
        put("memory/box/memory.limit_in_bytes", "2000000\n");
        put("memory/box/memory.usage_in_bytes", "1500000\n");
        put("memory/box/memory.stat", "cache 7\ntotal_cache 600000\ntotal_shmem 100000\n");
        put("memory/memory.limit_in_bytes", "9223372036854771712\n");
        put("memory/memory.usage_in_bytes", "9000000\n");
        let v1 = "4:memory:/box\n3:cpuset:/\n";
        assert_eq!(cgroup_headroom(v1, root.path()), Some(2000000 - (1500000 - 500000)));
    }
}
