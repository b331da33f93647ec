//! The job worker thread (`ergond-jobs`): performs the registry's [`Action`]s in order — reads
//! the counters at each event's instant, watches and unwatches step cgroups, drives the
//! [`Attributor`] (an interval at every event and about once a second between events), writes
//! the journal, finishes lost jobs ([`reap`]) and builds each ended job's manifest ([`finish`])
//! for the spool writer ([`super::writers`]). Being one FIFO thread, it always records a job's
//! readings before it finishes the job.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};

use ergon_protocol::{Gap, Timestamp};

use super::attributor::Attributor;
use super::facts::{gpu_positions, NodeFacts};
use super::journal;
use super::manifest;
use super::reading::{bracket_between, interpolate_bracketed, Across, Reading};
use super::recovery::journal_state;
use super::registry::{Action, EventTime, Mark};
use super::state::SpoolWork;
use super::state::{
    event_time, lock, Inner, ATTRIBUTION_PERIOD, JOURNAL_IDLE_PERIOD, JOURNAL_PERIOD,
    READING_TIMEOUT,
};
use super::writers::write_one;
use crate::sampler::{SamplerHandle, TraceOf, TraceSample};
use crate::sources::rapl::RaplDomain;

/// The worker's own state between actions.
#[derive(Debug, Default)]
pub(super) struct WorkerState {
    /// Scratch space for a trace.
    buf: Vec<TraceSample>,
    /// Estimated gaps whose job energy is the job's share at the end of the next interval (a
    /// job that started inside a stretch the sampler did not cover): (job, gap index).
    pending: Vec<(u32, usize)>,
    /// Jobs finished since the journal was last written, with their manifests: they go to the
    /// spool writer only once the journal holds their final figures (so a kill in between
    /// loses nothing, and a manifest on disk never has an older journal behind it that would
    /// finish its job again). The worker loop writes the journal as soon as no action waits:
    /// at once when events are few, at most every JOURNAL_PERIOD under a burst, rather than
    /// once per job — each write is the whole journal, so a write per job end made a burst
    /// of job ends quadratic.
    unspooled: Vec<SpoolWork>,
}

pub(super) fn worker(inner: &Inner, rx: Receiver<Action>, mut st: WorkerState) {
    use std::sync::atomic::Ordering::Relaxed;
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
            journal_and_hand_over(inner, &mut st);
            last_journal = std::time::Instant::now();
        }
        if !st.unspooled.is_empty() {
            match rx.try_recv() {
                Ok(action) => {
                    inner.journal_dirty.store(true, Relaxed);
                    perform(inner, action, &mut st);
                    continue;
                }
                Err(TryRecvError::Empty) => {
                    inner.journal_dirty.store(false, Relaxed);
                    journal_and_hand_over(inner, &mut st);
                    last_journal = std::time::Instant::now();
                }
                Err(TryRecvError::Disconnected) => break,
            }
        }
        // Periodic intervals only while no action waits: an event already queued must close
        // its interval at its own instant first.
        let action = match rx.recv_timeout(JOURNAL_PERIOD) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                if last_reap.elapsed() >= inner.config.reap_period {
                    if reap(inner, &mut st) {
                        inner.journal_dirty.store(true, Relaxed);
                    }
                    last_reap = std::time::Instant::now();
                }
                if last_periodic.elapsed() >= ATTRIBUTION_PERIOD {
                    // Events the plugin queued while ergond was hung or busy: their own
                    // instants come before this interval's end.
                    for a in super::commands::take_queued(inner) {
                        perform(inner, a, &mut st);
                    }
                    periodic(inner, &mut st);
                    last_periodic = std::time::Instant::now();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        inner.journal_dirty.store(true, Relaxed);
        perform(inner, action, &mut st);
    }
    if !st.unspooled.is_empty() {
        journal_and_hand_over(inner, &mut st);
    }
}

/// Write the journal, then give the jobs it now holds as finished to the spool writer.
fn journal_and_hand_over(inner: &Inner, st: &mut WorkerState) {
    write_journal(inner);
    for work in st.unspooled.drain(..) {
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
fn reap(inner: &Inner, st: &mut WorkerState) -> bool {
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
    let scanned = needs_scan.then(|| super::discovery::scan(h, &inner.config.slurm.name));
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
        let at = event_time(Timestamp::now(), 0);
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
            perform(inner, a, st);
        }
    }
    any
}

