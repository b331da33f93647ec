//! Prometheus `/metrics`: the text exposition format (0.0.4) of a [`NodeSnapshot`].
//!
//! [`render`] is a pure function of the snapshot, so the format is tested without a socket;
//! [`server`] is the small HTTP server that calls it on every scrape.
//!
//! Families (all prefixed `ergon_`; energies are joules since ergond started, so `rate()` and
//! `increase()` work and a hardware wrap or reset never shows):
//!
//! | family | type | labels |
//! |---|---|---|
//! | `gpu_energy_joules_total`, `gpu_power_watts` | counter, gauge | `uuid`, `index`, `minor`, `name` |
//! | `gpu_lost`, `gpu_energy_resets_total`, `gpu_dropped_intervals_total`, `gpu_read_errors_total` | gauge, counters | `uuid` |
//! | `gpu_energy_method` (value 1) | gauge | `uuid`, `method` = `counter` \| `integrated_power` |
//! | `rapl_energy_joules_total`, `rapl_power_watts` | counter, gauge | `zone`, `socket`, `domain` |
//! | `rapl_wraps_total`, `rapl_dropped_intervals_total` | counters | `zone`, `socket`, `domain` |
//! | `node_energy_joules_total` | counter | `component` = `gpu` \| `cpu` \| `dram` |
//! | `sampler_samples_total`, `sampler_missed_ticks_total`, `sampler_read_errors_total` | counters | `source` |
//! | `sampler_period_seconds`, `sampler_max_lateness_seconds` | gauges | `source` |
//! | `sampler_read_latency_seconds`, `sampler_lateness_seconds` | summaries | `source` (`quantile` = `0.5` \| `0.99` over a recent window; `_sum`, `_count` since start) |
//! | `sampler_thread_cpu_seconds_total` | counter | `thread` |
//! | `cgroup_cpu_seconds_total`, `cgroup_read_errors_total` | counters | `cgroup` (watched job cgroups only) |
//! | `socket_cpu_busy_seconds_total`, `socket_cpu_seconds_total` | counters | `socket` |
//! | `jobs_open`, `manifests_pending`, `attribution_conservation_error_joules` | gauges | |
//! | `spool_write_failures_total`, `queue_replayed_events_total` | counters | |
//! | `attribution_intervals_total`, `attribution_failed_intervals_total`, `attribution_conservation_failures_total`, `attribution_late_readings_total` | counters | |
//! | `attribution_energy_joules_total` | counter | `component` = `gpu` \| `cpu` \| `dram`, `bucket` = `measured` \| `jobs` \| `idle` \| `unattributed` |
//! | `node_meter_energy_joules_total` | counter | `source` = `hwmon` \| `pm_counters` \| `redfish` \| `ipmi` (the node meter in use) |
//! | `node_meter_power_watts` | gauge | `source` (when the meter gives a power or its counter has two readings) |
//! | `node_meter_read_errors_total`, `node_meter_rejected_readings_total` | counters | `source` |
//! | `wall_energy_joules_total` | counter | `bucket` = `meter` \| `components` \| `rest` \| `jobs` \| `idle` \| `unattributed` \| `excess` (metered intervals only) |
//! | `wall_disagreements_total` | counter | (intervals where the components exceeded the meter beyond its accuracy) |
//! | `socket_connections_total`, `socket_evictions_total`, `socket_refusals_total`, `socket_malformed_frames_total`, `socket_timeouts_total` | counters | |
//! | `job_energy_joules_total` | counter | `job_id`, [`user`], [`account`], `component` = `gpu` \| `cpu` \| `dram` (open jobs only) |
//! | `job_power_watts` | gauge | `job_id`, [`user`], [`account`] (open jobs only) |
//! | `job_metrics_left_out_jobs`, `job_metrics_max_jobs` | gauges | |
//! | `build_info` (value 1) | gauge | `version` |
//!
//! A quantity the hardware does not provide is absent, never 0: no energy, method or power series
//! for a GPU that has neither an energy counter nor power, no `gpu_power_watts` series for a GPU
//! without a power reading, no `node_energy_joules_total{component="dram"}` on a node
//! without DRAM zones (AMD), no `socket` label on a platform-wide zone (psys).
//!
//! `node_energy_joules_total{component="cpu"}` sums the package zones only (cores and uncore are
//! parts of the package, psys contains it), `dram` sums the DRAM zones, `gpu` every GPU (a lost
//! GPU keeps the energy counted before it was lost).
//!
//! The `job_*` families exist when `[metrics] per_job` is on (the default): one set of series
//! per open job, at most `per_job_max_jobs` jobs (the longest-running), removed when the job
//! ends; `user` and `account` only where `per_job_labels` asks for them. GPU utilisation is
//! not among them: ergond reads it only on GPUs several jobs share, for the split.
//!
//! The read latency and lateness are summaries: quantiles over the sampler's recent window (as
//! client libraries' summaries do), `_sum` and `_count` since start. `promtool check metrics`
//! finds nothing to say about the exposition (a test runs it).

pub mod server;

