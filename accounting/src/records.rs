//! The job-records database: every job record `ergon run` collected, in tables a site can
//! query (`ergon report`, `ergon jobs`, SQL).
//!
//! Two backends, the same tables ([`Location`]): **embedded SQLite** by default (built into
//! `ergon`, nothing to install, one file, `<state_dir>/records.sqlite`), and **MariaDB** for
//! sites that outgrow one host (the server every Slurm site already runs for slurmdbd).
//! `ergon run` writes it as one more destination of the pipeline ([`RecordsSink`]): a record
//! enters the state's write-ahead journal first, like for every destination, and is
//! *delivered* to the database once the transaction that holds it has committed (SQLite's
//! rollback journal with `synchronous = FULL`; InnoDB with its default
//! `innodb_flush_log_at_trx_commit = 1`: committed means on disk, a `kill -9` of either side
//! keeps it). Until then it is pending in the state and the next run writes it again.
//!
//! Writes are upserts, idempotent by (cluster, job id, node): a job's row, its node rows, its
//! GPU rows and its estimated gaps are replaced by what the record says, so a record written
//! twice (at-least-once delivery) leaves the same rows. A job recombined with a late node
//! manifest arrives again with more nodes; since deliveries may arrive out of order, a record
//! with *fewer* nodes than the job's row already has only adds its node rows and never replaces
//! the job's totals (a job's set of node manifests only grows: a manifest that changed is
//! quarantined, not delivered).
//!
//! The schema is versioned (SQLite: `user_version`; MariaDB: the `ergon_schema` table) and
//! changed only by appending to [`MIGRATIONS`] and [`MARIADB_MIGRATIONS`] (the same versions,
//! each in its dialect). A database written by a newer `ergon` (a higher version) is refused,
//! not altered.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use ergon_protocol::manifest::ComponentCoverage;
use serde::Serialize;

use crate::job::{EstimatedGap, GpuSummary, GpusUnknown, JobRecordFull, NodeSummary};
use crate::sinks::{SendOutcome, Sink};

pub use crate::config::{Location, DEFAULT_RECORDS_FILE as DEFAULT_FILE};
pub use crate::time::{format_time, parse_time};

/// The name of the database among the destinations in the state (`ergon status`).
pub const SINK_NAME: &str = "records";

/// The SQLite schema, one migration per version: version N is reached by running
/// `MIGRATIONS[N-1]`. Append only; never edit a migration that has shipped.
pub const MIGRATIONS: &[&str] = &[
    // 1: the tables.
    "CREATE TABLE jobs (
        cluster TEXT NOT NULL,
        job_id INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        job_hash TEXT NOT NULL,
        array_job_id INTEGER,
        array_task_id INTEGER,
        `user` TEXT NOT NULL,
        uid INTEGER NOT NULL,
        account TEXT,
        `partition` TEXT,
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
        job_nodes TEXT,
        nodes_missing TEXT,
        gpus_unknown_nodes INTEGER NOT NULL,
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
    CREATE INDEX jobs_by_user_end ON jobs (`user`, end_unix_ns);
    CREATE INDEX jobs_by_account_end ON jobs (account, end_unix_ns);",
    // 3: CO2e and cost (docs/carbon.md): the figures `ergon summary` sums, and the whole
    // footprint with its factors as JSON for `ergon report`.
    "ALTER TABLE jobs ADD COLUMN co2e_g REAL;
    ALTER TABLE jobs ADD COLUMN co2e_missing REAL;
    ALTER TABLE jobs ADD COLUMN cost REAL;
    ALTER TABLE jobs ADD COLUMN cost_missing REAL;
    ALTER TABLE jobs ADD COLUMN currency TEXT;
    ALTER TABLE jobs ADD COLUMN footprint TEXT;",
    // 4: GPU efficiency (docs/accounting.md): each GPU's figures as JSON for `ergon report`,
    // and the energy of the job's idle allocated GPUs that `ergon summary` sums.
    "ALTER TABLE jobs ADD COLUMN gpu_idle_j REAL;
    ALTER TABLE job_gpus ADD COLUMN efficiency TEXT;",
    // 5: energy at the wall (docs/attribution.md): each node's `wall` section as JSON, and the
    // job's wall energy when every node had a meter.
    "ALTER TABLE jobs ADD COLUMN wall_j REAL;
    ALTER TABLE job_nodes ADD COLUMN wall TEXT;",
];

/// The MariaDB schema: the same versions as [`MIGRATIONS`], in MariaDB's dialect (InnoDB,
/// `utf8mb4_bin` so that names compare byte for byte as in SQLite). Every statement can run
/// twice (`IF NOT EXISTS`): MariaDB commits DDL at once, so a migration interrupted before its
/// version was recorded runs again.
pub const MARIADB_MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE IF NOT EXISTS jobs (
            cluster VARCHAR(64) NOT NULL,
            job_id INT UNSIGNED NOT NULL,
            idempotency_key VARCHAR(255) NOT NULL,
            job_hash VARCHAR(128) NOT NULL,
            array_job_id INT UNSIGNED,
            array_task_id INT UNSIGNED,
            `user` VARCHAR(255) NOT NULL,
            uid INT UNSIGNED NOT NULL,
            account VARCHAR(255),
            `partition` VARCHAR(255),
            start_unix_ns BIGINT NOT NULL,
            end_unix_ns BIGINT NOT NULL,
            duration_s DOUBLE NOT NULL,
            energy_j DOUBLE NOT NULL,
            gpu_j DOUBLE,
            cpu_j DOUBLE,
            dram_j DOUBLE,
            avg_w DOUBLE NOT NULL,
            peak_w DOUBLE NOT NULL,
            coverage_min DOUBLE NOT NULL,
            coverage_weighted DOUBLE NOT NULL,
            estimated TINYINT NOT NULL,
            has_coverage_components TINYINT NOT NULL,
            coverage_gpu DOUBLE,
            coverage_cpu DOUBLE,
            coverage_dram DOUBLE,
            estimate_bound_j DOUBLE,
            sluid VARCHAR(64),
            job_nodes MEDIUMTEXT,
            nodes_missing MEDIUMTEXT,
            gpus_unknown_nodes INT NOT NULL,
            nodes INT NOT NULL,
            gpus INT NOT NULL,
            written_unix BIGINT NOT NULL,
            PRIMARY KEY (cluster, job_id)
        ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
        "CREATE TABLE IF NOT EXISTS job_nodes (
            cluster VARCHAR(64) NOT NULL,
            job_id INT UNSIGNED NOT NULL,
            node VARCHAR(255) NOT NULL,
            energy_j DOUBLE NOT NULL,
            gpu_j DOUBLE,
            cpu_j DOUBLE,
            dram_j DOUBLE,
            avg_w DOUBLE NOT NULL,
            peak_w DOUBLE NOT NULL,
            coverage DOUBLE NOT NULL,
            manifest_hash VARCHAR(128) NOT NULL,
            has_components TINYINT NOT NULL,
            coverage_gpu DOUBLE,
            coverage_cpu DOUBLE,
            coverage_dram DOUBLE,
            gpus_unknown TEXT,
            PRIMARY KEY (cluster, job_id, node)
        ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
        "CREATE TABLE IF NOT EXISTS job_gpus (
            cluster VARCHAR(64) NOT NULL,
            job_id INT UNSIGNED NOT NULL,
            node VARCHAR(255) NOT NULL,
            gpu_index INT UNSIGNED NOT NULL,
            uuid VARCHAR(128) NOT NULL,
            energy_j DOUBLE,
            avg_w DOUBLE,
            peak_w DOUBLE,
            method VARCHAR(64) NOT NULL,
            mig TEXT,
            PRIMARY KEY (cluster, job_id, node, gpu_index, uuid)
        ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
        "CREATE TABLE IF NOT EXISTS job_estimates (
            cluster VARCHAR(64) NOT NULL,
            job_id INT UNSIGNED NOT NULL,
            node VARCHAR(255) NOT NULL,
            seq INT NOT NULL,
            start_unix_ns BIGINT NOT NULL,
            end_unix_ns BIGINT NOT NULL,
            reason TEXT NOT NULL,
            energy_j DOUBLE NOT NULL,
            bound_j DOUBLE NOT NULL,
            PRIMARY KEY (cluster, job_id, node, seq)
        ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    ],
    &[
        "CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs (end_unix_ns)",
        "CREATE INDEX IF NOT EXISTS jobs_by_user_end ON jobs (`user`, end_unix_ns)",
        "CREATE INDEX IF NOT EXISTS jobs_by_account_end ON jobs (account, end_unix_ns)",
    ],
    &[
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS co2e_g DOUBLE",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS co2e_missing DOUBLE",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cost DOUBLE",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS cost_missing DOUBLE",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS currency VARCHAR(16)",
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS footprint MEDIUMTEXT",
    ],
    &[
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS gpu_idle_j DOUBLE",
        "ALTER TABLE job_gpus ADD COLUMN IF NOT EXISTS efficiency MEDIUMTEXT",
    ],
    &[
        "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS wall_j DOUBLE",
        "ALTER TABLE job_nodes ADD COLUMN IF NOT EXISTS wall MEDIUMTEXT",
    ],
];

