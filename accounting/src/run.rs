//! `ergon run`: collect → upload (and sacct), with the state as write-ahead log.
//!
//! By default collection and upload are **pipelined**: the spools are scanned with
//! [`collect::scan_streaming`], which hands over each job as soon as all its manifests have been
//! read; every [`CHUNK`] jobs the new entries are appended to the state's journal and fsynced
//! (the write-ahead step), then handed to one uploader thread per sink, which sends them in its
//! own batches while the scan goes on. Results come back to this thread, which alone changes
//! the state, and are journalled too. sacct is written after the collection. With
//! [`RunOptions::sequential`] (and for `--dry-run`) a run collects everything first, saves the
//! whole state, then writes sacct and uploads: the path before pipelining.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::collect::{self, combine, FoundManifest, Streamed};
use crate::config::{Config, RetryConfig};
use crate::job::JobRecordFull;
use crate::sacct::{Sacct, SacctJob, SacctOutcome};
use crate::sinks::{
    deliver_batch, verify_and_repair, BatchResult, HttpIngest, Sink, Verify, VictoriaMetrics,
};
use crate::state::{Bounds, Delivery, JobEntry, Journal, JournalOp, RunLock, SinkStatus, State};

/// A sink the uploader threads can use.
pub type SharedSink = Box<dyn Sink + Send + Sync>;

/// Jobs per write-ahead chunk in a pipelined run: each chunk's entries are appended to the
/// journal and fsynced in one go before any of them is sent.
pub const CHUNK: usize = 1000;

/// The name sacct has among the destinations in the state.
pub const SACCT: &str = "sacct";

/// Options of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Change nothing: report what would be done.
    pub dry_run: bool,
    /// Show a progress bar (the caller checks for a TTY).
    pub progress: bool,
    /// Collect everything, save the whole state, then deliver (no pipelining; for comparison).
    pub sequential: bool,
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
            "collected {} new and {} updated jobs ({} manifests read, {} known unchanged), {} quarantined, {} unsettled, {} before horizon; sacct: {} written, {} already in place, {} skipped, {} pending; {}; {} dropped",
            self.collected,
            self.updated,
            self.manifests_read,
            self.manifests_known,
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

/// Saves the state at most every `every`, and always when asked to; appends to its journal in
/// between.
struct Saver<'a> {
    config: &'a Config,
    last: Instant,
    every: Duration,
    saves: u32,
    time: Duration,
    last_took: Duration,
    bytes_max: u64,
    /// The journal since the last save, once something was appended.
    journal: Option<Journal>,
    appends: u32,
    syncs: u32,
    journal_time: Duration,
    journal_bytes: u64,
}