use crate::snapshot::NodeSnapshot;
use crate::sources::rapl::{RaplDomain, ZoneKey};
use std::fmt::Write as _;

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Append the whole exposition of `snapshot` to `out`.
///
/// Every family has one `# HELP` and one `# TYPE` line and is written once, with its samples
/// together; a family with no sample is left out entirely.
pub fn render(snapshot: &NodeSnapshot, out: &mut String) {
    let mut w = Writer { out };

    // GPUs.
    let gpu_id = |g: &crate::snapshot::GpuSnapshot| -> Vec<(&'static str, String)> {
        let mut l = vec![("uuid", g.uuid.clone()), ("index", g.index.to_string())];
        if let Some(minor) = g.minor {
            l.push(("minor", minor.to_string()));
        }
        l.push(("name", g.name.clone()));
        l
    };
    let uuid = |g: &crate::snapshot::GpuSnapshot| vec![("uuid", g.uuid.clone())];
    let gpus = &snapshot.gpus;
    // A GPU with neither an energy counter nor power has no energy to report: unknown, not 0.
    let measured = || gpus.iter().filter(|g| g.measurable);
    w.family(
        "ergon_gpu_energy_joules_total",
        "counter",
        "Energy used by the GPU since ergond started, from its energy counter or, where it has none, integrated power (J).",
        measured().map(|g| (gpu_id(g), g.energy_j)),
    );
    w.family(
        "ergon_gpu_power_watts",
        "gauge",
        "Latest instantaneous power of the GPU (W); absent when the GPU reports none.",
        measured().filter_map(|g| g.power_w.map(|p| (gpu_id(g), p))),
    );
    w.family(
        "ergon_gpu_lost",
        "gauge",
        "1 when the GPU fell off the bus (GPU_IS_LOST) and is no longer read, else 0.",
        gpus.iter()
            .map(|g| (uuid(g), if g.lost { 1.0 } else { 0.0 })),
    );
    w.family(
        "ergon_gpu_energy_resets_total",
        "counter",
        "Energy counter resets seen (driver reloads); energy across a reset is still counted.",
        gpus.iter().map(|g| (uuid(g), g.resets as f64)),
    );
    w.family(
        "ergon_gpu_dropped_intervals_total",
        "counter",
        "GPU sampling intervals dropped because their energy was physically implausible.",
        gpus.iter().map(|g| (uuid(g), g.dropped_intervals as f64)),
    );
    w.family(
        "ergon_gpu_read_errors_total",
        "counter",
        "Reads of the GPU that failed.",
        gpus.iter().map(|g| (uuid(g), g.read_errors as f64)),
    );
    w.family(
        "ergon_gpu_energy_method",
        "gauge",
        "How the GPU's energy is obtained (value 1): counter differences, or integrated power where the GPU has no energy counter.",
        measured().map(|g| {
            let mut l = uuid(g);
            l.push(("method", g.method.to_string()));
            (l, 1.0)
        }),
    );

    // GPU activity and health (ergond-gpustat), where reported.
    let stats = &snapshot.gpu_stats;
    let gpu = |g: &crate::snapshot::GpuStatsSnapshot| vec![("gpu", g.uuid.clone())];
    w.family(
        "ergon_gpu_utilization_ratio",
        "gauge",
        "SM utilisation of the GPU over the driver's last sample period, 0-1 (label gpu: its UUID).",
        stats
            .iter()
            .filter_map(|g| g.sample.util_pct.map(|u| (gpu(g), f64::from(u) / 100.0))),
    );
    w.family(
        "ergon_gpu_memory_used_bytes",
        "gauge",
        "Device memory in use on the GPU (bytes).",
        stats
            .iter()
            .filter_map(|g| g.sample.memory_used_bytes.map(|b| (gpu(g), b as f64))),
    );
    w.family(
        "ergon_gpu_temperature_celsius",
        "gauge",
        "GPU die temperature (degrees Celsius).",
        stats
            .iter()
            .filter_map(|g| g.sample.temperature_c.map(|c| (gpu(g), f64::from(c)))),
    );
    w.family(
        "ergon_gpu_throttle_seconds_total",
        "counter",
        "Time the GPU's clocks were held down since the driver loaded, per reason (NVML clock-event-reason counters; s).",
        stats.iter().flat_map(|g| {
            crate::sources::nvml::THROTTLE_REASONS
                .iter()
                .zip(g.sample.throttle_ns)
                .filter_map(move |((reason, _), ns)| {
                    let mut l = gpu(g);
                    l.push(("reason", (*reason).to_string()));
                    ns.map(|ns| (l, ns as f64 / 1e9))
                })
        }),
    );
    w.family(
        "ergon_gpu_xid_events_total",
        "counter",
        "Xid critical errors the GPU reported since ergond started.",
        stats
            .iter()
            .filter_map(|g| g.xid_total.map(|n| (gpu(g), n as f64))),
    );

    // RAPL zones.
    let zone_id = |k: &ZoneKey| -> Vec<(&'static str, String)> {
        let mut l = vec![("zone", k.to_string())];
        if let Some(s) = k.socket {
            l.push(("socket", s.to_string()));
        }
        l.push(("domain", k.domain.to_string()));
        l
    };
    let zones = &snapshot.zones;
    w.family(
        "ergon_rapl_energy_joules_total",
        "counter",
        "Energy of the RAPL zone since ergond started, wraps handled (J).",
        zones.iter().map(|z| (zone_id(&z.key), z.energy_j)),
    );
    w.family(
        "ergon_rapl_power_watts",
        "gauge",
        "Average power of the RAPL zone over the latest sampling interval (W).",
        zones
            .iter()
            .filter_map(|z| z.power_w.map(|p| (zone_id(&z.key), p))),
    );
    w.family(
        "ergon_rapl_wraps_total",
        "counter",
        "Wraps of the RAPL zone's hardware counter handled.",
        zones.iter().map(|z| (zone_id(&z.key), z.wraps as f64)),
    );
    w.family(
        "ergon_rapl_dropped_intervals_total",
        "counter",
        "RAPL sampling intervals dropped because their energy was physically implausible.",
        zones
            .iter()
            .map(|z| (zone_id(&z.key), z.dropped_intervals as f64)),
    );

    // Node totals.
    let mut totals: Vec<(Vec<(&'static str, String)>, f64)> = Vec::new();
    if measured().next().is_some() {
        totals.push((
            vec![("component", "gpu".into())],
            measured().map(|g| g.energy_j).sum(),
        ));
    }
    for (component, domain) in [("cpu", RaplDomain::Package), ("dram", RaplDomain::Dram)] {
        let mut of_domain = zones.iter().filter(|z| z.key.domain == domain).peekable();
        if of_domain.peek().is_some() {
            totals.push((
                vec![("component", component.into())],
                of_domain.map(|z| z.energy_j).sum(),
            ));
        }
    }
    w.family(
        "ergon_node_energy_joules_total",
        "counter",
        "Energy of the node since ergond started by component (J): gpu = all GPUs, cpu = RAPL package zones, dram = RAPL DRAM zones.",
        totals,
    );

    // Sampler health.
    let samplers = &snapshot.samplers;
    let source = |s: &crate::snapshot::SamplerHealth| vec![("source", s.source.to_string())];
    let secs = |ns: u64| ns as f64 / 1e9;
    w.family(
        "ergon_sampler_samples_total",
        "counter",
        "Sampling ticks that ran a read.",
        samplers.iter().map(|s| (source(s), s.samples as f64)),
    );
    w.family(
        "ergon_sampler_missed_ticks_total",
        "counter",
        "Sampling deadlines skipped because a tick overran.",
        samplers.iter().map(|s| (source(s), s.missed_ticks as f64)),
    );
    w.family(
        "ergon_sampler_read_errors_total",
        "counter",
        "Hardware reads that failed.",
        samplers.iter().map(|s| (source(s), s.read_errors as f64)),
    );
    w.family(
        "ergon_sampler_period_seconds",
        "gauge",
        "Configured sampling period (s).",
        samplers.iter().map(|s| (source(s), secs(s.period_ns))),
    );
    w.summary(
        "ergon_sampler_read_latency_seconds",
        "Duration of one tick's reads (s); quantiles over a recent window.",
        samplers.iter().map(|s| {
            (
                source(s),
                [
                    (0.5, secs(s.read_latency_p50_ns)),
                    (0.99, secs(s.read_latency_p99_ns)),
                ],
                secs(s.read_latency_sum_ns),
                s.samples,
            )
        }),
    );
    w.summary(
        "ergon_sampler_lateness_seconds",
        "Wake-up lateness of a tick after its deadline (s); quantiles over a recent window.",
        samplers.iter().map(|s| {
            (
                source(s),
                [
                    (0.5, secs(s.lateness_p50_ns)),
                    (0.99, secs(s.lateness_p99_ns)),
                ],
                secs(s.lateness_sum_ns),
                s.samples,
            )
        }),
    );
    w.family(
        "ergon_sampler_max_lateness_seconds",
        "gauge",
        "Largest wake-up lateness of a tick after its deadline over a recent window (s).",
        samplers
            .iter()
            .map(|s| (source(s), secs(s.max_lateness_ns))),
    );
    w.family(
        "ergon_sampler_thread_cpu_seconds_total",
        "counter",
        "CPU time used by each sampler thread since it started (s): ergond's own measurement overhead.",
        snapshot
            .threads
            .iter()
            .filter_map(|t| t.cpu_ns.map(|ns| (vec![("thread", t.name.to_string())], secs(ns)))),
    );

    // CPU time the attribution uses: watched cgroups and per-socket busy time.
    w.family(
        "ergon_cgroup_cpu_seconds_total",
        "counter",
        "CPU time of a watched cgroup (all its tasks, all CPUs) (s).",
        snapshot
            .cgroups
            .iter()
            .map(|c| (vec![("cgroup", c.path.clone())], secs(c.cpu_ns))),
    );
    w.family(
        "ergon_cgroup_read_errors_total",
        "counter",
        "Failed reads of a watched cgroup's CPU time (e.g. the cgroup was removed).",
        snapshot
            .cgroups
            .iter()
            .map(|c| (vec![("cgroup", c.path.clone())], c.read_errors as f64)),
    );
    let socket = |s: &crate::snapshot::SocketSnapshot| vec![("socket", s.socket.to_string())];
    w.family(
        "ergon_socket_cpu_busy_seconds_total",
        "counter",
        "Non-idle CPU time summed over the socket's CPUs since boot, from /proc/stat (s).",
        snapshot
            .sockets
            .iter()
            .map(|s| (socket(s), secs(s.busy_ns))),
    );
    w.family(
        "ergon_socket_cpu_seconds_total",
        "counter",
        "All CPU time (busy and idle) summed over the socket's CPUs since boot, from /proc/stat (s).",
        snapshot
            .sockets
            .iter()
            .map(|s| (socket(s), secs(s.total_ns))),
    );

    // Job attribution: its running balance, checked continuously.
    if let Some(a) = &snapshot.attribution {
        w.family(
            "ergon_jobs_open",
            "gauge",
            "Jobs running on this node (started, not yet ended).",
            [(vec![], a.open_jobs as f64)],
        );
        w.family(
            "ergon_manifests_pending",
            "gauge",
            "Jobs that have ended and whose manifest is not written yet (retried while the spool does not take it).",
            [(vec![], a.manifests_pending as f64)],
        );
        w.family(
            "ergon_spool_write_failures_total",
            "counter",
            "Failed attempts to write a manifest into the spool (disk full, read-only, permissions; see the log).",
            [(vec![], a.spool_failures as f64)],
        );
        w.family(
            "ergon_queue_replayed_events_total",
            "counter",
            "Job and step events the plugin queued while ergond could not take them, replayed.",
            [(vec![], a.replayed_events as f64)],
        );
        w.family(
            "ergon_attribution_intervals_total",
            "counter",
            "Intervals of node energy attributed to jobs.",
            [(vec![], a.intervals as f64)],
        );
        w.family(
            "ergon_attribution_failed_intervals_total",
            "counter",
            "Intervals whose readings the attribution model refused (nothing attributed; see the log).",
            [(vec![], a.failed_intervals as f64)],
        );
        w.family(
            "ergon_attribution_conservation_failures_total",
            "counter",
            "Intervals whose attribution failed the independent conservation check (see the log).",
            [(vec![], a.conservation_failures as f64)],
        );
        w.family(
            "ergon_attribution_late_readings_total",
            "counter",
            "Event readings older than the last closed interval, applied at that interval's end.",
            [(vec![], a.late_readings as f64)],
        );
        w.family(
            "ergon_attribution_conservation_error_joules",
            "gauge",
            "Measured energy minus jobs + idle + unattributed, summed over all intervals (J): 0 up to rounding.",
            [(vec![], a.conservation_error_j)],
        );
        w.family(
            "ergon_attribution_energy_joules_total",
            "counter",
            "Measured node energy by where the attribution put it (J): bucket = jobs | idle | unattributed; measured = their sum.",
            a.components.iter().flat_map(|(component, v)| {
                ["measured", "jobs", "idle", "unattributed"]
                    .into_iter()
                    .zip(*v)
                    .map(move |(bucket, j)| {
                        (
                            vec![
                                ("component", (*component).to_string()),
                                ("bucket", bucket.to_string()),
                            ],
                            j,
                        )
                    })
            }),
        );
    }

    // The node meter and the energy at the wall.
    if let Some(m) = &snapshot.meter {
        let src = || vec![("source", m.kind.to_string())];
        w.family(
            "ergon_node_meter_energy_joules_total",
            "counter",
            "Energy the node meter measured since ergond started (J), at the wall.",
            [(src(), m.energy_j)],
        );
        if let Some(p) = m.power_w {
            w.family(
                "ergon_node_meter_power_watts",
                "gauge",
                "The node meter's latest power (W).",
                [(src(), p)],
            );
        }
        w.family(
            "ergon_node_meter_read_errors_total",
            "counter",
            "Node meter reads that failed (see ergond check and the log).",
            [(src(), m.read_errors as f64)],
        );
        w.family(
            "ergon_node_meter_rejected_readings_total",
            "counter",
            "Node meter readings rejected as implausible.",
            [(src(), m.rejected as f64)],
        );
    }
    if let Some(wall) = snapshot.attribution.as_ref().and_then(|a| a.wall.as_ref()) {
        w.family(
            "ergon_wall_energy_joules_total",
            "counter",
            "Energy at the wall over the metered intervals (J): meter = components + rest - excess; rest = jobs + idle + unattributed.",
            [
                ("meter", wall.meter_j),
                ("components", wall.components_j),
                ("rest", wall.rest_j),
                ("jobs", wall.jobs_j),
                ("idle", wall.idle_j),
                ("unattributed", wall.unattributed_j),
                ("excess", wall.excess_j),
            ]
            .into_iter()
            .map(|(b, v)| (vec![("bucket", b.to_string())], v)),
        );
        w.family(
            "ergon_wall_disagreements_total",
            "counter",
            "Intervals where the node's components measured more than the node meter beyond its accuracy (the rest of the node is 0 there).",
            [(vec![], wall.disagreements as f64)],
        );
    }

    // Open jobs' running figures, bounded (see the module documentation).
    if let Some(jobs) = &snapshot.jobs {
        let id = |j: &crate::snapshot::JobSeries| {
            let mut l = vec![("job_id", j.job_id.to_string())];
            if let Some(u) = &j.user {
                l.push(("user", u.clone()));
            }
            if let Some(a) = &j.account {
                l.push(("account", a.clone()));
            }
            l
        };
        w.family(
            "ergon_job_energy_joules_total",
            "counter",
            "Energy attributed to the open job so far (J), by component: gpu = its GPUs' share, cpu = RAPL package, dram = RAPL DRAM; the series ends with the job.",
            jobs.jobs.iter().flat_map(|j| {
                [("gpu", j.gpu_j), ("cpu", j.cpu_j), ("dram", j.dram_j)]
                    .into_iter()
                    .filter_map(move |(c, v)| {
                        let mut l = id(j);
                        l.push(("component", c.to_string()));
                        v.map(|v| (l, v))
                    })
            }),
        );
        w.family(
            "ergon_job_power_watts",
            "gauge",
            "Average power attributed to the open job over the last attribution interval (about 1 s), all components (W).",
            jobs.jobs
                .iter()
                .filter_map(|j| j.power_w.map(|p| (id(j), p))),
        );
        w.family(
            "ergon_job_gpu_utilization_ratio",
            "gauge",
            "Average SM utilisation of the open job's GPUs so far, 0-1 (time-weighted; whole devices, also when shared).",
            jobs.jobs
                .iter()
                .filter_map(|j| j.gpu_util.map(|u| (vec![("job_id", j.job_id.to_string())], u))),
        );
        w.family(
            "ergon_job_metrics_left_out_jobs",
            "gauge",
            "Open jobs without per-job series because more jobs are open than [metrics] per_job_max_jobs.",
            [(vec![], jobs.left_out as f64)],
        );
        w.family(
            "ergon_job_metrics_max_jobs",
            "gauge",
            "Most open jobs exported with per-job series ([metrics] per_job_max_jobs).",
            [(vec![], jobs.max_jobs as f64)],
        );
    }

    // The plugin socket: connections it took, made room for, refused, and bad frames.
    if let Some(k) = &snapshot.socket_server {
        for (name, help, v) in [
            (
                "ergon_socket_connections_total",
                "Connections accepted on the plugin socket.",
                k.accepted,
            ),
            (
                "ergon_socket_evictions_total",
                "Idle connections closed to make room at the connection cap.",
                k.evicted,
            ),
            (
                "ergon_socket_refusals_total",
                "Connections refused (per-uid limit, or every slot busy with a request).",
                k.refused,
            ),
            (
                "ergon_socket_malformed_frames_total",
                "Frames on the plugin socket that could not be decoded.",
                k.malformed,
            ),
            (
                "ergon_socket_timeouts_total",
                "Connections closed for staying silent past their deadline.",
                k.timed_out,
            ),
        ] {
            w.family(name, "counter", help, [(vec![], v as f64)]);
        }
    }

    w.family(
        "ergon_build_info",
        "gauge",
        "ergond build (value 1).",
        [(
            vec![("version", env!("CARGO_PKG_VERSION").to_string())],
            1.0,
        )],
    );
}

/// Writes families in the exposition format.
struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    /// One family: HELP, TYPE, then every sample; nothing at all when there is no sample.
    fn family<I>(&mut self, name: &str, kind: &str, help: &str, samples: I)
    where
        I: IntoIterator<Item = (Vec<(&'static str, String)>, f64)>,
    {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return;
        }
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_help(help, self.out);
        self.out.push('\n');
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.sample(name, &labels, value);
        }
    }
}

impl Writer<'_> {
    /// One summary family: per label set, its quantiles, `_sum` and `_count`.
    fn summary<I, const N: usize>(&mut self, name: &str, help: &str, rows: I)
    where
        I: IntoIterator<Item = (Vec<(&'static str, String)>, [(f64, f64); N], f64, u64)>,
    {
        let mut rows = rows.into_iter().peekable();
        if rows.peek().is_none() {
            return;
        }
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_help(help, self.out);
        self.out.push('\n');
        let _ = writeln!(self.out, "# TYPE {name} summary");
        for (labels, quantiles, sum, count) in rows {
            for (q, v) in quantiles {
                let mut l = labels.clone();
                l.push(("quantile", q.to_string()));
                self.sample(name, &l, v);
            }
            self.sample(&format!("{name}_sum"), &labels, sum);
            self.sample(&format!("{name}_count"), &labels, count as f64);
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&'static str, String)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label_value(v, self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        write_value(value, self.out);
        self.out.push('\n');
    }
}

/// Label value escaping of the text format: backslash, double quote and line feed.
pub fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escaping: backslash and line feed (quotes are literal there).
fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value as Go's `ParseFloat` reads it: shortest round-trip decimal, `+Inf`, `-Inf`,
/// `NaN` (Rust would print `inf`).
fn write_value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::Method;
    use crate::snapshot::{
        CgroupSnapshot, GpuSnapshot, SamplerHealth, SamplerThread, SocketSnapshot, ZoneSnapshot,
    };
    use std::collections::{HashMap, HashSet};

    fn zone(socket: Option<u32>, domain: RaplDomain, energy_j: f64) -> ZoneSnapshot {
        ZoneSnapshot {
            raw_j: None,
            range_j: None,
            key: ZoneKey {
                socket,
                die: None,
                domain,
            },
            energy_j,
            power_w: Some(energy_j / 100.0),
            wraps: 1,
            dropped_intervals: 0,
            at_ns: 5,
        }
    }

    fn snapshot() -> NodeSnapshot {
        NodeSnapshot {
            taken_unix_ns: 1_700_000_000_000_000_000,
            gpus: vec![
                GpuSnapshot {
                    index: 0,
                    uuid: "GPU-aaaa".into(),
                    minor: Some(3),
                    name: "Fake H100".into(),
                    energy_j: 1234.5,
                    power_w: Some(300.25),
                    method: Method::Counter,
                    lost: false,
                    resets: 1,
                    dropped_intervals: 0,
                    measurable: true,
                    read_errors: 0,
                    at_ns: 5,
                    raw_j: None,
                    processes: None,
                },
                GpuSnapshot {
                    index: 1,
                    uuid: "GPU-bbbb".into(),
                    minor: None,
                    name: "Odd \"GPU\" \\ name\nline 2".into(),
                    energy_j: 0.5,
                    power_w: None,
                    method: Method::IntegratedPower,
                    lost: true,
                    resets: 0,
                    dropped_intervals: 2,
                    measurable: true,
                    read_errors: 3,
                    at_ns: 5,
                    raw_j: None,
                    processes: None,
                },
                // Neither energy counter nor power: listed, but no energy, method or power.
                GpuSnapshot {
                    index: 2,
                    uuid: "GPU-cccc".into(),
                    minor: Some(0),
                    name: "Fake vGPU".into(),
                    energy_j: 0.0,
                    power_w: None,
                    method: Method::IntegratedPower,
                    lost: false,
                    resets: 0,
                    dropped_intervals: 0,
                    measurable: false,
                    read_errors: 0,
                    at_ns: 0,
                    raw_j: None,
                    processes: None,
                },
            ],
            zones: vec![
                zone(Some(0), RaplDomain::Package, 500.0),
                zone(Some(0), RaplDomain::Dram, 50.0),
                zone(Some(1), RaplDomain::Package, 400.0),
                zone(Some(0), RaplDomain::Core, 300.0),
                zone(None, RaplDomain::Psys, 1000.0),
            ],
            samplers: vec![SamplerHealth {
                source: "gpu",
                period_ns: 100_000_000,
                samples: 42,
                missed_ticks: 1,
                read_errors: 0,
                read_latency_p50_ns: 12_000,
                read_latency_p99_ns: 250_000,
                max_lateness_ns: 1_500_000,
                lateness_p50_ns: 50_000,
                lateness_p99_ns: 900_000,
                lateness_sum_ns: 4_200_000,
                read_latency_sum_ns: 2_100_000,
            }],
            cgroups: vec![CgroupSnapshot {
                path: "slurm/uid_1000/job_42".into(),
                cpu_ns: 2_500_000_000,
                at_ns: 5,
                read_errors: 0,
            }],
            sockets: vec![SocketSnapshot {
                socket: 0,
                busy_ns: 7_000_000_000,
                total_ns: 20_000_000_000,
                at_ns: 5,
            }],
            threads: vec![SamplerThread {
                name: "ergond-gpu",
                sources: &["gpu"],
                cpu_ns: Some(30_000_000),
            }],
            taken_monotonic_ns: 5,
            attribution: None,
            socket_server: None,
            jobs: None,
            gpu_stats: vec![],
            meter: None,
        }
    }

    const GOLDEN: &str = r#"# HELP ergon_gpu_energy_joules_total Energy used by the GPU since ergond started, from its energy counter or, where it has none, integrated power (J).
# TYPE ergon_gpu_energy_joules_total counter
ergon_gpu_energy_joules_total{uuid="GPU-aaaa",index="0",minor="3",name="Fake H100"} 1234.5
ergon_gpu_energy_joules_total{uuid="GPU-bbbb",index="1",name="Odd \"GPU\" \\ name\nline 2"} 0.5
# HELP ergon_gpu_power_watts Latest instantaneous power of the GPU (W); absent when the GPU reports none.
# TYPE ergon_gpu_power_watts gauge
ergon_gpu_power_watts{uuid="GPU-aaaa",index="0",minor="3",name="Fake H100"} 300.25
# HELP ergon_gpu_lost 1 when the GPU fell off the bus (GPU_IS_LOST) and is no longer read, else 0.
# TYPE ergon_gpu_lost gauge
ergon_gpu_lost{uuid="GPU-aaaa"} 0
ergon_gpu_lost{uuid="GPU-bbbb"} 1
ergon_gpu_lost{uuid="GPU-cccc"} 0
# HELP ergon_gpu_energy_resets_total Energy counter resets seen (driver reloads); energy across a reset is still counted.
# TYPE ergon_gpu_energy_resets_total counter
ergon_gpu_energy_resets_total{uuid="GPU-aaaa"} 1
ergon_gpu_energy_resets_total{uuid="GPU-bbbb"} 0
ergon_gpu_energy_resets_total{uuid="GPU-cccc"} 0
# HELP ergon_gpu_dropped_intervals_total GPU sampling intervals dropped because their energy was physically implausible.
# TYPE ergon_gpu_dropped_intervals_total counter
ergon_gpu_dropped_intervals_total{uuid="GPU-aaaa"} 0
ergon_gpu_dropped_intervals_total{uuid="GPU-bbbb"} 2
ergon_gpu_dropped_intervals_total{uuid="GPU-cccc"} 0
# HELP ergon_gpu_read_errors_total Reads of the GPU that failed.
# TYPE ergon_gpu_read_errors_total counter
ergon_gpu_read_errors_total{uuid="GPU-aaaa"} 0
ergon_gpu_read_errors_total{uuid="GPU-bbbb"} 3
ergon_gpu_read_errors_total{uuid="GPU-cccc"} 0
# HELP ergon_gpu_energy_method How the GPU's energy is obtained (value 1): counter differences, or integrated power where the GPU has no energy counter.
# TYPE ergon_gpu_energy_method gauge
ergon_gpu_energy_method{uuid="GPU-aaaa",method="counter"} 1
ergon_gpu_energy_method{uuid="GPU-bbbb",method="integrated_power"} 1
# HELP ergon_rapl_energy_joules_total Energy of the RAPL zone since ergond started, wraps handled (J).
# TYPE ergon_rapl_energy_joules_total counter
ergon_rapl_energy_joules_total{zone="package-0",socket="0",domain="package"} 500
ergon_rapl_energy_joules_total{zone="package-0:dram",socket="0",domain="dram"} 50
ergon_rapl_energy_joules_total{zone="package-1",socket="1",domain="package"} 400
ergon_rapl_energy_joules_total{zone="package-0:core",socket="0",domain="core"} 300
ergon_rapl_energy_joules_total{zone="psys",domain="psys"} 1000
# HELP ergon_rapl_power_watts Average power of the RAPL zone over the latest sampling interval (W).
# TYPE ergon_rapl_power_watts gauge
ergon_rapl_power_watts{zone="package-0",socket="0",domain="package"} 5
ergon_rapl_power_watts{zone="package-0:dram",socket="0",domain="dram"} 0.5
ergon_rapl_power_watts{zone="package-1",socket="1",domain="package"} 4
ergon_rapl_power_watts{zone="package-0:core",socket="0",domain="core"} 3
ergon_rapl_power_watts{zone="psys",domain="psys"} 10
# HELP ergon_rapl_wraps_total Wraps of the RAPL zone's hardware counter handled.
# TYPE ergon_rapl_wraps_total counter
ergon_rapl_wraps_total{zone="package-0",socket="0",domain="package"} 1
ergon_rapl_wraps_total{zone="package-0:dram",socket="0",domain="dram"} 1
ergon_rapl_wraps_total{zone="package-1",socket="1",domain="package"} 1
ergon_rapl_wraps_total{zone="package-0:core",socket="0",domain="core"} 1
ergon_rapl_wraps_total{zone="psys",domain="psys"} 1
# HELP ergon_rapl_dropped_intervals_total RAPL sampling intervals dropped because their energy was physically implausible.
# TYPE ergon_rapl_dropped_intervals_total counter
ergon_rapl_dropped_intervals_total{zone="package-0",socket="0",domain="package"} 0
ergon_rapl_dropped_intervals_total{zone="package-0:dram",socket="0",domain="dram"} 0
ergon_rapl_dropped_intervals_total{zone="package-1",socket="1",domain="package"} 0
ergon_rapl_dropped_intervals_total{zone="package-0:core",socket="0",domain="core"} 0
ergon_rapl_dropped_intervals_total{zone="psys",domain="psys"} 0
# HELP ergon_node_energy_joules_total Energy of the node since ergond started by component (J): gpu = all GPUs, cpu = RAPL package zones, dram = RAPL DRAM zones.
# TYPE ergon_node_energy_joules_total counter
ergon_node_energy_joules_total{component="gpu"} 1235
ergon_node_energy_joules_total{component="cpu"} 900
ergon_node_energy_joules_total{component="dram"} 50
# HELP ergon_sampler_samples_total Sampling ticks that ran a read.
# TYPE ergon_sampler_samples_total counter
ergon_sampler_samples_total{source="gpu"} 42
# HELP ergon_sampler_missed_ticks_total Sampling deadlines skipped because a tick overran.
# TYPE ergon_sampler_missed_ticks_total counter
ergon_sampler_missed_ticks_total{source="gpu"} 1
# HELP ergon_sampler_read_errors_total Hardware reads that failed.
# TYPE ergon_sampler_read_errors_total counter
ergon_sampler_read_errors_total{source="gpu"} 0
# HELP ergon_sampler_period_seconds Configured sampling period (s).
# TYPE ergon_sampler_period_seconds gauge
ergon_sampler_period_seconds{source="gpu"} 0.1
# HELP ergon_sampler_read_latency_seconds Duration of one tick's reads (s); quantiles over a recent window.
# TYPE ergon_sampler_read_latency_seconds summary
ergon_sampler_read_latency_seconds{source="gpu",quantile="0.5"} 0.000012
ergon_sampler_read_latency_seconds{source="gpu",quantile="0.99"} 0.00025
ergon_sampler_read_latency_seconds_sum{source="gpu"} 0.0021
ergon_sampler_read_latency_seconds_count{source="gpu"} 42
# HELP ergon_sampler_lateness_seconds Wake-up lateness of a tick after its deadline (s); quantiles over a recent window.
# TYPE ergon_sampler_lateness_seconds summary
ergon_sampler_lateness_seconds{source="gpu",quantile="0.5"} 0.00005
ergon_sampler_lateness_seconds{source="gpu",quantile="0.99"} 0.0009
ergon_sampler_lateness_seconds_sum{source="gpu"} 0.0042
ergon_sampler_lateness_seconds_count{source="gpu"} 42
# HELP ergon_sampler_max_lateness_seconds Largest wake-up lateness of a tick after its deadline over a recent window (s).
# TYPE ergon_sampler_max_lateness_seconds gauge
ergon_sampler_max_lateness_seconds{source="gpu"} 0.0015
# HELP ergon_sampler_thread_cpu_seconds_total CPU time used by each sampler thread since it started (s): ergond's own measurement overhead.
# TYPE ergon_sampler_thread_cpu_seconds_total counter
ergon_sampler_thread_cpu_seconds_total{thread="ergond-gpu"} 0.03
# HELP ergon_cgroup_cpu_seconds_total CPU time of a watched cgroup (all its tasks, all CPUs) (s).
# TYPE ergon_cgroup_cpu_seconds_total counter
ergon_cgroup_cpu_seconds_total{cgroup="slurm/uid_1000/job_42"} 2.5
# HELP ergon_cgroup_read_errors_total Failed reads of a watched cgroup's CPU time (e.g. the cgroup was removed).
# TYPE ergon_cgroup_read_errors_total counter
ergon_cgroup_read_errors_total{cgroup="slurm/uid_1000/job_42"} 0
# HELP ergon_socket_cpu_busy_seconds_total Non-idle CPU time summed over the socket's CPUs since boot, from /proc/stat (s).
# TYPE ergon_socket_cpu_busy_seconds_total counter
ergon_socket_cpu_busy_seconds_total{socket="0"} 7
# HELP ergon_socket_cpu_seconds_total All CPU time (busy and idle) summed over the socket's CPUs since boot, from /proc/stat (s).
# TYPE ergon_socket_cpu_seconds_total counter
ergon_socket_cpu_seconds_total{socket="0"} 20
# HELP ergon_build_info ergond build (value 1).
# TYPE ergon_build_info gauge
"#;

    #[test]
    fn renders_the_golden_exposition() {
        let mut out = String::new();
        render(&snapshot(), &mut out);
        let build = format!(
            "ergon_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(out, format!("{GOLDEN}{build}"), "got:\n{out}");
        validate(&out).unwrap();
    }

    #[test]
    fn attribution_balance_is_exported_when_the_tracker_runs() {
        let snap = NodeSnapshot {
            attribution: Some(crate::snapshot::AttributionSnapshot {
                open_jobs: 2,
                intervals: 10,
                conservation_error_j: 1e-12,
                components: vec![("gpu", [100.0, 60.0, 0.0, 40.0])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = String::new();
        render(&snap, &mut out);
        validate(&out).unwrap();
        for line in [
            "ergon_jobs_open 2\n",
            "ergon_attribution_intervals_total 10\n",
            "ergon_attribution_conservation_error_joules 0.000000000001\n",
            "ergon_attribution_energy_joules_total{component=\"gpu\",bucket=\"jobs\"} 60\n",
            "ergon_attribution_energy_joules_total{component=\"gpu\",bucket=\"unattributed\"} 40\n",
        ] {
            assert!(out.contains(line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn gpu_statistics_are_exported_where_reported_and_absent_where_not() {
        use crate::snapshot::GpuStatsSnapshot;
        use crate::sources::nvml::GpuStatsSample;
        let snap = NodeSnapshot {
            gpu_stats: vec![
                GpuStatsSnapshot {
                    uuid: "GPU-aaaa".into(),
                    sample: GpuStatsSample {
                        util_pct: Some(37),
                        memory_used_bytes: Some(1 << 30),
                        temperature_c: Some(61),
                        throttle_ns: [Some(1_500_000_000), None, Some(0), None],
                        ..Default::default()
                    },
                    xid_total: Some(2),
                },
                GpuStatsSnapshot {
                    uuid: "GPU-bbbb".into(),
                    sample: GpuStatsSample {
                        util_pct: Some(0),
                        ..Default::default()
                    },
                    xid_total: None,
                },
            ],
            ..Default::default()
        };
        let mut out = String::new();
        render(&snap, &mut out);
        validate(&out).unwrap();
        for line in [
            "ergon_gpu_utilization_ratio{gpu=\"GPU-aaaa\"} 0.37\n",
            "ergon_gpu_utilization_ratio{gpu=\"GPU-bbbb\"} 0\n",
            "ergon_gpu_memory_used_bytes{gpu=\"GPU-aaaa\"} 1073741824\n",
            "ergon_gpu_temperature_celsius{gpu=\"GPU-aaaa\"} 61\n",
            "ergon_gpu_throttle_seconds_total{gpu=\"GPU-aaaa\",reason=\"power_cap\"} 1.5\n",
            "ergon_gpu_throttle_seconds_total{gpu=\"GPU-aaaa\",reason=\"hw_thermal\"} 0\n",
            "ergon_gpu_xid_events_total{gpu=\"GPU-aaaa\"} 2\n",
        ] {
            assert!(out.contains(line), "{line:?} missing from\n{out}");
        }
        for absent in [
            "ergon_gpu_memory_used_bytes{gpu=\"GPU-bbbb\"}",
            "reason=\"sw_thermal\"",
            "ergon_gpu_xid_events_total{gpu=\"GPU-bbbb\"}",
        ] {
            assert!(!out.contains(absent), "{absent:?} in\n{out}");
        }
    }

    #[test]
    fn open_jobs_have_per_job_series_and_the_bound_is_said() {
        use crate::snapshot::{JobMetricsSnapshot, JobSeries};
        let snap = NodeSnapshot {
            jobs: Some(JobMetricsSnapshot {
                jobs: vec![
                    JobSeries {
                        job_id: 42,
                        gpu_j: Some(1500.5),
                        cpu_j: Some(300.0),
                        dram_j: Some(20.0),
                        power_w: Some(410.0),
                        gpu_util: Some(0.375),
                        ..Default::default()
                    },
                    // A job on a node without DRAM zones, before its first interval, with the
                    // optional labels; a user name that needs escaping stays valid.
                    JobSeries {
                        job_id: 43,
                        user: Some("al\"ice".into()),
                        account: Some("physics".into()),
                        gpu_j: None,
                        cpu_j: Some(0.0),
                        dram_j: None,
                        power_w: None,
                        gpu_util: None,
                    },
                ],
                left_out: 3,
                max_jobs: 2,
            }),
            ..Default::default()
        };
        let mut out = String::new();
        render(&snap, &mut out);
        let series = validate(&out).unwrap();
        for line in [
            "ergon_job_energy_joules_total{job_id=\"42\",component=\"gpu\"} 1500.5\n",
            "ergon_job_energy_joules_total{job_id=\"42\",component=\"cpu\"} 300\n",
            "ergon_job_energy_joules_total{job_id=\"42\",component=\"dram\"} 20\n",
            "ergon_job_energy_joules_total{job_id=\"43\",user=\"al\\\"ice\",account=\"physics\",component=\"cpu\"} 0\n",
            "ergon_job_power_watts{job_id=\"42\"} 410\n",
            "ergon_job_gpu_utilization_ratio{job_id=\"42\"} 0.375\n",
            "ergon_job_metrics_left_out_jobs 3\n",
            "ergon_job_metrics_max_jobs 2\n",
        ] {
            assert!(out.contains(line), "{line} missing from\n{out}");
        }
        // Unknown is absent, not 0: no GPU or DRAM energy and no power for job 43.
        assert_eq!(
            series
                .iter()
                .filter(|s| s.starts_with("ergon_job_energy_joules_total["))
                .count(),
            4
        );
        assert!(
            !out.contains("ergon_job_power_watts{job_id=\"43\""),
            "{out}"
        );

        // Per-job series off: none of the families, not even the bound.
        let mut out = String::new();
        render(&NodeSnapshot::default(), &mut out);
        assert!(!out.contains("ergon_job_"), "{out}");

        // On, no open job: the bound's gauges only.
        let snap = NodeSnapshot {
            jobs: Some(JobMetricsSnapshot {
                max_jobs: 16,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut out = String::new();
        render(&snap, &mut out);
        validate(&out).unwrap();
        assert!(!out.contains("ergon_job_energy"), "{out}");
        assert!(out.contains("ergon_job_metrics_left_out_jobs 0\n"), "{out}");
    }

    #[test]
    fn empty_node_has_only_build_info_and_no_zero_energy() {
        let mut out = String::new();
        render(&NodeSnapshot::default(), &mut out);
        validate(&out).unwrap();
        assert!(!out.contains("energy"), "{out}");
        assert!(out.contains("ergon_build_info{version="), "{out}");
        assert_eq!(out.lines().count(), 3, "{out}");
    }

    #[test]
    fn amd_node_has_no_dram_total_and_gpu_without_power_has_no_power_series() {
        let mut snap = snapshot();
        snap.zones.retain(|z| z.key.domain != RaplDomain::Dram);
        snap.gpus[0].power_w = None;
        let mut out = String::new();
        render(&snap, &mut out);
        validate(&out).unwrap();
        assert!(!out.contains("component=\"dram\""), "{out}");
        assert!(!out.contains("ergon_gpu_power_watts"), "{out}");
        assert!(out.contains("ergon_node_energy_joules_total{component=\"cpu\"} 900"));

        // Only unmeasurable GPUs: no GPU energy at all, not 0.
        snap.gpus.retain(|g| !g.measurable);
        let mut out = String::new();
        render(&snap, &mut out);
        validate(&out).unwrap();
        assert!(!out.contains("ergon_gpu_energy_joules_total"), "{out}");
        assert!(!out.contains("ergon_gpu_energy_method"), "{out}");
        assert!(!out.contains("component=\"gpu\""), "{out}");
        assert!(out.contains("ergon_gpu_lost{uuid=\"GPU-cccc\"} 0"), "{out}");
    }

    #[test]
    fn special_values_use_go_spelling() {
        let mut out = String::new();
        for v in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 1e-9, 1e20, -0.0] {
            write_value(v, &mut out);
            out.push(' ');
        }
        assert_eq!(out, "+Inf -Inf NaN 0.000000001 100000000000000000000 -0 ");
        for s in out.split_whitespace() {
            parse_value(s).unwrap();
        }
    }

    #[test]
    fn many_gpus_and_zones_stay_valid() {
        let base = snapshot();
        let mut snap = base.clone();
        for i in 0..64u32 {
            let mut g = base.gpus[i as usize % 2].clone();
            g.index = i + 3;
            g.uuid = format!("GPU-{i:04}");
            g.name = format!("name with {{braces}}, commas = and \"{i}\"");
            snap.gpus.push(g);
        }
        for s in 2..10 {
            snap.zones
                .push(zone(Some(s), RaplDomain::Package, s as f64));
            snap.zones.push(zone(Some(s), RaplDomain::Dram, s as f64));
        }
        snap.samplers.push(SamplerHealth {
            source: "rapl",
            ..base.samplers[0].clone()
        });
        let mut out = String::new();
        render(&snap, &mut out);
        let series = validate(&out).unwrap();
        assert_eq!(
            series
                .iter()
                .filter(|s| s.starts_with("ergon_gpu_energy_joules_total["))
                .count(),
            66
        );
    }

    #[test]
    fn validator_rejects_what_it_must() {
        let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v\"} 1\n";
        validate(ok).unwrap();
        for bad in [
            // duplicate series (label order does not matter)
            "# HELP a x\n# TYPE a gauge\na{l=\"1\",m=\"2\"} 1\na{m=\"2\",l=\"1\"} 2\n",
            // TYPE twice
            "# HELP a x\n# TYPE a gauge\n# TYPE a gauge\na 1\n",
            // HELP twice
            "# HELP a x\n# HELP a x\n# TYPE a gauge\na 1\n",
            // family split in two
            "# TYPE a gauge\na{l=\"1\"} 1\n# TYPE b gauge\nb 1\na{l=\"2\"} 1\n",
            // bad escape, unterminated value, bad number, bad name
            "# TYPE a gauge\na{l=\"\\x\"} 1\n",
            "# TYPE a gauge\na{l=\"x} 1\n",
            "# TYPE a gauge\na 1.2.3\n",
            "# TYPE 1a gauge\n1a 1\n",
            // raw newline cannot appear; missing trailing newline
            "# TYPE a gauge\na 1",
            // sample without TYPE
            "a 1\n",
        ] {
            assert!(validate(bad).is_err(), "accepted:\n{bad}");
        }
    }

    /// Check `text` against the exposition format and return the series (name plus sorted
    /// labels). Every line must parse; HELP and TYPE at most once per family and before its
    /// samples; a family's samples contiguous; no series twice; counters end in `_total`.
    fn validate(text: &str) -> Result<Vec<String>, String> {
        let body = text
            .strip_suffix('\n')
            .ok_or("the exposition must end with a line feed")?;
        let mut help: HashSet<String> = HashSet::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut closed: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = Vec::new();
        let mut seen = HashSet::new();
        let mut enter = |name: &str, current: &mut Option<String>| -> Result<(), String> {
            if current.as_deref() != Some(name) {
                if closed.contains(name) {
                    return Err(format!("family {name} is split"));
                }
                if let Some(c) = current.take() {
                    closed.insert(c);
                }
                *current = Some(name.to_string());
            }
            Ok(())
        };
        for (n, line) in body.split('\n').enumerate() {
            let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').ok_or_else(|| err("HELP text"))?;
                check_name(name).map_err(|e| err(&e))?;
                enter(name, &mut current)?;
                if !help.insert(name.to_string()) {
                    return Err(err("second HELP"));
                }
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| err("TYPE"))?;
                check_name(name).map_err(|e| err(&e))?;
                if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&kind) {
                    return Err(err("unknown type"));
                }
                if kind == "counter" && !name.ends_with("_total") {
                    return Err(err("counter without _total"));
                }
                enter(name, &mut current)?;
                if types.insert(name.to_string(), kind.to_string()).is_some() {
                    return Err(err("second TYPE"));
                }
            } else if line.starts_with('#') {
                continue;
            } else {
                let (name, labels, value) = parse_sample(line).map_err(|e| err(&e))?;
                // A summary's `_sum` and `_count` belong to its family.
                let family = ["_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix))
                    .find(|f| types.get(*f).is_some_and(|k| k == "summary"))
                    .unwrap_or(&name)
                    .to_owned();
                if !types.contains_key(&family) {
                    return Err(err("sample before its TYPE"));
                }
                if types[&family] == "summary"
                    && family == name
                    && !labels.iter().any(|(k, _)| k == "quantile")
                {
                    return Err(err("summary sample without quantile"));
                }
                enter(&family, &mut current)?;
                parse_value(&value).map_err(|e| err(&e))?;
                let mut sorted = labels.clone();
                sorted.sort();
                let names: HashSet<&String> = sorted.iter().map(|(k, _)| k).collect();
                if names.len() != sorted.len() {
                    return Err(err("label twice"));
                }
                let key = format!("{name}{sorted:?}");
                if !seen.insert(key.clone()) {
                    return Err(err("duplicate series"));
                }
                series.push(key);
            }
        }
        Ok(series)
    }

    fn check_name(name: &str) -> Result<(), String> {
        let mut chars = name.chars();
        let first = chars.next().ok_or("empty name")?;
        if (first.is_ascii_alphabetic() || first == '_' || first == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            Ok(())
        } else {
            Err(format!("bad metric name {name:?}"))
        }
    }

    fn parse_value(v: &str) -> Result<f64, String> {
        match v {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ if v.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => {
                v.parse().map_err(|e| format!("bad value {v:?}: {e}"))
            }
            _ => Err(format!("bad value {v:?}")),
        }
    }

    /// `name{k="v",…} value` (no timestamp: ergond never sends one).
    type Sample = (String, Vec<(String, String)>, String);

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let end = line
            .find(['{', ' '])
            .ok_or("no value after the metric name")?;
        let name = &line[..end];
        check_name(name)?;
        let mut rest = &line[end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest.find('=').ok_or("label without =")?;
                let key = &rest[..eq];
                let mut kc = key.chars();
                if !kc
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    || !kc.all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return Err(format!("bad label name {key:?}"));
                }
                rest = rest[eq + 1..]
                    .strip_prefix('"')
                    .ok_or("label value without quote")?;
                let mut value = String::new();
                let mut chars = rest.char_indices();
                let close = loop {
                    match chars.next().ok_or("unterminated label value")? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => return Err(format!("bad escape \\{c}")),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key.to_string(), value));
                rest = &rest[close + 1..];
                if let Some(r) = rest.strip_prefix(',') {
                    rest = r;
                } else if !rest.starts_with('}') {
                    return Err("expected , or } after a label".into());
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or("expected a space before the value")?;
        if value.is_empty() || value.contains(' ') {
            return Err(format!("bad value field {value:?}"));
        }
        Ok((name.to_string(), labels, value.to_string()))
    }
}
