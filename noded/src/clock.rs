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

/// Sleeps until the absolute CLOCK_MONOTONIC instant `deadline_ns` (`clock_nanosleep` with
/// `TIMER_ABSTIME`): ticks on absolute deadlines do not drift by the time their work takes.
pub fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    loop {
        // SAFETY: `ts` is a valid timespec; the remaining-time pointer may be null with
        // TIMER_ABSTIME.
        let rc = unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
        if rc != libc::EINTR {
            return;
        }
    }
}

/// Sets the calling thread's timer slack to 1 ns, so its sleeps end at their deadline instead of
/// up to 50 µs later (the kernel's default slack lets it batch wake-ups).
pub fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}
