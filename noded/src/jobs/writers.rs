//! The two writer threads behind the job worker: `ergond-spool` writes each sealed manifest
//! into the spool (atomic, fsync'd, several under one directory fsync) and takes the job out
//! of the registry once it is durable; `ergond-report` writes the user's `--energy-report` as
//! the user (which may block on a slow filesystem: neither the worker nor the spool writer
//! waits for it).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use super::report;
use super::spool::{sync_dir, write_manifest_file};
use super::state::{lock, Inner, ReportWork, SpoolWork};

/// Hand the job's report to the report writer thread (it writes as the user, which may block
/// on a slow filesystem; the job worker must not wait for it).
pub(super) fn queue_report(
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
        ergon_protocol::ReportFormat::Text => {
            report::render_text(m, manifest_path, &inner.config.report_factors)
        }
        ergon_protocol::ReportFormat::Json => {
            report::render_json(m, manifest_path, &inner.config.report_factors)
        }
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

/// `private`: report files are created 0600 (private job data).
pub(super) fn report_writer(rx: Receiver<ReportWork>, private: bool) {
    let writer = report::Writer::this_binary().private(private);
    while let Ok(w) = rx.recv() {
        match writer.deliver(&w.targets, w.uid, w.gid, &w.text) {
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

/// The spool writer thread: writes each manifest (atomic, fsync'd) and hands the job's report
/// on, in order.
/// Most manifests written under one directory fsync.
const SPOOL_BATCH: usize = 64;

/// The first wait before retrying manifests the spool would not take.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Writes the manifests queued for the spool. Those already waiting are written together and
/// made durable by one directory fsync (a burst of job ends costs one per batch, not one per
/// job); a job leaves the journal only after that fsync.
///
/// A manifest the spool does not take (disk full, read-only remount, permissions) is kept and
/// retried, oldest first, after 1 s, then twice as long each time up to 60 s: it is written as
/// soon as the spool takes it again, without a restart. Meanwhile its job stays in the registry
/// and the journal (nothing is lost if ergond stops), `/metrics` counts the waiting manifests
/// and the failures, and the log has one line when the spool starts failing and one when it
/// recovers.
pub(super) fn spool_writer(inner: &Inner, rx: Receiver<SpoolWork>) {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = &inner.config.spool_dir;
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let mut backoff = RETRY_MIN;
    let mut failing: Option<String> = None;
    let mut open = true;
    while open || !waiting.is_empty() {
        let next = if waiting.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else if open {
            rx.recv_timeout(backoff)
        } else {
            Err(RecvTimeoutError::Disconnected)
        };
        match next {
            Ok(w) => waiting.push_back(Pending::new(w)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        while waiting.len() < SPOOL_BATCH {
            match rx.try_recv() {
                Ok(w) => waiting.push_back(Pending::new(w)),
                Err(_) => break,
            }
        }
        let n = waiting.len().min(SPOOL_BATCH);
        let batch: Vec<Pending> = waiting.drain(..n).collect();
        let files: Vec<anyhow::Result<PathBuf>> = batch
            .iter()
            .map(|p| {
                write_manifest_file(
                    dir,
                    inner.config.spool_layout,
                    inner.config.spool_modes,
                    &p.work.manifest,
                )
            })
            .collect();
        // One fsync per directory written into (one, in the flat layout).
        let mut dirs: Vec<&Path> = files
            .iter()
            .filter_map(|f| f.as_ref().ok()?.parent())
            .collect();
        dirs.sort();
        dirs.dedup();
        let synced = dirs
            .into_iter()
            .try_for_each(sync_dir)
            .map_err(|e| format!("{e:#}"));
        let mut failed: Vec<Pending> = Vec::new();
        let mut error = None;
        for (mut p, file) in batch.into_iter().zip(files) {
            let written = match (file, &synced) {
                (Ok(path), Ok(())) => Ok(path),
                (Ok(path), Err(e)) => Err(anyhow::anyhow!(
                    "{} was written but may not survive a crash: {e}",
                    path.display()
                )),
                (Err(e), _) => Err(e),
            };
            match written {
                Ok(path) => finish_one(inner, &mut p, Some(path)),
                Err(e) => {
                    inner.spool_failures.fetch_add(1, Relaxed);
                    error.get_or_insert_with(|| format!("{e:#}"));
                    finish_one(inner, &mut p, None);
                    failed.push(p);
                }
            }
        }
        // Those that failed go back to the front, in order.
        for p in failed.into_iter().rev() {
            waiting.push_front(p);
        }
        match (error, &failing) {
            (Some(e), None) => {
                tracing::error!(
                    spool = %dir.display(),
                    error = e,
                    waiting = waiting.len(),
                    "the spool takes no manifest: they are kept (their jobs stay in the journal) \
                     and retried every 1 to 60 s; free space or fix the spool directory"
                );
                failing = Some(e);
                backoff = RETRY_MIN;
            }
            (Some(_), Some(_)) => backoff = (backoff * 2).min(RETRY_MAX),
            (None, Some(_)) if waiting.is_empty() || n > 0 => {
                tracing::info!(spool = %dir.display(), "the spool takes manifests again; the waiting ones are written");
                failing = None;
                backoff = RETRY_MIN;
            }
            _ => {}
        }
        inner.spool_waiting.store(waiting.len() as u64, Relaxed);
        if !open && failing.is_some() {
            // Shutting down with manifests the spool does not take: their jobs are in the
            // journal, and the next start writes them.
            tracing::warn!(
                waiting = waiting.len(),
                "stopping with manifests not written: the journal keeps their jobs for the next start"
            );
            break;
        }
    }
}

/// A manifest waiting for the spool.
struct Pending {
    work: SpoolWork,
    /// Whether its report has been handed to the report writer (once, on the first attempt).
    reported: bool,
}

impl Pending {
    fn new(work: SpoolWork) -> Self {
        let reported = work.job.report_sent;
        Self { work, reported }
    }
}

/// Write one manifest durably here (when the spool writer is gone, at shutdown).
pub(super) fn write_one(inner: &Inner, w: SpoolWork) {
    let written = super::spool::write_manifest(
        &inner.config.spool_dir,
        inner.config.spool_layout,
        inner.config.spool_modes,
        &w.manifest,
    );
    let mut p = Pending::new(w);
    match written {
        Ok(path) => finish_one(inner, &mut p, Some(path)),
        Err(e) => {
            tracing::error!(
                job_id = p.work.job.job_id,
                error = format!("{e:#}"),
                "manifest not written at shutdown: the journal keeps its job for the next start"
            );
            finish_one(inner, &mut p, None);
        }
    }
}

/// After an attempt to write a job's manifest: the job leaves the registry once it is written,
/// and its report goes to the report writer on the first attempt, written or not (the user gets
/// it when the job ends; the flag in the registry, which the journal keeps, makes sure a retry
/// or a restart never sends it twice).
fn finish_one(inner: &Inner, p: &mut Pending, written: Option<PathBuf>) {
    let job = &p.work.job;
    let m = &p.work.manifest;
    let job_id = job.job_id;
    if !p.reported {
        if let Some(format) = job.report {
            queue_report(inner, job, m, format, written.as_deref());
        }
        p.reported = true;
        if let Some(j) = lock(&inner.registry).get_mut(job_id) {
            j.report_sent = true;
        }
        inner
            .journal_dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(path) = written {
        lock(&inner.registry).remove_written(job_id, job.start);
        inner
            .journal_dirty
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            job_id,
            manifest = %path.display(),
            gpu_j = m.totals.gpu_j,
            cpu_j = m.totals.cpu_j,
            coverage = m.coverage.fraction,
            "job ended; manifest written"
        );
    }
}
