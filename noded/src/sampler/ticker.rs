//! Absolute-deadline tick schedule of a sampling thread (see the module docs of
//! [`crate::sampler`], "Timing").

use crate::clock::monotonic_ns;
use std::sync::atomic::{AtomicBool, Ordering};

/// Longest uninterrupted sleep: how soon a stop request is noticed.
const STOP_CHECK_NS: u64 = 100_000_000;

/// Absolute-deadline tick schedule of one thread.
pub(super) struct Ticker {
    start: u64,
    period: u64,
    k: u64,
}

impl Ticker {
    /// First tick now.
    pub(super) fn new(period_ns: u64) -> Self {
        Self {
            start: monotonic_ns(),
            period: period_ns.max(1),
            k: 0,
        }
    }

    pub(super) fn index(&self) -> u64 {
        self.k
    }

    /// Sleep until the current deadline; returns the lateness of the wake-up, or `None` when a
    /// stop was requested.
    pub(super) fn wait(&self, stop: &AtomicBool) -> Option<u64> {
        let deadline = self.start + self.k * self.period;
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            let now = monotonic_ns();
            if now >= deadline {
                return Some(now - deadline);
            }
            crate::clock::sleep_until(deadline.min(now + STOP_CHECK_NS));
        }
    }

    /// After a tick: move to the first deadline not yet past. Returns the deadlines skipped.
    pub(super) fn advance(&mut self) -> u64 {
        let after = monotonic_ns();
        let next = (after - self.start) / self.period + 1;
        let missed = next.saturating_sub(self.k + 1);
        self.k = next.max(self.k + 1);
        missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ticker_skips_and_counts_missed_deadlines() {
        let stop = AtomicBool::new(false);
        let mut t = Ticker::new(2_000_000);
        assert!(t.wait(&stop).is_some());
        std::thread::sleep(Duration::from_millis(7));
        // 7 ms into a 2 ms schedule: deadlines 1, 2 and 3 are past.
        let missed = t.advance();
        assert!((3..=4).contains(&missed), "{missed}");
        assert!(t.wait(&stop).is_some());
        stop.store(true, Ordering::Release);
        assert!(t.wait(&stop).is_none());
    }
}
