//! [`JobTracker`]: the imperative shell around the [`JobRegistry`].
//!
//! [`JobTracker::handle`] answers a request at once (it only updates the registry under a
//! mutex and queues the registry's [`Action`]s), so the plugin's one-shot client gets its
//! reply in microseconds. One worker thread (`ergond-jobs`) performs the actions in order:
//! it waits for the sampler's tick after an event and interpolates the counters at the event's
//! instant, watches and unwatches step cgroups, and at a job's end builds, seals and writes its
//! manifest to the spool. Being one FIFO thread, it always records a job's readings before it
//! finishes the job.
//!
//! The worker also drives the [`Attributor`] (an interval at every event and about once a
//! second between events) and writes the journal (at most every [`JOURNAL_PERIOD`], when
//! something changed, and at shutdown), so a job open when ergond stops or is killed is
//! finished by the next start ([`super::recovery`]).

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ergon_protocol::{ErrorCode, Reply, Request, Timestamp, PROTOCOL_VERSION};

use super::attributor::Attributor;
use super::journal::{self, boot_id};
use super::manifest::{self, match_gpus, NodeFacts};
use super::reading::{interpolate, Reading};
use super::recovery::{discover, journal_state, restore, PowerLimits, Restored};
use super::registry::{Action, EventTime, JobRegistry, Limits, Mark};
use super::report;
use super::spool::{sync_dir, write_manifest_file};
use crate::clock::monotonic_ns;
use crate::sampler::{SamplerHandle, TraceOf, TraceSample};

/// Actions queued for the worker at most; beyond, requests get [`ErrorCode::Busy`].
pub const QUEUE_CAPACITY: usize = 65_536;
/// How long the worker waits for the tick after an event before using what it has.
pub const READING_TIMEOUT: Duration = Duration::from_secs(2);
/// Manifests waiting for the spool writer at most (then the job worker waits).
pub const SPOOL_QUEUE: usize = 1024;
/// Reports waiting for the writer at most.
pub const REPORT_QUEUE: usize = 1024;
/// How often, at most, the journal is written (when something changed).
pub const JOURNAL_PERIOD: Duration = Duration::from_millis(250);
/// How often the journal is rewritten while jobs are open but no event comes.
pub const JOURNAL_IDLE_PERIOD: Duration = Duration::from_secs(30);
/// How often the worker closes an attribution interval when no event does.
pub const ATTRIBUTION_PERIOD: Duration = Duration::from_secs(1);
/// An event stamped longer ago than this is taken as having happened this long ago (a stale
/// or wrong plugin clock must not make ergond read counters far in the past).
pub const MAX_EVENT_AGE_NS: u64 = 5_000_000_000;

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
}

