//! `ergond check`: load the configuration, open every source, and describe what this node can
//! measure, in words an administrator can act on (and as JSON for scripts).
//!
//! Nothing here is a daemon: each source is opened once, briefly read, and closed. A source
//! that cannot be opened becomes a problem line that names what failed and what to do; the
//! other sources are still described.

use crate::config::{Config, ConfigError, DEFAULT_PATH};
use crate::counter::{CounterKind, Method, Support};
use crate::sources::cgroup::{detect_version, CgroupVersion};
use crate::sources::nvml::{sampling_period, GpuError, GpuInfo, GpuSource, ReadVia};
use crate::sources::perf::PerfRapl;
use crate::sources::rapl::{RaplBackend, RaplSource};
use crate::sources::topology::CpuTopology;
use nvml_wrapper::error::NvmlError;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Exit status of `ergond check`: configuration valid and at least one energy source works.
pub const EXIT_OK: u8 = 0;
/// Exit status: the configuration is invalid (or unreadable).
pub const EXIT_CONFIG: u8 = 1;
/// Exit status: no energy source works on this node.
pub const EXIT_NO_SOURCE: u8 = 2;

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigReport {
    /// The file read, or the default path that was looked for.
    pub path: String,
    /// Whether a file was read (false: built-in defaults, because the default file is absent).
    pub from_file: bool,
}

impl ConfigReport {
    /// How to refer to the configuration in advice ("set `x` in …").
    fn where_to_set(&self) -> String {
        if self.from_file {
            self.path.clone()
        } else {
            format!("{} (create it)", self.path)
        }
    }
}

/// Load the configuration as the CLI does: an explicitly given file must exist; the default
/// file ([`DEFAULT_PATH`]) may be absent, which means built-in defaults.
pub fn load_config(explicit: Option<&Path>) -> Result<(Config, ConfigReport), ConfigError> {
    let path = explicit.unwrap_or(Path::new(DEFAULT_PATH));
    match Config::load(path) {
        Ok(c) => Ok((
            c,
            ConfigReport {
                path: path.display().to_string(),
                from_file: true,
            },
        )),
        Err(ConfigError::Read { source, .. })
            if explicit.is_none() && source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok((
                Config::default(),
                ConfigReport {
                    path: path.display().to_string(),
                    from_file: false,
                },
            ))
        }
        Err(e) => Err(e),
    }
}

/// A configuration error as one line that names the file (value errors alone do not).
pub fn describe_config_error(e: &ConfigError, explicit: Option<&Path>) -> String {
    match e {
        ConfigError::Invalid { .. } => format!(
            "{e} (in {})",
            explicit.unwrap_or(Path::new(DEFAULT_PATH)).display()
        ),
        _ => e.to_string(),
    }
}

/// The NVML library ergond loads.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NvmlReport {
    /// Library path from `nvml_library`, or the driver's default name.
    pub library: String,
    /// Whether `nvml_library` was set (false: the dynamic loader's search path is used).
    pub library_configured: bool,
    /// Whether NVML was loaded and the GPUs listed.
    pub ok: bool,
    /// NVML library version.
    pub nvml_version: Option<String>,
    /// NVIDIA driver version.
    pub driver_version: Option<String>,
    /// The GPUs, in NVML index order.
    pub gpus: Vec<GpuReport>,
    /// Why NVML is unusable, and what to do.
    pub problem: Option<String>,
}

/// What identifies a GPU and how ergond reads it: shared by the `check` and `probe` reports
/// (flattened into both, so their JSON keys are the same).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSummary {
    /// NVML index (in this process).
    pub index: u32,
    /// Minor number N of `/dev/nvidiaN`.
    pub minor: Option<u32>,
    /// UUID, the stable key.
    pub uuid: String,
    /// PCI bus id.
    pub pci_bus_id: Option<String>,
    /// Product name.
    pub name: Option<String>,
    /// `counter`, `integrated_power` or `unsupported`.
    pub method: String,
    /// How the energy counter is read: `field_value`, `function` or `unsupported`.
    pub energy_read: String,
    /// How instantaneous power is read: `field_value`, `function` or `unsupported`.
    pub power_read: String,
}

