//! The three system calls ergond makes that neither std nor nix wraps safely, and the only
//! `unsafe` code of ergond outside NVML's raw handles (`sources::nvml`, module `raw`). Every
//! other call goes through std or nix.
//!
//! - [`perf_event_open`]: a RAPL counter of the perf `power` PMU (libc has no wrapper; the
//!   attribute struct's layout is the kernel ABI, so it lives here with the call);
//! - [`thread_cpu_ns`]: the CPU time of another thread of this process (its
//!   `pthread_getcpuclockid` clock), for the sampler's own-overhead metrics;
//! - [`die_with_parent`]: a child that gets SIGKILL when the thread that started it ends
//!   (`prctl(PR_SET_PDEATHSIG)` between fork and exec, which std only offers as an unsafe hook),
//!   for the IPMI meter's long-lived `ipmitool shell`, which would otherwise outlive a killed
//!   ergond and spin on its closed input.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::time::ClockId;

/// The first 64 bytes of `struct perf_event_attr` (`PERF_ATTR_SIZE_VER0`). The kernel accepts
/// this size and treats all later fields as zero, which is what a plain counting event needs.
#[repr(C)]
struct PerfEventAttrV0 {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

/// Open a system-wide counting event with `perf_event_open(2)` (pid = -1, on `cpu`), close-on-
/// exec.
pub fn perf_event_open(pmu_type: u32, config: u64, cpu: u32) -> io::Result<OwnedFd> {
    let attr = PerfEventAttrV0 {
        type_: pmu_type,
        size: std::mem::size_of::<PerfEventAttrV0>() as u32,
        config,
        sample_period: 0,
        sample_type: 0,
        read_format: 0,
        flags: 0,
        wakeup_events: 0,
        bp_type: 0,
        config1: 0,
    };
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    // SAFETY: `attr` is a valid perf_event_attr prefix whose `size` field says so, alive for the
    // call; the other arguments are plain integers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttrV0,
            -1 as libc::pid_t,
            cpu as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// CPU time used so far by `thread`, a running thread of this process that its caller keeps
/// from being joined (`JoinHandle::as_pthread_t` of a handle it holds); `None` if its clock
/// cannot be read.
pub fn thread_cpu_ns(thread: libc::pthread_t) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` names a live thread (see above); `clock` is a valid out-pointer.
    if unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } != 0 {
        return None;
    }
    let ts = ClockId::from_raw(clock).now().ok()?;
    Some(ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// Make the child `cmd` starts get SIGKILL when the thread that spawns it ends (its parent
/// dying, a crash or `kill -9` of ergond included), and exit at once if that happened before
/// the request took effect.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the hook runs in the child between fork and exec and calls only prctl, getppid
    // and _exit, which are async-signal-safe; it touches no memory but its copied integer.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
