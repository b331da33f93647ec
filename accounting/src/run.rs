//! `ergon run`: collect → sacct → upload, with the state as write-ahead log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::collect::{self, combine};
use crate::config::Config;
use crate::sacct::{Sacct, SacctJob, SacctOutcome};
use crate::sinks::{deliver_batch, BatchResult, HttpIngest, Sink, VictoriaMetrics};
use crate::state::{Bounds, Delivery, JobEntry, RunLock, SinkStatus, State};

/// The name sacct has among the destinations in the state.
pub const SACCT: &str = "sacct";

/// Options of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Change nothing: report what would be done.
    pub dry_run: bool,
    /// Show a progress bar (the caller checks for a TTY).
    pub progress: bool,
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
    /// sacct records written (or found already in place).
    pub sacct_written: usize,
    /// sacct records skipped on purpose (foreign content).
    pub sacct_skipped: usize,
    /// sacct records left pending.
    pub sacct_failed: usize,
    /// Per sink: records delivered this run.
    pub delivered: BTreeMap<String, usize>,
    /// Per sink: records still pending after this run.
    pub pending: BTreeMap<String, usize>,
    /// Sinks that refused credentials.
    pub auth_refused: Vec<String>,
    /// Entries dropped by the bounds this run with deliveries pending.
    pub dropped: usize,
    /// Manifest files read and verified this run.
    pub manifests_read: usize,
    /// Manifest files not read because the spool index knew them unchanged.
    pub manifests_known: usize,
    /// Where the run's time went (for the debug log and benchmarks).
    pub timings: RunTimings,
}

/// Wall-clock time of each step of a run, and the state saves.
#[derive(Debug, Default, Clone)]
pub struct RunTimings {
    /// Reading the state file.
    pub load_state: Duration,
    /// Listing the spools and reading, parsing and verifying the manifests not in the spool
    /// index (`collect::scan_indexed`).
    pub scan: Duration,
    /// Combining the manifests into job records and entering them in the state (with pruning).
    pub combine: Duration,
    /// Writing sacct records (state saves included).
    pub sacct: Duration,
    /// Per sink: uploading (state saves included).
    pub upload: BTreeMap<String, Duration>,
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
    /// One line for logs and the state.
    pub fn line(&self) -> String {
        let sinks: Vec<String> = self
            .delivered
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}: {v} delivered, {} pending",
                    self.pending.get(k).copied().unwrap_or(0)
                )
            })
            .collect();
        format!(
            "collected {} new and {} updated jobs ({} manifests read, {} known unchanged), {} quarantined, {} unsettled, {} before horizon; sacct: {} written, {} skipped, {} pending; {}; {} dropped",
            self.collected,
            self.updated,
            self.manifests_read,
            self.manifests_known,
            self.quarantined,
            self.unsettled,
            self.skipped_before_horizon,
            self.sacct_written,
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

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn bar(enabled: bool, len: usize, what: &str) -> ProgressBar {
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
pub fn build_sinks(config: &Config) -> Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(vm) = &config.victoria_metrics {
        sinks.push(Box::new(
            VictoriaMetrics::new(vm).context("setting up the victoria_metrics sink")?,
        ));
    }
    if let Some(http) = &config.http {
        sinks.push(Box::new(
            HttpIngest::new(http).context("setting up the http sink")?,
        ));
    }
    Ok(sinks)
}

/// Saves the state at most every `every`, and always when asked to.
struct Saver<'a> {
    config: &'a Config,
    last: Instant,
    every: Duration,
    saves: u32,
    time: Duration,
    last_took: Duration,
    bytes_max: u64,
}

impl Saver<'_> {
    /// Save if `every` has passed since the last save, and at least ten times as long as the
    /// last save took: a state of 100,000 pending records is over 100 MB, and saving it every
    /// 2 s would take a large share of the run (each save is a full rewrite and an fsync). A
    /// crash between saves only makes the next run deliver those records again.
    fn maybe(&mut self, state: &State) -> Result<()> {
        if self.last.elapsed() >= self.every.max(self.last_took * 10) {
            self.now(state)?;
        }
        Ok(())
    }
    fn now(&mut self, state: &State) -> Result<()> {
        let start = Instant::now();
        state.save(&self.config.state_dir)?;
        self.last = Instant::now();
        self.saves += 1;
        self.last_took = self.last - start;
        self.time += self.last_took;
        if let Ok(meta) = std::fs::metadata(State::path(&self.config.state_dir)) {
            self.bytes_max = self.bytes_max.max(meta.len());
        }
        Ok(())
    }
}

