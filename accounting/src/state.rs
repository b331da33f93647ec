//! The state directory: which jobs were collected and, per sink, which were delivered. It is
//! ergon's write-ahead log: a record enters it (durably) before any delivery is attempted, and
//! leaves it only once every sink has it or when a bound drops it, which is counted.
//!
//! The state is one JSON file, `state.json`, replaced atomically (write a temporary file, fsync,
//! rename over the old one, fsync the directory), so a crash leaves either the old or the new
//! state, never a mix. A crash after a delivery but before the save makes the next run deliver
//! again: delivery is at least once, and every record carries an idempotency key. A delivery is
//! *done* only when the destination has the record durably; a sink whose acceptance does not
//! mean that (VictoriaMetrics) leaves it [`Delivery::Sent`] until a read-back confirms it.
//!
//! Between two saves a run can append to a [`Journal`] (`journal.jsonl`) instead of rewriting
//! the whole file: the entries of newly collected jobs (fsynced before any of them is sent) and
//! what became of each delivery. Each save numbers the state ([`State::generation`]) and
//! removes the journal; a journal names the generation it follows, and [`State::load`] replays
//! it only onto that one (a journal left by a crash between a save and its removal is stale and
//! ignored). A line cut short by a crash is ignored: nothing it held was sent.
//!
//! Bounds: entries whose job ended more than `max_age` ago, and the oldest entries beyond
//! `max_jobs`, are removed. Removing an entry that still had a delivery pending is counted in
//! [`Dropped`] and shown by `ergon status`. The end time of the newest removed entry becomes the
//! *horizon*: manifests of jobs that ended at or before it are not collected again (they would
//! otherwise be delivered a second time, since their entry is gone), and are counted as skipped.
//!
//! The state also holds the *spool index* ([`State::index`]): every manifest file collected,
//! by path, with its size, modification time, content hash and job. A run skips a file whose
//! size and modification time are unchanged without reading it (see [`crate::collect`]). The
//! index only names jobs that have an entry, so the bounds above bound it too: removing a job
//! removes its files from the index (such a file, if still in the spool, is read again and
//! skipped by the horizon). Losing the index costs only time: the next run reads every file.
//!
//! Jobs whose every delivery is done leave the state, with their index entries, for the
//! [`crate::ledger`] at the end of each run (the ledger commits first, then the state is saved
//! without them), so the state holds only what is pending; everything that asks whether a job
//! or a file was collected asks the ledger too, and the state's entries win.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ergon_protocol::durable;
use serde::{Deserialize, Serialize};

use crate::job::JobRecordFull;
use crate::spool::IndexEntry;

/// The state file's format version.
pub const STATE_VERSION: u32 = 1;

/// Whether a record has reached one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Delivery {
    /// Not yet; `attempts` runs tried.
    Pending {
        /// Runs that tried and failed.
        attempts: u32,
        /// The last failure.
        last_error: Option<String>,
    },
    /// Accepted by a sink whose acceptance does not mean durable (VictoriaMetrics), at this time
    /// (Unix seconds), and not yet found there by a read-back after a flush to disk. Still to be
    /// delivered: the next verification either finds it (then `done`) or sends what is missing.
    Sent {
        /// When the sink accepted it.
        at_unix: u64,
        /// Why the last verification did not confirm it, if one failed.
        last_error: Option<String>,
    },
    /// Delivered at this time (Unix seconds).
    Done {
        /// When.
        at_unix: u64,
    },
    /// Will not be delivered, on purpose (e.g. sacct: foreign content that sacctmgr would
    /// damage). Not retried; shown by `ergon status`.
    Skipped {
        /// Why.
        reason: String,
    },
}

impl Delivery {
    /// A fresh pending delivery.
    pub fn pending() -> Self {
        Delivery::Pending {
            attempts: 0,
            last_error: None,
        }
    }

    /// Whether it is still to be done ([`Delivery::Pending`] or [`Delivery::Sent`]).
    pub fn is_pending(&self) -> bool {
        matches!(self, Delivery::Pending { .. } | Delivery::Sent { .. })
    }

