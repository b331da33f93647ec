//! [`run`]: one `ergon run`, from the lock to the last save: the sequential or the pipelined
//! path in between.

use std::collections::BTreeSet;
use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::config::Config;
use crate::ledger::Ledger;
use crate::spool::IndexEntry;
use crate::state::{Bounds, Delivery, JobEntry, RunLock, State};

use super::common::{build_sinks, now_unix, now_unix_ns, SharedSink};
use super::pipeline::run_pipelined;
use super::sacct::write_sacct;
use super::saver::Saver;
use super::seal::seal;
use super::sequential::run_sequential;
use super::summary::{RunOptions, RunSummary};

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
    // The delivered jobs (docs/accounting.md, "State"); a dry run only reads it, if there is one.
    let mut ledger = if options.dry_run {
        Ledger::open_read_only(&config.state_dir)?
    } else {
        Ledger::open(&config.state_dir)?
    };
    summary.timings.load_state = started.elapsed();
    let bounds = Bounds {
        max_age_s: config.state.max_age_days.saturating_mul(86_400),
        max_jobs: config.state.max_jobs,
    };
    let sinks = build_sinks(config, options.dry_run)?;
    // CO2e and cost (docs/carbon.md): the factors' sources are read once per run.
    let factors = crate::carbon::Factors::new(config.carbon.as_ref(), config.cost.as_ref());
    crate::collect::keep_trace_sum(factors.is_some());
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
    // The age bound prunes the ledger too; its horizon (committed with the deletion) joins the
    // state's.
    let ledger_horizon = if options.dry_run {
        ledger.horizon()?
    } else {
        let cutoff = now_unix_ns().saturating_sub(bounds.max_age_s.saturating_mul(1_000_000_000));
        ledger.prune(cutoff)?.1
    };
    state.horizon_unix_ns = state.horizon_unix_ns.max(ledger_horizon);
    let mut sealing = None;
    if options.dry_run || options.sequential {
        run_sequential(
            config,
            options,
            &mut state,
            &mut summary,
            &sinks,
            &mut saver,
            &mut ledger,
            bounds,
            factors.as_ref(),
        )?;
        if options.dry_run {
            return Ok(summary);
        }
    } else {
        summary.timings.pipelined = true;
        sealing = run_pipelined(
            config,
            options,
            &mut state,
            &mut summary,
            &sinks,
            &mut saver,
            &mut ledger,
            bounds,
            factors.as_ref(),
        )?;
        if config.sacct.enabled {
            let step = Instant::now();
            write_sacct(config, &mut state, &mut summary, &mut saver, options)?;
            summary.timings.sacct = step.elapsed();
        }
    }

    state.forget_delivered_bodies();
    move_to_ledger(&mut state, &mut ledger)?;
    if let Some(found) = sealing {
        let done = seal(&mut ledger, &state, found)?;
        summary.dirs_sealed = done.sealed;
        if done.forgotten > 0 {
            tracing::debug!(
                "forgot {} seals of directories no longer found",
                done.forgotten
            );
        }
    }
    state.last_run_unix = Some(now_unix());
    state.last_run_summary = Some(summary.line());
    saver.now(&mut state)?;
    saver.report(&mut summary.timings);
    summary.timings.total = started.elapsed();
    Ok(summary)
}

/// Move the jobs whose every delivery is done, and their spool-index entries, from the state to
/// the ledger: the ledger commits first, then the caller saves the state without them (a crash
/// in between leaves them in both, and the state's entries win). The first run on a state file
/// written before the ledger existed moves all its delivered jobs.
fn move_to_ledger(state: &mut State, ledger: &mut Ledger) -> Result<()> {
    let done: BTreeSet<&String> = state
        .jobs
        .iter()
        .filter(|(_, e)| !e.any_pending())
        .map(|(k, _)| k)
        .collect();
    if done.is_empty() {
        return Ok(());
    }
    let jobs: Vec<(&str, &JobEntry)> = done.iter().map(|k| (k.as_str(), &state.jobs[*k])).collect();
    let files: Vec<(&str, &IndexEntry)> = state
        .index
        .iter()
        .filter(|(_, e)| done.contains(&e.job))
        .map(|(p, e)| (p.as_str(), e))
        .collect();
    ledger.put(&jobs, &files)?;
    let done: BTreeSet<String> = done.into_iter().cloned().collect();
    state.jobs.retain(|k, _| !done.contains(k));
    state.index.retain(|_, e| !done.contains(&e.job));
    Ok(())
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
