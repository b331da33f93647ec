//! CPU package / DRAM energy from RAPL: through the perf_event `power` PMU when it can be opened,
//! otherwise through powercap sysfs.
//!
//! perf is preferred because its counts are 64-bit (the kernel polls the 32-bit MSR often enough
//! never to miss a wrap) and a read is a single `read(2)` with no IPI. powercap exposes the raw
//! 32-bit-based counter in µJ, which wraps every few minutes at its **own** per-zone
//! `max_energy_range_uj`; [`crate::counter`] handles that.
//!
//! Zones are keyed by what they measure ([`ZoneKey`], from the zone's `name` file or the perf
//! event name), never by directory index: indices differ between machines and kernels.

pub use super::domains::{RaplDomain, ZoneInfo, ZoneKey};
use super::perf::{PerfError, PerfRapl};
use super::topology::CpuTopology;
use super::KernelFile;
use crate::counter::CounterKind;
use std::io;
use std::path::{Path, PathBuf};

/// Parse a top-level zone name: `package-N`, `package-N-die-M`, or anything else (psys…).
fn parse_top_level_name(name: &str) -> ZoneKey {
    if let Some(rest) = name.strip_prefix("package-") {
        let (pkg, die) = match rest.split_once("-die-") {
            Some((p, d)) => (p.parse().ok(), d.parse().ok()),
            None => (rest.parse().ok(), None),
        };
        if let Some(socket) = pkg {
            return ZoneKey {
                socket: Some(socket),
                die,
                domain: RaplDomain::Package,
            };
        }
    }
    ZoneKey {
        socket: None,
        die: None,
        domain: RaplDomain::from_subzone_name(name),
    }
}

/// Parse a powercap zone directory name `intel-rapl:<hex>[:<hex>]` into (parent, child) ids.
/// Returns `None` for anything else, including `intel-rapl-mmio:*` duplicates and the bare
/// `intel-rapl` control-type directory.
pub fn parse_zone_dir(dir: &str) -> Option<(u32, Option<u32>)> {
    let rest = dir.strip_prefix("intel-rapl:")?;
    let mut parts = rest.split(':');
    let top = u32::from_str_radix(parts.next()?, 16).ok()?;
    let sub = match parts.next() {
        Some(s) => Some(u32::from_str_radix(s, 16).ok()?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((top, sub))
}

/// Error opening or reading RAPL counters. Every variant names the file or event and says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum RaplError {
    /// No usable RAPL zone anywhere.
    #[error(
        "no RAPL energy counters found: {powercap_root} has no intel-rapl zones and the perf power \
         PMU is unusable ({perf}). On Intel and AMD (Zen, Linux >= 5.11) load the `intel_rapl_msr` \
         module; in a container, make sure /sys/devices/virtual/powercap is not masked; or set \
         `powercap_root` / `perf_sysfs_root` in ergond.toml"
    )]
    NoZones {
        /// Powercap root that was searched.
        powercap_root: PathBuf,
        /// Why perf could not be used.
        perf: String,
    },
    /// An `energy_uj` file exists but may not be read.
    #[error(
        "permission denied reading {path}: RAPL energy counters are readable only by root since \
         Linux 5.10 (CVE-2020-8694). Run ergond as root (the packaged systemd unit does), or \
         grant read access with a udev/tmpfiles.d rule (`chmod 0444 {path}`, which re-opens the \
         power side channel to all local users), or let ergond use the perf power PMU by giving \
         it CAP_PERFMON or setting kernel.perf_event_paranoid to 0"
    )]
    PermissionDenied {
        /// The unreadable file.
        path: PathBuf,
    },
    /// Any other I/O or format problem with a zone file.
    #[error("cannot read RAPL zone file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Error from the perf backend while reading.
    #[error(transparent)]
    Perf(#[from] PerfError),
}