/// One `ergon run`. Fails with [`crate::state::LockError::Busy`] (inside the anyhow error) when
/// another run holds the lock.
pub fn run(config: &Config, options: RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let mut summary = RunSummary::default();
    if !options.dry_run {
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!(
                "creating the state directory {}",
                config.state_dir.display()
            )
        })?;
    }
    let _lock = if options.dry_run {
        None
    } else {
        Some(RunLock::try_acquire(&config.state_dir)?)
    };
    let mut state = State::load(&config.state_dir)?;
    summary.timings.load_state = started.elapsed();
    let bounds = Bounds {
        max_age_s: config.state.max_age_days.saturating_mul(86_400),
        max_jobs: config.state.max_jobs,
    };
    let sinks = build_sinks(config)?;
    let mut saver = Saver {
        config,
        last: Instant::now(),
        every: Duration::from_secs(2),
        saves: 0,
        time: Duration::ZERO,
        last_took: Duration::ZERO,
        bytes_max: 0,
    };

    // 1. Collect.
    let pruned = state.prune(bounds, now_unix_ns());
    summary.dropped += pruned.dropped_by_age + pruned.dropped_by_size;
    let step = Instant::now();
    let scan = collect::scan_indexed(
        &config.spool_dirs,
        (!options.dry_run).then_some(config.quarantine_dir.as_path()),
        Duration::from_secs(config.settle_s),
        &state.index,
    )?;
    summary.timings.scan = step.elapsed();
    let step = Instant::now();
    summary.quarantined = scan.quarantined.len();
    summary.unsettled = scan.unsettled;
    summary.manifests_read = scan.read;
    summary.manifests_known = scan.known;
    for (key, found) in scan.jobs {
        let manifests: Vec<_> = found.into_iter().map(|f| f.manifest).collect();
        let record = combine(&manifests);
        let existing = state.jobs.get(&key);
        if existing.is_some_and(|e| e.key == record.idempotency_key) {
            continue;
        }
        if existing.is_none() && record.end_unix_ns <= state.horizon_unix_ns {
            summary.skipped_before_horizon += 1;
            continue;
        }
        if existing.is_some() {
            summary.updated += 1;
        } else {
            summary.collected += 1;
        }
        let entry = JobEntry {
            key: record.idempotency_key.clone(),
            collected_unix: now_unix(),
            end_unix_ns: record.end_unix_ns,
            sacct: config.sacct.enabled.then(Delivery::pending),
            sinks: sinks
                .iter()
                .map(|s| (s.name().to_owned(), Delivery::pending()))
                .collect(),
            record: Some(record),
        };
        state.jobs.insert(key, entry);
    }
    state.dropped.skipped_before_horizon = summary.skipped_before_horizon as u64;
    // The spool index: the good files of the jobs the state has (prune keeps it to those).
    // Files of jobs not entered (before the horizon) are read again next run.
    state.index = scan
        .index
        .into_iter()
        .filter(|f| state.jobs.contains_key(&f.entry.job))
        .map(|f| (f.path, f.entry))
        .collect();
    let pruned = state.prune(bounds, now_unix_ns());
    summary.dropped += pruned.dropped_by_age + pruned.dropped_by_size;
    summary.timings.combine = step.elapsed();

    if options.dry_run {
        print_dry_run(config, &state, &sinks, &summary);
        return Ok(summary);
    }
    saver.now(&state)?;

    // 2. sacct.
    if config.sacct.enabled {
        let step = Instant::now();
        write_sacct(config, &mut state, &mut summary, &mut saver, options)?;
        summary.timings.sacct = step.elapsed();
    }

    // 3. Upload.
    for sink in &sinks {
        let step = Instant::now();
        upload(
            config,
            sink.as_ref(),
            &mut state,
            &mut summary,
            &mut saver,
            options,
        )?;
        summary
            .timings
            .upload
            .insert(sink.name().to_owned(), step.elapsed());
    }

    state.forget_delivered_bodies();
    state.last_run_unix = Some(now_unix());
    state.last_run_summary = Some(summary.line());
    saver.now(&state)?;
    summary.timings.state_saves = saver.saves;
    summary.timings.state_save_time = saver.time;
    summary.timings.state_bytes_max = saver.bytes_max;
    summary.timings.total = started.elapsed();
    Ok(summary)
}

