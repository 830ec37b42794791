//! The `bntrain` command line: parse, call the library, print. Progress goes to stderr;
//! with `--json` the last line of stdout is one JSON object.

use anyhow::{bail, Context, Result};
use bntrain::backend::{SplitKind, StatsMode};
use bntrain::bench::{self, BenchConfig};
use bntrain::cpu::{self, InputPath};
use bntrain::data::{self, Dataset, DatasetKind};
use bntrain::device::{self, DeviceChoice, Precision};
use bntrain::model::checkpoint::Checkpoint;
use bntrain::model::{
    Activation, Averaging, BatchOrder, LossReduction, ModelConfig, StatsEstimator, TrainConfig, VarianceKind,
};
use bntrain::report::{self, ReproduceOptions};
use bntrain::session::{self, Resumed, Start, TrainRequest};
use bntrain::train::{Event, Outcome};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Batch-normalized MLP trainer for NVIDIA GPUs, with a CPU reference. Reproduces
/// Ioffe & Szegedy 2015, Figure 1, on MNIST.
#[derive(Parser, Debug)]
#[command(name = "bntrain", version, about, propagate_version = true)]
struct Cli {
    /// Where to compute: cpu, cuda (or gpu), or auto (CUDA when usable, else the CPU with a
    /// notice).
    #[arg(long, global = true, default_value = "auto", value_parser = parse_device)]
    device: DeviceChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a network, evaluating on the test set as it goes.
    Train(TrainArgs),
    /// Evaluate a checkpoint on a split, with population statistics.
    Eval(EvalArgs),
    /// Predict the first N test images one at a time (the seed's demonstration).
    Predict(PredictArgs),
    /// Run the whole BN study (Figure 1, the test-time story, estimators) and write a report.
    Reproduce(ReproduceArgs),
    /// Microseconds per training step (median of several timed runs after warm-up).
    ///
    /// On CUDA, BNTRAIN_CUDA_STEP picks how a step runs: auto (the default: fused for networks
    /// of the seed's scale, else graph), fused (whole steps in one kernel), graph (the step
    /// captured into a CUDA graph and replayed) or eager (its operations one by one). The
    /// device shown says which ran. BNTRAIN_FUSED_STAGE=1 runs the fused kernel with layer
    /// inputs and weight rows staged in shared memory; BNTRAIN_FUSED_PAIR=0 runs --pair's two
    /// networks in two fused launches instead of one; BNTRAIN_FUSED_THREADS=256 or 1024 sets
    /// the fused kernel's block size (512 by default; BNTRAIN_FUSED_512_KERNEL=0 runs blocks of
    /// 512 on the kernel bounded by blocks of 1024, 64 registers a thread); BNTRAIN_FUSED_CLUSTER=1 (or 8, 16) runs
    /// fused steps in one thread-block cluster per network (compute capability 9.0 and
    /// newer); BNTRAIN_FUSED_REPLICATED=1 (or 256, 512: the block size) runs fused steps with
    /// one grid barrier a step, the layers above the first computed whole in every block
    /// (BNTRAIN_FUSED_REPLICATED_GRID=N: on at most N blocks); BNTRAIN_GEMM_TUNE=1 times
    /// cuBLAS's and cublasLt's algorithms for each large GEMM shape and keeps the fastest,
    /// listed after the result; BNTRAIN_BACKWARD_STREAMS=1
    /// or 0 puts graph and eager steps' weight gradients on a second stream or not (by
    /// default with f32 GEMMs only). The defaults are the faster choices measured on an H100
    /// (docs/perf.md).
    Bench(BenchArgs),
    /// Manage datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Build facts (kernels, PTX target) and device facts.
    Info,
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Download MNIST into the cache and verify its SHA-256 checksums.
    Fetch {
        /// Which dataset: mnist, or fashion-mnist (not downloaded: said where it is read from,
        /// or how to install it).
        #[arg(long, default_value = "mnist", value_parser = parse_dataset)]
        dataset: DatasetKind,
        /// Directory to download into (default: the cache).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Show where the data is read from (an error naming the places searched where it is
    /// nowhere yet).
    Where {
        #[command(flatten)]
        data: DataArgs,
    },
}

#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// Directory holding the four IDX files (raw or .gz). Default: $BNTRAIN_DATA, then the
    /// cache (train, eval, predict and reproduce download MNIST there on first use).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Which dataset: mnist or fashion-mnist [default: mnist; for eval, predict and
    /// train --resume, the checkpoint's own].
    #[arg(long, value_parser = parse_dataset)]
    dataset: Option<DatasetKind>,
}

