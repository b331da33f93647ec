//! `/etc/ergon/accounting.toml`. Unknown keys are errors that name the key, so a typo never
//! silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default config path.
pub const DEFAULT_PATH: &str = "/etc/ergon/accounting.toml";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Spool directories ergond writes manifests into (local or shared).
    #[serde(default = "default_spools")]
    pub spool_dirs: Vec<PathBuf>,
    /// Where bad manifests are moved, each with a `<name>.reason`.
    #[serde(default = "default_quarantine")]
    pub quarantine_dir: PathBuf,
    /// The state directory (state file and lock).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// A job is collected only once its newest manifest is this old, so that all its nodes'
    /// manifests are in.
    #[serde(default = "default_settle")]
    pub settle_s: u64,
    /// State bounds.
    #[serde(default)]
    pub state: StateConfig,
    /// sacct records.
    #[serde(default)]
    pub sacct: SacctConfig,
    /// Retry policy shared by the upload sinks.
    #[serde(default)]
    pub retry: RetryConfig,
    /// InfluxDB line protocol to VictoriaMetrics (or InfluxDB 1.x `/write`).
    pub victoria_metrics: Option<VictoriaMetricsConfig>,
    /// Generic HTTPS JSON ingest.
    pub http: Option<HttpConfig>,
    /// The job-records database (`ergon report`, `ergon jobs`).
    #[serde(default)]
    pub records: RecordsConfig,
    /// Whether job data is private: `auto` (default) follows Slurm's `PrivateData` (`jobs`,
    /// `usage` or `accounts`: private; `scontrol` failing: private), `yes`, `no`. When private,
    /// `ergon run` keeps the state directory, quarantine and the SQLite records database
    /// readable by root and `private_group` only (docs/configuration.md).
    #[serde(default)]
    pub private_data: ergon_protocol::privacy::PrivateData,
    /// When private: the group that may read the state, quarantine and records database
    /// besides root; `None`: root only.
    #[serde(default)]
    pub private_group: Option<String>,
    /// The `scontrol` program `private_data = "auto"` runs.
    #[serde(default = "default_scontrol")]
    pub scontrol: PathBuf,
    /// Grid carbon intensity, PUE and embodied factors (docs/carbon.md); absent: no CO2e.
    pub carbon: Option<crate::carbon::CarbonConfig>,
    /// Price of energy (docs/carbon.md); absent: no cost.
    pub cost: Option<crate::carbon::CostConfig>,
}

fn default_scontrol() -> PathBuf {
    "scontrol".into()
}

/// Which database holds the job records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordsBackend {
    /// Embedded SQLite, one file on the accounting host.
    Sqlite,
    /// A MariaDB (or MySQL) server.
    Mariadb,
}

/// The job-records database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    /// Write the database at all. Off: `ergon report` reads the spool, `ergon jobs` has
    /// nothing to list.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `sqlite` (the default) or `mariadb`.
    #[serde(default = "default_backend")]
    pub backend: RecordsBackend,
    /// The SQLite file; default `<state_dir>/records.sqlite`.
    pub path: Option<PathBuf>,
    /// MariaDB: `mysql://USER@HOST:PORT/DATABASE`, without a password.
    pub url: Option<String>,
    /// MariaDB: the file holding the password (trailing whitespace ignored).
    pub password_file: Option<PathBuf>,
    /// Records per transaction.
    #[serde(default = "default_records_batch")]
    pub batch_size: usize,
}

fn default_records_batch() -> usize {
    1000
}

fn default_backend() -> RecordsBackend {
    RecordsBackend::Sqlite
}

impl Default for RecordsConfig {
    fn default() -> Self {
        RecordsConfig {
            enabled: true,
            backend: default_backend(),
            url: None,
            password_file: None,
            path: None,
            batch_size: default_records_batch(),
        }
    }
}

/// The database's file name in the state directory, by default.
pub const DEFAULT_RECORDS_FILE: &str = "records.sqlite";

/// Where the database is.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A MariaDB (or MySQL) database: `mysql://USER@HOST:PORT/DATABASE` (the password, if
    /// any, from `password_file`, never in the URL: the URL shows in messages).
    Mariadb {
        /// The URL, without a password.
        url: String,
        /// The password's file.
        password_file: Option<PathBuf>,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Mariadb { url, .. } => write!(f, "{url}"),
        }
    }
}

