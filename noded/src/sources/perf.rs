//! RAPL through the perf_event `power` PMU.
//!
//! The PMU describes itself in sysfs (`<perf_sysfs_root>/power/`): `type` (the dynamic PMU id
//! to put in `perf_event_attr.type`), `cpumask` (one CPU per package/die to open the counters
//! on), and for each event `events/energy-*` (`event=0xNN`), `.scale` (joules per count,
//! normally 2^-32) and `.unit`. Counters are opened system-wide (`pid = -1`) on a CPU of each
//! package; the socket of each CPU comes from the CPU topology, not from the mask order.
//!
//! Opening goes through an injectable function so tests can hand back pipe file descriptors
//! (write 8 bytes, read them back through the same code), since no test machine has RAPL.

use super::domains::{RaplDomain, ZoneInfo, ZoneKey};
use super::topology::{parse_cpu_list, CpuTopology};
use crate::counter::CounterKind;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Error describing, opening or reading perf RAPL counters.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// The PMU directory is absent: no perf RAPL on this kernel/CPU.
    #[error("no perf power PMU at {path} (kernel without RAPL perf support, or wrong `perf_sysfs_root`)")]
    NoPmu {
        /// Expected directory.
        path: PathBuf,
    },
    /// A description file is missing or malformed.
    #[error("cannot use perf PMU description {path}: {reason}")]
    Description {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The kernel refused to open the counter.
    #[error(
        "perf_event_open(power/{event}, cpu {cpu}) was refused ({source}): reading RAPL through \
         perf needs root, CAP_PERFMON (CAP_SYS_ADMIN before Linux 5.8), or \
         kernel.perf_event_paranoid <= 0 (`sysctl -w kernel.perf_event_paranoid=0`); ergond will \
         fall back to powercap, which needs root or a chmod of energy_uj"
    )]
    PermissionDenied {
        /// Event name, e.g. `energy-pkg`.
        event: String,
        /// CPU it was opened on.
        cpu: u32,
        /// Underlying error (EACCES or EPERM).
        source: io::Error,
    },
    /// Any other error opening a counter.
    #[error("perf_event_open(power/{event}, cpu {cpu}) failed: {source}")]
    Open {
        /// Event name.
        event: String,
        /// CPU.
        cpu: u32,
        /// Underlying error.
        source: io::Error,
    },
    /// Reading an open counter failed.
    #[error("reading perf counter power/{event} on cpu {cpu} failed: {source}")]
    Read {
        /// Event name.
        event: String,
        /// CPU.
        cpu: u32,
        /// Underlying error.
        source: io::Error,
    },
}

/// One event of the `power` PMU as described in sysfs.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfEventDesc {
    /// Event name, e.g. `energy-pkg`.
    pub name: String,
    /// `perf_event_attr.config` value.
    pub config: u64,
    /// Joules per count.
    pub scale: f64,
    /// What the event measures.
    pub domain: RaplDomain,
}

/// The `power` PMU description.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfPmuDesc {
    /// `perf_event_attr.type`.
    pub pmu_type: u32,
    /// CPUs to open counters on (one per package or die).
    pub cpus: Vec<u32>,
    /// Energy events, sorted by name.
    pub events: Vec<PerfEventDesc>,
}

fn domain_of_event(name: &str) -> Option<RaplDomain> {
    Some(match name {
        "energy-pkg" => RaplDomain::Package,
        "energy-cores" => RaplDomain::Core,
        "energy-gpu" => RaplDomain::Uncore,
        "energy-ram" => RaplDomain::Dram,
        "energy-psys" => RaplDomain::Psys,
        other => RaplDomain::Other(other.strip_prefix("energy-")?.to_string()),
    })
}

