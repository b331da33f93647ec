//! `ergon summary`: the collected jobs' energy summed by user, account, partition or node, from
//! the job-records database ([`crate::records::RecordsDb::summary`] does the sums in SQL, so a
//! year of a large site's records is one grouped scan, not a million rows brought into memory).

use serde::Serialize;

use crate::records::{format_time, JobsFormat, SummaryBy, SummaryRow};
use ergon_protocol::format::co2e;

/// What the summary covers, printed with it so that a figure is never read out of its scope.
#[derive(Debug, Clone, Serialize)]
pub struct Scope {
    /// Grouped by.
    pub by: SummaryBy,
    /// Jobs that ended at or after this (Unix ns).
    pub since_unix_ns: Option<u64>,
    /// Jobs that ended before this (Unix ns).
    pub until_unix_ns: Option<u64>,
    /// Only this cluster's jobs.
    pub cluster: Option<String>,
    /// Only this user's jobs (always set for a user who is not root: they see their own).
    pub user: Option<String>,
    /// Only this account's jobs.
    pub account: Option<String>,
}

impl Scope {
    fn describe(&self) -> String {
        let mut parts = vec![format!("by {}", by_name(self.by))];
        match (self.since_unix_ns, self.until_unix_ns) {
            (Some(a), Some(b)) => parts.push(format!(
                "jobs that ended from {} to {}",
                format_time(a),
                format_time(b)
            )),
            (Some(a), None) => parts.push(format!("jobs that ended from {}", format_time(a))),
            (None, Some(b)) => parts.push(format!("jobs that ended before {}", format_time(b))),
            (None, None) => parts.push("every job collected".into()),
        }
        for (what, v) in [
            ("cluster", &self.cluster),
            ("user", &self.user),
            ("account", &self.account),
        ] {
            if let Some(v) = v {
                parts.push(format!("{what} {v}"));
            }
        }
        parts.join(", ")
    }
}

fn by_name(by: SummaryBy) -> &'static str {
    match by {
        SummaryBy::User => "user",
        SummaryBy::Account => "account",
        SummaryBy::Partition => "partition",
        SummaryBy::Node => "node",
    }
}

/// The rows' sum (the `TOTAL` line; by node a job on several nodes counts on each).
pub fn total(rows: &[SummaryRow]) -> SummaryRow {
    let mut t = SummaryRow {
        cluster: String::new(),
        key: None,
        jobs: 0,
        energy_j: 0.0,
        gpu_j: 0.0,
        cpu_j: 0.0,
        dram_j: 0.0,
        gpu_hours: 0.0,
        node_hours: 0.0,
        coverage_min: 1.0,
        estimated_jobs: 0,
        gpus_unknown_jobs: 0,
        co2e_g: None,
        cost: None,
        currency: None,
        footprint_partial_jobs: 0,
        gpu_idle_j: None,
    };
    let add = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    };
    for r in rows {
        t.co2e_g = add(t.co2e_g, r.co2e_g);
        t.gpu_idle_j = add(t.gpu_idle_j, r.gpu_idle_j);
        t.cost = add(t.cost, r.cost);
        t.currency = match (&t.currency, &r.currency) {
            (None, c) => c.clone(),
            (Some(a), Some(b)) if a != b => Some("mixed".into()),
            (a, _) => a.clone(),
        };
        t.footprint_partial_jobs += r.footprint_partial_jobs;
        t.jobs += r.jobs;
        t.energy_j += r.energy_j;
        t.gpu_j += r.gpu_j;
        t.cpu_j += r.cpu_j;
        t.dram_j += r.dram_j;
        t.gpu_hours += r.gpu_hours;
        t.node_hours += r.node_hours;
        t.coverage_min = t.coverage_min.min(r.coverage_min);
        t.estimated_jobs += r.estimated_jobs;
        t.gpus_unknown_jobs += r.gpus_unknown_jobs;
    }
    t
}

