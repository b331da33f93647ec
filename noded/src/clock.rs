//! The one clock ergond measures time with: CLOCK_MONOTONIC in nanoseconds.
//!
//! Monotonic time never jumps with NTP or manual clock changes, so intervals between readings
//! are always true durations; it is also what the fake NVML library uses as its time base.

use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_nanosleep, ClockId, ClockNanosleepFlags};

fn ns(ts: TimeSpec) -> u64 {
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Current CLOCK_MONOTONIC time in nanoseconds.
pub fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC always exists on Linux: the call cannot fail.
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, ns)
}

/// CPU time used so far by the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0, ns)
}

/// Sleeps until the absolute CLOCK_MONOTONIC instant `deadline_ns` (`clock_nanosleep` with
/// `TIMER_ABSTIME`): ticks on absolute deadlines do not drift by the time their work takes.
pub fn sleep_until(deadline_ns: u64) {
    let deadline = TimeSpec::new(
        (deadline_ns / 1_000_000_000) as libc::time_t,
        (deadline_ns % 1_000_000_000) as libc::c_long,
    );
    while let Err(nix::errno::Errno::EINTR) = clock_nanosleep(
        ClockId::CLOCK_MONOTONIC,
        ClockNanosleepFlags::TIMER_ABSTIME,
        &deadline,
    ) {}
}

/// Sets the calling thread's timer slack to 1 ns, so its sleeps end at their deadline instead of
/// up to 50 µs later (the kernel's default slack lets it batch wake-ups).
pub fn fine_timer_slack() {
    // Only fails on kernels without PR_SET_TIMERSLACK (before 2.6.28): then the default stays.
    let _ = nix::sys::prctl::set_timerslack(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_time_advances_and_sleep_until_reaches_its_deadline() {
        let t0 = monotonic_ns();
        assert!(t0 > 0);
        sleep_until(t0 + 2_000_000);
        assert!(monotonic_ns() >= t0 + 2_000_000);
        // A deadline in the past returns at once.
        sleep_until(t0);
        let c0 = thread_cpu_ns();
        let mut x = 0u64;
        while thread_cpu_ns() < c0 + 1_000_000 {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
    }
}
