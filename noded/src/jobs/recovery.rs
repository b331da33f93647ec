//! Restart safety: writing the [`journal`] from the tracker's state, and restoring that state
//! when ergond starts again (see the journal's module documentation for the model).

use std::path::Path;
use std::time::Duration;

use ergon_protocol::{Gap, Timestamp};

use super::attributor::Attributor;
use super::discovery::{find_jobs, resolve_gpus, SlurmNode};
use super::facts::{gpu_positions, NodeFacts};
use super::journal::{self, map_across_restart, DeviceFrame, JournalState};
use super::reading::Reading;
use super::registry::{Action, Discovered, EventTime, JobRegistry, Mark};
use crate::clock::monotonic_ns;
use crate::sampler::SamplerHandle;

/// Power limits used to judge an outage's energy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerLimits {
    /// Highest plausible GPU power (W).
    pub gpu_max_power_w: f64,
    /// Highest plausible power of one RAPL zone (W).
    pub cpu_max_power_w: f64,
}

/// The journal's picture of the tracker now.
pub fn journal_state(
    jobs: Vec<std::sync::Arc<super::registry::Job>>,
    closed: Vec<(u32, u64)>,
    attributor: &Attributor,
    sampler: &SamplerHandle,
    facts: &NodeFacts,
    limits: PowerLimits,
    boot_id: &str,
) -> JournalState {
    let snap = sampler.snapshot();
    let now_unix = Timestamp::now().unix_ns;
    let now_mono = monotonic_ns();
    let last_unix_ns = attributor.last_at().map_or(now_unix, |at| {
        now_unix.saturating_sub(now_mono.saturating_sub(at))
    });
    JournalState {
        boot_id: boot_id.to_owned(),
        written_unix_ns: now_unix,
        last_unix_ns,
        jobs,
        attributor: attributor.clone(),
        gpus: facts
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| DeviceFrame {
                id: g.uuid.clone(),
                offset_j: snap
                    .gpus
                    .get(i)
                    .filter(|s| s.at_ns > 0)
                    .and_then(|s| s.raw_j.map(|r| r - s.energy_j)),
                range_j: None,
                max_power_w: limits.gpu_max_power_w,
            })
            .collect(),
        zones: facts
            .zones
            .iter()
            .enumerate()
            .map(|(i, z)| {
                let s = snap.zones.get(i).filter(|s| s.at_ns > 0);
                DeviceFrame {
                    id: z.to_string(),
                    offset_j: s.and_then(|s| s.raw_j.map(|r| r - s.energy_j)),
                    range_j: s.and_then(|s| s.range_j),
                    max_power_w: limits.cpu_max_power_w,
                }
            })
            .collect(),
        closed,
    }
}

/// What restoring found.
#[derive(Debug, Default)]
pub struct Restored {
    /// Jobs put back.
    pub jobs: usize,
    /// Whether the outage's energy was recovered from the hardware counters.
    pub recovered: bool,
    /// Actions for the worker: jobs whose end was seen before the stop are finished now.
    pub actions: Vec<Action>,
    /// Open jobs none of whose cgroups exist any more: they ended while ergond was down. Once
    /// the events the plugin queued meanwhile are replayed (they may give the real end),
    /// [`finish_vanished`] ends those still open.
    pub vanished: Vec<u32>,
    /// When the journal's last reading was taken (Unix ns): the outage's start.
    pub outage_start_unix_ns: u64,
}

