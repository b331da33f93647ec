//! CPU topology: which socket (physical package) and die each CPU belongs to.
//!
//! Read from `<sysfs>/devices/system/cpu/cpuN/topology/{physical_package_id,die_id}`. Both the
//! perf RAPL source (one counter per package, opened on a CPU of that package) and the per-socket
//! busy time need this mapping; it is never guessed from the order of CPUs in a mask.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Error reading the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The CPU directory could not be listed.
    #[error("cannot list CPUs in {path}: {source} (is `sysfs_root` right?)")]
    List {
        /// Directory that was listed.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// A topology file could not be read or parsed.
    #[error("cannot read CPU topology file {path}: {reason}")]
    File {
        /// File that failed.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Socket and die of one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuPlace {
    /// `physical_package_id`.
    pub socket: u32,
    /// `die_id` (0 when the kernel does not expose it).
    pub die: u32,
}

/// CPU number → place, for every CPU that has a topology directory (i.e. online CPUs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuTopology {
    cpus: BTreeMap<u32, CpuPlace>,
}

impl CpuTopology {
    /// Read the topology under `sysfs_root` (normally `/sys`).
    pub fn discover(sysfs_root: &Path) -> Result<Self, TopologyError> {
        let dir = sysfs_root.join("devices/system/cpu");
        let entries = std::fs::read_dir(&dir).map_err(|source| TopologyError::List {
            path: dir.clone(),
            source,
        })?;
        let mut cpus = BTreeMap::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("cpu"))
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let topo = entry.path().join("topology");
            let pkg_path = topo.join("physical_package_id");
            if !pkg_path.exists() {
                // Offline CPUs have no topology directory.
                continue;
            }
            let socket = read_id(&pkg_path)?;
            let die_path = topo.join("die_id");
            let die = if die_path.exists() {
                read_id(&die_path)?
            } else {
                0
            };
            cpus.insert(n, CpuPlace { socket, die });
        }
        Ok(Self { cpus })
    }

    /// Build a topology from explicit places (tests, and callers that already know it).
    pub fn from_places(places: impl IntoIterator<Item = (u32, CpuPlace)>) -> Self {
        Self {
            cpus: places.into_iter().collect(),
        }
    }

    /// Place of CPU `cpu`, if it is known (online).
    pub fn place(&self, cpu: u32) -> Option<CpuPlace> {
        self.cpus.get(&cpu).copied()
    }

    /// Number of known CPUs.
    pub fn cpu_count(&self) -> usize {
        self.cpus.len()
    }

    /// Sorted, de-duplicated socket ids.
    pub fn sockets(&self) -> Vec<u32> {
        let mut s: Vec<u32> = self.cpus.values().map(|p| p.socket).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// Each socket with its CPUs, sockets in order.
    pub fn socket_cpus(&self) -> Vec<(u32, ergon_protocol::CpuSet)> {
        let mut out: Vec<(u32, ergon_protocol::CpuSet)> = Vec::new();
        for (&cpu, place) in &self.cpus {
            match out.iter_mut().find(|(s, _)| *s == place.socket) {
                Some((_, set)) => set.insert(cpu),
                None => {
                    let mut set = ergon_protocol::CpuSet::new();
                    set.insert(cpu);
                    out.push((place.socket, set));
                }
            }
        }
        out.sort_by_key(|(s, _)| *s);
        out
    }

    /// All (cpu, place) pairs in CPU order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, CpuPlace)> + '_ {
        self.cpus.iter().map(|(&c, &p)| (c, p))
    }
}

fn read_id(path: &Path) -> Result<u32, TopologyError> {
    let text = super::read_trimmed(path).map_err(|e| TopologyError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // die_id / physical_package_id may be -1 on some virtual machines: treat as 0.
    if text == "-1" {
        return Ok(0);
    }
    text.parse().map_err(|_| TopologyError::File {
        path: path.to_path_buf(),
        reason: format!("expected a non-negative integer, found {text:?}"),
    })
}

/// Parse a kernel CPU list such as `0,28` or `0-3,8-11`.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,28\n"), Some(vec![0, 28]));
        assert_eq!(parse_cpu_list("0-3,8-9"), Some(vec![0, 1, 2, 3, 8, 9]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
    }
}