/// The schema version this build writes and reads.
pub fn schema_version() -> u32 {
    MIGRATIONS.len() as u32
}

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The database failed.
    #[error("job-records database {at}: {message}")]
    Db {
        /// Where.
        at: String,
        /// What went wrong, with what to do when that is known.
        message: String,
        /// A lock held by another writer: worth retrying.
        busy: bool,
    },
    /// A newer ergon's schema.
    #[error("job-records database {at} has schema version {found}, this ergon reads up to {supported}: use the newer ergon, or point [records] at another database")]
    TooNew {
        /// Where.
        at: String,
        /// Its version.
        found: u32,
        /// This build's.
        supported: u32,
    },
    /// A read-only open found no database.
    #[error("job-records database {at} does not exist (yet): `ergon run` creates it")]
    Missing {
        /// Where.
        at: String,
    },
}

/// One value in or out of either database.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl From<&str> for Cell {
    fn from(v: &str) -> Cell {
        Cell::Text(v.to_owned())
    }
}
impl From<&String> for Cell {
    fn from(v: &String) -> Cell {
        Cell::Text(v.clone())
    }
}
impl From<String> for Cell {
    fn from(v: String) -> Cell {
        Cell::Text(v)
    }
}
impl From<u32> for Cell {
    fn from(v: u32) -> Cell {
        Cell::Int(v.into())
    }
}
impl From<i64> for Cell {
    fn from(v: i64) -> Cell {
        Cell::Int(v)
    }
}
impl From<u64> for Cell {
    fn from(v: u64) -> Cell {
        // Nanoseconds since the epoch fit until 2262.
        Cell::Int(v.min(i64::MAX as u64) as i64)
    }
}
impl From<usize> for Cell {
    fn from(v: usize) -> Cell {
        Cell::Int(v as i64)
    }
}
impl From<f64> for Cell {
    fn from(v: f64) -> Cell {
        Cell::Real(v)
    }
}
impl From<bool> for Cell {
    fn from(v: bool) -> Cell {
        Cell::Int(v.into())
    }
}
impl<T: Into<Cell>> From<Option<T>> for Cell {
    fn from(v: Option<T>) -> Cell {
        v.map_or(Cell::Null, Into::into)
    }
}
impl<T: Clone + Into<Cell>> From<&Option<T>> for Cell {
    fn from(v: &Option<T>) -> Cell {
        v.clone().map_or(Cell::Null, Into::into)
    }
}

/// A row read back, with typed getters that name the column on a mismatch.
struct Row(Vec<Cell>);

type DbResult<T> = Result<T, DbError>;

/// An error of either backend, before it is given its location.
#[derive(Debug)]
struct DbError {
    message: String,
    busy: bool,
}

impl DbError {
    fn new(message: impl Into<String>) -> DbError {
        DbError {
            message: message.into(),
            busy: false,
        }
    }
}

impl Row {
    fn cell(&self, i: usize) -> DbResult<&Cell> {
        self.0
            .get(i)
            .ok_or_else(|| DbError::new(format!("column {i} missing")))
    }
    fn opt_int(&self, i: usize) -> DbResult<Option<i64>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(*v)),
            Cell::Text(t) => t
                .parse()
                .map(Some)
                .map_err(|_| DbError::new(format!("column {i}: {t:?} is not an integer"))),
            Cell::Real(v) => Err(DbError::new(format!("column {i}: {v} is not an integer"))),
        }
    }
    fn int(&self, i: usize) -> DbResult<i64> {
        self.opt_int(i)?
            .ok_or_else(|| DbError::new(format!("column {i} is NULL")))
    }
    fn u32(&self, i: usize) -> DbResult<u32> {
        u32::try_from(self.int(i)?).map_err(|e| DbError::new(format!("column {i}: {e}")))
    }
    fn opt_u32(&self, i: usize) -> DbResult<Option<u32>> {
        self.opt_int(i)?
            .map(|v| u32::try_from(v).map_err(|e| DbError::new(format!("column {i}: {e}"))))
            .transpose()
    }
    fn u64(&self, i: usize) -> DbResult<u64> {
        Ok(self.int(i)?.max(0) as u64)
    }
    fn bool(&self, i: usize) -> DbResult<bool> {
        Ok(self.int(i)? != 0)
    }
    fn opt_real(&self, i: usize) -> DbResult<Option<f64>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Real(v) => Ok(Some(*v)),
            Cell::Int(v) => Ok(Some(*v as f64)),
            Cell::Text(t) => t
                .parse()
                .map(Some)
                .map_err(|_| DbError::new(format!("column {i}: {t:?} is not a number"))),
        }
    }
    fn real(&self, i: usize) -> DbResult<f64> {
        self.opt_real(i)?
            .ok_or_else(|| DbError::new(format!("column {i} is NULL")))
    }
    fn opt_text(&self, i: usize) -> DbResult<Option<String>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(t) => Ok(Some(t.clone())),
            Cell::Int(v) => Ok(Some(v.to_string())),
            Cell::Real(v) => Ok(Some(v.to_string())),
        }
    }
    fn text(&self, i: usize) -> DbResult<String> {
        self.opt_text(i)?
            .ok_or_else(|| DbError::new(format!("column {i} is NULL")))
    }
}

