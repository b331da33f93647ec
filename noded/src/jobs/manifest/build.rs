//! [`build`]: the manifest of an ended job, from its parts.

use ergon_protocol::{
    AttributionInfo, Coverage, Gap, JobInfo, Manifest, NodeContext, PowerTrace, SensorKind,
    StepEnergy, Totals, MANIFEST_SCHEMA_VERSION,
};

use super::super::attributor::JobResult;
use super::super::facts::{match_gpus, NodeFacts};
use super::super::registry::Job;
use super::coverage::{component_coverage, time_fraction};
use super::gpus::{gpus, GpuPart};
use super::sockets::{sockets, SocketPart};
use super::span::{Span, MAX_TRACE_POINTS, MIN_TRACE_BIN_NS};
use crate::attribution::{MODEL_NAME, MODEL_VERSION};
use crate::sampler::TraceSample;

/// The model named when the attributor had no result for the job: nothing is attributed.
pub const UNATTRIBUTED_MODEL: &str = "unattributed";
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
    let span = Span {
        start,
        end,
        duration_s,
        trace_start_mono,
        bin_ns,
    };
    let per_s = |j: f64| span.per_s(j);
    let mut series = Vec::new();
    let GpuPart {
        gpus,
        total: gpu_total,
        covered: gpu_covered,
    } = gpus(
        &matched,
        facts,
        traces,
        r,
        attributed,
        &span,
        &mut estimated_notes,
        &mut series,
    );

    // Sockets: the job's share of each, with its power trace.
    let SocketPart {
        sockets,
        cpu_total,
        dram_total,
    } = sockets(facts, r, attributed, &span, &mut series);

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
    let time_fraction = time_fraction(job, &span, end_unix, attributed, holes, &mut gaps);
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
        wall: None,
        content_hash: String::new(),
    };
    manifest.schema_version = manifest.schema_version_for();
    manifest
}

/// The manifest's `wall` section: the job's energy at the wall, when the node meter covered any
/// of it (nothing otherwise: no meter, nothing invented).
pub fn wall_section(
    job: &crate::jobs::registry::Job,
    result: Option<&crate::jobs::attributor::JobResult>,
    meter: Option<&crate::sampler::MeterInfo>,
    rule: crate::attribution::RestRule,
) -> Option<ergon_protocol::manifest::WallEnergy> {
    use ergon_protocol::manifest::{WallEnergy, WallInterval, WallMeter};
    let (w, meter) = (result?.wall.as_ref()?, meter?);
    let unix_of = |mono: u64| {
        let s = &job.start;
        if mono >= s.mono_ns {
            s.unix_ns + (mono - s.mono_ns)
        } else {
            s.unix_ns.saturating_sub(s.mono_ns - mono)
        }
    };
    Some(WallEnergy {
        energy_j: w.wall_j(),
        components_j: w.components_j,
        rest_of_node_j: w.rest_j,
        rule: rule.to_string(),
        meter: WallMeter {
            kind: meter.kind.to_string(),
            source: meter.source.clone(),
            resolution_s: meter.resolution_ns as f64 / 1e9,
            accuracy_percent: meter.accuracy_percent,
        },
        metered_s: w.metered_ns as f64 / 1e9,
        unmetered_s: w.unmetered_ns as f64 / 1e9,
        disagreements: w.disagreements,
        disagreement_intervals: w
            .disagreement_intervals
            .iter()
            .map(|&(a, b)| WallInterval {
                start_unix_ns: unix_of(a),
                end_unix_ns: unix_of(b),
            })
            .collect(),
    })
}
