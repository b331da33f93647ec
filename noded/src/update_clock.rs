//! When did a periodically updated counter take the value a read saw?
//!
//! A GPU's energy counter is updated by the driver every few tens of milliseconds, not when it
//! is read: a read at `t` returns the value of the last update at or before `t`. Stamping that
//! value with the read's time puts energy late by up to one update period, and by a varying
//! amount when the reads drift against the updates (they do: the sampler reads at about half the
//! period, with scheduling jitter). A power trace built from such stamps shows dips and spikes
//! that are not there: a 100 ms bin can get half its energy (seen in a demo: one point at about
//! 45 % of the true power on two GPUs at once).
//!
//! [`UpdateClock`] recovers the update instants. Each new value brackets its update between the
//! previous read (which saw the old value) and this one. Updates come every `period`, so the
//! bracket carried forward by whole periods (widened by a small slack for period error and
//! jitter) and intersected with each new bracket narrows to the true instant; the estimate is
//! the middle of what is left. If a new bracket contradicts the carried one (the driver skipped
//! or moved an update), the estimate starts again from the new bracket alone. The value's
//! instant is then off by at most half the narrowed bracket: about the slack once a few reads
//! at different phases have been seen, never more than the read spacing.

/// Estimates the instants of a periodic counter's updates from the reads that saw them.
#[derive(Debug, Clone)]
pub struct UpdateClock {
    period_ns: f64,
    /// Widening per period a bracket is carried (0.2 % of the period, at least 20 µs): the
    /// detected period's error and the driver's jitter. A bracket that still contradicts the
    /// newer ones is dropped, with the older ones.
    slack_ns: f64,
    last_value: Option<u64>,
    last_read_ns: u64,
    /// The last [`WINDOW`] brackets, each with the number of the update it holds.
    brackets: std::collections::VecDeque<(u64, u64, u64)>,
    /// The number of the last update seen.
    update_no: u64,
    /// The last instant returned (estimates only move forward).
    last_stamp: u64,
}

/// Brackets intersected for an estimate.
pub const WINDOW: usize = 32;

/// What a read told about the counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// The first read: its value's update instant is unknown (stamp it with the read).
    First,
    /// The same value as the previous read: no update since.
    Same,
    /// A new value, taken by an update at about this instant.
    New(u64),
}

impl UpdateClock {
    /// A clock for a counter updated every `period_ns` (as detected at start).
    pub fn new(period_ns: u64) -> Self {
        let period = period_ns.max(1) as f64;
        Self {
            period_ns: period,
            slack_ns: (period / 500.0).max(20_000.0),
            last_value: None,
            last_read_ns: 0,
            brackets: std::collections::VecDeque::with_capacity(WINDOW),
            update_no: 0,
            last_stamp: 0,
        }
    }

