//! The ledger: the jobs whose every delivery is done, and their spool-index entries, moved out of
//! the state file into a small SQLite file next to it (`<state_dir>/ledger.sqlite`), so that a
//! run loads and rewrites only what is still pending, and looks delivered jobs up by key or path
//! instead of loading them whole.
//!
//! A job enters the ledger at the end of the run that finished its deliveries (and, for a state
//! file written before the ledger existed, at the end of the first run that reads it): the ledger
//! commits first (durably: `synchronous = FULL`), then the state is saved without the job. A
//! crash in between leaves the job in both; the state's entry wins wherever both are read, and
//! the next run moves it again. A job collected again (a late node manifest) gets a new entry in
//! the state, which wins over its ledger row until it is delivered and replaces that row.
//!
//! The ledger answers what the state's jobs and index answered for delivered jobs: whether a job
//! was collected with a given record (its idempotency key), which job a manifest file belongs to
//! and whether it changed since ([`crate::spool::IndexEntry`] by path), and, for `ergon prune`,
//! when the job ended. The age bound (`state.max_age_days`) prunes it like the state: rows of
//! jobs that ended before the cutoff are deleted with their files, and the newest end deleted
//! becomes the ledger's horizon (committed in the same transaction), which a run takes into the
//! state's: manifests of jobs that ended at or before it are not collected again.
//!
//! A dry run, `ergon status` and `ergon prune` open the ledger read-only, and never create it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _};

use crate::spool::{IndexEntry, Sealed, Seals, SpoolIndex};
use crate::state::{Delivery, JobEntry};

/// The file in the state directory.
pub const FILE: &str = "ledger.sqlite";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY NOT NULL,
    key TEXT NOT NULL,
    end_unix_ns INTEGER NOT NULL,
    sacct_skipped INTEGER NOT NULL,
    entry TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs (end_unix_ns);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    job TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_job ON files (job);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sealed_dirs (
    path TEXT PRIMARY KEY NOT NULL,
    mtime_ns INTEGER NOT NULL,
    files INTEGER NOT NULL
);
PRAGMA user_version = 1;
";

/// A delivered job as the ledger has it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerJob {
    /// The record's idempotency key.
    pub key: String,
    /// The job's end (Unix ns).
    pub end_unix_ns: u64,
}

/// What a ledger error says: the file and the SQLite error.
#[derive(Debug, thiserror::Error)]
#[error("ledger {path}: {error}")]
pub struct LedgerError {
    /// The file.
    pub path: PathBuf,
    /// The error.
    pub error: rusqlite::Error,
}

impl From<LedgerError> for std::io::Error {
    fn from(e: LedgerError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

/// The ledger of a state directory; without a file (a dry run, status or prune before any
/// run made one), an empty ledger that holds nothing.
pub struct Ledger {
    path: PathBuf,
    conn: Option<Connection>,
    /// Inside a read transaction opened by [`Ledger::begin_read`].
    reading: bool,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("open", &self.conn.is_some())
            .finish()
    }
}

impl Ledger {
    /// The ledger file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// Open (and create, if absent) the ledger in `state_dir`, for a run.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = Self::path(state_dir);
        let e = |error| LedgerError {
            path: path.clone(),
            error,
        };
        let mut conn = Connection::open(&path).map_err(e)?;
        conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA synchronous = FULL;")
            .and_then(|()| conn.busy_timeout(std::time::Duration::from_secs(30)))
            .map_err(e)?;
        {
            let tx = conn.transaction().map_err(e)?;
            tx.execute_batch(SCHEMA).map_err(e)?;
            tx.commit().map_err(e)?;
        }
        Ok(Ledger {
            path,
            conn: Some(conn),
            reading: false,
        })
    }

    /// Open the ledger in `state_dir` for writing if there is one (`ergon prune`: never creates
    /// it).
    pub fn open_existing(state_dir: &Path) -> Result<Ledger, LedgerError> {
        if Self::path(state_dir).exists() {
            Self::open(state_dir)
        } else {
            Self::open_read_only(state_dir)
        }
    }

