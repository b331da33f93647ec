//! The pipelined run (the default; see the module docs of [`super`]): the scan hands each job over
//! as soon as it is read, one uploader thread per sink sends while the scan goes on, and the
//! collecting side alone changes the state.

use std::collections::BTreeSet;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::collect::{self, FoundManifest, Streamed};
use crate::config::{Config, RetryConfig};
use crate::job::JobRecordFull;
use crate::ledger::Ledger;
use crate::sinks::{deliver_batch, verify_and_repair, BatchResult, Sink, Verify};
use crate::state::{Bounds, JournalOp, SinkStatus, State};

use super::common::{keep_ledger_files, new_entry, now_unix, now_unix_ns, Entered, SharedSink};
use super::saver::Saver;
use super::seal::ToSeal;
use super::summary::{RunOptions, RunSummary};

/// Jobs per write-ahead chunk in a pipelined run: each chunk's entries are appended to the
/// journal and fsynced in one go before any of them is sent.
pub const CHUNK: usize = 1000;
/// Records for an uploader: `cluster/job` and the record (shared with the job's state entry).
type Feed = Vec<(String, Arc<JobRecordFull>)>;
/// Chunks waiting for an uploader before the scan waits for it: the scan runs ahead of the
/// slowest sink by this much, not by the whole run (whose records would otherwise pile up in
/// the channel).
const FEED_AHEAD: usize = 2;

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
/// already; batches it accepts are reported [`Uploaded::Accepted`] and verified every
/// [`Verify::every`] records (`victoria_metrics.verify_every`, by the lane whose batch reached
/// it: what is found durable is delivered, and its body freed, as the run goes) and once the
/// feed is done.
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
    drop(backlog);
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
                            let mut due = Feed::new();
                            // Asked here: the outer `verifier` cannot cross threads (`dyn Verify` is not `Sync`).
                            let verifier = sink.verifier();
                            let taken = match verifier {
                                Some(v) => {
                                    // Reported under the lock, so that the batch is known as
                                    // sent before another lane's verification reports it (a
                                    // poisoned lock still holds a plain list).
                                    let mut a = accepted
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                                    a.extend(batch);
                                    let taken =
                                        events.send(Uploaded::Accepted { sink: index, keys });
                                    if a.len() >= v.every()
                                        && !unsure.load(Ordering::Relaxed)
                                        && !stopped.load(Ordering::Relaxed)
                                    {
                                        due = std::mem::take(&mut *a);
                                    }
                                    taken
                                }
                                None => events.send(Uploaded::Delivered { sink: index, keys }),
                            };
                            if taken.is_err() {
                                // The run failed (its state cannot be written): what is sent
                                // now could not be recorded, so send nothing more.
                                stopped.store(true, Ordering::Relaxed);
                            }
                            if let (Some(v), false) = (verifier, due.is_empty()) {
                                if !verify_items(index, sink, v, &due, &events, retry) {
                                    stopped.store(true, Ordering::Relaxed);
                                }
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
        // A stopped sink takes nothing more: the scan must not wait for it (its records stay
        // pending for the next run).
        drop(feed);
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
    factors: Option<&'a crate::carbon::Factors>,
    state: &'a mut State,
    /// The delivered jobs, inside one read transaction for the scan.
    ledger: &'a Ledger,
    summary: &'a mut RunSummary,
    saver: &'a mut Saver<'c>,
    bounds: Bounds,
    horizon_unix_ns: u64,
    /// Per sink: its uploader's feed (`None` once it stopped), [`FEED_AHEAD`] chunks deep.
    feeds: Vec<Option<SyncSender<Feed>>>,
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
    /// The manifests read of jobs skipped before the horizon (for sealing).
    before_horizon: BTreeSet<String>,
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
            self.ledger,
            self.sinks,
            self.summary,
            &key,
            found,
            self.horizon_unix_ns,
            self.factors,
        )?;
        match entry {
            Entered::Known => self.less_planned(),
            Entered::BeforeHorizon(paths) => {
                self.before_horizon.extend(
                    paths
                        .into_iter()
                        .filter_map(|p| p.into_os_string().into_string().ok()),
                );
                self.less_planned();
            }
            Entered::Entry(entry) => {
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
                Some((k, record))
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
#[allow(clippy::too_many_arguments)]
pub(super) fn run_pipelined(
    config: &Config,
    options: RunOptions,
    state: &mut State,
    summary: &mut RunSummary,
    sinks: &[SharedSink],
    saver: &mut Saver<'_>,
    ledger: &mut Ledger,
    bounds: Bounds,
    factors: Option<&crate::carbon::Factors>,
) -> Result<Option<ToSeal>> {
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
                    Some((k, record))
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
    // The files the state's index does not name are looked up in the ledger (delivered jobs),
    // and so are the jobs handed over, all in one read transaction.
    ledger.begin_read()?;
    // Sealed directories are not listed (see `crate::spool::Sealed`), unless asked.
    let seals = if options.rescan {
        crate::spool::Seals::new()
    } else {
        ledger.seals()?
    };
    let mut sealing_out = None;
    let sealing_found = &mut sealing_out;
    let mut fresh = (Vec::new(), Vec::new());
    let shared: &Ledger = ledger;
    let fresh_out = &mut fresh;
    std::thread::scope(|scope| -> Result<()> {
        let (events_tx, events) = mpsc::channel();
        let backlog = backlogs.iter().map(Vec::len).max().unwrap_or(0) as u64;
        let mut feeds = Vec::new();
        for (i, sink) in sinks.iter().enumerate() {
            let (tx, rx) = mpsc::sync_channel::<Feed>(FEED_AHEAD);
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
            factors,
            state,
            ledger: shared,
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
            before_horizon: BTreeSet::new(),
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
                Some(&mut |paths: &[&str]| Ok(shared.files(paths)?)),
                true,
                Some(collect::Sealing {
                    seals: &seals,
                    files_of_jobs: &mut |jobs: &[&str]| Ok(shared.files_of_jobs(jobs)?),
                }),
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
            *fresh_out = (scan.fresh, scan.gone);
            if let Some(s) = &scan.sealing {
                (
                    pipe.summary.dirs_skipped,
                    pipe.summary.manifests_in_skipped_dirs,
                ) = s.skipped;
            }
            *sealing_found = scan.sealing.map(|found| ToSeal {
                found,
                before_horizon: std::mem::take(&mut pipe.before_horizon),
            });
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
    ledger.end_read()?;
    keep_ledger_files(ledger, state, fresh.0, fresh.1)?;
    for bar in &bars {
        bar.finish_and_clear();
    }
    let pruned = state.prune(bounds, now_unix_ns());
    summary.dropped += pruned.dropped_by_age + pruned.dropped_by_size;
    Ok(sealing_out)
}
