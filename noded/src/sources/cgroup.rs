//! CPU time: per job cgroup (to split CPU/DRAM energy between jobs) and per socket (to know how
//! busy each package was), read on the same tick as RAPL.
//!
//! * cgroup v1: `<cgroup_root>/cpuacct/<path>/cpuacct.usage`, nanoseconds.
//! * cgroup v2: `<cgroup_root>/<path>/cpu.stat`, line `usage_usec`.
//! * sockets: `<proc_root>/stat` `cpuN` lines (USER_HZ ticks), busy = total − idle − iowait,
//!   grouped by `physical_package_id` from [`CpuTopology`].
//!
//! All files are opened once and re-read with `pread` ([`KernelFile`]).

use super::topology::CpuTopology;
use super::KernelFile;
use std::io;
use std::path::{Path, PathBuf};

/// Error reading CPU time.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither a v2 unified hierarchy nor a v1 `cpuacct` controller under the root.
    #[error(
        "no cgroup CPU accounting under {root}: expected {root}/cgroup.controllers (cgroup v2) or \
         {root}/cpuacct (cgroup v1); set `cgroup_root` in ergond.toml"
    )]
    NoHierarchy {
        /// The cgroup root searched.
        root: PathBuf,
    },
    /// A cgroup or procfs file could not be opened or read.
    #[error("cannot read {path}: {source} (the cgroup may have ended)")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The file's contents were not in the expected format.
    #[error("unexpected contents in {path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was expected.
        reason: String,
    },
}

/// Which cgroup hierarchy the node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies (`cpuacct`).
    V1,
    /// Unified hierarchy.
    V2,
}

/// Where cgroup CPU time is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHierarchy {
    /// cgroup filesystem root (`cgroup_root`).
    pub root: PathBuf,
    /// v1 (`cpuacct`) or v2.
    pub version: CgroupVersion,
}

impl CgroupHierarchy {
    /// Where cgroup `rel` (relative to the hierarchy, as the plugin and the sampler name
    /// cgroups) keeps its CPU accounting: `<root>/cpuacct/<rel>` (v1) or `<root>/<rel>` (v2).
    pub fn cpu_dir(&self, rel: &str) -> PathBuf {
        let rel = rel.trim_start_matches('/');
        match self.version {
            CgroupVersion::V1 => self.root.join("cpuacct").join(rel),
            CgroupVersion::V2 => self.root.join(rel),
        }
    }

    /// Whether cgroup `rel` exists.
    pub fn exists(&self, rel: &str) -> bool {
        self.cpu_dir(rel).is_dir()
    }
}

/// Detect the hierarchy under `root` (normally `/sys/fs/cgroup`). A hybrid mount (v1
/// controllers plus a v2 `unified` directory) counts as v1, since CPU accounting is there.
pub fn detect_version(root: &Path) -> Result<CgroupVersion, CgroupError> {
    if root.join("cpuacct").is_dir() {
        Ok(CgroupVersion::V1)
    } else if root.join("cgroup.controllers").is_file() {
        Ok(CgroupVersion::V2)
    } else {
        Err(CgroupError::NoHierarchy {
            root: root.to_path_buf(),
        })
    }
}

/// CPU usage counter of one cgroup.
#[derive(Debug)]
pub struct CgroupCpu {
    version: CgroupVersion,
    file: KernelFile,
}

impl CgroupCpu {
    /// Open the usage file of cgroup `rel` (e.g. `slurm_node1/uid_0/job_12`, or for v2
    /// `system.slice/slurmstepd.scope/job_12`) under `root`.
    pub fn open(root: &Path, version: CgroupVersion, rel: &str) -> Result<Self, CgroupError> {
        let rel = rel.trim_start_matches('/');
        let path = match version {
            CgroupVersion::V1 => root.join("cpuacct").join(rel).join("cpuacct.usage"),
            CgroupVersion::V2 => root.join(rel).join("cpu.stat"),
        };
        let file = KernelFile::open(&path).map_err(|source| CgroupError::Io { path, source })?;
        Ok(Self { version, file })
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Cumulative CPU time of the cgroup (all its tasks, all CPUs), in nanoseconds.
    pub fn read_usage_ns(&mut self) -> Result<u64, CgroupError> {
        // Paths are copied only on the error paths: a read allocates nothing.
        let (path, bytes) = match self.file.read_with_path() {
            Ok(r) => r,
            Err(source) => {
                return Err(CgroupError::Io {
                    path: self.file.path().to_path_buf(),
                    source,
                })
            }
        };
        match self.version {
            CgroupVersion::V1 => super::parse_u64(bytes).ok_or_else(|| CgroupError::Format {
                path: path.to_path_buf(),
                reason: "expected nanoseconds as one integer".into(),
            }),
            CgroupVersion::V2 => parse_usage_usec(bytes)
                .map(|us| us.saturating_mul(1000))
                .ok_or_else(|| CgroupError::Format {
                    path: path.to_path_buf(),
                    reason: "expected a `usage_usec N` line".into(),
                }),
        }
    }
}

/// Find `usage_usec N` in a v2 `cpu.stat`.
fn parse_usage_usec(bytes: &[u8]) -> Option<u64> {
    bytes.split(|&b| b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(b"usage_usec ")?;
        super::parse_u64(rest)
    })
}

