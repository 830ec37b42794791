//! Where a fused step's time goes (`bntrain bench --trace`): the fused kernel records, per
//! block and grid barrier, its SM clock and the GPU's global timer on arriving and on
//! leaving (`fused_trace` in cuda/fused_step.cu); this module turns one launch's records
//! into a row per phase of a step (the work between two grid barriers).

use crate::backend::PhaseTiming;

/// Barriers of a launch the kernel records at most (FUSED_TRACE_BARRIERS).
pub const TRACE_BARRIERS: usize = 64;
/// Slots per block: the barriers, the launch's start, its end (FUSED_TRACE_SLOTS).
pub const TRACE_SLOTS: usize = TRACE_BARRIERS + 2;
/// u64 fields per slot: clock in, clock out, timer in, timer out.
const FIELDS: usize = 4;

/// The phases of a step, named by what runs before each of its grid barriers, for a
/// network with `hidden` hidden layers (layers counted from 0 at the input), as
/// cuda/fused_step.cu orders them: the hidden layers' forwards, then the backward layer by
/// layer down to layer 1, the top one with the logits and softmax that every block computes
/// before it (layer 0's backward has no barrier of its own and runs before the next step's
/// first one; with one hidden layer, it has).
pub fn phase_names(hidden: usize) -> Vec<String> {
    let mut names = Vec::new();
    if hidden == 0 {
        return names;
    }
    if hidden == 1 {
        names.push("updates, forward layer 0".to_string());
    } else {
        names.push("backward layer 0 (step before), updates, forward layer 0".to_string());
        names.extend((1..hidden).map(|l| format!("update, forward layer {l}")));
    }
    names.push(format!("logits, softmax, loss, output layer's gradients, backward layer {}", hidden - 1));
    names.extend((1..hidden.saturating_sub(1)).rev().map(|l| format!("backward layer {l}")));
    names
}

/// The phases of a step of the one-barrier kernel (cuda/fused_replicated.cuh,
/// REPLICATED_TRACE_STRIDE): its grid barrier follows layer 0's forward; the other phases
/// end at marks of the kernel's own (recorded as barriers with no wait, between the barriers'
/// slots), the last after layer 0's backward, which runs on into the next step's forward.
pub fn replicated_phase_names() -> Vec<String> {
    [
        "forward layer 0",
        "copy of a0 and layer 1's weights (to a mark, no barrier)",
        "replicated forward, softmax (to a mark)",
        "replicated backward, layer 0's dA (to a mark)",
        "backward layer 0 (to a mark)",
    ]
    .map(String::from)
    .to_vec()
}

