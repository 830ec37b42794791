//! The training loop, generic over [`Backend`]: it decides which examples each step visits
//! and when to evaluate, and never asks where the computation runs.
//!
//! Batches: the epoch's order is a permutation drawn from a ChaCha8 stream keyed by
//! (seed, epoch) — or the identity with `--order sequential` — and an epoch is
//! ⌊N / B⌋ batches (the remainder is dropped, as PyTorch's `drop_last`). Since the order of
//! epoch e depends on nothing but (seed, e), a run resumed at step s visits exactly the
//! batches the uninterrupted run would have.

use crate::backend::{Backend, PendingPoint, PointResults, Probe, StatsMode, StepStats};
use crate::model::checkpoint::HistoryPoint;
use crate::model::{BatchOrder, ConfigError, TrainConfig};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, Ordering};

/// The order in which epoch `epoch` visits the `n` training examples.
pub fn epoch_order(order: BatchOrder, seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut indices: Vec<u32> = (0..n as u32).collect();
    if order == BatchOrder::Shuffled {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Stream 0 draws the initial weights; epoch e shuffles with stream e + 1.
        rng.set_stream(epoch + 1);
        indices.shuffle(&mut rng);
    }
    indices
}

/// Full batches per epoch.
pub fn batches_per_epoch(train_examples: usize, batch_size: usize) -> u64 {
    (train_examples / batch_size.max(1)) as u64
}

/// What a run does besides stepping.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Step to stop at (counted from the start of training, not of this call).
    pub until_step: u64,
    /// Evaluate on the test set every this many steps (and at the last step).
    pub eval_every: u64,
    /// Record the activation inputs of these units at each evaluation.
    pub probe: Option<Probe>,
    /// How the test set is normalized at evaluation points: population statistics (the
    /// default), or the whole test set's batch statistics (the source's training curves).
    pub eval_mode: StatsMode,
    /// Per network, training statistics carried over from an interrupted run: they belong
    /// to the first evaluation point of this one, so a resumed history equals an unbroken one.
    pub carried: Vec<StepStats>,
}

impl Schedule {
    pub fn new(until_step: u64, eval_every: u64) -> Self {
        Schedule { until_step, eval_every, probe: None, eval_mode: StatsMode::Population, carried: Vec::new() }
    }
}

/// One evaluation point of one network.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalRecord {
    pub point: HistoryPoint,
    /// `[test examples, probe.neurons]`, when a probe was asked for.
    pub probe: Vec<f32>,
}

/// What the loop reports as it goes.
pub enum Event<'a> {
    /// Network `net` was evaluated. The record is the caller's to take from (the study moves
    /// the probe's 10000 × 5 values to a worker instead of copying them).
    Evaluated { net: usize, record: &'a mut EvalRecord },
    /// `step` steps are done (sent after every run of steps, at most [`MAX_RUN`] long, and
    /// shorter where steps are slow: `run_limit`).
    Stepped { step: u64 },
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Finished { step: u64 },
    /// A stop was requested; every network is at the boundary of `step`. `pending` holds each
    /// network's training statistics since its last evaluation (see [`Schedule::carried`]).
    Interrupted { step: u64, pending: Vec<StepStats> },
}

impl Outcome {
    pub fn step(&self) -> u64 {
        match *self {
            Outcome::Finished { step } | Outcome::Interrupted { step, .. } => step,
        }
    }
}