impl Config {
    /// Where the job-records database is.
    pub fn records_location(&self) -> Location {
        match self.records.backend {
            RecordsBackend::Sqlite => Location::Sqlite(
                self.records
                    .path
                    .clone()
                    .unwrap_or_else(|| self.state_dir.join(DEFAULT_RECORDS_FILE)),
            ),
            RecordsBackend::Mariadb => Location::Mariadb {
                url: self.records.url.clone().unwrap_or_default(),
                password_file: self.records.password_file.clone(),
            },
        }
    }
}

fn default_spools() -> Vec<PathBuf> {
    vec!["/var/spool/ergon".into()]
}
fn default_quarantine() -> PathBuf {
    "/var/lib/ergon/quarantine".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/ergon".into()
}
fn default_settle() -> u64 {
    60
}

/// Bounds of the state (write-ahead log).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Entries of jobs that ended longer ago than this are removed (pending ones are counted
    /// as dropped).
    #[serde(default = "default_max_age")]
    pub max_age_days: u64,
    /// At most this many entries are kept (oldest removed first, counted when pending).
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
}

fn default_max_age() -> u64 {
    30
}
fn default_max_jobs() -> usize {
    1_000_000
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            max_age_days: default_max_age(),
            max_jobs: default_max_jobs(),
        }
    }
}

/// Which sacct field holds the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SacctField {
    /// `AdminComment` (admin-only; the default).
    AdminComment,
    /// `Comment` (needs `AccountingStoreFlags=job_comment`; users can overwrite it).
    Comment,
    /// `SystemComment`.
    SystemComment,
}

impl SacctField {
    /// The name sacct and sacctmgr use.
    pub fn name(self) -> &'static str {
        match self {
            SacctField::AdminComment => "AdminComment",
            SacctField::Comment => "Comment",
            SacctField::SystemComment => "SystemComment",
        }
    }
}

/// What to do when the field holds foreign content that sacctmgr would damage (it lowercases
/// the whole value and cuts it at a `"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForeignUnsafe {
    /// Do not write; mark the job's sacct record as skipped (shown by `ergon status`).
    Skip,
    /// Write anyway: the foreign content is stored lowercased.
    Lowercase,
}

/// Whether `ergon run` also sets the job's own `ConsumedEnergy` (Slurm 25.11 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumedEnergy {
    /// Where sacctmgr can (25.11+), unless Slurm measured the job itself.
    Auto,
    /// Where sacctmgr can, replacing what Slurm measured itself.
    Overwrite,
    /// Never.
    Off,
}

/// sacct settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SacctConfig {
    /// Write sacct records at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The field.
    #[serde(default = "default_field")]
    pub field: SacctField,
    /// `sacctmgr` program.
    #[serde(default = "default_sacctmgr")]
    pub sacctmgr: PathBuf,
    /// `sacct` program.
    #[serde(default = "default_sacct")]
    pub sacct: PathBuf,
    /// sacctmgr processes run at once (each modify costs ~0.27 s, mostly waiting on slurmdbd;
    /// measured: 1 → 3.6, 4 → 13.4, 8 → 24, 16 → 36 jobs/s).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// Write + read-back rounds per run before a job is left pending.
    #[serde(default = "default_verify_attempts")]
    pub verify_attempts: u32,
    /// What to do with foreign content sacctmgr would alter.
    #[serde(default = "default_foreign")]
    pub foreign_unsafe: ForeignUnsafe,
    /// Longest a `sacct` or `sacctmgr` call may take, seconds; then it is stopped and the jobs
    /// stay pending.
    #[serde(default = "default_sacct_timeout")]
    pub timeout_s: u64,
    /// Also set the job's `ConsumedEnergy` (TRES energy) to ergon's total.
    #[serde(default = "default_consumed_energy")]
    pub consumed_energy: ConsumedEnergy,
}

fn default_consumed_energy() -> ConsumedEnergy {
    ConsumedEnergy::Auto
}