impl GpuSummary {
    /// The summary of one GPU as the NVML source opened it.
    pub fn of(info: &GpuInfo) -> Self {
        GpuSummary {
            index: info.id.index,
            minor: info.id.minor,
            uuid: info.id.uuid.clone(),
            pci_bus_id: info.id.pci_bus_id.clone(),
            name: info.id.name.clone(),
            method: method_and_reason(info).0,
            energy_read: via_name(info.energy_via).into(),
            power_read: via_name(info.power_via).into(),
        }
    }

    /// `counter (energy counter: field value, power: field value)`, for the text reports.
    pub fn method_line(&self) -> String {
        format!(
            "{} (energy counter: {}, power: {})",
            self.method.replace('_', " "),
            self.energy_read.replace('_', " "),
            self.power_read.replace('_', " ")
        )
    }
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuReport {
    /// Identity and read path.
    #[serde(flatten)]
    pub gpu: GpuSummary,
    /// Why this method (and, for the fallback, what it costs in accuracy).
    pub method_reason: String,
    /// What the update period below is of: `energy counter` or `power reading`.
    pub update_period_of: Option<String>,
    /// Detected update period in milliseconds (median interval between two changes).
    pub update_period_ms: Option<f64>,
    /// Why no period was detected, when it was not.
    pub update_period_note: Option<String>,
    /// Sampling period ergond will use for this GPU (ms), from the detected period and the
    /// `sampling.gpu_*_period_ms` settings.
    pub sampling_period_ms: Option<f64>,
    /// The activity and health statistics the GPU reports (jobs' `gpus[].efficiency`), and
    /// those it does not; empty when they could not be probed.
    pub efficiency_reported: Vec<&'static str>,
    /// See `efficiency_reported`.
    pub efficiency_not_reported: Vec<&'static str>,
}

/// One RAPL zone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZoneReport {
    /// Zone key, e.g. `package-0`, `package-1:dram`.
    pub key: String,
    /// Where the values come from (powercap directory, or perf event and CPU).
    pub origin: String,
    /// Energy after which the raw counter wraps, in joules (`None`: 64-bit, never wraps).
    pub wraps_after_j: Option<f64>,
    /// Time to wrap at the `sampling.cpu_max_power_w` limit, in seconds: ergond must read the
    /// zone more often than this.
    pub wraps_after_s_at_max_power: Option<f64>,
}

/// CPU energy through RAPL.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RaplReport {
    /// Whether RAPL could be opened.
    pub ok: bool,
    /// `perf` or `powercap`.
    pub backend: Option<String>,
    /// Why the perf power PMU is not used (when powercap is, or nothing works).
    pub perf_not_used: Option<String>,
    /// Zones.
    pub zones: Vec<ZoneReport>,
    /// Why RAPL is unusable, and what to do.
    pub problem: Option<String>,
}

/// cgroup CPU accounting (used to split CPU energy between jobs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupReport {
    /// The cgroup root looked at.
    pub root: String,
    /// `v1` or `v2`.
    pub version: Option<String>,
    /// Why no hierarchy was found, and what to do.
    pub problem: Option<String>,
}

/// Everything `ergond check` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    /// ergond version.
    pub ergond_version: String,
    /// The configuration used.
    pub config: ConfigReport,
    /// GPUs.
    pub nvml: NvmlReport,
    /// CPU packages / DRAM.
    pub rapl: RaplReport,
    /// cgroups.
    pub cgroup: CgroupReport,
    /// Whole-node power meters (hwmon, HPE Cray pm_counters, Redfish, IPMI); the one marked
    /// `used` gives the energy at the wall. Not energy sources of their own.
    pub meters: Vec<crate::sources::meter::MeterDetection>,
    /// Energy sources that work: `nvml` (at least one measurable GPU), `rapl`.
    pub energy_sources: Vec<String>,
    /// Every problem line, for scripts.
    pub problems: Vec<String>,
    /// The exit status `ergond check` ends with.
    pub exit_code: u8,
}

