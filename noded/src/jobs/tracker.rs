//! [`JobTracker`]: the imperative shell around the [`JobRegistry`], and the commands it answers.
//!
//! [`JobTracker::handle`] answers a request at once (it only updates the registry under a
//! mutex and queues the registry's [`Action`]s), so the plugin's one-shot client gets its
//! reply in microseconds. The actions are performed in order by the job worker
//! ([`super::worker`]); manifests and reports are written by [`super::writers`]. The journal
//! is written at most every [`JOURNAL_PERIOD`] when something changed, and at shutdown, so a
//! job open when ergond stops or is killed is finished by the next start
//! ([`super::recovery`]).

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ergon_protocol::{ErrorCode, Reply, Request, Timestamp, PROTOCOL_VERSION};

use super::attributor::Attributor;
use super::discovery::SlurmNode;
use super::journal::boot_id;
use super::manifest::{match_gpus, NodeFacts};
use super::recovery::{discover, finish_vanished, restore, PowerLimits, Restored};
use super::registry::{Action, EventTime, JobRegistry, Limits};
use super::worker::{close_now, flag_shared_gpus, perform, worker, write_journal, WorkerState};
use super::writers::{report_writer, spool_writer, ReportWork, SpoolWork};
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
}

pub(super) struct Inner {
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

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The job tracker; see the module documentation.
pub struct JobTracker {
    inner: Arc<Inner>,
    tx: Option<SyncSender<Action>>,
    worker: Option<JoinHandle<()>>,
    spool_writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for JobTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobTracker").finish_non_exhaustive()
    }
}