    /// Whether the sink accepted it but it is not verified yet.
    pub fn is_sent(&self) -> bool {
        matches!(self, Delivery::Sent { .. })
    }

    /// Record a failed attempt (for a record already sent: a verification that did not confirm
    /// it; it stays sent).
    pub fn failed(&mut self, error: impl Into<String>) {
        if let Delivery::Sent { last_error, .. } = self {
            *last_error = Some(error.into());
            return;
        }
        let attempts = match self {
            Delivery::Pending { attempts, .. } => *attempts + 1,
            _ => 1,
        };
        *self = Delivery::Pending {
            attempts,
            last_error: Some(error.into()),
        };
    }
}

/// One job in the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    /// The record's idempotency key.
    pub key: String,
    /// When it was collected (Unix seconds).
    pub collected_unix: u64,
    /// The job's end (Unix ns), which the age bound uses.
    pub end_unix_ns: u64,
    /// The record, kept while any delivery is pending (shared with the uploaders' feeds in a
    /// pipelined run, so that a record in flight is held once).
    pub record: Option<Arc<JobRecordFull>>,
    /// The sacct write (absent when sacct is disabled).
    pub sacct: Option<Delivery>,
    /// Per sink name.
    pub sinks: BTreeMap<String, Delivery>,
}

impl JobEntry {
    /// The delivery to `sink` (`"sacct"` for sacct), if the entry has one.
    pub fn delivery_mut(&mut self, sink: &str) -> Option<&mut Delivery> {
        if sink == "sacct" {
            self.sacct.as_mut()
        } else {
            self.sinks.get_mut(sink)
        }
    }

    /// Whether anything is still to be delivered.
    pub fn any_pending(&self) -> bool {
        self.sacct.as_ref().is_some_and(Delivery::is_pending)
            || self.sinks.values().any(Delivery::is_pending)
    }
}

/// A sink's (or sacct's) history, for `ergon status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SinkStatus {
    /// Last time a delivery succeeded (Unix seconds).
    pub last_success_unix: Option<u64>,
    /// Last error and when.
    pub last_error: Option<String>,
    /// When the last error happened (Unix seconds).
    pub last_error_unix: Option<u64>,
    /// Records delivered, all time.
    pub delivered_total: u64,
}

/// Records removed by a bound while a delivery was still pending.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dropped {
    /// Removed because the job ended more than `max_age` ago.
    pub by_age: u64,
    /// Removed because the state held more than `max_jobs` entries.
    pub by_size: u64,
    /// Jobs the last run did not collect because they ended at or before the horizon (their
    /// manifests are still in the spool; not a loss by this run).
    pub skipped_before_horizon: u64,
}

/// The whole state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// Jobs by `cluster/job`.
    pub jobs: BTreeMap<String, JobEntry>,
    /// Per sink name (`sacct` included).
    pub sinks: BTreeMap<String, SinkStatus>,
    /// What bounds removed.
    pub dropped: Dropped,
    /// End time (Unix ns) of the newest entry a bound removed; see the module docs.
    pub horizon_unix_ns: u64,
    /// When the last `ergon run` finished (Unix seconds), and how.
    pub last_run_unix: Option<u64>,
    /// The last run's summary line.
    pub last_run_summary: Option<String>,
    /// The spool index: manifest files already collected, by path (see the module docs). Only
    /// jobs in [`State::jobs`] appear in it. Absent in states written before the index
    /// existed (the next run then reads every manifest once and fills it).
    #[serde(default)]
    pub index: BTreeMap<String, IndexEntry>,
    /// Incremented by every [`State::save`]; a [`Journal`] applies to the generation it names.
    #[serde(default)]
    pub generation: u64,
    /// Journal lines replayed by [`State::load`] (not saved).
    #[serde(skip)]
    pub replayed: usize,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            jobs: BTreeMap::new(),
            sinks: BTreeMap::new(),
            dropped: Dropped::default(),
            horizon_unix_ns: 0,
            last_run_unix: None,
            last_run_summary: None,
            index: BTreeMap::new(),
            generation: 0,
            replayed: 0,
        }
    }
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on a state file.
    #[error("{what} {path}: {error}{}", disk_hint(error))]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// The file is not a state this build reads.
    #[error("state file {path} cannot be read: {reason}; move it away to start from an empty state (already delivered records would then be delivered again)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What to do about a full or read-only state filesystem, said with the error.
