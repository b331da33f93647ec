//! What the job tracker's threads share: [`Inner`] (the registry, the attributor, the channels
//! to the writers, the node's facts, the sampler and the configuration), the tracker's
//! configuration and limits, and how an event's stamp becomes an instant.

use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ergon_protocol::Timestamp;

use super::attributor::Attributor;
use super::discovery::SlurmNode;
use super::facts::NodeFacts;
use super::recovery::PowerLimits;
use super::registry::{EventTime, JobRegistry, Limits};
use super::report;
use crate::clock::monotonic_ns;
use crate::sampler::SamplerHandle;

/// Actions queued for the worker at most; beyond, requests get [`ErrorCode::Busy`].
pub const QUEUE_CAPACITY: usize = 65_536;
/// How long the worker waits for the tick after an event before using what it has: long
/// enough for a sensor read that blocks for seconds (a hung driver call), after which the
/// event's counters are interpolated across the stretch and flagged; a series still without a
/// reading then is unknown at the event, and the job's gaps say so.
pub const READING_TIMEOUT: Duration = Duration::from_secs(15);
/// Manifests waiting for the spool writer at most (then the job worker waits).
pub const SPOOL_QUEUE: usize = 1024;
/// Reports waiting for the writer at most.
pub const REPORT_QUEUE: usize = 1024;
/// How often, at most, the journal is written (when something changed).
pub const JOURNAL_PERIOD: Duration = Duration::from_millis(250);
/// How often the journal is rewritten while jobs are open but no event comes. An outage's
/// energy is recovered from the counters whatever its length, but a job that ends in it is
/// split at its end by estimate over the stretch since the journal's last reading: this bounds
/// how much older than the outage that reading can be.
pub const JOURNAL_IDLE_PERIOD: Duration = Duration::from_secs(5);
/// How often the worker closes an attribution interval when no event does.
pub const ATTRIBUTION_PERIOD: Duration = Duration::from_secs(1);
/// An event stamped longer ago than this is taken as having happened this long ago (a stale
/// or wrong plugin clock must not make ergond read counters far in the past). Long enough for
/// an event that waited in the socket while ergond was stopped or starved: its counters are
/// then interpolated across the stretch, and the job's figures say so.
pub const MAX_EVENT_AGE_NS: u64 = 600_000_000_000;
/// As [`MAX_EVENT_AGE_NS`], for events the plugin queued while ergond was down (a week).
pub const MAX_REPLAY_AGE_NS: u64 = 7 * 86_400_000_000_000;

/// Who may do what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// SlurmUser's uid, if resolved (root is always allowed).
    pub slurm_uid: Option<u32>,
}

impl Access {
    /// Whether `uid` may send job and step events and query any job.
    pub fn privileged(&self, uid: u32) -> bool {
        uid == 0 || Some(uid) == self.slurm_uid
    }
}

/// Configuration of the tracker.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    /// Where manifests go.
    pub spool_dir: PathBuf,
    /// How they are laid out there.
    pub spool_layout: super::spool::Layout,
    /// Private data's modes and group for the spool; `private` also makes the user's report
    /// file 0600.
    pub spool_modes: ergon_protocol::privacy::Modes,
    /// Cluster name written when the plugin did not send one.
    pub default_cluster: String,
    /// Who may do what.
    pub access: Access,
    /// Registry bounds.
    pub limits: Limits,
    /// Attribution choices (CPU idle policy).
    pub attribution: crate::attribution::AttributionConfig,
    /// Where the job journal lives (`None`: no journal, open jobs are lost on restart).
    pub state_dir: Option<PathBuf>,
    /// procfs root (the boot id).
    pub proc_root: PathBuf,
    /// Power limits that judge an outage's energy.
    pub power: PowerLimits,
    /// How often open jobs are checked for a lost end event, and how old they must be.
    pub reap_period: Duration,
    /// This node's Slurm name and GPU configuration (for jobs found running at start-up).
    pub slurm: SlurmNode,
    /// Where the plugin leaves the events it could not deliver (`None`: no replay).
    pub queue_dir: Option<PathBuf>,
    /// The idle-GPU rule's threshold (`[report] idle_gpu_util_percent`).
    pub idle_gpu_util_percent: f64,
    /// The user's report's CO2e and cost estimate (`[report]` static factors).
    pub report_factors: super::report::Factors,
}

