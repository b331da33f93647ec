//! ergond configuration: `/etc/ergon/ergond.toml`.
//!
//! Every hardware root is a setting, which is how tests and demos run ergond against generated
//! sysfs trees and the fake NVML library. Unknown keys are rejected (a typo must not silently
//! fall back to a default), and [`Config::validate`] checks values at start with errors that
//! name the key.
//!
//! ```toml
//! nvml_library = "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"   # default: libnvidia-ml.so.1
//! powercap_root = "/sys/class/powercap"
//! perf_sysfs_root = "/sys/bus/event_source/devices"
//! cgroup_root = "/sys/fs/cgroup"
//! proc_root = "/proc"
//! sysfs_root = "/sys"
//! prefer_perf = true
//! socket_path = "/run/ergon/ergond.sock"
//! socket_mode = 0o660          # permissions of the socket file (TOML octal)
//! socket_group = "slurm"       # group of the socket file; default: ergond's own group
//! slurm_user = "root"          # SlurmUser: besides root, the only sender of job events
//! state_dir = "/var/lib/ergon"
//! spool_dir = "/var/spool/ergon"
//! private_data = "auto"        # "auto" (follow Slurm's PrivateData), "yes" or "no"
//! private_group = "ergonread"  # when private: the group that may read the spool besides root
//! scontrol = "scontrol"        # what `auto` runs (`scontrol show config`)
//! metrics_listen = "127.0.0.1:9713"
//! node_name = "gpu017"         # Slurm's name for this node; default: the short host name
//! gres_conf = "/etc/slurm/gres.conf"   # maps a found job's SLURM_JOB_GPUS to device minors
//! mig_minors = "/proc/driver/nvidia-caps/mig-minors"
//! queue_dir = "/run/ergon/queue"       # events the plugin could not deliver; default: beside socket_path
//!
//! [metrics]
//! per_job = true                # per-job series for the open jobs (docs/metrics.md)
//! per_job_max_jobs = 16         # at most this many jobs exported, the longest-running first
//! per_job_labels = []           # add "user" and/or "account" to the per-job series
//!
//! [sampling]
//! gpu_min_period_ms = 10        # profiling mode: 10 ms = 100 Hz
//! gpu_max_period_ms = 200
//! gpu_default_period_ms = 100   # used when the counter period cannot be detected
//! rapl_period_ms = 100          # profiling mode: 1 ms = 1 kHz
//! cgroup_period_ms = 100
//! gpu_max_power_w = 1500        # plausibility limit per GPU
//! cpu_max_power_w = 1000        # plausibility limit per RAPL zone
//! ```

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Default configuration file.
pub const DEFAULT_PATH: &str = "/etc/ergon/ergond.toml";

/// Error loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys / wrong types (the message names the key
    /// and line).
    #[error("invalid configuration file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid value for `{key}` in the ergond configuration: {reason}")]
    Invalid {
        /// Dotted key, e.g. `sampling.rapl_period_ms`.
        key: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

/// Sampling rates and plausibility limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Shortest GPU sampling period (ms); the detected counter period / 2 is clamped to this.
    pub gpu_min_period_ms: u64,
    /// Longest GPU sampling period (ms).
    pub gpu_max_period_ms: u64,
    /// GPU period when the counter period cannot be detected (ms).
    pub gpu_default_period_ms: u64,
    /// RAPL sampling period (ms).
    pub rapl_period_ms: u64,
    /// cgroup CPU-time sampling period (ms).
    pub cgroup_period_ms: u64,
    /// Highest plausible GPU power (W): larger counter jumps are dropped and flagged.
    pub gpu_max_power_w: f64,
    /// Highest plausible power of one RAPL zone (W).
    pub cpu_max_power_w: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            gpu_min_period_ms: 10,
            gpu_max_period_ms: 200,
            gpu_default_period_ms: 100,
            rapl_period_ms: 100,
            cgroup_period_ms: 100,
            gpu_max_power_w: 1500.0,
            cpu_max_power_w: 1000.0,
        }
    }
}

/// `[metrics]`: what `/metrics` exports besides the node's own series.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Export per-job series (`ergon_job_*`, labelled `job_id`) for the open jobs.
    pub per_job: bool,
    /// At most this many open jobs get per-job series (the longest-running first); the rest
    /// are counted in `ergon_job_metrics_left_out_jobs`. 1..=[`MAX_PER_JOB_MAX_JOBS`].
    pub per_job_max_jobs: usize,
    /// Extra labels on the per-job series: any of `"user"`, `"account"` (none by default).
    pub per_job_labels: Vec<JobLabel>,
}