/// Trains every network in `nets` in lockstep on the same batches, from `start_step` to
/// `schedule.until_step`, evaluating each on the test set every `schedule.eval_every` steps.
/// Checks for divergence at each evaluation: a non-finite loss or parameter stops the run
/// with [`Error::Diverged`] before anything is written. `stop` is polled between steps.
///
/// An evaluation point is begun ([`Backend::begin_point`]) once its step is queued, and
/// finished ([`Backend::finish_point`]) only once the next run of steps is queued too, so a
/// backend that queues both keeps the device busy while the host waits for the point's
/// results, checks them and hands them to `on_event` (still before the next run's
/// [`Event::Stepped`], so the events come in the order of the steps). A network that
/// diverged is hence found one run late, with that run queued; the error names the point's
/// step all the same. A stop requested from an `Evaluated` callback is seen after that run.
/// However the loop ends (finished, stopped or failed), the last point it began is finished
/// and reported network by network, up to the first network whose point fails or diverged.
pub fn train_lockstep(
    nets: &mut [&mut dyn Backend],
    config: &TrainConfig,
    train_examples: usize,
    start_step: u64,
    schedule: &Schedule,
    stop: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Outcome> {
    let mut points = Points { on_event, pending: None };
    let outcome = run_lockstep(nets, config, train_examples, start_step, schedule, stop, &mut points);
    // A point begun before the loop returned is a result all the same (a resumable history;
    // the nets evaluated before one that diverged); the loop's own error comes first.
    let flushed = points.finish(nets);
    outcome.and_then(|outcome| flushed.map(|()| outcome))
}

/// [`train_lockstep`]'s caller's `on_event`, and the evaluation point begun last, if it is
/// not finished yet: its step and each network's pending results.
struct Points<'a> {
    on_event: &'a mut dyn FnMut(Event<'_>),
    pending: Option<(u64, Vec<PendingPoint>)>,
}

impl Points<'_> {
    /// Begins a point at `step` on every network.
    fn begin(&mut self, nets: &mut [&mut dyn Backend], step: u64, schedule: &Schedule) -> Result<()> {
        debug_assert!(self.pending.is_none(), "a point is begun while another is pending");
        let mut begun = Vec::with_capacity(nets.len());
        for net in nets.iter_mut() {
            match net.begin_point(schedule.eval_mode, schedule.probe) {
                Ok(pending) => begun.push(pending),
                Err(e) => {
                    // Those begun are finished (and reported) on the way out.
                    self.pending = Some((step, begun));
                    return Err(e);
                }
            }
        }
        self.pending = Some((step, begun));
        Ok(())
    }

    /// Finishes the pending point, if any, network by network, reporting each record as it
    /// passes [`judge_point`]; stops at the first network that fails or diverged.
    fn finish(&mut self, nets: &mut [&mut dyn Backend]) -> Result<()> {
        let Some((step, pending)) = self.pending.take() else { return Ok(()) };
        for (index, (net, pending)) in nets.iter_mut().zip(pending).enumerate() {
            let mut record = judge_point(step, net.finish_point(pending)?)?;
            (self.on_event)(Event::Evaluated { net: index, record: &mut record });
        }
        Ok(())
    }
}

/// [`train_lockstep`]'s loop, which may return with a point pending in `points`.
fn run_lockstep(
    nets: &mut [&mut dyn Backend],
    config: &TrainConfig,
    train_examples: usize,
    start_step: u64,
    schedule: &Schedule,
    stop: Option<&AtomicBool>,
    points: &mut Points<'_>,
) -> Result<Outcome> {
    if schedule.eval_every == 0 {
        return Err(ConfigError::Invalid("the evaluation interval must be at least 1 step".into()).into());
    }
    let per_epoch = batches_per_epoch(train_examples, config.batch_size);
    if per_epoch == 0 {
        return Err(ConfigError::Invalid(format!("batch size {} is larger than the training set ({train_examples})", config.batch_size)).into());
    }
    for (net, carried) in nets.iter_mut().zip(&schedule.carried) {
        net.restore_step_stats(*carried)?;
    }
    let mut step = start_step;
    let mut loaded_epoch = None;
    // The fastest run so far, in seconds a step: it sets how long later runs may be.
    let mut fastest_step: Option<f64> = None;
    while step < schedule.until_step {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            // The point at this step (if any) takes the statistics up to it first.
            points.finish(nets)?;
            let mut pending = Vec::with_capacity(nets.len());
            for net in nets.iter_mut() {
                pending.push(net.take_step_stats()?);
            }
            return Ok(Outcome::Interrupted { step, pending });
        }
        let epoch = step / per_epoch;
        if loaded_epoch != Some(epoch) {
            let order = epoch_order(config.order, config.seed, epoch, train_examples);
            for net in nets.iter_mut() {
                net.set_epoch_order(&order)?;
            }
            loaded_epoch = Some(epoch);
        }
        // A run of steps up to the next evaluation point, the epoch's end or the end of
        // training, whichever comes first, and no longer than a stop request may wait
        // (run_limit): a backend may launch it at once.
        let batch = (step % per_epoch) as usize;
        let next_eval = (step / schedule.eval_every + 1).saturating_mul(schedule.eval_every);
        let run = next_eval.min((epoch + 1) * per_epoch).min(schedule.until_step).min(step + run_limit(fastest_step)) - step;
        let started = std::time::Instant::now();
        queue_steps(nets, batch, run as usize)?;
        // Only now, with the run queued behind it, is the last point waited for.
        points.finish(nets)?;
        let per_step = started.elapsed().as_secs_f64() / run as f64;
        fastest_step = Some(fastest_step.map_or(per_step, |fastest| fastest.min(per_step)));
        step += run;
        (points.on_event)(Event::Stepped { step });
        if step.is_multiple_of(schedule.eval_every) || step == schedule.until_step {
            points.begin(nets, step, schedule)?;
        }
    }
    Ok(Outcome::Finished { step })
}

