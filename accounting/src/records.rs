//! The job-records database: every job record `ergon run` collected, in tables a site can
//! query (`ergon report`, `ergon jobs`, SQL).
//!
//! It is embedded SQLite (built into `ergon`, nothing to install), one file, by default
//! `<state_dir>/records.sqlite`. `ergon run` writes it as one more destination of the pipeline
//! ([`RecordsSink`]): a record enters the state's write-ahead journal first, like for every
//! destination, and is *delivered* to the database once the transaction that holds it has
//! committed (SQLite's rollback journal with `synchronous = FULL`: committed means on disk, a
//! `kill -9` or a power loss keeps it). Until then it is pending in the state and the next run
//! writes it again.
//!
//! Writes are upserts, idempotent by (cluster, job id, node): a job's row, its node rows, its
//! GPU rows and its estimated gaps are replaced by what the record says, so a record written
//! twice (at-least-once delivery) leaves the same rows. A job recombined with a late node
//! manifest arrives again with more nodes; since deliveries may arrive out of order, a record
//! with *fewer* nodes than the job's row already has only adds its node rows and never replaces
//! the job's totals (a job's set of node manifests only grows: a manifest that changed is
//! quarantined, not delivered).
//!
//! The schema is versioned by SQLite's `user_version` and changed only by appending to
//! [`MIGRATIONS`]; each migration runs in its own transaction with the version bump, so a crash
//! leaves the old version or the new one. A database written by a newer `ergon` (a higher
//! version) is refused, not altered.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ergon_protocol::manifest::ComponentCoverage;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _};
use serde::Serialize;

use crate::job::{EstimatedGap, GpuSummary, GpusUnknown, JobRecordFull, NodeSummary};
use crate::sinks::{SendOutcome, Sink};

/// The database's file name in the state directory, by default.
pub const DEFAULT_FILE: &str = "records.sqlite";

/// The name of the database among the destinations in the state (`ergon status`).
pub const SINK_NAME: &str = "records";

/// The schema, one migration per version: version N is reached by running `MIGRATIONS[N-1]`.
/// Append only; never edit a migration that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: the tables.
    "CREATE TABLE jobs (
        cluster TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        job_hash TEXT NOT NULL,
        array_job_id INTEGER,
        array_task_id INTEGER,
        user TEXT NOT NULL,
        uid INTEGER NOT NULL,
        account TEXT,
        partition TEXT,
        start_unix_ns INTEGER NOT NULL,
        end_unix_ns INTEGER NOT NULL,
        duration_s REAL NOT NULL,
        energy_j REAL NOT NULL,
        gpu_j REAL,
        cpu_j REAL,
        dram_j REAL,
        avg_w REAL NOT NULL,
        peak_w REAL NOT NULL,
        coverage_min REAL NOT NULL,
        coverage_weighted REAL NOT NULL,
        estimated INTEGER NOT NULL,
        has_coverage_components INTEGER NOT NULL,
        coverage_gpu REAL,
        coverage_cpu REAL,
        coverage_dram REAL,
        estimate_bound_j REAL,
        sluid TEXT,
        nodes INTEGER NOT NULL,
        gpus INTEGER NOT NULL,
        written_unix INTEGER NOT NULL,
        PRIMARY KEY (cluster, job_id)
    );
    CREATE TABLE job_nodes (
        cluster TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        node TEXT NOT NULL,
        energy_j REAL NOT NULL,
        gpu_j REAL,
        cpu_j REAL,
        dram_j REAL,
        avg_w REAL NOT NULL,
        peak_w REAL NOT NULL,
        coverage REAL NOT NULL,
        manifest_hash TEXT NOT NULL,
        has_components INTEGER NOT NULL,
        coverage_gpu REAL,
        coverage_cpu REAL,
        coverage_dram REAL,
        gpus_unknown TEXT,
        PRIMARY KEY (cluster, job_id, node)
    );
    CREATE TABLE job_gpus (
        cluster TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        node TEXT NOT NULL,
        gpu_index INTEGER NOT NULL,
        uuid TEXT NOT NULL,
        energy_j REAL,
        avg_w REAL,
        peak_w REAL,
        method TEXT NOT NULL,
        mig TEXT,
        PRIMARY KEY (cluster, job_id, node, gpu_index, uuid)
    );
    CREATE TABLE job_estimates (
        cluster TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        node TEXT NOT NULL,
        seq INTEGER NOT NULL,
        start_unix_ns INTEGER NOT NULL,
        end_unix_ns INTEGER NOT NULL,
        reason TEXT NOT NULL,
        energy_j REAL NOT NULL,
        bound_j REAL NOT NULL,
        PRIMARY KEY (cluster, job_id, node, seq)
    );",
    // 2: what `ergon jobs` filters and sorts by: end time, alone and per user and account.
    "CREATE INDEX jobs_by_end ON jobs (end_unix_ns);
    CREATE INDEX jobs_by_user_end ON jobs (user, end_unix_ns);
    CREATE INDEX jobs_by_account_end ON jobs (account, end_unix_ns);",
];

