//! The command line end to end, on a small learnable IDX dataset the test writes itself:
//! train → checkpoint → eval → predict, resume, interruption, divergence, bad input.

mod support;

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_bntrain");

/// Writes IDX files of 28×28 images whose class is a bright 4×4 block at a class-specific
/// place, over uniform noise: easy to learn in a few hundred steps.
fn write_dataset(dir: &Path, train: usize, test: usize, gzip: bool) {
    let mut state = 12345u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    for (prefix, count) in [("train", train), ("t10k", test)] {
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..count {
            let label = (next() % 10) as usize;
            labels.push(label as u8);
            let (r0, c0) = (2 + (label / 5) * 12, 2 + (label % 5) * 5);
            for r in 0..28 {
                for c in 0..28 {
                    let inside = (r0..r0 + 4).contains(&r) && (c0..c0 + 4).contains(&c);
                    images.push(if inside { 200 + (next() % 56) as u8 } else { (next() % 60) as u8 });
                }
            }
        }
        let mut img = vec![0, 0, 8, 3];
        for d in [count as u32, 28, 28] {
            img.extend(d.to_be_bytes());
        }
        img.extend(images);
        let mut lab = vec![0, 0, 8, 1];
        lab.extend((count as u32).to_be_bytes());
        lab.extend(labels);
        for (name, bytes) in [(format!("{prefix}-images-idx3-ubyte"), img), (format!("{prefix}-labels-idx1-ubyte"), lab)] {
            if gzip {
                let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
                let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
                enc.write_all(&bytes).unwrap();
                enc.finish().unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}

struct Env {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    dir: PathBuf,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_dataset(&data, 600, 200, true);
    let dir = tmp.path().to_path_buf();
    Env { _tmp: tmp, data, dir }
}

fn bntrain(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("BNTRAIN_CACHE", "/nonexistent-bntrain-cache")
        .env_remove("BNTRAIN_DATA")
        .output()
        .unwrap()
}

fn last_json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "failed: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().expect("no stdout")).expect("last line is JSON")
}

/// A failure: non-zero exit, one `error:` line on stderr, no panic.
fn expect_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(errors[0].contains(needle), "`{}` should contain `{needle}`", errors[0]);
    // A cause is said once, not again after a message that already ends with it.
    let parts: Vec<&str> = errors[0].split(": ").collect();
    assert!(parts.windows(2).all(|w| w[0] != w[1]), "a cause said twice: {}", errors[0]);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn train_eval_predict_round_trip() {
    let e = env();
    let ckpt = e.dir.join("model.safetensors");
    // The cumulative average: after 300 steps an EMA with decay 0.999 still holds 74% of its
    // starting point (0, 1) and population-statistics accuracy would lag.
    let out = bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--steps", "300", "--eval-every", "100", "--averaging", "cumulative", "--checkpoint", s(&ckpt), "--json"]);
    let train = last_json(&out);
    assert_eq!(train["steps"], 300);
    assert_eq!(train["device"], "cpu f32");
    let acc = train["test_accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "the block dataset is easy: {acc}");
    assert!(train["seconds"].as_f64().unwrap() > 0.0);

    let eval = last_json(&bntrain(&["--device", "cpu", "eval", "--data", s(&e.data), "--checkpoint", s(&ckpt), "--json"]));
    assert_eq!(eval["test_accuracy"], train["test_accuracy"], "eval reproduces the final evaluation");

    let pop = last_json(&bntrain(&["--device", "cpu", "predict", "--data", s(&e.data), "--checkpoint", s(&ckpt), "--first", "50", "--mode", "population", "--json"]));
    assert_eq!(pop["predictions"].as_array().unwrap().len(), 50);
    assert!(pop["accuracy"].as_f64().unwrap() > 0.8);
    let batch = last_json(&bntrain(&["--device", "cpu", "predict", "--data", s(&e.data), "--checkpoint", s(&ckpt), "--first", "50", "--mode", "batch", "--json"]));
    let preds = batch["predictions"].as_array().unwrap();
    assert!(preds.iter().all(|p| p == &preds[0]), "batch statistics of one example collapse to one class");
    assert!(batch["accuracy"].as_f64().unwrap() < 0.3);
}

#[test]
fn resume_continues_bitwise_identically() {
    let e = env();
    let full = e.dir.join("full.safetensors");
    let half = e.dir.join("half.safetensors");
    let common = ["--device", "cpu", "train", "--data", s(&e.data), "--eval-every", "40", "--momentum", "0.5"];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = common.to_vec();
        args.extend_from_slice(extra);
        last_json(&bntrain(&args))
    };
    run(&["--steps", "250", "--checkpoint", s(&full), "--json"]);
    // A run asked for 120 steps ends on an evaluation point; stopping between two points is
    // the interruption case (tests/resume.rs).
    run(&["--steps", "120", "--checkpoint", s(&half), "--json"]);
    let resumed = run(&["--steps", "250", "--resume", s(&half), "--json"]);
    assert_eq!(resumed["steps"], 250);
    let a = bntrain::model::checkpoint::Checkpoint::load(&full).unwrap();
    let b = bntrain::model::checkpoint::Checkpoint::load(&half).unwrap();
    assert_eq!(a.params, b.params, "parameters and running statistics");
    assert_eq!(a.velocity, b.velocity, "momentum buffers");
    assert_eq!(a.progress, b.progress, "step and metric history");
    // The checkpoint's settings are used, and settings given beside it are said to be unused.
    let out = bntrain(&[&common[..], &["--steps", "260", "--resume", s(&half), "--hidden", "30", "--no-bn", "--json"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not used: --hidden, --no-bn, --momentum"), "{stderr}");
    assert!(last_json(&out)["model"].as_str().is_some_and(|m| m.starts_with("784-100-100-10") && m.contains("with BN")), "{stderr}");
}

/// bntrain with `args`, run in `dir`, sent `signal` (`-INT`, `-TERM`) after `ms`: twice in a
/// row for `-TERM`, as `timeout` sends it (to the process, then to its group), which is one
/// interrupt.
fn interrupted(args: &[&str], dir: &Path, signal: &str, ms: u64) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(ms));
    let pid = child.id().to_string();
    let deliveries: &[&str] = if signal == "-TERM" { &[&pid, &pid] } else { &[&pid] };
    assert!(Command::new("kill").arg(signal).args(deliveries).status().unwrap().success());
    child.wait_with_output().unwrap()
}

/// Ctrl-C (SIGINT) or SIGTERM mid-run: a checkpoint at the next step boundary, exit 130,
/// and the checkpoint resumes.
fn interrupt_writes_a_checkpoint_that_resumes(signal: &str) {
    let e = env();
    let ckpt = e.dir.join("int.safetensors");
    let args = ["--device", "cpu", "train", "--data", s(&e.data), "--steps", "100000000", "--eval-every", "1000", "--checkpoint", s(&ckpt), "--json"];
    let out = interrupted(&args, &e.dir, signal, 1500);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    assert!(!stderr.contains("second interrupt"), "two deliveries at once are one interrupt: {stderr}");
    assert!(stderr.contains(&format!("continue with `bntrain --device cpu train --resume {} --steps 100000000 --data ", s(&ckpt))), "{stderr}");
    assert!(stderr.contains(" --eval-every 1000`"), "the run's evaluation interval goes on: {stderr}");
    let saved = bntrain::model::checkpoint::Checkpoint::load(&ckpt).unwrap();
    assert!(saved.progress.step > 0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!((last["interrupted"].as_bool(), last["steps"].as_u64()), (Some(true), Some(saved.progress.step)), "{stdout}");
    let more = (saved.progress.step + 20).to_string();
    let resumed = last_json(&bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--steps", &more, "--resume", s(&ckpt), "--json"]));
    assert_eq!(resumed["steps"].as_u64().unwrap(), saved.progress.step + 20);
}

#[test]
fn sigint_writes_a_checkpoint_that_resumes() {
    interrupt_writes_a_checkpoint_that_resumes("-INT");
}

/// Without --checkpoint an interrupt saves to bntrain-interrupted.safetensors, and a second
/// interrupted run beside it to bntrain-interrupted-1.safetensors: an earlier run's state is
/// not overwritten.
#[test]
fn an_interrupt_without_checkpoint_flag_still_saves() {
    let e = env();
    for (run, name) in ["bntrain-interrupted.safetensors", "bntrain-interrupted-1.safetensors"].into_iter().enumerate() {
        let seed = run.to_string();
        let args = ["--device", "cpu", "train", "--data", s(&e.data), "--steps", "100000000", "--eval-every", "1000", "--seed", &seed];
        let out = interrupted(&args, &e.dir, "-INT", 1000);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(stderr.contains(&format!("checkpoint written to {name}")), "{stderr}");
        let saved = bntrain::model::checkpoint::Checkpoint::load(&e.dir.join(name)).unwrap();
        assert!(saved.progress.step > 0);
        assert_eq!(saved.train.seed, run as u64, "{name} holds run {run}'s state");
    }
}

/// An interrupt that comes after the network diverged, between evaluation points, says so
/// and saves nothing: the earlier good checkpoint stays whole.
#[test]
fn an_interrupt_after_divergence_says_so_and_saves_nothing() {
    let e = env();
    let ckpt = e.dir.join("good.safetensors");
    last_json(&bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--steps", "20", "--checkpoint", s(&ckpt), "--json"]));
    let before = std::fs::read(&ckpt).unwrap();
    let args = ["--device", "cpu", "train", "--data", s(&e.data), "--init", s(&ckpt), "--checkpoint", s(&ckpt), "--lr", "1e30"];
    let out = interrupted(&[&args[..], &["--steps", "100000000", "--eval-every", "100000000", "--json"]].concat(), &e.dir, "-INT", 1000);
    expect_failure(&out, "diverged at step");
    expect_failure(&out, "at the interrupt, so nothing was saved");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before, "the last good checkpoint is untouched");
}

#[test]
fn sigterm_writes_a_checkpoint_that_resumes() {
    interrupt_writes_a_checkpoint_that_resumes("-TERM");
}

#[test]
fn divergence_stops_training_and_keeps_the_last_good_checkpoint() {
    let e = env();
    let ckpt = e.dir.join("good.safetensors");
    last_json(&bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--steps", "50", "--checkpoint", s(&ckpt), "--json"]));
    let before = std::fs::read(&ckpt).unwrap();
    let out = bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--steps", "200", "--lr", "1e6", "--no-bn", "--init", s(&ckpt), "--checkpoint", s(&ckpt)]);
    // --no-bn makes --init refuse the BN checkpoint; train the plain net from scratch instead.
    expect_failure(&out, "checkpoint does not match");
    let out = bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--steps", "200", "--lr", "1e6", "--init", s(&ckpt), "--checkpoint", s(&ckpt)]);
    expect_failure(&out, "diverged at step");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before, "the last good checkpoint is untouched");
    // relu lets the activations themselves overflow: a NaN, named as such.
    let out = bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--steps", "200", "--lr", "1e6", "--activation", "relu", "--eval-every", "20", "--checkpoint", s(&ckpt)]);
    expect_failure(&out, "NaN");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before, "the last good checkpoint is untouched");
}

#[test]
fn bad_input_gets_one_line_errors() {
    let e = env();
    let data = s(&e.data);
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", "/nonexistent/dir", "--steps", "10"]), "not found");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--batch", "1"]), "batch size 1");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--lr", "0"]), "learning rate");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--decay", "1.5"]), "decay");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--hidden", "100,0"]), "width 0");
    // What the data does not decide is refused before the data is looked for (MNIST may have
    // to be downloaded first).
    for (flag, value, needle) in [("--hidden", "100,0", "width 0"), ("--lr", "0", "learning rate"), ("--batch", "1", "batch size 1")] {
        expect_failure(&bntrain(&["--device", "cpu", "train", "--data", "/nonexistent/dir", flag, value]), needle);
    }
    expect_failure(&bntrain(&["--device", "cpu", "reproduce", "--data", "/nonexistent/dir", "--hidden", "0", "--out", s(&e.dir)]), "width 0");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--eval-every", "0"]), "eval");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--steps", "0"]), "--steps");
    // With --json the last line of stdout is a JSON object, a failure's too.
    // A command line bntrain cannot take exits with 2, any other failure with 1.
    for (args, exit, needle) in [
        (&["train", "--data", data, "--steps", "0", "--json"][..], 2, "at least one step"),
        (&["train", "--data", data, "--steps", "abc", "--json"][..], 2, "invalid digit"),
        (&["train", "--data", data, "--bogus", "--json"][..], 2, "--bogus"),
        (&["train", "--data", data, "--lr", "-1", "--json"][..], 1, "learning rate must be positive"),
        // A negative value meets its option's own check, not "unexpected argument '-1'".
        (&["train", "--data", data, "--seed", "-1", "--json"][..], 2, "invalid value '-1' for '--seed"),
        (&["bench", "--seconds", "-1", "--json"][..], 2, "a positive number of seconds"),
        // The missing argument is named, not only that one is missing.
        (&["eval", "--json"][..], 2, "not provided: --checkpoint <CHECKPOINT>"),
        // Counts no run could reach: refused, not wrapped (steps) or allocated (runs).
        (&["train", "--data", data, "--steps", "281474976710657", "--json"][..], 2, "at most 281474976710656 steps"),
        (&["bench", "--runs", "18446744073709551615", "--json"][..], 2, "at most 1000 timed runs"),
    ] {
        let out = bntrain(&[&["--device", "cpu"][..], args].concat());
        expect_failure(&out, needle);
        assert_eq!(out.status.code(), Some(exit), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
        assert!(last["error"].as_str().is_some_and(|e| e.contains(needle)), "{stdout}");
    }
    expect_failure(&bntrain(&["--device", "cpu", "reproduce", "--data", data, "--quick", "--name", "bn.partial"]), "ends with .partial");
    // A --decay that cumulative averaging does not use is said to be unused.
    let out = bntrain(&["--device", "cpu", "train", "--data", data, "--steps", "5", "--averaging", "cumulative", "--decay", "5", "--json"]);
    last_json(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not used with --averaging cumulative"));
    expect_failure(&bntrain(&["--device", "cpu", "bench", "--runs", "0"]), "at least one timed run");

    expect_failure(&bntrain(&["--device", "cpu", "predict", "--data", data, "--checkpoint", "x", "--first", "0"]), "at least one test image");
    // Refused before training, not after: a directory or a device is not replaced by a file.
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--steps", "10", "--checkpoint", s(&e.dir)]), "it is a directory");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--steps", "10", "--checkpoint", "/dev/null"]), "not a regular file");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--steps", "10", "--checkpoint", "no-such-dir/"]), "names a directory");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--steps", "10", "--checkpoint", "/proc/x.safetensors"]), "exists but takes no new files");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", "/nonexistent/dir", "--checkpoint", "/proc/x.safetensors"]), "exists but takes no new files");
    let in_the_way = e.dir.join("a-file");
    std::fs::write(&in_the_way, b"").unwrap();
    expect_failure(&bntrain(&["--device", "cpu", "reproduce", "--data", data, "--quick", "--out", s(&e.dir), "--name", "a-file"]), "cannot create");
    assert!(!e.dir.join("a-file.partial").exists(), "nothing made where the study could not go");
    // A network bntrain cannot build, or an output name a directory holds, is refused before
    // the study makes its directories or removes an earlier interrupted study's outputs.
    let earlier = e.dir.join("study.partial");
    std::fs::create_dir(&earlier).unwrap();
    std::fs::write(earlier.join("curves.csv"), b"kept").unwrap();
    expect_failure(&bntrain(&["--device", "cpu", "reproduce", "--data", data, "--quick", "--hidden", "0", "--out", s(&e.dir), "--name", "study"]), "width 0");
    assert!(!e.dir.join("study").exists(), "no run directory for a study that cannot run");
    assert_eq!(std::fs::read(earlier.join("curves.csv")).unwrap(), b"kept");
    std::fs::create_dir_all(e.dir.join("study/report.md")).unwrap();
    let started = std::time::Instant::now();
    expect_failure(&bntrain(&["--device", "cpu", "reproduce", "--data", data, "--quick", "--out", s(&e.dir), "--name", "study"]), "cannot write report.md");
    assert!(started.elapsed().as_secs_f64() < 5.0, "refused at the start, not after the study");
    assert_eq!(std::fs::read(earlier.join("curves.csv")).unwrap(), b"kept");
    expect_failure(&bntrain(&["--device", "cpu", "eval", "--data", data, "--checkpoint", "/dev/zero"]), "not a regular file");
    expect_failure(&bntrain(&["--device", "cpu", "reproduce", "--data", data, "--quick", "--name", "."]), "plain directory name");
    for seconds in ["0", "nan", "inf", "-1", "61"] {
        expect_failure(&bntrain(&["--device", "cpu", "bench", &format!("--seconds={seconds}")]), "positive number of seconds");
    }
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--resume", "/nonexistent.safetensors"]), "cannot read checkpoint");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--batch", "100000"]), "larger than the training set");
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", data, "--checkpoint", "/nonexistent/dir/c.safetensors"]), "cannot write");
    expect_failure(&bntrain(&["--device", "cpu", "eval", "--data", data, "--checkpoint", "/nonexistent.safetensors"]), "cannot read checkpoint");
    let not_ckpt = e.dir.join("junk.safetensors");
    std::fs::write(&not_ckpt, b"hello").unwrap();
    expect_failure(&bntrain(&["--device", "cpu", "predict", "--data", data, "--checkpoint", s(&not_ckpt)]), "not a safetensors file");
    let bad_data = e.dir.join("bad");
    std::fs::create_dir(&bad_data).unwrap();
    write_dataset(&bad_data, 20, 10, false);
    std::fs::write(bad_data.join("t10k-labels-idx1-ubyte"), [0u8, 0, 8, 1, 0, 0, 0, 10, 1, 2]).unwrap();
    expect_failure(&bntrain(&["--device", "cpu", "train", "--data", s(&bad_data)]), "t10k-labels-idx1-ubyte");
}