    /// Open the ledger in `state_dir` read-only, if there is one (a dry run, `ergon status`,
    /// `ergon prune`): never creates it.
    pub fn open_read_only(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = Self::path(state_dir);
        if !path.exists() {
            return Ok(Ledger {
                path,
                conn: None,
                reading: false,
            });
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.busy_timeout(std::time::Duration::from_secs(30))?;
            Ok(c)
        })
        .map_err(|error| LedgerError {
            path: path.clone(),
            error,
        })?;
        Ok(Ledger {
            path,
            conn: Some(conn),
            reading: false,
        })
    }

    fn err(&self, error: rusqlite::Error) -> LedgerError {
        LedgerError {
            path: self.path.clone(),
            error,
        }
    }

    /// Start a read transaction that the lookups until [`Ledger::end_read`] share (a run's
    /// scan: one transaction, prepared statements).
    pub fn begin_read(&mut self) -> Result<(), LedgerError> {
        if let Some(conn) = &self.conn {
            if !self.reading {
                conn.execute_batch("BEGIN").map_err(|e| self.err(e))?;
                self.reading = true;
            }
        }
        Ok(())
    }

    /// End the read transaction of [`Ledger::begin_read`].
    pub fn end_read(&mut self) -> Result<(), LedgerError> {
        if let Some(conn) = &self.conn {
            if self.reading {
                self.reading = false;
                conn.execute_batch("COMMIT").map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }

    /// Run `f` on the ledger's connection in one read transaction: the one [`Ledger::begin_read`]
    /// opened, else its own. Nothing to do without a ledger.
    fn in_read(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> Result<(), LedgerError> {
        let Some(conn) = &self.conn else {
            return Ok(());
        };
        let own = !self.reading;
        let run = || -> rusqlite::Result<()> {
            if own {
                conn.execute_batch("BEGIN")?;
            }
            let result = f(conn);
            if own {
                conn.execute_batch("COMMIT")?;
            }
            result
        };
        run().map_err(|e| self.err(e))
    }

    /// The index entries the ledger has of `paths` (those it has).
    pub fn files(&self, paths: &[&str]) -> Result<SpoolIndex, LedgerError> {
        let mut out = SpoolIndex::new();
        if paths.is_empty() {
            return Ok(out);
        }
        self.in_read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT size, mtime_ns, content_hash, job FROM files WHERE path = ?1",
            )?;
            for path in paths {
                let entry = stmt.query_row([path], |r| index_entry(r, 0)).optional()?;
                if let Some(entry) = entry {
                    out.insert((*path).to_owned(), entry);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The index entries of every file the ledger has of `jobs` (`cluster/job`).
    pub fn files_of_jobs(&self, jobs: &[&str]) -> Result<SpoolIndex, LedgerError> {
        let mut out = SpoolIndex::new();
        if jobs.is_empty() {
            return Ok(out);
        }
        self.in_read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT path, size, mtime_ns, content_hash, job FROM files WHERE job = ?1",
            )?;
            for job in jobs {
                let rows =
                    stmt.query_map([job], |r| Ok((r.get::<_, String>(0)?, index_entry(r, 1)?)))?;
                for row in rows {
                    let (path, entry) = row?;
                    out.insert(path, entry);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The sealed node directories of the sharded spool (see [`crate::spool::Sealed`]).
    pub fn seals(&self) -> Result<Seals, LedgerError> {
        let mut out = Seals::new();
        self.in_read(|conn| {
            let mut stmt = conn.prepare_cached("SELECT path, mtime_ns, files FROM sealed_dirs")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Sealed {
                        mtime_ns: r.get(1)?,
                        files: r.get::<_, i64>(2)? as u64,
                    },
                ))
            })?;
            for row in rows {
                let (path, sealed) = row?;
                out.insert(path, sealed);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Seal the directories `add` and forget the seals of `remove`, in one durable transaction.
    pub fn seal(&mut self, add: &[(&str, Sealed)], remove: &[&str]) -> Result<(), LedgerError> {
        let path = self.path.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT OR REPLACE INTO sealed_dirs (path, mtime_ns, files) VALUES (?1, ?2, ?3)",
                )?;
                for (p, s) in add {
                    put.execute(params![p, s.mtime_ns, s.files as i64])?;
                }
                let mut del = tx.prepare_cached("DELETE FROM sealed_dirs WHERE path = ?1")?;
                for p in remove {
                    del.execute([p])?;
                }
            }
            tx.commit()
        };
        run(conn).map_err(|error| LedgerError { path, error })
    }

    /// The delivered job `job` (`cluster/job`), if the ledger has it.
    pub fn job(&self, job: &str) -> Result<Option<LedgerJob>, LedgerError> {
        let Some(conn) = &self.conn else {
            return Ok(None);
        };
        job_row(conn, job).map_err(|e| self.err(e))
    }

    /// The delivered jobs among `jobs`, in one read transaction.
    pub fn jobs(&self, jobs: &[&str]) -> Result<BTreeMap<String, LedgerJob>, LedgerError> {
        let mut out = BTreeMap::new();
        self.in_read(|conn| {
            for job in jobs {
                if let Some(j) = job_row(conn, job)? {
                    out.insert((*job).to_owned(), j);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Enter delivered jobs and their files (replacing what the ledger had of them), in one
    /// durable transaction.
    pub fn put(
        &mut self,
        jobs: &[(&str, &JobEntry)],
        files: &[(&str, &IndexEntry)],
    ) -> Result<(), LedgerError> {
        let path = self.path.clone();
        let conn = self.conn.as_mut().ok_or_else(|| LedgerError {
            path: path.clone(),
            error: rusqlite::Error::InvalidQuery,
        })?;
        let write = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut job_stmt = tx.prepare_cached(
                    "INSERT OR REPLACE INTO jobs (job, key, end_unix_ns, sacct_skipped, entry)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (job, entry) in jobs {
                    let mut kept = (*entry).clone();
                    kept.record = None;
                    let text = serde_json::to_string(&kept).expect("entries serialise");
                    job_stmt.execute(params![
                        job,
                        entry.key,
                        entry.end_unix_ns as i64,
                        matches!(entry.sacct, Some(Delivery::Skipped { .. })),
                        text
                    ])?;
                }
                let mut file_stmt = tx.prepare_cached(
                    "INSERT OR REPLACE INTO files (path, size, mtime_ns, content_hash, job)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (path, e) in files {
                    file_stmt.execute(params![
                        path,
                        e.size as i64,
                        e.mtime_ns,
                        e.content_hash,
                        e.job
                    ])?;
                }
            }
            tx.commit()
        };
        write(conn).map_err(|error| LedgerError { path, error })
    }

    /// Forget the files `paths` (gone from the spool, or quarantined), in one durable
    /// transaction. Without a ledger file, nothing to do.
    pub fn forget_files(&mut self, paths: &[&str]) -> Result<(), LedgerError> {
        let path = self.path.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if paths.is_empty() {
            return Ok(());
        }
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached("DELETE FROM files WHERE path = ?1")?;
                for p in paths {
                    stmt.execute([p])?;
                }
            }
            tx.commit()
        };
        run(conn).map_err(|error| LedgerError { path, error })
    }

    /// Delete the jobs that ended before `cutoff_unix_ns`, with their files, and raise the
    /// ledger's horizon to the newest end deleted; one durable transaction. Returns the jobs
    /// deleted and the horizon.
    pub fn prune(&mut self, cutoff_unix_ns: u64) -> Result<(usize, u64), LedgerError> {
        let path = self.path.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Ok((0, 0));
        };
        let cutoff = cutoff_unix_ns.min(i64::MAX as u64) as i64;
        let run = |conn: &mut Connection| -> rusqlite::Result<(usize, u64)> {
            let tx = conn.transaction()?;
            let newest: Option<i64> = tx.query_row(
                "SELECT max(end_unix_ns) FROM jobs WHERE end_unix_ns < ?1",
                [cutoff],
                |r| r.get(0),
            )?;
            let mut deleted = 0;
            if newest.is_some() {
                tx.execute(
                    "DELETE FROM files WHERE job IN (SELECT job FROM jobs WHERE end_unix_ns < ?1)",
                    [cutoff],
                )?;
                deleted = tx.execute("DELETE FROM jobs WHERE end_unix_ns < ?1", [cutoff])?;
            }
            let old = read_horizon(&tx)?;
            let horizon = old.max(newest.unwrap_or(0).max(0) as u64);
            if horizon != old {
                tx.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('horizon_unix_ns', ?1)",
                    [horizon as i64],
                )?;
            }
            tx.commit()?;
            Ok((deleted, horizon))
        };
        run(conn).map_err(|error| LedgerError { path, error })
    }

    /// The ledger's horizon: the end (Unix ns) of the newest job its age bound deleted.
    pub fn horizon(&self) -> Result<u64, LedgerError> {
        match &self.conn {
            None => Ok(0),
            Some(conn) => read_horizon(conn).map_err(|e| self.err(e)),
        }
    }

    /// Jobs in the ledger, and how many of them sacct skipped (foreign content).
    pub fn counts(&self) -> Result<(u64, u64), LedgerError> {
        let Some(conn) = &self.conn else {
            return Ok((0, 0));
        };
        conn.query_row(
            "SELECT count(*), coalesce(sum(sacct_skipped), 0) FROM jobs",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )
        .map_err(|e| self.err(e))
    }

    /// Every job and file in the ledger (for tests and diagnostics: a run never loads it whole).
    pub fn all(&self) -> Result<(BTreeMap<String, JobEntry>, SpoolIndex), LedgerError> {
        let mut jobs = BTreeMap::new();
        let mut files = SpoolIndex::new();
        let Some(conn) = &self.conn else {
            return Ok((jobs, files));
        };
        let mut run = || -> rusqlite::Result<()> {
            let mut stmt = conn.prepare("SELECT job, entry FROM jobs")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?)))?;
            for row in rows {
                let (job, text): (String, String) = row?;
                let entry: JobEntry = serde_json::from_str(&text).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        4,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?;
                jobs.insert(job, entry);
            }
            let mut stmt =
                conn.prepare("SELECT path, size, mtime_ns, content_hash, job FROM files")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, index_entry(r, 1)?)))?;
            for row in rows {
                let (path, entry) = row?;
                files.insert(path, entry);
            }
            Ok(())
        };
        run().map_err(|e| self.err(e))?;
        Ok((jobs, files))
    }
}

