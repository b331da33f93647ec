//! `ergond` without a subcommand: the node service.
//!
//! Loads the configuration, opens the energy sources, starts the [`crate::sampler`] threads,
//! serves Prometheus `/metrics` on `metrics_listen` and the SPANK plugin's socket on
//! `socket_path` ([`crate::server`], answered by [`crate::jobs::tracker::JobTracker`]) until
//! SIGTERM or SIGINT; then stops both servers, writes the manifests of jobs that have ended,
//! stops the sampler and exits 0. Logs go through `tracing` (level from `RUST_LOG`, default
//! `info`) to stderr, or to the journal when stderr is connected to it; under systemd it
//! notifies readiness, status and stopping and pings the watchdog ([`crate::systemd`]).
//!
//! Jobs get one manifest each in `spool_dir` when they end, with GPU, CPU package and DRAM
//! energy attributed per job ([`crate::jobs::attributor`]); open jobs are journaled in
//! `state_dir` and taken back after a restart ([`crate::jobs::recovery`]); a job that asked
//! for `--energy-report` gets its report, written as its user ([`crate::jobs::report`]).
//!
//! Exit status: 0 after a clean stop; 1 if the configuration is invalid or the service cannot
//! start (listen address or socket in use, unknown `slurm_user` or `socket_group`, a thread
//! cannot be created); 2 if no energy source (no GPU, no RAPL) works on this node, as
//! `ergond check` reports.

use crate::config::Config;
use crate::inventory::{describe_config_error, load_config};
use crate::jobs::facts::{GpuFact, NodeFacts};
use crate::jobs::tracker::{Access, JobTracker, TrackerConfig};
use crate::metrics::server::{serve, Limits, SnapshotSource};
use crate::sampler::{Sampler, SamplerHandle, SamplerSources};
use crate::server::{Handler, ServerLimits};
use crate::sources::cgroup::CgroupVersion;
use crate::sources::rapl::RaplBackend;
use ergon_protocol::{EnergyMethod, SensorInfo, SensorKind};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// Exit status after a clean stop.
pub const EXIT_OK: u8 = 0;
/// Exit status: invalid configuration, or the service could not start.
pub const EXIT_START: u8 = 1;
/// Exit status: no energy source works on this node.
pub const EXIT_NO_SOURCE: u8 = 2;

/// Run the service until SIGTERM/SIGINT, logging to `log`; returns the exit status.
pub fn run(explicit_config: Option<&Path>, log: crate::systemd::LogTarget) -> u8 {
    crate::systemd::init_logging(log);
    crate::systemd::status("starting");
    let (config, report) = match load_config(explicit_config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{}", describe_config_error(&e, explicit_config));
            return EXIT_START;
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %report.path,
        from_file = report.from_file,
        "ergond starting"
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the I/O runtime");
            return EXIT_START;
        }
    };
    runtime.block_on(service(config, &report.path))
}