/// The schema version this build writes and reads.
pub fn schema_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// SQLite failed.
    #[error("job-records database {path}: {error}{}", hint(error))]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The error.
        error: rusqlite::Error,
    },
    /// A newer ergon's schema.
    #[error("job-records database {path} has schema version {found}, this ergon reads up to {supported}: use the newer ergon, or point `records.path` at another file")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// This build's.
        supported: u32,
    },
    /// A read-only open found no database.
    #[error("job-records database {path} does not exist (yet): `ergon run` creates it")]
    Missing {
        /// The file.
        path: PathBuf,
    },
}

fn hint(e: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DiskFull) => "; its filesystem is full: free space there. Nothing is lost: the records stay pending in the state and the next run writes them",
        Some(C::ReadOnly) => "; it is read-only: check the file's owner and mode, and that its filesystem is mounted read-write",
        Some(C::CannotOpen) | Some(C::PermissionDenied) => "; check that the directory exists and that this user may read (and, for `ergon run`, write) it",
        Some(C::NotADatabase) => "; the file is not a SQLite database: move it away (the records in the spool are written again by `ergon run` only while they are in the state)",
        _ => "",
    }
}

/// The job-records database.
pub struct RecordsDb {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for RecordsDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordsDb")
            .field("path", &self.path)
            .finish()
    }
}

impl RecordsDb {
    /// Open (creating it if needed) for writing, and bring its schema to this build's version.
    pub fn open(path: &Path) -> Result<RecordsDb, RecordsError> {
        Self::open_at(path, schema_version())
    }