/// The summary as `format`.
pub fn render(rows: &[SummaryRow], scope: &Scope, format: JobsFormat) -> String {
    let key = |r: &SummaryRow| r.key.clone().unwrap_or_else(|| "(none)".into());
    match format {
        JobsFormat::Json => {
            #[derive(Serialize)]
            struct Out<'a> {
                scope: &'a Scope,
                groups: &'a [SummaryRow],
                total: SummaryRow,
            }
            serde_json::to_string_pretty(&Out {
                scope,
                groups: rows,
                total: total(rows),
            })
            .unwrap_or_default()
                + "\n"
        }
        JobsFormat::Csv => {
            let field = |s: &str| {
                if s.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s.to_owned()
                }
            };
            let mut out = format!(
                "cluster,{},jobs,energy_j,gpu_j,cpu_j,dram_j,gpu_hours,node_hours,coverage_min,estimated_jobs,gpus_unknown_jobs,co2e_g,cost,currency,footprint_partial_jobs,gpu_idle_j\n",
                by_name(scope.by)
            );
            for r in rows {
                out += &format!(
                    "{},{},{},{:.0},{:.0},{:.0},{:.0},{:.3},{:.3},{:.4},{},{},{},{},{},{},{}\n",
                    field(&r.cluster),
                    field(r.key.as_deref().unwrap_or("")),
                    r.jobs,
                    r.energy_j,
                    r.gpu_j,
                    r.cpu_j,
                    r.dram_j,
                    r.gpu_hours,
                    r.node_hours,
                    r.coverage_min,
                    r.estimated_jobs,
                    r.gpus_unknown_jobs,
                    r.co2e_g.map(|g| format!("{g:.1}")).unwrap_or_default(),
                    r.cost.map(|c| format!("{c:.4}")).unwrap_or_default(),
                    field(r.currency.as_deref().unwrap_or("")),
                    r.footprint_partial_jobs,
                    r.gpu_idle_j.map(|j| format!("{j:.0}")).unwrap_or_default()
                );
            }
            out
        }
        JobsFormat::Table => {
            use ergon_protocol::format::{energy, percent};
            let head = by_name(scope.by).to_uppercase();
            let t = total(rows);
            // CO2e and cost columns only where some job has them (a site without `[carbon]`
            // and `[cost]` sees the table as before).
            let (has_co2, has_cost) = (t.co2e_g.is_some(), t.cost.is_some());
            let has_idle = t.gpu_idle_j.is_some();
            let mut extra_head = String::new();
            if has_idle {
                extra_head += &format!(" {:>12}", "IDLE-GPU");
            }
            if has_co2 {
                extra_head += &format!(" {:>12}", "CO2E");
            }
            if has_cost {
                let head = format!("COST {}", t.currency.as_deref().unwrap_or(""));
                extra_head += &format!(" {:>12}", head.trim_end());
            }
            let extra = |r: &SummaryRow| {
                let mut s = String::new();
                if has_idle {
                    s += &format!(" {:>12}", r.gpu_idle_j.map_or_else(|| "-".into(), energy));
                }
                if has_co2 {
                    s += &format!(" {:>12}", r.co2e_g.map_or_else(|| "-".into(), co2e));
                }
                if has_cost {
                    let c = r.cost.map_or_else(|| "-".into(), crate::carbon::money);
                    s += &format!(" {c:>12}");
                }
                s
            };
            let mut out = format!("ergon summary: {}\n", scope.describe());
            out += &format!(
                "{:<12} {:<16} {:>8} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8}{extra_head}\n",
                "CLUSTER",
                head,
                "JOBS",
                "ENERGY",
                "GPU",
                "CPU",
                "DRAM",
                "GPU-H",
                "NODE-H",
                "COVERAGE"
            );
            let line = |out: &mut String, cluster: &str, k: &str, r: &SummaryRow| {
                *out += &format!(
                    "{:<12} {:<16} {:>8} {:>12} {:>12} {:>12} {:>12} {:>10.1} {:>10.1} {:>8}{}\n",
                    cluster,
                    k,
                    r.jobs,
                    energy(r.energy_j),
                    energy(r.gpu_j),
                    energy(r.cpu_j),
                    energy(r.dram_j),
                    r.gpu_hours,
                    r.node_hours,
                    percent(r.coverage_min),
                    extra(r)
                );
            };
            for r in rows {
                line(&mut out, &r.cluster, &key(r), r);
            }
            if rows.is_empty() {
                out += "(no jobs)\n";
            } else {
                line(&mut out, "TOTAL", "", &t);
            }
            if t.footprint_partial_jobs > 0 {
                out += &format!(
                    "{} job(s) have CO2e or cost for part of their energy only (a factor unknown for the rest; see `ergon report JOBID`).\n",
                    t.footprint_partial_jobs
                );
            }
            if t.estimated_jobs > 0 {
                out += &format!(
                    "{} job(s) have an estimated part (see `ergon report JOBID`).\n",
                    t.estimated_jobs
                );
            }
            if t.gpus_unknown_jobs > 0 {
                out += &format!(
                    "{} job(s) held GPUs whose energy is unknown: their GPU part is not in the GPU and energy sums.\n",
                    t.gpus_unknown_jobs
                );
            }
            if scope.by == SummaryBy::Node {
                out +=
                    "By node, a job on several nodes counts once on each, with that node's part.\n";
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, jobs: u64, energy_j: f64, cov: f64) -> SummaryRow {
        SummaryRow {
            cluster: "c".into(),
            key: Some(key.into()),
            jobs,
            energy_j,
            gpu_j: energy_j * 0.8,
            cpu_j: energy_j * 0.15,
            dram_j: energy_j * 0.05,
            gpu_hours: jobs as f64,
            node_hours: jobs as f64 / 2.0,
            coverage_min: cov,
            estimated_jobs: 0,
            gpus_unknown_jobs: 0,
            co2e_g: None,
            cost: None,
            currency: None,
            footprint_partial_jobs: 0,
            gpu_idle_j: None,
        }
    }

    #[test]
    fn the_total_adds_the_groups_and_keeps_the_lowest_coverage() {
        let rows = [row("alice", 3, 3_000.0, 0.99), row("bob", 2, 1_000.0, 0.5)];
        let t = total(&rows);
        assert_eq!(t.jobs, 5);
        assert_eq!(t.energy_j, 4_000.0);
        assert_eq!(t.gpu_hours, 5.0);
        assert_eq!(t.coverage_min, 0.5);
    }

    #[test]
    fn every_format_carries_every_group() {
        let rows = [row("alice", 3, 3_000.0, 1.0), row("b,ob", 2, 1_000.0, 1.0)];
        let scope = Scope {
            by: SummaryBy::User,
            since_unix_ns: Some(1_767_225_600_000_000_000),
            until_unix_ns: None,
            cluster: None,
            user: None,
            account: None,
        };
        let table = render(&rows, &scope, JobsFormat::Table);
        assert!(table.contains("by user, jobs that ended from 2026-01-01T00:00:00Z"));
        assert!(table.contains("alice") && table.contains("TOTAL") && table.contains("4.00 kJ"));
        let csv = render(&rows, &scope, JobsFormat::Csv);
        assert!(csv.starts_with("cluster,user,jobs,"));
        assert!(csv.contains("c,alice,3,3000,") && csv.contains("c,\"b,ob\",2,1000,"));
        let json: serde_json::Value =
            serde_json::from_str(&render(&rows, &scope, JobsFormat::Json)).unwrap();
        assert_eq!(json["groups"].as_array().unwrap().len(), 2);
        assert_eq!(json["total"]["energy_j"], 4_000.0);
        assert_eq!(json["scope"]["by"], "user");
    }

    #[test]
    fn unknown_gpu_energy_is_said_not_summed_as_zero() {
        let mut r = row("alice", 1, 100.0, 1.0);
        r.gpus_unknown_jobs = 1;
        let scope = Scope {
            by: SummaryBy::User,
            since_unix_ns: None,
            until_unix_ns: None,
            cluster: None,
            user: None,
            account: None,
        };
        let table = render(&[r], &scope, JobsFormat::Table);
        assert!(
            table.contains("1 job(s) held GPUs whose energy is unknown"),
            "{table}"
        );
    }
}