async fn service(config: Config, config_path: &str) -> u8 {
    // Signal handlers first, so a stop request during start-up is not lost.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
            return EXIT_START;
        }
    };

    // Listen before the (slower) sources are opened: a port already in use fails at once.
    let addr: SocketAddr = config
        .metrics_listen
        .parse()
        .expect("Config::validate checked metrics_listen");
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "cannot listen on {addr} for /metrics: {e}; set `metrics_listen` in {config_path} \
                 to a free address:port (another ergond may be running)"
            );
            return EXIT_START;
        }
    };

    // Then the plugin's socket, with the identities it needs.
    let slurm_uid = match lookup_uid(&config.slurm_user) {
        Some(u) => u,
        None => {
            tracing::error!(
                "slurm_user {:?} in {config_path} is not a user of this node; set it to SlurmUser \
                 from slurm.conf",
                config.slurm_user
            );
            return EXIT_START;
        }
    };
    let gid = match &config.socket_group {
        None => None,
        Some(g) => match lookup_gid(g) {
            Some(gid) => Some(gid),
            None => {
                tracing::error!(
                    "socket_group {g:?} in {config_path} is not a group of this node; create it or \
                     remove the key"
                );
                return EXIT_START;
            }
        },
    };
    // Who may read the jobs' figures: the spool and the user's report file follow it.
    let spool_modes = match spool_modes(&config, config_path) {
        Some(m) => m,
        None => return EXIT_START,
    };
    // Per-job series: no user or account label where job data is private.
    let (metrics_config, dropped) = config.metrics.in_effect(spool_modes.private);
    if !dropped.is_empty() {
        tracing::warn!(
            labels = ?dropped,
            "private job data is in effect: the per-job series on /metrics carry job_id only, \
             not the user or account labels set in [metrics] per_job_labels"
        );
    }
    let socket = match crate::server::bind(&config.socket_path, config.socket_mode, gid) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "cannot serve the plugin's socket {}: {e}; set `socket_path` in {config_path} to a \
                 path ergond may create",
                config.socket_path.display()
            );
            return EXIT_START;
        }
    };

    let (sources, problems) = SamplerSources::open(&config);
    let sensors = sensors_of(&sources);
    let gpu_extra: Vec<GpuExtra> = sources
        .gpu
        .as_ref()
        .map(|g| {
            g.gpus()
                .into_iter()
                .map(|i| GpuExtra {
                    uuid: i.id.uuid,
                    pci_bus_id: i.id.pci_bus_id,
                    mig: i.mig,
                })
                .collect()
        })
        .unwrap_or_default();
    let spool_dir = config.spool_dir.clone();
    let spool_layout = config.spool_layout;
    let socket_path = config.socket_path.clone();
    let socket_cpus = crate::sources::topology::CpuTopology::discover(&config.sysfs_root)
        .map(|t| t.socket_cpus())
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "CPU topology unreadable: jobs' CPU energy is split by socket size");
            Vec::new()
        });
    let attribution = config.attribution;
    let idle_gpu_util_percent = config.report.idle_gpu_util_percent;
    let report_factors = crate::jobs::report::Factors {
        co2e_g_per_kwh: config.report.co2e_g_per_kwh,
        pue: config.report.pue,
        price_per_kwh: config.report.price_per_kwh,
        currency: config.report.currency.clone(),
        source: config.report.factors_source.clone(),
    };
    let reap_period = std::time::Duration::from_secs(config.lost_job_check_s);
    let state_dir = config.state_dir.clone();
    let proc_root = config.proc_root.clone();
    let slurm = crate::jobs::discovery::SlurmNode {
        name: config.node_name.clone().unwrap_or_else(short_host_name),
        gres_conf: config.gres_conf.clone(),
        mig_minors: config.mig_minors.clone(),
    };
    let queue_dir = Some(config.queue_dir());
    let power = crate::jobs::recovery::PowerLimits {
        gpu_max_power_w: config.sampling.gpu_max_power_w,
        cpu_max_power_w: config.sampling.cpu_max_power_w,
    };
    let gpus = sources.gpu.as_ref().map_or(0, |g| g.len());
    let zones = sources.rapl.as_ref().map_or(0, |r| r.zones().len());
    if gpus == 0 && zones == 0 {
        tracing::error!(
            problems = ?problems.iter().map(|p| format!("{}: {}", p.source, p.error)).collect::<Vec<_>>(),
            "no energy source works on this node (no GPU, no RAPL); `ergond check` says why"
        );
        let _ = std::fs::remove_file(&socket_path);
        return EXIT_NO_SOURCE;
    }
    // Detecting the GPU counter period blocks for up to a second: keep it off the I/O thread.
    // Opening a node meter reads it once (a BMC: up to its timeout) and a Redfish client must
    // not live on the async runtime: both happen here, off the I/O thread; the meter is then
    // read on a thread of its own.
    let sampler = match tokio::task::spawn_blocking(move || {
        let mut s = Sampler::start(&config, sources)?;
        match crate::sources::meter::select(&config.meters) {
            Ok(m) => {
                let (kind, source) = (m.kind(), m.source());
                match crate::sampler::NodeMeterHandle::start(m, &config.meters) {
                    Ok(h) => {
                        tracing::info!(%kind, %source, "node meter: the node's energy at the wall is measured and attributed");
                        s.attach_meter(h);
                    }
                    Err(e) => {
                        tracing::warn!(%kind, error = %e, "cannot start the node meter's thread; no energy at the wall")
                    }
                }
            }
            Err(why) => tracing::info!(%why, "no node meter: jobs' energy at the wall is not measured"),
        }
        Ok::<_, crate::sampler::SamplerError>(s)
    })
    .await
    {
        Ok(Ok(s)) => Arc::new(s),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot start the sampler");
            let _ = std::fs::remove_file(&socket_path);
            return EXIT_START;
        }
        Err(e) => {
            tracing::error!(error = %e, "the sampler's start-up panicked");
            let _ = std::fs::remove_file(&socket_path);
            return EXIT_START;
        }
    };
    tracing::info!(gpus, rapl_zones = zones, options = ?sampler.options(), "sampling");
    let tracker = match JobTracker::start(
        Arc::clone(&sampler),
        node_facts(
            &sampler,
            sensors,
            &gpu_extra,
            socket_cpus,
            node_memory_mib(&proc_root),
        ),
        TrackerConfig {
            spool_dir,
            spool_layout,
            spool_modes,
            default_cluster: "unknown".to_owned(),
            access: Access {
                slurm_uid: Some(slurm_uid),
            },
            limits: Default::default(),
            attribution,
            state_dir: Some(state_dir),
            proc_root,
            power,
            reap_period,
            slurm,
            queue_dir,
            idle_gpu_util_percent,
            report_factors,
        },
    ) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the job tracker thread");
            let _ = std::fs::remove_file(&socket_path);
            return EXIT_START;
        }
    };
    tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
    tracing::info!(socket = %socket_path.display(), "serving the SPANK plugin's socket");
    let running = format!(
        "sampling {gpus} GPU(s), {zones} RAPL zone(s); metrics on http://{addr}/metrics; \
         plugin socket {}",
        socket_path.display()
    );
    crate::systemd::ready(&running);

    let socket_stats = Arc::new(crate::server::ServerStats::default());
    let source: SnapshotSource = {
        let sampler = Arc::clone(&sampler);
        let tracker = Arc::clone(&tracker);
        let socket_stats = Arc::clone(&socket_stats);
        Arc::new(move || {
            let mut s = sampler.snapshot();
            s.attribution = Some(tracker.attribution_snapshot());
            if metrics_config.per_job {
                s.jobs = Some(tracker.job_metrics(&metrics_config));
            }
            s.socket_server = Some(socket_stats.snapshot());
            s
        })
    };
    let socket_limits = ServerLimits {
        trusted_uid: Some(slurm_uid),
        ..ServerLimits::default()
    };
    let handler: Handler = {
        let tracker = Arc::clone(&tracker);
        Arc::new(move |request, uid| tracker.handle(request, uid))
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::join!(
        crate::systemd::watchdog(Arc::clone(&source), running, stopped(stop_rx.clone())),
        serve(
            listener,
            source,
            Limits::default(),
            stopped(stop_rx.clone())
        ),
        crate::server::serve(
            socket,
            handler,
            socket_limits,
            socket_stats,
            stopped(stop_rx)
        ),
        async {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "stopping");
            crate::systemd::stopping();
            let _ = stop_tx.send(true);
        },
    );
    let _ = std::fs::remove_file(&socket_path);
    // The socket server has dropped its handler: this is the last reference. Stopping the
    // tracker writes the manifests of jobs that have ended and releases its sampler reference.
    match Arc::try_unwrap(tracker) {
        Ok(t) => t.stop(),
        Err(t) => drop(t),
    }

    // The server has dropped its reference: this is the last one.
    match Arc::try_unwrap(sampler) {
        Ok(s) => drop(s.stop()),
        // Not expected; dropping the handle stops the threads all the same.
        Err(s) => drop(s),
    }
    tracing::info!("ergond stopped");
    EXIT_OK
}