fn disk_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            "; the state directory's filesystem is full: free space there. Nothing is lost: the state on disk is the last one saved (with its journal), and the next run goes on from it, sending again what this run may have sent"
        }
        std::io::ErrorKind::ReadOnlyFilesystem => {
            "; the state directory's filesystem is read-only: remount it read-write (a filesystem error? see dmesg). Nothing was changed"
        }
        _ => "",
    }
}

/// The bounds the state keeps to.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Keep entries of jobs that ended within this many seconds.
    pub max_age_s: u64,
    /// Keep at most this many entries.
    pub max_jobs: usize,
}

/// What [`State::prune`] removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Fully delivered entries removed (no loss).
    pub delivered: usize,
    /// Entries removed by age with a delivery pending.
    pub dropped_by_age: usize,
    /// Entries removed by size with a delivery pending.
    pub dropped_by_size: usize,
}

impl State {
    /// The state file in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    /// Load the state from `dir`; an absent file is an empty state.
    pub fn load(dir: &Path) -> Result<State, StateError> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No save yet; a first run interrupted may have left a journal.
                let mut state = State::default();
                state.replay(dir)?;
                return Ok(state);
            }
            Err(error) => {
                return Err(StateError::Io {
                    what: "reading",
                    path,
                    error,
                })
            }
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!(
                    "version {} (this build reads {STATE_VERSION})",
                    state.version
                ),
            });
        }
        let mut state = state;
        state.replay(dir)?;
        Ok(state)
    }

    /// Apply the journal in `dir`, if it follows this generation.
    fn replay(&mut self, dir: &Path) -> Result<(), StateError> {
        let path = Journal::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                return Err(StateError::Io {
                    what: "reading",
                    path,
                    error,
                })
            }
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.clone(),
            reason,
        };
        // Only complete lines: a last line without its newline was cut short by a crash while
        // it was written, before its fsync, so nothing in it was sent.
        let complete = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(&bytes[..0], |end| &bytes[..end]);
        let mut lines = complete.split(|&b| b == b'\n');
        let Some(header) = lines.next().filter(|l| !l.is_empty()) else {
            return Ok(());
        };
        let header: JournalHeader =
            serde_json::from_slice(header).map_err(|e| corrupt(format!("journal header: {e}")))?;
        if header.follows_generation != self.generation {
            // Left by a crash after a save and before the journal's removal: already in the
            // state.
            return Ok(());
        }
        for (n, line) in lines.enumerate() {
            let op: JournalOp = serde_json::from_slice(line)
                .map_err(|e| corrupt(format!("journal line {}: {e}", n + 2)))?;
            self.apply(&op);
            self.replayed += 1;
        }
        Ok(())
    }

    /// Apply one journal operation (the run applies each one it appends, so that the state in
    /// memory and a replay agree).
    pub fn apply(&mut self, op: &JournalOp) {
        match op {
            JournalOp::Put { jobs } => {
                for (key, entry) in jobs {
                    self.jobs.insert(key.clone(), entry.clone());
                }
            }
            JournalOp::Sent {
                sink,
                at_unix,
                keys,
                status,
            } => {
                self.sinks.insert(sink.clone(), status.clone());
                for key in keys {
                    if let Some(d) = self.jobs.get_mut(key).and_then(|e| e.delivery_mut(sink)) {
                        if d.is_pending() {
                            *d = Delivery::Sent {
                                at_unix: *at_unix,
                                last_error: None,
                            };
                        }
                    }
                }
            }
            JournalOp::Delivered {
                sink,
                at_unix,
                keys,
                status,
            } => {
                self.sinks.insert(sink.clone(), status.clone());
                for key in keys {
                    let Some(entry) = self.jobs.get_mut(key) else {
                        continue;
                    };
                    if let Some(d) = entry.delivery_mut(sink) {
                        *d = Delivery::Done { at_unix: *at_unix };
                    }
                    // Delivered everywhere: the body is no longer needed (the WAL only needs
                    // the bodies of pending deliveries).
                    if !entry.any_pending() {
                        entry.record = None;
                    }
                }
            }
            JournalOp::Failed {
                sink,
                error,
                keys,
                status,
            } => {
                self.sinks.insert(sink.clone(), status.clone());
                for key in keys {
                    if let Some(d) = self.jobs.get_mut(key).and_then(|e| e.delivery_mut(sink)) {
                        d.failed(error.clone());
                    }
                }
            }
        }
    }

    /// Write the state to `dir` atomically and durably, as the next generation, and remove the
    /// journal (now contained in the state).
    pub fn save(&mut self, dir: &Path) -> Result<(), StateError> {
        self.generation += 1;
        if let Err(e) = self.write(dir) {
            // The state on disk is still the previous generation, which the journal follows.
            self.generation -= 1;
            return Err(e);
        }
        match std::fs::remove_file(Journal::path(dir)) {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(StateError::Io {
                what: "removing",
                path: Journal::path(dir),
                error,
            }),
        }
    }

    fn write(&self, dir: &Path) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(self).expect("the state always serialises");
        Ok(durable::write(&Self::path(dir), &bytes, 0o666)?)
    }

    /// Remove entries beyond the bounds; see the module docs. `now_unix_ns` is the current time.
    pub fn prune(&mut self, bounds: Bounds, now_unix_ns: u64) -> Pruned {
        let mut pruned = Pruned::default();
        let cutoff = now_unix_ns.saturating_sub(bounds.max_age_s.saturating_mul(1_000_000_000));
        let old: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.end_unix_ns < cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        for key in old {
            self.remove(&key, &mut pruned, true);
        }
        if self.jobs.len() > bounds.max_jobs {
            // Oldest first; among equals, delivered ones before pending ones.
            let mut order: Vec<(bool, u64, String)> = self
                .jobs
                .iter()
                .map(|(k, e)| (e.any_pending(), e.end_unix_ns, k.clone()))
                .collect();
            order.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
            let excess = self.jobs.len() - bounds.max_jobs;
            for (_, _, key) in order.into_iter().take(excess) {
                self.remove(&key, &mut pruned, false);
            }
        }
        self.retain_indexed_jobs();
        pruned
    }

    /// Remove the entry `key` if it is beyond the age bound, as [`State::prune`] would.
    pub fn prune_entry(&mut self, key: &str, bounds: Bounds, now_unix_ns: u64) -> Pruned {
        let mut pruned = Pruned::default();
        let cutoff = now_unix_ns.saturating_sub(bounds.max_age_s.saturating_mul(1_000_000_000));
        if self.jobs.get(key).is_some_and(|e| e.end_unix_ns < cutoff) {
            self.remove(key, &mut pruned, true);
        }
        pruned
    }

    /// Remove index entries whose job has no entry (any more): the index is bounded by the
    /// jobs it names.
    pub fn retain_indexed_jobs(&mut self) {
        let jobs = &self.jobs;
        self.index.retain(|_, e| jobs.contains_key(&e.job));
    }

    fn remove(&mut self, key: &str, pruned: &mut Pruned, by_age: bool) {
        let Some(entry) = self.jobs.remove(key) else {
            return;
        };
        self.horizon_unix_ns = self.horizon_unix_ns.max(entry.end_unix_ns);
        if entry.any_pending() {
            if by_age {
                pruned.dropped_by_age += 1;
                self.dropped.by_age += 1;
            } else {
                pruned.dropped_by_size += 1;
                self.dropped.by_size += 1;
            }
            tracing::error!(
                "dropped {key} ({}) from the state with a delivery still pending: the {} bound was reached",
                entry.key,
                if by_age { "age" } else { "size" }
            );
        } else {
            pruned.delivered += 1;
        }
    }

    /// Drop the record bodies of entries with nothing pending, to keep the file small.
    pub fn forget_delivered_bodies(&mut self) {
        for entry in self.jobs.values_mut() {
            if !entry.any_pending() {
                entry.record = None;
            }
        }
    }

    /// Entries whose delivery to `sink` was accepted and awaits verification.
    pub fn sent_for(&self, sink: &str) -> usize {
        self.jobs
            .values()
            .filter(|e| e.sinks.get(sink).is_some_and(Delivery::is_sent))
            .count()
    }

    /// Entries with a delivery pending for `sink` (`"sacct"` for sacct), sent ones included.
    pub fn pending_for(&self, sink: &str) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|(_, e)| {
                if sink == "sacct" {
                    e.sacct.as_ref().is_some_and(Delivery::is_pending)
                } else {
                    e.sinks.get(sink).is_some_and(Delivery::is_pending)
                }
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    Ok(durable::sync_dir(dir)?)
}