fn yes() -> bool {
    true
}
fn default_field() -> SacctField {
    SacctField::AdminComment
}
fn default_sacctmgr() -> PathBuf {
    "sacctmgr".into()
}
fn default_sacct() -> PathBuf {
    "sacct".into()
}
fn default_parallel() -> usize {
    8
}
fn default_verify_attempts() -> u32 {
    3
}
fn default_sacct_timeout() -> u64 {
    60
}
fn default_foreign() -> ForeignUnsafe {
    ForeignUnsafe::Skip
}

impl Default for SacctConfig {
    fn default() -> Self {
        SacctConfig {
            enabled: true,
            field: default_field(),
            sacctmgr: default_sacctmgr(),
            sacct: default_sacct(),
            parallel: default_parallel(),
            verify_attempts: default_verify_attempts(),
            foreign_unsafe: default_foreign(),
            timeout_s: default_sacct_timeout(),
            consumed_energy: default_consumed_energy(),
        }
    }
}

/// Retries of one batch within a run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per batch per run; after that the sink stops for this run and the rest stays
    /// pending.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First backoff, milliseconds; doubled each attempt, with jitter.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    /// Largest backoff, milliseconds.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// A `Retry-After` longer than this stops the sink for this run instead of waiting.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after_s: u64,
}

fn default_attempts() -> u32 {
    5
}
fn default_initial_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    30_000
}
fn default_max_retry_after() -> u64 {
    300
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_attempts(),
            initial_backoff_ms: default_initial_backoff(),
            max_backoff_ms: default_max_backoff(),
            max_retry_after_s: default_max_retry_after(),
        }
    }
}

/// `victoria_metrics.verify_every`'s default.
pub const DEFAULT_VERIFY_EVERY: usize = 10_000;

fn default_verify_every() -> usize {
    DEFAULT_VERIFY_EVERY
}

/// VictoriaMetrics sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VictoriaMetricsConfig {
    /// Base URL, e.g. `http://127.0.0.1:8428` (`/write` is appended).
    pub url: String,
    /// Records per request.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Request timeout, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Take a record as delivered only once VictoriaMetrics has written it to disk and it reads
    /// back (`/snapshot/create`, `/api/v1/export`). `false` for an endpoint that only speaks
    /// `/write` (InfluxDB 1.x): an accepted batch is then taken as delivered.
    #[serde(default = "yes")]
    pub verify: bool,
    /// With `verify`: records accepted during a run before they are verified, so that a large
    /// run delivers (and frees) them as it goes instead of holding all of them until its end.
    #[serde(default = "default_verify_every")]
    pub verify_every: usize,
    /// Also send one series set per job (labelled by `job_id`): their number grows with the
    /// jobs. Off: only the usage counters per cluster/partition/account/user.
    #[serde(default)]
    pub per_job_series: bool,
}

/// HTTPS JSON ingest sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The ingest URL records are POSTed to.
    pub url: String,
    /// A file holding the bearer token (trailing whitespace ignored).
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle to trust instead of the built-in roots.
    pub ca_bundle: Option<PathBuf>,
    /// Records per request.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Request timeout, seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Connect timeout, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_s: u64,
    /// Send the bearer token even though `url` is plain `http://` (unencrypted). Off: such a
    /// config is refused, so that a token never crosses the network in clear by mistake.
    #[serde(default)]
    pub allow_token_over_plain_http: bool,
}

fn default_batch() -> usize {
    1000
}
fn default_timeout() -> u64 {
    30
}
fn default_connect_timeout() -> u64 {
    10
}