impl DataArgs {
    /// The dataset asked for, else `recorded` (the one a checkpoint was trained on), else MNIST.
    fn kind(&self, recorded: Option<DatasetKind>) -> DatasetKind {
        self.dataset.or(recorded).unwrap_or(DatasetKind::Mnist)
    }
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Hidden layer widths, comma-separated (the seed's 100,100; BN2015 uses 100,100,100).
    #[arg(long, value_delimiter = ',', default_value = "100,100")]
    hidden: Vec<usize>,
    /// The hidden layers' activation.
    #[arg(long, value_enum, default_value_t = ActivationArg::Sigmoid)]
    activation: ActivationArg,
    /// Train the plain network (a bias instead of batch normalization).
    #[arg(long)]
    no_bn: bool,
    /// BN's ε, added to the variance.
    #[arg(long, default_value_t = 1e-3)]
    epsilon: f64,
}

#[derive(Args, Debug, Clone)]
struct OptimArgs {
    /// Learning rate of SGD.
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// Classical momentum (0 = plain SGD, the seed's).
    #[arg(long, default_value_t = 0.0)]
    momentum: f64,
    /// Examples per batch.
    #[arg(long, default_value_t = 60)]
    batch: usize,
    /// Cross-entropy summed over the batch (the seed's) or averaged.
    #[arg(long, value_enum, default_value_t = LossArg::Sum)]
    loss: LossArg,
    /// Batch order: a fresh shuffle every epoch (from --seed), or the files' order.
    #[arg(long, value_enum, default_value_t = OrderArg::Shuffled)]
    order: OrderArg,
    /// Seeds the initial weights and the epoch shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Running statistics: exponential moving average or cumulative average.
    #[arg(long, value_enum, default_value_t = AveragingArg::Ema)]
    averaging: AveragingArg,
    /// EMA decay (PyTorch momentum = 1 − decay).
    #[arg(long, default_value_t = 0.999)]
    decay: f64,
    /// Variance fed to the running variance: biased (the seed's) or unbiased m/(m−1).
    #[arg(long, value_enum, default_value_t = VarianceArg::Biased)]
    variance: VarianceArg,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    optim: OptimArgs,
    /// Total training steps.
    #[arg(long, default_value_t = 10_000, value_parser = parse_steps)]
    steps: u64,
    /// Evaluate on the test set every this many steps.
    #[arg(long, default_value_t = session::DEFAULT_EVAL_EVERY, value_parser = parse_eval_every)]
    eval_every: u64,
    /// Write a checkpoint here at the end and on Ctrl-C (without it, Ctrl-C saves to
    /// bntrain-interrupted.safetensors).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Start from the weights and statistics of this checkpoint.
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Continue the run saved in this checkpoint (its network and training settings are
    /// used; those given here as well are not, with a notice).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Arithmetic: f32; f64 (CPU only); tf32 or bf16 GEMM operands with f32 accumulation,
    /// master weights and BN statistics (tensor cores on CUDA, emulated on the CPU).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    precision: Precision,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// `train`'s resumable settings given on the command line (argument ids): a resumed
    /// run names those its checkpoint overrides.
    #[arg(skip)]
    given: Vec<&'static str>,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    data: DataArgs,
    /// The checkpoint to evaluate.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Which split to evaluate on.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    split: SplitArg,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PredictArgs {
    #[command(flatten)]
    data: DataArgs,
    /// The checkpoint to predict with.
    #[arg(long)]
    checkpoint: PathBuf,
    /// How many test images, from the first.
    #[arg(long, default_value_t = 100, value_parser = parse_first)]
    first: usize,
    /// Normalize with population statistics, or with each single example's own statistics.
    #[arg(long, value_enum, default_value_t = ModeArg::Population)]
    mode: ModeArg,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReproduceArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Name of the run: results go to <out>/<name>/.
    #[arg(long, default_value = "bn2015")]
    name: String,
    /// Parent directory of the run directories.
    #[arg(long, default_value = "runs")]
    out: PathBuf,
    /// A small, fast run (for tests and a first look).
    #[arg(long)]
    quick: bool,
    /// Steps of the BN-vs-plain comparison [default: 40000; 1000 with --quick].
    #[arg(long, value_parser = parse_steps)]
    steps: Option<u64>,
    /// Seeds the initial weights and batch order of the study's networks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seeds for the population-statistics estimator study [default: 1; 2 with --quick].
    #[arg(long, value_parser = parse_seeds)]
    seeds: Option<u32>,
    /// Hidden layer widths, comma-separated (the seed's 100,100; BN2015 uses 100,100,100).
    #[arg(long, value_delimiter = ',', default_value = "100,100")]
    hidden: Vec<usize>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// seed (784-100-100-10, batch 60) or wide (784-1024-1024-10, batch 1024).
    #[arg(long, default_value = "seed", value_parser = parse_bench_config)]
    config: BenchConfig,
    /// Benchmark the plain network instead of the BN one.
    #[arg(long, conflicts_with = "pair")]
    no_bn: bool,
    /// Benchmark the BN and the plain network side by side, in lockstep on the same batches
    /// (as `reproduce`'s comparison trains them): µs per step of both together.
    #[arg(long)]
    pair: bool,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 7, value_parser = parse_runs)]
    runs: usize,
    /// Approximate seconds per timed run.
    #[arg(long, default_value_t = 0.3, value_parser = parse_seconds)]
    seconds: f64,
    /// f32, f64 (CPU), tf32 or bf16 (GEMM operands; emulated, so slower, on the CPU).
    #[arg(long, default_value = "f32", value_parser = parse_precision)]
    precision: Precision,
    /// Train on uniform random pixels instead of the dataset's first twelve batches (the CPU
    /// step's cost depends on how many pixels are zero: MNIST's are 81%).
    #[arg(long)]
    noise: bool,
    /// Cycle through every batch of the training split (one epoch, its order reused), as
    /// training streams them, instead of the first twelve: twelve MNIST batches stay in a
    /// GPU's L2 between steps, the whole set may not.
    #[arg(long, conflicts_with = "noise")]
    all_batches: bool,
    /// How the CPU backend's first layer reads pixels: auto (sparse when at most 40% are
    /// non-zero, and the CPU has AVX2 and FMA), dense (GEMM) or sparse (only the non-zero
    /// pixels).
    #[arg(long, value_enum, default_value_t = CpuInputArg::Auto)]
    cpu_input: CpuInputArg,
    /// Then time one launch of fused CUDA steps phase by phase (the work between the fused
    /// kernel's grid barriers, from clocks the kernel records): a table of where a step's
    /// time goes.
    #[arg(long)]
    trace: bool,
    /// Then time each network's evaluation points as `reproduce`'s comparison makes them
    /// (the whole test split with batch statistics, five units probed), one at a time: µs a
    /// point, the median of 21.
    #[arg(long)]
    points: bool,
    #[command(flatten)]
    data: DataArgs,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CpuInputArg { Auto, Dense, Sparse }
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ActivationArg { Sigmoid, Relu }
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LossArg { Sum, Mean }
#[derive(Clone, Copy, Debug, ValueEnum)]
enum OrderArg { Shuffled, Sequential }
#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum AveragingArg { Ema, Cumulative }
#[derive(Clone, Copy, Debug, ValueEnum)]
enum VarianceArg { Biased, Unbiased }
#[derive(Clone, Copy, Debug, ValueEnum)]
enum SplitArg { Train, Test }
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg { Population, Batch }

/// Where an interrupted `train` without `--checkpoint` saves its state.
const INTERRUPT_CHECKPOINT: &str = "bntrain-interrupted.safetensors";

/// [`INTERRUPT_CHECKPOINT`] in the working directory, or in the temporary directory where
/// the working directory takes no files (the session saves under `-1`, `-2`, … where an
/// earlier run's is in the way: [`session::unused_name`]).
fn interrupt_checkpoint_path() -> PathBuf {
    let writable = |dir: &Path| session::check_writable(&dir.join(INTERRUPT_CHECKPOINT)).is_ok();
    let dir = [PathBuf::new(), std::env::temp_dir()].into_iter().find(|dir| writable(dir)).unwrap_or_default();
    dir.join(INTERRUPT_CHECKPOINT)
}

fn parse_device(s: &str) -> Result<DeviceChoice, String> { s.parse() }
fn parse_precision(s: &str) -> Result<Precision, String> { s.parse() }
fn parse_bench_config(s: &str) -> Result<BenchConfig, String> { s.parse() }
fn parse_dataset(s: &str) -> Result<DatasetKind, String> { s.parse().map_err(|e: data::DataError| e.to_string()) }
/// A count of at least one; `what` says what zero would have asked for.
fn at_least_one(s: &str, what: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err(format!("at least one {what}")),
        Ok(count) => Ok(count),
        Err(e) => Err(e.to_string()),
    }
}
fn parse_runs(s: &str) -> Result<usize, String> {
    at_least_one(s, "timed run").and_then(|n| if n <= 1000 { Ok(n) } else { Err("at most 1000 timed runs".into()) })
}
fn parse_first(s: &str) -> Result<usize, String> { at_least_one(s, "test image") }
fn parse_seeds(s: &str) -> Result<u32, String> {
    at_least_one(s, "seed").and_then(|n| u32::try_from(n).map_err(|_| format!("at most {} seeds", u32::MAX)))
}
fn parse_steps(s: &str) -> Result<u64, String> {
    let steps = at_least_one(s, "step")? as u64;
    if steps > bntrain::model::config::MAX_STEPS {
        return Err(format!("at most {} steps", bntrain::model::config::MAX_STEPS));
    }
    Ok(steps)
}
fn parse_eval_every(s: &str) -> Result<u64, String> { at_least_one(s, "step between evaluations").map(|n| n as u64) }
fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds <= 60.0 => Ok(seconds),
        Ok(_) => Err("a positive number of seconds, at most 60 (a run's length; --runs sets how many)".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl ModelArgs {
    fn config(&self, inputs: usize, classes: usize) -> ModelConfig {
        ModelConfig {
            inputs,
            hidden: self.hidden.clone(),
            classes,
            activation: match self.activation {
                ActivationArg::Sigmoid => Activation::Sigmoid,
                ActivationArg::Relu => Activation::Relu,
            },
            batch_norm: !self.no_bn,
            epsilon: self.epsilon,
        }
    }
}

impl OptimArgs {
    fn config(&self) -> TrainConfig {
        TrainConfig {
            learning_rate: self.lr,
            momentum: self.momentum,
            batch_size: self.batch,
            loss: match self.loss { LossArg::Sum => LossReduction::Sum, LossArg::Mean => LossReduction::Mean },
            order: match self.order { OrderArg::Shuffled => BatchOrder::Shuffled, OrderArg::Sequential => BatchOrder::Sequential },
            seed: self.seed,
            estimator: StatsEstimator {
                averaging: match self.averaging {
                    AveragingArg::Ema => Averaging::Ema { decay: self.decay },
                    AveragingArg::Cumulative => Averaging::Cumulative,
                },
                variance: match self.variance { VarianceArg::Biased => VarianceKind::Biased, VarianceArg::Unbiased => VarianceKind::Unbiased },
            },
            extra_estimators: Vec::new(),
        }
    }
}

/// `eprintln!` that cannot panic: a full or closed stderr (`2>/dev/full`) must not turn a
/// notice, or the error line itself, into a panic that loses the `--json` error object.
macro_rules! note {
    ($($arg:tt)*) => {{ let _ = writeln!(std::io::stderr(), $($arg)*); }};
}

/// `println!` for the command's output: a closed stdout (`bntrain info | head -1`) ends the
/// command quietly, as it ends other tools, and one that fails otherwise (a full disk) ends
/// it with one line, instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => { print_line(format_args!($($arg)*)) };
}

