//! The sequential run (also `--dry-run`): collect everything, save the whole state, write sacct,
//! then upload sink by sink.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::collect;
use crate::config::Config;
use crate::job::JobRecordFull;
use crate::ledger::Ledger;
use crate::sinks::{deliver_batch, verify_and_repair, BatchResult, Sink};
use crate::state::{Bounds, Delivery, SinkStatus, State};

use super::common::{
    bar, keep_ledger_files, new_entry, now_unix, now_unix_ns, Entered, SharedSink,
};
use super::sacct::{write_sacct, SACCT};
use super::saver::Saver;
use super::summary::{RunOptions, RunSummary};

/// Collect everything, save the whole state (the write-ahead step), write sacct, then upload
/// sink by sink. `--dry-run` stops after collecting and prints what it would do.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_sequential(
    config: &Config,
    options: RunOptions,
    state: &mut State,
    summary: &mut RunSummary,
    sinks: &[SharedSink],
    saver: &mut Saver<'_>,
    ledger: &mut Ledger,
    bounds: Bounds,
    factors: Option<&crate::carbon::Factors>,
) -> Result<()> {
    // 1. Collect.
    let step = Instant::now();
    // The files the state's index does not name are looked up in the ledger (delivered jobs),
    // and the jobs collected too, all in one read transaction.
    ledger.begin_read()?;
    let scan = {
        let ledger: &Ledger = ledger;
        collect::scan_indexed_more(
            &config.spool_dirs,
            (!options.dry_run).then_some(config.quarantine_dir.as_path()),
            Duration::from_secs(config.settle_s),
            &state.index,
            Some(&mut |paths: &[&str]| Ok(ledger.files(paths)?)),
        )?
    };
    summary.timings.scan = step.elapsed();
    let step = Instant::now();
    summary.quarantined = scan.quarantined.len();
    summary.unsettled = scan.unsettled;
    summary.manifests_read = scan.read;
    summary.manifests_known = scan.known;
    let horizon = state.horizon_unix_ns;
    for (key, found) in scan.jobs {
        if let Entered::Entry(entry) = new_entry(
            config, state, ledger, sinks, summary, &key, found, horizon, factors,
        )? {
            state.jobs.insert(key, entry);
        }
    }
    ledger.end_read()?;
    if !options.dry_run {
        keep_ledger_files(ledger, state, scan.fresh, scan.gone)?;
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
            .filter_map(|k| Some((k, state.jobs.get(k)?.record.as_deref()?)))
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
            let records: Vec<&JobRecordFull> = batch_keys
                .iter()
                .filter_map(|k| state.jobs.get(k).and_then(|e| e.record.as_deref()))
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
