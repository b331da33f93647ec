//! `ergon prune`: remove manifests from the spools once every destination has their job's
//! record, so that a spool receiving a million manifests a day does not grow without end.
//!
//! A file is removed only when all of these hold:
//! - the spool index of the state, or the ledger's (delivered jobs: [`crate::ledger`]), names
//!   it (it was collected, and its job has an entry in the state or the ledger; the state's
//!   entry wins);
//! - its size and modification time are what was collected (a file changed since is a person's
//!   business, not ours);
//! - its job's entry has nothing pending for any destination (sacct, the job-records database,
//!   each sink: delivered, or skipped on purpose);
//! - the job ended more than `older_than` ago.
//!
//! Everything else stays, counted by why. Files the state does not know (not collected yet, or
//! of jobs a state bound removed, whose delivery can no longer be told) are never removed.
//! `ergon prune` takes the run lock, so it never runs beside `ergon run`; it does not change the
//! state (the next run drops removed files from the spool index), and removes the files it
//! deletes from the ledger's index (`dry_run`: read-only, never created).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::config::Config;
use crate::ledger::Ledger;
use crate::spool;
use crate::state::{RunLock, State};

/// What `ergon prune` did (or, with `dry_run`, would do).
#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneSummary {
    /// Files removed.
    pub removed: usize,
    /// Their bytes.
    pub removed_bytes: u64,
    /// Kept: their job has a delivery pending.
    pub kept_pending: usize,
    /// Kept: their job ended too recently.
    pub kept_recent: usize,
    /// Kept: changed since they were collected.
    pub kept_changed: usize,
    /// Kept: not in the state (not collected yet, or of a job a bound removed from the state).
    pub kept_unknown: usize,
    /// Files that could not be removed: `<path>: <why>`.
    pub errors: Vec<String>,
}

impl PruneSummary {
    /// One line.
    pub fn line(&self, dry_run: bool) -> String {
        format!(
            "{} {} manifests ({:.1} MB); kept {} with a delivery pending, {} of jobs that ended too recently, {} changed since collected, {} not in the state{}",
            if dry_run { "would remove" } else { "removed" },
            self.removed,
            self.removed_bytes as f64 / 1e6,
            self.kept_pending,
            self.kept_recent,
            self.kept_changed,
            self.kept_unknown,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!("; {} could not be removed", self.errors.len())
            }
        )
    }
}

/// Remove what may go (see the module docs); with `dry_run`, only count it.
pub fn prune(config: &Config, older_than: Duration, dry_run: bool) -> Result<PruneSummary> {
    let _lock = RunLock::try_acquire(&config.state_dir)?;
    let state = State::load(&config.state_dir)?;
    // Read-only for a dry run; never created.
    let mut ledger = if dry_run {
        Ledger::open_read_only(&config.state_dir)?
    } else {
        Ledger::open_existing(&config.state_dir)?
    };
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let cutoff = now_ns.saturating_sub(older_than.as_nanos().min(u128::from(u64::MAX)) as u64);
    let mut out = PruneSummary::default();
    let files = spool::list(&config.spool_dirs).context("listing the spools")?;
    // The files and jobs the state does not have, from the ledger: one read transaction.
    ledger.begin_read()?;
    let keys: Vec<&str> = files
        .iter()
        .filter_map(|f| f.key.as_deref())
        .filter(|k| !state.index.contains_key(*k))
        .collect();
    let ledger_files = ledger.files(&keys)?;
    let jobs: BTreeSet<&str> = state
        .index
        .values()
        .chain(ledger_files.values())
        .map(|e| e.job.as_str())
        .filter(|j| !state.jobs.contains_key(*j))
        .collect();
    let ledger_jobs = ledger.jobs(&jobs.into_iter().collect::<Vec<_>>())?;
    ledger.end_read()?;
    // Removed files of delivered jobs leave the ledger's index (a new file at the same path is
    // then new; the state's index drops them at the next run).
    let mut forget: Vec<String> = Vec::new();
    for file in files {
        let entry = file
            .key
            .as_ref()
            .and_then(|k| state.index.get(k).or_else(|| ledger_files.get(k)));
        let Some(entry) = entry else {
            out.kept_unknown += 1;
            continue;
        };
        // (pending, end): the state's entry, else the ledger's (delivered everywhere).
        let job = match state.jobs.get(&entry.job) {
            Some(e) => Some((e.any_pending(), e.end_unix_ns)),
            None => ledger_jobs.get(&entry.job).map(|j| (false, j.end_unix_ns)),
        };
        let Some((pending, end_unix_ns)) = job else {
            out.kept_unknown += 1;
            continue;
        };
        if entry.size != file.size || entry.mtime_ns != file.mtime_ns {
            out.kept_changed += 1;
            continue;
        }
        if pending {
            out.kept_pending += 1;
            continue;
        }
        if end_unix_ns >= cutoff {
            out.kept_recent += 1;
            continue;
        }
        if !dry_run {
            if let Err(e) = std::fs::remove_file(&file.path) {
                out.errors.push(format!("{}: {e}", file.path.display()));
                continue;
            }
        }
        out.removed += 1;
        out.removed_bytes += file.size;
        if let Some(k) = file.key.as_ref().filter(|k| ledger_files.contains_key(*k)) {
            forget.push(k.clone());
        }
    }
    if !dry_run {
        ledger.forget_files(&forget.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(out)
}