/// Restore the journal in `dir` into `registry` and `attributor`. A journal that cannot be
/// read, or is from another boot, is set aside with an error in the log; nothing else stops
/// ergond from starting.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    dir: &Path,
    proc_root: &Path,
    sampler: &SamplerHandle,
    facts: &NodeFacts,
    registry: &mut JobRegistry,
    attributor: &mut Attributor,
) -> Restored {
    let now_s = Timestamp::now().unix_ns / 1_000_000_000;
    let state = match journal::read(dir) {
        Ok(Some(s)) => s,
        Ok(None) => return Restored::default(),
        Err(e) => {
            let aside = journal::set_aside(dir, now_s);
            tracing::error!(
                error = %e,
                set_aside = ?aside.as_ref().map(|p| p.display().to_string()),
                "the job journal is unreadable; the jobs it held get manifests only from the \
                 events still to come. The file is kept for inspection"
            );
            return Restored::default();
        }
    };
    let boot = journal::boot_id(proc_root);
    if state.boot_id != boot {
        let aside = journal::set_aside_as(dir, "other-boot", now_s);
        tracing::warn!(
            jobs = state.jobs.len(),
            set_aside = ?aside.as_ref().map(|p| p.display().to_string()),
            "the job journal is from another boot; its jobs ended with that boot"
        );
        return Restored::default();
    }
    let same_node = state.gpus.len() == facts.gpus.len()
        && state.zones.len() == facts.zones.len()
        && state
            .gpus
            .iter()
            .zip(&facts.gpus)
            .all(|(a, b)| a.id == b.uuid)
        && state
            .zones
            .iter()
            .zip(&facts.zones)
            .all(|(a, b)| a.id == b.to_string());

    // The sampler's first readings, to compare the hardware counters with the journal's.
    if !sampler.wait_for_readings_after(monotonic_ns(), Duration::from_secs(3)) {
        tracing::warn!("no sampler reading within 3 s of start; the outage is not recovered");
    }
    let snap = sampler.snapshot();
    let now_mono = monotonic_ns();
    let now_unix = Timestamp::now().unix_ns;
    let same_node = same_node && attributor.same_layout(&state.attributor);
    attributor.restore_state(state.attributor);
    let mut recovered = false;
    let mut why = if same_node {
        String::from("no reading was journaled")
    } else {
        String::from("the node's GPUs or RAPL zones changed")
    };
    if let (true, Some(old)) = (same_node, attributor.last().cloned()) {
        let outage_s = now_mono.saturating_sub(old.at_mono_ns) as f64 / 1e9;
        let mut all = true;
        let gpus: Vec<Option<f64>> = (0..facts.gpus.len())
            .map(|i| {
                let g = snap.gpus.get(i)?;
                let old_v = old.gpus.get(i).copied().flatten();
                let v = map_across_restart(&state.gpus[i], old_v, g.raw_j, g.energy_j, outage_s);
                all &= old_v.is_none() || v.is_some();
                v
            })
            .collect();
        let zones: Vec<Option<f64>> = (0..facts.zones.len())
            .map(|i| {
                let z = snap.zones.get(i)?;
                let old_v = old.zones.get(i).copied().flatten();
                let v = map_across_restart(&state.zones[i], old_v, z.raw_j, z.energy_j, outage_s);
                all &= old_v.is_none() || v.is_some();
                v
            })
            .collect();
        recovered = all;
        if !all {
            why = "a hardware counter reset or may have wrapped during the outage".into();
        }
        // The node meter's energy counts from this process's start: the outage is not metered.
        attributor.set_last(Some(Reading {
            gpus,
            zones,
            meter: None,
            ..old
        }));
    } else {
        // Nothing to measure the outage with: start afresh from the next reading.
        attributor.set_last(None);
    }

    registry.restore_closed(&state.closed);
    let refused = registry.restore(
        state
            .jobs
            .into_iter()
            .map(|j| std::sync::Arc::try_unwrap(j).unwrap_or_else(|j| (*j).clone()))
            .collect(),
    );
    for job in &refused {
        tracing::error!(
            job_id = job.job_id,
            "journaled job not restored: the registry is full"
        );
    }
    let gap_start = state.last_unix_ns;
    let reason = if recovered {
        "ergond was not running (killed or restarted); the outage's energy was recovered from \
         the hardware counters"
            .to_owned()
    } else {
        format!(
            "ergond was not running (killed or restarted); the outage's energy is unknown: {why}"
        )
    };
    let ids: Vec<u32> = registry.jobs().map(|j| j.job_id).collect();
    let mut out = Restored {
        jobs: ids.len(),
        recovered,
        ..Restored::default()
    };
    out.outage_start_unix_ns = gap_start.min(now_unix);
    // The journal's last reading (CLOCK_MONOTONIC carries across the restart): a job that had
    // ended by then was not open in the outage.
    let last_mono = attributor.last_at();
    for id in ids {
        let Some(job) = registry.get_mut(id) else {
            continue;
        };
        // The outage is a gap of the jobs open in it: not of one that had ended before (its
        // manifest was only waiting to be written).
        let open_in_outage = match (job.end, last_mono) {
            (None, _) => true,
            (Some(e), Some(last)) => e.mono_ns > last,
            (Some(e), None) => e.unix_ns > gap_start,
        };
        if open_in_outage {
            job.gaps.push(Gap::new(
                gap_start.min(now_unix),
                job.end
                    .map_or(now_unix, |e| e.unix_ns.clamp(gap_start, now_unix)),
                reason.clone(),
                recovered,
            ));
        }
        if let Some(at) = job.end {
            // Its end was seen before the stop; finish it now (its end reading, if it was
            // not taken, is read now).
            if job.result.is_none() {
                out.actions.push(Action::Read {
                    job_id: id,
                    mark: Mark::JobEnd,
                    at,
                });
            }
            out.actions.push(Action::Finish { job_id: id });
            continue;
        }
        // Watch the open steps' cgroups again; a job none of whose cgroups exist any more
        // ended while ergond was down.
        let open: Vec<String> = job
            .steps
            .iter()
            .filter(|s| s.end.is_none())
            .filter_map(|s| s.watched.clone())
            .collect();
        let mut alive = open.is_empty();
        for path in &open {
            match sampler.watch_cgroup(path) {
                Ok(()) => alive = true,
                Err(e) => {
                    tracing::info!(job_id = id, cgroup = %path, error = %e, "step cgroup gone")
                }
            }
        }
        if !alive {
            out.vanished.push(id);
        }
    }
    out
}