/// Perform one action of the registry's.
pub(super) fn perform(inner: &Inner, action: Action, st: &mut WorkerState) {
    match action {
        Action::Read { job_id, mark, at } => read_for_event(inner, job_id, mark, at, st),
        Action::Watch { path } => {
            if let Err(e) = inner.sampler.watch_cgroup(&path) {
                tracing::warn!(cgroup = %path, error = %e, "cannot watch the step's cgroup; its CPU time is not measured");
            }
        }
        Action::Unwatch { path } => {
            inner.sampler.unwatch_cgroup(&path);
        }
        Action::Finish { job_id } => {
            if let Some(work) = finish(inner, job_id, &mut st.buf) {
                st.unspooled.push(work);
            }
        }
    }
}

/// The counters at an event's instant: close the attribution interval there, apply the
/// event's membership change, and keep the reading with the job. Where the instant fell in a
/// stretch the sampler did not cover, or before ergond measured at all, the job's gaps say so.
fn read_for_event(inner: &Inner, job_id: u32, mark: Mark, at: EventTime, st: &mut WorkerState) {
    let prior = lock(&inner.attributor).last().cloned();
    let reading = read_at(inner, at.mono_ns, &mut st.buf, prior.as_ref());
    // What the attributor needs from the registry, copied under a brief lock: the socket
    // handler takes the registry lock for every request, so it is never held while the
    // interval is attributed (which walks every open job).
    struct Info {
        gpus: Vec<usize>,
        mig: Vec<(usize, u32)>,
        cpus: ergon_protocol::CpuSet,
        memory_mib: Option<u64>,
        path: Option<String>,
    }
    let info = {
        let reg = lock(&inner.registry);
        reg.get(job_id).map(|job| {
            let (gpus, mig) = gpu_positions(&job.gpus, &inner.facts.gpus);
            Info {
                gpus,
                mig,
                cpus: job.cpus.clone(),
                memory_mib: job.memory_mib,
                path: match mark {
                    Mark::StepStart(s) | Mark::StepEnd(s) => {
                        job.step(s).and_then(|s| s.watched.clone())
                    }
                    _ => None,
                },
            }
        })
    };
    let (share_before, share_after, late) = {
        let mut att = lock(&inner.attributor);
        let share_before = att.share(job_id).map(|s| s.total_j());
        att.advance(&reading);
        let late = att.last_at() != Some(reading.at_mono_ns);
        let share_after = att.share(job_id).map(|s| s.total_j());
        // Every job is the attributor's from its first event, so its figures have one source
        // even when ergond missed its start (a step event for a job it never saw start).
        if let Some(i) = &info {
            if mark != Mark::JobStart && !att.members().contains_key(&job_id) {
                att.job_start(job_id, i.gpus.clone(), i.cpus.clone());
                att.set_mig(job_id, i.mig.clone());
                flag_shared_gpus(&inner.sampler, &att);
            }
        }
        match (mark, &info) {
            (Mark::JobStart, Some(i)) => {
                // A job taken on at start-up and now properly started: its figures start
                // again from this event (its steps' own StepStart events follow).
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
                att.set_allocation(job_id, i.cpus.clone(), i.memory_mib);
            }
            (Mark::StepEnd(step), Some(i)) => {
                att.step_end(job_id, step, i.path.as_deref());
            }
            _ => {}
        }
        fill_pending(inner, &att, &mut st.pending);
        (share_before, share_after, late)
    };
    if matches!(mark, Mark::JobStart) {
        tracing::info!(job_id, "job started");
    }
    // No counter at all at the instant: it is before anything ergond sampled.
    let unmeasured = !(reading.gpus.is_empty() && reading.zones.is_empty())
        && reading
            .gpus
            .iter()
            .chain(&reading.zones)
            .all(Option::is_none);
    if let Some(i) = &info {
        let unix_of = |mono: u64| at.unix_ns.saturating_sub(at.mono_ns.saturating_sub(mono));
        let mut reg = lock(&inner.registry);
        if let Some(job) = reg.get_mut(job_id) {
            match (&reading.across, mark) {
                (Some(across), Mark::JobStart | Mark::JobEnd) => {
                    let bound = across_bound(across, &i.gpus, &inner.facts);
                    let (from, to) = (unix_of(across.from_mono_ns), unix_of(across.to_mono_ns));
                    let (span, energy) = if mark == Mark::JobEnd {
                        let e = share_after.unwrap_or(0.0) - share_before.unwrap_or(0.0);
                        ((from.max(job.start.unix_ns), at.unix_ns), Some(e.max(0.0)))
                    } else {
                        ((at.unix_ns, to), None)
                    };
                    let idx = attach_estimate(job, span, bound, energy, mark);
                    if energy.is_none() {
                        st.pending.push((job_id, idx));
                    }
                }
                (None, Mark::JobStart) if late || unmeasured => {
                    // Before the interval ergond has already closed, or before it measured at
                    // all (an event it could not take at the time, replayed later): the job
                    // is measured from then.
                    let since = match &prior {
                        Some(p) if late => unix_of(p.at_mono_ns),
                        _ => Timestamp::now().unix_ns,
                    };
                    job.gaps.push(Gap::new(
                        at.unix_ns,
                        since.max(at.unix_ns),
                        "ergond could not take the job's start when it happened (it was down \
                         or busy); the job is measured from when it could",
                        false,
                    ));
                }
                _ => {}
            }
            // A GPU of the job the sampler reads but had no reading for at the instant (a read
            // blocking for longer than the wait): its energy around the event is unknown.
            let unread: Vec<usize> = i
                .gpus
                .iter()
                .copied()
                .filter(|&p| reading.gpus.get(p).is_some_and(Option::is_none))
                .filter(|&p| inner.sampler.gpu_readable(p))
                .collect();
            if !unread.is_empty() && matches!(mark, Mark::JobStart | Mark::JobEnd) && !unmeasured {
                let which = if mark == Mark::JobEnd { "end" } else { "start" };
                job.gaps.push(Gap::new(
                    at.unix_ns,
                    Timestamp::now().unix_ns.max(at.unix_ns),
                    format!(
                        "the counters of {} GPU(s) could not be read at the job's {which} (the \
                         sampler had no reading within {} s: a blocked sensor read); their \
                         energy around it is not measured",
                        unread.len(),
                        READING_TIMEOUT.as_secs()
                    ),
                    false,
                ));
            }
        }
    }
}