impl JobTracker {
    /// Restore what the journal holds, replay what the plugin queued, take on the jobs running
    /// in the cgroup tree, then start the worker and writer threads.
    pub fn start(
        sampler: Arc<SamplerHandle>,
        facts: NodeFacts,
        config: TrackerConfig,
    ) -> std::io::Result<Self> {
        let mut registry = JobRegistry::new(config.limits);
        let mut attributor = Attributor::new(&facts, config.attribution);
        let restored = match &config.state_dir {
            Some(dir) => restore(
                dir,
                &config.proc_root,
                &sampler,
                &facts,
                &mut registry,
                &mut attributor,
            ),
            None => Restored::default(),
        };
        if restored.jobs > 0 {
            tracing::info!(
                jobs = restored.jobs,
                recovered = restored.recovered,
                "restored the open jobs from the journal"
            );
        }
        let (report_tx, report_rx) = sync_channel(REPORT_QUEUE);
        std::thread::Builder::new()
            .name("ergond-report".into())
            .spawn(move || report_writer(report_rx))?;
        flag_shared_gpus(&sampler, &attributor);
        let (spool_tx, spool_rx) = sync_channel::<SpoolWork>(SPOOL_QUEUE);
        let inner = Arc::new(Inner {
            journal_dirty: std::sync::atomic::AtomicBool::new(false),
            refused: std::sync::atomic::AtomicU64::new(0),
            replayed: std::sync::atomic::AtomicU64::new(0),
            spool_failures: std::sync::atomic::AtomicU64::new(0),
            spool_waiting: std::sync::atomic::AtomicU64::new(0),
            spool: Mutex::new(Some(spool_tx)),
            reports: Some(report_tx),
            registry: Mutex::new(registry),
            attributor: Mutex::new(attributor),
            boot_id: boot_id(&config.proc_root),
            facts,
            sampler,
            config,
        });
        let spool_writer = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("ergond-spool".into())
                .spawn(move || spool_writer(&inner, spool_rx))?
        };
        // Start-up, in order, before the worker takes new events:
        let mut st = WorkerState::default();
        // 1. what the journal left to do (jobs whose end was seen before the stop);
        for a in restored.actions {
            perform(&inner, a, &mut st);
        }
        // 2. the events the plugin queued while ergond could not take them (a JobEnd gives a
        //    job that ended meanwhile its real end, a JobStart a job that started its GPUs);
        replay_queue(&inner, &mut st);
        // 3. the journaled jobs that vanished with no event saying when: ended now;
        let vanished = finish_vanished(
            &mut lock(&inner.registry),
            &restored.vanished,
            restored.outage_start_unix_ns,
        );
        for a in vanished {
            perform(&inner, a, &mut st);
        }
        // 4. the outage closed now, so that the jobs found next are measured from now;
        close_now(&inner, &mut st);
        // 5. the jobs running that nothing named: found in the cgroup tree.
        let found = {
            let mut att = lock(&inner.attributor);
            let found = discover(
                &inner.sampler,
                &inner.facts,
                &inner.config.slurm,
                &inner.config.proc_root,
                &mut lock(&inner.registry),
                &mut att,
            );
            flag_shared_gpus(&inner.sampler, &att);
            found
        };
        if found > 0 {
            tracing::info!(
                jobs = found,
                "took on running jobs found in the cgroup tree"
            );
        }
        inner
            .journal_dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = sync_channel(QUEUE_CAPACITY);
        let worker = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("ergond-jobs".into())
                .spawn(move || worker(&inner, rx, st))?
        };
        Ok(Self {
            inner,
            tx: Some(tx),
            worker: Some(worker),
            spool_writer: Some(spool_writer),
        })
    }

    /// Answer one request from a peer with uid `peer_uid` (from `SO_PEERCRED`).
    pub fn handle(&self, request: Request, peer_uid: u32) -> Reply {
        match &request {
            Request::Hello { .. } => {
                return Reply::Hello {
                    server: format!("ergond {}", env!("CARGO_PKG_VERSION")),
                    version: PROTOCOL_VERSION,
                }
            }
            Request::Ping => return Reply::Pong,
            Request::QueryJob { job_id } => return self.query(*job_id, peer_uid),
            _ => {}
        }
        let actions = match apply(&self.inner, &request, peer_uid, MAX_EVENT_AGE_NS) {
            Ok(a) => a,
            Err(reply) => return reply,
        };
        let Some(tx) = &self.tx else {
            return Reply::error(ErrorCode::Busy, "ergond is shutting down");
        };
        for a in actions {
            match tx.try_send(a) {
                Ok(()) => {}
                Err(TrySendError::Full(a)) => {
                    tracing::error!(action = ?a, "job worker queue full; action dropped");
                    return Reply::error(
                        ErrorCode::Busy,
                        "ergond's job worker is backlogged; the event was only partly recorded",
                    );
                }
                Err(TrySendError::Disconnected(_)) => {
                    return Reply::error(ErrorCode::Internal, "ergond's job worker has stopped");
                }
            }
        }
        Reply::Ok
    }

    fn query(&self, job_id: u32, peer_uid: u32) -> Reply {
        // Copy what is needed, so that the sampler snapshot below is taken without the lock.
        let found = {
            let reg = lock(&self.inner.registry);
            reg.get(job_id)
                .map(|j| (j.uid, j.gpus.clone(), j.start_reading.clone()))
                .zip(reg.snapshot(job_id))
        };
        let Some(((owner, gpus, start_reading), mut snap)) = found else {
            return Reply::error(
                ErrorCode::UnknownJob,
                format!("job {job_id} is not running on this node"),
            );
        };
        if !self.inner.config.access.privileged(peer_uid) && owner != Some(peer_uid) {
            return Reply::error(
                ErrorCode::PermissionDenied,
                format!("job {job_id} belongs to another user; you may query only your own jobs"),
            );
        }
        // GPU energy so far: latest published counters minus the start reading.
        if let Some(start) = &start_reading {
            let now = self.inner.sampler.snapshot();
            let e: Option<f64> = match_gpus(&gpus, &self.inner.facts.gpus)
                .iter()
                .filter_map(|(_, m)| m.map(|(p, _)| p))
                .map(|p| {
                    let cur = now.gpus.get(p)?.energy_j;
                    start
                        .gpus
                        .get(p)
                        .copied()
                        .flatten()
                        .map(|s| (cur - s).max(0.0))
                })
                .sum();
            snap.energy_j = e;
        }
        Reply::Job(snap)
    }

    /// The attribution's running figures, for `/metrics`.
    pub fn attribution_snapshot(&self) -> crate::snapshot::AttributionSnapshot {
        let (open_jobs, manifests_pending) = {
            let reg = lock(&self.inner.registry);
            (reg.running(), reg.ended())
        };
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let att = lock(&self.inner.attributor);
        let stats = att.stats();
        let acc = att.accumulator();
        let components = acc
            .node()
            .components()
            .into_iter()
            .map(|(c, b)| {
                let name = match c {
                    crate::attribution::Component::Gpu => "gpu",
                    crate::attribution::Component::Package => "cpu",
                    crate::attribution::Component::Dram => "dram",
                };
                (name, [b.measured_j, b.jobs_j, b.idle_j, b.unattributed_j])
            })
            .collect();
        crate::snapshot::AttributionSnapshot {
            open_jobs,
            manifests_pending,
            spool_failures: self.inner.spool_failures.load(relaxed),
            replayed_events: self.inner.replayed.load(relaxed),
            intervals: stats.intervals,
            failed_intervals: stats.failed_intervals,
            conservation_failures: stats.conservation_failures,
            late_readings: stats.late_readings,
            conservation_error_j: acc.conservation_error_j(),
            components,
        }
    }

    /// Jobs open now.
    pub fn open_jobs(&self) -> usize {
        lock(&self.inner.registry).len()
    }

    /// Stop taking events, let the worker finish what is queued (manifests of ended jobs), and
    /// join it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            if w.join().is_err() {
                tracing::error!("the job worker panicked");
            }
        }
        // The worker has handed over every manifest: let the spool writer write them and stop.
        lock(&self.inner.spool).take();
        if let Some(w) = self.spool_writer.take() {
            if w.join().is_err() {
                tracing::error!("the spool writer panicked");
            }
        }
        let open = lock(&self.inner.registry).len();
        if self.inner.config.state_dir.is_some() {
            write_journal(&self.inner);
            if open > 0 {
                tracing::info!(
                    open_jobs = open,
                    "stopping with jobs still open: they are in the journal and the next start \
                     finishes them"
                );
            }
        } else if open > 0 {
            tracing::warn!(
                open_jobs = open,
                "stopping with jobs still open and no state_dir: they get no manifest"
            );
        }
    }
}