fn print_line(line: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(line).and_then(|()| stdout.write_all(b"\n")).and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            note!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// `train`'s settings that a resumed checkpoint brings with it (argument ids).
const RESUMED_SETTINGS: [&str; 15] = [
    "hidden", "activation", "no_bn", "epsilon", "lr", "momentum", "batch", "loss", "order", "seed", "averaging", "decay", "variance",
    "precision", "dataset",
];

fn main() {
    let command = negative_numbers_reach_their_checks(<Cli as clap::CommandFactory>::command());
    let matches = command.try_get_matches().unwrap_or_else(|e| refuse_command_line(e));
    let mut cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| refuse_command_line(e));
    if let (Some(("train", train)), Command::Train(args)) = (matches.subcommand(), &mut cli.command) {
        args.given = RESUMED_SETTINGS.into_iter().filter(|id| train.value_source(id) == Some(clap::parser::ValueSource::CommandLine)).collect();
        if train.value_source("decay") == Some(clap::parser::ValueSource::CommandLine)
            && train.get_one::<AveragingArg>("averaging") == Some(&AveragingArg::Cumulative)
        {
            note!("notice: --decay sets the exponential moving average (--averaging ema); not used with --averaging cumulative");
        }
    }
    // With --json, the last line of stdout is a JSON object whatever happens: on failure,
    // {"error": …}.
    let json = matches.subcommand().is_some_and(|(_, sub)| sub.try_get_one::<bool>("json").ok().flatten() == Some(&true));
    if let Err(err) = run(cli) {
        let message = one_line(&err);
        note!("error: {message}");
        if json {
            out!("{}", json!({ "error": message }));
        }
        std::process::exit(1);
    }
}

