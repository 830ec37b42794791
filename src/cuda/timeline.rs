//! Where a training run's device time goes between its runs of steps and its evaluation
//! points (`BNTRAIN_TIMELINE=1`, [`CudaOptions::timeline`](super::CudaOptions::timeline)):
//! the backend records a timing event at the start and end of every run of steps and every
//! point, in the order it queues them, and [`spans`] turns their times into a row per kind
//! of interval. A training run with a point every 50 steps took 0.58–0.66 ms more per point
//! than one with a single point, where a point alone takes 0.26 ms (docs/perf.md,
//! twenty-fifth session): these rows say whether the rest is idle device time between the
//! launches, a point slower beside the steps, or steps slower after a point.
//!
//! With `BNTRAIN_EVAL_STREAM=1` a point runs on a stream of its own, beside the next run:
//! its end mark is on that stream, so the point and the run after it overlap and the gap
//! between them may come out negative. The rows are for the default, one stream.

use super::{context::Gpu, CudaError};
use crate::backend::TimelineSpan;
use cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream};

/// What an event marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// A run of `steps` training steps is queued next.
    RunStart { steps: usize },
    RunEnd,
    /// An evaluation point's copies and kernels are queued next (on the training stream).
    PointStart,
    /// The point's work is queued (on its lane: the training stream or a stream of its own).
    PointEnd,
}

/// Marks recorded at most: a 40000-step run with a point every 50 steps records 3200; past
/// the cap, recording stops (the rows then cover the run's beginning, and one says so).
const MAX_MARKS: usize = 100_000;

/// The events of one backend, in the order they were queued.
#[derive(Default)]
pub struct Timeline {
    marks: Vec<(Mark, CudaEvent)>,
    /// Marks not recorded past [`MAX_MARKS`].
    dropped: usize,
}

impl Timeline {
    /// Records `mark` on `stream` (timing events, a microsecond or two of host time each).
    pub fn record(&mut self, gpu: &Gpu, stream: &CudaStream, mark: Mark) -> Result<(), CudaError> {
        if self.marks.len() >= MAX_MARKS {
            self.dropped += 1;
            return Ok(());
        }
        let event = gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        event.record(stream)?;
        self.marks.push((mark, event));
        Ok(())
    }

    /// The rows of [`spans`], once every recorded event has completed (the caller has
    /// synchronized); None before any mark.
    pub fn summarize(&self) -> Result<Option<Vec<TimelineSpan>>, CudaError> {
        let Some((first_mark, _)) = self.marks.first() else { return Ok(None) };
        // Each event timed from the one before, added up in f64: an f32 count of
        // milliseconds from the first would resolve only ~2 µs after 16 s.
        let mut timed = vec![(*first_mark, 0.0)];
        for pair in self.marks.windows(2) {
            let since = f64::from(pair[0].1.elapsed_ms(&pair[1].1)?) * 1e3;
            timed.push((pair[1].0, timed[timed.len() - 1].1 + since));
        }
        let mut rows = spans(&timed);
        if self.dropped > 0 {
            rows.push(TimelineSpan { what: "marks past the cap, not recorded", count: self.dropped, total_us: 0.0, median_us: 0.0 });
        }
        Ok(Some(rows))
    }
}