impl From<durable::WriteError> for StateError {
    fn from(e: durable::WriteError) -> Self {
        StateError::Io {
            what: e.step.as_str(),
            path: e.path,
            error: e.source,
        }
    }
}

/// The first line of a journal.
#[derive(Debug, Serialize, Deserialize)]
struct JournalHeader {
    /// The [`State::generation`] this journal applies to.
    follows_generation: u64,
}

/// One line of the journal (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalOp {
    /// Entries added or replaced (newly collected jobs, with their records).
    Put {
        /// `cluster/job` and its entry.
        jobs: Vec<(String, JobEntry)>,
    },
    /// Accepted by `sink`, to be verified ([`Delivery::Sent`]).
    Sent {
        /// The destination.
        sink: String,
        /// When.
        at_unix: u64,
        /// The jobs (`cluster/job`).
        keys: Vec<String>,
        /// The destination's history after this.
        status: SinkStatus,
    },
    /// Delivered to `sink` (`"sacct"` for sacct).
    Delivered {
        /// The destination.
        sink: String,
        /// When.
        at_unix: u64,
        /// The jobs (`cluster/job`).
        keys: Vec<String>,
        /// The destination's history after this.
        status: SinkStatus,
    },
    /// A failed attempt to deliver to `sink`.
    Failed {
        /// The destination.
        sink: String,
        /// What went wrong.
        error: String,
        /// The jobs (`cluster/job`).
        keys: Vec<String>,
        /// The destination's history after this.
        status: SinkStatus,
    },
}