/// Total time spent detecting GPU counter update periods.
pub const DETECT_BUDGET: Duration = Duration::from_millis(1000);

/// Open every source described by `config` and describe it. `detect_budget` bounds the time
/// spent detecting GPU update periods, all GPUs together.
pub fn check(config: &Config, config_report: ConfigReport, detect_budget: Duration) -> Inventory {
    let nvml = nvml_report(config, &config_report, detect_budget);
    let rapl = rapl_report(config);
    let cgroup = cgroup_report(config);
    let meters = crate::sources::meter::detect(&config.meters);
    let mut energy_sources = Vec::new();
    if nvml.gpus.iter().any(|g| g.gpu.method != "unsupported") {
        energy_sources.push("nvml".to_string());
    }
    if rapl.ok {
        energy_sources.push("rapl".to_string());
    }
    let problems: Vec<String> = [&nvml.problem, &rapl.problem, &cgroup.problem]
        .into_iter()
        .flatten()
        .cloned()
        .chain(
            meters
                .iter()
                .filter(|m| m.problem)
                .filter_map(|m| Some(format!("{} node meter: {}", m.kind, m.why.as_ref()?))),
        )
        .collect();
    let exit_code = if energy_sources.is_empty() {
        EXIT_NO_SOURCE
    } else {
        EXIT_OK
    };
    Inventory {
        ergond_version: env!("CARGO_PKG_VERSION").to_string(),
        config: config_report,
        nvml,
        rapl,
        cgroup,
        meters,
        energy_sources,
        problems,
        exit_code,
    }
}

/// How a quantity is read, as a word (`field_value`, `function`, `unsupported`).
pub fn via_name(v: ReadVia) -> &'static str {
    match v {
        ReadVia::FieldValue => "field_value",
        ReadVia::Function => "function",
        ReadVia::Unsupported => "unsupported",
    }
}

/// The method of a GPU as a word, and the reason for it.
pub fn method_and_reason(info: &GpuInfo) -> (String, String) {
    match &info.method {
        Support::Supported(Method::Counter) => (
            "counter".into(),
            match info.energy_via {
                ReadVia::FieldValue => "hardware energy counter (NVML total energy), read in one \
                                       nvmlDeviceGetFieldValues call"
                    .into(),
                _ => "hardware energy counter (NVML total energy), read with \
                      nvmlDeviceGetTotalEnergyConsumption (the field-values call is unavailable)"
                    .into(),
            },
        ),
        Support::Supported(Method::IntegratedPower) => (
            "integrated_power".into(),
            "NVML reports no energy counter for this GPU (it exists from Volta on): energy is \
             integrated from sampled power, which misses changes between samples and is less \
             exact"
                .into(),
        ),
        Support::Unsupported(why) => (
            "unsupported".into(),
            format!("{why}: this GPU's energy is reported as unmeasured, never as 0 J"),
        ),
    }
}