impl Drop for JobTracker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Apply a lifecycle event from a peer with uid `peer_uid` to the registry: the actions the
/// worker must perform, or the reply that refuses it. `max_age_ns` bounds how far in the past
/// the event's stamp is believed (see [`event_time`]).
pub(super) fn apply(
    inner: &Inner,
    request: &Request,
    peer_uid: u32,
    max_age_ns: u64,
) -> Result<Vec<Action>, Reply> {
    let access = inner.config.access;
    if !request.is_lifecycle() {
        return Err(Reply::error(ErrorCode::Internal, "not a lifecycle event"));
    }
    if !access.privileged(peer_uid) {
        tracing::warn!(
            uid = peer_uid,
            "refused a job event from an unprivileged client"
        );
        return Err(Reply::error(
            ErrorCode::PermissionDenied,
            format!(
                "job and step events may be sent only by root or SlurmUser (uid {}); this client \
                 runs as uid {peer_uid}",
                access
                    .slurm_uid
                    .map_or_else(|| "unresolved".to_owned(), |u| u.to_string())
            ),
        ));
    }
    let time = |stamp| event_time(stamp, max_age_ns);
    // The batch script's stdout, as slurmstepd opened it (patterns like %j expanded): where a
    // text report is appended. Read before taking the lock.
    let mut batch_stdout = match request {
        Request::StepStart(m) if m.step == ergon_protocol::StepId::Batch => m
            .pid
            .and_then(|pid| batch_stdout_path(&inner.config.proc_root, pid)),
        _ => None,
    };
    let mut reg = lock(&inner.registry);
    let result = match request {
        Request::JobStart(m) => reg.job_start(m, time(m.time)),
        Request::JobEnd(m) => reg.job_end(m, time(m.time)),
        Request::StepStart(m) => {
            let r = reg.step_start(m, time(m.time));
            if let (Ok(_), Some(path)) = (&r, batch_stdout.take()) {
                if let Some(job) = reg.get_mut(m.job_id) {
                    job.stdout_path = Some(path);
                }
            }
            r
        }
        Request::StepEnd(m) => reg.step_end(m, time(m.time)),
        _ => return Err(Reply::error(ErrorCode::Internal, "not a lifecycle event")),
    };
    result.map_err(|e| {
        // Logged once per 1,000 under a flood (each is also in the reply).
        let n = inner
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 1000 == 0 {
            tracing::warn!(error = %e, refused_so_far = n + 1, "job event refused");
        }
        Reply::error(ErrorCode::Busy, e.to_string())
    })
}

