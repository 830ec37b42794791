//! A training session as the CLI runs it: start fresh, from `--init` weights or `--resume`
//! a checkpoint; train with evaluation points; stop cleanly on request; write the checkpoint
//! atomically at the end or at the interruption point — never after a divergence.

use crate::backend::{Backend, StepStats};
use crate::data::Dataset;
use crate::device::{self, DeviceChoice, Precision};
use crate::model::checkpoint::{Checkpoint, HistoryPoint, StoredPrecision, TrainProgress, TrainedOn};
use crate::model::{ConfigError, ModelConfig, ModelParams, TrainConfig};
use crate::train::{self, Event, Outcome, Schedule};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Where the starting weights come from.
#[derive(Clone, Debug)]
pub enum Start {
    /// N(0,1) weights from the seed.
    Fresh,
    /// Weights and statistics of a checkpoint, training afresh from step 0 with this config.
    Init(PathBuf),
    /// Everything of a checkpoint, continuing its run (its configuration wins).
    Resume(Resumed),
}

/// A checkpoint to continue, read once: the caller may look at it first (its dataset and
/// arithmetic decide what to load), and the session starts from the same copy.
#[derive(Clone, Debug)]
pub struct Resumed {
    /// Where it was read from (named in messages).
    pub path: PathBuf,
    pub checkpoint: Box<Checkpoint>,
}

impl Resumed {
    /// Reads the checkpoint at `path`.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let checkpoint = Box::new(Checkpoint::load(&path)?);
        Ok(Resumed { path, checkpoint })
    }
}

/// What to train and where.
#[derive(Clone, Debug)]
pub struct TrainRequest {
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// Total steps of the run (a resumed run continues up to this step).
    pub steps: u64,
    pub eval_every: u64,
    pub start: Start,
    pub checkpoint: Option<PathBuf>,
    /// Where to save when interrupted and `checkpoint` is None (where a file is there by then,
    /// under the first free name after it: [`unused_name`]).
    pub interrupt_checkpoint: Option<PathBuf>,
    pub device: DeviceChoice,
    /// The arithmetic of a fresh run; a resumed run keeps its checkpoint's.
    pub precision: Precision,
}

/// How a session went.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub device: String,
    pub start_step: u64,
    pub outcome: Outcome,
    pub seconds: f64,
    pub history: Vec<HistoryPoint>,
    pub checkpoint: Option<PathBuf>,
    /// The network trained: a resumed checkpoint's, whatever the request said.
    pub model: ModelConfig,
    /// Where the device's time went ([`Backend::timeline`]), where the backend recorded it.
    pub timeline: Option<Vec<crate::backend::TimelineSpan>>,
}

impl TrainReport {
    pub fn last(&self) -> Option<&HistoryPoint> {
        self.history.last()
    }
}

/// `train`'s evaluation interval when `--eval-every` is not given.
pub const DEFAULT_EVAL_EVERY: u64 = 50;

/// The command line that continues a run saved in `checkpoint` to `steps`, on the device it
/// ran on (a CPU run resumed on a GPU host's default would go on in other arithmetic), with
/// `--data` where `data` names the directory its data came from, and the run's evaluation
/// interval where it is not the default (the checkpoint does not hold it, and the resumed
/// history should have the points an unbroken run has).
pub fn resume_command(device: DeviceChoice, checkpoint: &Path, steps: u64, eval_every: u64, data: Option<&Path>) -> String {
    let data = data.map_or_else(String::new, |dir| format!(" --data {}", shell_word(dir)));
    let every = if eval_every == DEFAULT_EVAL_EVERY { String::new() } else { format!(" --eval-every {eval_every}") };
    format!("bntrain --device {} train --resume {} --steps {steps}{data}{every}", device.name(), shell_word(checkpoint))
}

/// `path` as one word of a shell command a user can paste: as it is where it needs no
/// quoting, else in single quotes (a quote inside written `'\''`); a path that is not UTF-8
/// in bash's `$'…'`, its other bytes as `\xHH`.
pub fn shell_word(path: &Path) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        if std::str::from_utf8(bytes).is_err() {
            let mut word = String::from("$'");
            for &b in bytes {
                match b {
                    b'\'' | b'\\' => word.extend(['\\', b as char]),
                    b' '..=b'~' => word.push(b as char),
                    _ => word.push_str(&format!("\\x{b:02x}")),
                }
            }
            word.push('\'');
            return word;
        }
    }
    let text = path.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// `path`, or where a file is there (another run's state), the first of `stem-1.ext`,
