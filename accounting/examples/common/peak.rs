//! The peak memory a benchmark's child process reports of itself.

/// This process's peak resident set size (KiB) since it was started: `VmHWM` in
/// `/proc/self/status`, 0 where unreadable.
///
/// Not `getrusage`'s `ru_maxrss`: Linux keeps in it the high-water mark of the memory a process
/// had before `exec`, which for a child forked from the benchmark is the benchmark's own, so a
/// child of a large parent would report at least the parent's size (seen: a 14 MiB run reported
/// 87 MiB after the benchmark had listed 83,328 jobs). `VmHWM` belongs to the memory image
/// `exec` made.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