/// Rows by kind of interval between consecutive marks (times in µs from the first): runs
/// (their µs per step; those right after a point apart), points, the gaps around them,
/// any other (a run a failure left without its end mark), and the whole span. A kind that
/// never occurs has no row; every interval is in exactly one.
pub fn spans(marks: &[(Mark, f64)]) -> Vec<TimelineSpan> {
    const RUN_AFTER_POINT: &str = "run right after a point (per step)";
    const RUN: &str = "run not right after a point (per step)";
    const POINT: &str = "point";
    const BEFORE_POINT: &str = "gap: run end to point start";
    const AFTER_POINT: &str = "gap: point end to run start";
    const BETWEEN_RUNS: &str = "gap: run end to run start";
    const OTHER: &str = "other interval";
    let mut rows: Vec<(&'static str, Vec<f64>, f64)> = Vec::new();
    let mut add = |what: &'static str, value: f64, total: f64| match rows.iter_mut().find(|(w, ..)| *w == what) {
        Some((_, values, sum)) => {
            values.push(value);
            *sum += total;
        }
        None => rows.push((what, vec![value], total)),
    };
    for (i, pair) in marks.windows(2).enumerate() {
        let ((from, start), (to, end)) = (pair[0], pair[1]);
        let us = end - start;
        match (from, to) {
            (Mark::RunStart { steps }, Mark::RunEnd) if steps > 0 => {
                let after_point = i > 0 && marks[i - 1].0 == Mark::PointEnd;
                add(if after_point { RUN_AFTER_POINT } else { RUN }, us / steps as f64, us);
            }
            (Mark::PointStart, Mark::PointEnd) => add(POINT, us, us),
            (Mark::RunEnd, Mark::PointStart) => add(BEFORE_POINT, us, us),
            (Mark::PointEnd, Mark::RunStart { .. }) => add(AFTER_POINT, us, us),
            (Mark::RunEnd, Mark::RunStart { .. }) => add(BETWEEN_RUNS, us, us),
            _ => add(OTHER, us, us),
        }
    }
    let mut spans: Vec<TimelineSpan> = rows
        .into_iter()
        .map(|(what, mut values, total_us)| {
            values.sort_by(f64::total_cmp);
            TimelineSpan { what, count: values.len(), total_us, median_us: values[values.len() / 2] }
        })
        .collect();
    if let (Some((_, first)), Some((_, last))) = (marks.first(), marks.last()) {
        spans.push(TimelineSpan { what: "whole span", count: 1, total_us: last - first, median_us: last - first });
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(spans: &'a [TimelineSpan], what: &str) -> &'a TimelineSpan {
        spans.iter().find(|s| s.what == what).unwrap_or_else(|| panic!("no row {what:?} in {spans:?}"))
    }

    #[test]
    fn intervals_are_sorted_by_kind() {
        use Mark::*;
        // Run of 10 steps (100 µs), point (30), 5 µs idle, run of 10 (120: after the point),
        // point (40), 7 µs idle, run of 4 (20), run of 2 (10) after 1 µs.
        let marks = [
            (RunStart { steps: 10 }, 0.0), (RunEnd, 100.0), (PointStart, 100.0), (PointEnd, 130.0),
            (RunStart { steps: 10 }, 135.0), (RunEnd, 255.0), (PointStart, 256.0), (PointEnd, 296.0),
            (RunStart { steps: 4 }, 303.0), (RunEnd, 323.0), (RunStart { steps: 2 }, 324.0), (RunEnd, 334.0),
        ];
        let spans = spans(&marks);
        let other = row(&spans, "run not right after a point (per step)");
        assert_eq!((other.count, other.total_us, other.median_us), (2, 110.0, 10.0));
        let after = row(&spans, "run right after a point (per step)");
        assert_eq!((after.count, after.total_us, after.median_us), (2, 140.0, 12.0));
        let point = row(&spans, "point");
        assert_eq!((point.count, point.total_us, point.median_us), (2, 70.0, 40.0));
        assert_eq!(row(&spans, "gap: run end to point start").total_us, 1.0);
        let idle = row(&spans, "gap: point end to run start");
        assert_eq!((idle.count, idle.total_us, idle.median_us), (2, 12.0, 7.0));
        assert_eq!(row(&spans, "gap: run end to run start").total_us, 1.0);
        assert_eq!(row(&spans, "whole span").total_us, 334.0);
        // Every interval is in exactly one row.
        let parts: f64 = spans.iter().filter(|s| s.what != "whole span").map(|s| s.total_us).sum();
        assert_eq!(parts, 334.0);
    }

    #[test]
    fn no_marks_no_rows_and_one_mark_a_zero_span() {
        assert!(spans(&[]).is_empty());
        let one = spans(&[(Mark::PointStart, 5.0)]);
        assert_eq!(one, vec![TimelineSpan { what: "whole span", count: 1, total_us: 0.0, median_us: 0.0 }]);
    }

    #[test]
    fn a_run_left_without_its_end_is_an_other_interval() {
        use Mark::*;
        // A failed run (no RunEnd), then a point: the 50 µs from its start to the point.
        let spans = spans(&[(RunStart { steps: 5 }, 0.0), (PointStart, 50.0), (PointEnd, 60.0)]);
        let other = row(&spans, "other interval");
        assert_eq!((other.count, other.total_us), (1, 50.0));
        assert_eq!(row(&spans, "point").total_us, 10.0);
        assert!(spans.iter().all(|s| !s.what.starts_with("run")), "{spans:?}");
    }
}
