//! `ergon report JOBID` (for users) and `ergon status` (for admins).

use std::path::PathBuf;

use ergon_protocol::format;
use ergon_protocol::manifest::Manifest;
use ergon_protocol::record::{find_in_field, strip_from_field, JobRecord};
use serde::Serialize;

use crate::collect::{self, combine};
use crate::config::Config;
use crate::job::JobRecordFull;
use crate::records::{RecordsDb, RecordsError};
use crate::sacct::Sacct;
use crate::spool;
use crate::state::{Delivery, State};

/// What `ergon report` shows.
#[derive(Debug, Serialize)]
pub struct JobReport {
    /// The job.
    pub job_id: u32,
    /// The sacct field read.
    pub field: String,
    /// The record found in sacct.
    pub sacct_record: Option<JobRecord>,
    /// Why there is none, or why it did not decode.
    pub sacct_note: Option<String>,
    /// The field's other content.
    pub foreign_content: Option<String>,
    /// The job record: from the job-records database once `ergon run` collected it, else
    /// combined from readable manifests in the spools.
    pub manifests: Option<JobRecordFull>,
    /// Where `manifests` came from: `records` (the database) or `spool`.
    pub source: Option<&'static str>,
    /// Manifest files that matched the job but did not verify.
    pub manifest_problems: Vec<String>,
    /// Why the detailed view (the job-records database, the spools' manifests) is not available
    /// to the caller: private job data they may not read. The figures are then sacct's only.
    pub restricted: Option<String>,
}

/// Build the report of `job_id` (from sacct on `cluster`, or sacct's default cluster).
pub fn job_report(config: &Config, cluster: Option<&str>, job_id: u32) -> JobReport {
    let sacct = Sacct::new(config.sacct.clone());
    let mut report = JobReport {
        job_id,
        field: sacct.field().name().to_owned(),
        sacct_record: None,
        sacct_note: None,
        foreign_content: None,
        manifests: None,
        source: None,
        manifest_problems: Vec::new(),
        restricted: None,
    };
    match sacct.read(cluster, &[job_id]) {
        Ok(values) => match values.get(&job_id) {
            None => report.sacct_note = Some(format!("sacct does not list job {job_id}")),
            Some(value) => {
                let foreign = strip_from_field(value);
                if !foreign.is_empty() {
                    report.foreign_content = Some(foreign);
                }
                match find_in_field(value) {
                    Some(Ok(r)) => report.sacct_record = Some(r),
                    Some(Err(e)) => report.sacct_note = Some(e.to_string()),
                    None => report.sacct_note = Some(
                        "no ergon record in sacct (yet): `ergon run` writes it after the job ends"
                            .into(),
                    ),
                }
            }
        },
        Err(e) => report.sacct_note = Some(e),
    }
    // The database first: one indexed look-up, however large the spool. A job not in it (not
    // collected yet, or collected before the database existed) is read from the spool.
    // Private job data the caller may not read: not read at all (no partial view, no file
    // names), and said once.
    let mut denied: Vec<String> = Vec::new();
    let records_denied = config.records.enabled
        && matches!(config.records_location(),
            crate::records::Location::Sqlite(ref p) if crate::privacy::denied(p));
    if records_denied {
        denied.push("the job-records database".into());
    }
    let spools: Vec<PathBuf> = config
        .spool_dirs
        .iter()
        .filter(|d| {
            let no = crate::privacy::denied(d);
            if no && !denied.iter().any(|w| w == "the spool") {
                denied.push("the spool".into());
            }
            !no
        })
        .cloned()
        .collect();
    if !denied.is_empty() {
        report.restricted = Some(format!(
            "{} {} readable by root and the ergon group only (private job data, following \
             Slurm's PrivateData): the figures are the job's sacct record, which Slurm shows to \
             whom its PrivateData allows",
            denied.join(" and "),
            if denied.len() == 1 { "is" } else { "are" }
        ));
    }
    if config.records.enabled && !records_denied {
        match from_records(config, cluster, job_id) {
            Ok(Some((record, others))) => {
                if !others.is_empty() {
                    report.manifest_problems.push(format!(
                        "job {job_id} is also in cluster(s) {}: give --cluster to choose",
                        others.join(", ")
                    ));
                }
                report.manifests = Some(record);
                report.source = Some("records");
                return report;
            }
            Ok(None) => {}
            Err(RecordsError::Missing { .. }) => {}
            Err(e) => report
                .manifest_problems
                .push(format!("{e}; the spool was read instead")),
        }
    }
    let files = spool::find_job(&spools, cluster, job_id);
    let (denied_files, unreadable): (Vec<String>, Vec<String>) = files
        .unreadable
        .into_iter()
        .partition(|p| p.contains("Permission denied"));
    if !denied_files.is_empty() && report.restricted.is_none() {
        report.restricted = Some(
            "the job's manifests are readable by root and the ergon group only (private job \
             data, following Slurm's PrivateData): the figures are the job's sacct record"
                .into(),
        );
    }
    report.manifest_problems.extend(unreadable);
    report.manifest_problems.extend(files.unverified);
    // The same manifest in two spools counts once.
    let mut found: Vec<Manifest> = Vec::new();
    for (_, m) in files.found {
        if !found.iter().any(|f| f.content_hash == m.content_hash) {
            found.push(m);
        }
    }
    if !found.is_empty() {
        let mut record = combine(&found);
        if let Some(f) = crate::carbon::Factors::new(config.carbon.as_ref(), config.cost.as_ref()) {
            f.apply(&mut record, &found);
        }
        report.manifests = Some(record);
        report.source = Some("spool");
        // The detail came from the spool: a database the caller may not read took nothing away.
        report.restricted = None;
    }
    report
}