impl Saver<'_> {
    fn new(config: &Config) -> Saver<'_> {
        Saver {
            config,
            last: Instant::now(),
            every: Duration::from_secs(2),
            saves: 0,
            time: Duration::ZERO,
            last_took: Duration::ZERO,
            bytes_max: 0,
            journal: None,
            appends: 0,
            syncs: 0,
            journal_time: Duration::ZERO,
            journal_bytes: 0,
        }
    }

    /// Save if `every` has passed since the last save, and at least ten times as long as the
    /// last save took: a state of 100,000 pending records is over 100 MB, and saving it every
    /// 2 s would take a large share of the run (each save is a full rewrite and an fsync). A
    /// crash between saves only makes the next run deliver those records again.
    fn maybe(&mut self, state: &mut State) -> Result<()> {
        if self.last.elapsed() >= self.every.max(self.last_took * 10) {
            self.now(state)?;
        }
        Ok(())
    }

    /// Save the whole state (a new generation; the journal goes).
    fn now(&mut self, state: &mut State) -> Result<()> {
        let start = Instant::now();
        self.end_journal();
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

    fn end_journal(&mut self) {
        if let Some(j) = self.journal.take() {
            self.journal_bytes += j.bytes;
        }
    }

    fn journal(&mut self, state: &State) -> Result<&mut Journal> {
        if self.journal.is_none() {
            self.journal = Some(Journal::create(&self.config.state_dir, state.generation)?);
        }
        Ok(self.journal.as_mut().expect("just created"))
    }

    /// Append the entries of `keys` to the journal and fsync: the write-ahead step.
    fn put(&mut self, state: &State, keys: &[String]) -> Result<()> {
        let start = Instant::now();
        let entries: Vec<(&str, &JobEntry)> = keys
            .iter()
            .filter_map(|k| state.jobs.get(k).map(|e| (k.as_str(), e)))
            .collect();
        self.journal(state)?.put(&entries, true)?;
        self.appends += 1;
        self.syncs += 1;
        self.journal_time += start.elapsed();
        Ok(())
    }

    /// Apply `op` to the state and append it to the journal, without fsync (losing it in a
    /// crash only makes the next run deliver those records again).
    fn op(&mut self, state: &mut State, op: JournalOp) -> Result<()> {
        let start = Instant::now();
        state.apply(&op);
        self.journal(state)?.append(&op, false)?;
        self.appends += 1;
        self.journal_time += start.elapsed();
        Ok(())
    }

    fn report(&mut self, timings: &mut RunTimings) {
        self.end_journal();
        timings.state_saves = self.saves;
        timings.state_save_time = self.time;
        timings.state_bytes_max = self.bytes_max;
        timings.journal_appends = self.appends;
        timings.journal_syncs = self.syncs;
        timings.journal_time = self.journal_time;
        timings.journal_bytes = self.journal_bytes;
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
    let sinks = build_sinks(config, options.dry_run)?;
    let mut saver = Saver::new(config);
    if state.replayed > 0 && !options.dry_run {
        tracing::warn!(
            "an earlier run was interrupted: replayed {} journal entries; records it may have sent are sent again",
            state.replayed
        );
        saver.now(&mut state)?;
    }

    accept_sent_without_verifier(&mut state, &sinks);
    let pruned = state.prune(bounds, now_unix_ns());
    summary.dropped += pruned.dropped_by_age + pruned.dropped_by_size;
    if options.dry_run || options.sequential {
        run_sequential(
            config,
            options,
            &mut state,
            &mut summary,
            &sinks,
            &mut saver,
            bounds,
        )?;
        if options.dry_run {
            return Ok(summary);
        }
    } else {
        summary.timings.pipelined = true;
        run_pipelined(
            config,
            options,
            &mut state,
            &mut summary,
            &sinks,
            &mut saver,
            bounds,
        )?;
        if config.sacct.enabled {
            let step = Instant::now();
            write_sacct(config, &mut state, &mut summary, &mut saver, options)?;
            summary.timings.sacct = step.elapsed();
        }
    }

    state.forget_delivered_bodies();
    state.last_run_unix = Some(now_unix());
    state.last_run_summary = Some(summary.line());
    saver.now(&mut state)?;
    saver.report(&mut summary.timings);
    summary.timings.total = started.elapsed();
    Ok(summary)
}

/// Records a sink accepted in an earlier run while it verified (`sent`) count as delivered once
/// it no longer verifies (`victoria_metrics.verify = false`: a 2xx is delivery); sending them
/// again would store them twice.
fn accept_sent_without_verifier(state: &mut State, sinks: &[SharedSink]) {
    for sink in sinks.iter().filter(|s| s.verifier().is_none()) {
        for entry in state.jobs.values_mut() {
            if let Some(d) = entry.sinks.get_mut(sink.name()) {
                if let Delivery::Sent { at_unix, .. } = *d {
                    *d = Delivery::Done { at_unix };
                }
            }
        }
    }
}

/// A new entry for `record`, or `None` when the job is in the state with the same key, or
/// ended before the horizon (counted).
fn new_entry(
    config: &Config,
    state: &State,
    sinks: &[SharedSink],
    summary: &mut RunSummary,
    key: &str,
    found: Vec<FoundManifest>,
    horizon_unix_ns: u64,
) -> Option<JobEntry> {
    let manifests: Vec<_> = found.into_iter().map(|f| f.manifest).collect();
    let record = combine(&manifests);
    let existing = state.jobs.get(key);
    if existing.is_some_and(|e| e.key == record.idempotency_key) {
        return None;
    }
    if existing.is_none() && record.end_unix_ns <= horizon_unix_ns {
        summary.skipped_before_horizon += 1;
        return None;
    }
    if existing.is_some() {
        summary.updated += 1;
    } else {
        summary.collected += 1;
    }
    Some(JobEntry {
        key: record.idempotency_key.clone(),
        collected_unix: now_unix(),
        end_unix_ns: record.end_unix_ns,
        sacct: config.sacct.enabled.then(Delivery::pending),
        sinks: sinks
            .iter()
            .map(|s| (s.name().to_owned(), Delivery::pending()))
            .collect(),
        record: Some(record),
    })
}

/// Collect everything, save the whole state (the write-ahead step), write sacct, then upload
/// sink by sink. `--dry-run` stops after collecting and prints what it would do.
fn run_sequential(
    config: &Config,
    options: RunOptions,
    state: &mut State,
    summary: &mut RunSummary,
    sinks: &[SharedSink],
    saver: &mut Saver<'_>,
    bounds: Bounds,
) -> Result<()> {
    // 1. Collect.
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
    let horizon = state.horizon_unix_ns;
    for (key, found) in scan.jobs {
        if let Some(entry) = new_entry(config, state, sinks, summary, &key, found, horizon) {
            state.jobs.insert(key, entry);
        }
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
        print_dry_run(config, state, sinks, summary);
        return Ok(());
    }
    saver.now(state)?;

    // 2. sacct.
    if config.sacct.enabled {
        let step = Instant::now();
        write_sacct(config, state, summary, saver, options)?;
        summary.timings.sacct = step.elapsed();
    }

    // 3. Upload.
    for sink in sinks {
        let step = Instant::now();
        upload(config, sink.as_ref(), state, summary, saver, options)?;
        summary
            .timings
            .upload
            .insert(sink.name().to_owned(), step.elapsed());
    }
    Ok(())
}

/// Records for an uploader: `cluster/job` and the record.
type Feed = Vec<(String, Arc<JobRecordFull>)>;

/// What an uploader thread reports.
enum Uploaded {
    /// Records delivered (for a verifying sink: found durable): `cluster/job` and idempotency
    /// key of each.
    Delivered {
        sink: usize,
        keys: Vec<(String, String)>,
    },
    /// A verifying sink accepted a batch; it is verified at the end of the upload.
    Accepted {
        sink: usize,
        keys: Vec<(String, String)>,
    },
    /// A batch did not go through; the sink sends nothing more this run.
    Stopped {
        sink: usize,
        keys: Vec<(String, String)>,
        error: String,
        auth: bool,
    },
    /// These records could not be verified (nor sent again) this run; they stay to be
    /// delivered, and the sink sends nothing more this run.
    Unverified {
        sink: usize,
        keys: Vec<(String, String)>,
        error: String,
    },
    /// The uploader is done, after this long.
    Finished { sink: usize, took: Duration },
}

/// Requests in flight per sink in a pipelined run. With one, the sink's server waits while
/// ergon prepares the next batch and ergon waits while the server works; with two, a server on
/// the same few cores (VictoriaMetrics creating new series) keeps them busy.
pub const LANES: usize = 2;

fn keys_of(items: &[(String, Arc<JobRecordFull>)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, r)| (k.clone(), r.idempotency_key.clone()))
        .collect()
}