/// This host's name up to the first dot (Slurm's default NodeName).
pub fn short_host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|n| n.into_string().ok())
        .and_then(|n| n.split('.').next().map(str::to_owned))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The sensors the manifests name, from the opened sources.
fn sensors_of(sources: &SamplerSources) -> Vec<SensorInfo> {
    let mut out = Vec::new();
    if let Some(g) = sources.gpu.as_ref().filter(|g| !g.is_empty()) {
        out.push(SensorInfo {
            kind: SensorKind::Nvml,
            version: g.driver_version().unwrap_or_else(|_| "unknown".into()),
            detail: format!(
                "NVML {}; {} GPU(s)",
                g.nvml_version().unwrap_or_else(|_| "unknown".into()),
                g.len()
            ),
        });
    }
    if let Some(r) = &sources.rapl {
        let zones: Vec<String> = r.zones().iter().map(|z| z.key.to_string()).collect();
        out.push(SensorInfo {
            kind: match r.backend() {
                RaplBackend::Perf(_) => SensorKind::RaplPerf,
                RaplBackend::Powercap(_) => SensorKind::RaplPowercap,
            },
            version: kernel_release(),
            detail: format!("zones {}", zones.join(", ")),
        });
    }
    if let Some(c) = &sources.cgroups {
        out.push(SensorInfo {
            kind: SensorKind::Cgroup,
            version: match c.version {
                CgroupVersion::V1 => "v1".into(),
                CgroupVersion::V2 => "v2".into(),
            },
            detail: format!("cgroup root {}", c.root.display()),
        });
    }
    out
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// What the job tracker needs of a GPU beyond the sampler's snapshot, by UUID.
struct GpuExtra {
    uuid: String,
    pci_bus_id: Option<String>,
    mig: Option<crate::sources::nvml::MigLayout>,
}

/// The node's memory (`MemTotal` of `<proc_root>/meminfo`), MiB; `None`, logged, when it cannot
/// be read (memory then has no part in the rest-of-node allocation rule).
fn node_memory_mib(proc_root: &std::path::Path) -> Option<u64> {
    let path = proc_root.join("meminfo");
    let mib = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| crate::jobs::facts::mem_total_mib(&t));
    if mib.is_none() {
        tracing::warn!(
            path = %path.display(),
            "cannot read the node's MemTotal: memory has no part in the rest-of-node allocation rule"
        );
    }
    mib
}

