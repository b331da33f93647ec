//! [`JobTracker`]: the imperative shell around the [`JobRegistry`], and the commands it answers.
//!
//! [`JobTracker::handle`] answers a request at once (it only updates the registry under a
//! mutex and queues the registry's [`Action`]s), so the plugin's one-shot client gets its
//! reply in microseconds. The actions are performed in order by the job worker
//! ([`super::worker`]); manifests and reports are written by [`super::writers`]. The journal
//! is written at most every [`JOURNAL_PERIOD`] when something changed, and at shutdown, so a
//! job open when ergond stops or is killed is finished by the next start
//! ([`super::recovery`]).

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ergon_protocol::{ErrorCode, Reply, Request, PROTOCOL_VERSION};

use super::attributor::Attributor;
use super::commands::{apply, take_queued};
use super::facts::NodeFacts;
use super::journal::boot_id;
use super::recovery::{discover, finish_vanished, restore, Restored};
use super::registry::{Action, JobRegistry};
use super::state::{
    lock, Inner, SpoolWork, MAX_EVENT_AGE_NS, QUEUE_CAPACITY, REPORT_QUEUE, SPOOL_QUEUE,
};
use super::worker::{close_now, flag_shared_gpus, perform, worker, write_journal, WorkerState};
use super::writers::{report_writer, spool_writer};
use crate::sampler::SamplerHandle;

pub use super::commands::batch_stdout_path;
pub use super::state::{event_time, Access, TrackerConfig};

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
        if let Some(m) = sampler.meter() {
            attributor.set_meter_accuracy(m.info().accuracy_percent);
        }
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
        let private_reports = config.spool_modes.private;
        std::thread::Builder::new()
            .name("ergond-report".into())
            .spawn(move || report_writer(report_rx, private_reports))?;
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
        for a in take_queued(&inner) {
            perform(&inner, a, &mut st);
        }
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
        let found = {
            let reg = lock(&self.inner.registry);
            reg.get(job_id).map(|j| j.uid).zip(reg.snapshot(job_id))
        };
        let Some((owner, mut snap)) = found else {
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
        // Its energy so far: the attributor's running share, as its manifest will have it.
        snap.energy_j = lock(&self.inner.attributor)
            .share(job_id)
            .map(|s| s.total_j());
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
            wall: self.inner.sampler.meter().map(|_| *att.wall()),
        }
    }

    /// The open jobs' running figures for `/metrics`: at most `config.per_job_max_jobs` jobs,
    /// the longest-running first (a job once exported stays so until it ends), the rest
    /// counted. Each lock is held only to copy what it guards: the registry for the open jobs'
    /// start and labels, then the attributor for the chosen jobs' shares.
    pub fn job_metrics(
        &self,
        config: &crate::config::MetricsConfig,
    ) -> crate::snapshot::JobMetricsSnapshot {
        use crate::config::JobLabel;
        let want = |l: JobLabel| config.per_job_labels.contains(&l);
        let (user, account) = (want(JobLabel::User), want(JobLabel::Account));
        let open: Vec<(u64, u32, Option<String>, Option<String>)> = {
            let reg = lock(&self.inner.registry);
            reg.jobs()
                .filter(|j| j.end.is_none())
                .map(|j| {
                    (
                        j.start.mono_ns,
                        j.job_id,
                        j.user.clone().filter(|_| user),
                        j.account.clone().filter(|_| account),
                    )
                })
                .collect()
        };
        let (series, open_in_attributor) = {
            let att = lock(&self.inner.attributor);
            let mut open: Vec<_> = open
                .into_iter()
                .filter(|(_, id, _, _)| att.members().contains_key(id))
                .collect();
            let n = open.len();
            select_longest_running(&mut open, config.per_job_max_jobs);
            let series: Vec<crate::snapshot::JobSeries> = open
                .into_iter()
                .filter_map(|(_, job_id, user, account)| {
                    let share = att.share(job_id)?;
                    Some(crate::snapshot::JobSeries {
                        job_id,
                        user,
                        account,
                        gpu_j: share.gpu_j(),
                        cpu_j: share.package_j(),
                        dram_j: share.dram_j(),
                        power_w: att.members().get(&job_id)?.last_power_w,
                        gpu_util: {
                            let m = att.members().get(&job_id)?;
                            let (sum, ns) = m
                                .gpu_stats
                                .values()
                                .fold((0.0, 0u64), |(s, n), g| (s + g.util_pct_ns, n + g.util_ns));
                            (ns > 0).then(|| sum / ns as f64 / 100.0)
                        },
                    })
                })
                .collect();
            (series, n)
        };
        crate::snapshot::JobMetricsSnapshot {
            left_out: open_in_attributor - series.len(),
            jobs: series,
            max_jobs: config.per_job_max_jobs,
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

/// Keep the `max` longest-running of `jobs` (start instant, job id, ...), then sort them by job
/// id. Ties in start go to the lower job id, so the choice is stable from scrape to scrape.
fn select_longest_running<T>(jobs: &mut Vec<(u64, u32, T, T)>, max: usize) {
    jobs.sort_by_key(|(start, id, _, _)| (*start, *id));
    jobs.truncate(max);
    jobs.sort_by_key(|(_, id, _, _)| *id);
}

#[cfg(test)]
mod tests {
    use super::select_longest_running;

    #[test]
    fn the_bound_keeps_the_longest_running_jobs_by_id() {
        let mut jobs = vec![
            (30, 1, (), ()),
            (10, 9, (), ()),
            (20, 5, (), ()),
            (10, 7, (), ()),
        ];
        select_longest_running(&mut jobs, 3);
        let ids: Vec<u32> = jobs.iter().map(|j| j.1).collect();
        assert_eq!(ids, vec![5, 7, 9]);
        let mut all = vec![(1, 2, (), ()), (2, 1, (), ())];
        select_longest_running(&mut all, 16);
        assert_eq!(all.len(), 2);
    }
}
