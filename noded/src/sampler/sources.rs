//! The sources handed to the sampler ([`SamplerSources`]), opened from the configuration, and
//! the detection of the GPU counters' update period.

use crate::clock::monotonic_ns;
use crate::config::Config;
use crate::sources::cgroup::{detect_version, CgroupHierarchy, SocketBusy};
use crate::sources::nvml::{GpuSource, GpuStatsReader};
use crate::sources::rapl::RaplSource;
use crate::sources::topology::CpuTopology;
use std::time::Duration;

/// The opened sources handed to the sampler; any may be absent.
#[derive(Debug, Default)]
pub struct SamplerSources {
    /// GPUs through NVML.
    pub gpu: Option<GpuSource>,
    /// The same GPUs' activity and health statistics (a second NVML handle).
    pub gpu_stats: Option<GpuStatsReader>,
    /// RAPL zones (perf or powercap).
    pub rapl: Option<RaplSource>,
    /// cgroup hierarchy for [`SamplerHandle::watch_cgroup`](super::SamplerHandle::watch_cgroup).
    pub cgroups: Option<CgroupHierarchy>,
    /// Per-socket busy time from `/proc/stat`.
    pub sockets: Option<SocketBusy>,
}

/// A source that could not be opened by [`SamplerSources::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceProblem {
    /// `nvml`, `rapl`, `cgroup` or `sockets`.
    pub source: &'static str,
    /// The error, naming the file or library and the fix.
    pub error: String,
}

impl SamplerSources {
    /// Open every source `config` points at. A source that cannot be opened is left out and
    /// reported (and logged); the others are still returned.
    pub fn open(config: &Config) -> (Self, Vec<SourceProblem>) {
        let mut problems = Vec::new();
        let mut problem = |source: &'static str, error: String| {
            tracing::warn!(source, %error, "source unavailable; sampling without it");
            problems.push(SourceProblem { source, error });
        };
        let gpu = match GpuSource::open(config.nvml_library.as_deref()) {
            Ok(g) => Some(g),
            Err(e) => {
                problem("nvml", e.to_string());
                None
            }
        };
        let gpu_stats = gpu.as_ref().filter(|g| !g.is_empty()).and_then(|g| {
            let uuids: Vec<String> = g.gpus().into_iter().map(|i| i.id.uuid).collect();
            match GpuStatsReader::open(config.nvml_library.as_deref(), &uuids) {
                Ok(r) if r.reports_nothing() => {
                    tracing::info!("no GPU reports activity or health statistics; jobs' GPU efficiency is not reported");
                    None
                }
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "GPU statistics unavailable; jobs' GPU efficiency is not reported");
                    None
                }
            }
        });
        let rapl = match RaplSource::open(&config.rapl_options()) {
            Ok(r) => Some(r),
            Err(e) => {
                problem("rapl", e.to_string());
                None
            }
        };
        let cgroups = match detect_version(&config.cgroup_root) {
            Ok(version) => Some(CgroupHierarchy {
                root: config.cgroup_root.clone(),
                version,
            }),
            Err(e) => {
                problem("cgroup", e.to_string());
                None
            }
        };
        let sockets = match CpuTopology::discover(&config.sysfs_root)
            .map_err(|e| e.to_string())
            .and_then(|t| SocketBusy::open(&config.proc_root, t).map_err(|e| e.to_string()))
        {
            Ok(s) => Some(s),
            Err(e) => {
                problem("sockets", e);
                None
            }
        };
        (
            Self {
                gpu,
                gpu_stats,
                rapl,
                cgroups,
                sockets,
            },
            problems,
        )
    }
}

/// Find how often the GPUs' energy counters (or, for GPUs without one, their power readings)
/// change: poll every measurable GPU every 200 µs until each has changed 4 times or `budget`
/// is spent, and take the median interval between two changes over all GPUs
/// ([`crate::sources::nvml::update_period_from_intervals`]). `None` when no GPU changed twice
/// (constant power without a counter, or a budget too short).
pub fn detect_gpu_counter_period(src: &mut GpuSource, budget: Duration) -> Option<Duration> {
    const CHANGES: usize = 4;
    let measurable: Vec<usize> = (0..src.len())
        .filter(|&i| !src.info(i).lost && src.info(i).method.supported().is_some())
        .collect();
    let mut last: Vec<Option<u64>> = vec![None; src.len()];
    let mut changes: Vec<Vec<u64>> = vec![Vec::new(); src.len()];
    let deadline = monotonic_ns() + budget.as_nanos() as u64;
    while monotonic_ns() < deadline && measurable.iter().any(|&i| changes[i].len() < CHANGES) {
        for &i in &measurable {
            if changes[i].len() >= CHANGES {
                continue;
            }
            let Ok(r) = src.read(i) else { continue };
            let v = r.energy_mj.or(r.power_mw.map(u64::from));
            if v.is_some() && last[i].is_some() && v != last[i] {
                changes[i].push(r.at_ns);
            }
            last[i] = v;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    crate::sources::nvml::update_period_from_intervals(
        changes
            .iter()
            .flat_map(|c| c.windows(2).map(|w| w[1] - w[0])),
    )
}