/// [`JournalOp::Put`] by reference, to write entries without copying them.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum PutRef<'a> {
    Put { jobs: Vec<(&'a str, &'a JobEntry)> },
}

/// The state's journal, open for appending (see the module docs). Created by the first append
/// after a save; [`State::save`] removes it.
#[derive(Debug)]
pub struct Journal {
    file: std::fs::File,
    path: PathBuf,
    /// Bytes written, header included.
    pub bytes: u64,
    /// A failed write could not be cut back off: nothing more may be appended after it.
    broken: bool,
}

impl Journal {
    /// The journal in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("journal.jsonl")
    }

    /// Start a journal after generation `generation` of the state (replacing a stale one).
    pub fn create(dir: &Path, generation: u64) -> Result<Journal, StateError> {
        let path = Self::path(dir);
        let io = |what: &'static str| {
            let path = path.clone();
            move |error| StateError::Io { what, path, error }
        };
        let mut file = std::fs::File::create(&path).map_err(io("creating"))?;
        let mut line = serde_json::to_vec(&JournalHeader {
            follows_generation: generation,
        })
        .expect("the header serialises");
        line.push(b'\n');
        file.write_all(&line).map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))?;
        sync_dir(dir)?;
        Ok(Journal {
            bytes: line.len() as u64,
            file,
            path,
            broken: false,
        })
    }

    /// Append the entries `jobs`; with `sync`, durably (fsync) before returning.
    pub fn put(&mut self, jobs: &[(&str, &JobEntry)], sync: bool) -> Result<(), StateError> {
        let mut line = serde_json::to_vec(&PutRef::Put {
            jobs: jobs.to_vec(),
        })
        .expect("entries serialise");
        line.push(b'\n');
        self.write(&line, sync)
    }

    /// Append `op`; with `sync`, durably before returning.
    pub fn append(&mut self, op: &JournalOp, sync: bool) -> Result<(), StateError> {
        let mut line = serde_json::to_vec(op).expect("journal operations serialise");
        line.push(b'\n');
        self.write(&line, sync)
    }

    fn write(&mut self, line: &[u8], sync: bool) -> Result<(), StateError> {
        let path = &self.path;
        let io = |what: &'static str| {
            move |error| StateError::Io {
                what,
                path: path.clone(),
                error,
            }
        };
        if self.broken {
            return Err(io("appending to")(std::io::Error::other(
                "an earlier write failed and could not be cut off",
            )));
        }
        let written = self
            .file
            .write_all(line)
            .map_err(io("appending to"))
            .and_then(|()| {
                if sync {
                    self.file.sync_data().map_err(io("syncing"))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            // A part of the line may be in the file (a full disk takes what fits): cut it off,
            // so that a later append (space freed meanwhile) does not follow a torn line that
            // makes the whole journal unreadable. If that fails too, append nothing more.
            use std::io::Seek as _;
            let cut = self
                .file
                .set_len(self.bytes)
                .and_then(|()| self.file.seek(std::io::SeekFrom::Start(self.bytes)));
            self.broken = cut.is_err();
            return Err(e);
        }
        self.bytes += line.len() as u64;
        Ok(())
    }
}