/// Sleep for `wait` unless `stopped` is set (before or after): `false` to give up.
fn sleep_unless(stopped: &std::sync::atomic::AtomicBool, wait: Duration) -> bool {
    use std::sync::atomic::Ordering;
    if stopped.load(Ordering::Relaxed) {
        return false;
    }
    std::thread::sleep(wait);
    !stopped.load(Ordering::Relaxed)
}

/// Verify `items` with the sink's verifier and report what was found (see
/// [`verify_and_repair`]). Returns whether everything was found.
fn verify_items(
    index: usize,
    sink: &(dyn Sink + Send + Sync),
    verifier: &dyn Verify,
    items: &[(String, Arc<JobRecordFull>)],
    events: &Sender<Uploaded>,
    retry: &RetryConfig,
) -> bool {
    if items.is_empty() {
        return true;
    }
    let records: Vec<&JobRecordFull> = items.iter().map(|(_, r)| r.as_ref()).collect();
    let found = verify_and_repair(sink, verifier, &records, retry, &mut |wait| {
        std::thread::sleep(wait);
        true
    });
    let pick = |at: &[usize]| -> Vec<(String, String)> {
        at.iter()
            .map(|&i| (items[i].0.clone(), items[i].1.idempotency_key.clone()))
            .collect()
    };
    if !found.present.is_empty() {
        let _ = events.send(Uploaded::Delivered {
            sink: index,
            keys: pick(&found.present),
        });
    }
    if found.missing.is_empty() {
        return true;
    }
    let _ = events.send(Uploaded::Unverified {
        sink: index,
        keys: pick(&found.missing),
        error: found
            .error
            .unwrap_or_else(|| "the records are not all there".into()),
    });
    false
}