pub(crate) struct Inner {
    /// Something the journal holds changed (set by the worker and the spool writer).
    pub(super) journal_dirty: std::sync::atomic::AtomicBool,
    /// Job events refused so far (for rate-limited logging).
    pub(super) refused: std::sync::atomic::AtomicU64,
    /// Events replayed from the plugin's queue so far.
    pub(super) replayed: std::sync::atomic::AtomicU64,
    /// Failed attempts to write a manifest into the spool so far.
    pub(super) spool_failures: std::sync::atomic::AtomicU64,
    /// Manifests waiting for the spool to take them (the spool writer's backlog of retries).
    pub(super) spool_waiting: std::sync::atomic::AtomicU64,
    pub(super) reports: Option<SyncSender<ReportWork>>,
    /// Sealed manifests for the spool writer thread (fsync off the job worker); taken (None)
    /// at shutdown so the writer drains and stops.
    pub(super) spool: Mutex<Option<SyncSender<SpoolWork>>>,
    pub(super) registry: Mutex<JobRegistry>,
    pub(super) attributor: Mutex<Attributor>,
    pub(super) boot_id: String,
    pub(super) facts: NodeFacts,
    pub(super) sampler: Arc<SamplerHandle>,
    pub(super) config: TrackerConfig,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A report to write.
pub(crate) struct ReportWork {
    pub(crate) job_id: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) targets: Vec<report::Target>,
    pub(crate) text: String,
}

/// A sealed manifest for the spool writer, with its job (for the report).
#[derive(Debug)]
pub(crate) struct SpoolWork {
    pub(super) job: super::registry::Job,
    pub(super) manifest: ergon_protocol::Manifest,
}

/// The event's instant on both clocks: the plugin's stamp, mapped onto CLOCK_MONOTONIC by the
/// current offset between the clocks. A stamp in the future is taken as now, one older than
/// `max_age_ns` as that old, and a missing one (0) as now.
pub fn event_time(stamp: Timestamp, max_age_ns: u64) -> EventTime {
    let now_unix = Timestamp::now().unix_ns;
    let now_mono = monotonic_ns();
    if stamp.unix_ns == 0 {
        return EventTime {
            unix_ns: now_unix,
            mono_ns: now_mono,
        };
    }
    let age = now_unix.saturating_sub(stamp.unix_ns).min(max_age_ns);
    EventTime {
        unix_ns: stamp.unix_ns,
        mono_ns: now_mono.saturating_sub(age),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_clamps_stale_and_future_stamps() {
        let now = Timestamp::now().unix_ns;
        let mono = monotonic_ns();
        let e = event_time(
            Timestamp::from_unix_ns(now - 1_000_000_000),
            MAX_EVENT_AGE_NS,
        );
        assert!(e.mono_ns + 900_000_000 < monotonic_ns() && e.mono_ns + 1_200_000_000 > mono);
        let e = event_time(
            Timestamp::from_unix_ns(now + 60_000_000_000),
            MAX_EVENT_AGE_NS,
        );
        assert!(e.mono_ns >= mono, "future is now");
        let e = event_time(Timestamp::from_unix_ns(1), MAX_EVENT_AGE_NS);
        assert!(
            e.mono_ns + MAX_EVENT_AGE_NS + 100_000_000 >= mono,
            "clamped"
        );
        let e = event_time(Timestamp::from_unix_ns(0), MAX_EVENT_AGE_NS);
        assert!(e.unix_ns >= now);
    }

    #[test]
    fn root_and_slurm_user_are_privileged() {
        let a = Access {
            slurm_uid: Some(64030),
        };
        assert!(a.privileged(0) && a.privileged(64030) && !a.privileged(1000));
        assert!(!Access { slurm_uid: None }.privileged(1000));
    }
}