/// An exclusive, non-blocking lock on `<state dir>/ergon.lock`, held while the value lives.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another `ergon run` holds the lock {0}; this run did nothing (cron will start the next one)")]
    Busy(PathBuf),
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {error}{}", disk_hint(error))]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

impl RunLock {
    /// Take the lock without waiting.
    pub fn try_acquire(state_dir: &Path) -> Result<RunLock, LockError> {
        let path = state_dir.join("ergon.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| LockError::Io {
                path: path.clone(),
                error,
            })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(LockError::Busy(path)),
            Err(e) => Err(LockError::Io {
                path,
                error: e.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(end: u64, pending: bool) -> JobEntry {
        let mut sinks = BTreeMap::new();
        sinks.insert(
            "vm".to_string(),
            if pending {
                Delivery::pending()
            } else {
                Delivery::Done { at_unix: 1 }
            },
        );
        JobEntry {
            key: format!("c/{end}/h"),
            collected_unix: 0,
            end_unix_ns: end,
            record: None,
            sacct: None,
            sinks,
        }
    }

    #[test]
    fn prune_counts_pending_drops_and_moves_the_horizon() {
        let mut s = State::default();
        let sec = 1_000_000_000u64;
        s.jobs.insert("c/1".into(), entry(10 * sec, true));
        s.jobs.insert("c/2".into(), entry(20 * sec, false));
        s.jobs.insert("c/3".into(), entry(100 * sec, true));
        s.jobs.insert("c/4".into(), entry(110 * sec, false));
        s.jobs.insert("c/5".into(), entry(120 * sec, true));
        let p = s.prune(
            Bounds {
                max_age_s: 50,
                max_jobs: 2,
            },
            130 * sec,
        );
        assert_eq!(p.dropped_by_age, 1);
        assert_eq!(p.delivered, 1);
        assert_eq!(p.dropped_by_size, 1);
        assert_eq!(s.dropped.by_age, 1);
        assert_eq!(s.dropped.by_size, 1);
        assert_eq!(s.horizon_unix_ns, 100 * sec);
        assert_eq!(s.jobs.keys().collect::<Vec<_>>(), ["c/4", "c/5"]);
    }

    #[test]
    fn prune_removes_the_index_entries_of_removed_jobs() {
        let mut s = State::default();
        let sec = 1_000_000_000u64;
        s.jobs.insert("c/1".into(), entry(10 * sec, false));
        s.jobs.insert("c/2".into(), entry(100 * sec, false));
        s.jobs.insert("c/3".into(), entry(120 * sec, false));
        let file = |job: &str| IndexEntry {
            size: 1,
            mtime_ns: 2,
            content_hash: "sha256:00".into(),
            job: job.into(),
        };
        for (path, job) in [
            ("/s/1a", "c/1"),
            ("/s/1b", "c/1"),
            ("/s/2", "c/2"),
            ("/s/3", "c/3"),
        ] {
            s.index.insert(path.into(), file(job));
        }
        // An entry of a job the state does not have (never collected) goes too.
        s.index.insert("/s/9".into(), file("c/9"));
        s.prune(
            Bounds {
                max_age_s: 50,
                max_jobs: 1,
            },
            130 * sec,
        );
        assert_eq!(s.jobs.keys().collect::<Vec<_>>(), ["c/3"]);
        assert_eq!(s.index.keys().collect::<Vec<_>>(), ["/s/3"]);
    }

    #[test]
    fn a_state_without_an_index_loads_with_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::default();
        s.jobs.insert("c/1".into(), entry(5, true));
        let mut v = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("index").unwrap();
        std::fs::write(State::path(dir.path()), serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), s);
    }