    /// [`RecordsDb::open`], migrating only up to `version` (for the migration test).
    pub fn open_at(path: &Path, version: u32) -> Result<RecordsDb, RecordsError> {
        let err = |error| RecordsError::Sqlite {
            path: path.to_path_buf(),
            error,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        // The rollback journal (not WAL), so that readers need no write access to the
        // directory (users run `ergon report`); FULL: a commit is on disk when it returns.
        conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL;")
            .map_err(err)?;
        migrate(&mut conn, path, version)?;
        Ok(RecordsDb {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// Open an existing database for reading only (`ergon report`, `ergon jobs`).
    pub fn open_read_only(path: &Path) -> Result<RecordsDb, RecordsError> {
        if !path.exists() {
            return Err(RecordsError::Missing {
                path: path.to_path_buf(),
            });
        }
        let err = |error| RecordsError::Sqlite {
            path: path.to_path_buf(),
            error,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        let found = user_version(&conn).map_err(err)?;
        if found > schema_version() {
            return Err(RecordsError::TooNew {
                path: path.to_path_buf(),
                found,
                supported: schema_version(),
            });
        }
        Ok(RecordsDb {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open database.
    pub fn version(&self) -> Result<u32, RecordsError> {
        let conn = self.lock();
        user_version(&conn).map_err(|error| self.error(error))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves a connection SQLite keeps consistent itself.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, error: rusqlite::Error) -> RecordsError {
        RecordsError::Sqlite {
            path: self.path.clone(),
            error,
        }
    }

    /// Write `records` in one transaction (see the module docs for the upsert rules). When it
    /// returns `Ok`, they are on disk.
    pub fn upsert(&self, records: &[&JobRecordFull]) -> Result<(), RecordsError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.error(e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for r in records {
            upsert_one(&tx, r, now).map_err(|e| self.error(e))?;
        }
        tx.commit().map_err(|e| self.error(e))
    }

    /// The records of job `job_id` (one per cluster that has it; only `cluster`'s if given).
    pub fn get(
        &self,
        cluster: Option<&str>,
        job_id: u32,
    ) -> Result<Vec<JobRecordFull>, RecordsError> {
        let conn = self.lock();
        read_jobs(&conn, cluster, job_id).map_err(|e| self.error(e))
    }

    /// The jobs matching `filter`, newest end first.
    pub fn list(&self, filter: &JobFilter) -> Result<Vec<JobRow>, RecordsError> {
        let conn = self.lock();
        list_jobs(&conn, filter).map_err(|e| self.error(e))
    }

    /// Jobs in the database.
    pub fn count(&self) -> Result<u64, RecordsError> {
        let conn = self.lock();
        conn.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.error(e))
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map(|v| v as u32)
}

fn migrate(conn: &mut Connection, path: &Path, target: u32) -> Result<(), RecordsError> {
    let err = |error| RecordsError::Sqlite {
        path: path.to_path_buf(),
        error,
    };
    // Taken at once for writing (IMMEDIATE), so that two runs never migrate at the same time.
    let found = user_version(conn).map_err(err)?;
    if found > schema_version() {
        return Err(RecordsError::TooNew {
            path: path.to_path_buf(),
            found,
            supported: schema_version(),
        });
    }
    for version in found + 1..=target.min(schema_version()) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        // Another process may have migrated meanwhile.
        if user_version(&tx).map_err(err)? >= version {
            continue;
        }
        tx.execute_batch(MIGRATIONS[version as usize - 1])
            .map_err(err)?;
        tx.execute_batch(&format!("PRAGMA user_version = {version}"))
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}

fn upsert_one(tx: &rusqlite::Transaction<'_>, r: &JobRecordFull, now: i64) -> rusqlite::Result<()> {
    let existing: Option<i64> = tx
        .query_row(
            "SELECT nodes FROM jobs WHERE cluster = ?1 AND job_id = ?2",
            params![r.cluster, r.job_id],
            |row| row.get(0),
        )
        .optional()?;
    let replace_job = existing.is_none_or(|n| r.nodes.len() as i64 >= n);
    if replace_job {
        let cc = r.coverage_components;
        tx.execute(
            "INSERT INTO jobs (cluster, job_id, idempotency_key, job_hash, array_job_id,
                array_task_id, user, uid, account, partition, start_unix_ns, end_unix_ns,
                duration_s, energy_j, gpu_j, cpu_j, dram_j, avg_w, peak_w, coverage_min,
                coverage_weighted, estimated, has_coverage_components, coverage_gpu,
                coverage_cpu, coverage_dram, estimate_bound_j, sluid, nodes, gpus, written_unix)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31)
             ON CONFLICT (cluster, job_id) DO UPDATE SET
                idempotency_key = excluded.idempotency_key, job_hash = excluded.job_hash,
                array_job_id = excluded.array_job_id, array_task_id = excluded.array_task_id,
                user = excluded.user, uid = excluded.uid, account = excluded.account,
                partition = excluded.partition, start_unix_ns = excluded.start_unix_ns,
                end_unix_ns = excluded.end_unix_ns, duration_s = excluded.duration_s,
                energy_j = excluded.energy_j, gpu_j = excluded.gpu_j, cpu_j = excluded.cpu_j,
                dram_j = excluded.dram_j, avg_w = excluded.avg_w, peak_w = excluded.peak_w,
                coverage_min = excluded.coverage_min,
                coverage_weighted = excluded.coverage_weighted, estimated = excluded.estimated,
                has_coverage_components = excluded.has_coverage_components,
                coverage_gpu = excluded.coverage_gpu, coverage_cpu = excluded.coverage_cpu,
                coverage_dram = excluded.coverage_dram,
                estimate_bound_j = excluded.estimate_bound_j, sluid = excluded.sluid,
                nodes = excluded.nodes, gpus = excluded.gpus,
                written_unix = excluded.written_unix",
            params![
                r.cluster,
                r.job_id,
                r.idempotency_key,
                r.job_hash,
                r.array_job_id,
                r.array_task_id,
                r.user,
                r.uid,
                r.account,
                r.partition,
                r.start_unix_ns as i64,
                r.end_unix_ns as i64,
                r.duration_s,
                r.energy_j,
                r.gpu_j,
                r.cpu_j,
                r.dram_j,
                r.avg_w,
                r.peak_w,
                r.coverage_min,
                r.coverage_weighted,
                r.estimated,
                cc.is_some(),
                cc.and_then(|c| c.gpu),
                cc.and_then(|c| c.cpu),
                cc.and_then(|c| c.dram),
                r.estimate_bound_j,
                r.sluid,
                r.nodes.len() as i64,
                r.gpus.len() as i64,
                now,
            ],
        )?;
    }
    for n in &r.nodes {
        let c = n.components;
        tx.execute(
            "INSERT INTO job_nodes (cluster, job_id, node, energy_j, gpu_j, cpu_j, dram_j, avg_w,
                peak_w, coverage, manifest_hash, has_components, coverage_gpu, coverage_cpu,
                coverage_dram, gpus_unknown)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (cluster, job_id, node) DO UPDATE SET
                energy_j = excluded.energy_j, gpu_j = excluded.gpu_j, cpu_j = excluded.cpu_j,
                dram_j = excluded.dram_j, avg_w = excluded.avg_w, peak_w = excluded.peak_w,
                coverage = excluded.coverage, manifest_hash = excluded.manifest_hash,
                has_components = excluded.has_components, coverage_gpu = excluded.coverage_gpu,
                coverage_cpu = excluded.coverage_cpu, coverage_dram = excluded.coverage_dram,
                gpus_unknown = excluded.gpus_unknown",
            params![
                r.cluster,
                r.job_id,
                n.node,
                n.energy_j,
                n.gpu_j,
                n.cpu_j,
                n.dram_j,
                n.avg_w,
                n.peak_w,
                n.coverage,
                n.manifest_hash,
                c.is_some(),
                c.and_then(|c| c.gpu),
                c.and_then(|c| c.cpu),
                c.and_then(|c| c.dram),
                n.gpus_unknown,
            ],
        )?;
        // The node's GPUs and gaps: exactly what its manifest (the same in every record of the
        // job) says.
        tx.execute(
            "DELETE FROM job_gpus WHERE cluster = ?1 AND job_id = ?2 AND node = ?3",
            params![r.cluster, r.job_id, n.node],
        )?;
        tx.execute(
            "DELETE FROM job_estimates WHERE cluster = ?1 AND job_id = ?2 AND node = ?3",
            params![r.cluster, r.job_id, n.node],
        )?;
    }
    for g in &r.gpus {
        tx.execute(
            "INSERT OR REPLACE INTO job_gpus (cluster, job_id, node, gpu_index, uuid, energy_j,
                avg_w, peak_w, method, mig)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                r.cluster,
                r.job_id,
                g.node,
                g.index,
                g.uuid,
                g.energy_j,
                g.avg_w,
                g.peak_w,
                to_json(&g.method),
                g.mig.as_ref().map(to_json),
            ],
        )?;
    }
    let mut seq: std::collections::BTreeMap<&str, i64> = Default::default();
    for e in &r.estimates {
        let n = seq.entry(e.node.as_str()).or_default();
        tx.execute(
            "INSERT OR REPLACE INTO job_estimates (cluster, job_id, node, seq, start_unix_ns,
                end_unix_ns, reason, energy_j, bound_j)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r.cluster,
                r.job_id,
                e.node,
                *n,
                e.start_unix_ns as i64,
                e.end_unix_ns as i64,
                e.reason,
                e.energy_j,
                e.bound_j,
            ],
        )?;
        *n += 1;
    }
    Ok(())
}

fn to_json<T: Serialize>(v: &T) -> String {
    // A plain enum or struct of numbers and strings: serializing cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(col: usize, text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn coverage(
    has: bool,
    gpu: Option<f64>,
    cpu: Option<f64>,
    dram: Option<f64>,
) -> Option<ComponentCoverage> {
    has.then_some(ComponentCoverage { gpu, cpu, dram })
}

fn read_jobs(
    conn: &Connection,
    cluster: Option<&str>,
    job_id: u32,
) -> rusqlite::Result<Vec<JobRecordFull>> {
    let mut stmt = conn.prepare_cached(
        "SELECT cluster, job_id, idempotency_key, job_hash, array_job_id, array_task_id, user,
            uid, account, partition, start_unix_ns, end_unix_ns, duration_s, energy_j, gpu_j,
            cpu_j, dram_j, avg_w, peak_w, coverage_min, coverage_weighted, estimated,
            has_coverage_components, coverage_gpu, coverage_cpu, coverage_dram,
            estimate_bound_j, sluid
         FROM jobs WHERE job_id = ?1 AND (?2 IS NULL OR cluster = ?2) ORDER BY cluster",
    )?;
    let mut jobs: Vec<JobRecordFull> = stmt
        .query_map(params![job_id, cluster], |row| {
            Ok(JobRecordFull {
                cluster: row.get(0)?,
                job_id: row.get(1)?,
                idempotency_key: row.get(2)?,
                job_hash: row.get(3)?,
                array_job_id: row.get(4)?,
                array_task_id: row.get(5)?,
                user: row.get(6)?,
                uid: row.get(7)?,
                account: row.get(8)?,
                partition: row.get(9)?,
                start_unix_ns: row.get::<_, i64>(10)? as u64,
                end_unix_ns: row.get::<_, i64>(11)? as u64,
                duration_s: row.get(12)?,
                energy_j: row.get(13)?,
                gpu_j: row.get(14)?,
                cpu_j: row.get(15)?,
                dram_j: row.get(16)?,
                avg_w: row.get(17)?,
                peak_w: row.get(18)?,
                coverage_min: row.get(19)?,
                coverage_weighted: row.get(20)?,
                estimated: row.get(21)?,
                coverage_components: coverage(
                    row.get(22)?,
                    row.get(23)?,
                    row.get(24)?,
                    row.get(25)?,
                ),
                estimate_bound_j: row.get(26)?,
                sluid: row.get(27)?,
                nodes: Vec::new(),
                gpus: Vec::new(),
                gpus_unknown: Vec::new(),
                estimates: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for job in &mut jobs {
        let key = params![job.cluster, job.job_id];
        let mut stmt = conn.prepare_cached(
            "SELECT node, energy_j, gpu_j, cpu_j, dram_j, avg_w, peak_w, coverage, manifest_hash,
                has_components, coverage_gpu, coverage_cpu, coverage_dram, gpus_unknown
             FROM job_nodes WHERE cluster = ?1 AND job_id = ?2 ORDER BY node",
        )?;
        job.nodes = stmt
            .query_map(key, |row| {
                Ok(NodeSummary {
                    node: row.get(0)?,
                    energy_j: row.get(1)?,
                    gpu_j: row.get(2)?,
                    cpu_j: row.get(3)?,
                    dram_j: row.get(4)?,
                    avg_w: row.get(5)?,
                    peak_w: row.get(6)?,
                    coverage: row.get(7)?,
                    manifest_hash: row.get(8)?,
                    components: coverage(row.get(9)?, row.get(10)?, row.get(11)?, row.get(12)?),
                    gpus_unknown: row.get(13)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        job.gpus_unknown = job
            .nodes
            .iter()
            .filter_map(|n| {
                Some(GpusUnknown {
                    node: n.node.clone(),
                    reason: n.gpus_unknown.clone()?,
                })
            })
            .collect();
        let mut stmt = conn.prepare_cached(
            "SELECT node, uuid, gpu_index, energy_j, avg_w, peak_w, method, mig
             FROM job_gpus WHERE cluster = ?1 AND job_id = ?2 ORDER BY node, gpu_index, uuid",
        )?;
        job.gpus = stmt
            .query_map(key, |row| {
                let method: String = row.get(6)?;
                let mig: Option<String> = row.get(7)?;
                Ok(GpuSummary {
                    node: row.get(0)?,
                    uuid: row.get(1)?,
                    index: row.get(2)?,
                    energy_j: row.get(3)?,
                    avg_w: row.get(4)?,
                    peak_w: row.get(5)?,
                    method: from_json(6, &method)?,
                    mig: mig.map(|m| from_json(7, &m)).transpose()?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut stmt = conn.prepare_cached(
            "SELECT node, start_unix_ns, end_unix_ns, reason, energy_j, bound_j
             FROM job_estimates WHERE cluster = ?1 AND job_id = ?2 ORDER BY node, seq",
        )?;
        job.estimates = stmt
            .query_map(key, |row| {
                Ok(EstimatedGap {
                    node: row.get(0)?,
                    start_unix_ns: row.get::<_, i64>(1)? as u64,
                    end_unix_ns: row.get::<_, i64>(2)? as u64,
                    reason: row.get(3)?,
                    energy_j: row.get(4)?,
                    bound_j: row.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
    }
    Ok(jobs)
}

/// Which jobs `ergon jobs` lists.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this cluster's.
    pub cluster: Option<String>,
    /// Only this user's.
    pub user: Option<String>,
    /// Only this account's.
    pub account: Option<String>,
    /// Only jobs that ended at or after this (Unix ns).
    pub since_unix_ns: Option<u64>,
    /// Only jobs that ended before this (Unix ns).
    pub until_unix_ns: Option<u64>,
    /// At most this many (the newest).
    pub limit: Option<u64>,
}

/// One line of `ergon jobs`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRow {
    /// Cluster.
    pub cluster: String,
    /// Job id.
    pub job_id: u32,
    /// Owner.
    pub user: String,
    /// Account.
    pub account: Option<String>,
    /// Partition.
    pub partition: Option<String>,
    /// Start, Unix ns.
    pub start_unix_ns: u64,
    /// End, Unix ns.
    pub end_unix_ns: u64,
    /// Seconds.
    pub duration_s: f64,
    /// Joules.
    pub energy_j: f64,
    /// GPU joules, `None` when not measured.
    pub gpu_j: Option<f64>,
    /// CPU package joules.
    pub cpu_j: Option<f64>,
    /// DRAM joules.
    pub dram_j: Option<f64>,
    /// Nodes.
    pub nodes: u32,
    /// GPUs.
    pub gpus: u32,
    /// Lowest node coverage.
    pub coverage_min: f64,
    /// Partly estimated.
    pub estimated: bool,
}

fn list_jobs(conn: &Connection, f: &JobFilter) -> rusqlite::Result<Vec<JobRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT cluster, job_id, user, account, partition, start_unix_ns, end_unix_ns,
            duration_s, energy_j, gpu_j, cpu_j, dram_j, nodes, gpus, coverage_min, estimated
         FROM jobs
         WHERE (?1 IS NULL OR cluster = ?1) AND (?2 IS NULL OR user = ?2)
            AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR end_unix_ns >= ?4)
            AND (?5 IS NULL OR end_unix_ns < ?5)
         ORDER BY end_unix_ns DESC, cluster, job_id DESC
         LIMIT ?6",
    )?;
    let rows = stmt
        .query_map(
            params![
                f.cluster,
                f.user,
                f.account,
                f.since_unix_ns.map(|t| t as i64),
                f.until_unix_ns.map(|t| t as i64),
                f.limit.map_or(-1, |l| l as i64),
            ],
            |row| {
                Ok(JobRow {
                    cluster: row.get(0)?,
                    job_id: row.get(1)?,
                    user: row.get(2)?,
                    account: row.get(3)?,
                    partition: row.get(4)?,
                    start_unix_ns: row.get::<_, i64>(5)? as u64,
                    end_unix_ns: row.get::<_, i64>(6)? as u64,
                    duration_s: row.get(7)?,
                    energy_j: row.get(8)?,
                    gpu_j: row.get(9)?,
                    cpu_j: row.get(10)?,
                    dram_j: row.get(11)?,
                    nodes: row.get(12)?,
                    gpus: row.get(13)?,
                    coverage_min: row.get(14)?,
                    estimated: row.get(15)?,
                })
            },
        )?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// The database as a destination of `ergon run`: a batch is one transaction; committed is
/// delivered (no read-back needed: SQLite's commit with `synchronous = FULL` is on disk).
pub struct RecordsSink {
    /// The database, or why there is none: it could not be opened (then every batch is
    /// refused with that reason and stays pending, while the other destinations go on), or a
    /// dry run, which opens (creates, migrates) nothing.
    db: Result<RecordsDb, String>,
    batch_size: usize,
}

impl RecordsSink {
    /// Open (create, migrate) the database at `path`. A database that cannot be opened is
    /// logged, and its records stay pending for the next run.
    pub fn open(path: &Path, batch_size: usize) -> RecordsSink {
        let db = RecordsDb::open(path).map_err(|e| {
            tracing::error!(
                "{e}; job records stay pending for the database until it can be written"
            );
            e.to_string()
        });
        RecordsSink { db, batch_size }
    }

    /// A sink for `ergon run --dry-run`: it touches no file, and sends nothing.
    pub fn dry(batch_size: usize) -> RecordsSink {
        RecordsSink {
            db: Err("dry run: nothing is written".into()),
            batch_size,
        }
    }
}

impl Sink for RecordsSink {
    fn name(&self) -> &str {
        SINK_NAME
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn send(&self, records: &[&JobRecordFull]) -> SendOutcome {
        let db = match &self.db {
            Ok(db) => db,
            Err(e) => return SendOutcome::Rejected(e.clone()),
        };
        match db.upsert(records) {
            Ok(()) => SendOutcome::Delivered,
            Err(e) => {
                let busy = matches!(
                    &e,
                    RecordsError::Sqlite { error, .. }
                        if matches!(error.sqlite_error_code(),
                            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
                );
                if busy {
                    SendOutcome::Retry {
                        after: None,
                        error: e.to_string(),
                    }
                } else {
                    // Full disk, read-only, corrupt: a retry in this run will not change it.
                    SendOutcome::Rejected(e.to_string())
                }
            }
        }
    }
}

/// A time for `ergon jobs --since/--until`, as Unix ns: `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or
/// `YYYY-MM-DDTHH:MM:SS` (UTC; a space may stand for the `T`), or `@SECONDS` since the epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{s:?} is not a time: give YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS] (UTC) or @UNIX_SECONDS"
        )
    };
    if let Some(secs) = s.strip_prefix('@') {
        return secs
            .parse::<u64>()
            .ok()
            .and_then(|v| v.checked_mul(1_000_000_000))
            .ok_or_else(bad);
    }
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let num = |p: &str, lo: i64, hi: i64| -> Result<i64, String> {
        let all_digits = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        p.parse::<i64>()
            .ok()
            .filter(|v| all_digits && (lo..=hi).contains(v))
            .ok_or_else(bad)
    };
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, day] = d[..] else {
        return Err(bad());
    };
    let (y, m, day) = (num(y, 1970, 9999)?, num(m, 1, 12)?, num(day, 1, 31)?);
    let (mut hh, mut mm, mut ss) = (0, 0, 0);
    if let Some(t) = time {
        let t: Vec<&str> = t.trim_end_matches('Z').split(':').collect();
        match t[..] {
            [h, mi] => (hh, mm) = (num(h, 0, 23)?, num(mi, 0, 59)?),
            [h, mi, se] => (hh, mm, ss) = (num(h, 0, 23)?, num(mi, 0, 59)?, num(se, 0, 60)?),
            _ => return Err(bad()),
        }
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs)
        .map(|s| s * 1_000_000_000)
        .map_err(|_| bad())
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix ns.
pub fn format_time(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How `ergon jobs` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JobsFormat {
    /// Aligned columns.
    Table,
    /// One JSON array.
    Json,
    /// Comma-separated, with a header line; energies in joules, times in UTC.
    Csv,
}

/// The rows as `format`.
pub fn render_jobs(rows: &[JobRow], format: JobsFormat) -> String {
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.0}"));
    match format {
        JobsFormat::Json => serde_json::to_string_pretty(rows).unwrap_or_default() + "\n",
        JobsFormat::Csv => {
            let field = |s: &str| {
                if s.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", s.replace('"', "\"\""))
                } else {
                    s.to_owned()
                }
            };
            let mut out = String::from("cluster,job_id,user,account,partition,start,end,duration_s,energy_j,gpu_j,cpu_j,dram_j,nodes,gpus,coverage_min,estimated\n");
            for r in rows {
                out += &format!(
                    "{},{},{},{},{},{},{},{:.3},{:.0},{},{},{},{},{},{:.4},{}\n",
                    field(&r.cluster),
                    r.job_id,
                    field(&r.user),
                    field(r.account.as_deref().unwrap_or("")),
                    field(r.partition.as_deref().unwrap_or("")),
                    format_time(r.start_unix_ns),
                    format_time(r.end_unix_ns),
                    r.duration_s,
                    r.energy_j,
                    opt(r.gpu_j),
                    opt(r.cpu_j),
                    opt(r.dram_j),
                    r.nodes,
                    r.gpus,
                    r.coverage_min,
                    r.estimated
                );
            }
            out
        }
        JobsFormat::Table => {
            let mut out = format!(
                "{:<12} {:>10} {:<12} {:<12} {:<20} {:>10} {:>12} {:>5} {:>4} {:>8}\n",
                "CLUSTER",
                "JOBID",
                "USER",
                "ACCOUNT",
                "END (UTC)",
                "DURATION",
                "ENERGY",
                "NODES",
                "GPUS",
                "COVERAGE"
            );
            for r in rows {
                out += &format!(
                    "{:<12} {:>10} {:<12} {:<12} {:<20} {:>10} {:>12} {:>5} {:>4} {:>8}{}\n",
                    r.cluster,
                    r.job_id,
                    r.user,
                    r.account.as_deref().unwrap_or("-"),
                    format_time(r.end_unix_ns),
                    ergon_protocol::format::duration(r.duration_s),
                    ergon_protocol::format::energy(r.energy_j),
                    r.nodes,
                    r.gpus,
                    ergon_protocol::format::percent(r.coverage_min),
                    if r.estimated { "  estimated" } else { "" }
                );
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::combine;
    use ergon_protocol::testing::ManifestBuilder;

    fn node(job: u32, node: &str, gpu_j: f64, end_s: u64) -> ergon_protocol::manifest::Manifest {
        ManifestBuilder::new("c", job, node)
            .account("phys")
            .partition("gpu")
            .ended(end_s * 1_000_000_000, 100)
            .gpu(Some(gpu_j))
            .socket(10.0, Some(2.0))
            .batch_step()
            .build()
    }

    fn count(db: &RecordsDb, table: &str) -> i64 {
        db.lock()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_record_reads_back_as_it_was_written_and_a_second_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = RecordsDb::open(&dir.path().join("r.sqlite")).unwrap();
        let r = combine(&[node(7, "n2", 50.0, 2_000), node(7, "n1", 100.0, 2_000)]);
        db.upsert(&[&r, &r]).unwrap();
        db.upsert(&[&r]).unwrap();
        assert_eq!(db.get(None, 7).unwrap(), vec![r.clone()]);
        assert_eq!(db.get(Some("c"), 7).unwrap(), vec![r]);
        assert!(db.get(Some("other"), 7).unwrap().is_empty());
        assert_eq!(
            (
                count(&db, "jobs"),
                count(&db, "job_nodes"),
                count(&db, "job_gpus")
            ),
            (1, 2, 2)
        );
    }

    /// Deliveries may arrive out of order: the job recombined with a late node wins, whichever
    /// comes last, and the earlier record only (re)writes its own node's rows.
    #[test]
    fn a_record_with_fewer_nodes_never_replaces_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let db = RecordsDb::open(&dir.path().join("r.sqlite")).unwrap();
        let early = combine(&[node(8, "n1", 100.0, 2_000)]);
        let late = combine(&[node(8, "n1", 100.0, 2_000), node(8, "n2", 50.0, 2_000)]);
        db.upsert(&[&late]).unwrap();
        db.upsert(&[&early]).unwrap();
        assert_eq!(db.get(None, 8).unwrap(), vec![late.clone()]);
        let dir = tempfile::tempdir().unwrap();
        let db = RecordsDb::open(&dir.path().join("r.sqlite")).unwrap();
        db.upsert(&[&early]).unwrap();
        db.upsert(&[&late]).unwrap();
        assert_eq!(db.get(None, 8).unwrap(), vec![late]);
    }

    /// A database at version 1 (before the indexes) is migrated with its rows kept; reopening
    /// migrates nothing; a newer ergon's database is refused, not altered.
    #[test]
    fn migrations_keep_the_rows_and_a_newer_schema_is_refused() {
        assert!(schema_version() >= 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let r = combine(&[node(9, "n1", 100.0, 2_000)]);
        {
            let v1 = RecordsDb::open_at(&path, 1).unwrap();
            assert_eq!(v1.version().unwrap(), 1);
            v1.upsert(&[&r]).unwrap();
        }
        let indexes = |db: &RecordsDb| -> Vec<String> {
            let conn = db.lock();
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE 'jobs_by_%' ORDER BY name")
                .unwrap();
            stmt.query_map([], |row| row.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let db = RecordsDb::open(&path).unwrap();
        assert_eq!(db.version().unwrap(), schema_version());
        assert_eq!(
            indexes(&db),
            ["jobs_by_account_end", "jobs_by_end", "jobs_by_user_end"]
        );
        assert_eq!(db.get(None, 9).unwrap(), vec![r.clone()]);
        drop(db);
        let again = RecordsDb::open(&path).unwrap();
        assert_eq!(again.get(None, 9).unwrap(), vec![r]);
        again
            .lock()
            .execute_batch(&format!("PRAGMA user_version = {}", schema_version() + 1))
            .unwrap();
        drop(again);
        let before = std::fs::read(&path).unwrap();
        for err in [
            RecordsDb::open(&path).unwrap_err(),
            RecordsDb::open_read_only(&path).unwrap_err(),
        ] {
            assert!(matches!(err, RecordsError::TooNew { .. }), "{err}");
            assert!(err.to_string().contains("use the newer ergon"), "{err}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn jobs_are_listed_by_filter_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let db = RecordsDb::open(&dir.path().join("r.sqlite")).unwrap();
        let mk = |job, user: &str, account: &str, end_s: u64| {
            let m = ManifestBuilder::new("c", job, "n1")
                .user(user, 1000)
                .account(account)
                .ended(end_s * 1_000_000_000, 10)
                .socket(10.0, None)
                .build();
            combine(&[m])
        };
        let records = [
            mk(1, "alice", "phys", 1_000),
            mk(2, "bob", "phys", 2_000),
            mk(3, "alice", "chem", 3_000),
        ];
        db.upsert(&records.iter().collect::<Vec<_>>()).unwrap();
        let ids = |f: JobFilter| -> Vec<u32> {
            db.list(&f).unwrap().into_iter().map(|r| r.job_id).collect()
        };
        assert_eq!(ids(JobFilter::default()), [3, 2, 1]);
        let alice = || JobFilter {
            user: Some("alice".into()),
            ..JobFilter::default()
        };
        assert_eq!(ids(alice()), [3, 1]);
        assert_eq!(
            ids(JobFilter {
                account: Some("phys".into()),
                ..alice()
            }),
            [1]
        );
        assert_eq!(
            ids(JobFilter {
                since_unix_ns: Some(2_000_000_000_000),
                until_unix_ns: Some(3_000_000_000_000),
                ..JobFilter::default()
            }),
            [2]
        );
        assert_eq!(
            ids(JobFilter {
                limit: Some(1),
                ..JobFilter::default()
            }),
            [3]
        );
        let csv = render_jobs(&db.list(&alice()).unwrap(), JobsFormat::Csv);
        assert_eq!(csv.lines().count(), 3, "{csv}");
        assert!(
            csv.lines().nth(1).unwrap().starts_with("c,3,alice,chem,"),
            "{csv}"
        );
    }

    #[test]
    fn times_parse_and_format_in_utc() {
        assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000_000_000);
        assert_eq!(parse_time("@86400").unwrap(), 86_400_000_000_000);
        let t = parse_time("2026-12-06T03:27:03").unwrap();
        assert_eq!(format_time(t), "2026-12-06T03:27:03Z");
        assert_eq!(
            parse_time("2024-02-29 23:59").unwrap(),
            parse_time("2024-03-01").unwrap() - 60_000_000_000
        );
        for bad in [
            "yesterday",
            "2026-13-01",
            "2026-1-1x",
            "@-5",
            "2026-01-01T25:00",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("YYYY-MM-DD"), "{e}");
        }
    }
}
