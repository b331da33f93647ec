//! The plugin's arguments from its `plugstack.conf` line.
//!
//! ```text
//! optional /usr/lib/slurm/spank_ergon.so socket=/run/ergon/ergond.sock timeout_ms=100 notify=yes queue_dir=/run/ergon/queue
//! ```
//!
//! A bad argument never stops a job: it is reported by name in the slurmd log and the default is
//! kept.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::gpus::DEFAULT_MIG_MINORS;

/// Where ergond listens unless `socket=` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ergon/ergond.sock";
/// Bound on the time one event may add to a job: connect, send and reply together.
pub const DEFAULT_TIMEOUT_MS: u64 = 100;
/// Largest accepted `timeout_ms`: beyond this a hung daemon would visibly delay jobs.
pub const MAX_TIMEOUT_MS: u64 = 10_000;
/// How long an interactive `srun`/`salloc --energy-report` waits for the report at its end.
pub const DEFAULT_REPORT_WAIT_S: u64 = 10;
/// Largest accepted `report_wait_s`.
pub const MAX_REPORT_WAIT_S: u64 = 120;

/// The plugin's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// ergond's Unix socket.
    pub socket: PathBuf,
    /// Deadline for each event (connect + write + reply).
    pub timeout: Duration,
    /// `notify=no` turns lifecycle events off on this node (the option stays available).
    pub notify: bool,
    /// gres.conf to map GPU indices to device minors; default: beside `$SLURM_CONF`, else
    /// `/etc/slurm/gres.conf`.
    pub gres_conf: Option<PathBuf>,
    /// The NVIDIA driver's list of MIG capability minors, read only when a job has a
    /// `MultipleFiles=` GPU (a MIG instance).
    pub mig_minors: PathBuf,
    /// Where an event ergond could not take is left for it to replay; `None`: `queue/` beside
    /// the socket (ergond's default too). `queue_dir=none` turns queueing off.
    pub queue_dir: Option<PathBuf>,
    /// Whether undelivered events are queued at all.
    pub queue: bool,
    /// How long `srun`/`salloc --energy-report` (with their own allocation) wait at their end
    /// for the job's report to show it on the terminal; 0: only say where it will be.
    pub report_wait: Duration,
}

impl Config {
    /// The queue directory in use, if queueing is on.
    pub fn queue_dir(&self) -> Option<PathBuf> {
        if !self.queue {
            return None;
        }
        Some(self.queue_dir.clone().unwrap_or_else(|| {
            self.socket
                .parent()
                .unwrap_or(std::path::Path::new("/"))
                .join("queue")
        }))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from(DEFAULT_SOCKET),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            notify: true,
            gres_conf: None,
            mig_minors: PathBuf::from(DEFAULT_MIG_MINORS),
            queue_dir: None,
            queue: true,
            report_wait: Duration::from_secs(DEFAULT_REPORT_WAIT_S),
        }
    }
}

