//! `ergon run`: collect → upload (and sacct), with the state as write-ahead log.
//!
//! By default collection and upload are **pipelined**: the spools are scanned with
//! [`crate::collect::scan_streaming`], which hands over each job as soon as all its manifests
//! have been read; every [`CHUNK`] jobs the new entries are appended to the state's journal and
//! fsynced (the write-ahead step), then handed to one uploader thread per sink, which sends them
//! in its own batches while the scan goes on. Results come back to this thread, which alone
//! changes the state, and are journalled too. sacct is written after the collection. With
//! [`RunOptions::sequential`] (and for `--dry-run`) a run collects everything first, saves the
//! whole state, then writes sacct and uploads: the path before pipelining.
//!
//! This module holds [`run`], which sets up a run and picks the path; the rest is in
//! submodules, which import one another (never this module), in this order only:
//!
//! - `summary`: what a run is asked ([`RunOptions`]) and what it did ([`RunSummary`],
//!   [`RunTimings`]);
//! - `common`: the sinks ([`build_sinks`]), a job's new state entry, the clock, progress bars;
//! - `saver`: saving the state and appending to its journal during a run;
//! - `sacct`: writing the records into sacct;
//! - `sequential`: the sequential run and `--dry-run`;
//! - `pipeline`: the pipelined run, its uploader threads and the collecting side.

mod common;
mod pipeline;
mod sacct;
mod saver;
mod sequential;
mod summary;

pub use common::{build_sinks, SharedSink};
pub use pipeline::{CHUNK, LANES};
pub use sacct::SACCT;
pub use summary::{RunOptions, RunSummary, RunTimings};

use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::config::Config;
use crate::state::{Bounds, Delivery, RunLock, State};

use common::{now_unix, now_unix_ns};
use pipeline::run_pipelined;
use sacct::write_sacct;
use saver::Saver;
use sequential::run_sequential;

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
