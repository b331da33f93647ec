//! The job's CPU packages and DRAM in its manifest: its share of each socket from the
//! attributor, with their power traces.

use ergon_protocol::{EnergyMethod, ShareMethod, SocketEnergy, TraceSeries};

use super::super::attributor::JobResult;
use super::super::facts::NodeFacts;
use super::super::reading::power_series;
use super::span::{Span, MAX_TRACE_POINTS};
use crate::sampler::TraceSample;
use crate::sources::rapl::RaplDomain;

/// What [`sockets`] found: the sockets' entries and the job's package and DRAM energy (`None`:
/// not measured).
pub(super) struct SocketPart {
    pub sockets: Vec<SocketEnergy>,
    pub cpu_total: Option<f64>,
    pub dram_total: Option<f64>,
}

/// The job's sockets; each one's power traces go to `series`.
pub(super) fn sockets(
    facts: &NodeFacts,
    r: &JobResult,
    attributed: bool,
    span: &Span,
    series: &mut Vec<TraceSeries>,
) -> SocketPart {
    let (start, end) = (span.start, span.end);
    let (trace_start_mono, bin_ns) = (span.trace_start_mono, span.bin_ns);
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
    SocketPart {
        sockets,
        cpu_total,
        dram_total,
    }
}