/// `count` steps from batch `first` on every network: for two, in one go where their
/// backend can ([`Backend::train_steps_with`]), else one network after the other.
pub fn queue_steps(nets: &mut [&mut dyn Backend], first: usize, count: usize) -> Result<()> {
    if let [a, b] = nets {
        if a.train_steps_with(&mut **b, first, count)? {
            return Ok(());
        }
    }
    for net in nets.iter_mut() {
        net.train_steps(first, count)?;
    }
    Ok(())
}

/// The most steps [`train_lockstep`] hands a backend at once.
pub const MAX_RUN: u64 = 256;

/// How long a run of steps may take: a stop request (Ctrl-C, SIGTERM) is seen between runs,
/// and `docker stop` kills 10 s after its SIGTERM, time the checkpoint's write needs too.
const RUN_SECONDS: f64 = 0.5;

/// The first run's most steps, before any is timed.
const FIRST_RUN: u64 = 8;

/// The most steps the next run may have: [`MAX_RUN`], or fewer where the fastest step timed
/// so far says that many would take longer than [`RUN_SECONDS`] (a wide network on the CPU
/// takes tens of milliseconds a step). The fastest, so that one slow run (a scheduler's
/// pause, an evaluation waited for) does not shorten the rest. Queued GPU steps return at
/// once and keep MAX_RUN. Runs split anywhere give the same results: only the speed and
/// how soon a stop is seen depend on it.
fn run_limit(fastest_step: Option<f64>) -> u64 {
    match fastest_step {
        None => FIRST_RUN,
        Some(seconds) if seconds > 0.0 => (RUN_SECONDS / seconds).clamp(1.0, MAX_RUN as f64) as u64,
        Some(_) => MAX_RUN,
    }
}

/// A mean cross-entropy per example above this is no longer training: guessing scores
/// ln(classes), a confidently wrong network a few tens; only weights grown without bound
/// (a learning rate far too large) reach a thousand.
pub const EXPLODED_LOSS: f64 = 1000.0;

/// Evaluates `net` at `step` at once: [`Backend::begin_point`], [`Backend::finish_point`]
/// and [`judge_point`].
pub fn evaluate_point(net: &mut dyn Backend, step: u64, mode: StatsMode, probe: Option<Probe>) -> Result<EvalRecord> {
    let pending = net.begin_point(mode, probe)?;
    judge_point(step, net.finish_point(pending)?)
}

/// An evaluation point's record, or [`Error::Diverged`] where its training loss is not
/// finite or has blown up, or a parameter or running statistic is not finite.
pub fn judge_point(step: u64, results: PointResults) -> Result<EvalRecord> {
    let PointResults { stats, non_finite, eval } = results;
    if let Some(what) = divergence(&stats, non_finite) {
        return Err(Error::Diverged { step, what });
    }
    Ok(EvalRecord {
        point: HistoryPoint {
            step,
            train_loss: stats.mean_loss(),
            train_accuracy: stats.accuracy(),
            test_loss: eval.mean_loss(),
            test_accuracy: eval.accuracy(),
        },
        probe: eval.probe,
    })
}