/// Parse an event description such as `event=0x02` (other terms are rejected: RAPL events use
/// only `event`).
pub fn parse_event_config(s: &str) -> Option<u64> {
    let mut config = None;
    for term in s.trim().split(',') {
        let (k, v) = term.split_once('=')?;
        if k.trim() != "event" {
            return None;
        }
        let v = v.trim();
        config = Some(match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok()?,
            None => v.parse().ok()?,
        });
    }
    config
}

impl PerfPmuDesc {
    /// Read the description under `<perf_sysfs_root>/power`.
    pub fn read(perf_sysfs_root: &Path) -> Result<Self, PerfError> {
        let dir = perf_sysfs_root.join("power");
        if !dir.is_dir() {
            return Err(PerfError::NoPmu { path: dir });
        }
        let desc_err = |path: &Path, reason: String| PerfError::Description {
            path: path.to_path_buf(),
            reason,
        };
        let read =
            |path: &Path| super::read_trimmed(path).map_err(|e| desc_err(path, e.to_string()));
        let type_path = dir.join("type");
        let pmu_type = read(&type_path)?
            .parse()
            .map_err(|_| desc_err(&type_path, "expected an integer".into()))?;
        let mask_path = dir.join("cpumask");
        let cpus = parse_cpu_list(&read(&mask_path)?)
            .ok_or_else(|| desc_err(&mask_path, "expected a CPU list like 0,28".into()))?;
        let events_dir = dir.join("events");
        let entries =
            std::fs::read_dir(&events_dir).map_err(|e| desc_err(&events_dir, e.to_string()))?;
        let mut events = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.contains('.') {
                continue; // .scale / .unit companions
            }
            let Some(domain) = domain_of_event(&name) else {
                continue;
            };
            let path = entry.path();
            let config = parse_event_config(&read(&path)?)
                .ok_or_else(|| desc_err(&path, "expected `event=0xNN`".into()))?;
            let unit_path = events_dir.join(format!("{name}.unit"));
            let unit = read(&unit_path)?;
            if unit != "Joules" {
                return Err(desc_err(&unit_path, format!("unit {unit:?} is not Joules")));
            }
            let scale_path = events_dir.join(format!("{name}.scale"));
            let scale: f64 = read(&scale_path)?
                .parse()
                .map_err(|_| desc_err(&scale_path, "expected a number".into()))?;
            if !(scale.is_finite() && scale > 0.0) {
                return Err(desc_err(
                    &scale_path,
                    format!("scale {scale} is not positive"),
                ));
            }
            events.push(PerfEventDesc {
                name,
                config,
                scale,
                domain,
            });
        }
        if events.is_empty() {
            return Err(desc_err(&events_dir, "no energy-* events".into()));
        }
        events.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            pmu_type,
            cpus,
            events,
        })
    }
}

/// Opens one counter: `(pmu_type, config, cpu) -> fd`.
pub type PerfOpener<'a> = &'a dyn Fn(u32, u64, u32) -> io::Result<OwnedFd>;

pub use crate::sys::perf_event_open;

struct OpenCounter {
    event: String,
    cpu: u32,
    fd: OwnedFd,
}

impl std::fmt::Debug for OpenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "power/{}@cpu{}", self.event, self.cpu)
    }
}

/// Open perf RAPL counters, one per (package, event).
#[derive(Debug)]
pub struct PerfRapl {
    zones: Vec<ZoneInfo>,
    counters: Vec<OpenCounter>,
}

impl PerfRapl {
    /// Describe and open with the real `perf_event_open`.
    pub fn open(perf_sysfs_root: &Path, topology: &CpuTopology) -> Result<Self, PerfError> {
        let desc = PerfPmuDesc::read(perf_sysfs_root)?;
        Self::open_with(&desc, topology, &perf_event_open)
    }