/// The most a job's figures can be off by when a reading at its start or end was
/// interpolated across `across`: the whole stretch's energy of each of its GPUs and of every
/// CPU package and DRAM zone (its part of a stretch nobody measured is somewhere between none
/// and all of it).
fn across_bound(across: &Across, gpus: &[usize], facts: &NodeFacts) -> f64 {
    let gpu: f64 = gpus
        .iter()
        .filter_map(|&p| across.gpus.get(p).copied().flatten())
        .sum();
    let cpu: f64 = facts
        .zones
        .iter()
        .enumerate()
        .filter(|(_, z)| {
            z.socket.is_some() && matches!(z.domain, RaplDomain::Package | RaplDomain::Dram)
        })
        .filter_map(|(i, _)| across.zones.get(i).copied().flatten())
        .sum();
    gpu + cpu
}

/// Record an estimate over `span` (Unix ns) in the job's gaps: on the gap of the outage it
/// lies in, when there is one (ergond was down), else as a gap of its own. Returns the gap's
/// index.
fn attach_estimate(
    job: &mut super::registry::Job,
    span: (u64, u64),
    bound_j: f64,
    energy_j: Option<f64>,
    mark: Mark,
) -> usize {
    let estimate = ergon_protocol::GapEstimate {
        energy_j: energy_j.unwrap_or(0.0),
        bound_j,
    };
    let which = if mark == Mark::JobEnd { "end" } else { "start" };
    let outage = job
        .gaps
        .iter()
        .position(|g| g.start_unix_ns <= span.0.max(span.1) && g.end_unix_ns >= span.0.min(span.1));
    if let Some(i) = outage {
        let g = &mut job.gaps[i];
        if mark == Mark::JobEnd {
            g.end_unix_ns = g.end_unix_ns.min(span.1).max(g.start_unix_ns);
        }
        g.estimate = Some(estimate);
        g.reason = format!(
            "{}; the job's {which} fell in it and its counters there were interpolated, so the \
             figures are an estimate",
            g.reason
        );
        return i;
    }
    job.gaps.push(Gap {
        start_unix_ns: span.0.min(span.1),
        end_unix_ns: span.1.max(span.0),
        reason: format!(
            "ergond's sampler did not run in this stretch (ergond stopped, hung or starved); the \
             job's {which} fell in it and its counters there were interpolated, so the figures \
             are an estimate"
        ),
        recovered: true,
        estimate: Some(estimate),
    });
    job.gaps.len() - 1
}