/// A problem line for an NVML that cannot be opened, saying what to do.
pub fn nvml_problem(err: &GpuError, library: &str, configured: bool, cfg: &ConfigReport) -> String {
    let where_ = cfg.where_to_set();
    match err {
        GpuError::Init {
            source: NvmlError::LibloadingError(e),
            ..
        } if !configured => format!(
            "no NVIDIA driver library: {library} could not be loaded ({e}). If this node has \
             GPUs, install the NVIDIA driver or set `nvml_library` in {where_} to the path of \
             libnvidia-ml.so.1; if this node has no GPU, nothing needs fixing"
        ),
        GpuError::Init {
            source: NvmlError::LibloadingError(e),
            ..
        } => format!(
            "no NVIDIA driver library at {library} (`nvml_library` in {where_}): {e}. Point \
             `nvml_library` at the driver's libnvidia-ml.so.1, or remove the key to use the \
             dynamic loader's default; if this node has no GPU, remove the key"
        ),
        GpuError::Init {
            source: NvmlError::DriverNotLoaded,
            ..
        } => format!(
            "{library} was loaded but the NVIDIA kernel driver is not running \
             (NVML_ERROR_DRIVER_NOT_LOADED): load it (`modprobe nvidia`), then check \
             `nvidia-smi` and `dmesg`"
        ),
        GpuError::Init {
            source: NvmlError::LibRmVersionMismatch,
            ..
        } => format!(
            "{library} does not match the running NVIDIA kernel driver \
             (NVML_ERROR_LIB_RM_VERSION_MISMATCH): the driver was upgraded without a reboot or \
             module reload; reboot the node or reload the nvidia modules"
        ),
        GpuError::Init {
            source: NvmlError::NoPermission,
            ..
        } => format!(
            "NVML ({library}) refused access (NVML_ERROR_NO_PERMISSION): run ergond as root, \
             as the packaged systemd unit does"
        ),
        other => format!("NVML ({library}) is unusable: {other}"),
    }
}

fn nvml_report(config: &Config, cfg: &ConfigReport, detect_budget: Duration) -> NvmlReport {
    let configured = config.nvml_library.is_some();
    let library = config
        .nvml_library
        .clone()
        .unwrap_or_else(crate::sources::nvml::default_library)
        .display()
        .to_string();
    let mut report = NvmlReport {
        library: library.clone(),
        library_configured: configured,
        ok: false,
        nvml_version: None,
        driver_version: None,
        gpus: Vec::new(),
        problem: None,
    };
    let mut src = match GpuSource::open(config.nvml_library.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            report.problem = Some(nvml_problem(&e, &library, configured, cfg));
            return report;
        }
    };
    report.ok = true;
    report.nvml_version = src.nvml_version().ok();
    report.driver_version = src.driver_version().ok();
    if src.is_empty() {
        report.problem = Some(format!(
            "NVML ({library}) loaded but lists no GPU: if this node has GPUs, check \
             `nvidia-smi` and that the GPUs are not hidden from ergond's service \
             (CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES, device cgroup)"
        ));
        return report;
    }
    let s = &config.sampling;
    let ms = Duration::from_millis;
    let measurable: Vec<usize> = (0..src.len())
        .filter(|&i| src.info(i).method.supported().is_some())
        .collect();
    let deadline = Instant::now() + detect_budget;
    let mut left = measurable.len();
    let uuids: Vec<String> = src.gpus().into_iter().map(|g| g.id.uuid).collect();
    let stats =
        crate::sources::nvml::GpuStatsReader::open(config.nvml_library.as_deref(), &uuids).ok();
    for i in 0..src.len() {
        let info = src.info(i).clone();
        let (efficiency_reported, efficiency_not_reported) =
            stats.as_ref().map(|s| s.reported(i)).unwrap_or_default();
        let mut g = GpuReport {
            gpu: GpuSummary::of(&info),
            method_reason: method_and_reason(&info).1,
            update_period_of: None,
            update_period_ms: None,
            update_period_note: None,
            sampling_period_ms: None,
            efficiency_reported,
            efficiency_not_reported,
        };
        if measurable.contains(&i) {
            let of = if info.energy_via != ReadVia::Unsupported {
                "energy counter"
            } else {
                "power reading"
            };
            g.update_period_of = Some(of.into());
            // Share what is left of the budget between the GPUs still to do; a GPU that
            // finishes early leaves its time to the next.
            let budget = deadline.saturating_duration_since(Instant::now()) / left as u32;
            left -= 1;
            match src.detect_update_period(i, budget, 6) {
                Ok(Some(p)) => g.update_period_ms = Some(p.as_secs_f64() * 1e3),
                Ok(None) => {
                    g.update_period_note = Some(format!(
                        "the {of} did not change twice within {} ms{}; ergond uses \
                         sampling.gpu_default_period_ms. Run `ergond probe` for a longer \
                         measurement",
                        budget.as_millis(),
                        if of == "power reading" {
                            " (constant power?)"
                        } else {
                            ""
                        }
                    ))
                }
                Err(e) => g.update_period_note = Some(format!("reading the GPU failed: {e}")),
            }
            let period = sampling_period(
                g.update_period_ms.map(|p| Duration::from_secs_f64(p / 1e3)),
                ms(s.gpu_min_period_ms),
                ms(s.gpu_max_period_ms),
                ms(s.gpu_default_period_ms),
            );
            g.sampling_period_ms = Some(period.as_secs_f64() * 1e3);
        }
        report.gpus.push(g);
    }
    if measurable.is_empty() {
        report.problem = Some(format!(
            "NVML ({library}) lists {} GPU(s) but none reports energy or power: GPU energy \
             cannot be measured on this node (see each GPU's reason)",
            src.len()
        ));
    }
    report
}

