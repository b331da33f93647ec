//! Writing each job's record into sacct (and, on Slurm 25.11+, its ConsumedEnergy).

use std::collections::BTreeMap;

use anyhow::Result;

use crate::config::Config;
use crate::sacct::{Sacct, SacctJob, SacctOutcome};
use crate::state::{Delivery, State};

use super::common::{bar, now_unix};
use super::saver::Saver;
use super::summary::{RunOptions, RunSummary};

/// The name sacct has among the destinations in the state.
pub const SACCT: &str = "sacct";
pub(super) fn write_sacct(
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