/// A full stderr (`2>/dev/full`) costs the notices and the error line, not the exit status
/// or the `--json` object: writes to stderr must not panic.
#[test]
fn a_full_stderr_is_no_panic() {
    let e = env();
    let run = |args: &[&str]| {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        Command::new(BIN).args(args).env("BNTRAIN_CACHE", "/nonexistent-bntrain-cache").env_remove("BNTRAIN_DATA").stderr(full).output().unwrap()
    };
    let out = run(&["--device", "cpu", "train", "--data", s(&e.data), "--lr", "-1", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert!(last["error"].as_str().is_some_and(|e| e.contains("learning rate")), "{stdout}");
    // A run that succeeds with a notice on the way: `auto` says where it computes when it
    // finds no GPU (and in a build without kernels).
    let out = run(&["train", "--data", s(&e.data), "--steps", "5", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    last_json(&out);
    // matrixmultiply warns about a MATMUL_NUM_THREADS that is no number with an eprintln!
    // of its own, a panic on a full stderr: bntrain refuses the value before a GEMM runs.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let args = ["--device", "cpu", "train", "--data", s(&e.data), "--steps", "2", "--hidden", "300,300", "--json"];
    let out = Command::new(BIN).args(args).env("MATMUL_NUM_THREADS", "x").stderr(full).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert!(last["error"].as_str().is_some_and(|e| e.contains("MATMUL_NUM_THREADS=x is not a number of threads")), "{stdout}");
    // Commands that multiply no matrices do not mind it.
    for args in [&["info"][..], &["data", "where", "--data", s(&e.data)]] {
        let out = Command::new(BIN).args(args).env("MATMUL_NUM_THREADS", "x").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A full stdout (`>/dev/full`) is an error, help and version included: exit 1 and one line.
#[test]
fn a_full_stdout_is_an_error() {
    for args in [&["--help"][..], &["--version"], &["train", "--help"], &["--device", "cpu", "info"]] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        let out = Command::new(BIN).args(args).stdout(full).output().unwrap();
        expect_failure(&out, "cannot write the output");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
}

/// A network larger than an address-space limit (`ulimit -v`, as a batch system sets it)
/// allows is refused in one line before training, not aborted by a failed allocation.
#[test]
fn an_address_space_limit_is_a_one_line_refusal() {
    let e = env();
    // 1 GB of address space; the network needs about 2.2 GB (88M parameters, a batch and
    // the 200 test images' activations), which the machine's own memory would allow.
    let out = Command::new("sh")
        .args(["-c", "ulimit -v 1000000 && exec \"$0\" \"$@\"", BIN])
        .args(["--device", "cpu", "train", "--data", s(&e.data), "--hidden", "9000,9000", "--steps", "1"])
        .env("BNTRAIN_CACHE", "/nonexistent-bntrain-cache")
        .env_remove("BNTRAIN_DATA")
        .output()
        .unwrap();
    expect_failure(&out, "needs at least 2.2 GB of memory to train and evaluate");
}

/// `bench` checks the host memory as `train` does: the wide configuration (about 0.1 GB on
/// the CPU) under 60 MB of address space is refused in one line, not aborted; with `--pair`,
/// the plain network beside it counts too.
#[test]
fn bench_refuses_what_the_address_space_cannot_hold() {
    for (pair, message) in [
        (&[][..], "784-1024-1024-10 Sigmoid with BN with batches of 1024 needs at least 0.1 GB of memory"),
        (&["--pair"][..], "784-1024-1024-10 Sigmoid with BN and its plain twin with batches of 1024 need at least 0.2 GB of memory"),
    ] {
        let out = Command::new("sh")
            .args(["-c", "ulimit -v 60000 && exec \"$0\" \"$@\"", BIN])
            .args(["--device", "cpu", "bench", "--config", "wide", "--noise", "--runs", "1", "--seconds", "0.01"])
            .args(pair)
            .output()
            .unwrap();
        expect_failure(&out, message);
    }
}

#[test]
fn cuda_without_a_gpu_says_what_to_do() {
    if bntrain::cuda::cuda_available().is_ok() {
        let _ = writeln!(std::io::stderr(), "skipped: a GPU is present");
        return;
    }
    let e = env();
    expect_failure(&bntrain(&["--device", "cuda", "train", "--data", s(&e.data), "--steps", "10"]), "--device cpu");
    // auto falls back to the CPU with a notice.
    let out = bntrain(&["--device", "auto", "train", "--data", s(&e.data), "--steps", "20", "--eval-every", "10", "--json"]);
    assert_eq!(last_json(&out)["device"], "cpu f32");
    assert!(String::from_utf8_lossy(&out.stderr).contains("notice: no usable GPU"));
}

#[test]
fn bench_and_info_run_on_the_cpu() {
    let e = env();
    let quick = ["--device", "cpu", "bench", "--config", "seed", "--runs", "3", "--seconds", "0.05", "--json"];
    let r = last_json(&bntrain(&[&quick[..], &["--data", s(&e.data), "--cpu-input", "sparse"]].concat()));
    assert!(r["us_per_step"].as_f64().unwrap() > 0.0);
    assert_eq!(r["batch_size"], 60);
    assert_eq!(r["data"], "mnist");
    assert_eq!(r["device"], "cpu f32, sparse input");
    assert_eq!(r["batches"], 10, "the 600 images' whole batches, fewer than twelve");
    // --all-batches: every batch of a training split larger than twelve of them, where the
    // default cycles through twelve; not with --noise.
    let big = e.dir.join("big");
    std::fs::create_dir(&big).unwrap();
    write_dataset(&big, 1500, 1100, true);
    let r = last_json(&bntrain(&[&quick[..], &["--data", s(&big)]].concat()));
    assert_eq!(r["batches"], 12);
    let out = bntrain(&[&quick[..], &["--data", s(&big), "--all-batches"]].concat());
    assert_eq!(last_json(&out)["batches"], 25);
    assert!(String::from_utf8_lossy(&out.stdout).contains("25 batches of mnist"), "{}", String::from_utf8_lossy(&out.stdout));
    expect_failure(&bntrain(&[&quick[..], &["--noise", "--all-batches"]].concat()), "--all-batches");
    let r = last_json(&bntrain(&[&quick[..], &["--noise"]].concat()));
    assert_eq!((r["data"].as_str(), r["device"].as_str()), (Some("noise"), Some("cpu f32")));
    assert!(r["nonzero_pixels"].as_f64().unwrap() > 0.99, "uniform bytes are 255/256 non-zero");
    assert_eq!((r["networks"].as_u64(), r["batch_norm"].as_bool()), (Some(1), Some(true)));
    // --pair: the BN and the plain network in lockstep, one time per step for both; not with --no-bn.
    let out = bntrain(&[&quick[..], &["--noise", "--pair"]].concat());
    let pair = last_json(&out);
    assert_eq!(pair["networks"], 2);
    assert!(String::from_utf8_lossy(&out.stdout).contains("BN and plain in lockstep"));
    assert!(pair["us_per_point"].is_null() && pair["test_examples"] == 1000, "{pair}");
    // --points: each network's evaluation points on the whole test split (the steps alone
    // keep 1000 test images).
    let r = last_json(&bntrain(&[&quick[..], &["--data", s(&big), "--pair"]].concat()));
    assert!(r["us_per_point"].is_null() && r["test_examples"] == 1000, "{r}");
    let out = bntrain(&[&quick[..], &["--data", s(&big), "--pair", "--points"]].concat());
    let points = last_json(&out);
    assert_eq!(points["test_examples"], 1100, "the whole test split");
    let us: Vec<f64> = points["us_per_point"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(us.len() == 2 && us.iter().all(|&t| t > 0.0 && t.is_finite()), "{points}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("evaluation points (1100 test images"), "{}", String::from_utf8_lossy(&out.stdout));
    let r = last_json(&bntrain(&[&quick[..], &["--noise", "--points"]].concat()));
    assert_eq!((r["test_examples"].as_u64(), r["us_per_point"].as_array().map(Vec::len)), (Some(10_000), Some(1)));
    expect_failure(&bntrain(&[&quick[..], &["--noise", "--pair", "--no-bn"]].concat()), "--no-bn");
    // Without data and without --noise, bench downloads nothing and says where it looked.
    let out = bntrain(&quick);
    expect_failure(&out, "pass --noise for random pixels");
    assert!(!Path::new("/nonexistent-bntrain-cache").exists(), "bench created the cache directory: it tried to download");
    let out = bntrain(&["info"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("bntrain"));
}

/// Ctrl-C during `reproduce`: exit 130, an earlier run's outputs whole (the study builds in
/// `<name>.partial` and moves its outputs in only once all are written).
#[test]
fn an_interrupted_study_leaves_the_earlier_run_whole() {
    let e = env();
    let out = e.dir.join("runs");
    let study = |extra: &[&'static str]| -> Vec<String> {
        let common = ["--device", "cpu", "reproduce", "--quick", "--data", s(&e.data), "--out", s(&out)];
        common.iter().chain(extra).map(|a| a.to_string()).collect()
    };
    last_json(&bntrain(&study(&["--json"]).iter().map(String::as_str).collect::<Vec<_>>()));
    let report = std::fs::read(out.join("bn2015/report.md")).unwrap();
    let metrics = std::fs::read(out.join("bn2015/metrics.json")).unwrap();
    assert!(!out.join("bn2015.partial").exists(), "a finished study leaves no partial directory");
    // Long enough to be interrupted in its comparison.
    let child = Command::new(BIN)
        .args(study(&["--seed", "7", "--steps", "100000000", "--json"]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The partial directory is made after the interrupt handler is in place: then interrupt.
    let started = std::time::Instant::now();
    while !out.join("bn2015.partial").is_dir() {
        assert!(started.elapsed().as_secs() < 60, "the study never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stderr}");
    // Stopped in the comparison, which writes its outputs at its end: nothing written, and
    // the empty partial directory gone.
    assert!(stderr.contains("stopped before writing anything (the earlier run's outputs in") && !stderr.contains("panicked"), "{stderr}");
    let stdout = String::from_utf8_lossy(&done.stdout);
    let stopped: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!((stopped["interrupted"].as_bool(), stopped["partial"].is_null()), (Some(true), true), "{stopped}");
    assert_eq!(std::fs::read(out.join("bn2015/report.md")).unwrap(), report, "the earlier report");
    assert_eq!(std::fs::read(out.join("bn2015/metrics.json")).unwrap(), metrics, "the earlier metrics");
    assert!(!out.join("bn2015.partial").exists());
}

/// A checkpoint remembers its dataset and arithmetic: `eval` reads the data it was trained
/// on, and `--resume` goes on with both, naming a `--dataset` or `--precision` given beside
/// it as not used.
#[test]
fn a_checkpoint_brings_its_dataset_and_precision() {
    let e = env();
    let ckpt = e.dir.join("fashion.safetensors");
    let base = ["--device", "cpu", "train", "--data", s(&e.data), "--eval-every", "30"];
    let first = [&base[..], &["--dataset", "fashion-mnist", "--precision", "bf16", "--steps", "60", "--checkpoint", s(&ckpt), "--json"]].concat();
    let trained = last_json(&bntrain(&first));
    assert_eq!(trained["dataset"], "fashion-mnist");
    assert!(trained["device"].as_str().unwrap().contains("bf16"), "{trained}");

    let eval = last_json(&bntrain(&["--device", "cpu", "eval", "--data", s(&e.data), "--checkpoint", s(&ckpt), "--split", "train", "--json"]));
    assert_eq!((&eval["dataset"], &eval["split"]), (&json!("fashion-mnist"), &json!("train")), "{eval}");
    assert!(eval["device"].as_str().unwrap().contains("bf16"), "evaluated as trained: {eval}");
    assert!(eval.get("test_accuracy").is_none(), "the training split's accuracy is not called test accuracy: {eval}");

    let out = bntrain(&[&base[..], &["--dataset", "mnist", "--precision", "f32", "--steps", "90", "--resume", s(&ckpt), "--json"]].concat());
    let resumed = last_json(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not used: --precision, --dataset"), "{stderr}");
    assert_eq!((&resumed["dataset"], &resumed["steps"], &resumed["steps_this_run"]), (&json!("fashion-mnist"), &json!(90), &json!(30)), "{resumed}");
    assert!(resumed["device"].as_str().unwrap().contains("bf16"), "{resumed}");

    // Data that cannot be read is said to be the record's choice where that is not MNIST,
    // and only there.
    let missing = ["--device", "cpu", "eval", "--data", "/nonexistent/dir", "--checkpoint"];
    expect_failure(&bntrain(&[&missing[..], &[s(&ckpt)]].concat()), "was trained on fashion-mnist (--dataset chooses other data): cannot find");
    let mut on_mnist = bntrain::model::checkpoint::Checkpoint::load(&ckpt).unwrap();
    on_mnist.trained_on = on_mnist.trained_on.map(|t| bntrain::model::checkpoint::TrainedOn { dataset: bntrain::data::DatasetKind::Mnist, ..t });
    let mnist_ckpt = e.dir.join("mnist.safetensors");
    on_mnist.save(&mnist_ckpt).unwrap();
    let out = bntrain(&[&missing[..], &[s(&mnist_ckpt)]].concat());
    expect_failure(&out, "error: cannot find the dataset");

    // A checkpoint from before bntrain recorded them takes the command line's dataset and
    // arithmetic, and the notice does not call them unused.
    let mut old = bntrain::model::checkpoint::Checkpoint::load(&ckpt).unwrap();
    old.trained_on = None;
    old.save(&ckpt).unwrap();
    let out = bntrain(&[&base[..], &["--precision", "f32", "--lr", "0.5", "--steps", "120", "--resume", s(&ckpt), "--json"]].concat());
    let resumed = last_json(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not used: --lr\n"), "{stderr}");
    assert_eq!((&resumed["dataset"], &resumed["device"]), (&json!("mnist"), &json!("cpu f32")), "{resumed}");
}

/// A checkpoint path that is not UTF-8 (Linux allows any bytes but / and NUL) is written, and
/// `--json` still ends with a JSON line that names it (lossily), not a panic.
#[test]
fn a_path_that_is_not_text_is_named_in_the_json_line() {
    use std::os::unix::ffi::OsStrExt;
    let e = env();
    let ckpt = e.dir.join(std::ffi::OsStr::from_bytes(b"net\xff.safetensors"));
    let out = Command::new(BIN)
        .args(["--device", "cpu", "train", "--data", s(&e.data), "--steps", "20", "--eval-every", "10", "--json", "--checkpoint"])
        .arg(&ckpt)
        .output()
        .unwrap();
    let last = last_json(&out);
    assert!(ckpt.is_file(), "the checkpoint was written");
    assert_eq!(last["checkpoint"], json!(ckpt.to_string_lossy()), "{last}");
    let study = e.dir.join(std::ffi::OsStr::from_bytes(b"runs\xfe"));
    let out = Command::new(BIN)
        .args(["--device", "cpu", "reproduce", "--quick", "--steps", "50", "--data", s(&e.data), "--name", "x", "--json", "--out"])
        .arg(&study)
        .output()
        .unwrap();
    let last = last_json(&out);
    assert_eq!(last["report"], json!(study.join("x").join("report.md").to_string_lossy()), "{last}");
    // The CPU records no device timeline.
    assert_eq!(last.get("comparison_timeline"), Some(&Value::Null), "{last}");
}

/// A checkpoint trained on images of another size, resumed without its `--data`: the error
/// says so and what to give, not a bare feature-count mismatch.
#[test]
fn resuming_on_images_of_another_size_asks_for_the_data_it_was_trained_on() {
    let e = env();
    let small = e.dir.join("small-images");
    std::fs::create_dir(&small).unwrap();
    for (prefix, count) in [("train", 120u32), ("t10k", 40)] {
        let mut images = vec![0, 0, 8, 3];
        [count, 20, 20].iter().for_each(|d| images.extend(d.to_be_bytes()));
        images.extend((0..count * 400).map(|i| (i * 7 % 251) as u8));
        let mut labels = vec![0, 0, 8, 1];
        labels.extend(count.to_be_bytes());
        labels.extend((0..count).map(|i| (i % 10) as u8));
        std::fs::write(small.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(small.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
    }
    let ckpt = e.dir.join("small.safetensors");
    last_json(&bntrain(&["--device", "cpu", "train", "--data", s(&small), "--steps", "10", "--eval-every", "10", "--checkpoint", s(&ckpt), "--json"]));
    let out = bntrain(&["--device", "cpu", "train", "--data", s(&e.data), "--resume", s(&ckpt), "--steps", "20"]);
    expect_failure(&out, "takes images of 400 pixels");
    expect_failure(&out, "give the --data it was trained on");
}
