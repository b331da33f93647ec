//! Saving the state during a run: the whole state at most every few seconds, the journal (the
//! write-ahead log) in between.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::config::Config;
use crate::state::{JobEntry, Journal, JournalOp, State};

use super::summary::RunTimings;

/// Saves the state at most every `every`, and always when asked to; appends to its journal in
/// between.
pub(super) struct Saver<'a> {
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
    pub(super) fn new(config: &Config) -> Saver<'_> {
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
    pub(super) fn maybe(&mut self, state: &mut State) -> Result<()> {
        if self.last.elapsed() >= self.every.max(self.last_took * 10) {
            self.now(state)?;
        }
        Ok(())
    }

    /// Save the whole state (a new generation; the journal goes).
    pub(super) fn now(&mut self, state: &mut State) -> Result<()> {
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
    pub(super) fn put(&mut self, state: &State, keys: &[String]) -> Result<()> {
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
    pub(super) fn op(&mut self, state: &mut State, op: JournalOp) -> Result<()> {
        let start = Instant::now();
        state.apply(&op);
        self.journal(state)?.append(&op, false)?;
        self.appends += 1;
        self.journal_time += start.elapsed();
        Ok(())
    }

    pub(super) fn report(&mut self, timings: &mut RunTimings) {
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
