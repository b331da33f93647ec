//! What to draw ([`Plot`]): one series per trace per node, the job's and steps' intervals, the
//! legend's energies and the title, built from the manifests (pure, no files).

use std::collections::BTreeMap;

use ergon_protocol::format;
use ergon_protocol::manifest::Manifest;
use ergon_protocol::StepId;

use super::error::PlotError;
use crate::collect::combine;

/// Everything drawn, in data units (seconds since the job's start, watts).
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    /// `job 42 — total 3.17 kJ (gpu 2.75 kJ / cpu 420 J / dram n/a)`.
    pub title: String,
    /// Cluster, user, nodes, duration (and coverage when incomplete).
    pub subtitle: String,
    /// One per trace series per node, sorted by node, then gpu/socket/dram, then index.
    pub series: Vec<Series>,
    /// `job 42`: the label of the job's interval.
    pub job_label: String,
    /// The job's end, seconds after its start (the earliest node start).
    pub job_end_s: f64,
    /// The job's steps, merged over nodes by step id, in start order.
    pub steps: Vec<StepSpan>,
}

/// One trace series of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// `gpu0`, or `node1/gpu0` when the job spans several nodes.
    pub label: String,
    /// The legend's energy: the manifest's figure (`1.80 kJ`), `n/a` when it is null, or
    /// `≈ 1.80 kJ (trace)` when the manifest has no figure for the device.
    pub energy: String,
    /// The trace as steps: two points per bin, at its start and its end (seconds, watts).
    pub points: Vec<(f64, f64)>,
}

/// One step's interval.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSpan {
    /// `step 0`, `batch`, `extern`, …
    pub label: String,
    /// Start, seconds after the job's start.
    pub start_s: f64,
    /// End, seconds after the job's start.
    pub end_s: f64,
}

pub(super) fn format_opt(joules: Option<f64>) -> String {
    joules.map_or_else(|| "n/a".into(), format::energy)
}

/// Sort key of a series name: gpus, then sockets, then dram, then anything else; by number.
pub(super) fn series_key(name: &str) -> (u8, u64, String) {
    let (rank, rest) = if let Some(r) = name.strip_prefix("gpu") {
        (0, r)
    } else if let Some(r) = name.strip_prefix("socket") {
        (1, r)
    } else if let Some(r) = name.strip_prefix("dram") {
        (2, r)
    } else {
        (3, name)
    };
    match rest.parse::<u64>() {
        Ok(n) if rank < 3 => (rank, n, String::new()),
        _ => (3, 0, name.to_owned()),
    }
}

/// The energy the manifest gives for the device of series `name`: `Some(figure)` (itself `None`
/// when the manifest says null), or `None` when the manifest has no entry for it.
pub(super) fn reported_energy(m: &Manifest, name: &str) -> Option<Option<f64>> {
    let number = |prefix: &str| name.strip_prefix(prefix)?.parse::<u32>().ok();
    if let Some(i) = number("gpu") {
        return m.gpus.iter().find(|g| g.index == i).map(|g| g.energy_j);
    }
    if let Some(i) = number("socket") {
        return m
            .sockets
            .iter()
            .find(|s| s.socket == i)
            .map(|s| Some(s.package_j));
    }
    if let Some(i) = number("dram") {
        return m.sockets.iter().find(|s| s.socket == i).map(|s| s.dram_j);
    }
    None
}

