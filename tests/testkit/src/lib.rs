//! Test support shared by ergon's tests, never a dependency of anything shipped (a test in
//! `noded/tests/install.rs` checks that the shipped binaries contain none of it):
//!
//! - fake hardware trees ([`hw`], also at the crate root): powercap, the perf `power` PMU
//!   description, CPU topology, cgroup v1/v2 hierarchies and `/proc/stat`, for ergond's sources
//!   and for the demo's RAPL simulator;
//! - generated whole-node meter trees ([`meters`]): hwmon power meters and HPE Cray
//!   pm_counters;
//! - [`ipmi_sim`]: an emulated BMC (OpenIPMI's ipmi_sim) with an SDR power sensor and, through
//!   a module of ours, DCMI's power reading;
//! - [`needs_root`]: the one way a test that needs root skips when it is not, visibly
//!   ([`skipped`] for other missing prerequisites);
//! - [`Tmpfs`]: a small filesystem to fill up or remount read-only (root only);
//! - [`dashboards`]: the shipped Grafana dashboards, checked and evaluated against real backends.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod dashboards;
pub mod hw;
pub mod ipmi_sim;
pub mod meters;

pub use hw::*;
pub use meters::{write_bmc_credentials, HwmonFixture, HwmonTree, PmCountersTree};

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether this process runs as root. When it does not, a test that needs root (to change uid,
/// mount a tmpfs, chown, run as another user) calls this first and returns when it says
/// `false`: it then printed `SKIPPED <test>: needs root to <why>` straight to the terminal
/// (past the test harness's output capture), so a run as an ordinary user says what it did
/// not test instead of passing it silently.
pub fn needs_root(test: &str, why: &str) -> bool {
    if is_root() {
        return true;
    }
    skipped(test, &format!("needs root to {why}"));
    false
}

/// Say on the terminal, past the test harness's output capture, that `what` was not tested and
/// why: `SKIPPED <what>: <why>`.
pub fn skipped(what: &str, why: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {what}: {why}");
}

/// A tool or package a test needs is missing: in the full test run (`scripts/test`, which sets
/// `ERGON_TESTS_COMPLETE` and installs everything) that is a failure, so that nothing it should
/// test passes untested; elsewhere (`cargo test` on a developer's machine) the test says
/// `SKIPPED` like [`skipped`] and the caller returns.
pub fn missing(what: &str, why: &str) {
    if std::env::var_os("ERGON_TESTS_COMPLETE").is_some() {
        panic!("{what}: {why}; the full test run installs it (scripts/test), so this is a failure here");
    }
    skipped(what, why);
}

/// The processes whose parent is `ppid` and whose name (`comm`) is `name`, with their state
/// letter from `/proc/<pid>/stat` (`Z`: ended, not yet reaped).
pub fn child_processes(ppid: u32, name: &str) -> Vec<(u32, char)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (comm, rest) = stat.split_once(") ")?;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let parent: u32 = fields.next()?.parse().ok()?;
        (comm.split_once('(')?.1 == name && parent == ppid).then_some((pid, state))
    })
    .collect()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`, …; `pid` `"self"` for this
/// process), 0 where unreadable.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// This process's peak resident set size (KiB) since it was started: `VmHWM`.
///
/// Not `getrusage`'s `ru_maxrss`: Linux keeps in it the high-water mark of the memory a process
/// had before `exec`, which for a child forked from a benchmark is the benchmark's own, so a
/// child of a large parent would report at least the parent's size (seen: a 14 MiB run reported
/// 87 MiB after the benchmark had listed 83,328 jobs). `VmHWM` belongs to the memory image
/// `exec` made.
pub fn peak_rss_kib() -> u64 {
    proc_status_kib("self", "VmHWM")
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

/// A tmpfs mounted for a test (a disk that fills up or turns read-only), unmounted when the
/// value is dropped. Mounting needs root: call [`needs_root`] first.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount a tmpfs of `size` (`mount -o size=…`, e.g. `"256k"`) with mode 0755 at `path`,
    /// created if missing.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("create the mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "ergon-test",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_path_buf())
    }

    /// Remount with `option` (`"ro"`, `"rw"`).
    pub fn remount(&self, option: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.0)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remounting {} {option} failed: {}",
            self.0.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fill it: a file of zeros until no space is left; returns that file.
    pub fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