/// Parses the plugstack.conf arguments; returns the settings and one message per argument that
/// was ignored (unknown key or bad value), for the log.
pub fn parse_args<'a>(args: impl IntoIterator<Item = &'a str>) -> (Config, Vec<String>) {
    let mut config = Config::default();
    let mut problems = Vec::new();
    for arg in args {
        let (key, value) = arg.split_once('=').unwrap_or((arg, ""));
        match key {
            "socket" if value.starts_with('/') => config.socket = PathBuf::from(value),
            "socket" => problems.push(format!(
                "plugstack.conf argument socket={value:?} is not an absolute path; using {}",
                config.socket.display()
            )),
            "timeout_ms" => match value.parse::<u64>() {
                Ok(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => {
                    config.timeout = Duration::from_millis(ms)
                }
                _ => problems.push(format!(
                    "plugstack.conf argument timeout_ms={value:?} is not a number of milliseconds \
                     in 1..={MAX_TIMEOUT_MS}; using {DEFAULT_TIMEOUT_MS}"
                )),
            },
            "notify" => match parse_bool(value) {
                Some(b) => config.notify = b,
                None => problems.push(format!(
                    "plugstack.conf argument notify={value:?} is not yes/no; notifications stay on"
                )),
            },
            "gres_conf" if value.starts_with('/') => config.gres_conf = Some(PathBuf::from(value)),
            "gres_conf" => problems.push(format!(
                "plugstack.conf argument gres_conf={value:?} is not an absolute path; ignored"
            )),
            "mig_minors" if value.starts_with('/') => config.mig_minors = PathBuf::from(value),
            "mig_minors" => problems.push(format!(
                "plugstack.conf argument mig_minors={value:?} is not an absolute path; using {}",
                config.mig_minors.display()
            )),
            "queue_dir" if value == "none" => config.queue = false,
            "queue_dir" if value.starts_with('/') => config.queue_dir = Some(PathBuf::from(value)),
            "queue_dir" => problems.push(format!(
                "plugstack.conf argument queue_dir={value:?} is neither an absolute path nor \
                 \"none\"; using queue/ beside the socket"
            )),
            "report_wait_s" => match value.parse::<u64>() {
                Ok(s) if s <= MAX_REPORT_WAIT_S => config.report_wait = Duration::from_secs(s),
                _ => problems.push(format!(
                    "plugstack.conf argument report_wait_s={value:?} is not a number of seconds \
                     in 0..={MAX_REPORT_WAIT_S}; using {DEFAULT_REPORT_WAIT_S}"
                )),
            },
            _ => problems.push(format!(
                "unknown plugstack.conf argument {arg:?} ignored \
                 (known: socket=PATH, timeout_ms=N, notify=yes|no, gres_conf=PATH, \
                 mig_minors=PATH, queue_dir=PATH|none, report_wait_s=N)"
            )),
        }
    }
    (config, problems)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "yes" | "on" | "true" | "1" => Some(true),
        "no" | "off" | "false" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_arguments() {
        let (c, p) = parse_args([]);
        assert_eq!(c, Config::default());
        assert!(p.is_empty());
        assert_eq!(c.timeout, Duration::from_millis(100));
    }

    #[test]
    fn known_arguments_are_applied() {
        let (c, p) = parse_args([
            "socket=/tmp/x.sock",
            "timeout_ms=250",
            "notify=no",
            "gres_conf=/etc/slurm/gres.conf",
            "mig_minors=/run/test/mig-minors",
            "report_wait_s=0",
        ]);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(c.report_wait, Duration::ZERO);
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert!(!c.notify);
        assert_eq!(c.gres_conf, Some(PathBuf::from("/etc/slurm/gres.conf")));
        assert_eq!(c.mig_minors, PathBuf::from("/run/test/mig-minors"));
        assert_eq!(
            c.queue_dir(),
            Some(PathBuf::from("/tmp/queue")),
            "beside the socket"
        );
        let (c, _) = parse_args(["queue_dir=/var/q"]);
        assert_eq!(c.queue_dir(), Some(PathBuf::from("/var/q")));
        let (c, _) = parse_args(["queue_dir=none"]);
        assert_eq!(c.queue_dir(), None);
    }

    #[test]
    fn unknown_and_bad_arguments_are_named_and_defaults_kept() {
        let (c, p) = parse_args([
            "bogus=1",
            "timeout_ms=0",
            "timeout_ms=abc",
            "socket=rel",
            "notify=maybe",
            "mig_minors=mig-minors",
            "report_wait_s=121",
        ]);
        assert_eq!(c, Config::default());
        assert_eq!(c.mig_minors, PathBuf::from(DEFAULT_MIG_MINORS));
        assert_eq!(p.len(), 7);
        assert!(p[6].contains("report_wait_s=\"121\""), "{}", p[6]);
        assert!(p[0].contains("\"bogus=1\""), "{}", p[0]);
        assert!(p[1].contains("timeout_ms=\"0\""));
        assert!(p[3].contains("socket=\"rel\""));
        assert!(p[4].contains("notify=\"maybe\""));
        assert!(p[5].contains("mig_minors=\"mig-minors\""), "{}", p[5]);
        assert!(p[0].contains("mig_minors=PATH"), "{}", p[0]);
    }
}