/// Fill in the energy of estimates waiting for the interval after a job's start.
fn fill_pending(inner: &Inner, att: &Attributor, pending: &mut Vec<(u32, usize)>) {
    if pending.is_empty() {
        return;
    }
    let mut reg = lock(&inner.registry);
    pending.retain(|&(job_id, idx)| {
        let Some(share) = att.share(job_id) else {
            return false;
        };
        if att.members().get(&job_id).is_some_and(|m| m.intervals == 0) {
            return true; // not closed yet
        }
        if let Some(est) = reg
            .get_mut(job_id)
            .and_then(|j| j.gaps.get_mut(idx))
            .and_then(|g| g.estimate.as_mut())
        {
            est.energy_j = share.total_j();
        }
        false
    });
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
        let (jobs, closed) = {
            let reg = lock(&inner.registry);
            (reg.shared_jobs(), reg.closed())
        };
        journal_state(
            jobs,
            closed,
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

/// Close the attribution interval now (at start-up: the outage since the journal's last
/// reading is attributed to the jobs open in it, before any job found running joins).
///
/// With no reading before (a fresh start), this reading is the attributor's first: every
/// series must have a value at its instant, or the jobs found next would lose (silently) their
/// first interval's energy of each series it lacks. A series has a value only between two of
/// its samples, and right after start-up one may not have sampled before "now" yet (a loaded
/// node), so the instant is the newest of the series' latest samples: each has a sample at or
/// before it, and [`read_at`] waits for one after.
pub(super) fn close_now(inner: &Inner, st: &mut WorkerState) {
    let now = crate::clock::monotonic_ns();
    let prior = lock(&inner.attributor).last().cloned();
    let at = if prior.is_none() {
        first_instant(&inner.sampler, now)
    } else {
        now
    };
    let reading = read_at(inner, at, &mut st.buf, prior.as_ref());
    let mut att = lock(&inner.attributor);
    att.advance(&reading);
    fill_pending(inner, &att, &mut st.pending);
}

/// The first instant at or after `now` at which every sampled series has a sample at or before
/// (see [`close_now`]): the newest of their latest samples once each has sampled since `now`.
fn first_instant(sampler: &SamplerHandle, now: u64) -> u64 {
    if !sampler.wait_for_readings_after(now, READING_TIMEOUT) {
        tracing::warn!("the sampler had no reading within 15 s of start (a sensor read blocking?); some counters at the start are unknown");
    }
    let snap = sampler.snapshot();
    snap.gpus
        .iter()
        .filter(|g| g.measurable && !g.lost)
        .map(|g| g.at_ns)
        .chain(snap.zones.iter().map(|z| z.at_ns))
        .fold(now, u64::max)
}

/// Close an attribution interval at the newest instant every sampled series covers.
fn periodic(inner: &Inner, st: &mut WorkerState) {
    let snap = inner.sampler.snapshot();
    let covered = snap
        .gpus
        .iter()
        .filter(|g| g.measurable && !g.lost)
        .map(|g| g.at_ns)
        .chain(snap.zones.iter().map(|z| z.at_ns))
        .chain(snap.sockets.iter().map(|s| s.at_ns))
        // The node meter's readings lag (a BMC: seconds): the interval ends where its series
        // ends too, unless the meter has stalled (then its stretch is not metered).
        .chain(
            inner
                .sampler
                .meter()
                .and_then(|m| m.covered_recently(crate::clock::monotonic_ns())),
        )
        .min();
    let Some(at) = covered.filter(|&t| t > 0) else {
        return;
    };
    let prior = {
        let att = lock(&inner.attributor);
        if att.last_at().is_some_and(|l| at <= l) {
            return;
        }
        att.last().cloned()
    };
    let reading = read_at(inner, at, &mut st.buf, prior.as_ref());
    let mut att = lock(&inner.attributor);
    att.advance(&reading);
    fill_pending(inner, &att, &mut st.pending);
}

/// Counters at `at_ns`, interpolated from the traces once the tick after it is in. A series
/// whose samples around the instant are further apart than a few sampling periods (ergond
/// stopped, hung or starved), or that starts only after it (ergond was down: then `prior`, the
/// last reading before the outage, is the sample before), is marked in [`Reading::across`].
pub(super) fn read_at(
    inner: &Inner,
    at_ns: u64,
    buf: &mut Vec<TraceSample>,
    prior: Option<&Reading>,
) -> Reading {
    let sampler = &inner.sampler;
    if !sampler.wait_for_readings_after(at_ns, READING_TIMEOUT) {
        tracing::warn!("the sampler had no reading after an event within 15 s (a sensor read blocking?); some counters at the event are unknown");
    }
    let snap = sampler.snapshot();
    let mut across = Across::default();
    let mut series =
        |of: TraceOf, prior_value: Option<f64>, slot: &mut Vec<Option<f64>>, i: usize, n: usize| {
            if !sampler.trace(of, buf) {
                return None;
            }
            let b = interpolate_bracketed(buf, at_ns).or_else(|| {
                // Before the trace: between the reading before the outage and the first sample.
                let p = prior.filter(|p| p.at_mono_ns < at_ns)?;
                let first = buf.first().filter(|f| f.at_ns > at_ns)?;
                bracket_between(
                    (p.at_mono_ns, prior_value?),
                    (first.at_ns, first.energy_j),
                    at_ns,
                )
            })?;
            if b.width_ns() > sampler.hole_threshold_ns(of) {
                Across::add(slot, n, i, b.energy_j());
                across.cover(b.before.0, b.after.0);
            }
            Some(b.value)
        };
    let n_gpus = snap.gpus.len();
    let mut gpu_across = Vec::new();
    let gpus = (0..n_gpus)
        .map(|i| {
            if snap.gpus[i].measurable {
                let p = prior.and_then(|p| p.gpus.get(i).copied().flatten());
                series(TraceOf::Gpu(i), p, &mut gpu_across, i, n_gpus)
            } else {
                None
            }
        })
        .collect();
    let n_zones = snap.zones.len();
    let mut zone_across = Vec::new();
    let zones = (0..n_zones)
        .map(|i| {
            let p = prior.and_then(|p| p.zones.get(i).copied().flatten());
            series(TraceOf::Zone(i), p, &mut zone_across, i, n_zones)
        })
        .collect();
    let across = (across.to_mono_ns > 0).then_some(Across {
        gpus: gpu_across,
        zones: zone_across,
        ..across
    });
    let meter = sampler.meter().and_then(|m| {
        // An event's instant may be newer than the meter's last reading: wait for the next one
        // (bounded; on this worker thread, never on a sampling thread). A meter that has not
        // read for longer than the bound (a hung BMC) is not waited for at all: events must not
        // queue behind it.
        let alive = m.covered_recently(crate::clock::monotonic_ns()).is_some();
        let wait = if alive {
            m.wait_bound()
        } else {
            std::time::Duration::ZERO
        };
        if !m.wait_for(at_ns, wait) {
            tracing::debug!(
                at_ns,
                "the node meter has no reading after the instant; not metered"
            );
            return None;
        }
        m.energy_at(at_ns, &mut Vec::new())
    });
    let proc_root = &inner.config.proc_root;
    Reading {
        meter,
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
        gpu_stats: (0..n_gpus)
            .map(|i| {
                let from = prior.map_or(at_ns, |p| p.at_mono_ns);
                sampler.gpu_stats_window(i, from, at_ns, &mut Vec::new())
            })
            .collect(),
        across,
    }
}

/// The job's final figures and manifest, for the spool writer once the journal holds them.
fn finish(inner: &Inner, job_id: u32, buf: &mut Vec<TraceSample>) -> Option<SpoolWork> {
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
                return None;
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
        &inner.sampler.holes(),
    );
    crate::gpustats::set_idle_threshold(&mut m, inner.config.idle_gpu_util_percent);
    m.wall = manifest::wall_section(
        &job,
        job.result.as_ref(),
        inner.sampler.meter().map(|m| m.info()).as_ref(),
        inner.config.attribution.rest_of_node,
    );
    m.schema_version = m.schema_version_for();
    m.seal();
    Some(SpoolWork { job, manifest: m })
}