/// Every option that takes a value takes a negative number as its value, so that
/// `--seed -1` or `--lr -1` meets that option's own check instead of being read as an
/// unknown flag `-1`.
fn negative_numbers_reach_their_checks(command: clap::Command) -> clap::Command {
    command
        .mut_args(|arg| if arg.get_action().takes_values() { arg.allow_negative_numbers(true) } else { arg })
        .mut_subcommands(negative_numbers_reach_their_checks)
}

/// A command line clap cannot take: its message and exit status (2), and with `--json`
/// the `{"error": …}` line every failure ends with. Help and version print as usual.
fn refuse_command_line(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
        // As out! ends a command: a closed stdout quietly, a full one with one line.
        match e.print() {
            Err(why) if why.kind() != std::io::ErrorKind::BrokenPipe => {
                note!("error: cannot write the output: {why}");
                std::process::exit(1);
            }
            _ => std::process::exit(e.exit_code()),
        }
    }
    // The message is the paragraph before the usage and tips: one line, or a list (the
    // missing arguments) joined onto it, so that the error is one line like every other.
    let rendered = e.to_string();
    let lines: Vec<&str> = rendered.lines().collect();
    let paragraph = lines.iter().position(|line| line.trim().is_empty()).unwrap_or(lines.len());
    let message = lines[..paragraph].iter().map(|line| line.trim()).collect::<Vec<_>>().join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    note!("error: {message}");
    for line in &lines[paragraph..] {
        note!("{line}");
    }
    if std::env::args_os().any(|arg| arg == "--json") {
        out!("{}", json!({ "error": message }));
    }
    std::process::exit(e.exit_code());
}

/// The error and its causes on one line, joined as anyhow's `{:#}` joins them, without a
/// cause that the message before it already ends with (typed errors name their source in
/// their own message: "cannot read checkpoint x: No such file or directory").
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn run(cli: Cli) -> Result<()> {
    // Only where a command may multiply matrices on the CPU: `data` and `info` never do.
    if !matches!(cli.command, Command::Data { .. } | Command::Info) {
        check_gemm_threads_env()?;
    }
    match cli.command {
        Command::Train(args) => train(cli.device, args),
        Command::Eval(args) => eval(cli.device, args),
        Command::Predict(args) => predict(cli.device, args),
        Command::Reproduce(args) => reproduce(cli.device, args),
        Command::Bench(args) => bench_cmd(cli.device, args),
        Command::Data { command } => data_cmd(command),
        Command::Info => info(),
    }
}

/// matrixmultiply reads `MATMUL_NUM_THREADS` at the first GEMM and, where it is no number,
/// prints a warning itself (a panic on a full stderr) and takes one thread: refused here in
/// one line instead.
fn check_gemm_threads_env() -> Result<()> {
    // What matrixmultiply warns about: text that does not parse (a value that is not text
    // it reads as unset, silently).
    match std::env::var(cpu::GEMM_THREADS_ENV) {
        Ok(value) if !value.is_empty() && value.parse::<usize>().is_err() => bail!(
            "{}={value} is not a number of threads (matrixmultiply's GEMM threads): give a whole number, or unset it",
            cpu::GEMM_THREADS_ENV
        ),
        _ => Ok(()),
    }
}

/// For a training run on the CPU of a network whose hidden layers
/// [`cpu::single_threaded_gemms_suit`]: one GEMM thread, unless `MATMUL_NUM_THREADS` says
/// otherwise. The first thing a command does, while the process has no other thread that
/// could read the environment, and before its first GEMM (matrixmultiply reads the variable
/// once). `--device auto` counts as the CPU only where it certainly resolves so without a
/// call into CUDA (no driver library, or no kernels built): where the driver is there, it is
/// left to its default.
fn prefer_single_threaded_gemms(choice: DeviceChoice, hidden: &[usize]) {
    let on_cpu = match choice {
        DeviceChoice::Cpu => true,
        DeviceChoice::Auto => !bntrain::cuda::kernels_built() || !bntrain::cuda::driver_present(),
        DeviceChoice::Cuda => false,
    };
    if on_cpu && std::env::var_os(cpu::GEMM_THREADS_ENV).is_none() && cpu::single_threaded_gemms_suit(hidden) {
        std::env::set_var(cpu::GEMM_THREADS_ENV, "1");
    }
}

/// Resolves `auto`, printing the fallback notice once.
fn resolve_device(choice: DeviceChoice) -> DeviceChoice {
    let (device, notice) = device::resolve(choice);
    if let Some(notice) = notice {
        note!("notice: {notice}");
    }
    device
}

fn load_data(args: &DataArgs, kind: DatasetKind) -> Result<Arc<Dataset>> {
    let dir = data::locate(args.data.as_deref(), kind, true).context("cannot find the dataset")?;
    let dataset = data::load_dir(&dir, kind).with_context(|| format!("cannot load {kind} from {}", dir.display()))?;
    Ok(Arc::new(dataset))
}

/// Ctrl-C / SIGTERM: the first asks training to stop once the steps under way are done (`train`
/// writes a checkpoint, `reproduce` keeps its partial outputs), the second exits at once,
/// but never in the middle of a file's write or of the move of a study's outputs, and a
/// third exits even then. Deliveries closer together than [`ONE_INTERRUPT`] are one press.
/// `timeout`, and a `kill` of a process group, deliver the same signal twice microseconds
/// apart (to the process, then to its group): that is one interrupt, not the second press
/// that exits at once. A person pressing twice is slower than this.
const ONE_INTERRUPT: std::time::Duration = std::time::Duration::from_millis(200);