/// What to draw for `job_id` from its verified manifests (one per node, all of one job and
/// cluster).
///
/// Errors: [`PlotError::NoManifests`] for none, [`PlotError::SeveralClusters`] when they come from
/// several clusters, [`PlotError::NoTrace`] when no series has a point.
pub fn build(job_id: u32, manifests: &[Manifest]) -> Result<Plot, PlotError> {
    if manifests.is_empty() {
        return Err(PlotError::NoManifests {
            job_id,
            cluster: String::new(),
            dirs: "(none given)".into(),
        });
    }
    // The same manifest found twice (a spool listed twice, or a file given twice) counts once.
    let mut sorted: Vec<&Manifest> = manifests.iter().collect();
    sorted.sort_by(|a, b| {
        a.node
            .cmp(&b.node)
            .then(a.content_hash.cmp(&b.content_hash))
    });
    sorted.dedup_by(|a, b| a.content_hash == b.content_hash);
    let mut clusters: Vec<&str> = sorted.iter().map(|m| m.cluster.as_str()).collect();
    clusters.sort_unstable();
    clusters.dedup();
    if clusters.len() > 1 {
        return Err(PlotError::SeveralClusters {
            job_id,
            clusters: clusters.join(", "),
        });
    }
    let unique: Vec<Manifest> = sorted.iter().map(|m| (*m).clone()).collect();
    let job = combine(&unique);
    let mut nodes: Vec<&str> = sorted.iter().map(|m| m.node.as_str()).collect();
    nodes.dedup();
    let several_nodes = nodes.len() > 1;
    let start = job.start_unix_ns;
    let rel = |ns: u64| (i128::from(ns) - i128::from(start)) as f64 / 1e9;

    let mut series = Vec::new();
    for m in &sorted {
        let dt = f64::from(m.trace.interval_ms) / 1000.0;
        if m.trace.interval_ms == 0 && m.trace.series.iter().any(|s| !s.watts.is_empty()) {
            tracing::warn!(
                "node {}: the trace has an interval of 0 ms; its series are not drawn",
                m.node
            );
        }
        let t0 = rel(m.trace.start_unix_ns);
        let mut own: Vec<_> = m.trace.series.iter().collect();
        own.sort_by_key(|s| series_key(&s.name));
        for s in own {
            let points: Vec<(f64, f64)> = if dt > 0.0 {
                s.watts
                    .iter()
                    .enumerate()
                    .flat_map(|(k, &w)| {
                        let a = t0 + k as f64 * dt;
                        [(a, f64::from(w)), (a + dt, f64::from(w))]
                    })
                    .filter(|(_, w)| w.is_finite())
                    .collect()
            } else {
                Vec::new()
            };
            let mut energy = match reported_energy(m, &s.name) {
                Some(figure) => format_opt(figure),
                None => {
                    let integrated: f64 = s.watts.iter().map(|&w| f64::from(w)).sum::<f64>() * dt;
                    format!("≈ {} (trace)", format::energy(integrated))
                }
            };
            if points.is_empty() {
                energy.push_str(", no trace");
            }
            series.push(Series {
                label: if several_nodes {
                    format!("{}/{}", m.node, s.name)
                } else {
                    s.name.clone()
                },
                energy,
                points,
            });
        }
    }
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(PlotError::NoTrace {
            job_id,
            nodes: nodes.join(", "),
        });
    }

    let mut merged: BTreeMap<StepId, (u64, u64)> = BTreeMap::new();
    for m in &sorted {
        for s in &m.steps {
            let e = merged
                .entry(s.step)
                .or_insert((s.start_unix_ns, s.end_unix_ns));
            e.0 = e.0.min(s.start_unix_ns);
            e.1 = e.1.max(s.end_unix_ns);
        }
    }
    let mut steps: Vec<StepSpan> = merged
        .into_iter()
        .map(|(id, (a, b))| StepSpan {
            label: match id {
                StepId::Numbered(n) => format!("step {n}"),
                other => other.to_string(),
            },
            start_s: rel(a),
            end_s: rel(b.max(a)),
        })
        .collect();
    steps.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));

    let mut subtitle = format!(
        "cluster {} · user {} · {} node{} · {}",
        job.cluster,
        job.user,
        nodes.len(),
        if several_nodes { "s" } else { "" },
        format::duration(job.duration_s)
    );
    if job.coverage_min < 0.9995 {
        subtitle += &format!(
            " · readings cover {:.0}% of the job",
            job.coverage_min * 100.0
        );
    }
    Ok(Plot {
        title: format!(
            "job {job_id} — total {} (gpu {} / cpu {} / dram {})",
            format::energy(job.energy_j),
            format_opt(job.gpu_j),
            format_opt(job.cpu_j),
            format_opt(job.dram_j)
        ),
        subtitle,
        series,
        job_label: format!("job {job_id}"),
        job_end_s: job.duration_s,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_order() {
        let mut names = vec![
            "dram0", "gpu10", "socket1", "gpu2", "nic0", "socket0", "gpu0",
        ];
        names.sort_by_key(|n| series_key(n));
        assert_eq!(
            names,
            ["gpu0", "gpu2", "gpu10", "socket0", "socket1", "dram0", "nic0"]
        );
    }
}
