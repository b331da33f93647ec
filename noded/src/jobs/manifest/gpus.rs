//! The job's GPUs in its manifest: each allocated GPU matched to a device, its share of the
//! energy from the attributor (MIG instances and shared GPUs included), its peak, its coverage
//! and its power trace.

use ergon_protocol::{
    EnergyMethod, GpuEnergy, GpuMig, MigInstanceRef, MigShareMethod, TraceSeries,
};

use super::super::attributor::JobResult;
use super::super::facts::{gpu_key, MatchedBy, NodeFacts};
use super::super::reading::{interpolate, power_series, window};
use super::span::{Span, MAX_TRACE_POINTS};
use crate::attribution::EstimateReason;
use crate::gpustats::DEFAULT_IDLE_GPU_UTIL_PERCENT;
use crate::sampler::TraceSample;

/// What [`gpus`] found: the GPUs' entries, the job's GPU energy (`None`: none measured), and
/// per allocated GPU the part of the job's interval its energy covers.
pub(super) struct GpuPart {
    pub gpus: Vec<GpuEnergy>,
    pub total: Option<f64>,
    pub covered: Vec<f64>,
}

/// The job's GPUs (`matched`: its allocation matched to the node's devices by position in
/// `facts.gpus`). Notes on what is estimated go to `estimated_notes`, each GPU's power trace to
/// `series`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gpus(
    matched: &[(ergon_protocol::GpuAlloc, Option<(usize, MatchedBy)>)],
    facts: &NodeFacts,
    traces: &[Vec<TraceSample>],
    r: &JobResult,
    attributed: bool,
    span: &Span,
    estimated_notes: &mut Vec<String>,
    series: &mut Vec<TraceSeries>,
) -> GpuPart {
    let (start, end) = (span.start, span.end);
    let (trace_start_mono, bin_ns) = (span.trace_start_mono, span.bin_ns);
    let per_s = |j: f64| span.per_s(j);
    let mut gpus = Vec::new();
    let mut gpu_total: Option<f64> = None;
    // Per allocated GPU: the part of the job's interval its energy covers (0 for one that
    // matches no device or was never read).
    let mut gpu_covered: Vec<f64> = Vec::new();
    let span_mono = end.mono_ns.saturating_sub(start.mono_ns);
    let mut mig_done: Vec<usize> = Vec::new();
    for (alloc, m) in matched {
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
            efficiency: r.gpu_stats.get(&minor_key).map(|s| {
                s.efficiency(
                    span_mono,
                    |mono| {
                        let unix = i128::from(start.unix_ns) + i128::from(mono)
                            - i128::from(start.mono_ns);
                        u64::try_from(unix.max(0)).unwrap_or(0)
                    },
                    DEFAULT_IDLE_GPU_UTIL_PERCENT,
                )
            }),
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
    GpuPart {
        gpus,
        total: gpu_total,
        covered: gpu_covered,
    }
}