impl RaplError {
    fn from_io(path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::PermissionDenied {
            RaplError::PermissionDenied {
                path: path.to_path_buf(),
            }
        } else {
            RaplError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// RAPL zones read through powercap sysfs.
#[derive(Debug)]
pub struct Powercap {
    zones: Vec<ZoneInfo>,
    files: Vec<KernelFile>,
}

impl Powercap {
    /// Discover zones under `root` (normally `/sys/class/powercap`) and open their counters.
    ///
    /// Ignores `intel-rapl-mmio:*` (duplicates of the package zones on some platforms) and keeps
    /// the first zone when two zones resolve to the same key.
    pub fn open(root: &Path) -> Result<Self, RaplError> {
        let entries = std::fs::read_dir(root).map_err(|e| RaplError::from_io(root, e))?;
        let mut found: Vec<((u32, Option<u32>), PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let ids = parse_zone_dir(name.to_str()?)?;
                Some((ids, e.path()))
            })
            .collect();
        found.sort();
        let mut parents: std::collections::BTreeMap<u32, ZoneKey> = Default::default();
        let mut zones = Vec::new();
        let mut files = Vec::new();
        for ((top, sub), dir) in found {
            let name_path = dir.join("name");
            let name =
                super::read_trimmed(&name_path).map_err(|e| RaplError::from_io(&name_path, e))?;
            let key = match sub {
                None => {
                    let key = parse_top_level_name(&name);
                    parents.insert(top, key.clone());
                    key
                }
                Some(_) => match parents.get(&top) {
                    Some(parent) => ZoneKey {
                        socket: parent.socket,
                        die: parent.die,
                        domain: RaplDomain::from_subzone_name(&name),
                    },
                    None => {
                        tracing::warn!(zone = %dir.display(), "RAPL subzone without a parent zone; ignored");
                        continue;
                    }
                },
            };
            if zones.iter().any(|z: &ZoneInfo| z.key == key) {
                tracing::warn!(zone = %dir.display(), %key, "duplicate RAPL zone; keeping the first");
                continue;
            }
            let range_path = dir.join("max_energy_range_uj");
            let range = KernelFile::open(&range_path)
                .and_then(|mut f| f.read_u64())
                .map_err(|e| RaplError::from_io(&range_path, e))?;
            let energy_path = dir.join("energy_uj");
            let mut file =
                KernelFile::open(&energy_path).map_err(|e| RaplError::from_io(&energy_path, e))?;
            // Read once now so that a masked or unreadable counter fails at start, not mid-run.
            file.read_u64()
                .map_err(|e| RaplError::from_io(&energy_path, e))?;
            zones.push(ZoneInfo {
                key,
                origin: dir.display().to_string(),
                kind: CounterKind::Wrapping {
                    modulus: range.saturating_add(1),
                },
                joules_per_unit: 1e-6,
            });
            files.push(file);
        }
        if zones.is_empty() {
            return Err(RaplError::NoZones {
                powercap_root: root.to_path_buf(),
                perf: "not tried".into(),
            });
        }
        Ok(Self { zones, files })
    }

    /// The zones, in a stable order (sorted by directory id).
    pub fn zones(&self) -> &[ZoneInfo] {
        &self.zones
    }

    /// Read every zone's raw counter into `out` (cleared first; same order as [`Self::zones`]).
    pub fn read(&mut self, out: &mut Vec<u64>) -> Result<(), RaplError> {
        out.clear();
        for f in &mut self.files {
            let v = f.read_u64().map_err(|e| RaplError::from_io(f.path(), e))?;
            out.push(v);
        }
        Ok(())
    }
}

/// Where to look for RAPL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaplOptions {
    /// powercap class directory (default `/sys/class/powercap`).
    pub powercap_root: PathBuf,
    /// perf event-source devices directory holding `power/` (default `/sys/bus/event_source/devices`).
    pub perf_sysfs_root: PathBuf,
    /// sysfs root for CPU topology (default `/sys`).
    pub sysfs_root: PathBuf,
    /// Try perf first (default true). Off: powercap only.
    pub prefer_perf: bool,
}

impl Default for RaplOptions {
    fn default() -> Self {
        Self {
            powercap_root: PathBuf::from("/sys/class/powercap"),
            perf_sysfs_root: PathBuf::from("/sys/bus/event_source/devices"),
            sysfs_root: PathBuf::from("/sys"),
            prefer_perf: true,
        }
    }
}

/// The backend actually in use.
#[derive(Debug)]
pub enum RaplBackend {
    /// perf_event `power` PMU.
    Perf(PerfRapl),
    /// powercap sysfs.
    Powercap(Powercap),
}

/// RAPL energy source: perf when usable, else powercap.
#[derive(Debug)]
pub struct RaplSource {
    backend: RaplBackend,
}

impl RaplSource {
    /// Open RAPL as described in the module docs. When perf cannot be used the reason is logged
    /// and powercap is tried; if neither works the error says what to fix.
    pub fn open(opts: &RaplOptions) -> Result<Self, RaplError> {
        let mut perf_reason = "disabled by configuration (prefer_perf = false)".to_string();
        if opts.prefer_perf {
            let attempt = CpuTopology::discover(&opts.sysfs_root)
                .map_err(|e| e.to_string())
                .and_then(|topo| {
                    PerfRapl::open(&opts.perf_sysfs_root, &topo).map_err(|e| e.to_string())
                });
            match attempt {
                Ok(perf) => {
                    tracing::info!(
                        zones = perf.zones().len(),
                        "RAPL through the perf power PMU"
                    );
                    return Ok(Self {
                        backend: RaplBackend::Perf(perf),
                    });
                }
                Err(reason) => {
                    tracing::info!(%reason, "perf power PMU unusable; falling back to powercap");
                    perf_reason = reason;
                }
            }
        }
        match Powercap::open(&opts.powercap_root) {
            Ok(p) => {
                tracing::info!(zones = p.zones().len(), root = %opts.powercap_root.display(), "RAPL through powercap");
                Ok(Self {
                    backend: RaplBackend::Powercap(p),
                })
            }
            Err(RaplError::NoZones { powercap_root, .. }) => Err(RaplError::NoZones {
                powercap_root,
                perf: perf_reason,
            }),
            Err(RaplError::Io { path, source }) if source.kind() == io::ErrorKind::NotFound => {
                Err(RaplError::NoZones {
                    powercap_root: path,
                    perf: perf_reason,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Wrap an already opened backend.
    pub fn from_backend(backend: RaplBackend) -> Self {
        Self { backend }
    }

    /// The backend in use.
    pub fn backend(&self) -> &RaplBackend {
        &self.backend
    }

    /// Zones in reading order.
    pub fn zones(&self) -> &[ZoneInfo] {
        match &self.backend {
            RaplBackend::Perf(p) => p.zones(),
            RaplBackend::Powercap(p) => p.zones(),
        }
    }

    /// Read all zones' raw counters into `out` (same order as [`Self::zones`]).
    pub fn read(&mut self, out: &mut Vec<u64>) -> Result<(), RaplError> {
        match &mut self.backend {
            RaplBackend::Perf(p) => Ok(p.read(out)?),
            RaplBackend::Powercap(p) => p.read(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ergon_testkit::{PowercapLayout, PowercapTree, ZoneFixture};

    fn keys(p: &Powercap) -> Vec<String> {
        p.zones().iter().map(|z| z.key.to_string()).collect()
    }

    #[test]
    fn zone_dir_names() {
        assert_eq!(parse_zone_dir("intel-rapl:0"), Some((0, None)));
        assert_eq!(parse_zone_dir("intel-rapl:0:1"), Some((0, Some(1))));
        assert_eq!(parse_zone_dir("intel-rapl:a"), Some((10, None)));
        assert_eq!(parse_zone_dir("intel-rapl:1f:a"), Some((31, Some(10))));
        assert_eq!(parse_zone_dir("intel-rapl-mmio:0"), None);
        assert_eq!(parse_zone_dir("intel-rapl"), None);
        assert_eq!(parse_zone_dir("intel-rapl:0:1:2"), None);
        assert_eq!(parse_zone_dir("intel-rapl:g"), None);
    }

    #[test]
    fn top_level_names() {
        let k = parse_top_level_name("package-1-die-3");
        assert_eq!(
            (k.socket, k.die, &k.domain),
            (Some(1), Some(3), &RaplDomain::Package)
        );
        assert_eq!(k.to_string(), "package-1-die-3");
        assert_eq!(parse_top_level_name("psys").to_string(), "psys");
        assert_eq!(
            parse_top_level_name("package-x").domain,
            RaplDomain::Other("package-x".into())
        );
    }

    #[test]
    fn intel_server_two_sockets_with_dram() {
        let dir = tempfile::tempdir().unwrap();
        let tree = PowercapTree::create(
            dir.path(),
            &PowercapLayout::IntelServer { sockets: 2 }.zones(),
        );
        let p = Powercap::open(tree.root()).unwrap();
        assert_eq!(
            keys(&p),
            ["package-0", "package-0:dram", "package-1", "package-1:dram"]
        );
        // Each zone keeps its own range.
        assert_eq!(
            p.zones()[0].kind,
            CounterKind::Wrapping {
                modulus: 262_143_328_851
            }
        );
        assert_eq!(
            p.zones()[1].kind,
            CounterKind::Wrapping {
                modulus: 65_712_999_614
            }
        );
    }

    #[test]
    fn hex_zone_ids_sort_numerically() {
        let dir = tempfile::tempdir().unwrap();
        let tree = PowercapTree::create(
            dir.path(),
            &PowercapLayout::IntelServer { sockets: 12 }.zones(),
        );
        let p = Powercap::open(tree.root()).unwrap();
        let k = keys(&p);
        assert_eq!(k.len(), 24);
        assert_eq!(k[20], "package-10");
        assert_eq!(k[21], "package-10:dram");
        assert!(p.zones()[20].origin.ends_with("intel-rapl:a"));
    }

    #[test]
    fn client_layout_ignores_mmio_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let tree = PowercapTree::create(dir.path(), &PowercapLayout::IntelClient.zones());
        let p = Powercap::open(tree.root()).unwrap();
        assert_eq!(
            keys(&p),
            ["package-0", "package-0:core", "package-0:uncore", "psys"]
        );
    }

    #[test]
    fn multi_die_and_amd_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let tree = PowercapTree::create(dir.path(), &PowercapLayout::MultiDie.zones());
        let p = Powercap::open(tree.root()).unwrap();
        assert_eq!(
            keys(&p),
            [
                "package-0-die-0",
                "package-0-die-0:dram",
                "package-0-die-1",
                "package-0-die-1:dram"
            ]
        );
        let dir = tempfile::tempdir().unwrap();
        let tree = PowercapTree::create(dir.path(), &PowercapLayout::Amd { sockets: 2 }.zones());
        let p = Powercap::open(tree.root()).unwrap();
        assert_eq!(
            keys(&p),
            ["package-0", "package-0:core", "package-1", "package-1:core"]
        );
        assert!(!p.zones().iter().any(|z| z.key.domain == RaplDomain::Dram));
    }

    #[test]
    fn reads_follow_file_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let tree = PowercapTree::create(
            dir.path(),
            &PowercapLayout::IntelServer { sockets: 1 }.zones(),
        );
        let mut p = Powercap::open(tree.root()).unwrap();
        tree.set_energy_uj("intel-rapl:0", 123);
        tree.set_energy_uj("intel-rapl:0:0", 456);
        let mut out = Vec::new();
        p.read(&mut out).unwrap();
        assert_eq!(out, [123, 456]);
        tree.set_energy_uj("intel-rapl:0", 7);
        p.read(&mut out).unwrap();
        assert_eq!(out, [7, 456]);
    }

    #[test]
    fn missing_root_names_both_backends() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RaplOptions {
            powercap_root: dir.path().join("no-powercap"),
            perf_sysfs_root: dir.path().join("no-perf"),
            sysfs_root: dir.path().join("no-sys"),
            prefer_perf: true,
        };
        let err = RaplSource::open(&opts).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, RaplError::NoZones { .. }), "{msg}");
        assert!(
            msg.contains("no-powercap") && msg.contains("no-sys"),
            "{msg}"
        );
    }

    #[test]
    fn powercap_fallback_when_perf_absent() {
        let dir = tempfile::tempdir().unwrap();
        let tree = PowercapTree::create(
            &dir.path().join("powercap"),
            &[ZoneFixture::new("intel-rapl:0", "package-0")],
        );
        let opts = RaplOptions {
            powercap_root: tree.root().to_path_buf(),
            perf_sysfs_root: dir.path().join("perf"),
            sysfs_root: dir.path().join("sys"),
            prefer_perf: true,
        };
        let src = RaplSource::open(&opts).unwrap();
        assert!(matches!(src.backend(), RaplBackend::Powercap(_)));
        assert_eq!(src.zones().len(), 1);
    }

    #[test]
    fn permission_denied_message_names_file_and_fix() {
        let e = RaplError::from_io(
            Path::new("/sys/class/powercap/intel-rapl:0/energy_uj"),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        let msg = e.to_string();
        assert!(msg.contains("intel-rapl:0/energy_uj"), "{msg}");
        assert!(
            msg.contains("root") && msg.contains("chmod") && msg.contains("perf_event_paranoid"),
            "{msg}"
        );
    }
}
