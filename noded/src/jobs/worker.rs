//! The job worker thread (`ergond-jobs`): performs the registry's [`Action`]s in order — reads
//! the counters at each event's instant, watches and unwatches step cgroups, drives the
//! [`Attributor`] (an interval at every event and about once a second between events), writes
//! the journal, finishes lost jobs ([`reap`]) and builds each ended job's manifest ([`finish`])
//! for the spool writer ([`super::writers`]). Being one FIFO thread, it always records a job's
//! readings before it finishes the job.

use std::sync::mpsc::{Receiver, RecvTimeoutError};

use ergon_protocol::Timestamp;

use super::attributor::Attributor;
use super::journal;
use super::manifest::{self, gpu_positions};
use super::reading::{interpolate, Reading};
use super::recovery::journal_state;
use super::registry::{Action, Mark};
use super::tracker::{
    event_time, lock, Inner, ATTRIBUTION_PERIOD, JOURNAL_IDLE_PERIOD, JOURNAL_PERIOD,
    READING_TIMEOUT,
};
use super::writers::{write_one, SpoolWork};
use crate::sampler::{SamplerHandle, TraceOf, TraceSample};

pub(super) fn worker(inner: &Inner, rx: Receiver<Action>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf: Vec<TraceSample> = Vec::new();
    let mut last_periodic = std::time::Instant::now();
    let mut last_reap = std::time::Instant::now();
    let mut last_journal = std::time::Instant::now();
    loop {
        // The journal follows job events (at most every JOURNAL_PERIOD) and, while jobs are
        // open and nothing happens, the running figures every JOURNAL_IDLE_PERIOD: an outage
        // after an older journal is still measured, as one longer interval.
        let since = last_journal.elapsed();
        let idle_due = since >= JOURNAL_IDLE_PERIOD && !lock(&inner.registry).is_empty();
        if since >= JOURNAL_PERIOD && (inner.journal_dirty.swap(false, Relaxed) || idle_due) {
            write_journal(inner);
            last_journal = std::time::Instant::now();
        }
        // Periodic intervals only while no action waits: an event already queued must close
        // its interval at its own instant first.
        let action = match rx.recv_timeout(JOURNAL_PERIOD) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                if last_reap.elapsed() >= inner.config.reap_period {
                    if reap(inner, &mut buf) {
                        inner.journal_dirty.store(true, Relaxed);
                    }
                    last_reap = std::time::Instant::now();
                }
                if last_periodic.elapsed() >= ATTRIBUTION_PERIOD {
                    periodic(inner, &mut buf);
                    last_periodic = std::time::Instant::now();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        inner.journal_dirty.store(true, Relaxed);
        perform(inner, action, &mut buf);
    }
}

/// Finish the open jobs whose end event never came (a lost JobEnd): every
/// `lost_job_check_s`, a job older than that has ended when
/// - its steps' cgroups were watched and none of their job directories exists any more, or
/// - none was ever watched (it is known only from events without cgroups, e.g. a step end
///   whose job start was lost) and the cgroup tree, which does have Slurm's job directories,
///   holds no directory for it (by job id or SLUID).
///
/// It is finished now, with a gap saying so. Without Slurm's cgroup tree on the node a job of
/// the second kind cannot be judged, and stays open until its end event comes.
fn reap(inner: &Inner, buf: &mut Vec<TraceSample>) -> bool {
    let Some(h) = inner.sampler.cgroup_hierarchy() else {
        return false;
    };
    let now_mono = crate::clock::monotonic_ns();
    let old_enough = |j: &super::registry::Job| {
        now_mono.saturating_sub(j.start.mono_ns) > inner.config.reap_period.as_nanos() as u64
    };
    let job_dirs = |j: &super::registry::Job| -> Vec<String> {
        j.steps
            .iter()
            .filter_map(|s| s.watched.as_deref())
            .map(|p| match p.rsplit_once('/') {
                Some((dir, last)) if last.starts_with("step_") => dir.to_owned(),
                _ => p.to_owned(),
            })
            .collect()
    };
    // The tree is scanned only when a job without cgroups is a candidate.
    let needs_scan = lock(&inner.registry)
        .jobs()
        .any(|j| j.end.is_none() && old_enough(j) && job_dirs(j).is_empty());
    let scanned = needs_scan.then(|| super::discovery::scan(h));
    let gone: Vec<(u32, String)> = {
        let reg = lock(&inner.registry);
        reg.jobs()
            .filter(|j| j.end.is_none() && old_enough(j))
            .filter(|j| {
                let dirs = job_dirs(j);
                if !dirs.is_empty() {
                    return !dirs.iter().any(|d| h.exists(d));
                }
                let Some(scan) = &scanned else { return false };
                scan.slurm_tree
                    && !scan.jobs.iter().any(|d| match &d.key {
                        super::discovery::JobKey::Id(id) => *id == j.job_id,
                        super::discovery::JobKey::Sluid(s) => {
                            j.sluid.as_deref() == Some(s.to_ascii_lowercase().as_str())
                        }
                    })
            })
            .map(|j| (j.job_id, j.node.clone()))
            .collect()
    };
    let any = !gone.is_empty();
    for (job_id, node) in gone {
        tracing::warn!(
            job_id,
            "the job's end was never reported and its cgroup is gone: finishing it now"
        );
        let at = event_time(Timestamp::now());
        let actions = {
            let mut reg = lock(&inner.registry);
            let actions = reg
                .job_end(
                    &ergon_protocol::JobEnd {
                        cluster: None,
                        job_id,
                        node,
                        time: Timestamp::from_unix_ns(at.unix_ns),
                    },
                    at,
                )
                .unwrap_or_default();
            if let Some(job) = reg.get_mut(job_id) {
                job.gaps.push(ergon_protocol::Gap {
                    start_unix_ns: at
                        .unix_ns
                        .saturating_sub(inner.config.reap_period.as_nanos() as u64),
                    end_unix_ns: at.unix_ns,
                    reason: "the job's end was not reported to ergond (a lost event); it was \
                             finished when its cgroup was found gone, and is charged up to then"
                        .into(),
                    recovered: false,
                    estimate: None,
                });
            }
            actions
        };
        for a in actions {
            perform(inner, a, buf);
        }
    }
    any
}

/// Perform one action of the registry's.
fn perform(inner: &Inner, action: Action, buf: &mut Vec<TraceSample>) {
    match action {
        Action::Read { job_id, mark, at } => {
            let reading = read_at(&inner.sampler, &inner.config.proc_root, at.mono_ns, buf);
            // What the attributor needs from the registry, copied under a brief lock: the
            // socket handler takes the registry lock for every request, so it is never held
            // while the interval is attributed (which walks every open job).
            struct Info {
                gpus: Vec<usize>,
                mig: Vec<(usize, u32)>,
                cpus: ergon_protocol::CpuSet,
                path: Option<String>,
                own: Vec<String>,
            }
            let info = {
                let reg = lock(&inner.registry);
                reg.get(job_id).map(|job| {
                    let (gpus, mig) = gpu_positions(&job.gpus, &inner.facts.gpus);
                    Info {
                        gpus,
                        mig,
                        cpus: job.cpus.clone(),
                        path: match mark {
                            Mark::StepStart(s) | Mark::StepEnd(s) => {
                                job.step(s).and_then(|s| s.watched.clone())
                            }
                            _ => None,
                        },
                        own: job.steps.iter().filter_map(|s| s.watched.clone()).collect(),
                    }
                })
            };
            {
                let mut att = lock(&inner.attributor);
                att.advance(&reading);
                match (mark, &info) {
                    (Mark::JobStart, Some(i)) => {
                        // A job taken on at start-up and now properly started: its figures
                        // start again from this event (its steps' own StepStart events follow).
                        if att.members().contains_key(&job_id) {
                            let _ = att.job_end(job_id);
                        }
                        att.job_start(job_id, i.gpus.clone(), i.cpus.clone());
                        att.set_mig(job_id, i.mig.clone());
                        flag_shared_gpus(&inner.sampler, &att);
                    }
                    (Mark::StepStart(step), Some(i)) => {
                        let baseline = i.path.as_deref().and_then(|p| reading.cgroup_ns(p));
                        att.step_start(job_id, step, i.path.as_deref(), baseline);
                        att.set_cpus(job_id, i.cpus.clone());
                    }
                    (Mark::StepEnd(step), Some(i)) => {
                        att.step_end(job_id, step, i.path.as_deref());
                    }
                    _ => {}
                }
            }
            if matches!(mark, Mark::JobStart) {
                tracing::info!(job_id, "job started");
            }
            // The job keeps only its own cgroups' figures (a reading holds every watched one).
            let mut reading = reading;
            let own = info.map(|i| i.own).unwrap_or_default();
            reading.cgroups.retain(|(p, _)| own.contains(p));
            reading.gpu_util = Vec::new();
            lock(&inner.registry).record_reading(job_id, mark, reading);
        }
        Action::Watch { path } => {
            if let Err(e) = inner.sampler.watch_cgroup(&path) {
                tracing::warn!(cgroup = %path, error = %e, "cannot watch the step's cgroup; its CPU time is not measured");
            }
        }
        Action::Unwatch { path } => {
            inner.sampler.unwatch_cgroup(&path);
        }
        Action::Finish { job_id } => finish(inner, job_id, buf),
    }
}

/// Write the journal now (no-op without a state directory).
pub(super) fn write_journal(inner: &Inner) {
    let Some(dir) = &inner.config.state_dir else {
        return;
    };
    // A consistent pair: the attributor is frozen while its lock is held, and the registry's
    // jobs are taken (shared, no copy) in that window under a brief lock; the attributor is
    // then copied without holding the registry lock the socket handler needs.
    let state = {
        let att = lock(&inner.attributor);
        let jobs = lock(&inner.registry).shared_jobs();
        journal_state(
            jobs,
            &att,
            &inner.sampler,
            &inner.facts,
            inner.config.power,
            &inner.boot_id,
        )
    };
    if let Err(e) = journal::write(dir, &state) {
        tracing::error!(error = %e, "cannot write the job journal; open jobs would be lost if ergond stopped now");
    }
}

/// Tell the sampler which GPUs several jobs hold (their per-process utilisation splits them).
pub(super) fn flag_shared_gpus(sampler: &SamplerHandle, att: &Attributor) {
    for (pos, n) in att.holders_per_gpu().into_iter().enumerate() {
        sampler.set_gpu_shared(pos, n >= 2);
    }
}

/// Close an attribution interval at the newest instant every sampled series covers.
fn periodic(inner: &Inner, buf: &mut Vec<TraceSample>) {
    let snap = inner.sampler.snapshot();
    let covered = snap
        .gpus
        .iter()
        .filter(|g| g.measurable && !g.lost)
        .map(|g| g.at_ns)
        .chain(snap.zones.iter().map(|z| z.at_ns))
        .chain(snap.sockets.iter().map(|s| s.at_ns))
        .min();
    let Some(at) = covered.filter(|&t| t > 0) else {
        return;
    };
    let mut att = lock(&inner.attributor);
    if att.last_at().is_some_and(|l| at <= l) {
        return;
    }
    let reading = read_at(&inner.sampler, &inner.config.proc_root, at, buf);
    att.advance(&reading);
}

/// Counters at `at_ns`, interpolated from the traces once the tick after it is in.
fn read_at(
    sampler: &SamplerHandle,
    proc_root: &std::path::Path,
    at_ns: u64,
    buf: &mut Vec<TraceSample>,
) -> Reading {
    if !sampler.wait_for_readings_after(at_ns, READING_TIMEOUT) {
        tracing::warn!("the sampler had no reading after an event within 2 s; some counters at the event are unknown");
    }
    let snap = sampler.snapshot();
    let mut series = |of: TraceOf| {
        if sampler.trace(of, buf) {
            interpolate(buf, at_ns)
        } else {
            None
        }
    };
    let gpus = (0..snap.gpus.len())
        .map(|i| {
            let g = &snap.gpus[i];
            if g.measurable {
                series(TraceOf::Gpu(i))
            } else {
                None
            }
        })
        .collect();
    let zones = (0..snap.zones.len())
        .map(|i| series(TraceOf::Zone(i)))
        .collect();
    Reading {
        at_mono_ns: at_ns,
        gpus,
        zones,
        cgroups: snap
            .cgroups
            .into_iter()
            .map(|c| (c.path, c.cpu_ns))
            .collect(),
        sockets: snap
            .sockets
            .iter()
            .map(|s| (s.socket, s.busy_ns, s.total_ns))
            .collect(),
        gpu_util: snap
            .gpus
            .iter()
            .map(|g| {
                let (_, procs) = g.processes.as_ref()?;
                let mut by_job: Vec<(u32, f64)> = Vec::new();
                for &(pid, sm) in procs {
                    let Some(job) = super::reading::job_of_pid(proc_root, pid) else {
                        continue;
                    };
                    match by_job.iter_mut().find(|(j, _)| *j == job) {
                        Some(e) => e.1 += f64::from(sm),
                        None => by_job.push((job, f64::from(sm))),
                    }
                }
                Some(by_job)
            })
            .collect(),
    }
}

fn finish(inner: &Inner, job_id: u32, buf: &mut Vec<TraceSample>) {
    // The job stays in the registry (and so in the journal), with its final figures, until
    // the spool writer has written its manifest: a kill in between loses nothing.
    let job = {
        let mut reg = lock(&inner.registry);
        match reg.get(job_id) {
            Some(j) if j.end.is_some() => {}
            _ => {
                tracing::warn!(
                    job_id,
                    "job to finish is not in the registry or has not ended"
                );
                return;
            }
        }
        let needs_result = reg.get(job_id).is_some_and(|j| j.result.is_none());
        if needs_result {
            let mut att = lock(&inner.attributor);
            let r = att.job_end(job_id);
            flag_shared_gpus(&inner.sampler, &att);
            if let Some(j) = reg.get_mut(job_id) {
                j.result = r;
            }
        }
        reg.get(job_id).cloned().expect("checked above")
    };
    inner
        .journal_dirty
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let traces: Vec<Vec<TraceSample>> = (0..inner.facts.gpus.len())
        .map(|i| {
            if inner.sampler.trace(TraceOf::Gpu(i), buf) {
                buf.clone()
            } else {
                Vec::new()
            }
        })
        .collect();
    let mut m = manifest::build(
        &job,
        &inner.facts,
        &traces,
        job.result.as_ref(),
        &inner.config.default_cluster,
    );
    m.seal();
    let work = SpoolWork { job, manifest: m };
    let tx = lock(&inner.spool).clone();
    match tx {
        // Blocks when the writer is behind: the worker slows down, no manifest is dropped.
        Some(tx) => {
            if let Err(e) = tx.send(work) {
                write_one(inner, e.0);
            }
        }
        None => write_one(inner, work),
    }
}