/// Why a network counts as diverged, from its training sums since the last point and the
/// first non-finite parameter or running statistic, if any: the training loss is not finite
/// or has blown up, or such a value exists. `None` for a sound network.
pub fn divergence(stats: &StepStats, non_finite: Option<(String, f64)>) -> Option<String> {
    if !stats.loss_sum.is_finite() {
        return Some(format!("the training loss is {}", stats.loss_sum));
    }
    if stats.mean_loss() > EXPLODED_LOSS {
        return Some(format!(
            "the mean training loss per example is {:.3e}, over {EXPLODED_LOSS} (chance level is ln(classes), 2.3 for ten): the weights have blown up",
            stats.mean_loss()
        ));
    }
    non_finite.map(|(name, value)| format!("{name} contains a non-finite value ({value})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Evaluation, SplitKind};
    use crate::model::ModelParams;
    use std::cell::RefCell;

    /// Runs are as long as MAX_RUN where steps are fast, and short enough to see a stop
    /// within about RUN_SECONDS where they are slow; the first, untimed, is short.
    #[test]
    fn runs_are_shortened_where_steps_are_slow() {
        assert_eq!(run_limit(None), FIRST_RUN);
        assert_eq!(run_limit(Some(40e-6)), MAX_RUN, "a GPU's seed step");
        assert_eq!(run_limit(Some(0.0)), MAX_RUN, "queued steps that returned at once");
        assert_eq!(run_limit(Some(0.045)), 11, "a wide step on the CPU");
        assert_eq!(run_limit(Some(30.0)), 1, "never fewer than one step");
        assert_eq!(run_limit(Some(f64::INFINITY)), 1);
    }

    /// What the loop did, in order: what it asked of the backends and what it reported.
    #[derive(Clone, Debug, PartialEq)]
    enum Call {
        Queued { net: usize, first: usize, count: usize },
        Begun { net: usize },
        Finished { net: usize },
        Stepped(u64),
        Evaluated { net: usize, step: u64 },
    }

    /// A backend that computes nothing and logs the runs of steps it is handed and the
    /// points it queues and finishes.
    struct Recorder<'a> {
        net: usize,
        log: &'a RefCell<Vec<Call>>,
        /// The run starting at this batch fails, as a lost device would.
        fail_at_batch: Option<usize>,
        /// Points begun from this one on find a NaN among the parameters.
        diverge_at_point: Option<usize>,
        points: usize,
        /// Whether a point is queued and not finished.
        queued: bool,
    }

    impl<'a> Recorder<'a> {
        fn new(net: usize, log: &'a RefCell<Vec<Call>>) -> Self {
            Recorder { net, log, fail_at_batch: None, diverge_at_point: None, points: 0, queued: false }
        }
    }

    fn unused() -> Error {
        ConfigError::Invalid("the training loop does not call this".into()).into()
    }

    impl Backend for Recorder<'_> {
        fn device_name(&self) -> String {
            "recorder".into()
        }
        fn set_epoch_order(&mut self, _order: &[u32]) -> Result<()> {
            Ok(())
        }
        fn train_step(&mut self, batch: usize) -> Result<()> {
            self.train_steps(batch, 1)
        }
        fn train_steps(&mut self, first: usize, count: usize) -> Result<()> {
            self.log.borrow_mut().push(Call::Queued { net: self.net, first, count });
            match self.fail_at_batch {
                Some(batch) if batch == first => Err(Error::io("recorder", std::io::Error::other("device lost"))),
                _ => Ok(()),
            }
        }
        fn synchronize(&mut self) -> Result<()> {
            Ok(())
        }
        fn take_step_stats(&mut self) -> Result<StepStats> {
            Ok(StepStats::default())
        }
        fn restore_step_stats(&mut self, _stats: StepStats) -> Result<()> {
            Ok(())
        }
        fn evaluate(&mut self, _split: SplitKind, _mode: StatsMode, _probe: Option<Probe>) -> Result<Evaluation> {
            Err(unused())
        }
        fn begin_point(&mut self, _mode: StatsMode, _probe: Option<Probe>) -> Result<PendingPoint> {
            assert!(!self.queued, "net {}: a point begun while another is queued", self.net);
            self.log.borrow_mut().push(Call::Begun { net: self.net });
            self.points += 1;
            self.queued = true;
            Ok(PendingPoint::Queued)
        }
        fn finish_point(&mut self, pending: PendingPoint) -> Result<PointResults> {
            assert!(matches!(pending, PendingPoint::Queued) && self.queued, "net {}: finishing a point never queued", self.net);
            self.queued = false;
            self.log.borrow_mut().push(Call::Finished { net: self.net });
            let diverged = self.diverge_at_point.is_some_and(|p| self.points >= p);
            Ok(PointResults { non_finite: diverged.then(|| ("w1".to_string(), f64::NAN)), ..PointResults::default() })
        }
        fn predict_each(&mut self, _split: SplitKind, _count: usize, _mode: StatsMode) -> Result<Vec<u8>> {
            Err(unused())
        }
        fn params(&mut self) -> Result<ModelParams> {
            Err(unused())
        }
        fn first_non_finite(&mut self) -> Result<Option<(String, f64)>> {
            Err(unused())
        }
        fn set_params(&mut self, _params: &ModelParams) -> Result<()> {
            Err(unused())
        }
        fn gradients(&mut self) -> Result<Vec<Vec<f64>>> {
            Err(unused())
        }
        fn velocity(&mut self) -> Result<Vec<Vec<f64>>> {
            Err(unused())
        }
        fn set_velocity(&mut self, _velocity: &[Vec<f64>]) -> Result<()> {
            Err(unused())
        }
    }

    /// Two recorders trained to step 10, evaluated every 4 steps (runs of 4, 4 and 2 steps
    /// within one epoch); `adjust` sets their failures, and a stop is requested at the
    /// `Stepped` event of `stop_at`.
    fn record(adjust: impl Fn(&mut Recorder<'_>), stop_at: Option<u64>) -> (Result<Outcome>, Vec<Call>) {
        let log = RefCell::new(Vec::new());
        let stop = AtomicBool::new(false);
        let config = TrainConfig::seed();
        let (mut a, mut b) = (Recorder::new(0, &log), Recorder::new(1, &log));
        adjust(&mut a);
        adjust(&mut b);
        let outcome = {
            let mut nets: [&mut dyn Backend; 2] = [&mut a, &mut b];
            train_lockstep(&mut nets, &config, config.batch_size * 100, 0, &Schedule::new(10, 4), Some(&stop), &mut |event| {
                let call = match event {
                    Event::Stepped { step } => {
                        if stop_at == Some(step) {
                            stop.store(true, Ordering::Relaxed);
                        }
                        Call::Stepped(step)
                    }
                    Event::Evaluated { net, record } => Call::Evaluated { net, step: record.point.step },
                };
                log.borrow_mut().push(call);
            })
        };
        (outcome, log.into_inner())
    }

    fn queued(first: usize, count: usize) -> [Call; 2] {
        [Call::Queued { net: 0, first, count }, Call::Queued { net: 1, first, count }]
    }

    fn begun() -> [Call; 2] {
        [Call::Begun { net: 0 }, Call::Begun { net: 1 }]
    }

    /// Each network's point finished, then reported.
    fn finished(step: u64) -> [Call; 4] {
        [Call::Finished { net: 0 }, Call::Evaluated { net: 0, step }, Call::Finished { net: 1 }, Call::Evaluated { net: 1, step }]
    }

    /// What an unbroken run of 10 steps, evaluated every 4, asks and reports, in order.
    fn unbroken_log() -> Vec<Call> {
        [
            queued(0, 4).to_vec(),
            vec![Call::Stepped(4)],
            begun().to_vec(),
            queued(4, 4).to_vec(),
            finished(4).to_vec(),
            vec![Call::Stepped(8)],
            begun().to_vec(),
            queued(8, 2).to_vec(),
            finished(8).to_vec(),
            vec![Call::Stepped(10)],
            begun().to_vec(),
            finished(10).to_vec(),
        ]
        .concat()
    }

    /// The events alone.
    fn events(log: Vec<Call>) -> Vec<Call> {
        log.into_iter().filter(|c| matches!(c, Call::Stepped(_) | Call::Evaluated { .. })).collect()
    }

    fn evaluated(step: u64) -> [Call; 2] {
        [Call::Evaluated { net: 0, step }, Call::Evaluated { net: 1, step }]
    }

    #[test]
    fn events_come_in_the_order_of_the_steps() {
        let (outcome, log) = record(|_| {}, None);
        assert_eq!(outcome.unwrap(), Outcome::Finished { step: 10 });
        let expected = events(unbroken_log());
        assert_eq!(
            expected,
            [vec![Call::Stepped(4)], evaluated(4).to_vec(), vec![Call::Stepped(8)], evaluated(8).to_vec(), vec![Call::Stepped(10)], evaluated(10).to_vec()]
                .concat()
        );
        assert_eq!(events(log), expected);
    }

    #[test]
    fn a_point_is_finished_once_the_next_run_is_queued() {
        let (outcome, log) = record(|_| {}, None);
        assert_eq!(outcome.unwrap(), Outcome::Finished { step: 10 });
        assert_eq!(log, unbroken_log());
    }

    #[test]
    fn a_pending_point_is_finished_when_queuing_fails() {
        let (outcome, log) = record(|r| r.fail_at_batch = (r.net == 1).then_some(4), None);
        let err = outcome.unwrap_err();
        assert!(err.to_string().contains("device lost"), "{err}");
        let expected: Vec<Call> = [queued(0, 4).to_vec(), vec![Call::Stepped(4)], begun().to_vec(), queued(4, 4).to_vec(), finished(4).to_vec()].concat();
        assert_eq!(log, expected);
    }

    #[test]
    fn a_pending_point_is_finished_at_a_stop() {
        let (outcome, log) = record(|_| {}, Some(4));
        assert_eq!(outcome.unwrap(), Outcome::Interrupted { step: 4, pending: vec![StepStats::default(); 2] });
        let expected: Vec<Call> = [queued(0, 4).to_vec(), vec![Call::Stepped(4)], begun().to_vec(), finished(4).to_vec()].concat();
        assert_eq!(log, expected);
    }

    #[test]
    fn divergence_is_found_one_run_late_and_names_the_points_step() {
        // Net 1's second point (step 8) finds a NaN: net 0's record of that point is
        // reported, net 1's is not, and nothing after it runs.
        let (outcome, log) = record(|r| r.diverge_at_point = (r.net == 1).then_some(2), None);
        match outcome {
            Err(Error::Diverged { step, what }) => {
                assert_eq!(step, 8);
                assert!(what.contains("w1 contains a non-finite value"), "{what}");
            }
            other => panic!("expected a divergence at step 8, got {other:?}"),
        }
        // The unbroken run up to the last run queued, then point 8 up to net 1's finish.
        let mut expected = unbroken_log();
        let last_queued = expected.iter().position(|c| *c == Call::Queued { net: 1, first: 8, count: 2 }).unwrap();
        expected.truncate(last_queued + 1);
        expected.extend([Call::Finished { net: 0 }, Call::Evaluated { net: 0, step: 8 }, Call::Finished { net: 1 }]);
        assert_eq!(log, expected);
    }

    #[test]
    fn judged_points_refuse_what_has_diverged() {
        let good = PointResults { stats: StepStats { steps: 2, examples: 120, loss_sum: 60.0, correct: 90 }, ..PointResults::default() };
        let record = judge_point(7, good.clone()).unwrap();
        assert_eq!((record.point.step, record.point.train_loss, record.point.train_accuracy), (7, 0.5, 0.75));
        let nan_loss = PointResults { stats: StepStats { loss_sum: f64::NAN, ..good.stats }, ..good.clone() };
        let exploded = PointResults { stats: StepStats { loss_sum: 120.0 * 2.0 * EXPLODED_LOSS, ..good.stats }, ..good.clone() };
        let inf_param = PointResults { non_finite: Some(("gamma2".into(), f64::INFINITY)), ..good };
        for (results, says) in [(nan_loss, "training loss is NaN"), (exploded, "blown up"), (inf_param, "gamma2 contains a non-finite value (inf)")] {
            match judge_point(7, results) {
                Err(Error::Diverged { step: 7, what }) => assert!(what.contains(says), "{what}"),
                other => panic!("expected a divergence ({says}), got {other:?}"),
            }
        }
    }
}