/// The job's record in the database (the first cluster's, with the other clusters that have the
/// job id), if it is there.
fn from_records(
    config: &Config,
    cluster: Option<&str>,
    job_id: u32,
) -> Result<Option<(JobRecordFull, Vec<String>)>, RecordsError> {
    let db = RecordsDb::open_location_read_only(&config.records_location())?;
    let mut found = db.get(cluster, job_id)?.into_iter();
    Ok(found
        .next()
        .map(|first| (first, found.map(|r| r.cluster).collect())))
}

/// The report as text.
pub fn render_job_report(r: &JobReport) -> String {
    let mut out = format!("job {}\n", r.job_id);
    match &r.sacct_record {
        Some(rec) => {
            // GPUs unknown on a node: the GPU part is unknown there, never shown as a zero.
            let gpu = match rec.gpus_unknown_nodes {
                0 => format!("gpu {} J", rec.gpu_j),
                n if n >= rec.nodes => "gpu unknown".to_owned(),
                n => format!("gpu {} J + unknown on {n} node(s)", rec.gpu_j),
            };
            out += &format!(
                "  energy    {} = {:.3} kWh ({} J){}\n  by part   {gpu}, cpu {} J, dram {} J{}\n  power     average {}, peak {}\n  gpus      {} on {} node(s){}\n  coverage  {}{}\n",
                format::energy(rec.energy_j as f64),
                rec.energy_j as f64 / 3.6e6,
                rec.energy_j,
                rec.estimate_bound_j
                    .map(|b| format!(" ± {b} J estimated"))
                    .unwrap_or_default(),
                rec.cpu_j,
                rec.dram_j,
                rec.other_j.map(|o| format!(", other {o} J")).unwrap_or_default(),
                format::power(rec.avg_w),
                format::power(rec.peak_w),
                rec.gpus,
                rec.nodes,
                match rec.gpus_unknown_nodes {
                    0 => String::new(),
                    n => format!("; GPUs unknown on {n} node(s)"),
                },
                format::percent(rec.coverage),
                components(rec.coverage_gpu, rec.coverage_cpu, rec.coverage_dram)
            );
            if let Some(all) = rec.nodes_expected {
                out += &format!(
                    "  incomplete: {} of the job's {all} nodes reported; the figures cover those only\n",
                    rec.nodes
                );
            }
            if let Some(sluid) = &rec.sluid {
                out += &format!("  sluid     {sluid}\n");
            }
            let mut gpu_use = Vec::new();
            if let Some(u) = rec.gpu_util_pct {
                gpu_use.push(format!("SM {} average", format::util_pct(u)));
            }
            if let Some(j) = rec.gpu_idle_j {
                gpu_use.push(format!("{} on idle GPUs", format::energy(j as f64)));
            }
            if let Some(s) = rec.gpu_throttle_s {
                gpu_use.push(format!("throttled {}", format::duration(s)));
            }
            if let Some(n) = rec.xid_events {
                gpu_use.push(format!("{n} Xid event(s)"));
            }
            if !gpu_use.is_empty() {
                out += &format!("  gpu use   {}\n", gpu_use.join(", "));
            }
            if let Some(j) = rec.wall_j {
                out += &format!(
                    "  at wall   {} (components and the job's part of the rest of the node)\n",
                    format::energy(j as f64)
                );
            }
        }
        None => {
            out += &format!(
                "  sacct ({}): {}\n",
                r.field,
                r.sacct_note.as_deref().unwrap_or("no record")
            )
        }
    }
    if let Some(why) = &r.restricted {
        if r.sacct_record.is_some() {
            out += &format!("  source    sacct ({})\n", r.field);
        }
        out += &format!("  detail    not available: {why}\n");
    }
    if let Some(foreign) = &r.foreign_content {
        out += &format!("  also in {}: {foreign}\n", r.field);
    }
    if let Some(m) = &r.manifests {
        out += &format!(
            "  {} ({} node(s)):\n",
            match r.source {
                Some("records") => "from the job-records database",
                _ => "from manifests",
            },
            m.nodes.len()
        );
        if let Some(all) = m.job_nodes.as_ref().filter(|_| !m.nodes_missing.is_empty()) {
            out += &format!(
                "    incomplete: {} of the job's {} nodes reported; missing {} (nothing is counted for {}: no manifest from ergond there, or not collected yet)\n",
                m.nodes.len(),
                all.len(),
                m.nodes_missing.join(", "),
                if m.nodes_missing.len() == 1 { "it" } else { "them" }
            );
        }
        if r.sacct_record.is_none() {
            if let Some(sluid) = &m.sluid {
                out += &format!("    sluid {sluid}\n");
            }
        }
        if let Some(f) = &m.footprint {
            out += &crate::carbon::render(f, "    ");
        }
        out += &wall_lines(m);
        if let Some(c) = &m.coverage_components {
            out += &format!(
                "    coverage by component (time-weighted over the nodes):{}\n",
                components(c.gpu, c.cpu, c.dram)
            );
        }
        for n in &m.nodes {
            out += &format!(
                "    {:<16} {:>12.0} J  avg {:>9}  peak {:>9}  coverage {}{}\n",
                n.node,
                n.energy_j,
                format::power(n.avg_w),
                format::power(n.peak_w),
                format::percent(n.coverage),
                n.components
                    .map(|c| components(c.gpu, c.cpu, c.dram))
                    .unwrap_or_default()
            );
            if let Some(reason) = &n.gpus_unknown {
                out += &format!(
                    "    GPUs unknown on node {}: {reason}; their energy is unknown, not 0, and not in the totals\n",
                    n.node
                );
            }
        }
        for g in &m.gpus {
            out += &match (g.energy_j, g.avg_w) {
                (Some(e), Some(w)) => format!(
                    "    {} gpu{} {:<40} {:>10.0} J  avg {}{}\n",
                    g.node,
                    g.index,
                    g.uuid,
                    e,
                    format::power(w),
                    g.mig
                        .as_ref()
                        .map_or_else(String::new, |m| format!("  MIG {}", m.describe()))
                ),
                _ => format!(
                    "    {} gpu{} {:<40} not measured (could not be read)\n",
                    g.node, g.index, g.uuid
                ),
            };
            if let Some(e) = &g.efficiency {
                for line in format::gpu_efficiency(e) {
                    out += &format!("      {line}\n");
                }
            }
        }
        let idle = format::idle_gpus(
            m.gpus.iter().filter_map(|g| {
                let e = g.efficiency.as_ref()?;
                Some((format!("{} gpu{}", g.node, g.index), e, g.energy_j))
            }),
            m.energy_j,
        );
        for (k, line) in idle.iter().enumerate() {
            out += &format!("    {:<10}{line}\n", if k == 0 { "idle GPUs" } else { "" });
        }
        for e in &m.estimates {
            out += &format!(
                "    {} estimated {:.0} J ± {:.0} J over {}: {}\n",
                e.node,
                e.energy_j,
                // A bound is never shown smaller than it is.
                e.bound_j.ceil(),
                format::duration(e.end_unix_ns.saturating_sub(e.start_unix_ns) as f64 / 1e9),
                e.reason
            );
        }
    }
    for p in &r.manifest_problems {
        out += &format!("  warning: {p}\n");
    }
    out
}

