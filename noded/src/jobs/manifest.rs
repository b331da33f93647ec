//! Rendering a job's [`Manifest`]: the attributor's result for the job (every energy figure,
//! MIG and shared GPUs included, comes from it: there is one energy path), the facts of its
//! registry entry (ids, owner, times, steps, gaps) and of the node, and the sampler's traces
//! (for the power trace and peaks). Pure: no I/O, no clock.
//!
//! # What is attributed (model `exclusive-gpu+cgroup-cpu-time`, docs/attribution.md)
//!
//! The [`super::attributor::Attributor`] splits the node's energy interval by interval: a GPU
//! allocated to the job alone gets all of its energy (idle included); a GPU several jobs
//! claim is split equally and marked `shared` (estimated); each socket's package and DRAM
//! energy is split by the jobs' cgroup CPU time (active part) and allocated CPUs (idle part).
//! The manifest carries the job's share per GPU and per socket, the totals, and the node's
//! measured, idle and unattributed energy over the job's interval (`node_context`).
//!
//! When the attributor has no result for the job (ergond never took a reading while it ran),
//! every energy is `null` (not measured, never 0), the coverage 0 and the model
//! [`UNATTRIBUTED_MODEL`].
//!
//! A job whose start ergond did not see (it was down) gets coverage 0 with one gap over its
//! known interval, its owner as `uid` 4294967295 / user `"unknown"` unless a step told it, and
//! no GPU energy (its allocation is unknown).

use ergon_protocol::{
    AttributionInfo, ComponentCoverage, Coverage, EnergyMethod, Gap, GpuEnergy, GpuMig, JobInfo,
    Manifest, MigInstanceRef, MigShareMethod, NodeContext, PowerTrace, SensorKind, ShareMethod,
    SocketEnergy, StepEnergy, Totals, TraceSeries, MANIFEST_SCHEMA_VERSION,
};

use super::attributor::JobResult;
pub use super::facts::{gpu_key, gpu_positions, match_gpus, GpuFact, MatchedBy, NodeFacts};
use super::reading::{interpolate, power_series, window};
use super::registry::Job;
use crate::attribution::{EstimateReason, MODEL_NAME, MODEL_VERSION};
use crate::sampler::TraceSample;
use crate::sources::rapl::RaplDomain;

/// The model named when the attributor had no result for the job: nothing is attributed.
pub const UNATTRIBUTED_MODEL: &str = "unattributed";
/// Most points per trace series.
pub const MAX_TRACE_POINTS: usize = 600;
/// Shortest trace bin.
pub const MIN_TRACE_BIN_NS: u64 = 100_000_000;
/// `uid` written when the job's owner is unknown.
pub const UNKNOWN_UID: u32 = u32::MAX;

