//! Bounded series for VictoriaMetrics: usage counters by (cluster, partition, account, user),
//! whose number does not grow with the number of jobs.
//!
//! Each job adds its energy (total, GPU, CPU, DRAM), its GPU-hours (GPUs × duration), its CO2e
//! and energy cost (when `[carbon]`/`[cost]` gave the record them; docs/carbon.md) and 1 job
//! to its group's counters. The counters are kept here, in a small SQLite file next to the
//! state (`<state_dir>/usage.sqlite`), together with each job's contribution, so that adding a
//! job is **idempotent**: a job delivered twice (delivery is at least once) adds nothing the
//! second time, and a job recombined with a late node manifest adds only the difference. A
//! record with fewer nodes than the job's contribution (a late delivery of an older record)
//! changes nothing, so the counters only grow.
//!
//! VictoriaMetrics receives each changed group's counters as they now stand (InfluxDB line
//! protocol, measurement `ergon_usage`: series `ergon_usage_energy_joules_total`, …), at a
//! timestamp that increases within a run. A job is durably in VictoriaMetrics when, after a
//! flush to disk, each counter of its group has a sample at or after the time the job was
//! added with at least the value the counter had then ([`Usage::missing`]): counters are
//! cumulative, so a later sample covers every job added before it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::job::JobRecordFull;

/// The counters, in order: the field names of measurement `ergon_usage`.
pub const COUNTERS: [&str; N] = [
    "energy_joules_total",
    "gpu_energy_joules_total",
    "cpu_energy_joules_total",
    "dram_energy_joules_total",
    "gpu_hours_total",
    "jobs_total",
    "co2e_grams_total",
    "cost_total",
];

/// The number of counters.
pub const N: usize = 8;