/// The index entry of a `files` row whose `size, mtime_ns, content_hash, job` start at column
/// `from`.
fn index_entry(r: &rusqlite::Row<'_>, from: usize) -> rusqlite::Result<IndexEntry> {
    Ok(IndexEntry {
        size: r.get::<_, i64>(from)? as u64,
        mtime_ns: r.get(from + 1)?,
        content_hash: r.get(from + 2)?,
        job: r.get(from + 3)?,
    })
}

fn read_horizon(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'horizon_unix_ns'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0)
        .max(0) as u64)
}

/// The state of `state_dir` with the ledger's jobs and files merged in (the state's entries win):
/// what the state file held before the ledger existed. For tests and diagnostics.
pub fn load_merged(state_dir: &Path) -> anyhow::Result<crate::state::State> {
    let mut state = crate::state::State::load(state_dir)?;
    let ledger = Ledger::open_read_only(state_dir)?;
    let (jobs, files) = ledger.all()?;
    for (job, entry) in jobs {
        state.jobs.entry(job).or_insert(entry);
    }
    for (path, entry) in files {
        state.index.entry(path).or_insert(entry);
    }
    Ok(state)
}

/// The delivered job `job` (`cluster/job`) in the ledger's `jobs` table, if it is there.
fn job_row(conn: &Connection, job: &str) -> rusqlite::Result<Option<LedgerJob>> {
    conn.prepare_cached("SELECT key, end_unix_ns FROM jobs WHERE job = ?1")?
        .query_row([job], |r| {
            Ok(LedgerJob {
                key: r.get(0)?,
                end_unix_ns: r.get::<_, i64>(1)? as u64,
            })
        })
        .optional()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, end: u64) -> JobEntry {
        let mut sinks = BTreeMap::new();
        sinks.insert("vm".to_string(), Delivery::Done { at_unix: 1 });
        JobEntry {
            key: key.into(),
            collected_unix: 0,
            end_unix_ns: end,
            record: None,
            sacct: Some(Delivery::Skipped {
                reason: "foreign".into(),
            }),
            sinks,
        }
    }

    fn file(job: &str, size: u64) -> IndexEntry {
        IndexEntry {
            size,
            mtime_ns: 7,
            content_hash: "sha256:00".into(),
            job: job.into(),
        }
    }

    #[test]
    fn put_look_up_replace_forget_and_prune_with_the_horizon() {
        let dir = tempfile::tempdir().unwrap();
        // Read-only before any run: empty, and no file made.
        let ro = Ledger::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.job("c/1").unwrap(), None);
        assert!(ro.files(&["/s/1"]).unwrap().is_empty());
        assert!(!Ledger::path(dir.path()).exists());

        let mut l = Ledger::open(dir.path()).unwrap();
        let (e1, e2) = (entry("c/1/a", 10), entry("c/2/b", 20));
        let (f1, f2) = (file("c/1", 1), file("c/2", 2));
        l.put(
            &[("c/1", &e1), ("c/2", &e2)],
            &[("/s/1", &f1), ("/s/2", &f2)],
        )
        .unwrap();
        l.begin_read().unwrap();
        assert_eq!(
            l.job("c/1").unwrap(),
            Some(LedgerJob {
                key: "c/1/a".into(),
                end_unix_ns: 10
            })
        );
        let found = l.files(&["/s/1", "/s/9"]).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found["/s/1"], f1);
        assert_eq!(l.jobs(&["c/2", "c/9"]).unwrap().len(), 1);
        l.end_read().unwrap();
        assert_eq!(l.counts().unwrap(), (2, 2));

        // A job collected again and delivered replaces its row.
        l.put(&[("c/1", &entry("c/1/z", 11))], &[]).unwrap();
        assert_eq!(l.job("c/1").unwrap().unwrap().key, "c/1/z");
        l.forget_files(&["/s/2"]).unwrap();
        assert!(l.files(&["/s/2"]).unwrap().is_empty());

        // The age bound: job 1 (end 11) goes with its file; the horizon is its end.
        assert_eq!(l.prune(15).unwrap(), (1, 11));
        assert_eq!(l.job("c/1").unwrap(), None);
        assert!(l.files(&["/s/1"]).unwrap().is_empty());
        assert_eq!(l.prune(15).unwrap(), (0, 11), "the horizon stays");
        drop(l);
        let ro = Ledger::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.horizon().unwrap(), 11);
        let (jobs, _) = ro.all().unwrap();
        assert_eq!(jobs["c/2"], e2);
    }
}