/// `stem-2.ext`, … that is free.
pub fn unused_name(path: &Path) -> PathBuf {
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let extension = path.extension().map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    std::iter::once(path.to_path_buf())
        .chain((1u32..).map(|n| path.with_file_name(format!("{stem}-{n}{extension}"))))
        // A link counts as there, dangling or not (another user's, in /tmp).
        .find(|candidate| std::fs::symlink_metadata(candidate).is_err())
        .unwrap_or_else(|| path.to_path_buf())
}

/// Fails now, rather than after an hour of training, if `path` cannot be written: its
/// directory (that of the file it leads to, where it is a link) refuses files, or `path` is
/// a directory, a device or a pipe.
pub fn check_writable(path: &Path) -> Result<()> {
    let cannot = |e| Error::io(format!("cannot write {}", path.display()), e);
    crate::atomic_file::refuse_non_regular(path).map_err(cannot)?;
    let target = crate::atomic_file::link_target(path).map_err(cannot)?;
    let written = target.as_deref().unwrap_or(path);
    let dir = written.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let probe = dir.join(format!(".bntrain-write-test-{}", std::process::id()));
    // Never left behind by a second Ctrl-C between the write and the removal.
    let _whole = crate::interrupt::Critical::enter();
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| match e.kind() {
            // /proc answers "no such file" for a directory that is there but makes no files.
            std::io::ErrorKind::NotFound if dir.is_dir() => std::io::Error::other("the directory exists but takes no new files"),
            _ => e,
        })
        .map_err(|e| Error::io(format!("cannot write to {} (for {})", dir.display(), path.display()), e))
}

/// Where a session starts from: the configuration it trains with and the state it loads.
struct StartingPoint {
    model: ModelConfig,
    train: TrainConfig,
    params: ModelParams,
    velocity: Vec<Vec<f64>>,
    progress: TrainProgress,
    precision: Precision,
}

/// Resolves the request against a checkpoint when resuming or initializing from one.
fn starting_point(req: &TrainRequest, data: &Dataset) -> Result<StartingPoint> {
    let (data_kind, data_features, data_source) = (data.kind, data.train.features, &data.source);
    match &req.start {
        Start::Fresh => {
            let params = ModelParams::init(&req.model, req.train.seed, req.train.estimators().len());
            Ok(StartingPoint { model: req.model.clone(), train: req.train.clone(), params, velocity: Vec::new(), progress: TrainProgress::default(), precision: req.precision })
        }
        Start::Init(path) => {
            let ckpt = Checkpoint::load(path)?;
            ckpt.check_model(&req.model)?;
            let mut params = ckpt.params;
            // Keep the primary running statistics; start any further estimators fresh.
            let wanted = req.train.estimators().len();
            for layer in &mut params.layers {
                if let Some(bn) = &mut layer.batch_norm {
                    bn.running.truncate(1);
                    bn.running.resize(wanted, crate::model::RunningStats::initial(layer.outputs));
                }
            }
            Ok(StartingPoint { model: req.model.clone(), train: req.train.clone(), params, velocity: Vec::new(), progress: TrainProgress::default(), precision: req.precision })
        }
        Start::Resume(Resumed { path, checkpoint }) => {
            let ckpt = Checkpoint::clone(checkpoint);
            if ckpt.progress.step >= req.steps {
                return Err(ConfigError::Invalid(format!(
                    "{} is at step {}, as far as the requested --steps {} or past it; ask for more steps to continue",
                    path.display(), ckpt.progress.step, req.steps
                )).into());
            }
            // Checkpoints from before `trained_on` was recorded: whatever data the caller loaded,
            // and the request's arithmetic (an f64 file stays f64).
            if let Some(TrainedOn { dataset, .. }) = ckpt.trained_on.filter(|t| t.dataset != data_kind) {
                return Err(ConfigError::Mismatch(format!("{} was trained on {dataset}, the data loaded is {data_kind}", path.display())).into());
            }
            // The data directory is not recorded: other images than the loaded ones mean the
            // run had its own --data.
            if ckpt.model.inputs != data_features {
                return Err(ConfigError::Mismatch(format!(
                    "{} takes images of {} pixels, the data loaded ({}) has {}: give the --data it was trained on",
                    path.display(), ckpt.model.inputs, data_source.display(), data_features
                )).into());
            }
            let precision = match ckpt.recorded_precision() {
                Some(Precision::F64) if req.device != DeviceChoice::Cpu => {
                    return Err(ConfigError::Invalid(format!(
                        "{} was trained in f64, which only the CPU computes: resume it with --device cpu", path.display()
                    )).into());
                }
                recorded => recorded.unwrap_or(req.precision),
            };
            Ok(StartingPoint { model: ckpt.model, train: ckpt.train, params: ckpt.params, velocity: ckpt.velocity, progress: ckpt.progress, precision })
        }
    }
}

