//! Building a job's [`Manifest`] from its registry entry, the counter readings taken at its
//! events and the sampler's traces. Pure: no I/O, no clock.
//!
//! # What is attributed (temporary model `gpu-exclusive-only`)
//!
//! Only GPUs are attributed: a GPU allocated to the job gets all of its energy between the
//! job's start and end readings, idle included (Slurm allocates GPUs exclusively). CPU and DRAM
//! attribution is not done here yet (it belongs to the attribution module); until it is wired
//! in:
//! - `sockets[]` is empty: a job's share of a socket is not known yet, and the node's whole
//!   package/DRAM energy there would read as the job's (the node's measured total over the job's
//!   interval is in `node_context.node_energy_j`);
//! - `totals.cpu_j` and `totals.dram_j` are `null` (not measured for the job, never 0) and
//!   `totals.energy_j` is GPU energy only;
//! - the job's cgroup CPU time is reported in the `cgroup` sensor's `detail`;
//! - `attribution` is `{model: "gpu-exclusive-only", version: 1, estimated: true}`.
//!
//! `node_context.node_energy_j` is every GPU plus every package and DRAM zone over the
//! interval; `idle_j` is 0 and `unattributed_j` the rest (other jobs' energy included).
//!
//! A job whose start ergond did not see (it was down) gets coverage 0 with one gap over its
//! known interval, its owner as `uid` 4294967295 / user `"unknown"` unless a step told it, and
//! no GPU energy (its allocation is unknown).

use ergon_protocol::{
    AttributionInfo, Coverage, EnergyMethod, Gap, GpuAlloc, GpuEnergy, JobInfo, Manifest,
    NodeContext, PowerTrace, SensorInfo, SensorKind, SocketEnergy, StepEnergy, Totals, TraceSeries,
    MANIFEST_SCHEMA_VERSION,
};

use super::reading::{power_series, window, Reading};
use super::registry::Job;
use crate::sampler::TraceSample;
use crate::sources::rapl::{RaplDomain, ZoneKey};

/// The attribution model name written while only GPUs are attributed.
pub const MODEL: &str = "gpu-exclusive-only";
/// Most points per trace series.
pub const MAX_TRACE_POINTS: usize = 600;
/// Shortest trace bin.
pub const MIN_TRACE_BIN_NS: u64 = 100_000_000;
/// `uid` written when the job's owner is unknown.
pub const UNKNOWN_UID: u32 = u32::MAX;

/// One GPU of the node, by position in the sampler's snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuFact {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// `/dev/nvidiaN` minor.
    pub minor: Option<u32>,
    /// PCI bus id.
    pub pci_bus_id: Option<String>,
    /// How its energy is measured.
    pub method: EnergyMethod,
}

/// What does not change while ergond runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeFacts {
    /// GPUs, by snapshot position.
    pub gpus: Vec<GpuFact>,
    /// RAPL zones, by snapshot position.
    pub zones: Vec<ZoneKey>,
    /// Sensors (NVML with its driver version, RAPL with its backend, cgroup version).
    pub sensors: Vec<SensorInfo>,
}

/// How an allocated GPU was matched to an NVML device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    /// By device minor: Slurm and NVML agree on it.
    Minor,
    /// By index, because the plugin sent no minor: right only when gres.conf lists the GPUs in
    /// NVML (PCI bus) order.
    Index,
}

/// Each allocated GPU with the position of its NVML device, if one matches.
pub fn match_gpus(
    allocs: &[GpuAlloc],
    gpus: &[GpuFact],
) -> Vec<(GpuAlloc, Option<(usize, MatchedBy)>)> {
    allocs
        .iter()
        .map(|a| {
            let m = match a.minor {
                Some(minor) => gpus
                    .iter()
                    .position(|g| g.minor == Some(minor))
                    .map(|p| (p, MatchedBy::Minor)),
                None => gpus
                    .iter()
                    .position(|g| g.index == a.index)
                    .map(|p| (p, MatchedBy::Index)),
            };
            (*a, m)
        })
        .collect()
}