struct Inner {
    /// Something the journal holds changed (set by the worker and the spool writer).
    journal_dirty: std::sync::atomic::AtomicBool,
    /// Job events refused so far (for rate-limited logging).
    refused: std::sync::atomic::AtomicU64,
    reports: Option<SyncSender<ReportWork>>,
    /// Sealed manifests for the spool writer thread (fsync off the job worker); taken (None)
    /// at shutdown so the writer drains and stops.
    spool: Mutex<Option<SyncSender<SpoolWork>>>,
    registry: Mutex<JobRegistry>,
    attributor: Mutex<Attributor>,
    boot_id: String,
    facts: NodeFacts,
    sampler: Arc<SamplerHandle>,
    config: TrackerConfig,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
    /// Start the worker thread.
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
        let found = discover(&sampler, &facts, &mut registry, &mut attributor);
        if found > 0 {
            tracing::info!(
                jobs = found,
                "took on running jobs found in the cgroup tree"
            );
        }
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
            spool: Mutex::new(Some(spool_tx)),
            reports: Some(report_tx),
            registry: Mutex::new(registry),
            attributor: Mutex::new(attributor),
            boot_id: boot_id(&config.proc_root),
            facts,
            sampler,
            config,
        });
        let (tx, rx) = sync_channel(QUEUE_CAPACITY);
        for a in restored.actions {
            // The queue is empty and far larger than the registry's limit.
            let _ = tx.try_send(a);
        }
        let spool_writer = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("ergond-spool".into())
                .spawn(move || spool_writer(&inner, spool_rx))?
        };
        let worker = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("ergond-jobs".into())
                .spawn(move || worker(&inner, rx))?
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
        let access = self.inner.config.access;
        let deny = |what: &str| {
            Reply::error(
                ErrorCode::PermissionDenied,
                format!(
                    "{what} may be sent only by root or SlurmUser (uid {}); this client runs as \
                     uid {peer_uid}",
                    access
                        .slurm_uid
                        .map_or_else(|| "unresolved".to_owned(), |u| u.to_string())
                ),
            )
        };
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
        // The batch script's stdout, as slurmstepd opened it (patterns like %j expanded):
        // where a text report is appended. Read before taking the lock.
        let mut batch_stdout = match &request {
            Request::StepStart(m) if m.step == ergon_protocol::StepId::Batch => m
                .pid
                .and_then(|pid| batch_stdout_path(&self.inner.config.proc_root, pid)),
            _ => None,
        };
        let actions = {
            let mut reg = lock(&self.inner.registry);
            let result = match &request {
                Request::Hello { .. } | Request::Ping | Request::QueryJob { .. } => {
                    return Reply::error(ErrorCode::Internal, "request answered twice")
                }
                _ if !access.privileged(peer_uid) => {
                    tracing::warn!(
                        uid = peer_uid,
                        "refused a job event from an unprivileged client"
                    );
                    return deny("job and step events");
                }
                Request::JobStart(m) => reg.job_start(m, event_time(m.time)),
                Request::JobEnd(m) => reg.job_end(m, event_time(m.time)),
                Request::StepStart(m) => {
                    let r = reg.step_start(m, event_time(m.time));
                    if let (Ok(_), Some(path)) = (&r, batch_stdout.take()) {
                        if let Some(job) = reg.get_mut(m.job_id) {
                            job.stdout_path = Some(path);
                        }
                    }
                    r
                }
                Request::StepEnd(m) => reg.step_end(m, event_time(m.time)),
            };
            match result {
                Ok(a) => a,
                Err(e) => {
                    // Logged once per 1,000 under a flood (each is also in the reply).
                    let n = self
                        .inner
                        .refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n % 1000 == 0 {
                        tracing::warn!(error = %e, refused_so_far = n + 1, "job event refused");
                    }
                    return Reply::error(ErrorCode::Busy, e.to_string());
                }
            }
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
        let open_jobs = lock(&self.inner.registry).len();
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
/// [`MAX_EVENT_AGE_NS`] as that old, and a missing one (0) as now.
pub fn event_time(stamp: Timestamp) -> EventTime {
    let now_unix = Timestamp::now().unix_ns;
    let now_mono = monotonic_ns();
    if stamp.unix_ns == 0 {
        return EventTime {
            unix_ns: now_unix,
            mono_ns: now_mono,
        };
    }
    let age = now_unix.saturating_sub(stamp.unix_ns).min(MAX_EVENT_AGE_NS);
    EventTime {
        unix_ns: stamp.unix_ns,
        mono_ns: now_mono.saturating_sub(age),
    }
}

fn worker(inner: &Inner, rx: Receiver<Action>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf: Vec<TraceSample> = Vec::new();
    let mut last_periodic = std::time::Instant::now();
    let mut last_reap = std::time::Instant::now();
    let mut last_journal = std::time::Instant::now();
    loop {
        // The journal follows job events (at most every JOURNAL_PERIOD) and, while jobs are
        // open and nothing happens, the running figures every JOURNAL_IDLE_PERIOD: an outage
        // after an older journal is still measured, as one longer interval.
        let since = last_journal.elapsed();
        let idle_due = since >= JOURNAL_IDLE_PERIOD && !lock(&inner.registry).is_empty();
        if since >= JOURNAL_PERIOD && (inner.journal_dirty.swap(false, Relaxed) || idle_due) {
            write_journal(inner);
            last_journal = std::time::Instant::now();
        }
        // Periodic intervals only while no action waits: an event already queued must close
        // its interval at its own instant first.
        let action = match rx.recv_timeout(JOURNAL_PERIOD) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                if last_reap.elapsed() >= inner.config.reap_period {
                    if reap(inner, &mut buf) {
                        inner.journal_dirty.store(true, Relaxed);
                    }
                    last_reap = std::time::Instant::now();
                }
                if last_periodic.elapsed() >= ATTRIBUTION_PERIOD {
                    periodic(inner, &mut buf);
                    last_periodic = std::time::Instant::now();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        inner.journal_dirty.store(true, Relaxed);
        perform(inner, action, &mut buf);
    }
}

/// Finish the open jobs whose end event never came (a lost JobEnd): every `lost_job_check_s`, a job
/// older than a minute (`lost_job_check_s`) none of whose step cgroups' job directories exists
/// any more has ended.
/// It is finished now, with a gap saying so.
fn reap(inner: &Inner, buf: &mut Vec<TraceSample>) -> bool {
    let Some(h) = inner.sampler.cgroup_hierarchy() else {
        return false;
    };
    let now_mono = crate::clock::monotonic_ns();
    let gone: Vec<(u32, String)> = {
        let reg = lock(&inner.registry);
        reg.jobs()
            .filter(|j| j.end.is_none())
            .filter(|j| {
                now_mono.saturating_sub(j.start.mono_ns)
                    > inner.config.reap_period.as_nanos() as u64
            })
            .filter_map(|j| {
                let dirs: Vec<String> = j
                    .steps
                    .iter()
                    .filter_map(|s| s.watched.as_deref())
                    .map(|p| match p.rsplit_once('/') {
                        Some((dir, last)) if last.starts_with("step_") => dir.to_owned(),
                        _ => p.to_owned(),
                    })
                    .collect();
                let exists = |rel: &str| match h.version {
                    crate::sources::cgroup::CgroupVersion::V1 => {
                        h.root.join("cpuacct").join(rel).exists()
                    }
                    crate::sources::cgroup::CgroupVersion::V2 => h.root.join(rel).exists(),
                };
                (!dirs.is_empty() && !dirs.iter().any(|d| exists(d)))
                    .then(|| (j.job_id, j.node.clone()))
            })
            .collect()
    };
    let any = !gone.is_empty();
    for (job_id, node) in gone {
        tracing::warn!(
            job_id,
            "the job's end was never reported and its cgroup is gone: finishing it now"
        );
        let at = event_time(Timestamp::now());
        let actions = {
            let mut reg = lock(&inner.registry);
            let actions = reg
                .job_end(
                    &ergon_protocol::JobEnd {
                        cluster: None,
                        job_id,
                        node,
                        time: Timestamp::from_unix_ns(at.unix_ns),
                    },
                    at,
                )
                .unwrap_or_default();
            if let Some(job) = reg.get_mut(job_id) {
                job.gaps.push(ergon_protocol::Gap {
                    start_unix_ns: at
                        .unix_ns
                        .saturating_sub(inner.config.reap_period.as_nanos() as u64),
                    end_unix_ns: at.unix_ns,
                    reason: "the job's end was not reported to ergond (a lost event); it was \
                             finished when its cgroup was found gone, and is charged up to then"
                        .into(),
                    recovered: false,
                    estimate: None,
                });
            }
            actions
        };
        for a in actions {
            perform(inner, a, buf);
        }
    }
    any
}

/// Perform one action of the registry's.
fn perform(inner: &Inner, action: Action, buf: &mut Vec<TraceSample>) {
    match action {
        Action::Read { job_id, mark, at } => {
            let reading = read_at(&inner.sampler, &inner.config.proc_root, at.mono_ns, buf);
            // What the attributor needs from the registry, copied under a brief lock: the
            // socket handler takes the registry lock for every request, so it is never held
            // while the interval is attributed (which walks every open job).
            struct Info {
                gpus: Vec<usize>,
                mig: Vec<(usize, u32)>,
                cpus: ergon_protocol::CpuSet,
                path: Option<String>,
                own: Vec<String>,
            }
            let info = {
                let reg = lock(&inner.registry);
                reg.get(job_id).map(|job| {
                    let matched = match_gpus(&job.gpus, &inner.facts.gpus);
                    Info {
                        gpus: matched
                            .iter()
                            .filter_map(|(_, m)| m.map(|(p, _)| p))
                            .collect(),
                        mig: matched
                            .iter()
                            .filter_map(|(a, m)| Some((m.as_ref()?.0, a.mig?.gpu_instance_id)))
                            .collect(),
                        cpus: job.cpus.clone(),
                        path: match mark {
                            Mark::StepStart(s) | Mark::StepEnd(s) => {
                                job.step(s).and_then(|s| s.watched.clone())
                            }
                            _ => None,
                        },
                        own: job.steps.iter().filter_map(|s| s.watched.clone()).collect(),
                    }
                })
            };
            {
                let mut att = lock(&inner.attributor);
                att.advance(&reading);
                match (mark, &info) {
                    (Mark::JobStart, Some(i)) => {
                        // A job taken on at start-up and now properly started: its figures
                        // start again from this event (its steps' own StepStart events follow).
                        if att.members().contains_key(&job_id) {
                            let _ = att.job_end(job_id);
                        }
                        att.job_start(job_id, i.gpus.clone(), i.cpus.clone());
                        att.set_mig(job_id, i.mig.clone());
                        flag_shared_gpus(&inner.sampler, &att);
                    }
                    (Mark::StepStart(step), Some(i)) => {
                        let baseline = i.path.as_deref().and_then(|p| reading.cgroup_ns(p));
                        att.step_start(job_id, step, i.path.as_deref(), baseline);
                        att.set_cpus(job_id, i.cpus.clone());
                    }
                    (Mark::StepEnd(step), Some(i)) => {
                        att.step_end(job_id, step, i.path.as_deref());
                    }
                    _ => {}
                }
            }
            if matches!(mark, Mark::JobStart) {
                tracing::info!(job_id, "job started");
            }
            // The job keeps only its own cgroups' figures (a reading holds every watched one).
            let mut reading = reading;
            let own = info.map(|i| i.own).unwrap_or_default();
            reading.cgroups.retain(|(p, _)| own.contains(p));
            reading.gpu_util = Vec::new();
            lock(&inner.registry).record_reading(job_id, mark, reading);
        }
        Action::Watch { path } => {
            if let Err(e) = inner.sampler.watch_cgroup(&path) {
                tracing::warn!(cgroup = %path, error = %e, "cannot watch the step's cgroup; its CPU time is not measured");
            }
        }
        Action::Unwatch { path } => {
            inner.sampler.unwatch_cgroup(&path);
        }
        Action::Finish { job_id } => finish(inner, job_id, buf),
    }
}

/// Hand the job's report to the report writer thread (it writes as the user, which may block
/// on a slow filesystem; the job worker must not wait for it).
fn queue_report(
    inner: &Inner,
    job: &super::registry::Job,
    m: &ergon_protocol::Manifest,
    format: ergon_protocol::ReportFormat,
    manifest_path: Option<&std::path::Path>,
) {
    let Some(uid) = job.uid else {
        tracing::warn!(job_id = job.job_id, "no report: the job's owner is unknown");
        return;
    };
    let ran_batch = job
        .steps
        .iter()
        .any(|s| s.id == ergon_protocol::StepId::Batch);
    let targets = report::targets(
        m,
        format,
        job.stdout_path.as_deref(),
        job.work_dir.as_deref(),
        ran_batch,
    );
    if targets.is_empty() {
        tracing::warn!(
            job_id = job.job_id,
            "no report: the job named neither a stdout file nor a working directory"
        );
        return;
    }
    let text = match format {
        ergon_protocol::ReportFormat::Text => report::render_text(m, manifest_path),
        ergon_protocol::ReportFormat::Json => report::render_json(m, manifest_path),
    };
    // The plugin sends u32::MAX when it could not tell the gid.
    let gid = job.gid.filter(|&g| g != u32::MAX).unwrap_or(uid);
    let work = ReportWork {
        job_id: job.job_id,
        uid,
        gid,
        targets,
        text,
    };
    let Some(tx) = &inner.reports else { return };
    if let Err(e) = tx.try_send(work) {
        tracing::error!(job_id = job.job_id, error = %e, "report writer backlogged; report dropped");
    }
}

/// A report to write.
struct ReportWork {
    job_id: u32,
    uid: u32,
    gid: u32,
    targets: Vec<report::Target>,
    text: String,
}

fn report_writer(rx: Receiver<ReportWork>) {
    while let Ok(w) = rx.recv() {
        match report::deliver(&w.targets, w.uid, w.gid, &w.text) {
            Ok(path) => {
                tracing::info!(job_id = w.job_id, file = %path.display(), "energy report written")
            }
            Err(errors) => tracing::warn!(
                job_id = w.job_id,
                uid = w.uid,
                errors = ?errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "energy report not written"
            ),
        }
    }
}

/// Write the journal now (no-op without a state directory).
fn write_journal(inner: &Inner) {
    let Some(dir) = &inner.config.state_dir else {
        return;
    };
    // A consistent pair: the attributor is frozen while its lock is held, and the registry's
    // jobs are taken (shared, no copy) in that window under a brief lock; the attributor is
    // then copied without holding the registry lock the socket handler needs.
    let state = {
        let att = lock(&inner.attributor);
        let jobs = lock(&inner.registry).shared_jobs();
        journal_state(
            jobs,
            &att,
            &inner.sampler,
            &inner.facts,
            inner.config.power,
            &inner.boot_id,
        )
    };
    if let Err(e) = journal::write(dir, &state) {
        tracing::error!(error = %e, "cannot write the job journal; open jobs would be lost if ergond stopped now");
    }
}

/// Tell the sampler which GPUs several jobs hold (their per-process utilisation splits them).
fn flag_shared_gpus(sampler: &SamplerHandle, att: &Attributor) {
    for (pos, n) in att.holders_per_gpu().into_iter().enumerate() {
        sampler.set_gpu_shared(pos, n >= 2);
    }
}

/// Close an attribution interval at the newest instant every sampled series covers.
fn periodic(inner: &Inner, buf: &mut Vec<TraceSample>) {
    let snap = inner.sampler.snapshot();
    let covered = snap
        .gpus
        .iter()
        .filter(|g| g.measurable && !g.lost)
        .map(|g| g.at_ns)
        .chain(snap.zones.iter().map(|z| z.at_ns))
        .chain(snap.sockets.iter().map(|s| s.at_ns))
        .min();
    let Some(at) = covered.filter(|&t| t > 0) else {
        return;
    };
    let mut att = lock(&inner.attributor);
    if att.last_at().is_some_and(|l| at <= l) {
        return;
    }
    let reading = read_at(&inner.sampler, &inner.config.proc_root, at, buf);
    att.advance(&reading);
}

/// Counters at `at_ns`, interpolated from the traces once the tick after it is in.
fn read_at(
    sampler: &SamplerHandle,
    proc_root: &std::path::Path,
    at_ns: u64,
    buf: &mut Vec<TraceSample>,
) -> Reading {
    if !sampler.wait_for_readings_after(at_ns, READING_TIMEOUT) {
        tracing::warn!("the sampler had no reading after an event within 2 s; some counters at the event are unknown");
    }
    let snap = sampler.snapshot();
    let mut series = |of: TraceOf| {
        if sampler.trace(of, buf) {
            interpolate(buf, at_ns)
        } else {
            None
        }
    };
    let gpus = (0..snap.gpus.len())
        .map(|i| {
            let g = &snap.gpus[i];
            if g.measurable {
                series(TraceOf::Gpu(i))
            } else {
                None
            }
        })
        .collect();
    let zones = (0..snap.zones.len())
        .map(|i| series(TraceOf::Zone(i)))
        .collect();
    Reading {
        at_mono_ns: at_ns,
        gpus,
        zones,
        cgroups: snap
            .cgroups
            .into_iter()
            .map(|c| (c.path, c.cpu_ns))
            .collect(),
        sockets: snap
            .sockets
            .iter()
            .map(|s| (s.socket, s.busy_ns, s.total_ns))
            .collect(),
        gpu_util: snap
            .gpus
            .iter()
            .map(|g| {
                let (_, procs) = g.processes.as_ref()?;
                let mut by_job: Vec<(u32, f64)> = Vec::new();
                for &(pid, sm) in procs {
                    let Some(job) = super::reading::job_of_pid(proc_root, pid) else {
                        continue;
                    };
                    match by_job.iter_mut().find(|(j, _)| *j == job) {
                        Some(e) => e.1 += f64::from(sm),
                        None => by_job.push((job, f64::from(sm))),
                    }
                }
                Some(by_job)
            })
            .collect(),
    }
}

fn finish(inner: &Inner, job_id: u32, buf: &mut Vec<TraceSample>) {
    // The job stays in the registry (and so in the journal), with its final figures, until
    // the spool writer has written its manifest: a kill in between loses nothing.
    let job = {
        let mut reg = lock(&inner.registry);
        match reg.get(job_id) {
            Some(j) if j.end.is_some() => {}
            _ => {
                tracing::warn!(
                    job_id,
                    "job to finish is not in the registry or has not ended"
                );
                return;
            }
        }
        let needs_result = reg.get(job_id).is_some_and(|j| j.result.is_none());
        if needs_result {
            let mut att = lock(&inner.attributor);
            let r = att.job_end(job_id);
            flag_shared_gpus(&inner.sampler, &att);
            if let Some(j) = reg.get_mut(job_id) {
                j.result = r;
            }
        }
        reg.get(job_id).cloned().expect("checked above")
    };
    inner
        .journal_dirty
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let traces: Vec<Vec<TraceSample>> = (0..inner.facts.gpus.len())
        .map(|i| {
            if inner.sampler.trace(TraceOf::Gpu(i), buf) {
                buf.clone()
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut m = manifest::build(
        &job,
        &inner.facts,
        &traces,
        job.result.as_ref(),
        &inner.config.default_cluster,
    );
    m.seal();
    let work = SpoolWork { job, manifest: m };
    let tx = lock(&inner.spool).clone();
    match tx {
        // Blocks when the writer is behind: the worker slows down, no manifest is dropped.
        Some(tx) => {
            if let Err(e) = tx.send(work) {
                write_one(inner, e.0);
            }
        }
        None => write_one(inner, work),
    }
}

/// A sealed manifest for the spool writer, with its job (for the report).
struct SpoolWork {
    job: super::registry::Job,
    manifest: ergon_protocol::Manifest,
}

/// The spool writer thread: writes each manifest (atomic, fsync'd) and hands the job's report
/// on, in order.
/// Most manifests written under one directory fsync.
const SPOOL_BATCH: usize = 64;

/// Writes the manifests queued for the spool. Those already waiting are written together and
/// made durable by one directory fsync (a burst of job ends costs one per batch, not one per
/// job); a job leaves the journal only after that fsync.
fn spool_writer(inner: &Inner, rx: Receiver<SpoolWork>) {
    let dir = &inner.config.spool_dir;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < SPOOL_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let files: Vec<anyhow::Result<PathBuf>> = batch
            .iter()
            .map(|w| write_manifest_file(dir, &w.manifest))
            .collect();
        let synced = if files.iter().any(Result::is_ok) {
            sync_dir(dir).map_err(|e| format!("{e:#}"))
        } else {
            Ok(())
        };
        for (w, file) in batch.into_iter().zip(files) {
            let written = match (file, &synced) {
                (Ok(path), Ok(())) => Ok(path),
                (Ok(path), Err(e)) => Err(anyhow::anyhow!(
                    "{} was written but may not survive a crash: {e}",
                    path.display()
                )),
                (Err(e), _) => Err(e),
            };
            finish_one(inner, w, written);
        }
    }
}

/// Write one manifest durably here (when the spool writer is gone, at shutdown).
fn write_one(inner: &Inner, w: SpoolWork) {
    let written = super::spool::write_manifest(&inner.config.spool_dir, &w.manifest);
    finish_one(inner, w, written);
}

fn finish_one(inner: &Inner, w: SpoolWork, written: anyhow::Result<PathBuf>) {
    let SpoolWork { job, manifest: m } = w;
    let job_id = job.job_id;
    if written.is_ok() {
        lock(&inner.registry).remove_written(job_id, job.start);
        inner
            .journal_dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(format) = job.report {
        queue_report(
            inner,
            &job,
            &m,
            format,
            written.as_ref().ok().map(PathBuf::as_path),
        );
    }
    match written {
        Ok(path) => tracing::info!(
            job_id,
            manifest = %path.display(),
            gpu_j = m.totals.gpu_j,
            cpu_j = m.totals.cpu_j,
            coverage = m.coverage.fraction,
            "job ended; manifest written"
        ),
        Err(e) => tracing::error!(
            job_id,
            error = format!("{e:#}"),
            "job ended; manifest not written"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_clamps_stale_and_future_stamps() {
        let now = Timestamp::now().unix_ns;
        let mono = monotonic_ns();
        let e = event_time(Timestamp::from_unix_ns(now - 1_000_000_000));
        assert!(e.mono_ns + 900_000_000 < monotonic_ns() && e.mono_ns + 1_200_000_000 > mono);
        let e = event_time(Timestamp::from_unix_ns(now + 60_000_000_000));
        assert!(e.mono_ns >= mono, "future is now");
        let e = event_time(Timestamp::from_unix_ns(1));
        assert!(
            e.mono_ns + MAX_EVENT_AGE_NS + 100_000_000 >= mono,
            "clamped"
        );
        let e = event_time(Timestamp::from_unix_ns(0));
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