fn rapl_report(config: &Config) -> RaplReport {
    let opts = config.rapl_options();
    let mut report = RaplReport {
        ok: false,
        backend: None,
        perf_not_used: None,
        zones: Vec::new(),
        problem: None,
    };
    // Why perf is not used, for the administrator (RaplSource only logs it).
    let perf_reason = || -> Option<String> {
        if !opts.prefer_perf {
            return Some("disabled by configuration (prefer_perf = false)".into());
        }
        let topo = match CpuTopology::discover(&opts.sysfs_root) {
            Ok(t) => t,
            Err(e) => return Some(e.to_string()),
        };
        PerfRapl::open(&opts.perf_sysfs_root, &topo)
            .err()
            .map(|e| e.to_string())
    };
    match RaplSource::open(&opts) {
        Ok(src) => {
            report.ok = true;
            report.backend = Some(
                match src.backend() {
                    RaplBackend::Perf(_) => "perf",
                    RaplBackend::Powercap(_) => "powercap",
                }
                .into(),
            );
            if matches!(src.backend(), RaplBackend::Powercap(_)) {
                report.perf_not_used = perf_reason();
            }
            let max_w = config.sampling.cpu_max_power_w;
            report.zones = src
                .zones()
                .iter()
                .map(|z| {
                    let wraps_after_j = match z.kind {
                        CounterKind::Wrapping { modulus } => {
                            Some(modulus as f64 * z.joules_per_unit)
                        }
                        CounterKind::Resetting => None,
                    };
                    ZoneReport {
                        key: z.key.to_string(),
                        origin: z.origin.clone(),
                        wraps_after_j,
                        wraps_after_s_at_max_power: wraps_after_j.map(|j| j / max_w),
                    }
                })
                .collect();
        }
        Err(e) => {
            report.perf_not_used = perf_reason();
            report.problem = Some(format!("no CPU energy (RAPL): {e}"));
        }
    }
    report
}

fn cgroup_report(config: &Config) -> CgroupReport {
    let root = config.cgroup_root.display().to_string();
    match detect_version(&config.cgroup_root) {
        Ok(v) => CgroupReport {
            root,
            version: Some(
                match v {
                    CgroupVersion::V1 => "v1",
                    CgroupVersion::V2 => "v2",
                }
                .into(),
            ),
            problem: None,
        },
        Err(e) => CgroupReport {
            root,
            version: None,
            problem: Some(format!(
                "{e}. Without it CPU energy cannot be split between jobs sharing the node"
            )),
        },
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "?".into())
}