    /// A read at `at_ns` saw `value`.
    pub fn observe(&mut self, at_ns: u64, value: u64) -> Observed {
        let prev_read = std::mem::replace(&mut self.last_read_ns, at_ns);
        let Some(prev_value) = self.last_value.replace(value) else {
            self.last_stamp = at_ns;
            return Observed::First;
        };
        if prev_value == value {
            return Observed::Same;
        }
        let (a, b) = (prev_read as f64, at_ns.max(prev_read + 1) as f64);
        // Which update this is: whole periods since the previous estimate (narrow once a few
        // brackets are in; this bracket's own width is under a period).
        if !self.brackets.is_empty() {
            let k = (((a + b) / 2.0 - self.last_stamp as f64) / self.period_ns)
                .round()
                .max(1.0);
            self.update_no += k as u64;
        }
        if self.brackets.len() == WINDOW {
            self.brackets.pop_front();
        }
        self.brackets
            .push_back((a as u64, b as u64, self.update_no));
        // Carry every bracket in the window forward to this update and intersect them, newest
        // first; a bracket that contradicts the newer ones (the driver moved an update) and all
        // older than it are dropped.
        let (mut lo, mut hi) = (a, b);
        let mut keep = 1;
        for &(oa, ob, no) in self.brackets.iter().rev().skip(1) {
            let m = (self.update_no - no) as f64;
            let shift = m * self.period_ns;
            let widen = m * self.slack_ns;
            let (nlo, nhi) = (
                lo.max(oa as f64 + shift - widen),
                hi.min(ob as f64 + shift + widen),
            );
            if nlo >= nhi {
                break;
            }
            (lo, hi) = (nlo, nhi);
            keep += 1;
        }
        while self.brackets.len() > keep {
            self.brackets.pop_front();
        }
        let estimate = ((lo + hi) / 2.0).round() as u64;
        let stamp = estimate.max(self.last_stamp + 1).min(at_ns);
        self.last_stamp = stamp;
        Observed::New(stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter updated every `period` from `phase`, read at the given instants: the stamps
    /// of the new values against the true update instants.
    fn errors(period: u64, phase: u64, reads: &[u64]) -> Vec<i64> {
        errors_detected(period, period, phase, reads)
    }

    /// As [`errors`], with the clock told the period is `detected`.
    fn errors_detected(period: u64, detected: u64, phase: u64, reads: &[u64]) -> Vec<i64> {
        let mut c = UpdateClock::new(detected);
        let update_before = |t: u64| phase + (t.saturating_sub(phase) / period) * period;
        let mut out = Vec::new();
        for &t in reads {
            let u = update_before(t);
            match c.observe(t, u) {
                Observed::New(s) => out.push(s as i64 - u as i64),
                Observed::First | Observed::Same => {}
            }
        }
        out
    }

    #[test]
    fn jittered_reads_converge_on_the_update_instants() {
        // 20 ms updates at phase 7.3 ms, read every 13 ms ± a pseudo-random jitter.
        let period = 20_000_000;
        let mut t = 1_000_000_000u64;
        let mut x = 12345u64;
        let reads: Vec<u64> = (0..400)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                t += 13_000_000 + (x >> 40) % 3_000_000;
                t
            })
            .collect();
        let errs = errors(period, 7_300_000, &reads);
        assert!(errs.len() > 200);
        let late: Vec<i64> = errs[20..].iter().map(|e| e.abs()).collect();
        let worst = *late.iter().max().unwrap();
        let mean = late.iter().sum::<i64>() / late.len() as i64;
        println!("mean {mean} ns, worst {worst} ns");
        assert!(
            mean <= 500_000 && worst <= 2_000_000,
            "after a few reads: mean {mean} ns, worst {worst} ns"
        );
        // Read-time stamps would be off by up to the read spacing.
        assert!(errs.iter().all(|&e| e.abs() < 16_000_000));
    }

    #[test]
    fn a_slightly_wrong_period_still_converges() {
        // Detected 0.3 % long (as start-up detection can be), jittered reads.
        let mut t = 0u64;
        let mut x = 777u64;
        let reads: Vec<u64> = (0..600)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                t += 9_000_000 + (x >> 40) % 4_000_000;
                t
            })
            .collect();
        let errs = errors_detected(20_000_000, 20_060_000, 1_000_000, &reads);
        let late: Vec<i64> = errs[20..].iter().map(|e| e.abs()).collect();
        let mean = late.iter().sum::<i64>() / late.len() as i64;
        assert!(mean <= 1_000_000, "mean {mean} ns");
    }

    #[test]
    fn reads_locked_to_the_updates_keep_a_constant_offset() {
        // Read every 10 ms exactly, half the period: the bracket cannot narrow, but the offset is
        // the same for every update (no aliasing).
        let reads: Vec<u64> = (1..200).map(|k| 1_000_000 + k * 10_000_000).collect();
        let errs = errors(20_000_000, 3_000_000, &reads);
        let first = errs[5];
        assert!(
            errs[5..].iter().all(|&e| (e - first).abs() <= 1),
            "{errs:?}"
        );
        assert!(first.abs() <= 5_000_000);
    }

    #[test]
    fn a_skipped_update_restarts_the_estimate_and_stamps_only_move_forward() {
        let mut c = UpdateClock::new(20_000_000);
        assert_eq!(c.observe(100, 1), Observed::First);
        assert_eq!(c.observe(10_000_100, 1), Observed::Same);
        let Observed::New(a) = c.observe(20_000_100, 2) else {
            panic!()
        };
        // The next update comes 3.5 periods later (the driver moved it): still a sane stamp.
        let Observed::New(b) = c.observe(90_000_100, 3) else {
            panic!()
        };
        assert!(b > a && b <= 90_000_100);
    }
}