/// What the shared SQL code needs of a connection or transaction of either backend. Queries
/// use `?` placeholders (both understand them) and backquoted names (both accept them).
trait Sql {
    fn dialect(&self) -> Dialect;
    fn exec(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<()>;
    fn query(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<Vec<Row>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Sqlite,
    Mariadb,
}

// ---- SQLite ----

fn sqlite_error(e: rusqlite::Error) -> DbError {
    use rusqlite::ErrorCode as C;
    let code = e.sqlite_error_code();
    let hint = match code {
        Some(C::DiskFull) => "; its filesystem is full: free space there. Nothing is lost: the records stay pending in the state and the next run writes them",
        Some(C::ReadOnly) => "; it is read-only: check the file's owner and mode, and that its filesystem is mounted read-write",
        Some(C::CannotOpen) | Some(C::PermissionDenied) => "; check that the directory exists and that this user may read (and, for `ergon run`, write) it",
        Some(C::NotADatabase) => "; the file is not a SQLite database: move it away (`ergon run` writes again only the records still pending in its state)",
        _ => "",
    };
    DbError {
        message: format!("{e}{hint}"),
        busy: matches!(code, Some(C::DatabaseBusy | C::DatabaseLocked)),
    }
}

fn to_sqlite(c: Cell) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match c {
        Cell::Null => V::Null,
        Cell::Int(v) => V::Integer(v),
        Cell::Real(v) => V::Real(v),
        Cell::Text(v) => V::Text(v),
    }
}

fn sqlite_query(conn: &rusqlite::Connection, sql: &str, params: Vec<Cell>) -> DbResult<Vec<Row>> {
    use rusqlite::types::ValueRef;
    let mut stmt = conn.prepare_cached(sql).map_err(sqlite_error)?;
    let n = stmt.column_count();
    let rows = stmt
        .query_map(
            rusqlite::params_from_iter(params.into_iter().map(to_sqlite)),
            |row| {
                (0..n)
                    .map(|i| {
                        Ok(match row.get_ref(i)? {
                            ValueRef::Null => Cell::Null,
                            ValueRef::Integer(v) => Cell::Int(v),
                            ValueRef::Real(v) => Cell::Real(v),
                            ValueRef::Text(t) | ValueRef::Blob(t) => {
                                Cell::Text(String::from_utf8_lossy(t).into_owned())
                            }
                        })
                    })
                    .collect::<rusqlite::Result<Vec<Cell>>>()
                    .map(Row)
            },
        )
        .map_err(sqlite_error)?
        .collect::<rusqlite::Result<Vec<Row>>>()
        .map_err(sqlite_error)?;
    Ok(rows)
}

impl Sql for rusqlite::Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    fn exec(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<()> {
        let mut stmt = self.prepare_cached(sql).map_err(sqlite_error)?;
        stmt.execute(rusqlite::params_from_iter(
            params.into_iter().map(to_sqlite),
        ))
        .map(drop)
        .map_err(sqlite_error)
    }
    fn query(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<Vec<Row>> {
        sqlite_query(self, sql, params)
    }
}

impl Sql for rusqlite::Transaction<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    fn exec(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<()> {
        let mut stmt = self.prepare_cached(sql).map_err(sqlite_error)?;
        stmt.execute(rusqlite::params_from_iter(
            params.into_iter().map(to_sqlite),
        ))
        .map(drop)
        .map_err(sqlite_error)
    }
    fn query(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<Vec<Row>> {
        sqlite_query(self, sql, params)
    }
}

fn sqlite_version(conn: &rusqlite::Connection) -> DbResult<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map(|v| v as u32)
        .map_err(sqlite_error)
}

fn sqlite_migrate(conn: &mut rusqlite::Connection, target: u32) -> DbResult<()> {
    for version in sqlite_version(conn)? + 1..=target.min(schema_version()) {
        // IMMEDIATE: taken at once for writing, so that two runs never migrate at once.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sqlite_error)?;
        if sqlite_version(&tx)? >= version {
            continue;
        }
        tx.execute_batch(MIGRATIONS[version as usize - 1])
            .map_err(sqlite_error)?;
        tx.execute_batch(&format!("PRAGMA user_version = {version}"))
            .map_err(sqlite_error)?;
        tx.commit().map_err(sqlite_error)?;
    }
    Ok(())
}

// ---- MariaDB ----

fn mariadb_error(e: mysql::Error) -> DbError {
    let hint = match &e {
        mysql::Error::MySqlError(m) if m.code == 1045 || m.code == 1044 || m.code == 1142 => {
            "; check the user, its password in `records.password_file` and its grants (see docs/records.md)"
        }
        mysql::Error::MySqlError(m) if m.code == 1049 => {
            "; create the database first (see docs/records.md)"
        }
        mysql::Error::IoError(_) | mysql::Error::DriverError(_) => {
            "; is the server up and reachable? Nothing is lost: the records stay pending in the state and the next run writes them"
        }
        _ => "",
    };
    // 1205: lock wait timeout; 1213: deadlock.
    let busy = matches!(&e, mysql::Error::MySqlError(m) if m.code == 1205 || m.code == 1213);
    DbError {
        message: format!("{e}{hint}"),
        busy,
    }
}

fn to_mysql(c: Cell) -> mysql::Value {
    match c {
        Cell::Null => mysql::Value::NULL,
        Cell::Int(v) => mysql::Value::Int(v),
        Cell::Real(v) => mysql::Value::Double(v),
        Cell::Text(v) => mysql::Value::Bytes(v.into_bytes()),
    }
}

fn from_mysql(v: mysql::Value) -> Cell {
    use mysql::Value as V;
    match v {
        V::NULL => Cell::Null,
        V::Int(v) => Cell::Int(v),
        V::UInt(v) => Cell::Int(v.min(i64::MAX as u64) as i64),
        V::Float(v) => Cell::Real(v.into()),
        V::Double(v) => Cell::Real(v),
        V::Bytes(b) => Cell::Text(String::from_utf8_lossy(&b).into_owned()),
        other => Cell::Text(other.as_sql(true)),
    }
}

fn mysql_params(params: Vec<Cell>) -> mysql::Params {
    if params.is_empty() {
        mysql::Params::Empty
    } else {
        mysql::Params::Positional(params.into_iter().map(to_mysql).collect())
    }
}

fn mysql_query<Q: mysql::prelude::Queryable>(
    q: &mut Q,
    sql: &str,
    params: Vec<Cell>,
) -> DbResult<Vec<Row>> {
    let rows: Vec<mysql::Row> = q.exec(sql, mysql_params(params)).map_err(mariadb_error)?;
    Ok(rows
        .into_iter()
        .map(|r| Row(r.unwrap().into_iter().map(from_mysql).collect()))
        .collect())
}

impl Sql for mysql::Conn {
    fn dialect(&self) -> Dialect {
        Dialect::Mariadb
    }
    fn exec(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<()> {
        mysql::prelude::Queryable::exec_drop(self, sql, mysql_params(params)).map_err(mariadb_error)
    }
    fn query(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<Vec<Row>> {
        mysql_query(self, sql, params)
    }
}

impl Sql for mysql::Transaction<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Mariadb
    }
    fn exec(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<()> {
        mysql::prelude::Queryable::exec_drop(self, sql, mysql_params(params)).map_err(mariadb_error)
    }
    fn query(&mut self, sql: &str, params: Vec<Cell>) -> DbResult<Vec<Row>> {
        mysql_query(self, sql, params)
    }
}

fn mariadb_connect(url: &str, password_file: Option<&Path>) -> DbResult<mysql::Conn> {
    let opts = mysql::Opts::from_url(url).map_err(|e| {
        DbError::new(format!(
            "{e}: give `records.url` as mysql://USER@HOST:PORT/DATABASE"
        ))
    })?;
    if opts.get_pass().is_some() {
        return Err(DbError::new(
            "the URL holds a password: put it in the file `records.password_file` names (mode 0600) instead, so that it never shows in messages or process lists",
        ));
    }
    let mut builder = mysql::OptsBuilder::from_opts(opts)
        .tcp_connect_timeout(Some(Duration::from_secs(10)))
        .read_timeout(Some(Duration::from_secs(60)))
        .write_timeout(Some(Duration::from_secs(60)));
    if let Some(file) = password_file {
        let text = std::fs::read_to_string(file).map_err(|e| {
            DbError::new(format!("reading the password file {}: {e}", file.display()))
        })?;
        builder = builder.pass(Some(text.trim_end().to_owned()));
    }
    mysql::Conn::new(builder).map_err(mariadb_error)
}

fn mariadb_version(conn: &mut mysql::Conn) -> DbResult<u32> {
    conn.exec(
        "CREATE TABLE IF NOT EXISTS ergon_schema (version INT NOT NULL) ENGINE = InnoDB",
        vec![],
    )?;
    let rows = conn.query("SELECT MAX(version) FROM ergon_schema", vec![])?;
    Ok(rows
        .first()
        .map(|r| r.opt_int(0))
        .transpose()?
        .flatten()
        .unwrap_or(0) as u32)
}

fn mariadb_migrate(conn: &mut mysql::Conn, target: u32) -> DbResult<()> {
    // One migrator at a time, across hosts: a named lock (released with the connection).
    let got = conn.query("SELECT GET_LOCK('ergon_records_migrate', 60)", vec![])?;
    if got.first().map(|r| r.opt_int(0)).transpose()?.flatten() != Some(1) {
        return Err(DbError {
            message:
                "another ergon is migrating the schema (lock ergon_records_migrate held for 60 s)"
                    .into(),
            busy: true,
        });
    }
    let result = (|| {
        let found = mariadb_version(conn)?;
        for version in found + 1..=target.min(schema_version()) {
            for statement in MARIADB_MIGRATIONS[version as usize - 1] {
                conn.exec(statement, vec![])?;
            }
            conn.exec("DELETE FROM ergon_schema", vec![])?;
            conn.exec(
                "INSERT INTO ergon_schema (version) VALUES (?)",
                vec![version.into()],
            )?;
        }
        Ok(())
    })();
    let _ = conn.query("SELECT RELEASE_LOCK('ergon_records_migrate')", vec![]);
    result
}

enum Backend {
    Sqlite(rusqlite::Connection),
    Mariadb(mysql::Conn),
}

/// The job-records database.
pub struct RecordsDb {
    at: Location,
    backend: Mutex<Backend>,
    /// Whether the schema has the CO2e and cost columns (version 3): a database an older
    /// ergon wrote is read (read-only) without them until `ergon run` migrates it.
    footprint: bool,
    /// Whether the schema has the GPU efficiency columns (version 4).
    efficiency: bool,
    /// Whether the schema has the wall-energy columns (version 5).
    wall: bool,
}

/// The first schema version with the CO2e and cost columns.
const FOOTPRINT_VERSION: u32 = 3;

/// The first schema version with the GPU efficiency columns.
const EFFICIENCY_VERSION: u32 = 4;

/// The first schema version with the wall-energy columns.
const WALL_VERSION: u32 = 5;

impl std::fmt::Debug for RecordsDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordsDb").field("at", &self.at).finish()
    }
}

impl RecordsDb {
    /// Open (creating it if needed) an SQLite database for writing, and bring its schema to
    /// this build's version.
    pub fn open(path: &Path) -> Result<RecordsDb, RecordsError> {
        Self::open_location(&Location::Sqlite(path.to_path_buf()), schema_version())
    }