fn write_sacct(
    config: &Config,
    state: &mut State,
    summary: &mut RunSummary,
    saver: &mut Saver<'_>,
    options: RunOptions,
) -> Result<()> {
    let sacct = Sacct::new(config.sacct.clone());
    let pending = state.pending_for(SACCT);
    let progress = bar(options.progress, pending.len(), "sacct");
    let mut by_cluster: BTreeMap<String, Vec<(String, SacctJob)>> = BTreeMap::new();
    for key in pending {
        let Some(record) = state.jobs.get(&key).and_then(|e| e.record.as_ref()) else {
            continue;
        };
        by_cluster.entry(record.cluster.clone()).or_default().push((
            key.clone(),
            SacctJob {
                cluster: record.cluster.clone(),
                job_id: record.job_id,
                record: record.sacct_record(),
            },
        ));
    }
    for (cluster, jobs) in by_cluster {
        for chunk in jobs.chunks(50) {
            let list: Vec<SacctJob> = chunk.iter().map(|(_, j)| j.clone()).collect();
            let outcomes = sacct.write(&cluster, &list, &|| progress.inc(1));
            let status = state.sinks.entry(SACCT.to_owned()).or_default();
            for ((key, job), outcome) in chunk.iter().zip(outcomes) {
                let Some(entry) = state.jobs.get_mut(key) else {
                    continue;
                };
                let delivery = entry.sacct.get_or_insert_with(Delivery::pending);
                match outcome {
                    SacctOutcome::Written { .. } => {
                        *delivery = Delivery::Done {
                            at_unix: now_unix(),
                        };
                        summary.sacct_written += 1;
                        status.last_success_unix = Some(now_unix());
                        status.delivered_total += 1;
                    }
                    SacctOutcome::Skipped(reason) => {
                        tracing::warn!("sacct: job {}: {reason}", job.job_id);
                        *delivery = Delivery::Skipped { reason };
                        summary.sacct_skipped += 1;
                    }
                    SacctOutcome::Failed(error) => {
                        tracing::error!("sacct: job {}: {error}", job.job_id);
                        status.last_error = Some(error.clone());
                        status.last_error_unix = Some(now_unix());
                        delivery.failed(error);
                        summary.sacct_failed += 1;
                    }
                }
            }
            saver.maybe(state)?;
        }
    }
    progress.finish_and_clear();
    Ok(())
}

fn upload(
    config: &Config,
    sink: &dyn Sink,
    state: &mut State,
    summary: &mut RunSummary,
    saver: &mut Saver<'_>,
    options: RunOptions,
) -> Result<()> {
    let name = sink.name().to_owned();
    let mut pending = state.pending_for(&name);
    pending.sort_by_key(|k| state.jobs.get(k).map_or(0, |e| e.end_unix_ns));
    let progress = bar(options.progress, pending.len(), &name);
    let mut delivered = 0;
    let mut stopped = false;
    for batch_keys in pending.chunks(sink.batch_size()) {
        let records: Vec<_> = batch_keys
            .iter()
            .filter_map(|k| state.jobs.get(k).and_then(|e| e.record.as_ref()))
            .collect();
        let result = deliver_batch(sink, &records, &config.retry, &mut std::thread::sleep);
        let status: &mut SinkStatus = state.sinks.entry(name.clone()).or_default();
        match result {
            BatchResult::Delivered { .. } => {
                status.last_success_unix = Some(now_unix());
                status.delivered_total += batch_keys.len() as u64;
                for key in batch_keys {
                    let Some(entry) = state.jobs.get_mut(key) else {
                        continue;
                    };
                    if let Some(d) = entry.sinks.get_mut(&name) {
                        *d = Delivery::Done {
                            at_unix: now_unix(),
                        };
                    }
                    // Delivered everywhere: the body is no longer needed, and dropping it now
                    // keeps the state saves during a large upload small (the WAL only needs the
                    // bodies of pending deliveries).
                    if !entry.any_pending() {
                        entry.record = None;
                    }
                }
                delivered += batch_keys.len();
                progress.inc(batch_keys.len() as u64);
            }
            BatchResult::Stopped { error, auth } => {
                status.last_error = Some(error.clone());
                status.last_error_unix = Some(now_unix());
                for key in batch_keys {
                    if let Some(d) = state.jobs.get_mut(key).and_then(|e| e.sinks.get_mut(&name)) {
                        d.failed(error.clone());
                    }
                }
                if auth {
                    tracing::error!(
                        "{name}: STOPPED: {error}. Nothing more is sent to this sink until this is fixed; its records stay pending"
                    );
                    summary.auth_refused.push(name.clone());
                } else {
                    tracing::error!(
                        "{name}: {error}; the remaining records stay pending for the next run"
                    );
                }
                stopped = true;
            }
        }
        saver.maybe(state)?;
        if stopped {
            break;
        }
    }
    progress.finish_and_clear();
    summary.delivered.insert(name.clone(), delivered);
    summary
        .pending
        .insert(name.clone(), state.pending_for(&name).len());
    Ok(())
}

fn print_dry_run(config: &Config, state: &State, sinks: &[Box<dyn Sink>], summary: &RunSummary) {
    println!("dry run: nothing is written, moved or sent");
    println!(
        "collect: {} new jobs, {} updated, {} bad manifests (would be quarantined), {} unsettled, {} before the horizon",
        summary.collected, summary.updated, summary.quarantined, summary.unsettled, summary.skipped_before_horizon
    );
    if config.sacct.enabled {
        let pending = state.pending_for(SACCT);
        println!(
            "sacct: {} records to write into {}",
            pending.len(),
            config.sacct.field.name()
        );
        for key in pending.iter().take(10) {
            if let Some(r) = state.jobs.get(key).and_then(|e| e.record.as_ref()) {
                println!("  {key}: {}", r.sacct_record().encode());
            }
        }
    }
    for sink in sinks {
        let n = state.pending_for(sink.name()).len();
        println!(
            "{}: {n} records in {} batches",
            sink.name(),
            n.div_ceil(sink.batch_size())
        );
    }
}
