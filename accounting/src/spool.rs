//! The spool directories: listing the manifest files in them (one listing, used by collection,
//! `ergon report` and `ergon plot`), and what the state's spool index remembers of a file. A
//! leaf module: it depends on no other module of this crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ergon_protocol::manifest::Manifest;
use serde::{Deserialize, Serialize};

/// A manifest file already collected: what the state's spool index
/// ([`crate::state::State::index`]) remembers of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// File size in bytes when it was read.
    pub size: u64,
    /// Modification time when it was read, ns since the Unix epoch (`st_mtime`, `st_mtime_nsec`).
    pub mtime_ns: i64,
    /// The manifest's content hash (`sha256:<hex>`), as verified.
    pub content_hash: String,
    /// The job it belongs to (`cluster/job`, a key of the state's jobs).
    pub job: String,
}

/// The spool index: [`IndexEntry`] by path.
pub type SpoolIndex = BTreeMap<String, IndexEntry>;

/// A `*.json` file in a spool, as listed (before it is read).
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its path.
    pub path: PathBuf,
    /// The index key: the path as UTF-8 (`None`: not indexable, always read).
    pub key: Option<String>,
    /// Size in bytes when listed.
    pub size: u64,
    /// Modification time when listed, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// The same modification time.
    pub mtime: SystemTime,
}

/// Whether a directory entry's name is a manifest: `*.json`, not starting with `.` (ergond
/// writes to a hidden temporary file and renames it).
pub fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".json")
}

/// The manifest files directly in `spool`, in name order, with their size and modification time
/// (files that vanish while listed, and anything that is not a regular file, are left out).
pub fn list_dir(spool: &Path) -> std::io::Result<Vec<Listed>> {
    use std::os::unix::fs::MetadataExt as _;
    let entries = std::fs::read_dir(spool).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("reading spool directory {}: {e}", spool.display()),
        )
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_manifest_name)
        })
        .collect();
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        files.push(Listed {
            key: path.to_str().map(str::to_owned),
            size: meta.len(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            path,
        });
    }
    Ok(files)
}

/// [`list_dir`] of every spool, in spool order then name order. A spool that cannot be read is
/// an error that names it.
pub fn list(spools: &[PathBuf]) -> std::io::Result<Vec<Listed>> {
    let mut files = Vec::new();
    for spool in spools {
        files.extend(list_dir(spool)?);
    }
    Ok(files)
}

/// The manifests of one job found in the spools by [`find_job`].
#[derive(Debug, Default)]
pub struct JobFiles {
    /// The job's manifests that verified, each with its file, in spool then name order.
    pub found: Vec<(PathBuf, Manifest)>,
    /// The job's manifests that did not verify: `<path>: <why>`.
    pub unverified: Vec<String>,
    /// Files named like one of the job's manifests (`*-<job>-*.json`, ergond's names) that could
    /// not be read or parsed: `<path>: <why>`.
    pub unreadable: Vec<String>,
}

/// The manifests of `job_id` (on `cluster`, if given) in `spools`, for `ergon report` and
/// `ergon plot`: every manifest file of [`list_dir`] is parsed, kept when it is the job's, then
/// verified. A spool that cannot be listed is skipped (users may lack access to some).
pub fn find_job(spools: &[PathBuf], cluster: Option<&str>, job_id: u32) -> JobFiles {
    let mut out = JobFiles::default();
    let ours_by_name = |path: &Path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(&format!("-{job_id}-")))
    };
    for spool in spools {
        let files = match list_dir(spool) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("{e}");
                continue;
            }
        };
        for file in files {
            let path = file.path;
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    if ours_by_name(&path) {
                        out.unreadable
                            .push(format!("{}: cannot read: {e}", path.display()));
                    }
                    continue;
                }
            };
            let m = match Manifest::from_json_unverified(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    if ours_by_name(&path) {
                        out.unreadable
                            .push(format!("{}: not a valid manifest: {e}", path.display()));
                    }
                    continue;
                }
            };
            if m.job.job_id != job_id || cluster.is_some_and(|c| c != m.cluster) {
                continue;
            }
            match m.verify() {
                Ok(()) => out.found.push((path, m)),
                Err(e) => out.unverified.push(format!("{}: {e}", path.display())),
            }
        }
    }
    out
}
