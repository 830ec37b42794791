//! Progress of a run of training steps on stderr. On a terminal, a bar (indicatif) with a live
//! message; where stderr is no terminal (a log file, a pipe, CI, `docker logs`), indicatif
//! draws nothing, and a study of minutes would say nothing until its end: there, a plain line
//! at each tenth of the steps instead, with the last message. A step's message (its
//! evaluation) comes after its position, so a line waits for the next call to be written.

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use std::cell::{Cell, RefCell};
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// How many whole tenths of a run of `len` steps `position` has done (None for a run of none).
fn tenths_of(position: u64, len: u64) -> Option<u64> {
    position.min(len).saturating_mul(10).checked_div(len)
}

/// Lines written where stderr is no terminal: how many tenths of the run they have said, and
/// the position of a line not written yet (its step's message may still come).
struct Lines {
    prefix: String,
    len: u64,
    started: Instant,
    tenths_said: Cell<u64>,
    pending: Cell<Option<u64>>,
    message: RefCell<String>,
    sink: RefCell<Box<dyn Write>>,
}

impl Lines {
    fn line(&self, position: u64) -> String {
        let percent = position.saturating_mul(100).checked_div(self.len).unwrap_or(100);
        let message = self.message.borrow();
        let tail = if message.is_empty() { String::new() } else { format!("; {message}") };
        format!("{}: {position}/{} steps ({percent} %), {:.0} s{tail}", self.prefix, self.len, self.started.elapsed().as_secs_f64())
    }

    /// Writes the line waiting, if any.
    fn flush(&self) {
        if let Some(position) = self.pending.take() {
            let _ = writeln!(self.sink.borrow_mut(), "{}", self.line(position));
        }
    }

    /// A line for `position` where it reaches a tenth of the run not said yet (written at the
    /// next call); a line waiting for an earlier position is written first.
    fn reach(&self, position: u64) {
        if self.pending.get().is_some_and(|p| position > p) {
            self.flush();
        }
        let tenths = tenths_of(position, self.len).unwrap_or(10);
        if tenths > self.tenths_said.get() {
            self.tenths_said.set(tenths);
            self.pending.set(Some(position));
        }
    }
}

/// A run's progress: a bar on a terminal, lines elsewhere, nothing when hidden.
pub struct StepProgress {
    bar: ProgressBar,
    lines: Option<Lines>,
}

impl StepProgress {
    /// Nothing shown (a library call that did not ask for progress).
    pub fn hidden() -> Self {
        StepProgress { bar: ProgressBar::hidden(), lines: None }
    }

    /// `len` steps named `prefix`, from `position`: a bar where stderr is a terminal, lines
    /// where it is not.
    pub fn new(prefix: &str, len: u64, position: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let style = ProgressStyle::with_template("{prefix:>14.bold} [{bar:28.cyan/blue}] {pos:>6}/{len} steps {rate:>11} eta {eta:>4}  {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key("rate", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0} steps/s", state.per_sec());
                })
                .progress_chars("=> ");
            let bar = ProgressBar::new(len).with_style(style).with_prefix(prefix.to_string());
            bar.set_position(position);
            StepProgress { bar, lines: None }
        } else {
            Self::lines_into(prefix, len, position, Box::new(std::io::stderr()))
        }
    }

    /// Lines into `sink`, whatever stderr is (for tests).
    pub fn lines_into(prefix: &str, len: u64, position: u64, sink: Box<dyn Write>) -> Self {
        let lines = Lines {
            prefix: prefix.to_string(),
            len,
            started: Instant::now(),
            tenths_said: Cell::new(0),
            pending: Cell::new(None),
            message: RefCell::new(String::new()),
            sink: RefCell::new(sink),
        };
        // A resumed run's tenths already done are not said again.
        lines.tenths_said.set(tenths_of(position, len).unwrap_or(0));
        StepProgress { bar: ProgressBar::hidden(), lines: Some(lines) }
    }

    pub fn set_position(&self, position: u64) {
        self.bar.set_position(position);
        if let Some(lines) = &self.lines {
            lines.reach(position);
        }
    }

    pub fn set_message(&self, message: String) {
        match &self.lines {
            Some(lines) => {
                *lines.message.borrow_mut() = message;
                lines.flush();
            }
            None => self.bar.set_message(message),
        }
    }

    /// The bar left on its line (the study's phases stay on screen, one under the other).
    pub fn finish(&self) {
        self.bar.finish();
        self.lines.iter().for_each(Lines::flush);
    }

    /// The bar cleared (a command that prints its own result).
    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
        self.lines.iter().for_each(Lines::flush);
    }
}

impl Drop for StepProgress {
    /// A run that ends early (an error, an interrupt) still says where it was.
    fn drop(&mut self) {
        self.lines.iter().for_each(Lines::flush);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn said(sink: &Shared) -> Vec<String> {
        String::from_utf8(sink.0.lock().unwrap().clone()).unwrap().lines().map(str::to_string).collect()
    }

    /// Without a terminal, a line at each tenth reached (once, however the steps jump), with
    /// the last message; a resumed run starts past the tenths it had done.
    #[test]
    fn lines_say_each_tenth_once_with_the_last_message() {
        let sink = Shared::default();
        let p = StepProgress::lines_into("BN vs plain", 1000, 0, Box::new(sink.clone()));
        for step in [1, 50, 99] {
            p.set_position(step);
        }
        assert!(said(&sink).is_empty(), "{:?}", said(&sink));
        // Step 100's evaluation comes after its position: its line carries it.
        p.set_position(100);
        assert!(said(&sink).is_empty(), "{:?}", said(&sink));
        p.set_message("BN test acc 0.9".into());
        p.set_position(150);
        p.set_position(350);
        p.set_position(360);
        p.set_position(1000);
        let lines = said(&sink);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("BN vs plain: 100/1000 steps (10 %), ") && lines[0].ends_with("; BN test acc 0.9"), "{lines:?}");
        assert!(lines[1].starts_with("BN vs plain: 350/1000 steps (35 %)"), "{lines:?}");
        p.set_message("BN test acc 0.95".into());
        p.finish();
        let lines = said(&sink);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[2].starts_with("BN vs plain: 1000/1000 steps (100 %)") && lines[2].ends_with("; BN test acc 0.95"), "{lines:?}");
        drop(p);
        assert_eq!(said(&sink).len(), 3, "nothing said twice");

        let resumed_sink = Shared::default();
        let resumed = StepProgress::lines_into("train", 200, 150, Box::new(resumed_sink.clone()));
        resumed.set_position(151);
        resumed.set_position(160);
        // An interrupted run says where it was as it ends.
        drop(resumed);
        let lines = said(&resumed_sink);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("train: 160/200 steps (80 %)"), "{lines:?}");
    }
}