/// CPU time of one socket, from `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketTimes {
    /// Socket id.
    pub socket: u32,
    /// Non-idle time summed over the socket's CPUs (total − idle − iowait), ns.
    pub busy_ns: u64,
    /// All time summed over the socket's CPUs, ns.
    pub total_ns: u64,
}

/// Per-socket busy time from `<proc_root>/stat`.
#[derive(Debug)]
pub struct SocketBusy {
    file: KernelFile,
    topology: CpuTopology,
    ns_per_tick: u64,
    sockets: Vec<u32>,
}

/// USER_HZ, the unit of `/proc/stat` (100 on every mainstream Linux, but asked, not assumed).
pub fn user_hz() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as u64,
        _ => 100,
    }
}

impl SocketBusy {
    /// Open `<proc_root>/stat`; CPUs are mapped to sockets with `topology`.
    pub fn open(proc_root: &Path, topology: CpuTopology) -> Result<Self, CgroupError> {
        let path = proc_root.join("stat");
        let file = KernelFile::open(&path).map_err(|source| CgroupError::Io { path, source })?;
        let sockets = topology.sockets();
        Ok(Self {
            file,
            topology,
            ns_per_tick: 1_000_000_000 / user_hz(),
            sockets,
        })
    }

    /// Socket ids, in the order [`Self::read`] reports them.
    pub fn sockets(&self) -> &[u32] {
        &self.sockets
    }