/// Largest `metrics.per_job_max_jobs` accepted.
pub const MAX_PER_JOB_MAX_JOBS: usize = 1024;

/// An optional label of the per-job series.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobLabel {
    /// The job owner's user name.
    User,
    /// The job's Slurm account.
    Account,
}

impl MetricsConfig {
    /// The settings in effect when job data is `private` or not: who runs what is private where
    /// the job data is, so then no `user` or `account` label (the job ids stay). Returns the
    /// labels dropped, for the log.
    pub fn in_effect(&self, private: bool) -> (Self, Vec<JobLabel>) {
        if private {
            let m = Self {
                per_job_labels: Vec::new(),
                ..self.clone()
            };
            (m, self.per_job_labels.clone())
        } else {
            (self.clone(), Vec::new())
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            per_job: true,
            per_job_max_jobs: 16,
            per_job_labels: Vec::new(),
        }
    }
}

/// `[report]`: what the user's report (and the manifest) say about the job's GPUs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// A GPU allocated to a job whose average SM utilisation over the job is below this (%)
    /// sat idle: the report names it, and its energy counts as idle-GPU energy. 0..=100,
    /// default 5 (0: never idle).
    pub idle_gpu_util_percent: f64,
    /// Grid carbon intensity (gCO2e/kWh) for the report's CO2e estimate; unset: none.
    pub co2e_g_per_kwh: Option<f64>,
    /// Facility PUE applied to the estimate (at least 1; unset: 1).
    pub pue: Option<f64>,
    /// Energy price per kWh for the report's cost estimate; unset: none.
    pub price_per_kwh: Option<f64>,
    /// The price's currency code, e.g. `"EUR"`.
    pub currency: Option<String>,
    /// Where the factors come from, in words (shown with the estimate).
    pub factors_source: Option<String>,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            idle_gpu_util_percent: crate::gpustats::DEFAULT_IDLE_GPU_UTIL_PERCENT,
            co2e_g_per_kwh: None,
            pue: None,
            price_per_kwh: None,
            currency: None,
            factors_source: None,
        }
    }
}

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// NVML library to load; `None` = the driver's `libnvidia-ml.so.1` from the loader path.
    pub nvml_library: Option<PathBuf>,
    /// powercap class directory.
    pub powercap_root: PathBuf,
    /// perf event-source devices directory (holding `power/`).
    pub perf_sysfs_root: PathBuf,
    /// cgroup filesystem root.
    pub cgroup_root: PathBuf,
    /// procfs root.
    pub proc_root: PathBuf,
    /// sysfs root (CPU topology).
    pub sysfs_root: PathBuf,
    /// Use the perf power PMU for RAPL when possible (else powercap only).
    pub prefer_perf: bool,
    /// Unix socket the SPANK plugin talks to.
    pub socket_path: PathBuf,
    /// Permission bits of the socket file (at most `0o777`). Connecting needs write
    /// permission, so `0o660` limits clients to the owner (root) and `socket_group`; what each
    /// client may ask is decided per request from its `SO_PEERCRED` identity in any case.
    pub socket_mode: u32,
    /// Group given to the socket file; `None` keeps ergond's own group.
    pub socket_group: Option<String>,
    /// Slurm's `SlurmUser` (slurm.conf): besides root, the only user whose job and step events
    /// ergond accepts, and who may query any job.
    pub slurm_user: String,
    /// Journal / state directory.
    pub state_dir: PathBuf,
    /// Spool directory for per-job manifests.
    pub spool_dir: PathBuf,
    /// How manifests are laid out in `spool_dir`: `flat` (`<cluster>-<job>-<node>.json`) or
    /// `sharded` (`<YYYY-MM-DD>/<node>/<cluster>-<job>-<node>.json.gz`, by the job's end day in
    /// UTC, gzip-compressed). `ergon` reads both.
    pub spool_layout: crate::jobs::spool::Layout,
    /// Whether manifests are private (readable by root and `private_group` only) and the user's
    /// report file is written 0600: `auto` follows Slurm's `PrivateData` (`jobs`, `usage` or
    /// `accounts`: private; `scontrol` failing: private), `yes`, `no` (docs/configuration.md).
    pub private_data: ergon_protocol::privacy::PrivateData,
    /// When private: the group that may read the spool besides root (the accounting host's
    /// `ergon run` user, operators); `None`: root only.
    pub private_group: Option<String>,
    /// The `scontrol` program `private_data = "auto"` runs.
    pub scontrol: PathBuf,
    /// Prometheus `/metrics` listen address (loopback by default).
    pub metrics_listen: String,
    /// Per-job series on `/metrics` (docs/metrics.md).
    pub metrics: MetricsConfig,
    /// Sampling rates.
    pub sampling: SamplingConfig,
    /// The user's report: the idle-GPU rule.
    pub report: ReportConfig,
    /// Every this many seconds, open jobs older than that whose cgroups are all gone are
    /// finished (their end event was lost). Default 60.
    pub lost_job_check_s: u64,
    /// Attribution choices: `[attribution] cpu_idle = "by_allocated_cpus" | "node_idle"`, and
    /// how the rest of the node is split (`rest_of_node`, `rest_cpu_weight`,
    /// `rest_gpu_weight`, `rest_mem_weight`) (docs/attribution.md).
    pub attribution: crate::attribution::AttributionConfig,
    /// Slurm's name for this node (`NodeName`), for jobs found running at start-up before any
    /// event names it; `None`: the short host name (Slurm's default).
    pub node_name: Option<String>,
    /// The node's gres.conf: maps the `SLURM_JOB_GPUS` indices of a job found running at
    /// start-up to device minors, as the plugin does at a job's start.
    pub gres_conf: PathBuf,
    /// The NVIDIA driver's list of MIG capability minors (for MIG instances in gres.conf).
    pub mig_minors: PathBuf,
    /// Where the plugin leaves the events it could not deliver (ergond down, hung or full);
    /// ergond replays them at start and every second. `None`: `queue/` beside `socket_path`,
    /// which is the plugin's default too.
    pub queue_dir: Option<PathBuf>,
    /// Whole-node power meters (`[meters]`): listed by `ergond check`; the one in use (`use`)
    /// gives the jobs' energy at the wall.
    pub meters: crate::sources::meter::MetersConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nvml_library: None,
            powercap_root: PathBuf::from("/sys/class/powercap"),
            perf_sysfs_root: PathBuf::from("/sys/bus/event_source/devices"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            proc_root: PathBuf::from("/proc"),
            sysfs_root: PathBuf::from("/sys"),
            prefer_perf: true,
            socket_path: PathBuf::from("/run/ergon/ergond.sock"),
            socket_mode: 0o660,
            socket_group: None,
            slurm_user: "root".to_string(),
            state_dir: PathBuf::from("/var/lib/ergon"),
            spool_dir: PathBuf::from("/var/spool/ergon"),
            spool_layout: crate::jobs::spool::Layout::Flat,
            private_data: Default::default(),
            private_group: None,
            scontrol: PathBuf::from("scontrol"),
            metrics_listen: "127.0.0.1:9713".to_string(),
            metrics: MetricsConfig::default(),
            sampling: SamplingConfig::default(),
            report: ReportConfig::default(),
            attribution: Default::default(),
            lost_job_check_s: 60,
            node_name: None,
            gres_conf: PathBuf::from("/etc/slurm/gres.conf"),
            mig_minors: PathBuf::from(ergon_gres::DEFAULT_MIG_MINORS),
            queue_dir: None,
            meters: Default::default(),
        }
    }
}