    /// Open the counters of `desc` with `opener` (tests pass one that returns pipes).
    /// Platform-wide events (psys) are opened once; the others on each CPU of the mask.
    pub fn open_with(
        desc: &PerfPmuDesc,
        topology: &CpuTopology,
        opener: PerfOpener<'_>,
    ) -> Result<Self, PerfError> {
        // Multi-die parts list one CPU per die: keep the die in the key only then.
        let mut sockets_seen: Vec<u32> = Vec::new();
        let mut multi_die = false;
        for &cpu in &desc.cpus {
            if let Some(p) = topology.place(cpu) {
                if sockets_seen.contains(&p.socket) {
                    multi_die = true;
                }
                sockets_seen.push(p.socket);
            }
        }
        let mut zones = Vec::new();
        let mut counters = Vec::new();
        for ev in &desc.events {
            let platform_wide = ev.domain == RaplDomain::Psys;
            for (i, &cpu) in desc.cpus.iter().enumerate() {
                if platform_wide && i > 0 {
                    break;
                }
                let place = topology.place(cpu).ok_or_else(|| PerfError::Description {
                    path: PathBuf::from(format!("cpumask cpu {cpu}")),
                    reason: "CPU has no topology entry (offline?)".into(),
                })?;
                let key = ZoneKey {
                    socket: (!platform_wide).then_some(place.socket),
                    die: (multi_die && !platform_wide).then_some(place.die),
                    domain: ev.domain.clone(),
                };
                let fd = opener(desc.pmu_type, ev.config, cpu).map_err(|source| {
                    match source.raw_os_error() {
                        Some(libc::EACCES) | Some(libc::EPERM) => PerfError::PermissionDenied {
                            event: ev.name.clone(),
                            cpu,
                            source,
                        },
                        _ => PerfError::Open {
                            event: ev.name.clone(),
                            cpu,
                            source,
                        },
                    }
                })?;
                zones.push(ZoneInfo {
                    key,
                    origin: format!("perf power/{} cpu {cpu}", ev.name),
                    // 64-bit counts: a decrease can only be a re-open/reset.
                    kind: CounterKind::Resetting,
                    joules_per_unit: ev.scale,
                });
                counters.push(OpenCounter {
                    event: ev.name.clone(),
                    cpu,
                    fd,
                });
            }
        }
        Ok(Self { zones, counters })
    }

    /// Zones in reading order.
    pub fn zones(&self) -> &[ZoneInfo] {
        &self.zones
    }