/// A path as a JSON string. serde refuses a path that is not UTF-8 (and `json!` panics on the
/// refusal); its lossy form (U+FFFD for the bytes that are not text) still names the file.
fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn install_interrupt_handler() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let presses = Arc::new(AtomicUsize::new(0));
    let flag = Arc::clone(&stop);
    let mut last_press: Option<std::time::Instant> = None;
    // A message leaves the progress bar's line first; without a terminal there is none.
    let leave_bar = if std::io::stderr().is_terminal() { "\n" } else { "" };
    let handler = move || {
        let now = std::time::Instant::now();
        if last_press.is_some_and(|last| now.duration_since(last) < ONE_INTERRUPT) {
            return;
        }
        last_press = Some(now);
        let press = presses.fetch_add(1, Ordering::SeqCst);
        if press >= 2 {
            note!("{leave_bar}third interrupt: exiting now, whatever is being written");
            std::process::exit(130);
        }
        if press == 1 {
            if bntrain::interrupt::critical_work_running() {
                let _ = writeln!(
                    std::io::stderr(),
                    "{leave_bar}second interrupt: exiting once the file being written (or the outputs being moved into place) is done (press again to exit at once)"
                );
            } else {
                note!("{leave_bar}second interrupt: exiting now");
            }
            // On a thread of its own, so that this handler is free for a third press (a
            // write hung on a network file system must not take every way out).
            std::thread::spawn(|| bntrain::interrupt::exit_when_safe(130));
            return;
        }
        // note!, not eprintln!: on a closed stderr a panic here would leave no interrupt to
        // stop the run.
        note!("{leave_bar}interrupt: stopping once the steps under way are done (press again to exit at once)");
        flag.store(true, Ordering::SeqCst);
    };
    if let Err(e) = ctrlc::set_handler(handler) {
        note!("warning: cannot install the Ctrl-C handler ({e}); an interrupt will stop the run at once, saving nothing");
    }
    stop
}

fn train(device_choice: DeviceChoice, args: TrainArgs) -> Result<()> {
    // A resumed checkpoint's network may be another than the arguments say: the default then.
    if args.resume.is_none() {
        // What the data does not decide is checked before it is loaded, or downloaded.
        let model = args.model.config(0, 0);
        model.validate_layers()?;
        let settings = args.optim.config();
        settings.validate_settings(&model)?;
        if args.precision != Precision::F64 {
            settings
                .validate_in_f32(&model)
                .map_err(|e| anyhow::anyhow!("{e}, the arithmetic of every run but the CPU's --precision f64"))?;
        }
        prefer_single_threaded_gemms(device_choice, &args.model.hidden);
    }
    // Then, so that an interrupt at any point after start-up is a clean stop.
    let stop = install_interrupt_handler();
    // A resumed run goes on with the data it trained on, in its arithmetic: what was given
    // beside it is said to be unused, not silently dropped.
    let resumed = args.resume.as_deref().map(Resumed::load).transpose()?;
    if let Some(Resumed { checkpoint: ckpt, .. }) = &resumed {
        // Checkpoints from before the dataset and arithmetic were recorded take the command
        // line's (an f64 file stays f64).
        let overridden = |id: &&&str| match **id {
            "dataset" => ckpt.trained_on.is_some(),
            "precision" => ckpt.recorded_precision().is_some(),
            _ => true,
        };
        let unused: Vec<String> = args.given.iter().filter(overridden).map(|id| format!("--{}", id.replace('_', "-"))).collect();
        if !unused.is_empty() {
            note!("notice: --resume continues the checkpoint's network and training settings; not used: {}", unused.join(", "));
        }
    }
    // A resumed run saves back into the file it resumed from unless told otherwise; where it
    // cannot, that is said before the data is loaded (or downloaded).
    let checkpoint = args.checkpoint.clone().or_else(|| args.resume.clone());
    if let Some(path) = &checkpoint {
        session::check_writable(path)?;
    }
    let kind = resumed.as_ref().and_then(|r| r.checkpoint.trained_on).map_or_else(|| args.data.kind(None), |t| t.dataset);
    let data = load_data(&args.data, kind)?;
    let model = args.model.config(data.train.features, data.train.classes);
    // The step the run starts from, for its progress (a resumed run's steps are counted from 0).
    let first_step = if args.init.is_some() { 0 } else { resumed.as_ref().map_or(0, |r| r.checkpoint.progress.step) };
    // (The checkpoint read above, not read again.)
    let start = match (&args.init, resumed) {
        (Some(p), _) => Start::Init(p.clone()),
        (_, Some(resumed)) => Start::Resume(resumed),
        _ => Start::Fresh,
    };
    let req = TrainRequest {
        // Nothing is lost on Ctrl-C, even without --checkpoint.
        interrupt_checkpoint: Some(interrupt_checkpoint_path()),
        model,
        train: args.optim.config(),
        steps: args.steps,
        eval_every: args.eval_every,
        start,
        checkpoint: checkpoint.clone(),
        device: resolve_device(device_choice),
        precision: args.precision,
    };

    let bar = bntrain::progress::StepProgress::new("train", args.steps, first_step);
    let mut on_event = |event: Event<'_>| match event {
        Event::Stepped { step } => bar.set_position(step),
        Event::Evaluated { record, .. } => {
            let p = &record.point;
            bar.set_position(p.step);
            bar.set_message(format!("loss {:.4}  train acc {:.4}  test acc {:.4}", p.train_loss, p.train_accuracy, p.test_accuracy));
        }
    };
    let result = session::run(&req, Arc::clone(&data), Some(&stop), &mut on_event);
    bar.finish_and_clear();
    let report = result?;
    if let Outcome::Interrupted { step, .. } = report.outcome {
        match &report.checkpoint {
            Some(p) => {
                note!(
                    "interrupted at step {step}; checkpoint written to {}; continue with `{}`",
                    p.display(), session::resume_command(req.device, p, args.steps, args.eval_every, args.data.data.as_deref())
                );
            }
            None => note!("interrupted at step {step}, before any step of this run: nothing to save"),
        }
        if args.json {
            out!("{}", json!({ "interrupted": true, "steps": step, "checkpoint": report.checkpoint.as_deref().map(path_text) }));
        }
        std::process::exit(130);
    }
    let last = report.last().context("no evaluation point was reached")?;
    out!(
        "trained {} on {} for {} steps in {:.2} s: test accuracy {:.4}{}, test loss {:.4}",
        report.model, report.device, report.outcome.step() - report.start_step, report.seconds, last.test_accuracy,
        statistics_note(&report.model), last.test_loss
    );
    if let Some(p) = &report.checkpoint {
        out!("checkpoint: {}", p.display());
    }
    if let Some(spans) = &report.timeline {
        out!("{}", bench::timeline_table(spans).trim_end_matches('\n'));
    }
    if args.json {
        out!("{}", json!({
            "test_accuracy": last.test_accuracy,
            "test_loss": last.test_loss,
            "train_loss": last.train_loss,
            "steps": report.outcome.step(),
            "steps_this_run": report.outcome.step() - report.start_step,
            "device": report.device,
            "model": report.model.to_string(),
            "dataset": data.kind.name(),
            "seconds": report.seconds,
            "checkpoint": report.checkpoint.as_deref().map(path_text),
            "timeline": report.timeline,
        }));
    }
    Ok(())
}