/// ` (gpu 50.0%, cpu 90.5%, dram n/a)`: the components' coverage, or nothing when none is known.
fn components(gpu: Option<f64>, cpu: Option<f64>, dram: Option<f64>) -> String {
    if gpu.is_none() && cpu.is_none() && dram.is_none() {
        return String::new();
    }
    let pct = |c: Option<f64>| c.map_or_else(|| "n/a".to_owned(), format::percent);
    format!(" (gpu {}, cpu {}, dram {})", pct(gpu), pct(cpu), pct(dram))
}

/// What `ergon status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The state directory.
    pub state_dir: PathBuf,
    /// Jobs in the state and in the ledger.
    pub jobs: usize,
    /// Of these, jobs in the ledger (delivered everywhere).
    pub ledger_jobs: u64,
    /// Per destination (`sacct` and each sink): records pending (not yet delivered, those sent
    /// but not verified included).
    pub backlog: Vec<(String, usize)>,
    /// Per destination: of its backlog, the records it accepted that are not yet verified to be
    /// durable (VictoriaMetrics); the next run checks them and sends what is missing.
    pub unverified: Vec<(String, usize)>,
    /// sacct records skipped on purpose.
    pub sacct_skipped: usize,
    /// Per destination: last success (Unix seconds) and last error.
    pub destinations: Vec<(String, Option<u64>, Option<String>)>,
    /// Manifests in quarantine.
    pub quarantined: usize,
    /// Records dropped by bounds with deliveries pending (age, size) and manifests skipped
    /// before the horizon.
    pub dropped_by_age: u64,
    /// See above.
    pub dropped_by_size: u64,
    /// See above.
    pub skipped_before_horizon: u64,
    /// Last run, Unix seconds.
    pub last_run_unix: Option<u64>,
    /// Its summary.
    pub last_run_summary: Option<String>,
}