impl Config {
    /// Read, parse and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parse and validate TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// RAPL options derived from this configuration.
    pub fn rapl_options(&self) -> crate::sources::rapl::RaplOptions {
        crate::sources::rapl::RaplOptions {
            powercap_root: self.powercap_root.clone(),
            perf_sysfs_root: self.perf_sysfs_root.clone(),
            sysfs_root: self.sysfs_root.clone(),
            prefer_perf: self.prefer_perf,
        }
    }

    /// The plugin's queue directory: `queue_dir`, else `queue/` beside the socket.
    pub fn queue_dir(&self) -> PathBuf {
        self.queue_dir.clone().unwrap_or_else(|| {
            self.socket_path
                .parent()
                .unwrap_or(Path::new("/"))
                .join("queue")
        })
    }

    /// Check every value; the error names the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let absolute: [(&'static str, &Path); 10] = [
            ("powercap_root", &self.powercap_root),
            ("perf_sysfs_root", &self.perf_sysfs_root),
            ("cgroup_root", &self.cgroup_root),
            ("proc_root", &self.proc_root),
            ("sysfs_root", &self.sysfs_root),
            ("socket_path", &self.socket_path),
            ("state_dir", &self.state_dir),
            ("spool_dir", &self.spool_dir),
            ("gres_conf", &self.gres_conf),
            ("mig_minors", &self.mig_minors),
        ];
        let idle = self.report.idle_gpu_util_percent;
        if !(0.0..=100.0).contains(&idle) {
            return Err(ConfigError::Invalid {
                key: "report.idle_gpu_util_percent",
                reason: format!("{idle} is not a percentage (0 to 100)"),
            });
        }
        for (key, value, min) in [
            ("report.co2e_g_per_kwh", self.report.co2e_g_per_kwh, 0.0),
            ("report.pue", self.report.pue, 1.0),
            ("report.price_per_kwh", self.report.price_per_kwh, 0.0),
        ] {
            if let Some(v) = value {
                if !v.is_finite() || v < min {
                    return Err(ConfigError::Invalid {
                        key,
                        reason: format!("{v} is not a number of at least {min}"),
                    });
                }
            }
        }
        if let Some(c) = &self.report.currency {
            if c.is_empty() || c.len() > 8 || !c.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(ConfigError::Invalid {
                    key: "report.currency",
                    reason: format!("{c:?} is not a currency code such as EUR"),
                });
            }
        }
        if let Some(q) = &self.queue_dir {
            if !q.is_absolute() {
                return Err(ConfigError::Invalid {
                    key: "queue_dir",
                    reason: format!("{} is not an absolute path", q.display()),
                });
            }
        }
        for (key, p) in absolute {
            if !p.is_absolute() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{} is not an absolute path", p.display()),
                });
            }
        }
        if let Some(lib) = &self.nvml_library {
            if lib.as_os_str().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "nvml_library",
                    reason: "empty path; remove the key to use the driver's libnvidia-ml.so.1"
                        .into(),
                });
            }
        }
        if self.lost_job_check_s == 0 || self.lost_job_check_s > 86_400 {
            return Err(ConfigError::Invalid {
                key: "lost_job_check_s",
                reason: format!(
                    "{} is out of range; give 1 to 86400 seconds (default 60)",
                    self.lost_job_check_s
                ),
            });
        }
        if self.socket_mode > 0o777 {
            return Err(ConfigError::Invalid {
                key: "socket_mode",
                reason: format!(
                    "{:#o} is not a permission mode; give at most 0o777, e.g. 0o660",
                    self.socket_mode
                ),
            });
        }
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 256
                && !n.starts_with('-')
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'))
        };
        if let Some(g) = &self.socket_group {
            if !valid_name(g) {
                return Err(ConfigError::Invalid {
                    key: "socket_group",
                    reason: format!(
                        "{g:?} is not a group name; remove the key to keep ergond's group"
                    ),
                });
            }
        }
        if let Some(g) = &self.private_group {
            if !valid_name(g) {
                return Err(ConfigError::Invalid {
                    key: "private_group",
                    reason: format!(
                        "{g:?} is not a group name; remove the key to keep private data root's only"
                    ),
                });
            }
        }
        if self.scontrol.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "scontrol",
                reason: "empty; give the scontrol program (default \"scontrol\")".into(),
            });
        }
        if let Some(n) = &self.node_name {
            if !valid_name(n) {
                return Err(ConfigError::Invalid {
                    key: "node_name",
                    reason: format!(
                        "{n:?} is not a node name; give NodeName from slurm.conf, or remove the \
                         key to use the short host name"
                    ),
                });
            }
        }
        if !valid_name(&self.slurm_user) {
            return Err(ConfigError::Invalid {
                key: "slurm_user",
                reason: format!(
                    "{:?} is not a user name; give SlurmUser from slurm.conf (default \"root\")",
                    self.slurm_user
                ),
            });
        }
        self.metrics_listen
            .parse::<SocketAddr>()
            .map_err(|e| ConfigError::Invalid {
                key: "metrics_listen",
                reason: format!("{:?} is not an address:port ({e})", self.metrics_listen),
            })?;
        let m = &self.metrics;
        if !(1..=MAX_PER_JOB_MAX_JOBS).contains(&m.per_job_max_jobs) {
            return Err(ConfigError::Invalid {
                key: "metrics.per_job_max_jobs",
                reason: format!(
                    "{} is outside 1..={MAX_PER_JOB_MAX_JOBS}; set `per_job = false` to export \
                     no per-job series",
                    m.per_job_max_jobs
                ),
            });
        }
        let s = &self.sampling;
        let range = |key: &'static str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key,
                    reason: format!("{v} ms is outside {lo}..={hi} ms"),
                })
            }
        };
        // GPU counters update every ~10-100 ms: faster than 100 Hz only re-reads the same value.
        range(
            "sampling.gpu_min_period_ms",
            s.gpu_min_period_ms,
            10,
            60_000,
        )?;
        range(
            "sampling.gpu_max_period_ms",
            s.gpu_max_period_ms,
            10,
            60_000,
        )?;
        range(
            "sampling.gpu_default_period_ms",
            s.gpu_default_period_ms,
            10,
            60_000,
        )?;
        // RAPL updates about every millisecond: 1 kHz is the useful limit.
        range("sampling.rapl_period_ms", s.rapl_period_ms, 1, 60_000)?;
        range("sampling.cgroup_period_ms", s.cgroup_period_ms, 1, 60_000)?;
        if s.gpu_min_period_ms > s.gpu_max_period_ms {
            return Err(ConfigError::Invalid {
                key: "sampling.gpu_min_period_ms",
                reason: format!(
                    "{} ms is larger than sampling.gpu_max_period_ms ({} ms)",
                    s.gpu_min_period_ms, s.gpu_max_period_ms
                ),
            });
        }
        for (key, w) in [
            ("sampling.gpu_max_power_w", s.gpu_max_power_w),
            ("sampling.cpu_max_power_w", s.cpu_max_power_w),
        ] {
            if !(w.is_finite() && w > 0.0 && w <= 100_000.0) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{w} W is not a power limit in (0, 100000] W"),
                });
            }
        }
        self.meters
            .validate()
            .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;
        let a = &self.attribution;
        for (key, w) in [
            ("attribution.rest_cpu_weight", a.rest_cpu_weight),
            ("attribution.rest_gpu_weight", a.rest_gpu_weight),
            ("attribution.rest_mem_weight", a.rest_mem_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{w} is not a weight (a number ≥ 0)"),
                });
            }
        }
        if a.rest_cpu_weight + a.rest_gpu_weight + a.rest_mem_weight <= 0.0 {
            return Err(ConfigError::Invalid {
                key: "attribution.rest_cpu_weight",
                reason: "rest_cpu_weight, rest_gpu_weight and rest_mem_weight cannot all be 0"
                    .into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn rest_of_node_weights_are_checked() {
        let c = Config::parse("[attribution]\nrest_mem_weight = 0.5\n").unwrap();
        assert_eq!(c.attribution.rest_mem_weight, 0.5);
        assert_eq!(Config::default().attribution.rest_mem_weight, 0.0);
        // Memory alone is a rule; nothing at all is not.
        Config::parse(
            "[attribution]\nrest_cpu_weight = 0\nrest_gpu_weight = 0\nrest_mem_weight = 1\n",
        )
        .unwrap();
        let e = Config::parse("[attribution]\nrest_cpu_weight = 0\nrest_gpu_weight = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot all be 0"), "{e}");
        let e = Config::parse("[attribution]\nrest_mem_weight = -1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("attribution.rest_mem_weight"), "{e}");
    }

    #[test]
    fn all_hardware_roots_are_settable() {
        let c = Config::parse(
            r#"
            nvml_library = "/tmp/fake/libnvidia-ml.so.1"
            powercap_root = "/tmp/t/powercap"
            perf_sysfs_root = "/tmp/t/perf"
            cgroup_root = "/tmp/t/cgroup"
            proc_root = "/tmp/t/proc"
            sysfs_root = "/tmp/t/sys"
            [sampling]
            rapl_period_ms = 1
            gpu_min_period_ms = 10
            "#,
        )
        .unwrap();
        assert_eq!(
            c.nvml_library.as_deref(),
            Some(Path::new("/tmp/fake/libnvidia-ml.so.1"))
        );
        assert_eq!(c.rapl_options().powercap_root, Path::new("/tmp/t/powercap"));
        assert_eq!(c.sampling.rapl_period_ms, 1);
        assert_eq!(c.sampling.cgroup_period_ms, 100);
    }

    #[test]
    fn private_data_defaults_to_auto_and_names_its_values() {
        use ergon_protocol::privacy::PrivateData;
        let d = Config::parse("").unwrap();
        assert_eq!((d.private_data, d.private_group), (PrivateData::Auto, None));
        let c = Config::parse("private_data = \"yes\"\nprivate_group = \"ergonread\"").unwrap();
        assert_eq!(c.private_data, PrivateData::Yes);
        assert_eq!(c.private_group.as_deref(), Some("ergonread"));
        assert_eq!(
            Config::parse("private_data = \"no\"").unwrap().private_data,
            PrivateData::No
        );
        let e = Config::parse("private_data = \"maybe\"").unwrap_err();
        assert!(
            matches!(&e, ConfigError::Parse { message, .. } if message.contains("private_data")),
            "{e}"
        );
    }

    #[test]
    fn socket_settings_parse_octal_and_default() {
        let d = Config::default();
        assert_eq!(
            (d.socket_mode, d.socket_group, d.slurm_user.as_str()),
            (0o660, None, "root")
        );
        let c =
            Config::parse("socket_mode = 0o666\nsocket_group = \"slurm\"\nslurm_user = \"slurm\"")
                .unwrap();
        assert_eq!(c.socket_mode, 0o666);
        assert_eq!(c.socket_group.as_deref(), Some("slurm"));
        assert_eq!(c.slurm_user, "slurm");
    }

    #[test]
    fn per_job_metrics_default_on_bounded_without_user_labels() {
        let d = Config::default().metrics;
        assert!(d.per_job);
        assert_eq!(d.per_job_max_jobs, 16);
        assert!(d.per_job_labels.is_empty());
        let c = Config::parse(
            "[metrics]\nper_job = false\nper_job_max_jobs = 4\nper_job_labels = [\"user\", \"account\"]",
        )
        .unwrap()
        .metrics;
        assert!(!c.per_job);
        assert_eq!(c.per_job_max_jobs, 4);
        assert_eq!(c.per_job_labels, vec![JobLabel::User, JobLabel::Account]);
        // Private job data: job ids only.
        let (private, dropped) = c.in_effect(true);
        assert_eq!(
            (private.per_job, private.per_job_max_jobs),
            (c.per_job, c.per_job_max_jobs)
        );
        assert!(private.per_job_labels.is_empty());
        assert_eq!(dropped, vec![JobLabel::User, JobLabel::Account]);
        let (open, dropped) = c.in_effect(false);
        assert_eq!(open, c);
        assert!(dropped.is_empty());
        let e = Config::parse("[metrics]\nper_job_labels = [\"partition\"]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("partition"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let e = Config::parse("powercap_rot = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("powercap_rot"), "{e}");
        let e = Config::parse("[sampling]\nrapl_hz = 10")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rapl_hz"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("cgroup_root = \"sys/fs/cgroup\"", "cgroup_root"),
            ("metrics_listen = \"localhost\"", "metrics_listen"),
            ("[sampling]\nrapl_period_ms = 0", "sampling.rapl_period_ms"),
            (
                "[sampling]\ngpu_min_period_ms = 1",
                "sampling.gpu_min_period_ms",
            ),
            (
                "[sampling]\ngpu_min_period_ms = 300\ngpu_max_period_ms = 200",
                "sampling.gpu_min_period_ms",
            ),
            (
                "[sampling]\ngpu_max_power_w = -5.0",
                "sampling.gpu_max_power_w",
            ),
            ("nvml_library = \"\"", "nvml_library"),
            ("[report]\npue = 0.9", "report.pue"),
            ("[report]\nco2e_g_per_kwh = -1.0", "report.co2e_g_per_kwh"),
            ("[report]\nprice_per_kwh = nan", "report.price_per_kwh"),
            ("[report]\ncurrency = \"€\"", "report.currency"),
            ("socket_mode = 0o1777", "socket_mode"),
            ("socket_group = \"\"", "socket_group"),
            ("slurm_user = \"a/b\"", "slurm_user"),
            ("private_group = \"a b\"", "private_group"),
            ("scontrol = \"\"", "scontrol"),
            (
                "[metrics]\nper_job_max_jobs = 0",
                "metrics.per_job_max_jobs",
            ),
            (
                "[metrics]\nper_job_max_jobs = 1025",
                "metrics.per_job_max_jobs",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err();
            assert!(
                matches!(e, ConfigError::Invalid { key: k, .. } if k == key),
                "{text}: {e}"
            );
            assert!(e.to_string().contains(key));
        }
        let e = Config::parse("[sampling]\nrapl_period_ms = \"fast\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rapl_period_ms"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ergond.toml");
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("ergond.toml"), "{e}");
        std::fs::write(&p, "prefer_perf = 3").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("ergond.toml") && e.contains("prefer_perf"),
            "{e}"
        );
    }
}