/// `c0, c1, …` (or another prefix) for every counter.
fn cols(prefix: &str) -> String {
    (0..N)
        .map(|i| format!("{prefix}{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A row's `N` reals from column `first` on.
fn reals(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<[f64; N]> {
    let mut out = [0.0; N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = row.get(first + i)?;
    }
    Ok(out)
}

/// The file in the state directory.
pub const FILE: &str = "usage.sqlite";

/// A group: the labels of its series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    /// Cluster.
    pub cluster: String,
    /// Partition (empty when the job had none).
    pub partition: String,
    /// Account (empty when the job had none).
    pub account: String,
    /// User.
    pub user: String,
}

impl Group {
    fn of(r: &JobRecordFull) -> Group {
        Group {
            cluster: r.cluster.clone(),
            partition: r.partition.clone().unwrap_or_default(),
            account: r.account.clone().unwrap_or_default(),
            user: r.user.clone(),
        }
    }
}

/// A job's contribution to its group's counters.
/// CO2e and cost are the figures the record carries (0 for a job without: no `[carbon]` or
/// `[cost]` config, or computed before it existed).
fn contribution(r: &JobRecordFull) -> [f64; N] {
    let footprint = r.footprint.as_ref();
    [
        r.energy_j,
        r.gpu_j.unwrap_or(0.0),
        r.cpu_j.unwrap_or(0.0),
        r.dram_j.unwrap_or(0.0),
        r.gpus.len() as f64 * r.duration_s / 3600.0,
        1.0,
        footprint
            .and_then(|f| f.carbon.as_ref())
            .map_or(0.0, |c| c.total_g),
        footprint
            .and_then(|f| f.cost.as_ref())
            .map_or(0.0, |c| c.amount),
    ]
}

/// Where a job stands in its group's counters: the time (ms) it was added and the counters'
/// values just after.
#[derive(Debug, Clone, PartialEq)]
pub struct Included {
    /// Its group.
    pub group: Group,
    /// When it was added (ms since the epoch): the timestamp of the samples that first
    /// carried it.
    pub at_ms: i64,
    /// The group's counters just after it was added.
    pub after: [f64; N],
}

/// The counters file.
pub struct Usage {
    path: PathBuf,
    /// Opened at the first use (a dry run never creates it); the last timestamp given out.
    conn: Mutex<Option<(Connection, i64)>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS totals (
    cluster TEXT NOT NULL, `partition` TEXT NOT NULL, account TEXT NOT NULL, `user` TEXT NOT NULL,
    c0 REAL NOT NULL, c1 REAL NOT NULL, c2 REAL NOT NULL, c3 REAL NOT NULL, c4 REAL NOT NULL,
    c5 REAL NOT NULL,
    PRIMARY KEY (cluster, `partition`, account, `user`)
);
CREATE TABLE IF NOT EXISTS jobs (
    cluster TEXT NOT NULL, job_id INTEGER NOT NULL,
    `partition` TEXT NOT NULL, account TEXT NOT NULL, `user` TEXT NOT NULL,
    nodes INTEGER NOT NULL,
    c0 REAL NOT NULL, c1 REAL NOT NULL, c2 REAL NOT NULL, c3 REAL NOT NULL, c4 REAL NOT NULL,
    c5 REAL NOT NULL,
    at_ms INTEGER NOT NULL,
    a0 REAL NOT NULL, a1 REAL NOT NULL, a2 REAL NOT NULL, a3 REAL NOT NULL, a4 REAL NOT NULL,
    a5 REAL NOT NULL,
    PRIMARY KEY (cluster, job_id)
);
";

/// Version 2: the CO2e and cost counters (0 for what was added before).
const SCHEMA_2: &str = "
ALTER TABLE totals ADD COLUMN c6 REAL NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN c7 REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN c6 REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN c7 REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN a6 REAL NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN a7 REAL NOT NULL DEFAULT 0;
PRAGMA user_version = 2;
";

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    tx.execute_batch(SCHEMA)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version < 2 {
        tx.execute_batch(SCHEMA_2)?;
    }
    tx.commit()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn err(path: &Path, e: rusqlite::Error) -> String {
    format!("usage counters {}: {e}", path.display())
}

impl Usage {
    /// The counters in `state_dir`.
    pub fn new(state_dir: &Path) -> Usage {
        Usage {
            path: state_dir.join(FILE),
            conn: Mutex::new(None),
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection, &mut i64) -> rusqlite::Result<T>,
    ) -> Result<T, String> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let mut conn = Connection::open(&self.path).map_err(|e| err(&self.path, e))?;
            conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL;")
                .and_then(|()| conn.busy_timeout(std::time::Duration::from_secs(30)))
                .and_then(|()| migrate(&mut conn))
                .map_err(|e| err(&self.path, e))?;
            *guard = Some((conn, 0));
        }
        let (conn, last) = guard.as_mut().expect("just opened");
        f(conn, last).map_err(|e| err(&self.path, e))
    }

    /// Add `records` to their groups' counters (idempotently, see the module docs) and return
    /// the counters of every group `records` are in, as they now stand, as line protocol
    /// stamped now: the changed groups, and also those whose counters held the records already
    /// (an earlier run may have added them and then failed to send). One transaction, one
    /// durable commit.
    pub fn add(&self, records: &[&JobRecordFull]) -> Result<String, String> {
        self.with(|conn, last| {
            let at = now_ms().max(*last + 1);
            *last = at;
            let tx = conn.transaction()?;
            let mut touched: BTreeMap<Group, [f64; N]> = BTreeMap::new();
            {
                let mut find = tx.prepare_cached(&format!(
                    "SELECT nodes, {}, `partition`, account, `user`
                     FROM jobs WHERE cluster = ?1 AND job_id = ?2",
                    cols("c")
                ))?;
                let mut put = tx.prepare_cached(&format!(
                    "INSERT OR REPLACE INTO jobs (cluster, job_id, `partition`, account,
                        `user`, nodes, {}, at_ms, {}) VALUES ({})",
                    cols("c"),
                    cols("a"),
                    marks(1, 6 + 1 + 2 * N)
                ))?;
                for r in records {
                    let group = Group::of(r);
                    let new = contribution(r);
                    let old: Option<(i64, [f64; N], Group)> = find
                        .query_row(params![r.cluster, r.job_id], |row| {
                            Ok((
                                row.get(0)?,
                                reals(row, 1)?,
                                Group {
                                    cluster: r.cluster.clone(),
                                    partition: row.get(N + 1)?,
                                    account: row.get(N + 2)?,
                                    user: row.get(N + 3)?,
                                },
                            ))
                        })
                        .optional()?;
                    if let Some((nodes, was, g)) = &old {
                        // An older record of the job (what it holds is in already), or the
                        // same contribution to the same group: nothing to add.
                        if (r.nodes.len() as i64) < *nodes || (*was == new && *g == group) {
                            touched.entry(g.clone()).or_default();
                            continue;
                        }
                        // Take the old contribution out (of its group, should the job have
                        // moved).
                        add_to(&tx, g, &was.map(|v| -v))?;
                        touched.entry(g.clone()).or_default();
                    }
                    let after = add_to(&tx, &group, &new)?;
                    touched.entry(group.clone()).or_default();
                    let mut values: Vec<rusqlite::types::Value> = vec![
                        r.cluster.clone().into(),
                        i64::from(r.job_id).into(),
                        group.partition.clone().into(),
                        group.account.clone().into(),
                        group.user.clone().into(),
                        (r.nodes.len() as i64).into(),
                    ];
                    values.extend(new.iter().map(|v| (*v).into()));
                    values.push(at.into());
                    values.extend(after.iter().map(|v| (*v).into()));
                    put.execute(rusqlite::params_from_iter(values))?;
                }
            }
            for (group, totals) in touched.iter_mut() {
                *totals = read_totals(&tx, group)?.unwrap_or([0.0; N]);
            }
            tx.commit()?;
            Ok(lines(&touched, at))
        })
    }

    /// Where each record stands in the counters (`None`: not added yet). One read
    /// transaction.
    pub fn included(&self, records: &[&JobRecordFull]) -> Result<Vec<Option<Included>>, String> {
        self.with(|conn, _| {
            let tx = conn.transaction()?;
            let out = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT `partition`, account, `user`, at_ms, {}
                     FROM jobs WHERE cluster = ?1 AND job_id = ?2",
                    cols("a")
                ))?;
                records
                    .iter()
                    .map(|r| {
                        stmt.query_row(params![r.cluster, r.job_id], |row| {
                            Ok(Included {
                                group: Group {
                                    cluster: r.cluster.clone(),
                                    partition: row.get(0)?,
                                    account: row.get(1)?,
                                    user: row.get(2)?,
                                },
                                at_ms: row.get(3)?,
                                after: reals(row, 4)?,
                            })
                        })
                        .optional()
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            tx.commit()?;
            Ok(out)
        })
    }
}

/// `?first, ?first+1, …` (`count` placeholders).
fn marks(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_totals(conn: &Connection, g: &Group) -> rusqlite::Result<Option<[f64; N]>> {
    conn.prepare_cached(&format!(
        "SELECT {} FROM totals
         WHERE cluster = ?1 AND `partition` = ?2 AND account = ?3 AND `user` = ?4",
        cols("c")
    ))?
    .query_row(params![g.cluster, g.partition, g.account, g.user], |row| {
        reals(row, 0)
    })
    .optional()
}

/// Add `delta` to `g`'s counters; their new values.
fn add_to(conn: &Connection, g: &Group, delta: &[f64; N]) -> rusqlite::Result<[f64; N]> {
    let sets = (0..N)
        .map(|i| format!("c{i} = c{i} + excluded.c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut values: Vec<rusqlite::types::Value> = vec![
        g.cluster.clone().into(),
        g.partition.clone().into(),
        g.account.clone().into(),
        g.user.clone().into(),
    ];
    values.extend(delta.iter().map(|v| (*v).into()));
    conn.prepare_cached(&format!(
        "INSERT INTO totals (cluster, `partition`, account, `user`, {})
         VALUES (?1, ?2, ?3, ?4, {})
         ON CONFLICT (cluster, `partition`, account, `user`) DO UPDATE SET {sets}",
        cols("c"),
        marks(5, N)
    ))?
    .execute(rusqlite::params_from_iter(values))?;
    Ok(read_totals(conn, g)?.unwrap_or([0.0; N]))
}

/// One line per group: measurement `ergon_usage`, the group's tags (empty ones left out), the
/// counters, the timestamp.
fn lines(groups: &BTreeMap<Group, [f64; N]>, at_ms: i64) -> String {
    let mut out = String::new();
    for (g, totals) in groups {
        let _ = write!(
            out,
            "ergon_usage,cluster={}",
            crate::influx::escape_tag(&g.cluster)
        );
        for (tag, value) in [
            ("partition", &g.partition),
            ("account", &g.account),
            ("user", &g.user),
        ] {
            if !value.is_empty() {
                let _ = write!(out, ",{tag}={}", crate::influx::escape_tag(value));
            }
        }
        let mut sep = ' ';
        for (name, value) in COUNTERS.iter().zip(totals) {
            // Never below 0 through rounding of a job taken out and put back.
            let _ = write!(out, "{sep}{name}={}", value.max(0.0));
            sep = ',';
        }
        let _ = writeln!(out, " {}", at_ms.max(0) as u128 * 1_000_000);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::combine;
    use ergon_protocol::testing::ManifestBuilder;

    fn job(id: u32, node: &str, user: &str, gpu_j: f64) -> ergon_protocol::manifest::Manifest {
        ManifestBuilder::new("c", id, node)
            .user(user, 1000)
            .account("phys")
            .partition("gpu")
            .ended(1_700_000_000_000_000_000, 3600)
            .gpu(Some(gpu_j))
            .socket(10.0, None)
            .build()
    }

    fn totals(u: &Usage, user: &str) -> [f64; N] {
        u.with(|conn, _| {
            read_totals(
                conn,
                &Group {
                    cluster: "c".into(),
                    partition: "gpu".into(),
                    account: "phys".into(),
                    user: user.into(),
                },
            )
        })
        .unwrap()
        .unwrap()
    }

    #[test]
    fn a_job_counts_once_and_a_recombined_job_only_by_its_difference() {
        let dir = tempfile::tempdir().unwrap();
        let u = Usage::new(dir.path());
        let one = combine(&[job(1, "n1", "alice", 100.0)]);
        let both = combine(&[job(1, "n1", "alice", 100.0), job(1, "n2", "alice", 50.0)]);
        let other = combine(&[job(2, "n1", "alice", 1.0)]);
        let text = u.add(&[&one, &one]).unwrap();
        assert!(
            text.starts_with("ergon_usage,cluster=c,partition=gpu,account=phys,user=alice energy_joules_total=110,gpu_energy_joules_total=100,cpu_energy_joules_total=10,dram_energy_joules_total=0,gpu_hours_total=1,jobs_total=1,co2e_grams_total=0,cost_total=0 "),
            "{text}"
        );
        // Added again: nothing changes, and the group's counters come back as they stand (to
        // be sent again: an earlier run may have added the job and then failed to send).
        let again = u.add(&[&one]).unwrap();
        assert!(
            again.contains(" energy_joules_total=110,") && again.contains(",jobs_total=1,"),
            "{again}"
        );
        assert_eq!(again.lines().count(), 1, "{again}");
        u.add(&[&both]).unwrap();
        // An older record of the job arriving late changes nothing.
        let late = u.add(&[&one]).unwrap();
        assert!(
            late.contains(" energy_joules_total=170,") && late.contains(",jobs_total=1,"),
            "{late}"
        );
        u.add(&[&other]).unwrap();
        assert_eq!(
            totals(&u, "alice"),
            [181.0, 151.0, 30.0, 0.0, 3.0, 2.0, 0.0, 0.0]
        );
        let inc = u.included(&[&both, &other]).unwrap();
        let (a, b) = (inc[0].clone().unwrap(), inc[1].clone().unwrap());
        assert_eq!(a.after, [170.0, 150.0, 20.0, 0.0, 2.0, 1.0, 0.0, 0.0]);
        assert_eq!(b.after, [181.0, 151.0, 30.0, 0.0, 3.0, 2.0, 0.0, 0.0]);
        assert!(b.at_ms > a.at_ms);
        // Kept across opens.
        drop(u);
        let again = Usage::new(dir.path());
        assert_eq!(
            totals(&again, "alice"),
            [181.0, 151.0, 30.0, 0.0, 3.0, 2.0, 0.0, 0.0]
        );
        assert_eq!(again.included(&[&other]).unwrap()[0], Some(b));
    }

    /// CO2e and cost are counted like energy; a counters file from before them is migrated
    /// with its totals kept and the new counters at 0.
    #[test]
    fn co2e_and_cost_are_counted_and_an_old_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A version 1 file with one job in it.
            let conn = Connection::open(dir.path().join(FILE)).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO totals VALUES ('c', 'gpu', 'phys', 'alice', 5, 0, 0, 0, 0, 1);
                 INSERT INTO jobs VALUES ('c', 9, 'gpu', 'phys', 'alice', 1, 5, 0, 0, 0, 0, 1,
                    1000, 5, 0, 0, 0, 0, 1);",
            )
            .unwrap();
        }
        let u = Usage::new(dir.path());
        assert_eq!(
            totals(&u, "alice"),
            [5.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        );
        let mut r = combine(&[job(1, "n1", "alice", 100.0)]);
        let carbon: crate::carbon::CarbonConfig =
            toml::from_str("intensity_g_per_kwh = 360").unwrap();
        let cost: crate::carbon::CostConfig = toml::from_str("price_per_kwh = 36").unwrap();
        crate::carbon::Factors::new(Some(&carbon), Some(&cost))
            .unwrap()
            .apply(&mut r, &[]);
        // 110 J = 1/32727 kWh: × 360 g = 0.011 g, × 36 = 0.0011.
        let text = u.add(&[&r]).unwrap();
        assert!(text.contains(",co2e_grams_total=0.011"), "{text}");
        let t = totals(&u, "alice");
        assert!(
            (t[6] - 0.011).abs() < 1e-12 && (t[7] - 0.0011).abs() < 1e-12,
            "{t:?}"
        );
        assert_eq!(t[..6], [115.0, 100.0, 10.0, 0.0, 1.0, 2.0]);
    }
}