/// Build the status from the state directory.
pub fn status(config: &Config) -> anyhow::Result<Status> {
    let state = State::load(&config.state_dir)?;
    // Delivered jobs are in the ledger (counted there; never created by a status).
    let (ledger_jobs, ledger_sacct_skipped) =
        crate::ledger::Ledger::open_read_only(&config.state_dir)?.counts()?;
    let mut names: Vec<String> = state.sinks.keys().cloned().collect();
    for e in state.jobs.values() {
        for n in e.sinks.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    if config.sacct.enabled && !names.iter().any(|n| n == "sacct") {
        names.push("sacct".into());
    }
    names.sort();
    let backlog = names
        .iter()
        .map(|n| (n.clone(), state.pending_for(n).len()))
        .collect();
    let unverified = names
        .iter()
        .map(|n| (n.clone(), state.sent_for(n)))
        .collect();
    let destinations = names
        .iter()
        .map(|n| {
            let s = state.sinks.get(n).cloned().unwrap_or_default();
            (n.clone(), s.last_success_unix, s.last_error)
        })
        .collect();
    Ok(Status {
        state_dir: config.state_dir.clone(),
        jobs: state.jobs.len() + ledger_jobs as usize,
        ledger_jobs,
        backlog,
        unverified,
        sacct_skipped: state
            .jobs
            .values()
            .filter(|e| matches!(e.sacct, Some(Delivery::Skipped { .. })))
            .count()
            + ledger_sacct_skipped as usize,
        destinations,
        quarantined: collect::quarantined_count(&config.quarantine_dir),
        dropped_by_age: state.dropped.by_age,
        dropped_by_size: state.dropped.by_size,
        skipped_before_horizon: state.dropped.skipped_before_horizon,
        last_run_unix: state.last_run_unix,
        last_run_summary: state.last_run_summary,
    })
}

/// The status as text.
pub fn render_status(s: &Status) -> String {
    let ago = |t: Option<u64>| match t {
        None => "never".to_string(),
        Some(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(t);
            format!("{}s ago", now.saturating_sub(t))
        }
    };
    let mut out = format!(
        "state      {} ({} jobs, {} of them delivered, in the ledger)\n",
        s.state_dir.display(),
        s.jobs,
        s.ledger_jobs
    );
    out += &format!("last run   {}\n", ago(s.last_run_unix));
    if let Some(line) = &s.last_run_summary {
        out += &format!("           {line}\n");
    }
    for (((name, pending), (_, success, error)), (_, sent)) in
        s.backlog.iter().zip(&s.destinations).zip(&s.unverified)
    {
        out += &format!(
            "{name:<18} backlog {pending}{}, last success {}{}\n",
            if *sent > 0 {
                format!(" ({sent} sent, not yet verified)")
            } else {
                String::new()
            },
            ago(*success),
            error
                .as_deref()
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
    }
    out += &format!("sacct skipped (foreign content) {}\n", s.sacct_skipped);
    out += &format!("quarantined manifests {}\n", s.quarantined);
    out += &format!(
        "dropped    {} by age, {} by size (with deliveries pending); last run skipped {} jobs that ended before the retention horizon\n",
        s.dropped_by_age, s.dropped_by_size, s.skipped_before_horizon
    );
    out
}

/// The job's energy at the wall, from its nodes' meters: the total when every node had one, and
/// per node what each meter gave; nothing for a job whose nodes had none.
fn wall_lines(m: &JobRecordFull) -> String {
    let metered: Vec<_> = m
        .nodes
        .iter()
        .filter_map(|n| n.wall.as_ref().map(|w| (n, w)))
        .collect();
    if metered.is_empty() {
        return String::new();
    }
    let mut out = match m.wall_j() {
        Some(j) => format!(
            "    at the wall {} = components {} + rest of node {} (node meters)\n",
            format::energy(j),
            format::energy(metered.iter().map(|(_, w)| w.components_j).sum()),
            format::energy(metered.iter().map(|(_, w)| w.rest_of_node_j).sum())
        ),
        None => format!(
            "    at the wall: {} of the job's {} nodes had a meter; no total (nothing is invented for the others)\n",
            metered.len(),
            m.nodes.len()
        ),
    };
    for (n, w) in metered {
        out += &format!(
            "      {:<14} {} (rest of node {}, split by {}; {} {}, resolution {}{}{})\n",
            n.node,
            format::energy(w.energy_j),
            format::energy(w.rest_of_node_j),
            w.rule,
            w.meter.kind,
            w.meter.source,
            format::duration(w.meter.resolution_s),
            if w.unmetered_s > 0.0 {
                format!(
                    "; {} of the job not metered",
                    format::duration(w.unmetered_s)
                )
            } else {
                String::new()
            },
            if w.disagreements > 0 {
                format!(
                    "; components above the meter in {} interval(s)",
                    w.disagreements
                )
            } else {
                String::new()
            }
        );
    }
    out
}
