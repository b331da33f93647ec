//! The spool directories: listing the manifest files in them (one listing, used by collection,
//! `ergon report`, `ergon plot` and `ergon prune`), reading one, and what the state's spool index
//! remembers of a file. A leaf module: it depends on no other module of this crate.
//!
//! Two layouts, read side by side in any spool:
//! - **flat** (ergond's default): `<spool>/<cluster>-<job>-<node>.json`;
//! - **sharded** (ergond's `spool_layout = "sharded"`): `<spool>/<YYYY-MM-DD>/<node>/<cluster>-<job>-<node>.json.gz`,
//!   by the job's end date (UTC) and node, gzip-compressed: a day's directory holds one
//!   directory per node, so no directory grows with the site's job rate times its retention.
//!
//! A manifest is `*.json` or `*.json.gz` (names starting with `.` are ergond's temporary files).
//! Only directories named like a date, and the directories directly in them, are entered;
//! symbolic links to directories are not followed.

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

/// Whether a directory entry's name is a manifest: `*.json` or `*.json.gz`, not starting with
/// `.` (ergond writes to a hidden temporary file and renames it).
pub fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.') && (name.ends_with(".json") || name.ends_with(".json.gz"))
}

/// Whether a directory name is a day of the sharded layout: `YYYY-MM-DD`.
pub fn is_day_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// The largest manifest read, decompressed (a manifest with a 600-point trace for 8 GPUs is
/// well under 1 MiB): a file that inflates beyond this is refused, not read into memory.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// A manifest file's bytes (JSON), decompressed when its name ends in `.gz`.
pub fn read_manifest(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    if !path.to_str().is_some_and(|p| p.ends_with(".gz")) {
        return std::fs::read(path);
    }
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file)
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("decompresses to more than {MAX_MANIFEST_BYTES} bytes"),
        ));
    }
    Ok(out)
}

/// The first `n` bytes of a manifest (decompressed), or fewer if it is shorter.
pub fn read_manifest_head(path: &Path, n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut out = Vec::with_capacity(n);
    if path.to_str().is_some_and(|p| p.ends_with(".gz")) {
        flate2::read::GzDecoder::new(file)
            .take(n as u64)
            .read_to_end(&mut out)?;
    } else {
        file.take(n as u64).read_to_end(&mut out)?;
    }
    Ok(out)
}

/// The entries of `dir`, sorted, without following symbolic links: (path, name, is a directory).
fn entries(dir: &Path) -> std::io::Result<Vec<(PathBuf, String, bool)>> {
    let mut out: Vec<(PathBuf, String, bool)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let is_dir = e.file_type().ok()?.is_dir();
            Some((e.path(), name, is_dir))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// A node directory of the sharded layout that an earlier run found wholly collected and
/// delivered (every manifest in it in the ledger, or of a job that ended before the horizon)
/// and old enough that nothing was being written into it: its modification time then, and how
/// many manifests it held. A run that finds it with the same modification time does not list it
/// (see [`list_sealed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// The directory's modification time when sealed, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Manifests in it.
    pub files: u64,
}

/// Sealed node directories by path.
pub type Seals = BTreeMap<String, Sealed>;

/// A node directory may be sealed once it has not changed for this long (at the listing), so
/// that no write can follow the listing within the same clock tick of its modification time.
pub const SEAL_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// A node directory of the sharded layout, as listed.
#[derive(Debug, Clone)]
pub struct ListedDir {
    /// Its path (UTF-8; a directory whose path is not is never sealed).
    pub path: String,
    /// Its modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Manifests listed in it (for a skipped directory: as sealed).
    pub files: u64,
    /// Sealed and unchanged: its files were not listed.
    pub skipped: bool,
    /// Where its files are, or would be, in [`Listing::files`].
    pub at: usize,
}

/// What [`list_sealed`] found.
#[derive(Debug, Default)]
pub struct Listing {
    /// The manifest files, in spool order then name order.
    pub files: Vec<Listed>,
    /// The node directories of the sharded layout, in the same order.
    pub dirs: Vec<ListedDir>,
}