    #[test]
    fn the_journal_replays_onto_its_generation_only_and_a_cut_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::default();
        s.jobs.insert("c/1".into(), entry(5, true));
        s.save(dir.path()).unwrap();
        let mut journal = Journal::create(dir.path(), s.generation).unwrap();
        let new = entry(6, true);
        journal.put(&[("c/2", &new)], true).unwrap();
        let delivered = JournalOp::Delivered {
            sink: "vm".into(),
            at_unix: 9,
            keys: vec!["c/1".into()],
            status: SinkStatus {
                delivered_total: 1,
                ..SinkStatus::default()
            },
        };
        journal.append(&delivered, false).unwrap();
        drop(journal);
        // A line cut short by a crash.
        let path = Journal::path(dir.path());
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"put\":{\"jobs\":[[\"c/3\",{\"key");
        std::fs::write(&path, text).unwrap();

        let loaded = State::load(dir.path()).unwrap();
        assert_eq!(loaded.replayed, 2);
        assert_eq!(loaded.jobs.len(), 2, "c/3 was cut short");
        assert_eq!(loaded.jobs["c/2"], new);
        assert_eq!(
            loaded.jobs["c/1"].sinks["vm"],
            Delivery::Done { at_unix: 9 }
        );
        assert_eq!(loaded.sinks["vm"].delivered_total, 1);

        // A save contains the journal and removes it; a journal of an older generation (a
        // crash between the save and the removal) is not replayed.
        let mut again = loaded.clone();
        again.save(dir.path()).unwrap();
        assert!(!path.exists());
        let mut stale = Journal::create(dir.path(), loaded.generation).unwrap();
        stale.put(&[("c/4", &entry(7, true))], true).unwrap();
        let reloaded = State::load(dir.path()).unwrap();
        assert_eq!(reloaded.replayed, 0);
        assert!(!reloaded.jobs.contains_key("c/4"));
    }

    #[test]
    fn save_and_load_round_trip_and_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::default();
        s.jobs.insert("c/1".into(), entry(5, true));
        s.index.insert(
            "/spool/c-1-n1.json".into(),
            IndexEntry {
                size: 68_269,
                mtime_ns: 1_700_000_000_123_456_789,
                content_hash: format!("sha256:{}", "ab".repeat(32)),
                job: "c/1".into(),
            },
        );
        s.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), s);
        let held = RunLock::try_acquire(dir.path()).unwrap();
        assert!(matches!(
            RunLock::try_acquire(dir.path()),
            Err(LockError::Busy(_))
        ));
        drop(held);
        RunLock::try_acquire(dir.path()).unwrap();
    }
}