/// The inventory as text for people.
pub fn render_text(inv: &Inventory) -> String {
    let mut o = String::new();
    let c = &inv.config;
    let _ = writeln!(o, "ergond {} check", inv.ergond_version);
    if c.from_file {
        let _ = writeln!(o, "config: {} (valid)", c.path);
    } else {
        let _ = writeln!(o, "config: {} not found; using built-in defaults", c.path);
    }

    let n = &inv.nvml;
    let _ = writeln!(o, "\nGPUs (NVML)");
    let _ = writeln!(
        o,
        "  library: {}{}",
        n.library,
        if n.library_configured {
            " (nvml_library)"
        } else {
            " (dynamic loader search path)"
        }
    );
    if n.ok {
        let _ = writeln!(
            o,
            "  NVML {}, driver {}, {} GPU(s)",
            opt(&n.nvml_version),
            opt(&n.driver_version),
            n.gpus.len()
        );
    }
    for g in &n.gpus {
        let id = &g.gpu;
        let _ = writeln!(
            o,
            "  GPU {}  minor {}  {}  {}  {}",
            id.index,
            opt(&id.minor),
            id.uuid,
            opt(&id.pci_bus_id),
            opt(&id.name)
        );
        let _ = writeln!(o, "      energy: {}", id.method_line());
        let _ = writeln!(o, "      why: {}", g.method_reason);
        if let Some(of) = &g.update_period_of {
            match g.update_period_ms {
                Some(p) => {
                    let _ = writeln!(o, "      {of} update period: {p:.1} ms");
                }
                None => {
                    let _ = writeln!(
                        o,
                        "      {of} update period: not detected: {}",
                        opt(&g.update_period_note)
                    );
                }
            }
        }
        if let Some(sp) = g.sampling_period_ms {
            let _ = writeln!(o, "      ergond would sample it every {sp:.0} ms");
        }
        if !g.efficiency_reported.is_empty() || !g.efficiency_not_reported.is_empty() {
            let list = |v: &[&str]| {
                if v.is_empty() {
                    "none".to_owned()
                } else {
                    v.join(", ")
                }
            };
            let _ = writeln!(
                o,
                "      activity and health: {}; not reported: {}",
                list(&g.efficiency_reported),
                list(&g.efficiency_not_reported)
            );
        }
    }
    if let Some(p) = &n.problem {
        let _ = writeln!(o, "  PROBLEM: {p}");
    }

    let r = &inv.rapl;
    let _ = writeln!(o, "\nCPU (RAPL)");
    if let Some(b) = &r.backend {
        let _ = writeln!(o, "  backend: {b}, {} zone(s)", r.zones.len());
    }
    if let Some(why) = &r.perf_not_used {
        // A RAPL problem line may already carry the reason.
        if !r.problem.as_ref().is_some_and(|p| p.contains(why.as_str())) {
            let _ = writeln!(o, "  perf power PMU not used: {why}");
        }
    }
    for z in &r.zones {
        let wrap = match (z.wraps_after_j, z.wraps_after_s_at_max_power) {
            (Some(j), Some(s)) if s > 0.0 => format!(
                "wraps after {j:.1} J ({s:.0} s at the {:.0} W plausibility limit)",
                j / s
            ),
            (Some(j), _) => format!("wraps after {j:.1} J"),
            _ => "64-bit count, does not wrap".into(),
        };
        let _ = writeln!(o, "  {:<16} {wrap}  [{}]", z.key, z.origin);
    }
    if let Some(p) = &r.problem {
        let _ = writeln!(o, "  PROBLEM: {p}");
    }

    let cg = &inv.cgroup;
    let _ = writeln!(o, "\ncgroup");
    match &cg.version {
        Some(v) => {
            let _ = writeln!(o, "  {v} under {}", cg.root);
        }
        None => {
            let _ = writeln!(o, "  PROBLEM: {}", opt(&cg.problem));
        }
    }

    let _ = writeln!(
        o,
        "\nNode meters (the one in use gives the jobs' energy at the wall; [meters] use)"
    );
    for m in &inv.meters {
        if m.ok {
            let _ = writeln!(
                o,
                "  {}: {}  {}  resolution {} ms{}",
                m.kind,
                opt(&m.source),
                opt(&m.reading),
                m.resolution_ms.map_or("?".into(), |r| format!("{r:.0}")),
                if m.used { "  (in use)" } else { "" }
            );
        } else if m.problem {
            let _ = writeln!(o, "  {}: PROBLEM: {}", m.kind, opt(&m.why));
        } else {
            let _ = writeln!(o, "  {}: none ({})", m.kind, opt(&m.why));
        }
    }

    let _ = writeln!(o);
    if inv.energy_sources.is_empty() {
        let _ = writeln!(
            o,
            "RESULT: no energy source works on this node (see the PROBLEM lines above); \
             ergond would measure nothing"
        );
    } else {
        let _ = writeln!(
            o,
            "RESULT: ok: energy from {}; {} problem(s)",
            inv.energy_sources.join(" and "),
            inv.problems.len()
        );
    }
    o
}