/// Replay the events the plugin queued (see [`super::queue`]), performing their actions here
/// and now, in order; returns how many were replayed. An event the registry refuses (at its
/// limits) stays queued for the next pass.
pub(super) fn replay_queue(inner: &Inner, st: &mut WorkerState) -> usize {
    let Some(dir) = &inner.config.queue_dir else {
        return 0;
    };
    let access = inner.config.access;
    let mut n = 0;
    for q in super::queue::pending(dir, |uid| access.privileged(uid)) {
        match apply(inner, &q.request, q.uid, MAX_REPLAY_AGE_NS) {
            Ok(actions) => {
                for a in actions {
                    perform(inner, a, st);
                }
                super::queue::done(&q);
                n += 1;
            }
            Err(Reply::Error {
                code: ErrorCode::Busy,
                reason,
            }) => {
                tracing::warn!(file = %q.path.display(), reason, "a queued event waits: ergond is at its limits");
                break;
            }
            Err(other) => {
                tracing::warn!(file = %q.path.display(), reply = ?other, "a queued event was refused; removed");
                super::queue::done(&q);
            }
        }
    }
    if n > 0 {
        inner
            .replayed
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        inner
            .journal_dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(events = n, queue = %dir.display(), "replayed events the plugin queued while ergond could not take them");
    }
    n
}

/// The file a process's stdout is, from `/proc/<pid>/fd/1`: an absolute path of a regular
/// file, else `None` (a terminal, a pipe, `/dev/null`, a deleted file).
pub fn batch_stdout_path(proc_root: &std::path::Path, pid: u32) -> Option<String> {
    let fd = proc_root.join(pid.to_string()).join("fd/1");
    let target = std::fs::read_link(&fd).ok()?;
    let text = target.to_str()?.to_owned();
    if !target.is_absolute() || text.ends_with(" (deleted)") {
        return None;
    }
    // Only a regular file (stat follows the link, as the process sees its stdout).
    std::fs::metadata(&fd)
        .ok()
        .filter(std::fs::Metadata::is_file)
        .map(|_| text)
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
    fn batch_stdout_is_the_regular_file_behind_fd_1() {
        let dir = tempfile::tempdir().unwrap();
        let fd = dir.path().join("77/fd");
        std::fs::create_dir_all(&fd).unwrap();
        let out = dir.path().join("slurm-5.out");
        std::fs::write(&out, b"").unwrap();
        std::os::unix::fs::symlink(&out, fd.join("1")).unwrap();
        assert_eq!(batch_stdout_path(dir.path(), 77).as_deref(), out.to_str());
        std::fs::remove_file(fd.join("1")).unwrap();
        std::os::unix::fs::symlink("/dev/null", fd.join("1")).unwrap();
        assert_eq!(
            batch_stdout_path(dir.path(), 77),
            None,
            "not a regular file"
        );
        assert_eq!(batch_stdout_path(dir.path(), 78), None, "no such process");
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