/// One uploader thread: send what comes on `feed` in batches of the sink's size until the feed
/// closes (a last, smaller batch then) or the sink stops, [`LANES`] batches at a time.
///
/// For a sink with a verifier (VictoriaMetrics), `backlog` (its records left by earlier runs,
/// sent or not) is verified and repaired first, which sends only what the sink does not hold
/// already; batches it accepts are reported [`Uploaded::Accepted`] and verified once the feed
/// is done.
fn uploader(
    index: usize,
    sink: &(dyn Sink + Send + Sync),
    backlog: Feed,
    feed: Receiver<Feed>,
    events: Sender<Uploaded>,
    retry: &RetryConfig,
    bar: ProgressBar,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let started = Instant::now();
    let size = sink.batch_size().max(1);
    let verifier = sink.verifier();
    let stopped = AtomicBool::new(false);
    if let Some(v) = verifier {
        let ok = verify_items(index, sink, v, &backlog, &events, retry);
        bar.inc(backlog.len() as u64);
        if !ok {
            stopped.store(true, Ordering::Relaxed);
        }
    }
    let verifying = verifier.is_some();
    let unsure = AtomicBool::new(false);
    let accepted: std::sync::Mutex<Feed> = Default::default();
    let (batches_tx, batches_rx) = mpsc::sync_channel::<Feed>(0);
    let batches_rx = std::sync::Mutex::new(batches_rx);
    std::thread::scope(|scope| {
        for _ in 0..LANES {
            let (events, bar, stopped, batches_rx, accepted, unsure) = (
                events.clone(),
                &bar,
                &stopped,
                &batches_rx,
                &accepted,
                &unsure,
            );
            scope.spawn(move || {
                // One batch at a time from the batcher (the lock is held only to take one).
                let next = || batches_rx.lock().ok().and_then(|rx| rx.recv().ok());
                while let Some(batch) = next() {
                    if stopped.load(Ordering::Relaxed) {
                        continue;
                    }
                    let records: Vec<&JobRecordFull> =
                        batch.iter().map(|(_, r)| r.as_ref()).collect();
                    let result = deliver_batch(sink, &records, retry, &mut |wait| {
                        sleep_unless(stopped, wait)
                    });
                    let keys = keys_of(&batch);
                    match result {
                        BatchResult::Delivered { .. } => {
                            bar.inc(keys.len() as u64);
                            let taken = if verifying {
                                if let Ok(mut a) = accepted.lock() {
                                    a.extend(batch);
                                }
                                events.send(Uploaded::Accepted { sink: index, keys })
                            } else {
                                events.send(Uploaded::Delivered { sink: index, keys })
                            };
                            if taken.is_err() {
                                // The run failed (its state cannot be written): what is sent
                                // now could not be recorded, so send nothing more.
                                stopped.store(true, Ordering::Relaxed);
                            }
                        }
                        BatchResult::Stopped {
                            error,
                            auth,
                            unknown,
                        } => {
                            if unknown {
                                // The sink may hold the batch, or get it late (a hung server
                                // applies queued requests when it resumes): what it holds is
                                // checked by the next run, not now.
                                unsure.store(true, Ordering::Relaxed);
                            }
                            // The event goes before the flag, so that the other lane's report
                            // of giving up because of it comes after it.
                            let _ = events.send(Uploaded::Stopped {
                                sink: index,
                                keys,
                                error,
                                auth,
                            });
                            stopped.store(true, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        let mut queue: std::collections::VecDeque<(String, Arc<JobRecordFull>)> =
            Default::default();
        let mut open = true;
        while !stopped.load(Ordering::Relaxed) {
            while open && queue.len() < size {
                match feed.recv() {
                    Ok(items) => queue.extend(items),
                    Err(_) => open = false,
                }
            }
            if queue.is_empty() {
                break;
            }
            let batch: Feed = queue.drain(..queue.len().min(size)).collect();
            if batches_tx.send(batch).is_err() {
                break;
            }
        }
        drop(batches_tx);
    });
    // What the sink accepted this run, verified (also after it stopped: what it took is kept),
    // unless a request went unanswered: the sink hangs or is gone, and asking it more would
    // only wait again. Then the records stay sent, and the next run checks them first.
    if let Some(v) = verifier {
        if !unsure.load(Ordering::Relaxed) {
            let accepted = accepted.into_inner().unwrap_or_default();
            verify_items(index, sink, v, &accepted, &events, retry);
        }
    }
    let _ = events.send(Uploaded::Finished {
        sink: index,
        took: started.elapsed(),
    });
}

/// The collecting side of a pipelined run: it alone changes the state.
struct Pipeline<'a, 'c> {
    config: &'a Config,
    sinks: &'a [SharedSink],
    state: &'a mut State,
    summary: &'a mut RunSummary,
    saver: &'a mut Saver<'c>,
    bounds: Bounds,
    horizon_unix_ns: u64,
    /// Per sink: its uploader's feed (`None` once it stopped).
    feeds: Vec<Option<Sender<Feed>>>,
    events: Receiver<Uploaded>,
    bars: Vec<ProgressBar>,
    multi: MultiProgress,
    progress: bool,
    backlog: u64,
    /// Entered, not yet journalled nor sent.
    chunk: Vec<String>,
    /// Time in `job` and `flush`.
    busy: Duration,
    /// Per sink: whether its stop was logged (a stop is logged once, however many requests
    /// were in flight).
    stop_logged: Vec<bool>,
}

impl Pipeline<'_, '_> {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.sinks.iter().map(|s| s.name())
    }

    /// The scan's plan: size and show the progress bars.
    fn planned(&mut self, jobs: usize) {
        for bar in &self.bars {
            bar.set_length(self.backlog + jobs as u64);
            if self.progress && self.backlog + jobs as u64 >= 100 {
                self.multi.add(bar.clone());
            }
        }
    }

    fn less_planned(&self) {
        for bar in &self.bars {
            bar.set_length(bar.length().unwrap_or(0).saturating_sub(1));
        }
    }

    /// A job from the scan: enter it; every [`CHUNK`] jobs, journal and send.
    fn job(&mut self, key: String, found: Vec<FoundManifest>) -> Result<()> {
        let start = Instant::now();
        let entry = new_entry(
            self.config,
            self.state,
            self.sinks,
            self.summary,
            &key,
            found,
            self.horizon_unix_ns,
        );
        match entry {
            None => self.less_planned(),
            Some(entry) => {
                self.state.jobs.insert(key.clone(), entry);
                // The age bound, as at the end of a sequential collection.
                let pruned = self.state.prune_entry(&key, self.bounds, now_unix_ns());
                if pruned.dropped_by_age > 0 {
                    self.summary.dropped += pruned.dropped_by_age;
                    self.less_planned();
                } else {
                    self.chunk.push(key);
                }
            }
        }
        if self.chunk.len() >= CHUNK {
            self.flush()?;
        }
        self.busy += start.elapsed();
        // Take in what the uploaders have done meanwhile.
        while let Ok(event) = self.events.try_recv() {
            self.uploaded(event)?;
        }
        Ok(())
    }

    /// Journal the chunk's entries (fsync), then hand them to the uploaders.
    fn flush(&mut self) -> Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.chunk);
        self.saver.put(self.state, &chunk)?;
        let feed: Feed = chunk
            .into_iter()
            .filter_map(|k| {
                let record = self.state.jobs.get(&k)?.record.clone()?;
                Some((k, Arc::new(record)))
            })
            .collect();
        self.send(|_| true, &feed);
        Ok(())
    }

    fn send(&mut self, to: impl Fn(usize) -> bool, feed: &Feed) {
        for (i, tx) in self.feeds.iter_mut().enumerate() {
            if !to(i) {
                continue;
            }
            if tx.as_ref().is_some_and(|tx| tx.send(feed.clone()).is_err()) {
                // The uploader stopped; its records stay pending.
                *tx = None;
            }
        }
    }

    /// Journal a failed attempt to deliver `keys` to `sink`.
    fn failed(&mut self, sink: usize, keys: Vec<(String, String)>, error: String) -> Result<()> {
        let name = self.sinks[sink].name().to_owned();
        let keys: Vec<String> = keys
            .into_iter()
            .filter(|(job, key)| self.state.jobs.get(job).is_some_and(|e| &e.key == key))
            .map(|(job, _)| job)
            .collect();
        let mut status: SinkStatus = self.state.sinks.get(&name).cloned().unwrap_or_default();
        status.last_error = Some(error.clone());
        status.last_error_unix = Some(now_unix());
        self.saver.op(
            self.state,
            JournalOp::Failed {
                sink: name,
                error,
                keys,
                status,
            },
        )
    }

    /// Apply what an uploader reports. A record counts only if the job's entry still has its
    /// key (a job collected again meanwhile has a new record, still to send).
    fn uploaded(&mut self, event: Uploaded) -> Result<()> {
        let current = |state: &State, keys: Vec<(String, String)>| -> Vec<String> {
            keys.into_iter()
                .filter(|(job, key)| state.jobs.get(job).is_some_and(|e| &e.key == key))
                .map(|(job, _)| job)
                .collect()
        };
        match event {
            Uploaded::Delivered { sink, keys } => {
                let name = self.sinks[sink].name().to_owned();
                let keys = current(self.state, keys);
                let mut status = self.state.sinks.get(&name).cloned().unwrap_or_default();
                status.last_success_unix = Some(now_unix());
                status.delivered_total += keys.len() as u64;
                *self.summary.delivered.entry(name.clone()).or_default() += keys.len();
                self.saver.op(
                    self.state,
                    JournalOp::Delivered {
                        sink: name,
                        at_unix: now_unix(),
                        keys,
                        status,
                    },
                )?;
            }
            Uploaded::Accepted { sink, keys } => {
                let name = self.sinks[sink].name().to_owned();
                let keys = current(self.state, keys);
                let status = self.state.sinks.get(&name).cloned().unwrap_or_default();
                self.saver.op(
                    self.state,
                    JournalOp::Sent {
                        sink: name,
                        at_unix: now_unix(),
                        keys,
                        status,
                    },
                )?;
            }
            Uploaded::Stopped {
                sink,
                keys,
                error,
                auth,
            } => {
                let name = self.sinks[sink].name().to_owned();
                if auth {
                    self.summary.auth_refused.push(name.clone());
                }
                if std::mem::replace(&mut self.stop_logged[sink], true) {
                    // Another request in flight failed too: said once already.
                    tracing::debug!("{name}: {error}");
                } else if auth {
                    tracing::error!(
                        "{name}: STOPPED: {error}. Nothing more is sent to this sink until this is fixed; its records stay pending"
                    );
                } else {
                    tracing::error!(
                        "{name}: {error}; the remaining records stay pending for the next run"
                    );
                }
                self.failed(sink, keys, error)?;
                self.feeds[sink] = None;
            }
            Uploaded::Unverified { sink, keys, error } => {
                let name = self.sinks[sink].name().to_owned();
                tracing::error!(
                    "{name}: {} records could not be verified: {error}; they stay pending, and the next run checks them again and sends what is missing",
                    keys.len()
                );
                self.stop_logged[sink] = true;
                self.failed(sink, keys, error)?;
                self.feeds[sink] = None;
            }
            Uploaded::Finished { sink, took } => {
                let name = self.sinks[sink].name().to_owned();
                self.summary.timings.upload.insert(name, took);
            }
        }
        Ok(())
    }
}

/// Collect and upload at once (see the module docs).
fn run_pipelined(
    config: &Config,
    options: RunOptions,
    state: &mut State,
    summary: &mut RunSummary,
    sinks: &[SharedSink],
    saver: &mut Saver<'_>,
    bounds: Bounds,
) -> Result<()> {
    let started = Instant::now();
    // The records left pending by earlier runs go first, oldest job first (a verifying sink
    // checks them before sending what is missing: see `uploader`).
    let mut backlogs: Vec<Feed> = sinks
        .iter()
        .map(|sink| {
            let mut keys = state.pending_for(sink.name());
            keys.sort_by_key(|k| state.jobs.get(k).map_or(0, |e| e.end_unix_ns));
            keys.into_iter()
                .filter_map(|k| {
                    let record = state.jobs.get(&k)?.record.clone()?;
                    Some((k, Arc::new(record)))
                })
                .collect()
        })
        .collect();
    let index = std::mem::take(&mut state.index);
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let bars: Vec<ProgressBar> = sinks
        .iter()
        .map(|s| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>18} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(s.name().to_owned());
            bar
        })
        .collect();
    let horizon_unix_ns = state.horizon_unix_ns;
    std::thread::scope(|scope| -> Result<()> {
        let (events_tx, events) = mpsc::channel();
        let backlog = backlogs.iter().map(Vec::len).max().unwrap_or(0) as u64;
        let mut feeds = Vec::new();
        for (i, sink) in sinks.iter().enumerate() {
            let (tx, rx) = mpsc::channel::<Feed>();
            let events = events_tx.clone();
            let bar = bars[i].clone();
            let sink: &(dyn Sink + Send + Sync) = sink.as_ref();
            let retry = &config.retry;
            let verify_first = if sink.verifier().is_some() {
                std::mem::take(&mut backlogs[i])
            } else {
                Feed::new()
            };
            scope.spawn(move || uploader(i, sink, verify_first, rx, events, retry, bar));
            feeds.push(Some(tx));
        }
        drop(events_tx);
        let mut pipe = Pipeline {
            config,
            sinks,
            state,
            summary,
            saver,
            bounds,
            horizon_unix_ns,
            feeds,
            events,
            bars: bars.clone(),
            multi,
            progress: options.progress,
            backlog,
            chunk: Vec::new(),
            busy: Duration::ZERO,
            stop_logged: vec![false; sinks.len()],
        };
        for (i, feed) in backlogs.iter().enumerate() {
            if !feed.is_empty() {
                pipe.send(|k| k == i, feed);
            }
        }
        let result = (|| -> Result<()> {
            let scan = collect::scan_streaming(
                &config.spool_dirs,
                Some(config.quarantine_dir.as_path()),
                Duration::from_secs(config.settle_s),
                &index,
                true,
                |found| match found {
                    Streamed::Planned(jobs) => {
                        pipe.planned(jobs);
                        Ok(())
                    }
                    Streamed::Job(key, found) => pipe.job(key, found),
                },
            )?;
            let start = Instant::now();
            pipe.flush()?;
            pipe.busy += start.elapsed();
            pipe.summary.timings.scan = started.elapsed();
            pipe.summary.timings.combine = pipe.busy;
            pipe.summary.quarantined = scan.quarantined.len();
            pipe.summary.unsettled = scan.unsettled;
            pipe.summary.manifests_read = scan.read;
            pipe.summary.manifests_known = scan.known;
            pipe.state.dropped.skipped_before_horizon = pipe.summary.skipped_before_horizon as u64;
            // The spool index: the good files of the jobs the state has (see run_sequential).
            let jobs = &pipe.state.jobs;
            pipe.state.index = scan
                .index
                .into_iter()
                .filter(|f| jobs.contains_key(&f.entry.job))
                .map(|f| (f.path, f.entry))
                .collect();
            Ok(())
        })();
        // Close the feeds (on an error too: the uploaders finish what they have, and what
        // they deliver is taken in before the error is returned).
        for feed in &mut pipe.feeds {
            *feed = None;
        }
        while let Ok(event) = pipe.events.recv() {
            pipe.uploaded(event)?;
        }
        result?;
        let names: Vec<String> = pipe.names().map(str::to_owned).collect();
        for name in names {
            pipe.summary.delivered.entry(name.clone()).or_default();
            let pending = pipe.state.pending_for(&name).len();
            let unverified = pipe.state.sent_for(&name);
            pipe.summary.pending.insert(name.clone(), pending);
            pipe.summary.unverified.insert(name, unverified);
        }
        Ok(())
    })?;
    for bar in &bars {
        bar.finish_and_clear();
    }
    let pruned = state.prune(bounds, now_unix_ns());
    summary.dropped += pruned.dropped_by_age + pruned.dropped_by_size;
    Ok(())
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
        for (n, chunk) in jobs.chunks(50).enumerate() {
            let list: Vec<SacctJob> = chunk.iter().map(|(_, j)| j.clone()).collect();
            let outcomes = match sacct.write(&cluster, &list, &|| progress.inc(1)) {
                Ok(o) => o,
                Err(error) => {
                    // sacct cannot be read: the other chunks would wait just as long. Said once.
                    let left = jobs.len() - n * 50;
                    tracing::error!(
                        "sacct: {error}; no more sacct records are written for cluster {cluster} this run: {left} stay pending"
                    );
                    summary.sacct_failed += left;
                    let status = state.sinks.entry(SACCT.to_owned()).or_default();
                    status.last_error = Some(error.clone());
                    status.last_error_unix = Some(now_unix());
                    for (key, _) in chunk {
                        if let Some(entry) = state.jobs.get_mut(key) {
                            entry
                                .sacct
                                .get_or_insert_with(Delivery::pending)
                                .failed(&error);
                        }
                    }
                    progress.inc(left as u64);
                    break;
                }
            };
            let status = state.sinks.entry(SACCT.to_owned()).or_default();
            for ((key, job), outcome) in chunk.iter().zip(outcomes) {
                let Some(entry) = state.jobs.get_mut(key) else {
                    continue;
                };
                let delivery = entry.sacct.get_or_insert_with(Delivery::pending);
                match outcome {
                    SacctOutcome::Written { already } => {
                        *delivery = Delivery::Done {
                            at_unix: now_unix(),
                        };
                        if already {
                            summary.sacct_already += 1;
                        } else {
                            summary.sacct_written += 1;
                        }
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

/// How a batch of the sequential upload ended: `Err((error, credentials refused))`.
type BatchOutcome = Result<(), (String, bool)>;

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
    // What went through and what did not, as batches (keys, outcome).
    let mut results: Vec<(Vec<String>, BatchOutcome)> = Vec::new();
    if let Some(verifier) = sink.verifier() {
        // Verify first, then send only what the sink does not hold (everything, for records
        // never sent), and verify again.
        let keyed: Vec<(&String, &JobRecordFull)> = pending
            .iter()
            .filter_map(|k| Some((k, state.jobs.get(k)?.record.as_ref()?)))
            .collect();
        let records: Vec<&JobRecordFull> = keyed.iter().map(|(_, r)| *r).collect();
        let found = verify_and_repair(sink, verifier, &records, &config.retry, &mut |wait| {
            std::thread::sleep(wait);
            true
        });
        let pick = |at: &[usize]| at.iter().map(|&i| keyed[i].0.clone()).collect::<Vec<_>>();
        results.push((pick(&found.present), Ok(())));
        if !found.missing.is_empty() {
            let error = found
                .error
                .unwrap_or_else(|| "the records are not all there".into());
            results.push((pick(&found.missing), Err((error, false))));
        }
    } else {
        for batch_keys in pending.chunks(sink.batch_size()) {
            let records: Vec<_> = batch_keys
                .iter()
                .filter_map(|k| state.jobs.get(k).and_then(|e| e.record.as_ref()))
                .collect();
            let result = deliver_batch(sink, &records, &config.retry, &mut |wait| {
                std::thread::sleep(wait);
                true
            });
            let stopped = matches!(result, BatchResult::Stopped { .. });
            results.push((
                batch_keys.to_vec(),
                match result {
                    BatchResult::Delivered { .. } => Ok(()),
                    BatchResult::Stopped { error, auth, .. } => Err((error, auth)),
                },
            ));
            if stopped {
                break;
            }
        }
    }
    for (batch_keys, result) in results {
        let status: &mut SinkStatus = state.sinks.entry(name.clone()).or_default();
        match result {
            Ok(()) => {
                status.last_success_unix = Some(now_unix());
                status.delivered_total += batch_keys.len() as u64;
                for key in &batch_keys {
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
            Err((error, auth)) => {
                status.last_error = Some(error.clone());
                status.last_error_unix = Some(now_unix());
                for key in &batch_keys {
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
                        "{name}: {error}; {} records stay pending for the next run",
                        batch_keys.len()
                    );
                }
            }
        }
        saver.maybe(state)?;
    }
    progress.finish_and_clear();
    summary.delivered.insert(name.clone(), delivered);
    summary
        .pending
        .insert(name.clone(), state.pending_for(&name).len());
    summary
        .unverified
        .insert(name.clone(), state.sent_for(&name));
    Ok(())
}

fn print_dry_run(config: &Config, state: &State, sinks: &[SharedSink], summary: &RunSummary) {
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
