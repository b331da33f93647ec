//! What a run is asked to do ([`RunOptions`]) and what it did ([`RunSummary`], with the time
//! each step took: [`RunTimings`]).

use std::collections::BTreeMap;
use std::time::Duration;

/// Options of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Change nothing: report what would be done.
    pub dry_run: bool,
    /// Show a progress bar (the caller checks for a TTY).
    pub progress: bool,
    /// Collect everything, save the whole state, then deliver (no pipelining; for comparison).
    pub sequential: bool,
    /// List the sealed node directories of the sharded spool too (`ergon run --rescan`).
    pub rescan: bool,
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    /// Jobs collected for the first time.
    pub collected: usize,
    /// Jobs collected again because their set of node manifests changed.
    pub updated: usize,
    /// Manifests quarantined by this run.
    pub quarantined: usize,
    /// Jobs left for a later run (a manifest too recent).
    pub unsettled: usize,
    /// Jobs not collected because they ended before the retention horizon.
    pub skipped_before_horizon: usize,
    /// sacct records written (and verified).
    pub sacct_written: usize,
    /// sacct records that held the record already (nothing written; e.g. after the state was
    /// lost or restored).
    pub sacct_already: usize,
    /// sacct records skipped on purpose (foreign content).
    pub sacct_skipped: usize,
    /// sacct records left pending.
    pub sacct_failed: usize,
    /// Per sink: records delivered this run.
    pub delivered: BTreeMap<String, usize>,
    /// Per sink: records still pending after this run (those sent but not verified included).
    pub pending: BTreeMap<String, usize>,
    /// Per sink: of the pending records, those the sink accepted but that could not be verified
    /// to be durable yet (VictoriaMetrics).
    pub unverified: BTreeMap<String, usize>,
    /// Sinks that refused credentials.
    pub auth_refused: Vec<String>,
    /// Entries dropped by the bounds this run with deliveries pending.
    pub dropped: usize,
    /// Manifest files read and verified this run.
    pub manifests_read: usize,
    /// Manifest files not read because the spool index knew them unchanged.
    pub manifests_known: usize,
    /// Sealed node directories of the sharded spool not listed (their manifests all
    /// delivered, the directory unchanged since).
    pub dirs_skipped: usize,
    /// The manifests in them.
    pub manifests_in_skipped_dirs: u64,
    /// Node directories sealed by this run.
    pub dirs_sealed: usize,
    /// Where the run's time went (for the debug log and benchmarks).
    pub timings: RunTimings,
}

/// Wall-clock time of each step of a run, and the state saves.
#[derive(Debug, Default, Clone)]
pub struct RunTimings {
    /// Whether collection and upload were pipelined.
    pub pipelined: bool,
    /// Reading the state file (and replaying a journal).
    pub load_state: Duration,
    /// Listing the spools and reading, parsing and verifying the manifests not in the spool
    /// index (`collect::scan_indexed`). Pipelined: the whole streaming scan, the time spent in
    /// `combine` included.
    pub scan: Duration,
    /// Combining the manifests into job records and entering them in the state (with pruning).
    /// Pipelined: also journalling them and handing them to the uploaders.
    pub combine: Duration,
    /// Writing sacct records (state saves included).
    pub sacct: Duration,
    /// Per sink: uploading (state saves included). Pipelined: from the start of the
    /// collection until the sink's last batch, overlapping `scan`.
    pub upload: BTreeMap<String, Duration>,
    /// Journal appends (pipelined runs), the fsynced ones and the time they took, and bytes.
    pub journal_appends: u32,
    /// Of which fsynced (the write-ahead chunks).
    pub journal_syncs: u32,
    /// Time spent appending to the journal.
    pub journal_time: Duration,
    /// Bytes appended to the journal.
    pub journal_bytes: u64,
    /// How many times the state file was written.
    pub state_saves: u32,
    /// Time spent writing the state file, all saves.
    pub state_save_time: Duration,
    /// The largest state file written (bytes).
    pub state_bytes_max: u64,
    /// The whole run.
    pub total: Duration,
}

impl RunSummary {
    /// The sealed directories' part of [`RunSummary::line`], empty when none was involved.
    fn sealing_part(&self) -> String {
        let mut out = String::new();
        if self.dirs_skipped > 0 {
            out += &format!(
                ", {} manifests in {} sealed directories not listed",
                self.manifests_in_skipped_dirs, self.dirs_skipped
            );
        }
        if self.dirs_sealed > 0 {
            out += &format!(", {} directories sealed", self.dirs_sealed);
        }
        out
    }

    /// One line for logs and the state.
    pub fn line(&self) -> String {
        let sinks: Vec<String> = self
            .delivered
            .iter()
            .map(|(k, v)| {
                let unverified = self.unverified.get(k).copied().unwrap_or(0);
                format!(
                    "{k}: {v} delivered, {} pending{}",
                    self.pending.get(k).copied().unwrap_or(0),
                    if unverified > 0 {
                        format!(" ({unverified} sent, not verified)")
                    } else {
                        String::new()
                    }
                )
            })
            .collect();
        format!(
            "collected {} new and {} updated jobs ({} manifests read, {} known unchanged){}, {} quarantined, {} unsettled, {} before horizon; sacct: {} written, {} already in place, {} skipped, {} pending; {}; {} dropped",
            self.collected,
            self.updated,
            self.manifests_read,
            self.manifests_known,
            self.sealing_part(),
            self.quarantined,
            self.unsettled,
            self.skipped_before_horizon,
            self.sacct_written,
            self.sacct_already,
            self.sacct_skipped,
            self.sacct_failed,
            if sinks.is_empty() { "no sinks".to_string() } else { sinks.join(", ") },
            self.dropped
        )
    }

    /// Whether everything went through.
    pub fn complete(&self) -> bool {
        self.quarantined == 0
            && self.sacct_failed == 0
            && self.sacct_skipped == 0
            && self.pending.values().all(|n| *n == 0)
            && self.auth_refused.is_empty()
            && self.dropped == 0
    }
}
