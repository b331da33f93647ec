//! Generators for fake hardware trees: powercap, the perf `power` PMU description, CPU topology,
//! cgroup v1/v2 hierarchies and `/proc/stat`.
//!
//! The trees have the same file layout and formats as the kernel's, so the sources are exercised
//! through their real parsing and reading code. Counter files are rewritten in place (same inode), so a source that
//! keeps the file open sees the new value, as with a real sysfs attribute.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Write `contents` to `path`, creating parent directories. Rewrites in place (truncate, keep
/// the inode) when the file exists, so open file descriptors see the new contents.
pub fn write_file(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create fixture directory");
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open fixture file");
    f.write_all(contents.as_bytes())
        .expect("write fixture file");
}

/// Rewrite a counter file that a sampler may be reading at the same moment.
///
/// `write_file` truncates and then writes: a reader in between sees an empty file, which real
/// sysfs and cgroupfs files never show, and tests failed on that under load. Counter values are
/// therefore written zero-padded to a fixed width with one write at offset 0 and no truncation,
/// so every read sees either the old or the new value. (The parsers accept leading zeros.)
pub fn write_counter_file(path: &Path, value: u64) {
    write_in_place(path, &format!("{value:020}\n"));
}

/// Rewrite `path` with one write at offset 0 and no truncation window (see
/// [`write_counter_file`]): callers keep the length constant (zero-padded numbers), so a reader
/// sees either the old or the new contents, as with real sysfs, cgroupfs and procfs files.
pub fn write_in_place(path: &Path, text: &str) {
    use std::os::unix::fs::FileExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("create fixture directory");
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open fixture file");
    f.write_all_at(text.as_bytes(), 0)
        .expect("write fixture file");
    // The first write over a shorter initial value may leave a tail; later ones are one length.
    f.set_len(text.len() as u64).expect("trim fixture file");
}

/// One powercap zone to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneFixture {
    /// Directory name, e.g. `intel-rapl:0`, `intel-rapl:0:1`, `intel-rapl:a`, `intel-rapl-mmio:0`.
    pub dir: String,
    /// Contents of the `name` file, e.g. `package-0`, `dram`, `package-0-die-1`.
    pub name: String,
    /// Contents of `max_energy_range_uj`.
    pub max_energy_range_uj: u64,
}

impl ZoneFixture {
    /// A zone with the usual Intel package range (2^32 units of 61 µJ).
    pub fn new(dir: &str, name: &str) -> Self {
        Self {
            dir: dir.to_string(),
            name: name.to_string(),
            max_energy_range_uj: 262_143_328_850,
        }
    }

    /// Same zone with another range (e.g. a tiny one to force frequent wraps in tests).
    pub fn with_range(mut self, max_energy_range_uj: u64) -> Self {
        self.max_energy_range_uj = max_energy_range_uj;
        self
    }
}

/// Ready-made powercap layouts seen on real machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowercapLayout {
    /// Intel server: one `package-N` per socket, each with a `dram` subzone.
    IntelServer {
        /// Number of sockets.
        sockets: u32,
    },
    /// Intel client: package with `core` and `uncore`, a top-level `psys`, and an
    /// `intel-rapl-mmio:0` duplicate of the package (to be ignored).
    IntelClient,
    /// Multi-die package: `package-0-die-0` and `package-0-die-1`, each with `dram`.
    MultiDie,
    /// AMD (Zen, via `intel_rapl_msr`): `package-N` with a `core` subzone and no `dram`.
    Amd {
        /// Number of sockets.
        sockets: u32,
    },
}

impl PowercapLayout {
    /// The zones of this layout (hex ids from 10 sockets up, as the kernel writes them).
    pub fn zones(self) -> Vec<ZoneFixture> {
        let mut z = Vec::new();
        match self {
            PowercapLayout::IntelServer { sockets } => {
                for s in 0..sockets {
                    z.push(ZoneFixture::new(
                        &format!("intel-rapl:{s:x}"),
                        &format!("package-{s}"),
                    ));
                    z.push(
                        ZoneFixture::new(&format!("intel-rapl:{s:x}:0"), "dram")
                            .with_range(65_712_999_613),
                    );
                }
            }
            PowercapLayout::IntelClient => {
                z.push(ZoneFixture::new("intel-rapl:0", "package-0"));
                z.push(ZoneFixture::new("intel-rapl:0:0", "core"));
                z.push(ZoneFixture::new("intel-rapl:0:1", "uncore"));
                z.push(ZoneFixture::new("intel-rapl:1", "psys"));
                z.push(ZoneFixture::new("intel-rapl-mmio:0", "package-0"));
            }
            PowercapLayout::MultiDie => {
                for d in 0..2 {
                    z.push(ZoneFixture::new(
                        &format!("intel-rapl:{d}"),
                        &format!("package-0-die-{d}"),
                    ));
                    z.push(ZoneFixture::new(&format!("intel-rapl:{d}:0"), "dram"));
                }
            }
            PowercapLayout::Amd { sockets } => {
                for s in 0..sockets {
                    z.push(ZoneFixture::new(
                        &format!("intel-rapl:{s:x}"),
                        &format!("package-{s}"),
                    ));
                    z.push(ZoneFixture::new(&format!("intel-rapl:{s:x}:0"), "core"));
                }
            }
        }
        z
    }
}