/// GPUs and zones in the sampler's snapshot order, for the job tracker.
fn node_facts(
    sampler: &SamplerHandle,
    sensors: Vec<SensorInfo>,
    extra: &[GpuExtra],
    sockets: Vec<(u32, ergon_protocol::CpuSet)>,
    memory_mib: Option<u64>,
) -> NodeFacts {
    let snap = sampler.snapshot();
    NodeFacts {
        gpus: snap
            .gpus
            .iter()
            .map(|g| {
                let extra = extra.iter().find(|e| e.uuid == g.uuid);
                GpuFact {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    minor: g.minor,
                    pci_bus_id: extra.and_then(|e| e.pci_bus_id.clone()),
                    mig: extra.and_then(|e| e.mig.clone()),
                    method: match g.method {
                        crate::counter::Method::Counter => EnergyMethod::Counter,
                        crate::counter::Method::IntegratedPower => EnergyMethod::IntegratedPower,
                    },
                }
            })
            .collect(),
        zones: snap.zones.iter().map(|z| z.key.clone()).collect(),
        sensors,
        sockets,
        memory_mib,
    }
}

/// The uid of user `name`, if it exists.
fn lookup_uid(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// The gid of group `name`, if it exists.
fn lookup_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Resolve `private_data` (running `scontrol show config` for `auto`) and `private_group`, and
/// restrict the spool directory when private; `None` (logged) when ergond cannot start so.
fn spool_modes(config: &Config, config_path: &str) -> Option<ergon_protocol::privacy::Modes> {
    use ergon_protocol::privacy::{resolve, Modes};
    let resolved = resolve(
        config.private_data,
        &config.scontrol,
        std::time::Duration::from_secs(10),
    );
    let gid = match &config.private_group {
        None => None,
        Some(g) => match lookup_gid(g) {
            Some(gid) => Some(gid),
            None => {
                tracing::error!(
                    "private_group {g:?} in {config_path} is not a group of this node; create it \
                     or remove the key"
                );
                return None;
            }
        },
    };
    let modes = Modes {
        private: resolved.private,
        gid,
    };
    if resolved.private {
        tracing::info!(
            why = %resolved.why,
            group = config.private_group.as_deref().unwrap_or("(none: root only)"),
            "job data is private: the spool and new manifests are readable by root and the group \
             only, users' report files are written 0600"
        );
        let spool = &config.spool_dir;
        let made = std::fs::create_dir_all(spool).and_then(|()| modes.apply(spool));
        if let Err(e) = made {
            tracing::error!(
                "cannot restrict the spool directory {}: {e}; ergond does not start with private \
                 data readable by everyone",
                spool.display()
            );
            return None;
        }
    } else {
        tracing::info!(why = %resolved.why, "job data is not private: manifests are world-readable");
    }
    Some(modes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_nonsense_does_not() {
        assert_eq!(lookup_uid("root"), Some(0));
        assert_eq!(lookup_gid("root"), Some(0));
        assert_eq!(lookup_uid("no-such-user-ergon"), None);
        assert_eq!(lookup_gid("no-such-group-ergon"), None);
    }
}