    /// Read current per-socket times into `out` (cleared first; one entry per socket).
    pub fn read(&mut self, out: &mut Vec<SocketTimes>) -> Result<(), CgroupError> {
        out.clear();
        out.extend(self.sockets.iter().map(|&socket| SocketTimes {
            socket,
            ..Default::default()
        }));
        // Paths are copied only on the error paths: a read allocates nothing.
        let (path, bytes) = match self.file.read_with_path() {
            Ok(r) => r,
            Err(source) => {
                return Err(CgroupError::Io {
                    path: self.file.path().to_path_buf(),
                    source,
                })
            }
        };
        let mut seen = false;
        for line in bytes.split(|&b| b == b'\n') {
            let Some(rest) = line.strip_prefix(b"cpu") else {
                continue;
            };
            let mut fields = rest.split(|&b| b == b' ').filter(|f| !f.is_empty());
            let Some(cpu) = fields.next().and_then(super::parse_u64) else {
                continue; // the aggregate "cpu " line
            };
            let mut j = [0u64; 8];
            for slot in &mut j {
                *slot = fields.next().and_then(super::parse_u64).ok_or_else(|| {
                    CgroupError::Format {
                        path: path.to_path_buf(),
                        reason: format!("cpu{cpu} line has fewer than 8 numeric fields"),
                    }
                })?;
            }
            // user nice system idle iowait irq softirq steal; guest times are already in user/nice.
            let total: u64 = j.iter().sum();
            let busy = total - j[3] - j[4];
            let Some(place) = self.topology.place(cpu as u32) else {
                continue;
            };
            if let Some(s) = out.iter_mut().find(|s| s.socket == place.socket) {
                s.busy_ns += busy * self.ns_per_tick;
                s.total_ns += total * self.ns_per_tick;
                seen = true;
            }
        }
        if !seen && !self.sockets.is_empty() {
            return Err(CgroupError::Format {
                path: path.to_path_buf(),
                reason: "no cpuN line matches a CPU of the topology".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::topology::CpuPlace;
    use ergon_testkit::{
        write_cgroup_v1_usage, write_cgroup_v2_usage, write_cpu_topology, write_proc_stat,
    };

    #[test]
    fn v1_cpuacct_usage_in_ns() {
        let dir = tempfile::tempdir().unwrap();
        let rel = "slurm_node1/uid_1000/job_42";
        write_cgroup_v1_usage(dir.path(), rel, 123_456_789);
        assert_eq!(detect_version(dir.path()).unwrap(), CgroupVersion::V1);
        let mut c = CgroupCpu::open(dir.path(), CgroupVersion::V1, rel).unwrap();
        assert_eq!(c.read_usage_ns().unwrap(), 123_456_789);
        write_cgroup_v1_usage(dir.path(), rel, 223_456_789);
        assert_eq!(c.read_usage_ns().unwrap(), 223_456_789);
    }

    #[test]
    fn v2_cpu_stat_usage_usec_to_ns() {
        let dir = tempfile::tempdir().unwrap();
        let rel = "/system.slice/slurmstepd.scope/job_42";
        write_cgroup_v2_usage(dir.path(), rel.trim_start_matches('/'), 5_000_000);
        assert_eq!(detect_version(dir.path()).unwrap(), CgroupVersion::V2);
        let mut c = CgroupCpu::open(dir.path(), CgroupVersion::V2, rel).unwrap();
        assert_eq!(c.read_usage_ns().unwrap(), 5_000_000_000);
    }

    #[test]
    fn missing_cgroup_and_hierarchy_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = detect_version(dir.path()).unwrap_err().to_string();
        assert!(e.contains("cgroup_root"), "{e}");
        let e = CgroupCpu::open(dir.path(), CgroupVersion::V1, "job_9")
            .unwrap_err()
            .to_string();
        assert!(e.contains("job_9/cpuacct.usage"), "{e}");
        write_cgroup_v2_usage(dir.path(), "x", 1);
        ergon_testkit::write_file(&dir.path().join("x/cpu.stat"), "nr_periods 0\n");
        let mut c = CgroupCpu::open(dir.path(), CgroupVersion::V2, "x").unwrap();
        assert!(matches!(c.read_usage_ns(), Err(CgroupError::Format { .. })));
    }

    #[test]
    fn per_socket_busy_time_uses_topology_not_cpu_order() {
        let dir = tempfile::tempdir().unwrap();
        // cpu0 and cpu2 on socket 1, cpu1 on socket 0.
        write_cpu_topology(dir.path(), &[(0, 1, 0), (1, 0, 0), (2, 1, 0)]);
        let topo = CpuTopology::discover(dir.path()).unwrap();
        assert_eq!(topo.place(2), Some(CpuPlace { socket: 1, die: 0 }));
        write_proc_stat(
            dir.path(),
            &[
                (0, [10, 1, 5, 100, 3, 1, 1, 2]),
                (1, [20, 0, 0, 50, 0, 0, 0, 0]),
                (2, [1, 0, 0, 10, 0, 0, 0, 0]),
            ],
        );
        let mut sb = SocketBusy::open(dir.path(), topo).unwrap();
        let mut out = Vec::new();
        sb.read(&mut out).unwrap();
        let tick = 1_000_000_000 / user_hz();
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            SocketTimes {
                socket: 0,
                busy_ns: 20 * tick,
                total_ns: 70 * tick
            }
        );
        assert_eq!(
            out[1],
            SocketTimes {
                socket: 1,
                busy_ns: (20 + 1) * tick,
                total_ns: (123 + 11) * tick
            }
        );
    }

    /// Measures what keeping the file open buys (printed; asserted only loosely because timing
    /// on a shared 2-core machine is noisy).
    #[test]
    fn pread_on_open_file_is_cheaper_than_reopening() {
        let dir = tempfile::tempdir().unwrap();
        write_cgroup_v1_usage(dir.path(), "job_1", 42);
        let path = dir.path().join("cpuacct/job_1/cpuacct.usage");
        let n = 5_000;
        let mut c = CgroupCpu::open(dir.path(), CgroupVersion::V1, "job_1").unwrap();
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(c.read_usage_ns().unwrap(), 42);
        }
        let kept = t0.elapsed();
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            let s = std::fs::read_to_string(&path).unwrap();
            assert_eq!(s.trim().parse::<u64>().unwrap(), 42);
        }
        let reopened = t0.elapsed();
        eprintln!(
            "cgroup usage read: pread on open fd {:.2} µs, open+read+close {:.2} µs",
            kept.as_secs_f64() * 1e6 / n as f64,
            reopened.as_secs_f64() * 1e6 / n as f64
        );
        assert!(kept < reopened * 2, "pread {kept:?} vs reopen {reopened:?}");
    }
}