/// A generated powercap class directory (what `/sys/class/powercap` looks like).
#[derive(Debug, Clone)]
pub struct PowercapTree {
    root: PathBuf,
}

impl PowercapTree {
    /// Create the zones under `root` (with `energy_uj` = 0), plus the `intel-rapl` control-type
    /// directory that the real class directory also contains.
    pub fn create(root: &Path, zones: &[ZoneFixture]) -> Self {
        write_file(&root.join("intel-rapl/enabled"), "1\n");
        for z in zones {
            let dir = root.join(&z.dir);
            write_file(&dir.join("name"), &format!("{}\n", z.name));
            write_file(
                &dir.join("max_energy_range_uj"),
                &format!("{}\n", z.max_energy_range_uj),
            );
            // Fixed width from the start (see write_counter_file): a later rewrite never
            // changes the file's length, so a concurrent reader never sees a torn value.
            write_counter_file(&dir.join("energy_uj"), 0);
            write_file(&dir.join("enabled"), "1\n");
        }
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The class directory (pass as `powercap_root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Set a zone's counter (`dir` as in [`ZoneFixture::dir`]).
    pub fn set_energy_uj(&self, dir: &str, value: u64) {
        write_counter_file(&self.root.join(dir).join("energy_uj"), value);
    }
}

/// Write `<sysfs_root>/devices/system/cpu/cpuN/topology/{physical_package_id,die_id}` for each
/// `(cpu, socket, die)`.
pub fn write_cpu_topology(sysfs_root: &Path, cpus: &[(u32, u32, u32)]) {
    for &(cpu, socket, die) in cpus {
        let topo = sysfs_root.join(format!("devices/system/cpu/cpu{cpu}/topology"));
        write_file(&topo.join("physical_package_id"), &format!("{socket}\n"));
        write_file(&topo.join("die_id"), &format!("{die}\n"));
    }
}

/// Write a perf `power` PMU description under `<perf_root>/power`: `type`, `cpumask` and for
/// each `(event, config)` the `events/<event>`, `.scale` and `.unit` files, as the kernel's RAPL
/// PMU does (scale 2^-32 J).
pub fn write_perf_power_pmu(
    perf_root: &Path,
    pmu_type: u32,
    cpumask: &str,
    events: &[(&str, u64)],
) {
    let dir = perf_root.join("power");
    write_file(&dir.join("type"), &format!("{pmu_type}\n"));
    write_file(&dir.join("cpumask"), &format!("{cpumask}\n"));
    for &(name, config) in events {
        let ev = dir.join("events");
        write_file(&ev.join(name), &format!("event=0x{config:02x}\n"));
        write_file(
            &ev.join(format!("{name}.scale")),
            "2.3283064365386962890625e-10\n",
        );
        write_file(&ev.join(format!("{name}.unit")), "Joules\n");
    }
}

/// Create a cgroup v1 `cpuacct` hierarchy entry: `<root>/cpuacct/<rel>/cpuacct.usage` (ns).
pub fn write_cgroup_v1_usage(root: &Path, rel: &str, usage_ns: u64) {
    write_counter_file(
        &root.join("cpuacct").join(rel).join("cpuacct.usage"),
        usage_ns,
    );
}

/// Create a cgroup v2 entry: `<root>/cgroup.controllers` and `<root>/<rel>/cpu.stat`.
pub fn write_cgroup_v2_usage(root: &Path, rel: &str, usage_usec: u64) {
    let controllers = root.join("cgroup.controllers");
    if !controllers.is_file() {
        write_file(&controllers, "cpuset cpu io memory pids\n");
    }
    let user = usage_usec * 2 / 3;
    // Fixed-width numbers, rewritten in place: tests rewrite this while ergond reads it.
    write_in_place(
        &root.join(rel).join("cpu.stat"),
        &format!(
            "usage_usec {usage_usec:020}\nuser_usec {user:020}\nsystem_usec {:020}\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
            usage_usec - user
        ),
    );
}

/// Per-CPU jiffies for `/proc/stat`: (user, nice, system, idle, iowait, irq, softirq, steal).
pub type CpuJiffies = [u64; 8];

/// Write `<proc_root>/stat` with an aggregate `cpu` line and one `cpuN` line per entry.
pub fn write_proc_stat(proc_root: &Path, cpus: &[(u32, CpuJiffies)]) {
    let mut total = [0u64; 8];
    for (_, j) in cpus {
        for (t, v) in total.iter_mut().zip(j) {
            *t += v;
        }
    }
    let line = |label: &str, j: &CpuJiffies| {
        format!(
            "{label} {:020} {:020} {:020} {:020} {:020} {:020} {:020} {:020} 0 0\n",
            j[0], j[1], j[2], j[3], j[4], j[5], j[6], j[7]
        )
    };
    let mut s = line("cpu ", &total);
    for (n, j) in cpus {
        s.push_str(&line(&format!("cpu{n}"), j));
    }
    let _ = writeln!(
        s,
        "intr 12345 0 0\nctxt 999\nbtime 1700000000\nprocesses 42"
    );
    s.push_str("procs_running 1\nprocs_blocked 0\nsoftirq 1 2 3 4 5 6 7 8 9 10 11\n");
    // Fixed-width numbers, rewritten in place: tests rewrite this while ergond reads it.
    write_in_place(&proc_root.join("stat"), &s);
}