/// A checkpoint, the data it is to be used on (`--dataset`, else the checkpoint's own) and a
/// backend holding it, in the arithmetic it was trained in (f64 only on the CPU).
fn open_checkpoint(
    device_choice: DeviceChoice, path: &Path, data_args: &DataArgs,
) -> Result<(Checkpoint, Arc<Dataset>, Box<dyn bntrain::backend::Backend>)> {
    let ckpt = Checkpoint::load(path)?;
    // Where the checkpoint's record picks other data than the default, a failure says why
    // that data was looked for.
    let default = data_args.kind(None);
    let data = match ckpt.trained_on.map(|t| t.dataset).filter(|&kind| data_args.dataset.is_none() && kind != default) {
        Some(kind) => load_data(data_args, kind).with_context(|| format!("{} was trained on {kind} (--dataset chooses other data)", path.display()))?,
        None => load_data(data_args, default)?,
    };
    if ckpt.model.inputs != data.train.features {
        bail!("{} expects {} input features but the dataset has {}", path.display(), ckpt.model.inputs, data.train.features);
    }
    let mut train = ckpt.train.clone();
    train.batch_size = train.batch_size.min(data.train.count);
    let device = resolve_device(device_choice);
    let precision = match ckpt.recorded_precision() {
        Some(Precision::F64) if device != DeviceChoice::Cpu => {
            note!("notice: {} was trained in f64, which only the CPU computes: evaluating it in f32 on CUDA (--device cpu: in f64)", path.display());
            Precision::F32
        }
        recorded => recorded.unwrap_or(Precision::F32),
    };
    let net = device::open(device, precision, ckpt.model.clone(), train, Arc::clone(&data), &ckpt.params)
        .with_context(|| path.display().to_string())?;
    Ok((ckpt, data, net))
}

/// How a BN network's test figures were computed; nothing for a network without BN.
fn statistics_note(model: &ModelConfig) -> &'static str {
    if model.batch_norm { " (population statistics)" } else { "" }
}

fn eval(device_choice: DeviceChoice, args: EvalArgs) -> Result<()> {
    let (ckpt, data, mut net) = open_checkpoint(device_choice, &args.checkpoint, &args.data)?;
    let (split, split_name) = match args.split { SplitArg::Train => (SplitKind::Train, "train"), SplitArg::Test => (SplitKind::Test, "test") };
    let started = std::time::Instant::now();
    let e = net.evaluate(split, StatsMode::Population, None)?;
    let seconds = started.elapsed().as_secs_f64();
    out!(
        "{} ({} steps) on the {} {split_name} set ({} examples): accuracy {:.4}, loss {:.4}{}",
        ckpt.model, ckpt.progress.step, data.kind, e.examples, e.accuracy(), e.mean_loss(), statistics_note(&ckpt.model)
    );
    if args.json {
        let mut result = json!({
            "accuracy": e.accuracy(), "loss": e.mean_loss(), "examples": e.examples, "split": split_name, "dataset": data.kind.name(),
            "steps": ckpt.progress.step, "device": net.device_name(), "seconds": seconds,
        });
        // `train --json` names the same figure so; for the training split it would mislead.
        if split == SplitKind::Test {
            result["test_accuracy"] = json!(e.accuracy());
        }
        out!("{result}");
    }
    Ok(())
}

fn predict(device_choice: DeviceChoice, args: PredictArgs) -> Result<()> {
    let (ckpt, data, mut net) = open_checkpoint(device_choice, &args.checkpoint, &args.data)?;
    let mode = match args.mode { ModeArg::Population => StatsMode::Population, ModeArg::Batch => StatsMode::Batch };
    let predictions = net.predict_each(SplitKind::Test, args.first, mode)?;
    let labels = &data.test.labels[..predictions.len()];
    let correct = predictions.iter().zip(labels).filter(|(p, l)| p == l).count();
    let accuracy = correct as f64 / predictions.len().max(1) as f64;
    let mut histogram = [0usize; 256];
    predictions.iter().for_each(|&p| histogram[p as usize] += 1);
    let spread: Vec<String> = histogram.iter().enumerate().filter(|(_, &n)| n > 0).map(|(c, n)| format!("{c}:{n}")).collect();
    let with = match (ckpt.model.batch_norm, mode) {
        (false, _) => "(no BN: no statistics to choose)",
        (true, StatsMode::Batch) => "with batch statistics",
        (true, StatsMode::Population) => "with population statistics",
    };
    out!(
        "{} predicted one by one {with}: {correct}/{} correct (accuracy {accuracy:.2}); predicted classes (class:count) {}",
        ckpt.model, predictions.len(), spread.join(" ")
    );
    if args.json {
        out!("{}", json!({
            "accuracy": accuracy, "predictions": predictions, "labels": labels,
            "mode": if mode == StatsMode::Batch { "batch" } else { "population" }, "device": net.device_name(), "dataset": data.kind.name(),
        }));
    }
    Ok(())
}