/// Build the (unsealed) manifest of an ended job. `traces` holds each GPU's trace by snapshot
/// position (oldest first); `default_cluster` is used when the job did not say.
pub fn build(
    job: &Job,
    facts: &NodeFacts,
    traces: &[Vec<TraceSample>],
    default_cluster: &str,
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
    let readings = match (&job.start_reading, &job.end_reading) {
        (Some(a), Some(b)) if job.start_seen => Some((a, b)),
        _ => None,
    };
    let mut estimated_notes: Vec<String> = Vec::new();
    let mut gaps: Vec<Gap> = Vec::new();
    if !job.start_seen {
        gaps.push(Gap {
            start_unix_ns: start.unix_ns,
            end_unix_ns: end_unix,
            reason: "ergond did not see the job start (it was down or restarted); the job's \
                     start time and GPU allocation are unknown and no energy is attributed"
                .into(),
            recovered: false,
        });
    } else if readings.is_none() {
        gaps.push(Gap {
            start_unix_ns: start.unix_ns,
            end_unix_ns: end_unix,
            reason: "the counters could not be read at the job's start or end".into(),
            recovered: false,
        });
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
    for (alloc, m) in &matched {
        let Some((pos, by)) = *m else {
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
        let energy = readings.and_then(|(a, b)| a.gpu_delta(b, pos));
        let trace = traces.get(pos).map(Vec::as_slice).unwrap_or(&[]);
        let peak = window(trace, start.mono_ns, end.mono_ns)
            .iter()
            .filter_map(|s| s.power_w)
            .fold(None, |acc: Option<f32>, w| {
                Some(acc.map_or(w, |a| a.max(w)))
            });
        // A GPU that could not be read at the job's start or end has no energy: `null`, never 0.
        let method = match energy {
            Some(_) => fact.method,
            None => {
                estimated_notes.push(format!(
                    "GPU {} could not be read at the job's start or end: its energy is unknown",
                    fact.uuid
                ));
                EnergyMethod::Estimated
            }
        };
        if let Some(e) = energy {
            *gpu_total.get_or_insert(0.0) += e;
        }
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
            shared: false,
        });
        let (_, watts) = power_series(
            trace,
            trace_start_mono,
            end.mono_ns,
            bin_ns,
            MAX_TRACE_POINTS,
        );
        series.push(TraceSeries {
            name: format!("gpu{}", alloc.index),
            watts,
        });
    }

    // The node's measured total over the job's interval: every GPU and every package and DRAM
    // zone. Per-socket job shares wait for the attribution module (see the module docs).
    let sockets: Vec<SocketEnergy> = Vec::new();
    let mut node_energy = 0.0;
    if let Some((a, b)) = readings {
        for (pos, _) in facts.gpus.iter().enumerate() {
            node_energy += a.gpu_delta(b, pos).unwrap_or(0.0);
        }
        for (pos, key) in facts.zones.iter().enumerate() {
            let Some(d) = a.zone_delta(b, pos) else {
                continue;
            };
            if key.socket.is_some() && matches!(key.domain, RaplDomain::Package | RaplDomain::Dram)
            {
                node_energy += d;
            }
        }
    }

    // Steps.
    let steps = job
        .steps
        .iter()
        .map(|s| {
            let s_start = s.start.unwrap_or(start);
            let s_end = s.end.or(job.end).unwrap_or(end);
            let from: Option<&Reading> = s.start_reading.as_ref();
            let to: Option<&Reading> = s.end_reading.as_ref().or(job.end_reading.as_ref());
            let gpu_j = match (from, to) {
                (Some(a), Some(b)) if !gpus.is_empty() => matched
                    .iter()
                    .filter_map(|(_, m)| m.map(|(p, _)| a.gpu_delta(b, p)))
                    .sum::<Option<f64>>(),
                _ => None,
            };
            StepEnergy {
                step: s.id,
                start_unix_ns: s_start.unix_ns,
                end_unix_ns: s_end.unix_ns.max(s_start.unix_ns),
                energy_j: gpu_j.unwrap_or(0.0),
                gpu_j,
                cpu_j: None,
                dram_j: None,
            }
        })
        .collect();

    // cgroup CPU time of the job's steps.
    let mut cpu_ns: u64 = 0;
    let mut cpu_steps = 0;
    for s in &job.steps {
        let Some(path) = &s.watched else { continue };
        let a = s.start_reading.as_ref().and_then(|r| r.cgroup_ns(path));
        let b = s
            .end_reading
            .as_ref()
            .or(job.end_reading.as_ref())
            .and_then(|r| r.cgroup_ns(path));
        if let (Some(a), Some(b)) = (a, b) {
            cpu_ns += b.saturating_sub(a);
            cpu_steps += 1;
        }
    }
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

    let energy_j = gpu_total.unwrap_or(0.0);
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
    let covered = job.start_seen && readings.is_some();
    Manifest {
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
            cpu_j: None,
            dram_j: None,
            avg_w,
            peak_w: peak_total.max(avg_w),
        },
        node_context: NodeContext {
            node_energy_j: node_energy,
            idle_j: 0.0,
            unattributed_j: (node_energy - energy_j).max(0.0),
        },
        coverage: Coverage {
            fraction: if covered { 1.0 } else { 0.0 },
            gaps,
        },
        attribution: AttributionInfo {
            model: MODEL.to_owned(),
            version: 1,
            estimated: true,
        },
        sensors,
        trace: PowerTrace {
            interval_ms: u32::try_from(bin_ns / 1_000_000).unwrap_or(u32::MAX),
            start_unix_ns: start.unix_ns + (trace_start_mono - start.mono_ns),
            series,
        },
        content_hash: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::registry::{EventTime, JobRegistry, Mark};
    use ergon_protocol::{CpuSet, JobEnd, JobIds, JobStart, StepId, StepStart, Timestamp};

    fn facts() -> NodeFacts {
        let gpu = |index, minor| GpuFact {
            index,
            uuid: format!("GPU-{index}"),
            minor: Some(minor),
            pci_bus_id: None,
            method: EnergyMethod::Counter,
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
        };
        r.job_start(&start, at(1)).unwrap();
        r.record_reading(42, Mark::JobStart, reading(1));
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
        };
        r.step_start(&step, at(2)).unwrap();
        r.record_reading(42, Mark::StepStart(StepId::Numbered(0)), reading(2));
        let end = JobEnd {
            cluster: None,
            job_id: 42,
            node: "n1".into(),
            time: Timestamp::default(),
        };
        r.job_end(&end, at(5)).unwrap();
        r.record_reading(42, Mark::JobEnd, reading(5));
        r.take(42).unwrap()
    }

    #[test]
    fn a_gpu_that_could_not_be_read_has_no_energy_not_zero() {
        let mut job = ended_job(vec![
            GpuAlloc {
                index: 0,
                minor: Some(3),
            },
            GpuAlloc {
                index: 1,
                minor: Some(5),
            },
        ]);
        // NVML position 2 (minor 3) failed at the job's end.
        job.end_reading.as_mut().unwrap().gpus[2] = None;
        let m = build(&job, &facts(), &traces(), "cl");
        let unread = m.gpus.iter().find(|g| g.uuid == "GPU-2").unwrap();
        assert_eq!((unread.energy_j, unread.avg_w), (None, None));
        assert_eq!(unread.method, EnergyMethod::Estimated);
        // The total counts what was measured, and says nothing about the unread GPU.
        assert_eq!(m.totals.gpu_j, Some(800.0));
    }

    #[test]
    fn allocated_gpus_matched_by_minor_get_their_whole_energy() {
        let job = ended_job(vec![
            GpuAlloc {
                index: 0,
                minor: Some(3),
            },
            GpuAlloc {
                index: 1,
                minor: Some(5),
            },
        ]);
        let mut m = build(&job, &facts(), &traces(), "cl");
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
        assert_eq!(m.totals.cpu_j, None);
        assert_eq!(m.duration_s, 4.0);
        assert_eq!(m.coverage.fraction, 1.0);
        assert!(m.coverage.gaps.is_empty());
        assert_eq!(m.cluster, "cl");
        // Node: 600 W GPUs + 50 W package + 10 W DRAM (core is inside package), 4 s.
        assert_eq!(m.node_context.node_energy_j, 2640.0);
        // No per-socket job share yet: nothing that would read as the job's CPU energy.
        assert!(m.sockets.is_empty());
        // Step 0 from 2 s to the job's end (no StepEnd): 3 s × 500 W.
        assert_eq!(m.steps[0].gpu_j, Some(1500.0));
        assert_eq!(m.attribution.model, MODEL);
        // Trace: 100 ms bins over 4 s, constant power.
        assert_eq!(m.trace.interval_ms, 100);
        assert_eq!(m.trace.series[0].name, "gpu0");
        assert_eq!(m.trace.series[0].watts.len(), 40);
        assert!(m.trace.series[0]
            .watts
            .iter()
            .all(|&w| (w - 300.0).abs() < 0.01));
        assert!((m.totals.peak_w - 500.0).abs() < 0.01);
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
            },
            GpuAlloc {
                index: 1,
                minor: Some(99),
            },
        ]);
        let m = build(&job, &facts(), &traces(), "cl");
        assert_eq!(m.gpus.len(), 1);
        assert_eq!(m.gpus[0].uuid, "GPU-0");
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
        }]);
        job.start_seen = false;
        let m = build(&job, &facts(), &traces(), "cl");
        assert_eq!(m.coverage.fraction, 0.0);
        assert_eq!(m.coverage.gaps.len(), 1);
        assert!(m.gpus.is_empty());
        assert_eq!(m.totals.gpu_j, None);
        assert!(m.to_json().is_ok());
    }

    #[test]
    fn match_gpus_prefers_minor() {
        let f = facts().gpus;
        let got = match_gpus(
            &[
                GpuAlloc {
                    index: 2,
                    minor: Some(7),
                },
                GpuAlloc {
                    index: 2,
                    minor: None,
                },
            ],
            &f,
        );
        assert_eq!(got[0].1, Some((0, MatchedBy::Minor)));
        assert_eq!(got[1].1, Some((2, MatchedBy::Index)));
    }
}
