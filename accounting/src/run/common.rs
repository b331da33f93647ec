//! What both ways of running use: the sinks, a job's new state entry, the clock, progress bars.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::collect::{combine, FoundManifest, IndexedFile};
use crate::config::Config;
use crate::ledger::Ledger;
use crate::sinks::{HttpIngest, Sink, VictoriaMetrics};
use crate::state::{Delivery, JobEntry, State};

use super::summary::RunSummary;

/// A sink the uploader threads can use.
pub type SharedSink = Box<dyn Sink + Send + Sync>;
pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(super) fn bar(enabled: bool, len: usize, what: &str) -> ProgressBar {
    if !enabled || len < 100 {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Build the configured sinks.
pub fn build_sinks(config: &Config, dry_run: bool) -> Result<Vec<SharedSink>> {
    let mut sinks: Vec<SharedSink> = Vec::new();
    if config.records.enabled && dry_run {
        sinks.push(Box::new(crate::records::RecordsSink::dry(
            config.records.batch_size,
        )));
    } else if config.records.enabled {
        sinks.push(Box::new(crate::records::RecordsSink::open(
            &config.records_location(),
            config.records.batch_size,
        )));
    }
    if let Some(vm) = &config.victoria_metrics {
        sinks.push(Box::new(
            VictoriaMetrics::new(vm, &config.state_dir)
                .context("setting up the victoria_metrics sink")?,
        ));
    }
    if let Some(http) = &config.http {
        sinks.push(Box::new(
            HttpIngest::new(http).context("setting up the http sink")?,
        ));
    }
    Ok(sinks)
}
/// What [`new_entry`] made of a job's manifests.
pub(super) enum Entered {
    /// A new or updated entry.
    Entry(JobEntry),
    /// The job is in the state (or, delivered, in the ledger) with the same key.
    Known,
    /// The job ended at or before the horizon (counted): the paths of its manifests, which are
    /// never collected again.
    BeforeHorizon(Vec<std::path::PathBuf>),
}

/// A new entry for `record`, or why there is none: the job is in the state (or, delivered, in
/// the ledger) with the same key, or ended before the horizon (counted). The state's entry wins
/// over the ledger's row.
#[allow(clippy::too_many_arguments)]
pub(super) fn new_entry(
    config: &Config,
    state: &State,
    ledger: &Ledger,
    sinks: &[SharedSink],
    summary: &mut RunSummary,
    key: &str,
    found: Vec<FoundManifest>,
    horizon_unix_ns: u64,
    factors: Option<&crate::carbon::Factors>,
) -> Result<Entered> {
    let (paths, manifests): (Vec<_>, Vec<_>) =
        found.into_iter().map(|f| (f.path, f.manifest)).unzip();
    let mut record = combine(&manifests);
    let existing = match state.jobs.get(key) {
        Some(e) => Some(e.key.clone()),
        None => ledger.job(key)?.map(|j| j.key),
    };
    if existing.as_ref() == Some(&record.idempotency_key) {
        return Ok(Entered::Known);
    }
    if existing.is_none() && record.end_unix_ns <= horizon_unix_ns {
        summary.skipped_before_horizon += 1;
        return Ok(Entered::BeforeHorizon(paths));
    }
    if let Some(f) = factors {
        f.apply(&mut record, &manifests);
    }
    if existing.is_some() {
        summary.updated += 1;
    } else {
        summary.collected += 1;
    }
    Ok(Entered::Entry(JobEntry {
        key: record.idempotency_key.clone(),
        collected_unix: now_unix(),
        end_unix_ns: record.end_unix_ns,
        sacct: config.sacct.enabled.then(Delivery::pending),
        sinks: sinks
            .iter()
            .map(|s| (s.name().to_owned(), Delivery::pending()))
            .collect(),
        record: Some(Arc::new(record)),
    }))
}

/// Write to the ledger the index entries a scan found new or changed of files of jobs that are
/// delivered (in the ledger, not in the state): a duplicate manifest of a delivered job, a file
/// touched since it was collected. Without this they would be read again by every run.
/// Files the scan found gone or quarantined leave the ledger too (a new file at the same path
/// is then new, as for the state's index, which each run rebuilds from what is listed).
pub(super) fn keep_ledger_files(
    ledger: &mut Ledger,
    state: &State,
    fresh: Vec<IndexedFile>,
    gone: Vec<String>,
) -> Result<()> {
    let gone: Vec<&str> = gone
        .iter()
        .map(String::as_str)
        .filter(|p| !state.index.contains_key(*p))
        .collect();
    ledger.forget_files(&gone)?;
    let fresh: Vec<IndexedFile> = fresh
        .into_iter()
        .filter(|f| !state.jobs.contains_key(&f.entry.job))
        .collect();
    if fresh.is_empty() {
        return Ok(());
    }
    let jobs: Vec<&str> = fresh.iter().map(|f| f.entry.job.as_str()).collect();
    let known = ledger.jobs(&jobs)?;
    let files: Vec<(&str, &crate::spool::IndexEntry)> = fresh
        .iter()
        .filter(|f| known.contains_key(&f.entry.job))
        .map(|f| (f.path.as_str(), &f.entry))
        .collect();
    if !files.is_empty() {
        ledger.put(&[], &files)?;
    }
    Ok(())
}
