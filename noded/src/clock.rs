//! The one clock ergond measures time with: CLOCK_MONOTONIC in nanoseconds.
//!
//! Monotonic time never jumps with NTP or manual clock changes, so intervals between readings
//! are always true durations; it is also what the fake NVML library uses as its time base.

/// Current CLOCK_MONOTONIC time in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC is always available on Linux, so the
    // call cannot fail (EINVAL/EFAULT are impossible here).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
