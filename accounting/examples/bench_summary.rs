//! `scripts/bench summary`: `ergon summary` over a year of a large site's job records.
//!
//! The database: `--jobs` records (default 1,000,000) in the job-records database (SQLite, this
//! build's schema), spread evenly over 365 days, 2,000 users in 200 accounts, 4 partitions,
//! 10,000 nodes, 5 % of the jobs on 2–8 nodes, one GPU per node of a GPU job (three jobs in
//! four). The rows are inserted directly (one transaction, prepared statements): what is measured
//! is reading them, not writing them.
//!
//! For each grouping (user, account, partition, node) the summary over every job, and by user
//! over one month (`--since/--until`), is timed against reading the same rows once with a plain
//! `SELECT` of the columns it sums (the baseline: the least any summary must do). Each figure is
//! the median of `--rounds` rounds (default 5), summary and baseline alternating.
//!
//! ```text
//! bench_summary [--jobs N] [--rounds R] [--json PATH]
//! ```

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use ergon_accounting::records::{JobFilter, RecordsDb, SummaryBy};
use serde_json::json;

const NODES: u64 = 10_000;
const USERS: u64 = 2_000;
const ACCOUNTS: u64 = 200;
const PARTITIONS: u64 = 4;
const YEAR_S: u64 = 365 * 86_400;
/// 2026-01-01T00:00:00Z.
const EPOCH_S: u64 = 1_767_225_600;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A small deterministic generator (xorshift), so that every run builds the same database.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn fill(path: &Path, jobs: u64) -> u64 {
    drop(RecordsDb::open(path).unwrap());
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA journal_mode = MEMORY;")
        .unwrap();
    let tx = conn.transaction().unwrap();
    let mut node_rows = 0;
    {
        let mut job = tx
            .prepare(
                "INSERT INTO jobs (cluster, job_id, idempotency_key, job_hash, `user`, uid, account,
                    `partition`, start_unix_ns, end_unix_ns, duration_s, energy_j, gpu_j, cpu_j,
                    dram_j, avg_w, peak_w, coverage_min, coverage_weighted, estimated,
                    has_coverage_components, coverage_gpu, coverage_cpu, coverage_dram,
                    gpus_unknown_nodes, nodes, gpus, written_unix)
                 VALUES (?1, ?2, ?3, 'sha256:x', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14,
                    ?15, ?16, 1.0, 1.0, 0, 1, ?17, 1.0, 1.0, 0, ?18, ?19, 0)",
            )
            .unwrap();
        let mut node = tx
            .prepare(
                "INSERT INTO job_nodes (cluster, job_id, node, energy_j, gpu_j, cpu_j, dram_j,
                    avg_w, peak_w, coverage, manifest_hash, has_components, coverage_gpu,
                    coverage_cpu, coverage_dram)
                 VALUES ('site', ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1.0, 'sha256:x', 1, ?9, 1.0, 1.0)",
            )
            .unwrap();
        let mut gpu = tx
            .prepare(
                "INSERT INTO job_gpus (cluster, job_id, node, gpu_index, uuid, energy_j, avg_w,
                    peak_w, method)
                 VALUES ('site', ?1, ?2, 0, ?3, ?4, ?5, ?5, '\"counter\"')",
            )
            .unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for id in 1..=jobs {
            let user = rng.below(USERS);
            let account = user % ACCOUNTS;
            let partition = rng.below(PARTITIONS);
            let nodes = if rng.below(100) < 5 {
                2 + rng.below(7)
            } else {
                1
            };
            let gpus = rng.below(4) != 0;
            let duration = 60.0 + rng.below(7_200) as f64;
            let end_s = EPOCH_S + id * YEAR_S / jobs;
            let start_ns = (end_s as f64 - duration) as u64 * 1_000_000_000;
            let first = rng.below(NODES);
            let (mut e, mut g, mut c, mut d) = (0.0, 0.0, 0.0, 0.0);
            for k in 0..nodes {
                let name = format!("n{:05}", (first + k) % NODES);
                let ng = if gpus { 300.0 * duration } else { 0.0 };
                let nc = 100.0 * duration;
                let nd = 10.0 * duration;
                let ne = ng + nc + nd;
                node.execute(rusqlite::params![
                    id as i64,
                    name,
                    ne,
                    gpus.then_some(ng),
                    nc,
                    nd,
                    ne / duration,
                    ne / duration * 1.2,
                    gpus.then_some(1.0)
                ])
                .unwrap();
                node_rows += 1;
                if gpus {
                    gpu.execute(rusqlite::params![
                        id as i64,
                        name,
                        format!("GPU-{id}-{k}"),
                        ng,
                        300.0
                    ])
                    .unwrap();
                }
                (e, g, c, d) = (e + ne, g + ng, c + nc, d + nd);
            }
            job.execute(rusqlite::params![
                "site",
                id as i64,
                format!("site/{id}"),
                format!("u{user:04}"),
                (10_000 + user) as i64,
                format!("a{account:03}"),
                format!("p{partition}"),
                start_ns as i64,
                (end_s * 1_000_000_000) as i64,
                duration,
                e,
                gpus.then_some(g),
                c,
                d,
                e / duration,
                e / duration * 1.2,
                gpus.then_some(1.0),
                nodes as i64,
                if gpus { nodes as i64 } else { 0 },
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
    node_rows
}

/// A time window of job ends, Unix ns: [start, end).
type Window = (i64, i64);

/// Read the columns a summary sums from every row (or the month's), once: the baseline.
fn read_once(conn: &rusqlite::Connection, by: SummaryBy, month: Option<Window>) -> u64 {
    let sql = match by {
        SummaryBy::Node => {
            "SELECT n.node, n.energy_j, n.gpu_j, n.cpu_j, n.dram_j, j.duration_s, n.coverage
             FROM job_nodes n JOIN jobs j ON j.cluster = n.cluster AND j.job_id = n.job_id"
                .to_owned()
        }
        _ => {
            let col = match by {
                SummaryBy::User => "`user`",
                SummaryBy::Account => "account",
                _ => "`partition`",
            };
            format!(
                "SELECT {col}, energy_j, gpu_j, cpu_j, dram_j, gpus, nodes, duration_s, coverage_min
                 FROM jobs{}",
                if month.is_some() {
                    " WHERE end_unix_ns >= ?1 AND end_unix_ns < ?2"
                } else {
                    ""
                }
            )
        }
    };
    let mut stmt = conn.prepare(&sql).unwrap();
    let mut q = match month {
        Some((a, b)) => stmt.query(rusqlite::params![a, b]).unwrap(),
        None => stmt.query([]).unwrap(),
    };
    let mut n = 0u64;
    let mut sum = 0.0;
    while let Some(row) = q.next().unwrap() {
        sum += row.get::<_, f64>(1).unwrap();
        n += 1;
    }
    assert!(sum > 0.0);
    n
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let jobs: u64 = arg(&args, "--jobs").map_or(1_000_000, |v| v.parse().unwrap());
    let rounds: usize = arg(&args, "--rounds").map_or(5, |v| v.parse().unwrap());
    let json_path = arg(&args, "--json");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.sqlite");

    eprintln!("summary: writing {jobs} job records (one transaction)…");
    let t = Instant::now();
    let node_rows = fill(&path, jobs);
    let fill_s = t.elapsed().as_secs_f64();
    let db_bytes = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "summary: {jobs} jobs, {node_rows} node rows, {:.0} MB, in {fill_s:.1} s",
        db_bytes as f64 / 1e6
    );
    let db = RecordsDb::open_read_only(&path).unwrap();
    let conn =
        rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    // One month in the middle of the year.
    let month = (
        ((EPOCH_S + 180 * 86_400) * 1_000_000_000) as i64,
        ((EPOCH_S + 210 * 86_400) * 1_000_000_000) as i64,
    );
    let cases: [(&str, SummaryBy, Option<Window>); 5] = [
        ("user", SummaryBy::User, None),
        ("account", SummaryBy::Account, None),
        ("partition", SummaryBy::Partition, None),
        ("node", SummaryBy::Node, None),
        ("user, one month", SummaryBy::User, Some(month)),
    ];
    let mut results = Vec::new();
    println!();
    println!(
        "ergon summary over {jobs} job records ({node_rows} node rows), median of {rounds} rounds"
    );
    println!("| summary | groups | rows read | summary s | read once s | ratio |");
    println!("|---|---|---|---|---|---|");
    for (name, by, window) in cases {
        let filter = JobFilter {
            since_unix_ns: window.map(|w| w.0 as u64),
            until_unix_ns: window.map(|w| w.1 as u64),
            ..JobFilter::default()
        };
        let (mut ts, mut tb) = (Vec::new(), Vec::new());
        let (mut groups, mut rows, mut jobs_summed) = (0, 0, 0);
        for _ in 0..rounds {
            let t = Instant::now();
            let out = db.summary(by, &filter).unwrap();
            ts.push(t.elapsed().as_secs_f64());
            groups = out.len();
            jobs_summed = out.iter().map(|r| r.jobs).sum::<u64>();
            let t = Instant::now();
            rows = read_once(&conn, by, window);
            tb.push(t.elapsed().as_secs_f64());
        }
        // The summary saw every row the baseline read.
        assert_eq!(jobs_summed, rows, "{name}");
        let (s, b) = (median(ts), median(tb));
        println!(
            "| {name} | {groups} | {rows} | {s:.3} | {b:.3} | {:.2}× |",
            s / b
        );
        results.push(json!({
            "kind": "ratio",
            "summary": name,
            "groups": groups,
            "rows": rows,
            "summary_s": s,
            "read_once_s": b,
            "ratio": s / b,
        }));
    }
    let out = json!({
        "jobs": jobs,
        "node_rows": node_rows,
        "db_bytes": db_bytes,
        "fill_s": fill_s,
        "rounds": rounds,
        "cases": results,
    });
    if let Some(p) = json_path {
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(f, "{out}").unwrap();
        println!("\nresults: {p}");
    }
}