    /// Read every counter (raw counts) into `out`.
    pub fn read(&mut self, out: &mut Vec<u64>) -> Result<(), PerfError> {
        out.clear();
        for c in &self.counters {
            let mut buf = [0u8; 8];
            let n = nix::unistd::read(&c.fd, &mut buf);
            if n != Ok(8) {
                let source = match n {
                    Err(e) => io::Error::from(e),
                    Ok(n) => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short read of {n} bytes"),
                    ),
                };
                return Err(PerfError::Read {
                    event: c.event.clone(),
                    cpu: c.cpu,
                    source,
                });
            }
            out.push(u64::from_ne_bytes(buf));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::topology::CpuPlace;
    use ergon_testkit::{write_cpu_topology, write_perf_power_pmu};
    use std::cell::RefCell;
    use std::io::Write;

    #[test]
    fn event_configs() {
        assert_eq!(parse_event_config("event=0x02\n"), Some(2));
        assert_eq!(parse_event_config("event=19"), Some(19));
        assert_eq!(parse_event_config("event=0x02,umask=0x1"), None);
        assert_eq!(parse_event_config("garbage"), None);
    }

    #[test]
    fn reads_generated_pmu_description() {
        let dir = tempfile::tempdir().unwrap();
        write_perf_power_pmu(
            dir.path(),
            23,
            "0,28",
            &[("energy-pkg", 2), ("energy-ram", 3), ("energy-psys", 5)],
        );
        let d = PerfPmuDesc::read(dir.path()).unwrap();
        assert_eq!(d.pmu_type, 23);
        assert_eq!(d.cpus, [0, 28]);
        let names: Vec<_> = d
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.config, e.domain.clone()))
            .collect();
        assert_eq!(
            names,
            [
                ("energy-pkg", 2, RaplDomain::Package),
                ("energy-psys", 5, RaplDomain::Psys),
                ("energy-ram", 3, RaplDomain::Dram)
            ]
        );
        assert_eq!(d.events[0].scale, (-32f64).exp2());
    }

    #[test]
    fn missing_pmu_and_bad_unit() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            PerfPmuDesc::read(dir.path()),
            Err(PerfError::NoPmu { .. })
        ));
        write_perf_power_pmu(dir.path(), 23, "0", &[("energy-pkg", 2)]);
        ergon_testkit::write_file(&dir.path().join("power/events/energy-pkg.unit"), "Watts\n");
        let err = PerfPmuDesc::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("energy-pkg.unit") && err.contains("Watts"),
            "{err}"
        );
    }

    /// Open through pipes: each "counter" is a pipe whose write end the test keeps.
    #[test]
    fn opens_one_counter_per_package_keyed_by_topology_and_reads_them() {
        let dir = tempfile::tempdir().unwrap();
        // cpumask order (28 first) must not decide the socket: the topology does.
        write_perf_power_pmu(
            dir.path(),
            23,
            "28,0",
            &[("energy-pkg", 2), ("energy-psys", 5)],
        );
        write_cpu_topology(dir.path(), &[(0, 0, 0), (28, 1, 0)]);
        let topo = CpuTopology::discover(dir.path()).unwrap();
        let desc = PerfPmuDesc::read(dir.path()).unwrap();
        let writers = RefCell::new(Vec::new());
        let opened = RefCell::new(Vec::new());
        let opener = |ty: u32, config: u64, cpu: u32| -> io::Result<OwnedFd> {
            let (r, w) = nix::unistd::pipe().unwrap();
            writers.borrow_mut().push(std::fs::File::from(w));
            opened.borrow_mut().push((ty, config, cpu));
            Ok(r)
        };
        let mut perf = PerfRapl::open_with(&desc, &topo, &opener).unwrap();
        assert_eq!(*opened.borrow(), [(23, 2, 28), (23, 2, 0), (23, 5, 28)]);
        let keys: Vec<String> = perf.zones().iter().map(|z| z.key.to_string()).collect();
        assert_eq!(keys, ["package-1", "package-0", "psys"]);
        for (i, w) in writers.borrow_mut().iter_mut().enumerate() {
            w.write_all(&(1_000_000u64 * (i as u64 + 1)).to_ne_bytes())
                .unwrap();
        }
        let mut out = Vec::new();
        perf.read(&mut out).unwrap();
        assert_eq!(out, [1_000_000, 2_000_000, 3_000_000]);
        assert_eq!(perf.zones()[0].kind, CounterKind::Resetting);
    }

    #[test]
    fn permission_error_names_event_and_fix() {
        let desc = PerfPmuDesc {
            pmu_type: 23,
            cpus: vec![0],
            events: vec![PerfEventDesc {
                name: "energy-pkg".into(),
                config: 2,
                scale: 1e-9,
                domain: RaplDomain::Package,
            }],
        };
        let topo = CpuTopology::from_places([(0, CpuPlace { socket: 0, die: 0 })]);
        let refuse = |_: u32, _: u64, _: u32| -> io::Result<OwnedFd> {
            Err(io::Error::from_raw_os_error(libc::EACCES))
        };
        let err = PerfRapl::open_with(&desc, &topo, &refuse).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PerfError::PermissionDenied { .. }));
        assert!(
            msg.contains("energy-pkg")
                && msg.contains("perf_event_paranoid")
                && msg.contains("CAP_PERFMON"),
            "{msg}"
        );
    }

    #[test]
    fn real_perf_event_open_reports_an_error_without_rapl() {
        // This machine has no power PMU; a bogus PMU type must fail cleanly, not crash.
        let r = perf_event_open(u32::MAX - 1, 0, 0);
        assert!(r.is_err());
    }
}