/// Print `check`'s result and return its exit status.
pub fn run_check(explicit_config: Option<&PathBuf>, json: bool) -> u8 {
    let (config, report) = match load_config(explicit_config.map(PathBuf::as_path)) {
        Ok(c) => c,
        Err(e) => {
            if json {
                let v = serde_json::json!({
                    "ergond_version": env!("CARGO_PKG_VERSION"),
                    "config": {
                        "path": explicit_config
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| DEFAULT_PATH.to_string()),
                        "error": describe_config_error(&e, explicit_config.map(PathBuf::as_path)),
                    },
                    "exit_code": EXIT_CONFIG,
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            eprintln!(
                "ergond check: {}",
                describe_config_error(&e, explicit_config.map(PathBuf::as_path))
            );
            return EXIT_CONFIG;
        }
    };
    let inv = check(&config, report, DETECT_BUDGET);
    if json {
        match serde_json::to_string_pretty(&inv) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("ergond check: cannot encode the inventory as JSON: {e}"),
        }
    } else {
        print!("{}", render_text(&inv));
    }
    inv.exit_code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_default_file_means_defaults_but_missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let e = load_config(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("nope.toml"), "{e}");
        std::fs::write(&missing, "prefer_perf = false\n").unwrap();
        let (c, r) = load_config(Some(&missing)).unwrap();
        assert!(!c.prefer_perf && r.from_file);
        if !Path::new(DEFAULT_PATH).exists() {
            let (c, r) = load_config(None).unwrap();
            assert_eq!(c, Config::default());
            assert!(!r.from_file);
        }
    }

    #[test]
    fn nothing_available_exits_2_and_says_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            nvml_library: Some(dir.path().join("libnvidia-ml.so.1")),
            powercap_root: dir.path().join("powercap"),
            perf_sysfs_root: dir.path().join("perf"),
            sysfs_root: dir.path().join("sys"),
            cgroup_root: dir.path().join("cgroup"),
            meters: crate::sources::meter::MetersConfig {
                hwmon: crate::sources::meter::HwmonConfig {
                    root: dir.path().join("hwmon"),
                    ..Default::default()
                },
                pm_counters: crate::sources::meter::PmCountersConfig {
                    root: dir.path().join("pm_counters"),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Config::default()
        };
        let report = ConfigReport {
            path: "/x/ergond.toml".into(),
            from_file: true,
        };
        let inv = check(&config, report, Duration::from_millis(10));
        assert_eq!(inv.exit_code, EXIT_NO_SOURCE);
        assert!(inv.energy_sources.is_empty());
        assert_eq!(inv.problems.len(), 3, "{:?}", inv.problems);
        let text = render_text(&inv);
        assert!(text.contains("no NVIDIA driver library at"), "{text}");
        assert!(text.contains("no RAPL energy counters found"), "{text}");
        assert!(text.contains("no energy source works"), "{text}");
        // Absent meters are described, not problems.
        assert!(
            text.contains("pm_counters: none (no HPE Cray pm_counters"),
            "{text}"
        );
        assert!(text.contains("redfish: none (not configured"), "{text}");
    }
}