fn reproduce(device_choice: DeviceChoice, args: ReproduceArgs) -> Result<()> {
    if args.name.is_empty() || args.name.contains(['/', '\\']) || args.name == ".." || args.name == "." {
        bail!("--name `{}` must be a plain directory name", args.name);
    }
    // Another study's `<name>.partial` is where this one would build: it would be deleted.
    if args.name.ends_with(".partial") {
        bail!("--name `{}` ends with .partial, the suffix of a study's directory under construction: choose another name", args.name);
    }
    prefer_single_threaded_gemms(device_choice, &args.hidden);
    let out_dir = args.out.join(&args.name);
    let mut opts = if args.quick { ReproduceOptions::quick(&out_dir) } else { ReproduceOptions::new(&out_dir) };
    if let Some(steps) = args.steps {
        opts.steps_compare = steps;
    }
    if let Some(seeds) = args.seeds {
        opts.seeds = seeds;
    }
    opts.seed = args.seed;
    opts.hidden = args.hidden.clone();
    opts.progress = true;
    // Before the data: MNIST may have to be downloaded first.
    opts.validate()?;
    // Installed first, so that an interrupt at any point after start-up is a clean stop.
    let stop = install_interrupt_handler();
    let data = load_data(&args.data, args.data.kind(None))?;
    let device = resolve_device(device_choice);
    let study_batch = report::study::train_config(opts.seed, Vec::new()).batch_size;
    // The BN network and its plain twin, each evaluating the whole test split with its own
    // batch statistics; later, the estimator study's exact pass over the training split.
    let held = device::HeldRows { evaluated: data.test.count, exact: data.train.count };
    device::check_host_memory(&report::study::model_config(&opts, &data, true), device::Networks::WithPlainTwin, study_batch, held, device, Precision::F32)?;
    let mut open = |m, t, p: &_| device::open(device, Precision::F32, m, t, Arc::clone(&data), p);
    // An interrupted study ends here (it cannot resume): the message, the JSON line, 130.
    let stopped = |message: String, partial: Option<PathBuf>| -> ! {
        note!("{message}");
        if args.json {
            out!("{}", json!({ "interrupted": true, "partial": partial.as_deref().map(path_text) }));
        }
        std::process::exit(130);
    };
    // Interrupted while the data loaded: the study never began (an earlier one's partial
    // outputs are not this one's).
    if stop.load(Ordering::SeqCst) {
        stopped("interrupted before the study began: nothing was written".into(), None);
    }
    // What an interrupted study wrote stays in its partial directory (report::reproduce
    // removed it, and the run directory it made, where it left them empty, under its lock),
    // and an earlier run's outputs are left whole.
    let earlier = || {
        if out_dir.join("report.md").exists() {
            format!(" (the earlier run's outputs in {} are untouched)", out_dir.display())
        } else {
            String::new()
        }
    };
    let summary = match report::reproduce(&opts, Arc::clone(&data), &mut open, Some(&stop)) {
        Err(bntrain::Error::Kept { failed, kept }) if matches!(*failed, bntrain::Error::Interrupted { .. }) => {
            stopped(format!("interrupted: the study stopped before its end; what it wrote is in {}{}", kept.display(), earlier()), Some(kept))
        }
        Err(bntrain::Error::Interrupted { .. }) => stopped(format!("interrupted: the study stopped before writing anything{}", earlier()), None),
        done => done.with_context(|| format!("reproduce into {}", out_dir.display()))?,
    };
    if stop.load(Ordering::SeqCst) {
        note!("notice: the interrupt came after the last training step: the study finished and its outputs are in place");
    }
    out!("{}", summary.table());
    for (label, rows) in &summary.comparison_timeline {
        out!("comparison, {label}:");
        out!("{}", bench::timeline_table(rows).trim_end_matches('\n'));
    }
    out!("report: {}", out_dir.join("report.md").display());
    if args.json {
        // The headline numbers; every curve and table is in metrics.json.
        let t = &summary.test_time;
        let estimators: serde_json::Map<String, serde_json::Value> =
            summary.estimators.rows.iter().map(|r| (r.label.clone(), json!(r.mean))).collect();
        out!("{}", json!({
            "device": summary.device,
            "seconds": summary.timings.total_s,
            "bn_final_accuracy": summary.comparison.bn.final_accuracy(),
            "plain_final_accuracy": summary.comparison.plain.final_accuracy(),
            "test_accuracy": t.accuracy_population,
            "one_by_one_population": t.first_population.accuracy,
            "one_by_one_batch": t.first_batch.accuracy,
            "estimators": estimators,
            "report": path_text(&out_dir.join("report.md")),
            "metrics": path_text(&out_dir.join("metrics.json")),
            "comparison_timeline": (!summary.comparison_timeline.is_empty()).then(|| {
                summary.comparison_timeline.iter().map(|(label, rows)| (label.clone(), json!(rows))).collect::<serde_json::Map<_, _>>()
            }),
        }));
    }
    Ok(())
}

