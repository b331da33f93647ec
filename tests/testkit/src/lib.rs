//! Test support shared by ergon's tests, never a dependency of anything shipped (a test in
//! `noded/tests/install.rs` checks that the shipped binaries contain none of it):
//!
//! - fake hardware trees ([`hw`], also at the crate root): powercap, the perf `power` PMU
//!   description, CPU topology, cgroup v1/v2 hierarchies and `/proc/stat`, for ergond's sources
//!   and for the demo's RAPL simulator;
//! - [`needs_root`]: the one way a test that needs root skips when it is not, visibly.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod hw;

pub use hw::*;

use std::io::Write as _;

/// Whether this process runs as root. When it does not, a test that needs root (to change uid,
/// mount a tmpfs, chown, run as another user) calls this first and returns when it says
/// `false`: it then printed `SKIPPED <test>: needs root to <why>` straight to the terminal
/// (past the test harness's output capture), so a run as an ordinary user says what it did
/// not test instead of passing it silently.
pub fn needs_root(test: &str, why: &str) -> bool {
    if is_root() {
        return true;
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: needs root to {why}"
    );
    false
}

/// Whether the effective uid is 0 (from `/proc/self/status`, so this crate needs no libc).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
