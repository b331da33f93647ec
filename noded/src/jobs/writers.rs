//! The two writer threads behind the job worker: `ergond-spool` writes each sealed manifest
//! into the spool (atomic, fsync'd, several under one directory fsync) and takes the job out
//! of the registry once it is durable; `ergond-report` writes the user's `--energy-report` as
//! the user (which may block on a slow filesystem: neither the worker nor the spool writer
//! waits for it).

use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use super::report;
use super::spool::{sync_dir, write_manifest_file};
use super::tracker::{lock, Inner};

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
pub(super) struct ReportWork {
    job_id: u32,
    uid: u32,
    gid: u32,
    targets: Vec<report::Target>,
    text: String,
}

pub(super) fn report_writer(rx: Receiver<ReportWork>) {
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

/// A sealed manifest for the spool writer, with its job (for the report).
pub(super) struct SpoolWork {
    pub(super) job: super::registry::Job,
    pub(super) manifest: ergon_protocol::Manifest,
}

/// The spool writer thread: writes each manifest (atomic, fsync'd) and hands the job's report
/// on, in order.
/// Most manifests written under one directory fsync.
const SPOOL_BATCH: usize = 64;

/// Writes the manifests queued for the spool. Those already waiting are written together and
/// made durable by one directory fsync (a burst of job ends costs one per batch, not one per
/// job); a job leaves the journal only after that fsync.
pub(super) fn spool_writer(inner: &Inner, rx: Receiver<SpoolWork>) {
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
pub(super) fn write_one(inner: &Inner, w: SpoolWork) {
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