/// End the jobs of [`Restored::vanished`] that no replayed event ended: their end time is not
/// known, so they are charged up to now, with a gap saying so. Returns the actions that read
/// their counters and finish them.
pub fn finish_vanished(
    registry: &mut JobRegistry,
    vanished: &[u32],
    outage_start_unix_ns: u64,
) -> Vec<Action> {
    let now = EventTime {
        unix_ns: Timestamp::now().unix_ns,
        mono_ns: monotonic_ns(),
    };
    let mut actions = Vec::new();
    for &id in vanished {
        let Some(job) = registry.get_mut(id) else {
            continue;
        };
        if job.end.is_some() {
            continue; // a queued JobEnd said when
        }
        tracing::warn!(
            job_id = id,
            "the job ended while ergond was down and no event says when; finishing it now"
        );
        job.end = Some(now);
        job.gaps.push(Gap::new(
            outage_start_unix_ns.min(now.unix_ns),
            now.unix_ns,
            "the job ended while ergond was not running and its end event was lost; its end \
             time is not known and it is charged up to ergond's restart",
            false,
        ));
        actions.push(Action::Read {
            job_id: id,
            mark: Mark::JobEnd,
            at: now,
        });
        actions.push(Action::Finish { job_id: id });
    }
    actions
}

/// Take on the jobs running in the cgroup tree that the registry does not know (ergond was
/// down when they started, and no event the plugin queued named them; see
/// [`super::discovery`]). Returns how many.
pub fn discover(
    sampler: &SamplerHandle,
    facts: &NodeFacts,
    slurm: &SlurmNode,
    proc_root: &Path,
    registry: &mut JobRegistry,
    attributor: &mut Attributor,
) -> usize {
    let Some(h) = sampler.cgroup_hierarchy() else {
        return 0;
    };
    let now = EventTime {
        unix_ns: Timestamp::now().unix_ns,
        mono_ns: monotonic_ns(),
    };
    let found = find_jobs(h, proc_root, &slurm.name);
    if found.iter().all(|f| registry.get(f.job_id).is_some()) {
        return 0;
    }
    let gres = match std::fs::read_to_string(&slurm.gres_conf) {
        Ok(text) => Some(ergon_gres::gres_gpus(&text, &slurm.name)),
        Err(e) => {
            tracing::warn!(
                gres_conf = %slurm.gres_conf.display(),
                error = %e,
                "cannot read gres.conf: the GPUs of jobs found running are matched by index"
            );
            None
        }
    };
    let node_gpus: Vec<(u32, Option<u32>, String)> = facts
        .gpus
        .iter()
        .map(|g| (g.index, g.minor, g.uuid.clone()))
        .collect();
    let mut n = 0;
    for found in found {
        if registry.get(found.job_id).is_some() {
            continue;
        }
        let since = found.since_unix_ns.unwrap_or(now.unix_ns).min(now.unix_ns);
        let start = EventTime {
            unix_ns: since,
            mono_ns: now.mono_ns.saturating_sub(now.unix_ns - since),
        };
        let gpus = resolve_gpus(&found, &node_gpus, gres.as_deref(), &slurm.mig_minors);
        let env = found.env.clone().unwrap_or_default();
        let discovered = Discovered {
            job_id: found.job_id,
            sluid: env.sluid.clone(),
            uid: found.uid(),
            user: env.user.clone(),
            account: env.account.clone(),
            partition: env.partition.clone(),
            cluster: env.cluster.clone(),
            array_job_id: env.array_job_id,
            array_task_id: env.array_task_id,
            node: env.node.clone().unwrap_or_else(|| slurm.name.clone()),
            start,
            cpus: found.cpus.clone(),
            gpus,
            steps: found.dir.steps.clone(),
        };
        match registry.discovered(&discovered, now) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(job_id = found.job_id, error = %e, "running job not taken on");
                continue;
            }
        }
        let (positions, mig) = match &discovered.gpus {
            Ok(allocs) => gpu_positions(allocs, &facts.gpus),
            Err(why) => {
                tracing::warn!(job_id = found.job_id, "{why}: its GPU energy is unknown");
                (Vec::new(), Vec::new())
            }
        };
        attributor.job_start(found.job_id, positions, found.cpus.clone());
        attributor.set_mig(found.job_id, mig);
        for (step, path) in &found.dir.steps {
            match sampler.watch_cgroup(path) {
                Ok(()) => attributor.step_start(found.job_id, *step, Some(path), None),
                Err(e) => {
                    tracing::info!(job_id = found.job_id, cgroup = %path, error = %e, "step cgroup not watched");
                }
            }
        }
        tracing::warn!(
            job_id = found.job_id,
            cgroup = %found.dir.rel,
            "found a running job ergond did not know (it was down when the job started): \
             measuring it from now, its manifest will show the gap"
        );
        n += 1;
    }
    n
}