    /// [`RecordsDb::open`], migrating only up to `version` (for the migration test).
    pub fn open_at(path: &Path, version: u32) -> Result<RecordsDb, RecordsError> {
        Self::open_location(&Location::Sqlite(path.to_path_buf()), version)
    }

    /// Open either backend for writing, migrating its schema up to `version`.
    pub fn open_location(at: &Location, version: u32) -> Result<RecordsDb, RecordsError> {
        let wrap = |e: DbError| RecordsError::Db {
            at: at.to_string(),
            message: e.message,
            busy: e.busy,
        };
        let schema;
        let backend = match at {
            Location::Sqlite(path) => {
                let mut conn = rusqlite::Connection::open(path)
                    .map_err(sqlite_error)
                    .map_err(wrap)?;
                conn.busy_timeout(Duration::from_secs(30))
                    .map_err(sqlite_error)
                    .map_err(wrap)?;
                // The rollback journal (not WAL), so that readers need no write access to the
                // directory (users run `ergon report`); FULL: a commit is on disk when it
                // returns.
                conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL;")
                    .map_err(sqlite_error)
                    .map_err(wrap)?;
                let found = sqlite_version(&conn).map_err(wrap)?;
                check_version(at, found)?;
                sqlite_migrate(&mut conn, version).map_err(wrap)?;
                schema = found.max(version);
                Backend::Sqlite(conn)
            }
            Location::Mariadb { url, password_file } => {
                let mut conn = mariadb_connect(url, password_file.as_deref()).map_err(wrap)?;
                let found = mariadb_version(&mut conn).map_err(wrap)?;
                check_version(at, found)?;
                mariadb_migrate(&mut conn, version).map_err(wrap)?;
                schema = found.max(version);
                Backend::Mariadb(conn)
            }
        };
        Ok(RecordsDb {
            at: at.clone(),
            backend: Mutex::new(backend),
            footprint: schema >= FOOTPRINT_VERSION,
            efficiency: schema >= EFFICIENCY_VERSION,
            wall: schema >= WALL_VERSION,
        })
    }

    /// Open an existing database for reading only (`ergon report`, `ergon jobs`).
    pub fn open_read_only(path: &Path) -> Result<RecordsDb, RecordsError> {
        Self::open_location_read_only(&Location::Sqlite(path.to_path_buf()))
    }

    /// [`RecordsDb::open_read_only`] for either backend. Nothing is created or migrated.
    pub fn open_location_read_only(at: &Location) -> Result<RecordsDb, RecordsError> {
        let wrap = |e: DbError| RecordsError::Db {
            at: at.to_string(),
            message: e.message,
            busy: e.busy,
        };
        let schema;
        let backend = match at {
            Location::Sqlite(path) => {
                if !path.exists() {
                    return Err(RecordsError::Missing { at: at.to_string() });
                }
                let conn = rusqlite::Connection::open_with_flags(
                    path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(sqlite_error)
                .map_err(wrap)?;
                conn.busy_timeout(Duration::from_secs(10))
                    .map_err(sqlite_error)
                    .map_err(wrap)?;
                let found = sqlite_version(&conn).map_err(wrap)?;
                check_version(at, found)?;
                if found == 0 {
                    return Err(RecordsError::Missing { at: at.to_string() });
                }
                schema = found;
                Backend::Sqlite(conn)
            }
            Location::Mariadb { url, password_file } => {
                let mut conn = mariadb_connect(url, password_file.as_deref()).map_err(wrap)?;
                let rows = conn
                    .query(
                        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'ergon_schema'",
                        vec![],
                    )
                    .map_err(wrap)?;
                if rows.first().map(|r| r.int(0)).transpose().map_err(wrap)? != Some(1) {
                    return Err(RecordsError::Missing { at: at.to_string() });
                }
                let found = mariadb_version(&mut conn).map_err(wrap)?;
                check_version(at, found)?;
                schema = found;
                Backend::Mariadb(conn)
            }
        };
        Ok(RecordsDb {
            at: at.clone(),
            backend: Mutex::new(backend),
            footprint: schema >= FOOTPRINT_VERSION,
            efficiency: schema >= EFFICIENCY_VERSION,
            wall: schema >= WALL_VERSION,
        })
    }

    /// Where it is.
    pub fn location(&self) -> &Location {
        &self.at
    }

    fn wrap(&self, e: DbError) -> RecordsError {
        RecordsError::Db {
            at: self.at.to_string(),
            message: e.message,
            busy: e.busy,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut dyn Sql) -> DbResult<T>) -> Result<T, RecordsError> {
        // A panic while holding the lock leaves a connection its database keeps consistent.
        let mut backend = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let result = match &mut *backend {
            Backend::Sqlite(conn) => f(conn),
            Backend::Mariadb(conn) => f(conn),
        };
        result.map_err(|e| self.wrap(e))
    }

    /// The schema version of the open database.
    pub fn version(&self) -> Result<u32, RecordsError> {
        let mut backend = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let v = match &mut *backend {
            Backend::Sqlite(conn) => sqlite_version(conn),
            Backend::Mariadb(conn) => mariadb_version(conn),
        };
        v.map_err(|e| self.wrap(e))
    }

    /// Write `records` in one transaction (see the module docs for the upsert rules). When it
    /// returns `Ok`, they are on disk.
    pub fn upsert(&self, records: &[&JobRecordFull]) -> Result<(), RecordsError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut backend = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let result = match &mut *backend {
            Backend::Sqlite(conn) => (|| {
                let mut tx = conn.transaction().map_err(sqlite_error)?;
                for r in records {
                    upsert_one(&mut tx, r, now, self.footprint, self.efficiency, self.wall)?;
                }
                tx.commit().map_err(sqlite_error)
            })(),
            Backend::Mariadb(conn) => (|| {
                let mut tx = conn
                    .start_transaction(mysql::TxOpts::default())
                    .map_err(mariadb_error)?;
                for r in records {
                    upsert_one(&mut tx, r, now, self.footprint, self.efficiency, self.wall)?;
                }
                tx.commit().map_err(mariadb_error)
            })(),
        };
        result.map_err(|e| self.wrap(e))
    }

    /// The records of job `job_id` (one per cluster that has it; only `cluster`'s if given).
    pub fn get(
        &self,
        cluster: Option<&str>,
        job_id: u32,
    ) -> Result<Vec<JobRecordFull>, RecordsError> {
        self.with(|sql| {
            read_jobs(
                sql,
                cluster,
                job_id,
                self.footprint,
                self.efficiency,
                self.wall,
            )
        })
    }

    /// The jobs matching `filter`, newest end first.
    pub fn list(&self, filter: &JobFilter) -> Result<Vec<JobRow>, RecordsError> {
        self.with(|sql| list_jobs(sql, filter))
    }