/// A file's or directory's modification time, ns since the Unix epoch (`st_mtime`,
/// `st_mtime_nsec`), as the listing and the index keep it.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt as _;
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// A manifest file as [`list_dir`] lists it: `None` when it is gone or not a regular file
/// (symbolic links are not followed).
pub fn stat_listed(path: PathBuf) -> Option<Listed> {
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() {
        return None;
    }
    Some(Listed {
        key: path.to_str().map(str::to_owned),
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
        mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        path,
    })
}

/// The manifest files in `spool` (flat, then the sharded days and nodes in name order), with
/// their size and modification time (files that vanish while listed, and anything that is not
/// a regular file, are left out). A day or node directory that cannot be read is skipped with a
/// warning; the spool itself must be readable.
pub fn list_dir(spool: &Path) -> std::io::Result<Vec<Listed>> {
    Ok(list_dir_sealed(spool, &Seals::new())?.files)
}

/// [`list_dir`], except that a node directory of `seals` whose modification time is the sealed
/// one is not entered: it is listed in [`Listing::dirs`] as skipped, with no files.
pub fn list_dir_sealed(spool: &Path, seals: &Seals) -> std::io::Result<Listing> {
    let top = entries(spool).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("reading spool directory {}: {e}", spool.display()),
        )
    })?;
    let mut out = Listing::default();
    let mut days = Vec::new();
    for (path, name, is_dir) in top {
        if is_dir && is_day_name(&name) {
            days.push(path);
        } else if !is_dir && is_manifest_name(&name) {
            out.files.extend(stat_listed(path));
        }
    }
    for day in days {
        let nodes = match entries(&day) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("reading spool directory {}: {e}; skipped", day.display());
                continue;
            }
        };
        for (node, name, is_dir) in nodes {
            if !is_dir || name.starts_with('.') {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&node) else {
                continue;
            };
            let key = node.to_str().map(str::to_owned);
            let mtime = mtime_ns(&meta);
            let at = out.files.len();
            if let Some(sealed) = key
                .as_ref()
                .and_then(|k| seals.get(k))
                .filter(|s| s.mtime_ns == mtime)
            {
                out.dirs.push(ListedDir {
                    path: key.unwrap_or_default(),
                    mtime_ns: mtime,
                    files: sealed.files,
                    skipped: true,
                    at,
                });
                continue;
            }
            match entries(&node) {
                Ok(files) => out.files.extend(
                    files
                        .into_iter()
                        .filter(|(_, n, d)| !d && is_manifest_name(n))
                        .filter_map(|(p, _, _)| stat_listed(p)),
                ),
                Err(e) => {
                    tracing::warn!("reading spool directory {}: {e}; skipped", node.display());
                    continue;
                }
            }
            if let Some(path) = key {
                out.dirs.push(ListedDir {
                    path,
                    mtime_ns: mtime,
                    files: (out.files.len() - at) as u64,
                    skipped: false,
                    at,
                });
            }
        }
    }
    Ok(out)
}

/// [`list_dir`] of every spool, in spool order then name order. A spool that cannot be read is
/// an error that names it.
pub fn list(spools: &[PathBuf]) -> std::io::Result<Vec<Listed>> {
    Ok(list_sealed(spools, &Seals::new())?.files)
}

/// [`list_dir_sealed`] of every spool, in spool order then name order.
pub fn list_sealed(spools: &[PathBuf], seals: &Seals) -> std::io::Result<Listing> {
    let mut out = Listing::default();
    for spool in spools {
        let one = list_dir_sealed(spool, seals)?;
        let offset = out.files.len();
        out.dirs.extend(one.dirs.into_iter().map(|mut d| {
            d.at += offset;
            d
        }));
        out.files.extend(one.files);
    }
    Ok(out)
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
            let bytes = match read_manifest(&path) {
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