/// Writes the state of `net` as a checkpoint.
pub fn save_checkpoint(
    net: &mut dyn Backend, model: &ModelConfig, train: &TrainConfig, progress: TrainProgress,
    trained_on: TrainedOn, path: &Path, follow_links: bool,
) -> Result<()> {
    let ckpt = Checkpoint {
        model: model.clone(),
        train: train.clone(),
        params: net.params()?,
        velocity: net.velocity()?,
        progress,
        precision: match trained_on.precision {
            // Reduced-precision GEMMs keep f32 master weights.
            Precision::F32 | Precision::Tf32 | Precision::Bf16 => StoredPrecision::F32,
            Precision::F64 => StoredPrecision::F64,
        },
        trained_on: Some(trained_on),
    };
    Ok(if follow_links { ckpt.save_through_links(path) } else { ckpt.save(path) }?)
}

/// What a session's evaluation points hold beside a batch: a chunk of the test split.
fn evaluated(data: &Dataset) -> device::HeldRows {
    device::HeldRows { evaluated: crate::cpu::EVAL_CHUNK.min(data.test.count), exact: 0 }
}

/// Runs a training session. `on_event` sees every step and evaluation (for progress bars).
pub fn run(
    req: &TrainRequest, data: Arc<Dataset>, stop: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<TrainReport> {
    if let Some(path) = &req.checkpoint {
        check_writable(path)?;
    }
    // Before the parameters are made (a resumed checkpoint's network: once it is read).
    let resumed = matches!(req.start, Start::Resume(_));
    if !resumed {
        req.model.validate()?;
        crate::device::check_host_memory(&req.model, crate::device::Networks::One, req.train.batch_size, evaluated(&data), req.device, req.precision)?;
    }
    let StartingPoint { model, train: train_cfg, params, velocity, progress, precision } = starting_point(req, &data)?;
    model.validate()?;
    if resumed {
        crate::device::check_host_memory(&model, crate::device::Networks::One, train_cfg.batch_size, evaluated(&data), req.device, precision)?;
    }
    let trained_on = TrainedOn { precision, dataset: data.kind };
    train_cfg.validate(&model, data.train.count)?;
    if req.eval_every == 0 {
        return Err(ConfigError::Invalid("--eval-every must be at least 1".into()).into());
    }
    if req.steps == 0 {
        return Err(ConfigError::Invalid("--steps must be at least 1".into()).into());
    }
    if req.steps > crate::model::config::MAX_STEPS {
        return Err(ConfigError::Invalid(format!("--steps must be at most {}", crate::model::config::MAX_STEPS)).into());
    }
    let mut net = device::open(req.device, precision, model.clone(), train_cfg.clone(), Arc::clone(&data), &params)?;
    if !velocity.is_empty() {
        net.set_velocity(&velocity)?;
    }
    let start_step = progress.step;
    let mut history = progress.history.clone();
    let schedule = Schedule {
        carried: vec![progress.pending],
        ..Schedule::new(req.steps, req.eval_every)
    };
    let started = Instant::now();
    let outcome = {
        let mut nets: [&mut dyn Backend; 1] = [net.as_mut()];
        let mut record = |event: Event<'_>| {
            if let Event::Evaluated { record, .. } = &event {
                history.push(record.point.clone());
            }
            on_event(event);
        };
        train::train_lockstep(&mut nets, &train_cfg, data.train.count, start_step, &schedule, stop, &mut record)?
    };
    net.synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    // After training: the name says how the steps ran, a fall-back on the way included.
    let device_name = net.device_name();

    let pending = match &outcome {
        Outcome::Interrupted { pending, .. } => pending.first().copied().unwrap_or_default(),
        Outcome::Finished { .. } => StepStats::default(),
    };
    let final_progress = TrainProgress { step: outcome.step(), history: history.clone(), pending };
    let checkpoint = match outcome {
        // Interrupted before its first step, a run has nothing new to keep.
        Outcome::Interrupted { step, .. } if step == start_step => None,
        // Chosen now, not at start-up: another run may have saved there meanwhile.
        Outcome::Interrupted { .. } => req.checkpoint.clone().or_else(|| req.interrupt_checkpoint.as_deref().map(unused_name)),
        Outcome::Finished { .. } => req.checkpoint.clone(),
    };
    // A run interrupted between evaluation points has not had its last steps checked: one
    // that diverged there says so, as at a point, and saves nothing (an earlier good file
    // stays whole).
    if let (Some(_), Outcome::Interrupted { step, .. }) = (&checkpoint, &outcome) {
        if let Some(what) = train::divergence(&pending, net.first_non_finite()?) {
            return Err(Error::Diverged { step: *step, what: format!("{what} at the interrupt, so nothing was saved") });
        }
    }
    // The user's path is written through a link (`--resume link` updates the file it leads
    // to); the names bntrain picks, in the working or the temporary directory, are not: a
    // link planted there must not steer the write.
    let follow_links = req.checkpoint.is_some();
    if let Some(path) = &checkpoint {
        if let Err(failed) = save_checkpoint(net.as_mut(), &model, &train_cfg, final_progress.clone(), trained_on, path, follow_links) {
            // The trained state is not lost with the file it was meant for (a full disk, a
            // directory removed meanwhile): it goes to the temporary directory instead.
            // Not over an earlier rescue: in a container every run may have the same pid.
            let rescue = unused_name(&std::env::temp_dir().join(format!("bntrain-rescued-{}.safetensors", std::process::id())));
            let step = final_progress.step;
            return Err(match save_checkpoint(net.as_mut(), &model, &train_cfg, final_progress, trained_on, &rescue, false) {
                Ok(()) => {
                    let next = match outcome {
                        Outcome::Interrupted { .. } => format!("continue with `{}`", resume_command(req.device, &rescue, req.steps, req.eval_every, Some(data.source.as_path()).filter(|dir| !dir.as_os_str().is_empty()))),
                        Outcome::Finished { .. } => format!(
                            "evaluate it with `bntrain eval --checkpoint {}`, or train on with `--resume {} --steps` beyond {step}",
                            shell_word(&rescue), shell_word(&rescue)
                        ),
                    };
                    Error::Rescued { failed: Box::new(failed), rescue, next }
                }
                Err(_) => failed,
            });
        }
    }
    // Last: a diagnostic whose failure (an event's) must not cost the checkpoint above.
    let timeline = net.timeline()?;
    Ok(TrainReport { device: device_name, model, start_step, outcome, seconds, history, checkpoint, timeline })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name bntrain picks skips a link, dangling or not (in /tmp, another user's); the
    /// user's own checkpoint path is checked where a link leads, not where the link lies.
    #[cfg(unix)]
    #[test]
    fn links_are_taken_names_and_checked_where_they_lead() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = dir.path().join("state.safetensors");
        std::os::unix::fs::symlink(dir.path().join("nowhere/x"), &wanted).unwrap();
        assert_eq!(unused_name(&wanted), dir.path().join("state-1.safetensors"));
        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"").unwrap();
        let link = dir.path().join("link.safetensors");
        std::os::unix::fs::symlink(blocker.join("ckpt.safetensors"), &link).unwrap();
        let err = check_writable(&link).unwrap_err().to_string();
        assert!(err.contains("cannot write to") && err.contains("a-file"), "{err}");
        assert!(check_writable(&dir.path().join("plain.safetensors")).is_ok());
    }

    #[test]
    fn a_shell_word_pastes_back_as_the_same_path() {
        assert_eq!(shell_word(Path::new("runs/a-1.safetensors")), "runs/a-1.safetensors");
        assert_eq!(shell_word(Path::new("my run.st")), "'my run.st'");
        assert_eq!(shell_word(Path::new("it's.st")), r"'it'\''s.st'");
        assert_eq!(shell_word(Path::new("")), "''");
        // Through a real shell, where there is one.
        let tricky = "a b'c$d\"e`f*.st";
        if let Ok(out) = std::process::Command::new("sh").arg("-c").arg(format!("printf %s {}", shell_word(Path::new(tricky)))).output() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), tricky);
        }
        // Bytes that are not UTF-8, in bash's $'…' (printf's own escapes kept out of the way).
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let raw = b"ck\xff it's \\ %s\x01.st";
            let word = shell_word(Path::new(std::ffi::OsStr::from_bytes(raw)));
            assert_eq!(word, r"$'ck\xff it\'s \\ %s\x01.st'");
            if let Ok(out) = std::process::Command::new("bash").arg("-c").arg(format!("printf %s \"$(printf '%s' {word})\" | od -An -tx1")).output() {
                let hex: String = raw.iter().map(|b| format!(" {b:02x}")).collect();
                assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), hex.split_whitespace().collect::<Vec<_>>());
            }
        }
    }
}