/// Why the config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read config {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error's text (kept as text: printed once, not again as a source).
        reason: String,
        /// Whether the file does not exist.
        not_found: bool,
    },
    /// Bad TOML or an unknown/mistyped key (the message names it).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and line.
        message: String,
    },
    /// A value out of range.
    #[error("config {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Parse TOML text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_owned(),
            message: message.to_owned(),
        };
        if config.spool_dirs.is_empty() {
            return Err(invalid(
                "spool_dirs",
                "at least one spool directory is needed",
            ));
        }
        if let Some(g) = &config.private_group {
            if g.is_empty()
                || g.starts_with('-')
                || !g
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'))
            {
                return Err(invalid("private_group", "is not a group name"));
            }
        }
        if config.sacct.timeout_s == 0 {
            return Err(invalid("sacct.timeout_s", "must be at least 1"));
        }
        if config.sacct.parallel == 0 {
            return Err(invalid("sacct.parallel", "must be at least 1"));
        }
        if config.retry.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1"));
        }
        if config
            .victoria_metrics
            .as_ref()
            .is_some_and(|v| v.batch_size == 0)
        {
            return Err(invalid("victoria_metrics.batch_size", "must be at least 1"));
        }
        if config
            .victoria_metrics
            .as_ref()
            .is_some_and(|v| v.verify_every == 0)
        {
            return Err(invalid(
                "victoria_metrics.verify_every",
                "must be at least 1",
            ));
        }
        if config.records.batch_size == 0 {
            return Err(invalid("records.batch_size", "must be at least 1"));
        }
        let r = &config.records;
        match r.backend {
            RecordsBackend::Mariadb if r.url.is_none() => {
                return Err(invalid(
                    "records.url",
                    "backend = \"mariadb\" needs url = \"mysql://USER@HOST:PORT/DATABASE\"",
                ));
            }
            RecordsBackend::Mariadb if r.path.is_some() => {
                return Err(invalid("records.path", "is for backend = \"sqlite\""));
            }
            RecordsBackend::Sqlite if r.url.is_some() || r.password_file.is_some() => {
                return Err(invalid(
                    "records.url",
                    "url and password_file are for backend = \"mariadb\"",
                ));
            }
            _ => {}
        }
        if let Some(c) = &config.carbon {
            c.validate("carbon.", 0)
                .map_err(|(key, message)| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key,
                    message,
                })?;
        }
        if let Some(c) = &config.cost {
            c.validate("cost.", 0)
                .map_err(|(key, message)| ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key,
                    message,
                })?;
        }
        if config.http.as_ref().is_some_and(|v| v.batch_size == 0) {
            return Err(invalid("http.batch_size", "must be at least 1"));
        }
        Ok(config)
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
            not_found: e.kind() == std::io::ErrorKind::NotFound,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("spool_dir = [\"/x\"]\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spool_dir"), "{err}");
        let err = Config::parse("[sacct]\nfeild = \"Comment\"\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("feild"), "{err}");
        let err = Config::parse("[sacct]\nparallel = 0\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sacct.parallel"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../packaging/accounting.toml");
        let c = Config::parse(text, Path::new("accounting.toml")).unwrap();
        assert_eq!(c.state.max_age_days, 30);
        assert_eq!(c.sacct.consumed_energy, ConsumedEnergy::Auto);
    }

    #[test]
    fn carbon_and_cost_are_checked_and_name_the_key() {
        let c = Config::parse(
            "[carbon]\nintensity_g_per_kwh = 300\n[carbon.partitions.gpu]\npue = 1.1\n\
             [cost]\ncurrency = \"EUR\"\nprice_per_kwh = 0.2\n",
            Path::new("a.toml"),
        )
        .unwrap();
        let carbon = c.carbon.unwrap();
        assert_eq!(carbon.intensity_g_per_kwh, Some(300.0));
        assert_eq!(carbon.partitions["gpu"].pue, Some(1.1));
        assert!(Config::parse("", Path::new("a.toml"))
            .unwrap()
            .carbon
            .is_none());
        for (text, key) in [
            (
                "[carbon.partitions.gpu]\npue = 0.9\n",
                "carbon.partitions.gpu.pue",
            ),
            ("[carbon]\npue_url = \"ftp://x\"\n", "carbon.pue_url"),
            ("[cost]\ncurrency = \"E U R\"\n", "cost.currency"),
            (
                "[cost]\ntariff_utc_offset = \"1h\"\n",
                "cost.tariff_utc_offset",
            ),
        ] {
            let err = Config::parse(text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = Config::parse("[carbon]\nintensity = 3\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("intensity"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c.sacct.field, SacctField::AdminComment);
        assert_eq!(c.spool_dirs, [PathBuf::from("/var/spool/ergon")]);
        assert!(c.victoria_metrics.is_none());
    }
}