/// The barriers a traced launch of `steps` steps may have, given the phases of a step (one
/// barrier per phase, and one at the end), and the most steps that fit the record.
pub fn traceable_steps(phases: usize, steps: usize) -> usize {
    steps.min((TRACE_BARRIERS - 1) / phases.max(1))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// One row per phase from a launch's records `raw` ([blocks, TRACE_SLOTS, 4]) of `steps`
/// steps whose phases are `names`: the median over the steps after the first (its caches are
/// cold and it has no deferred updates; all steps if there is one) of
/// - the phase's wall time: from the first block leaving the previous barrier (or starting)
///   to the last one arriving at this one, by the global timer;
/// - the work of a block, median and largest over the blocks (SM clock, in µs at the rate
///   block 0's clock ran against the timer over the launch), and which block was slowest
///   most often;
/// - the barrier: from the last arrival to the last departure (global timer).
///
/// Fails (with why) on records that do not fit: too short, a block that recorded nothing,
/// timers that run backwards.
pub fn summarize(raw: &[u64], blocks: usize, steps: usize, names: &[String]) -> Result<Vec<PhaseTiming>, String> {
    let phases = names.len();
    if blocks == 0 || steps == 0 || phases == 0 {
        return Err("no blocks, steps or phases".into());
    }
    let barriers = steps * phases + 1;
    if barriers > TRACE_BARRIERS {
        return Err(format!("{barriers} barriers, the record holds {TRACE_BARRIERS}"));
    }
    if raw.len() != blocks * TRACE_SLOTS * FIELDS {
        return Err(format!("{} values, want {blocks} blocks × {TRACE_SLOTS} slots × {FIELDS}", raw.len()));
    }
    let at = |block: usize, slot: usize, field: usize| raw[(block * TRACE_SLOTS + slot) * FIELDS + field];
    let (start, end) = (TRACE_BARRIERS, TRACE_BARRIERS + 1);
    // Block 0's clock rate against the timer over the whole launch.
    let cycles = at(0, end, 0).checked_sub(at(0, start, 0)).filter(|&c| c > 0);
    let nanos = at(0, end, 2).checked_sub(at(0, start, 2)).filter(|&t| t > 0);
    let (Some(cycles), Some(nanos)) = (cycles, nanos) else {
        return Err("block 0's start and end records are missing or out of order".into());
    };
    let cycles_per_us = cycles as f64 / nanos as f64 * 1e3;
    // Leaving the barrier before k (the launch's start for k = 0), clock and timer.
    let left = |block: usize, k: usize| if k == 0 { (at(block, start, 0), at(block, start, 2)) } else { (at(block, k - 1, 1), at(block, k - 1, 3)) };
    for block in 0..blocks {
        for k in 0..barriers {
            let (clock_out, timer_out) = left(block, k);
            let ordered = clock_out != 0 && clock_out <= at(block, k, 0) && at(block, k, 0) <= at(block, k, 1) && timer_out <= at(block, k, 2) && at(block, k, 2) <= at(block, k, 3);
            if !ordered {
                return Err(format!("block {block}'s record of barrier {k} is missing or out of order"));
            }
        }
    }
    let first_step = if steps > 1 { 1 } else { 0 };
    let mut rows = Vec::with_capacity(phases);
    for (p, name) in names.iter().enumerate() {
        let (mut wall, mut work, mut worst, mut barrier) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut slowest = vec![0usize; blocks];
        for step in first_step..steps {
            let k = step * phases + p;
            let first_out = (0..blocks).map(|b| left(b, k).1).min().unwrap_or(0);
            let last_in = (0..blocks).map(|b| at(b, k, 2)).max().unwrap_or(0);
            let last_out = (0..blocks).map(|b| at(b, k, 3)).max().unwrap_or(0);
            wall.push(last_in.saturating_sub(first_out) as f64 / 1e3);
            barrier.push(last_out.saturating_sub(last_in) as f64 / 1e3);
            let per_block: Vec<f64> = (0..blocks).map(|b| (at(b, k, 0) - left(b, k).0) as f64 / cycles_per_us).collect();
            let (max_block, max) = per_block.iter().copied().enumerate().fold((0, f64::MIN), |m, (b, w)| if w > m.1 { (b, w) } else { m });
            slowest[max_block] += 1;
            worst.push(max);
            work.extend(per_block);
        }
        let slowest_block = slowest.iter().enumerate().max_by_key(|&(b, &n)| (n, std::cmp::Reverse(b))).map_or(0, |(b, _)| b);
        rows.push(PhaseTiming {
            phase: name.clone(),
            wall_us: median(wall),
            block_work_us: median(work),
            block_work_max_us: median(worst),
            slowest_block,
            barrier_us: median(barrier),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_kernels_barriers() {
        // As cuda/fused_step.cu's barrier count (and the emulation's): hidden + (hidden > 1 ? hidden − 1 : 1).
        for hidden in 1..6 {
            assert_eq!(phase_names(hidden).len(), hidden + if hidden > 1 { hidden - 1 } else { 1 }, "{hidden} hidden");
        }
        assert_eq!(
            phase_names(2),
            [
                "backward layer 0 (step before), updates, forward layer 0",
                "update, forward layer 1",
                "logits, softmax, loss, output layer's gradients, backward layer 1",
            ]
        );
        assert_eq!(phase_names(3)[4], "backward layer 1");
        assert!(phase_names(0).is_empty());
        assert_eq!(traceable_steps(phase_names(2).len(), 100), 21);
        assert_eq!(traceable_steps(3, 3), 3);
        // The one-barrier kernel: a barrier and four marks a step.
        assert_eq!(replicated_phase_names().len(), 5);
        assert_eq!(traceable_steps(replicated_phase_names().len(), 100), 12);
    }

    /// A synthetic launch: block b's clock runs at 2 cycles per ns from an offset of its own;
    /// phase p of each step takes `work(p, b)` ns in block b, and a barrier releases 100 ns
    /// after its last arrival.
    fn synthetic(blocks: usize, steps: usize, phases: usize, work: impl Fn(usize, usize) -> u64) -> Vec<u64> {
        let mut raw = vec![0u64; blocks * TRACE_SLOTS * FIELDS];
        let mut set = |b: usize, slot: usize, f: usize, v: u64| raw[(b * TRACE_SLOTS + slot) * FIELDS + f] = v;
        let clock = |b: usize, t: u64| 1_000_000 * (b as u64 + 1) + 2 * t;
        let mut out = vec![1_000u64; blocks];
        for (b, &t) in out.iter().enumerate() {
            set(b, TRACE_BARRIERS, 0, clock(b, t));
            set(b, TRACE_BARRIERS, 2, t);
        }
        for k in 0..steps * phases + 1 {
            let arrive: Vec<u64> = (0..blocks).map(|b| out[b] + if k < steps * phases { work(k % phases, b) } else { 10 }).collect();
            let release = arrive.iter().max().unwrap() + 100;
            for b in 0..blocks {
                set(b, k, 0, clock(b, arrive[b]));
                set(b, k, 1, clock(b, release));
                set(b, k, 2, arrive[b]);
                set(b, k, 3, release);
                out[b] = release;
            }
        }
        for (b, &t) in out.iter().enumerate() {
            set(b, TRACE_BARRIERS + 1, 0, clock(b, t + 50));
            set(b, TRACE_BARRIERS + 1, 2, t + 50);
        }
        raw
    }

    #[test]
    fn phases_are_timed_from_the_records() {
        let names = phase_names(2);
        // Phase p takes (p + 1) µs in every block but block 3, which takes 5 µs longer in phase 1.
        let raw = synthetic(5, 4, names.len(), |p, b| 1_000 * (p as u64 + 1) + if p == 1 && b == 3 { 5_000 } else { 0 });
        let rows = summarize(&raw, 5, 4, &names).unwrap();
        assert_eq!(rows.len(), 3);
        for (p, row) in rows.iter().enumerate() {
            let slow = if p == 1 { 5.0 } else { 0.0 };
            assert!((row.wall_us - (p as f64 + 1.0 + slow)).abs() < 1e-9, "{row:?}");
            assert!((row.block_work_us - (p as f64 + 1.0)).abs() < 1e-9, "{row:?}");
            assert!((row.block_work_max_us - (p as f64 + 1.0 + slow)).abs() < 1e-9, "{row:?}");
            assert!((row.barrier_us - 0.1).abs() < 1e-9, "{row:?}");
            if p == 1 {
                assert_eq!(row.slowest_block, 3);
            }
        }
    }

    #[test]
    fn records_that_do_not_fit_are_refused() {
        let names = phase_names(2);
        let raw = synthetic(3, 2, names.len(), |_, _| 1_000);
        assert!(summarize(&raw, 3, 2, &names).is_ok());
        assert!(summarize(&raw, 3, 3, &names).unwrap_err().contains("barrier 7"), "a third step was not recorded");
        assert!(summarize(&raw[1..], 3, 2, &names).is_err());
        assert!(summarize(&raw, 3, 30, &names).unwrap_err().contains("the record holds"));
        let mut broken = raw.clone();
        broken[(TRACE_SLOTS + 4) * FIELDS + 2] = 0; // block 1, barrier 4: timer in before leaving barrier 3
        assert!(summarize(&broken, 3, 2, &names).unwrap_err().contains("block 1's record of barrier 4"));
        let mut no_end = raw;
        no_end[(TRACE_BARRIERS + 1) * FIELDS] = 0;
        assert!(summarize(&no_end, 3, 2, &names).unwrap_err().contains("block 0's start and end"));
    }
}