/// Build the (unsealed) manifest of an ended job. `traces` holds each GPU's trace by snapshot
/// position (oldest first); `result` is the attributor's figures for the job, if it had it
/// open; `default_cluster` is used when the job did not say.
pub fn build(
    job: &Job,
    facts: &NodeFacts,
    traces: &[Vec<TraceSample>],
    result: Option<&JobResult>,
    default_cluster: &str,
    holes: &[(u64, u64)],
) -> Manifest {
    let start = job.start;
    let end = job.end.unwrap_or(start);
    let end_unix = end.unix_ns.max(start.unix_ns);
    let duration_s = (end_unix - start.unix_ns) as f64 / 1e9;
    let per_s = |j: f64| {
        if duration_s > 0.0 {
            j / duration_s
        } else {
            0.0
        }
    };
    // The attributor's figures are the job's energy; without them (ergond never took a
    // reading for the job) nothing is invented.
    let attributed = result.is_some();
    let empty = JobResult::default();
    let r = result.unwrap_or(&empty);
    let mut estimated_notes: Vec<String> = Vec::new();
    let mut gaps: Vec<Gap> = Vec::new();
    if !job.start_seen {
        gaps.push(Gap {
            start_unix_ns: start.unix_ns,
            end_unix_ns: end_unix,
            reason: "ergond did not see the job start (it was down or restarted); the job's \
                     start time and GPU allocation are unknown, and its energy before ergond \
                     first heard of it is not measured"
                .into(),
            recovered: false,
            estimate: None,
        });
    } else if !attributed {
        gaps.push(Gap::new(
            start.unix_ns,
            end_unix,
            "ergond has no figures for the job: it never took a reading while the job ran",
            false,
        ));
    }

    // GPUs.
    let matched = if job.start_seen {
        match_gpus(&job.gpus, &facts.gpus)
    } else {
        Vec::new()
    };
    let bin_ns = ((end.mono_ns.saturating_sub(start.mono_ns)).div_ceil(MAX_TRACE_POINTS as u64))
        .max(MIN_TRACE_BIN_NS);
    // All series share one start: the job's, or the oldest instant every trace covers.
    let trace_start_mono = matched
        .iter()
        .filter_map(|(_, m)| m.and_then(|(p, _)| traces.get(p)?.first().map(|s| s.at_ns)))
        .fold(start.mono_ns, u64::max);
    let mut gpus = Vec::new();
    let mut series = Vec::new();
    let mut gpu_total: Option<f64> = None;
    // Per allocated GPU: the part of the job's interval its energy covers (0 for one that
    // matches no device or was never read).
    let mut gpu_covered: Vec<f64> = Vec::new();
    let span_mono = end.mono_ns.saturating_sub(start.mono_ns);
    let mut mig_done: Vec<usize> = Vec::new();
    for (alloc, m) in &matched {
        // A job's MIG instances on one GPU make one entry (its share of the board).
        if let (Some(_), Some((pos, _))) = (alloc.mig, *m) {
            if mig_done.contains(&pos) {
                continue;
            }
            mig_done.push(pos);
        }
        let Some((pos, by)) = *m else {
            gpu_covered.push(0.0);
            estimated_notes.push(format!(
                "allocated GPU (index {}, minor {:?}) matches no NVML device; not measured",
                alloc.index, alloc.minor
            ));
            continue;
        };
        let fact = &facts.gpus[pos];
        if by == MatchedBy::Index {
            estimated_notes.push(format!(
                "GPU index {} matched by index (the plugin sent no device minor)",
                alloc.index
            ));
        }
        let minor_key = gpu_key(fact);
        // The attributor's share of the GPU (for MIG instances, their part of the board).
        let energy = r.share.gpus.get(&minor_key).copied().flatten();
        let reasons: Vec<EstimateReason> = r.share.estimated.iter().copied().collect();
        let reason_here = |want: fn(&EstimateReason) -> Option<u32>| {
            reasons.iter().any(|e| want(e) == Some(minor_key))
        };
        let shared_whole = reason_here(|e| match e {
            EstimateReason::SharedGpuEqual { minor }
            | EstimateReason::SharedGpuByUtilisation { minor } => Some(*minor),
            _ => None,
        });
        let mig = alloc.mig.map(|_| {
            let layout = fact.mig.as_ref();
            let instances = matched
                .iter()
                .filter(|(_, m)| m.is_some_and(|(p, _)| p == pos))
                .filter_map(|(a, _)| a.mig)
                .map(|mi| {
                    let known = layout.and_then(|l| {
                        l.instances
                            .iter()
                            .find(|i| i.gpu_instance_id == mi.gpu_instance_id)
                    });
                    MigInstanceRef {
                        gpu_instance_id: mi.gpu_instance_id,
                        compute_instance_id: mi
                            .compute_instance_id
                            .or(known.map(|k| k.compute_instance_id)),
                        slices: known.map(|k| k.slices),
                        uuid: known.map(|k| k.uuid.clone()),
                    }
                })
                .collect();
            let share_method = if reason_here(|e| match e {
                EstimateReason::MigByActivity { minor } => Some(*minor),
                _ => None,
            }) {
                MigShareMethod::Activity
            } else if reason_here(|e| match e {
                EstimateReason::MigBySliceSize { minor } => Some(*minor),
                _ => None,
            }) || (!attributed && layout.is_some())
            {
                MigShareMethod::SliceSize
            } else {
                MigShareMethod::WholeGpu
            };
            GpuMig {
                total_slices: layout.map_or(0, |l| l.total_slices),
                instances,
                share_method,
            }
        });
        let shared = shared_whole || mig.is_some();
        // For a MIG share, the board's power scaled by the job's part of the board's energy
        // over the job (from the trace; an estimate, like the share itself).
        let trace = traces.get(pos).map(Vec::as_slice).unwrap_or(&[]);
        let board_j = interpolate(trace, start.mono_ns)
            .zip(interpolate(trace, end.mono_ns))
            .map(|(a, b)| b - a);
        let scale = match (&mig, energy, board_j) {
            (Some(_), Some(e), Some(b)) if b > 0.0 => (e / b).clamp(0.0, 1.0),
            (Some(_), _, _) => 0.0,
            _ => 1.0,
        };
        let peak = window(trace, start.mono_ns, end.mono_ns)
            .iter()
            .filter_map(|s| s.power_w)
            .fold(None, |acc: Option<f32>, w| {
                Some(acc.map_or(w, |a| a.max(w)))
            })
            .map(|w| w * scale as f32);
        // A GPU that could not be read at the job's start or end has no energy: `null`, never 0.
        let method = match energy {
            Some(_) => fact.method,
            None => {
                estimated_notes.push(format!(
                    "GPU {} was not read while the job ran: its energy is unknown",
                    fact.uuid
                ));
                EnergyMethod::Estimated
            }
        };
        if let Some(e) = energy {
            *gpu_total.get_or_insert(0.0) += e;
        }
        let unread_ns = r.gpu_unread_ns.get(&minor_key).copied().unwrap_or(0);
        if energy.is_some() && unread_ns > 0 {
            estimated_notes.push(format!(
                "GPU {} was not read for {:.1} s of the job (lost, or its reads failed): its \
                 energy in that time is not measured",
                fact.uuid,
                unread_ns as f64 / 1e9
            ));
        }
        gpu_covered.push(match energy {
            Some(_) if span_mono > 0 => 1.0 - (unread_ns as f64 / span_mono as f64).min(1.0),
            Some(_) => 1.0,
            None => 0.0,
        });
        let avg_w = energy.map(per_s);
        let peak_w = match (peak.map(f64::from), avg_w) {
            (Some(p), Some(a)) => Some(p.max(a)),
            (p, a) => p.or(a),
        };
        gpus.push(GpuEnergy {
            uuid: fact.uuid.clone(),
            index: alloc.index,
            minor: alloc.minor.or(fact.minor),
            pci_bus_id: fact.pci_bus_id.clone(),
            energy_j: energy,
            avg_w,
            peak_w,
            method,
            shared,
            mig,
        });
        let (_, mut watts) = power_series(
            trace,
            trace_start_mono,
            end.mono_ns,
            bin_ns,
            MAX_TRACE_POINTS,
        );
        if scale != 1.0 {
            for w in &mut watts {
                *w *= scale as f32;
            }
        }
        series.push(TraceSeries {
            name: format!("gpu{}", alloc.index),
            watts,
        });
    }

    // Sockets: the job's share of each, with its power trace.
    let mut sockets: Vec<SocketEnergy> = Vec::new();
    let (mut cpu_total, mut dram_total): (Option<f64>, Option<f64>) = (None, None);
    if attributed {
        // Attributed, but never on a socket (no CPU allocated, no CPU time): measured as none.
        if r.share.sockets.is_empty() {
            let has = |d: RaplDomain| {
                facts
                    .zones
                    .iter()
                    .any(|z| z.socket.is_some() && z.domain == d)
            };
            cpu_total = has(RaplDomain::Package).then_some(0.0);
            dram_total = has(RaplDomain::Dram).then_some(0.0);
        }
        for (&socket, sh) in &r.share.sockets {
            let Some(package_j) = sh.package_j else {
                continue;
            };
            *cpu_total.get_or_insert(0.0) += package_j;
            if let Some(d) = sh.dram_j {
                *dram_total.get_or_insert(0.0) += d;
            }
            sockets.push(SocketEnergy {
                socket,
                package_j,
                dram_j: sh.dram_j,
                method: EnergyMethod::Counter,
                share_method: ShareMethod::CgroupCpuTime,
            });
            let points = r.cpu_trace.get(&socket).map(Vec::as_slice).unwrap_or(&[]);
            let mut pkg = vec![TraceSample {
                at_ns: start.mono_ns,
                energy_j: 0.0,
                power_w: None,
            }];
            let mut dram = pkg.clone();
            for &(at_ns, p, d) in points.iter().filter(|p| p.0 > start.mono_ns) {
                pkg.push(TraceSample {
                    at_ns,
                    energy_j: p,
                    power_w: None,
                });
                dram.push(TraceSample {
                    at_ns,
                    energy_j: d,
                    power_w: None,
                });
            }
            let (_, watts) = power_series(
                &pkg,
                trace_start_mono,
                end.mono_ns,
                bin_ns,
                MAX_TRACE_POINTS,
            );
            series.push(TraceSeries {
                name: format!("socket{socket}"),
                watts,
            });
            if sh.dram_j.is_some() {
                let (_, watts) = power_series(
                    &dram,
                    trace_start_mono,
                    end.mono_ns,
                    bin_ns,
                    MAX_TRACE_POINTS,
                );
                series.push(TraceSeries {
                    name: format!("dram{socket}"),
                    watts,
                });
            }
        }
    }

    // The node over the job's interval: the attributor's balance.
    let (node_energy, node_idle, node_unattributed) = (
        r.node.measured_j(),
        r.node.idle_j(),
        r.node.unattributed_j(),
    );

    // Steps: the job's energy during each step's own interval.
    let steps = job
        .steps
        .iter()
        .map(|s| {
            let s_start = s.start.unwrap_or(start);
            let s_end = s.end.or(job.end).unwrap_or(end);
            let (gpu_j, cpu_j, dram_j) = match r.steps.get(&s.id) {
                Some(sh) => (
                    if gpus.is_empty() { None } else { sh.gpu_j() },
                    sh.package_j(),
                    sh.dram_j(),
                ),
                None => (None, None, None),
            };
            StepEnergy {
                step: s.id,
                start_unix_ns: s_start.unix_ns,
                end_unix_ns: s_end.unix_ns.max(s_start.unix_ns),
                energy_j: gpu_j.unwrap_or(0.0) + cpu_j.unwrap_or(0.0) + dram_j.unwrap_or(0.0),
                gpu_j,
                cpu_j,
                dram_j,
            }
        })
        .collect();

    // cgroup CPU time of the job's steps, as the attributor counted it.
    let cpu_ns = r.cpu_ns;
    let cpu_steps = job.steps.iter().filter(|s| s.watched.is_some()).count();
    let mut sensors = facts.sensors.clone();
    for sensor in &mut sensors {
        match sensor.kind {
            SensorKind::Cgroup => {
                sensor.detail = format!(
                    "{}; job cgroup CPU time {:.3} s over {cpu_steps} step(s)",
                    sensor.detail,
                    cpu_ns as f64 / 1e9
                );
            }
            SensorKind::Nvml if !estimated_notes.is_empty() => {
                sensor.detail = format!("{}; {}", sensor.detail, estimated_notes.join("; "));
            }
            _ => {}
        }
    }

    let energy_j = gpu_total.unwrap_or(0.0) + cpu_total.unwrap_or(0.0) + dram_total.unwrap_or(0.0);
    let peak_total = (0..series.iter().map(|s| s.watts.len()).max().unwrap_or(0))
        .map(|k| {
            series
                .iter()
                .filter_map(|s| s.watts.get(k))
                .map(|&w| f64::from(w))
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    let avg_w = per_s(energy_j);
    // Coverage: the part of the job's interval with readings or recovered energy.
    gaps.extend(job.gaps.iter().cloned());
    // Stretches the sampler did not run in while the job did (ergond stopped, hung, starved,
    // a driver call blocking): the counters carry the energy across them, so the totals are
    // whole, but the power trace has a hole there. Those already a gap are not repeated.
    let unix_of = |mono: u64| {
        start
            .unix_ns
            .saturating_add(mono)
            .saturating_sub(start.mono_ns)
    };
    for &(from, to) in holes {
        if to <= start.mono_ns || from >= end.mono_ns {
            continue;
        }
        let (a, b) = (
            unix_of(from.max(start.mono_ns)),
            unix_of(to.min(end.mono_ns)),
        );
        if gaps
            .iter()
            .any(|g| g.start_unix_ns < b && g.end_unix_ns > a)
        {
            continue;
        }
        gaps.push(Gap::new(
            a,
            b,
            "ergond's sampler did not run in this stretch (ergond stopped, hung or starved, or \
             a sensor read blocked); the energy over it is in the totals from the hardware \
             counters, the power trace has a hole",
            true,
        ));
    }
    gaps.sort_by_key(|g| g.start_unix_ns);
    // Unrecovered time is the union of the unrecovered gaps (two may cover the same outage).
    let mut spans: Vec<(u64, u64)> = job
        .gaps
        .iter()
        .filter(|g| !g.recovered)
        .map(|g| (g.start_unix_ns, g.end_unix_ns.max(g.start_unix_ns)))
        .collect();
    spans.sort_unstable();
    let mut unrecovered_ns: u64 = 0;
    let mut reach: u64 = 0;
    for (a, b) in spans {
        let a = a.max(reach);
        if b > a {
            unrecovered_ns += b - a;
        }
        reach = reach.max(b);
    }
    let span_ns = end_unix.saturating_sub(start.unix_ns);
    // The part of the job's interval with readings or recovered energy, then per component.
    let time_fraction = if !(job.start_seen && attributed) {
        0.0
    } else if span_ns == 0 {
        if unrecovered_ns > 0 {
            0.0
        } else {
            1.0
        }
    } else {
        (1.0 - unrecovered_ns as f64 / span_ns as f64).clamp(0.0, 1.0)
    };
    let components = component_coverage(
        time_fraction,
        job.gpus_unknown.is_some(),
        &gpu_covered,
        facts,
        cpu_total.is_some(),
        dram_total.is_some(),
    );
    let gpu_total = if job.gpus_unknown.is_some() {
        None
    } else {
        gpu_total
    };
    let estimated_gaps = gaps.iter().any(|g| g.estimate.is_some());
    let mut manifest = Manifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        cluster: job
            .cluster
            .clone()
            .unwrap_or_else(|| default_cluster.to_owned()),
        node: job.node.clone(),
        job: JobInfo {
            job_id: job.job_id,
            array_job_id: job.array_job_id,
            array_task_id: job.array_task_id,
            user: job.user.clone().unwrap_or_else(|| "unknown".to_owned()),
            uid: job.uid.unwrap_or(UNKNOWN_UID),
            account: job.account.clone(),
            partition: job.partition.clone(),
            sluid: job.sluid.clone(),
            node_list: job.node_list.clone(),
        },
        start_unix_ns: start.unix_ns,
        end_unix_ns: end_unix,
        duration_s,
        steps,
        gpus,
        sockets,
        totals: Totals {
            energy_j,
            gpu_j: gpu_total,
            cpu_j: cpu_total,
            dram_j: dram_total,
            avg_w,
            peak_w: peak_total.max(avg_w),
        },
        node_context: NodeContext {
            node_energy_j: node_energy,
            idle_j: node_idle,
            unattributed_j: node_unattributed,
        },
        coverage: Coverage {
            fraction: components.lowest(),
            gaps,
            components: Some(components),
            gpus_unknown: job.gpus_unknown.clone(),
        },
        attribution: if attributed {
            AttributionInfo {
                model: MODEL_NAME.to_owned(),
                version: MODEL_VERSION,
                estimated: !r.share.estimated.is_empty()
                    || !estimated_notes.is_empty()
                    || estimated_gaps,
            }
        } else {
            AttributionInfo {
                model: UNATTRIBUTED_MODEL.to_owned(),
                version: 1,
                estimated: true,
            }
        },
        sensors,
        trace: PowerTrace {
            interval_ms: u32::try_from(bin_ns / 1_000_000).unwrap_or(u32::MAX),
            start_unix_ns: start.unix_ns + (trace_start_mono - start.mono_ns),
            series,
        },
        content_hash: String::new(),
    };
    manifest.schema_version = manifest.schema_version_for();
    manifest
}

/// Coverage per component: each component the job has on this node covers `time_fraction` of
/// its interval, except GPUs whose allocation is unknown (0), GPUs not read for part of it
/// (`gpu_covered`, per GPU: the mean is taken), and CPU or DRAM figures the attribution did not
/// produce (0). A
/// component the job does not have (no GPU allocated, no RAPL zone) is `None`.
fn component_coverage(
    time_fraction: f64,
    gpus_unknown: bool,
    gpu_covered: &[f64],
    facts: &NodeFacts,
    cpu_measured: bool,
    dram_measured: bool,
) -> ComponentCoverage {
    let has = |d: RaplDomain| {
        facts
            .zones
            .iter()
            .any(|z| z.socket.is_some() && z.domain == d)
    };
    let gpu = if gpus_unknown {
        Some(0.0)
    } else if !gpu_covered.is_empty() {
        Some(time_fraction * gpu_covered.iter().sum::<f64>() / gpu_covered.len() as f64)
    } else {
        None
    };
    let measured = |present: bool, measured: bool| {
        present.then_some(if measured { time_fraction } else { 0.0 })
    };
    ComponentCoverage {
        gpu,
        cpu: measured(has(RaplDomain::Package), cpu_measured),
        dram: measured(has(RaplDomain::Dram), dram_measured),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::AttributionConfig;
    use crate::jobs::attributor::Attributor;
    use crate::jobs::reading::Reading;
    use crate::jobs::registry::{EventTime, JobRegistry};
    use crate::sources::rapl::ZoneKey;
    use ergon_protocol::{
        CpuSet, GpuAlloc, JobEnd, JobIds, JobStart, SensorInfo, StepId, StepStart, Timestamp,
    };

    fn facts() -> NodeFacts {
        let gpu = |index, minor| GpuFact {
            index,
            uuid: format!("GPU-{index}"),
            minor: Some(minor),
            pci_bus_id: None,
            method: EnergyMethod::Counter,
            mig: None,
        };
        NodeFacts {
            gpus: vec![gpu(0, 7), gpu(1, 5), gpu(2, 3)],
            zones: vec![
                ZoneKey {
                    socket: Some(0),
                    die: None,
                    domain: RaplDomain::Package,
                },
                ZoneKey {
                    socket: Some(0),
                    die: None,
                    domain: RaplDomain::Core,
                },
                ZoneKey {
                    socket: Some(0),
                    die: None,
                    domain: RaplDomain::Dram,
                },
            ],
            sensors: vec![SensorInfo {
                kind: SensorKind::Nvml,
                version: "550".into(),
                detail: "3 GPUs".into(),
            }],
            sockets: vec![(0, CpuSet::parse("0-3").unwrap())],
        }
    }

    fn at(s: u64) -> EventTime {
        EventTime {
            unix_ns: 1_000_000_000_000 + s * 1_000_000_000,
            mono_ns: s * 1_000_000_000,
        }
    }

    /// GPU i draws (i+1)*100 W; package 50 W, core 30 W, DRAM 10 W.
    fn reading(s: u64) -> Reading {
        let t = s as f64;
        Reading {
            at_mono_ns: s * 1_000_000_000,
            gpus: (0..3).map(|i| Some((i + 1) as f64 * 100.0 * t)).collect(),
            zones: vec![Some(50.0 * t), Some(30.0 * t), Some(10.0 * t)],
            cgroups: vec![("job/step_0".into(), s * 2_000_000_000)],
            sockets: vec![],
            gpu_util: vec![],
            across: None,
        }
    }

    fn traces() -> Vec<Vec<TraceSample>> {
        (0..3)
            .map(|i| {
                (0..=100)
                    .map(|k| TraceSample {
                        at_ns: k * 100_000_000,
                        energy_j: (i + 1) as f64 * 10.0 * k as f64,
                        power_w: Some((i + 1) as f32 * 100.0),
                    })
                    .collect()
            })
            .collect()
    }

    fn ended_job(gpus: Vec<GpuAlloc>) -> Job {
        let mut r = JobRegistry::default();
        let start = JobStart {
            ids: JobIds {
                job_id: 42,
                array_job_id: None,
                array_task_id: None,
            },
            uid: 1000,
            gid: 1000,
            user: "alice".into(),
            account: None,
            partition: None,
            cluster: None,
            node: "n1".into(),
            gpus,
            cpus: CpuSet::new(),
            report: None,
            work_dir: None,
            stdout_path: None,
            time: Timestamp::default(),
            sluid: None,
            node_list: None,
        };
        r.job_start(&start, at(1)).unwrap();
        let step = StepStart {
            cluster: None,
            job_id: 42,
            array_job_id: None,
            array_task_id: None,
            step: StepId::Numbered(0),
            uid: 1000,
            node: "n1".into(),
            cgroups: vec![ergon_protocol::CgroupPath {
                controller: String::new(),
                path: "/job/step_0/user/task_0".into(),
            }],
            cpus: CpuSet::new(),
            pid: None,
            tasks: None,
            time: Timestamp::default(),
            sluid: None,
        };
        r.step_start(&step, at(2)).unwrap();
        let end = JobEnd {
            cluster: None,
            job_id: 42,
            node: "n1".into(),
            time: Timestamp::default(),
        };
        r.job_end(&end, at(5)).unwrap();
        r.take(42).unwrap()
    }

    /// The attributor's result for job 42 of [`ended_job`] holding the GPUs at snapshot
    /// positions `gpus` (on CPUs 0-1 from 1 s to 5 s, its step's cgroup from 2 s), the node
    /// read every second as [`reading`] gives it; `edit` may change each reading first.
    fn attributed(gpus: Vec<usize>, edit: impl Fn(u64, &mut Reading)) -> JobResult {
        let r = |s: u64| {
            let mut x = reading(s);
            x.cgroups = vec![("job/step_0".into(), s.saturating_sub(2) * 1_000_000_000)];
            x.sockets = vec![(0, s * 2_000_000_000, s * 4_000_000_000)];
            edit(s, &mut x);
            x
        };
        let mut att = Attributor::new(&facts(), AttributionConfig::default());
        att.advance(&r(1));
        att.job_start(42, gpus, CpuSet::parse("0-1").unwrap());
        att.advance(&r(2));
        att.step_start(42, StepId::Numbered(0), Some("job/step_0"), Some(0));
        for s in 3..=5 {
            att.advance(&r(s));
        }
        att.job_end(42).unwrap()
    }

    #[test]
    fn a_sampling_hole_in_the_job_is_a_recovered_gap_that_keeps_its_coverage() {
        let job = ended_job(vec![GpuAlloc {
            index: 0,
            minor: Some(3),
            mig: None,
        }]);
        // The job runs from 1 s to 5 s; the sampler stopped from 2 s to 3.5 s, and once
        // before the job (not its gap).
        let holes = [(100_000_000, 400_000_000), (2_000_000_000, 3_500_000_000)];
        let res = attributed(vec![2], |_, _| {});
        let m = build(&job, &facts(), &traces(), Some(&res), "cl", &holes);
        assert_eq!(m.coverage.gaps.len(), 1, "{:?}", m.coverage.gaps);
        let g = &m.coverage.gaps[0];
        assert!(g.recovered && g.estimate.is_none());
        assert_eq!(
            (g.start_unix_ns, g.end_unix_ns),
            (at(2).unix_ns, at(2).unix_ns + 1_500_000_000)
        );
        assert_eq!(m.coverage.components.unwrap().gpu, Some(1.0));
    }

    #[test]
    fn attributed_job_carries_its_socket_share_and_a_balanced_node_context() {
        let job = ended_job(vec![GpuAlloc {
            index: 0,
            minor: Some(3),
            mig: None,
        }]);
        // 4 CPUs, half busy; the job's step (from t = 2 s) uses 1 CPU-s per second.
        let res = attributed(vec![2], |_, _| {});
        let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // GPU minor 3 (300 W) × 4 s.
        assert!(close(m.totals.gpu_j.unwrap(), 1200.0));
        // Package 50 W, half active: the job's 1 of 2 busy CPU-s per second from 2 s gives it
        // 12.5 W × 3 s; half idle: its 2 of 4 CPUs give it 12.5 W × 4 s. 87.5 J in all.
        // DRAM (10 W) the same way: 2.5 W × 3 s + 2.5 W × 4 s = 17.5 J.
        assert_eq!(m.sockets.len(), 1);
        assert!(close(m.sockets[0].package_j, 87.5), "{:?}", m.sockets);
        assert!(close(m.sockets[0].dram_j.unwrap(), 17.5));
        assert!(close(m.totals.cpu_j.unwrap(), 87.5));
        assert!(close(m.totals.energy_j, 1305.0));
        // Node: 2640 J measured = this job 1305 + idle 60 (the unallocated CPUs' idle part)
        // + unattributed 1275 (the other GPUs 1200, busy CPU time outside jobs 75).
        let n = &m.node_context;
        assert!(close(n.node_energy_j, 2640.0));
        assert!(close(n.idle_j, 60.0), "{n:?}");
        assert!(close(n.unattributed_j, 1275.0), "{n:?}");
        assert!(close(
            m.totals.energy_j + n.idle_j + n.unattributed_j,
            n.node_energy_j
        ));
        assert_eq!(m.attribution.model, crate::attribution::MODEL_NAME);
        assert!(!m.attribution.estimated);
        // The step (from 2 s) gets the job's energy over its own 3 s.
        assert!(close(m.steps[0].gpu_j.unwrap(), 900.0));
        assert!(close(m.steps[0].cpu_j.unwrap(), 75.0), "{:?}", m.steps[0]);
        // Trace: the job's package share, 12.5 W in its first second, 25 W after.
        let sock = m.trace.series.iter().find(|s| s.name == "socket0").unwrap();
        assert_eq!(sock.watts.len(), 40);
        assert!(
            sock.watts[..10].iter().all(|&w| (w - 12.5).abs() < 0.01),
            "{sock:?}"
        );
        assert!(
            sock.watts[10..].iter().all(|&w| (w - 25.0).abs() < 0.01),
            "{sock:?}"
        );
        assert!(m.trace.series.iter().any(|s| s.name == "dram0"));
    }

    #[test]
    fn a_gpu_that_could_not_be_read_has_no_energy_not_zero() {
        let job = ended_job(vec![
            GpuAlloc {
                index: 0,
                minor: Some(3),
                mig: None,
            },
            GpuAlloc {
                index: 1,
                minor: Some(5),
                mig: None,
            },
        ]);
        // NVML position 2 (minor 3) is lost at 4 s: never read again.
        let res = attributed(vec![2, 1], |s, x| {
            if s >= 4 {
                x.gpus[2] = None;
            }
        });
        let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
        let lost = m.gpus.iter().find(|g| g.uuid == "GPU-2").unwrap();
        // Measured until it was lost (300 W for 2 s), and the job's GPU coverage says the rest
        // is not: 1 of 2 GPUs covered 2 of 4 s.
        assert_eq!(lost.energy_j, Some(600.0));
        assert_eq!(m.totals.gpu_j, Some(1400.0));
        assert_eq!(m.coverage.components.unwrap().gpu, Some(0.75));
        assert_eq!(m.coverage.fraction, 0.75);
        assert!(m.attribution.estimated);
        assert!(
            m.sensors[0].detail.contains("was not read for 2.0 s"),
            "{:?}",
            m.sensors
        );
        // A GPU never read has no energy: null, never 0.
        let res = attributed(vec![2, 1], |_, x| x.gpus[2] = None);
        let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
        let unread = m.gpus.iter().find(|g| g.uuid == "GPU-2").unwrap();
        assert_eq!((unread.energy_j, unread.avg_w), (None, None));
        assert_eq!(unread.method, EnergyMethod::Estimated);
        // The total counts what was measured, and says nothing about the unread GPU.
        assert_eq!(m.totals.gpu_j, Some(800.0));
        assert_eq!(m.coverage.components.unwrap().gpu, Some(0.5));
    }

    #[test]
    fn allocated_gpus_matched_by_minor_get_their_whole_energy() {
        let job = ended_job(vec![
            GpuAlloc {
                index: 0,
                minor: Some(3),
                mig: None,
            },
            GpuAlloc {
                index: 1,
                minor: Some(5),
                mig: None,
            },
        ]);
        let res = attributed(vec![2, 1], |_, _| {});
        let mut m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
        assert_eq!(m.gpus.len(), 2);
        // minor 3 is NVML position 2 (300 W), minor 5 position 1 (200 W); 4 s.
        assert_eq!(
            (m.gpus[0].uuid.as_str(), m.gpus[0].energy_j),
            ("GPU-2", Some(1200.0))
        );
        assert_eq!(
            (m.gpus[1].uuid.as_str(), m.gpus[1].energy_j),
            ("GPU-1", Some(800.0))
        );
        assert_eq!(m.gpus[0].avg_w, Some(300.0));
        assert_eq!(m.gpus[0].peak_w, Some(300.0));
        assert_eq!(m.totals.gpu_j, Some(2000.0));
        assert_eq!(m.duration_s, 4.0);
        let c = m.coverage.components.unwrap();
        assert_eq!((c.gpu, c.cpu, c.dram), (Some(1.0), Some(1.0), Some(1.0)));
        assert_eq!(m.coverage.fraction, 1.0);
        assert!(m.coverage.gaps.is_empty());
        assert_eq!(
            m.schema_version,
            ergon_protocol::MANIFEST_SCHEMA_VERSION_COVERAGE
        );
        assert_eq!(m.cluster, "cl");
        // Node: 600 W GPUs + 50 W package + 10 W DRAM (core is inside package), 4 s.
        assert_eq!(m.node_context.node_energy_j, 2640.0);
        // Step 0 from 2 s to the job's end (no StepEnd): 3 s × 500 W.
        assert_eq!(m.steps[0].gpu_j, Some(1500.0));
        assert_eq!(m.attribution.model, crate::attribution::MODEL_NAME);
        // Trace: 100 ms bins over 4 s, constant power.
        assert_eq!(m.trace.interval_ms, 100);
        assert_eq!(m.trace.series[0].name, "gpu0");
        assert_eq!(m.trace.series[0].watts.len(), 40);
        assert!(m.trace.series[0]
            .watts
            .iter()
            .all(|&w| (w - 300.0).abs() < 0.01));
        // Peak: both GPUs (500 W) and the job's CPU share once its step runs (25 W package,
        // 5 W DRAM).
        assert!(
            (m.totals.peak_w - 530.0).abs() < 0.01,
            "{}",
            m.totals.peak_w
        );
        m.seal();
        let back = Manifest::from_json(&m.to_json().unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn index_fallback_and_unmatched_gpus_are_marked_estimated() {
        let job = ended_job(vec![
            GpuAlloc {
                index: 0,
                minor: None,
                mig: None,
            },
            GpuAlloc {
                index: 1,
                minor: Some(99),
                mig: None,
            },
        ]);
        let res = attributed(vec![0], |_, _| {});
        let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
        assert_eq!(m.gpus.len(), 1);
        assert_eq!(m.gpus[0].uuid, "GPU-0");
        // The GPU that matches nothing is not covered.
        assert_eq!(m.coverage.components.unwrap().gpu, Some(0.5));
        assert!(m.attribution.estimated);
        let nvml = &m.sensors[0].detail;
        assert!(
            nvml.contains("matched by index") && nvml.contains("matches no NVML device"),
            "{nvml}"
        );
    }

    #[test]
    fn unseen_start_gives_zero_coverage_and_a_gap() {
        let mut job = ended_job(vec![GpuAlloc {
            index: 0,
            minor: Some(3),
            mig: None,
        }]);
        job.start_seen = false;
        let res = attributed(vec![], |_, _| {});
        let m = build(&job, &facts(), &traces(), Some(&res), "cl", &[]);
        assert_eq!(m.coverage.fraction, 0.0);
        assert_eq!(m.coverage.gaps.len(), 1);
        assert!(m.gpus.is_empty());
        assert_eq!(m.totals.gpu_j, None);
        assert!(m.to_json().is_ok());
    }

    #[test]
    fn a_job_the_attributor_never_had_has_no_figures_and_says_so() {
        let job = ended_job(vec![GpuAlloc {
            index: 0,
            minor: Some(3),
            mig: None,
        }]);
        let m = build(&job, &facts(), &traces(), None, "cl", &[]);
        assert_eq!((m.totals.gpu_j, m.totals.cpu_j), (None, None));
        assert_eq!(m.gpus[0].energy_j, None);
        assert_eq!(m.coverage.fraction, 0.0);
        assert!(m.coverage.gaps[0].reason.contains("no figures"));
        assert_eq!(m.attribution.model, UNATTRIBUTED_MODEL);
    }

    #[test]
    fn match_gpus_prefers_minor() {
        let f = facts().gpus;
        let got = match_gpus(
            &[
                GpuAlloc {
                    index: 2,
                    minor: Some(7),
                    mig: None,
                },
                GpuAlloc {
                    index: 2,
                    minor: None,
                    mig: None,
                },
            ],
            &f,
        );
        assert_eq!(got[0].1, Some((0, MatchedBy::Minor)));
        assert_eq!(got[1].1, Some((2, MatchedBy::Index)));
    }
}