    /// The jobs matching `filter` (its `limit` aside) summed by `by`, most energy first.
    pub fn summary(
        &self,
        by: SummaryBy,
        filter: &JobFilter,
    ) -> Result<Vec<SummaryRow>, RecordsError> {
        self.with(|sql| summarize(sql, by, filter, self.footprint, self.efficiency))
    }

    /// Jobs in the database.
    pub fn count(&self) -> Result<u64, RecordsError> {
        self.with(|sql| {
            let rows = sql.query("SELECT COUNT(*) FROM jobs", vec![])?;
            rows.first().map_or(Ok(0), |r| r.u64(0))
        })
    }

    /// Rows in `table` (one of the four), for tests and benchmarks.
    pub fn rows(&self, table: &str) -> Result<u64, RecordsError> {
        let table = match table {
            "jobs" | "job_nodes" | "job_gpus" | "job_estimates" => table,
            _ => {
                return Err(self.wrap(DbError::new(format!("no table {table:?}"))));
            }
        };
        self.with(|sql| {
            let rows = sql.query(&format!("SELECT COUNT(*) FROM {table}"), vec![])?;
            rows.first().map_or(Ok(0), |r| r.u64(0))
        })
    }

    /// Run `statement` (for tests: to set up what an older or newer ergon would have left).
    #[doc(hidden)]
    pub fn execute_raw(&self, statement: &str) -> Result<(), RecordsError> {
        self.with(|sql| sql.exec(statement, vec![]))
    }
}

fn check_version(at: &Location, found: u32) -> Result<(), RecordsError> {
    if found > schema_version() {
        return Err(RecordsError::TooNew {
            at: at.to_string(),
            found,
            supported: schema_version(),
        });
    }
    Ok(())
}

/// `INSERT … ` that replaces the non-key columns on a key conflict, in `dialect`.
fn upsert_sql(dialect: Dialect, table: &str, key: &[&str], columns: &[&str]) -> String {
    let all: Vec<&str> = key.iter().chain(columns).copied().collect();
    let names = all
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let marks = vec!["?"; all.len()].join(", ");
    let update = |f: &dyn Fn(&str) -> String| {
        columns
            .iter()
            .map(|c| format!("`{c}` = {}", f(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match dialect {
        Dialect::Sqlite => format!(
            "INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT ({}) DO UPDATE SET {}",
            key.join(", "),
            update(&|c| format!("excluded.`{c}`"))
        ),
        Dialect::Mariadb => format!(
            "INSERT INTO {table} ({names}) VALUES ({marks}) ON DUPLICATE KEY UPDATE {}",
            update(&|c| format!("VALUES(`{c}`)"))
        ),
    }
}

const JOB_COLUMNS: &[&str] = &[
    "idempotency_key",
    "job_hash",
    "array_job_id",
    "array_task_id",
    "user",
    "uid",
    "account",
    "partition",
    "start_unix_ns",
    "end_unix_ns",
    "duration_s",
    "energy_j",
    "gpu_j",
    "cpu_j",
    "dram_j",
    "avg_w",
    "peak_w",
    "coverage_min",
    "coverage_weighted",
    "estimated",
    "has_coverage_components",
    "coverage_gpu",
    "coverage_cpu",
    "coverage_dram",
    "estimate_bound_j",
    "sluid",
    "job_nodes",
    "nodes_missing",
    "gpus_unknown_nodes",
    "nodes",
    "gpus",
    "written_unix",
    "co2e_g",
    "co2e_missing",
    "cost",
    "cost_missing",
    "currency",
    "footprint",
];

/// The last columns of [`JOB_COLUMNS`], those of schema version 3.
const FOOTPRINT_COLUMNS: usize = 6;

const NODE_COLUMNS: &[&str] = &[
    "energy_j",
    "gpu_j",
    "cpu_j",
    "dram_j",
    "avg_w",
    "peak_w",
    "coverage",
    "manifest_hash",
    "has_components",
    "coverage_gpu",
    "coverage_cpu",
    "coverage_dram",
    "gpus_unknown",
];

const GPU_COLUMNS: &[&str] = &["energy_j", "avg_w", "peak_w", "method", "mig"];

const ESTIMATE_COLUMNS: &[&str] = &[
    "start_unix_ns",
    "end_unix_ns",
    "reason",
    "energy_j",
    "bound_j",
];

fn upsert_one(
    sql: &mut dyn Sql,
    r: &JobRecordFull,
    now: i64,
    footprint: bool,
    efficiency: bool,
    wall: bool,
) -> DbResult<()> {
    let d = sql.dialect();
    let lock = match d {
        Dialect::Sqlite => "",
        // The row is locked until the commit, so that two writers of one job do not both
        // decide on a stale count.
        Dialect::Mariadb => " FOR UPDATE",
    };
    let existing = sql.query(
        &format!("SELECT nodes FROM jobs WHERE cluster = ? AND job_id = ?{lock}"),
        vec![r.cluster.as_str().into(), r.job_id.into()],
    )?;
    let existing = existing.first().map(|row| row.int(0)).transpose()?;
    if existing.is_none_or(|n| r.nodes.len() as i64 >= n) {
        let cc = r.coverage_components;
        let carbon = r.footprint.as_ref().and_then(|f| f.carbon.as_ref());
        let cost = r.footprint.as_ref().and_then(|f| f.cost.as_ref());
        // A database not yet at the footprint's version (only the migration test writes one)
        // gets the columns it has.
        let columns = if footprint {
            JOB_COLUMNS
        } else {
            &JOB_COLUMNS[..JOB_COLUMNS.len() - FOOTPRINT_COLUMNS]
        };
        let mut values: Vec<Cell> = vec![
            r.cluster.as_str().into(),
            r.job_id.into(),
            r.idempotency_key.as_str().into(),
            r.job_hash.as_str().into(),
            r.array_job_id.into(),
            r.array_task_id.into(),
            r.user.as_str().into(),
            r.uid.into(),
            (&r.account).into(),
            (&r.partition).into(),
            r.start_unix_ns.into(),
            r.end_unix_ns.into(),
            r.duration_s.into(),
            r.energy_j.into(),
            r.gpu_j.into(),
            r.cpu_j.into(),
            r.dram_j.into(),
            r.avg_w.into(),
            r.peak_w.into(),
            r.coverage_min.into(),
            r.coverage_weighted.into(),
            r.estimated.into(),
            cc.is_some().into(),
            cc.and_then(|c| c.gpu).into(),
            cc.and_then(|c| c.cpu).into(),
            cc.and_then(|c| c.dram).into(),
            r.estimate_bound_j.into(),
            (&r.sluid).into(),
            (&r.job_nodes.as_ref().map(to_json)).into(),
            (&(!r.nodes_missing.is_empty()).then(|| to_json(&r.nodes_missing))).into(),
            r.gpus_unknown.len().into(),
            r.nodes.len().into(),
            r.gpus.len().into(),
            now.into(),
            carbon.map(|c| c.total_g).into(),
            carbon.map(|c| c.missing_energy_fraction).into(),
            cost.map(|c| c.amount).into(),
            cost.map(|c| c.missing_energy_fraction).into(),
            cost.and_then(|c| c.currency.clone()).into(),
            r.footprint.as_ref().map(to_json).into(),
        ];
        values.truncate(2 + columns.len());
        sql.exec(
            &upsert_sql(d, "jobs", &["cluster", "job_id"], columns),
            values,
        )?;
        if efficiency {
            sql.exec(
                "UPDATE jobs SET gpu_idle_j = ? WHERE cluster = ? AND job_id = ?",
                vec![
                    r.gpu_idle_j().into(),
                    r.cluster.as_str().into(),
                    r.job_id.into(),
                ],
            )?;
        }
        if wall {
            sql.exec(
                "UPDATE jobs SET wall_j = ? WHERE cluster = ? AND job_id = ?",
                vec![
                    r.wall_j().into(),
                    r.cluster.as_str().into(),
                    r.job_id.into(),
                ],
            )?;
        }
    }
    for n in &r.nodes {
        let c = n.components;
        sql.exec(
            &upsert_sql(d, "job_nodes", &["cluster", "job_id", "node"], NODE_COLUMNS),
            vec![
                r.cluster.as_str().into(),
                r.job_id.into(),
                n.node.as_str().into(),
                n.energy_j.into(),
                n.gpu_j.into(),
                n.cpu_j.into(),
                n.dram_j.into(),
                n.avg_w.into(),
                n.peak_w.into(),
                n.coverage.into(),
                n.manifest_hash.as_str().into(),
                c.is_some().into(),
                c.and_then(|c| c.gpu).into(),
                c.and_then(|c| c.cpu).into(),
                c.and_then(|c| c.dram).into(),
                (&n.gpus_unknown).into(),
            ],
        )?;
        if wall {
            sql.exec(
                "UPDATE job_nodes SET wall = ? WHERE cluster = ? AND job_id = ? AND node = ?",
                vec![
                    n.wall.as_ref().map(to_json).into(),
                    r.cluster.as_str().into(),
                    r.job_id.into(),
                    n.node.as_str().into(),
                ],
            )?;
        }
        // The node's GPUs and gaps: exactly what its manifest (the same in every record of the
        // job) says.
        for table in ["job_gpus", "job_estimates"] {
            sql.exec(
                &format!("DELETE FROM {table} WHERE cluster = ? AND job_id = ? AND node = ?"),
                vec![
                    r.cluster.as_str().into(),
                    r.job_id.into(),
                    n.node.as_str().into(),
                ],
            )?;
        }
    }
    for g in &r.gpus {
        sql.exec(
            &upsert_sql(
                d,
                "job_gpus",
                &["cluster", "job_id", "node", "gpu_index", "uuid"],
                GPU_COLUMNS,
            ),
            vec![
                r.cluster.as_str().into(),
                r.job_id.into(),
                g.node.as_str().into(),
                g.index.into(),
                g.uuid.as_str().into(),
                g.energy_j.into(),
                g.avg_w.into(),
                g.peak_w.into(),
                to_json(&g.method).into(),
                g.mig.as_ref().map(to_json).into(),
            ],
        )?;
        if let (true, Some(e)) = (efficiency, &g.efficiency) {
            sql.exec(
                "UPDATE job_gpus SET efficiency = ?
                 WHERE cluster = ? AND job_id = ? AND node = ? AND gpu_index = ? AND uuid = ?",
                vec![
                    to_json(e).into(),
                    r.cluster.as_str().into(),
                    r.job_id.into(),
                    g.node.as_str().into(),
                    g.index.into(),
                    g.uuid.as_str().into(),
                ],
            )?;
        }
    }
    let mut seq: std::collections::BTreeMap<&str, i64> = Default::default();
    for e in &r.estimates {
        let n = seq.entry(e.node.as_str()).or_default();
        sql.exec(
            &upsert_sql(
                d,
                "job_estimates",
                &["cluster", "job_id", "node", "seq"],
                ESTIMATE_COLUMNS,
            ),
            vec![
                r.cluster.as_str().into(),
                r.job_id.into(),
                e.node.as_str().into(),
                (*n).into(),
                e.start_unix_ns.into(),
                e.end_unix_ns.into(),
                e.reason.as_str().into(),
                e.energy_j.into(),
                e.bound_j.into(),
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

fn from_json<T: serde::de::DeserializeOwned>(col: usize, text: &str) -> DbResult<T> {
    serde_json::from_str(text).map_err(|e| DbError::new(format!("column {col}: {e}")))
}

fn coverage(row: &Row, at: usize) -> DbResult<Option<ComponentCoverage>> {
    Ok(row.bool(at)?.then_some(ComponentCoverage {
        gpu: row.opt_real(at + 1)?,
        cpu: row.opt_real(at + 2)?,
        dram: row.opt_real(at + 3)?,
    }))
}

fn read_jobs(
    sql: &mut dyn Sql,
    cluster: Option<&str>,
    job_id: u32,
    footprint: bool,
    efficiency: bool,
    wall: bool,
) -> DbResult<Vec<JobRecordFull>> {
    let footprint = if footprint { "footprint" } else { "NULL" };
    let rows = sql.query(
        &format!("SELECT cluster, job_id, idempotency_key, job_hash, array_job_id, array_task_id, `user`,
            uid, account, `partition`, start_unix_ns, end_unix_ns, duration_s, energy_j, gpu_j,
            cpu_j, dram_j, avg_w, peak_w, coverage_min, coverage_weighted, estimated,
            has_coverage_components, coverage_gpu, coverage_cpu, coverage_dram,
            estimate_bound_j, sluid, job_nodes, nodes_missing, {footprint}
         FROM jobs WHERE job_id = ? AND (? IS NULL OR cluster = ?) ORDER BY cluster"),
        vec![job_id.into(), cluster.into(), cluster.into()],
    )?;
    let mut jobs = Vec::new();
    for row in rows {
        let mut job = JobRecordFull {
            cluster: row.text(0)?,
            job_id: row.u32(1)?,
            idempotency_key: row.text(2)?,
            job_hash: row.text(3)?,
            array_job_id: row.opt_u32(4)?,
            array_task_id: row.opt_u32(5)?,
            user: row.text(6)?,
            uid: row.u32(7)?,
            account: row.opt_text(8)?,
            partition: row.opt_text(9)?,
            start_unix_ns: row.u64(10)?,
            end_unix_ns: row.u64(11)?,
            duration_s: row.real(12)?,
            energy_j: row.real(13)?,
            gpu_j: row.opt_real(14)?,
            cpu_j: row.opt_real(15)?,
            dram_j: row.opt_real(16)?,
            avg_w: row.real(17)?,
            peak_w: row.real(18)?,
            coverage_min: row.real(19)?,
            coverage_weighted: row.real(20)?,
            estimated: row.bool(21)?,
            coverage_components: coverage(&row, 22)?,
            estimate_bound_j: row.opt_real(26)?,
            sluid: row.opt_text(27)?,
            job_nodes: row.opt_text(28)?.map(|j| from_json(28, &j)).transpose()?,
            nodes_missing: row
                .opt_text(29)?
                .map(|j| from_json(29, &j))
                .transpose()?
                .unwrap_or_default(),
            nodes: Vec::new(),
            gpus: Vec::new(),
            gpus_unknown: Vec::new(),
            estimates: Vec::new(),
            footprint: row.opt_text(30)?.map(|j| from_json(30, &j)).transpose()?,
        };
        let key = || vec![job.cluster.as_str().into(), job.job_id.into()];
        job.nodes = sql
            .query(
                &format!(
                    "SELECT node, energy_j, gpu_j, cpu_j, dram_j, avg_w, peak_w, coverage,
                        manifest_hash, has_components, coverage_gpu, coverage_cpu, coverage_dram,
                        gpus_unknown, {}
                     FROM job_nodes WHERE cluster = ? AND job_id = ? ORDER BY node",
                    if wall { "wall" } else { "NULL" }
                ),
                key(),
            )?
            .into_iter()
            .map(|row| {
                Ok(NodeSummary {
                    node: row.text(0)?,
                    energy_j: row.real(1)?,
                    gpu_j: row.opt_real(2)?,
                    cpu_j: row.opt_real(3)?,
                    dram_j: row.opt_real(4)?,
                    avg_w: row.real(5)?,
                    peak_w: row.real(6)?,
                    coverage: row.real(7)?,
                    manifest_hash: row.text(8)?,
                    components: coverage(&row, 9)?,
                    gpus_unknown: row.opt_text(13)?,
                    wall: row.opt_text(14)?.map(|w| from_json(14, &w)).transpose()?,
                })
            })
            .collect::<DbResult<_>>()?;
        job.gpus = sql
            .query(
                &format!(
                    "SELECT node, uuid, gpu_index, energy_j, avg_w, peak_w, method, mig, {}
                     FROM job_gpus WHERE cluster = ? AND job_id = ? ORDER BY node, gpu_index, uuid",
                    if efficiency { "efficiency" } else { "NULL" }
                ),
                key(),
            )?
            .into_iter()
            .map(|row| {
                Ok(GpuSummary {
                    node: row.text(0)?,
                    uuid: row.text(1)?,
                    index: row.u32(2)?,
                    energy_j: row.opt_real(3)?,
                    avg_w: row.opt_real(4)?,
                    peak_w: row.opt_real(5)?,
                    method: from_json(6, &row.text(6)?)?,
                    mig: row.opt_text(7)?.map(|m| from_json(7, &m)).transpose()?,
                    efficiency: row.opt_text(8)?.map(|e| from_json(8, &e)).transpose()?,
                })
            })
            .collect::<DbResult<_>>()?;
        job.estimates = sql
            .query(
                "SELECT node, start_unix_ns, end_unix_ns, reason, energy_j, bound_j
                 FROM job_estimates WHERE cluster = ? AND job_id = ? ORDER BY node, seq",
                key(),
            )?
            .into_iter()
            .map(|row| {
                Ok(EstimatedGap {
                    node: row.text(0)?,
                    start_unix_ns: row.u64(1)?,
                    end_unix_ns: row.u64(2)?,
                    reason: row.text(3)?,
                    energy_j: row.real(4)?,
                    bound_j: row.real(5)?,
                })
            })
            .collect::<DbResult<_>>()?;
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
        jobs.push(job);
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
    /// Only the jobs of this uid (what a user who is not root sees of the summaries).
    pub uid: Option<u32>,
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

fn list_jobs(sql: &mut dyn Sql, f: &JobFilter) -> DbResult<Vec<JobRow>> {
    let since = f.since_unix_ns.map(|t| t.min(i64::MAX as u64) as i64);
    let until = f.until_unix_ns.map(|t| t.min(i64::MAX as u64) as i64);
    let rows = sql.query(
        "SELECT cluster, job_id, `user`, account, `partition`, start_unix_ns, end_unix_ns,
            duration_s, energy_j, gpu_j, cpu_j, dram_j, nodes, gpus, coverage_min, estimated
         FROM jobs
         WHERE (? IS NULL OR cluster = ?) AND (? IS NULL OR `user` = ?)
            AND (? IS NULL OR uid = ?)
            AND (? IS NULL OR account = ?) AND (? IS NULL OR end_unix_ns >= ?)
            AND (? IS NULL OR end_unix_ns < ?)
         ORDER BY end_unix_ns DESC, cluster, job_id DESC
         LIMIT ?",
        vec![
            (&f.cluster).into(),
            (&f.cluster).into(),
            (&f.user).into(),
            (&f.user).into(),
            f.uid.into(),
            f.uid.into(),
            (&f.account).into(),
            (&f.account).into(),
            since.into(),
            since.into(),
            until.into(),
            until.into(),
            f.limit.unwrap_or(1 << 62).min(1 << 62).into(),
        ],
    )?;
    rows.into_iter()
        .map(|row| {
            Ok(JobRow {
                cluster: row.text(0)?,
                job_id: row.u32(1)?,
                user: row.text(2)?,
                account: row.opt_text(3)?,
                partition: row.opt_text(4)?,
                start_unix_ns: row.u64(5)?,
                end_unix_ns: row.u64(6)?,
                duration_s: row.real(7)?,
                energy_j: row.real(8)?,
                gpu_j: row.opt_real(9)?,
                cpu_j: row.opt_real(10)?,
                dram_j: row.opt_real(11)?,
                nodes: row.u32(12)?,
                gpus: row.u32(13)?,
                coverage_min: row.real(14)?,
                estimated: row.bool(15)?,
            })
        })
        .collect()
}

/// What `ergon summary` groups the jobs by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SummaryBy {
    /// The job's owner.
    User,
    /// The job's Slurm account.
    Account,
    /// The job's partition.
    Partition,
    /// Each node a job ran on (a job on several nodes counts on each, with that node's part).
    Node,
}

/// One group of `ergon summary`: the jobs of one user (account, partition, node) of one cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    /// Cluster.
    pub cluster: String,
    /// The group: user, account, partition or node name (`None`: jobs without an account or
    /// partition).
    pub key: Option<String>,
    /// Jobs (by node: the jobs that ran on the node).
    pub jobs: u64,
    /// Joules, all components.
    pub energy_j: f64,
    /// GPU joules (of the jobs whose GPU part was measured).
    pub gpu_j: f64,
    /// CPU package joules.
    pub cpu_j: f64,
    /// DRAM joules.
    pub dram_j: f64,
    /// GPU-hours allocated: each job's GPUs × its duration.
    pub gpu_hours: f64,
    /// Node-hours: each job's nodes × its duration (by node: the hours of jobs on the node).
    pub node_hours: f64,
    /// The lowest coverage of any of the group's jobs (by node: of that node's parts).
    pub coverage_min: f64,
    /// Jobs with an estimated part.
    pub estimated_jobs: u64,
    /// Jobs with GPUs whose energy is unknown (their GPU part is not in `gpu_j`).
    pub gpus_unknown_jobs: u64,
    /// CO2e, grams, of the jobs that have it (by node: each job's CO2e split by the nodes'
    /// energy); `None` when none has.
    pub co2e_g: Option<f64>,
    /// Energy cost of the jobs that have it (by node: split by energy); `None` when none has.
    pub cost: Option<f64>,
    /// The cost's currency (`"mixed"` when the jobs' currencies differ).
    pub currency: Option<String>,
    /// Jobs whose CO2e or cost misses a part (a factor unknown for part of the job).
    pub footprint_partial_jobs: u64,
    /// Energy of allocated GPUs that sat idle (ergond's idle rule), of the jobs whose GPUs'
    /// utilisation was sampled (by node: each job's split by the nodes' GPU energy); `None`
    /// when none was.
    #[serde(default)]
    pub gpu_idle_j: Option<f64>,
}

fn summarize(
    sql: &mut dyn Sql,
    by: SummaryBy,
    f: &JobFilter,
    footprint: bool,
    efficiency: bool,
) -> DbResult<Vec<SummaryRow>> {
    let gidle = if efficiency { "j.gpu_idle_j" } else { "NULL" };
    // A database from before the CO2e and cost columns has none to sum.
    let j = |col: &str| {
        if footprint {
            format!("j.{col}")
        } else {
            "NULL".to_owned()
        }
    };
    let (co2e, co2m, cost, costm, cur) = (
        j("co2e_g"),
        j("co2e_missing"),
        j("cost"),
        j("cost_missing"),
        j("currency"),
    );
    // Only the filters given, so that the database can use its indexes (a `? IS NULL OR …`
    // clause hides them: a month of a year's jobs would be a full scan).
    let mut clauses: Vec<&str> = Vec::new();
    let mut params: Vec<Cell> = Vec::new();
    if let Some(c) = &f.cluster {
        clauses.push("j.cluster = ?");
        params.push(c.as_str().into());
    }
    if let Some(u) = &f.user {
        clauses.push("j.`user` = ?");
        params.push(u.as_str().into());
    }
    if let Some(uid) = f.uid {
        clauses.push("j.uid = ?");
        params.push(uid.into());
    }
    if let Some(a) = &f.account {
        clauses.push("j.account = ?");
        params.push(a.as_str().into());
    }
    if let Some(t) = f.since_unix_ns {
        clauses.push("j.end_unix_ns >= ?");
        params.push((t.min(i64::MAX as u64) as i64).into());
    }
    if let Some(t) = f.until_unix_ns {
        clauses.push("j.end_unix_ns < ?");
        params.push((t.min(i64::MAX as u64) as i64).into());
    }
    let filters = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let query = match by {
        SummaryBy::User | SummaryBy::Account | SummaryBy::Partition => {
            let col = match by {
                SummaryBy::User => "j.`user`",
                SummaryBy::Account => "j.account",
                _ => "j.`partition`",
            };
            format!(
                "SELECT j.cluster, {col}, COUNT(*), SUM(j.energy_j), SUM(j.gpu_j), SUM(j.cpu_j),
                    SUM(j.dram_j), SUM(j.gpus * j.duration_s) / 3600.0,
                    SUM(j.nodes * j.duration_s) / 3600.0, MIN(j.coverage_min),
                    SUM(j.estimated), SUM(CASE WHEN j.gpus_unknown_nodes > 0 THEN 1 ELSE 0 END),
                    SUM({co2e}), SUM({cost}), MIN({cur}), MAX({cur}),
                    SUM(CASE WHEN {co2m} > 0 OR {costm} > 0 THEN 1 ELSE 0 END), SUM({gidle})
                 FROM jobs j
                 {filters}
                 GROUP BY j.cluster, {col}
                 ORDER BY SUM(j.energy_j) DESC, j.cluster, {col}"
            )
        }
        SummaryBy::Node => format!(
            "SELECT j.cluster, n.node, COUNT(*), SUM(n.energy_j), SUM(n.gpu_j), SUM(n.cpu_j),
                SUM(n.dram_j), SUM(COALESCE(g.gpus, 0) * j.duration_s) / 3600.0,
                SUM(j.duration_s) / 3600.0, MIN(n.coverage), SUM(j.estimated),
                SUM(CASE WHEN n.gpus_unknown IS NOT NULL THEN 1 ELSE 0 END),
                SUM({co2e} * CASE WHEN j.energy_j > 0 THEN n.energy_j / j.energy_j
                    ELSE 1.0 / j.nodes END),
                SUM({cost} * CASE WHEN j.energy_j > 0 THEN n.energy_j / j.energy_j
                    ELSE 1.0 / j.nodes END),
                MIN({cur}), MAX({cur}),
                SUM(CASE WHEN {co2m} > 0 OR {costm} > 0 THEN 1 ELSE 0 END),
                SUM({gidle} * CASE WHEN j.gpu_j > 0 THEN COALESCE(n.gpu_j, 0) / j.gpu_j
                    ELSE 1.0 / j.nodes END)
             FROM job_nodes n
             JOIN jobs j ON j.cluster = n.cluster AND j.job_id = n.job_id
             LEFT JOIN (SELECT cluster, job_id, node, COUNT(*) AS gpus FROM job_gpus
                        GROUP BY cluster, job_id, node) g
                ON g.cluster = n.cluster AND g.job_id = n.job_id AND g.node = n.node
             {filters}
             GROUP BY j.cluster, n.node
             ORDER BY SUM(n.energy_j) DESC, j.cluster, n.node"
        ),
    };
    let rows = sql.query(&query, params)?;
    rows.into_iter()
        .map(|row| {
            Ok(SummaryRow {
                cluster: row.text(0)?,
                key: row.opt_text(1)?,
                jobs: row.u64(2)?,
                energy_j: row.real(3)?,
                gpu_j: row.opt_real(4)?.unwrap_or(0.0),
                cpu_j: row.opt_real(5)?.unwrap_or(0.0),
                dram_j: row.opt_real(6)?.unwrap_or(0.0),
                gpu_hours: row.opt_real(7)?.unwrap_or(0.0),
                node_hours: row.opt_real(8)?.unwrap_or(0.0),
                coverage_min: row.real(9)?,
                estimated_jobs: row.opt_real(10)?.unwrap_or(0.0) as u64,
                gpus_unknown_jobs: row.opt_real(11)?.unwrap_or(0.0) as u64,
                co2e_g: row.opt_real(12)?,
                cost: row.opt_real(13)?,
                currency: match (row.opt_text(14)?, row.opt_text(15)?) {
                    (Some(a), Some(b)) if a != b => Some("mixed".into()),
                    (a, _) => a,
                },
                footprint_partial_jobs: row.opt_real(16)?.unwrap_or(0.0) as u64,
                gpu_idle_j: row.opt_real(17)?,
            })
        })
        .collect()
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
    /// Open (create, migrate) the database. A database that cannot be opened is logged, and
    /// its records stay pending for the next run.
    pub fn open(at: &Location, batch_size: usize) -> RecordsSink {
        let db = RecordsDb::open_location(at, schema_version()).map_err(|e| {
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
                if matches!(e, RecordsError::Db { busy: true, .. }) {
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
        db.rows(table).unwrap() as i64
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
        let indexes = |_: &RecordsDb| -> Vec<String> {
            let conn = rusqlite::Connection::open(&path).unwrap();
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
            .execute_raw(&format!("PRAGMA user_version = {}", schema_version() + 1))
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
    fn the_summary_sums_each_group_as_the_records_do() {
        let dir = tempfile::tempdir().unwrap();
        let db = RecordsDb::open(&dir.path().join("r.sqlite")).unwrap();
        let mk = |job,
                  node: &str,
                  user: &str,
                  uid,
                  account: &str,
                  partition: &str,
                  gpus: &[f64],
                  end_s: u64| {
            let mut b = ManifestBuilder::new("c", job, node)
                .user(user, uid)
                .account(account)
                .partition(partition)
                .ended(end_s * 1_000_000_000, 360)
                .socket(10.0, Some(2.0));
            for g in gpus {
                b = b.gpu(Some(*g));
            }
            b.build()
        };
        let records = [
            combine(&[mk(
                1,
                "n1",
                "alice",
                1000,
                "phys",
                "gpu",
                &[100.0, 120.0],
                1_000,
            )]),
            // On two nodes: by node each has its part, by user the job counts once.
            combine(&[
                mk(2, "n1", "alice", 1000, "chem", "gpu", &[50.0], 2_000),
                mk(2, "n2", "alice", 1000, "chem", "gpu", &[70.0], 2_000),
            ]),
            combine(&[mk(3, "n2", "bob", 1001, "phys", "cpu", &[], 3_000)]),
        ];
        db.upsert(&records.iter().collect::<Vec<_>>()).unwrap();
        let by = |by, f: JobFilter| db.summary(by, &f).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;

        let users = by(SummaryBy::User, JobFilter::default());
        let keys: Vec<_> = users.iter().map(|r| r.key.clone().unwrap()).collect();
        assert_eq!(keys, ["alice", "bob"], "most energy first");
        let alice = &users[0];
        assert_eq!(alice.jobs, 2);
        assert!(close(
            alice.energy_j,
            records[0].energy_j + records[1].energy_j
        ));
        assert!(close(alice.gpu_j, 100.0 + 120.0 + 50.0 + 70.0));
        // 0.1 h each: job 1 two GPUs on one node, job 2 one GPU on each of two nodes.
        assert!(close(alice.gpu_hours, 0.2 + 0.2), "{alice:?}");
        assert!(close(alice.node_hours, 0.1 + 0.2), "{alice:?}");
        assert_eq!((users[1].jobs, users[1].gpu_hours), (1, 0.0));

        let accounts = by(SummaryBy::Account, JobFilter::default());
        let phys = accounts
            .iter()
            .find(|r| r.key.as_deref() == Some("phys"))
            .unwrap();
        assert_eq!(phys.jobs, 2);
        assert!(close(
            phys.energy_j,
            records[0].energy_j + records[2].energy_j
        ));
        let partitions = by(SummaryBy::Partition, JobFilter::default());
        assert_eq!(partitions.iter().map(|r| r.jobs).sum::<u64>(), 3);

        let nodes = by(SummaryBy::Node, JobFilter::default());
        let n1 = nodes
            .iter()
            .find(|r| r.key.as_deref() == Some("n1"))
            .unwrap();
        let n2 = nodes
            .iter()
            .find(|r| r.key.as_deref() == Some("n2"))
            .unwrap();
        assert_eq!((n1.jobs, n2.jobs), (2, 2));
        assert!(close(n1.gpu_j, 100.0 + 120.0 + 50.0) && close(n2.gpu_j, 70.0));
        assert!(
            close(n1.gpu_hours, 0.2 + 0.1) && close(n2.gpu_hours, 0.1),
            "{nodes:?}"
        );
        let all: f64 = records.iter().map(|r| r.energy_j).sum();
        assert!(close(nodes.iter().map(|r| r.energy_j).sum::<f64>(), all));

        // Filters: a time window, and a user who is not root sees their own sums only.
        let window = by(
            SummaryBy::User,
            JobFilter {
                since_unix_ns: Some(1_500_000_000_000),
                until_unix_ns: Some(2_500_000_000_000),
                ..JobFilter::default()
            },
        );
        assert_eq!((window.len(), window[0].jobs), (1, 1));
        let own = by(
            SummaryBy::Account,
            JobFilter {
                uid: Some(1001),
                ..JobFilter::default()
            },
        );
        assert_eq!(own.len(), 1);
        assert!(close(own[0].energy_j, records[2].energy_j));
        assert!(by(
            SummaryBy::User,
            JobFilter {
                uid: Some(4242),
                ..JobFilter::default()
            }
        )
        .is_empty());
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