fn bench_cmd(device_choice: DeviceChoice, args: BenchArgs) -> Result<()> {
    let device = resolve_device(device_choice);
    let cpu_input = match args.cpu_input {
        CpuInputArg::Auto => InputPath::Auto,
        CpuInputArg::Dense => InputPath::Dense,
        CpuInputArg::Sparse => InputPath::Sparse,
    };
    let mut open = |m, t, d, p: &_| device::open_with(device, args.precision, cpu_input, m, t, d, p);
    // A benchmark does not download: without the data it says where it looked.
    let dataset = if args.noise {
        None
    } else {
        let kind = args.data.kind(None);
        let dir = data::locate(args.data.data.as_deref(), kind, false)
            .context("cannot find the dataset to benchmark on (or pass --noise for random pixels)")?;
        Some(Arc::new(data::load_dir(&dir, kind).with_context(|| format!("cannot load {kind} from {}", dir.display()))?))
    };
    let data = match dataset.as_deref() {
        None => bench::BenchData::Noise,
        Some(dataset) if args.all_batches => bench::BenchData::All(dataset),
        Some(dataset) => bench::BenchData::Real(dataset),
    };
    let nets = if args.pair { bench::BenchNets::Pair } else { bench::BenchNets::One { batch_norm: !args.no_bn } };
    // As train and reproduce do, before the networks are opened: an allocation that fails
    // aborts the process instead of returning an error. (The configuration's layers on the
    // data's image size and classes; the points evaluate the whole test split; with --pair,
    // the plain twin's needs too.)
    let (mut model, train_cfg) = args.config.configs(!args.no_bn);
    if let Some(d) = dataset.as_deref() {
        (model.inputs, model.classes) = (d.train.features, d.train.classes);
    }
    let evaluated = if args.points { dataset.as_deref().map_or(10_000, |d| d.test.count) } else { 0 };
    let networks = if args.pair { device::Networks::WithPlainTwin } else { device::Networks::One };
    device::check_host_memory(&model, networks, train_cfg.batch_size, device::HeldRows { evaluated, exact: 0 }, device, args.precision)?;
    // The runs, on stderr (hidden where it is no terminal), updated between timed spans.
    let bar = ProgressBar::new(args.runs as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} timed runs [{elapsed_precise}]").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let timed = bench::run(args.config, nets, data, args.runs, args.seconds, args.trace, args.points, &mut open, &mut |done| bar.set_position(done as u64));
    bar.finish_and_clear();
    let r = timed?;
    let which = match nets {
        bench::BenchNets::Pair => "BN and plain in lockstep",
        bench::BenchNets::One { batch_norm: true } => "BN",
        bench::BenchNets::One { batch_norm: false } => "plain",
    };
    let runs = if r.runs == 1 { "1 run".to_string() } else { format!("{} runs", r.runs) };
    let batches = if r.batches == 1 { "1 batch".to_string() } else { format!("{} batches", r.batches) };
    out!(
        "{:?} {} ({which}, batch {}, {batches} of {} with {:.0}% non-zero pixels) on {}: {:.1} µs per step (median of {runs} of {} steps; min {:.1}, max {:.1}), {:.0} steps/s",
        r.config, r.layers, r.batch_size, r.data, 100.0 * r.nonzero_pixels, r.device,
        r.us_per_step, r.steps_per_run, r.us_per_step_min, r.us_per_step_max, r.steps_per_second
    );
    // The build's kernels say nothing about a CPU run (they stay in the JSON).
    if !r.device.starts_with("cpu") {
        out!("{}", r.kernels);
    }
    for tuned in &r.tuned_gemms {
        let us: Vec<String> = tuned.us.iter().map(|t| if t.is_finite() { format!("{t:.1}") } else { "-".into() }).collect();
        let chosen = if tuned.chosen == 0 { "cuBLAS's own".to_string() } else { format!("cublasLt candidate {}", tuned.chosen) };
        out!("tuned GEMM {}: {chosen}; µs cuBLAS, then cublasLt's candidates: {}", tuned.shape, us.join(" "));
    }
    if let Some(points) = &r.us_per_point {
        let names: &[&str] = if points.len() == 2 { &["BN", "plain"] } else { &[which] };
        let each: Vec<String> = names.iter().zip(points).map(|(name, us)| format!("{name} {us:.1} µs")).collect();
        out!(
            "evaluation points ({} test images, batch statistics, {} units probed; median of {}, each begun and finished at once): {}",
            r.test_examples, bntrain::report::study::PROBE_NEURONS, bench::TIMED_POINTS, each.join(", ")
        );
    }
    match &r.phases {
        Some(phases) => out!("{}", bench::phase_table(phases).trim_end_matches('\n')),
        None if args.trace => note!("notice: --trace times the phases of the fused CUDA grid kernel only; these steps ran on {}", r.device),
        None => {}
    }
    if args.json {
        out!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn data_cmd(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Fetch { dataset: DatasetKind::FashionMnist, dir: None } if data::locate(None, DatasetKind::FashionMnist, false).is_ok() => {
            let dir = data::locate(None, DatasetKind::FashionMnist, false)?;
            out!("fashion-mnist is read from {} (bntrain does not download it)", dir.display());
        }
        DataCommand::Fetch { dataset, dir } => {
            let dest = dir.unwrap_or_else(|| data::cache_dir(dataset));
            let report = data::fetch(dataset, &dest, true)?;
            let list = |names: &[String]| if names.is_empty() { "none".to_string() } else { names.join(", ") };
            out!(
                "{} in {}: downloaded {}; already present {}; checksums verified",
                dataset, report.dir.display(), list(&report.downloaded), list(&report.already_present)
            );
        }
        DataCommand::Where { data: args } => {
            let dir = data::locate(args.data.as_deref(), args.kind(None), false)?;
            out!("{}", dir.display());
        }
    }
    Ok(())
}

fn info() -> Result<()> {
    out!("bntrain {}", env!("CARGO_PKG_VERSION"));
    out!("cpu: {} threads available", std::thread::available_parallelism().map_or(1, |n| n.get()));
    out!("{}", bntrain::cuda::build_info());
    match bntrain::cuda::cuda_available() {
        Ok(name) => out!("cuda: {name} (usable)"),
        Err(why) => out!("cuda: not usable: {}", why.reason()),
    }
    for kind in [DatasetKind::Mnist, DatasetKind::FashionMnist] {
        match data::locate(None, kind, false) {
            Ok(dir) => out!("{kind}: {}", dir.display()),
            Err(e) => out!("{kind}: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
