//! Collection: read the manifests ergond left in its spool directories, verify them, put the
//! bad ones in quarantine and combine the nodes of each job into one [`JobRecordFull`].
//!
//! Reading and moving files is here; combining manifests is the pure function
//! [`combine`], tested without any files. [`scan_indexed`] skips the files the state's spool
//! index knows unchanged, so that a run reads only what is new.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ergon_protocol::manifest::{EnergyMethod, Manifest, ManifestError};
use ergon_protocol::record::JobRecord;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::IndexEntry;

/// One job's energy across all its nodes: what the sinks receive and what the sacct record is
/// made from.
///
/// Coverage is given two ways: `coverage_min` (the worst node; what the sacct record's `cov`
/// shows, so that a gap on any node is visible) and `coverage_weighted` (each node's coverage
/// weighted by its energy, or a plain mean when the job used no energy).
///
/// `peak_w` is the sum of the nodes' peak powers: an upper bound, since the nodes' peaks need not
/// coincide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecordFull {
    /// `<cluster>/<job id>/<job hash>`: the same for the same set of node manifests, so a receiver
    /// can drop a record it has already seen.
    pub idempotency_key: String,
    /// `sha256:<hex>` over the sorted content hashes of the job's node manifests.
    pub job_hash: String,
    /// Slurm cluster name.
    pub cluster: String,
    /// Slurm job id.
    pub job_id: u32,
    /// The array's job id, for an array task.
    pub array_job_id: Option<u32>,
    /// The task's index in its array.
    pub array_task_id: Option<u32>,
    /// The owner's user name.
    pub user: String,
    /// The owner's uid.
    pub uid: u32,
    /// Slurm account.
    pub account: Option<String>,
    /// Slurm partition.
    pub partition: Option<String>,
    /// Earliest start over the nodes.
    pub start_unix_ns: u64,
    /// Latest end over the nodes.
    pub end_unix_ns: u64,
    /// `end - start`, seconds.
    pub duration_s: f64,
    /// Total energy, joules.
    pub energy_j: f64,
    /// GPU energy, joules; `None` when no node measured it.
    pub gpu_j: Option<f64>,
    /// CPU package energy, joules; `None` when no node measured it.
    pub cpu_j: Option<f64>,
    /// DRAM energy, joules; `None` when no node measured it.
    pub dram_j: Option<f64>,
    /// `energy_j / duration_s` (0 for a zero-length job).
    pub avg_w: f64,
    /// Sum of the nodes' peak powers (an upper bound of the job's peak).
    pub peak_w: f64,
    /// The lowest node coverage.
    pub coverage_min: f64,
    /// Energy-weighted mean node coverage.
    pub coverage_weighted: f64,
    /// Whether any node's figures are partly estimated.
    pub estimated: bool,
    /// Per node, sorted by node name.
    pub nodes: Vec<NodeSummary>,
    /// Per GPU, sorted by node then index.
    pub gpus: Vec<GpuSummary>,
}

/// One node's share of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// Node name.
    pub node: String,
    /// Energy on this node, joules.
    pub energy_j: f64,
    /// GPU energy, joules.
    pub gpu_j: Option<f64>,
    /// CPU package energy, joules.
    pub cpu_j: Option<f64>,
    /// DRAM energy, joules.
    pub dram_j: Option<f64>,
    /// Average power, watts.
    pub avg_w: f64,
    /// Peak power, watts.
    pub peak_w: f64,
    /// Fraction of the job's time on this node covered by readings.
    pub coverage: f64,
    /// The node manifest's content hash.
    pub manifest_hash: String,
}

/// One GPU's share of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSummary {
    /// Node name.
    pub node: String,
    /// NVML UUID.
    pub uuid: String,
    /// Slurm GPU index on the node.
    pub index: u32,
    /// Energy, joules; `None` when the GPU could not be read (never 0 for an unmeasured GPU).
    pub energy_j: Option<f64>,
    /// Average power, watts.
    pub avg_w: Option<f64>,
    /// Peak power, watts.
    pub peak_w: Option<f64>,
    /// How the energy was obtained.
    pub method: EnergyMethod,
}

impl JobRecordFull {
    /// The short record stored in sacct.
    pub fn sacct_record(&self) -> JobRecord {
        let whole = |x: f64| {
            if x.is_finite() && x > 0.0 {
                x.round() as u64
            } else {
                0
            }
        };
        JobRecord {
            energy_j: whole(self.energy_j),
            gpu_j: whole(self.gpu_j.unwrap_or(0.0)),
            cpu_j: whole(self.cpu_j.unwrap_or(0.0)),
            dram_j: whole(self.dram_j.unwrap_or(0.0)),
            other_j: None,
            avg_w: self.avg_w,
            peak_w: self.peak_w,
            gpus: self.gpus.len() as u32,
            nodes: self.nodes.len() as u32,
            coverage: self.coverage_min,
            hash: JobRecord::short_hash(&self.job_hash),
        }
    }

    /// `cluster/job` as used for keys in the state.
    pub fn job_key(&self) -> String {
        job_key(&self.cluster, self.job_id)
    }
}

/// `cluster/job`, the key of a job in the state.
pub fn job_key(cluster: &str, job_id: u32) -> String {
    format!("{cluster}/{job_id}")
}

fn sum_opt(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.fold(None, |acc, v| match (acc, v) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    })
}

/// Combine the verified manifests of one job (all with the same cluster and job id, one per
/// node) into one record. Pure: the order of `manifests` does not matter.
///
/// # Panics
/// If `manifests` is empty.
pub fn combine(manifests: &[Manifest]) -> JobRecordFull {
    assert!(!manifests.is_empty(), "combine needs at least one manifest");
    let mut sorted: Vec<&Manifest> = manifests.iter().collect();
    sorted.sort_by(|a, b| {
        a.node
            .cmp(&b.node)
            .then(a.content_hash.cmp(&b.content_hash))
    });
    let first = sorted[0];

    let mut hashes: Vec<&str> = sorted.iter().map(|m| m.content_hash.as_str()).collect();
    hashes.sort_unstable();
    let mut hasher = Sha256::new();
    for h in &hashes {
        hasher.update(h.as_bytes());
        hasher.update(b"\n");
    }
    let job_hash = format!("sha256:{}", hex(&hasher.finalize()));

    let start = sorted.iter().map(|m| m.start_unix_ns).min().unwrap_or(0);
    let end = sorted.iter().map(|m| m.end_unix_ns).max().unwrap_or(0);
    let duration_s = end.saturating_sub(start) as f64 / 1e9;
    let energy_j: f64 = sorted.iter().map(|m| m.totals.energy_j).sum();
    let weighted = if energy_j > 0.0 {
        sorted
            .iter()
            .map(|m| m.coverage.fraction * m.totals.energy_j)
            .sum::<f64>()
            / energy_j
    } else {
        sorted.iter().map(|m| m.coverage.fraction).sum::<f64>() / sorted.len() as f64
    };

    let nodes = sorted
        .iter()
        .map(|m| NodeSummary {
            node: m.node.clone(),
            energy_j: m.totals.energy_j,
            gpu_j: m.totals.gpu_j,
            cpu_j: m.totals.cpu_j,
            dram_j: m.totals.dram_j,
            avg_w: m.totals.avg_w,
            peak_w: m.totals.peak_w,
            coverage: m.coverage.fraction,
            manifest_hash: m.content_hash.clone(),
        })
        .collect();
    let mut gpus: Vec<GpuSummary> = sorted
        .iter()
        .flat_map(|m| {
            m.gpus.iter().map(|g| GpuSummary {
                node: m.node.clone(),
                uuid: g.uuid.clone(),
                index: g.index,
                energy_j: g.energy_j,
                avg_w: g.avg_w,
                peak_w: g.peak_w,
                method: g.method,
            })
        })
        .collect();
    gpus.sort_by(|a, b| a.node.cmp(&b.node).then(a.index.cmp(&b.index)));

    JobRecordFull {
        idempotency_key: format!("{}/{}/{}", first.cluster, first.job.job_id, &job_hash[7..]),
        job_hash,
        cluster: first.cluster.clone(),
        job_id: first.job.job_id,
        array_job_id: first.job.array_job_id,
        array_task_id: first.job.array_task_id,
        user: first.job.user.clone(),
        uid: first.job.uid,
        account: first.job.account.clone(),
        partition: first.job.partition.clone(),
        start_unix_ns: start,
        end_unix_ns: end,
        duration_s,
        energy_j,
        gpu_j: sum_opt(sorted.iter().map(|m| m.totals.gpu_j)),
        cpu_j: sum_opt(sorted.iter().map(|m| m.totals.cpu_j)),
        dram_j: sum_opt(sorted.iter().map(|m| m.totals.dram_j)),
        avg_w: if duration_s > 0.0 {
            energy_j / duration_s
        } else {
            0.0
        },
        peak_w: sorted.iter().map(|m| m.totals.peak_w).sum(),
        coverage_min: sorted
            .iter()
            .map(|m| m.coverage.fraction)
            .fold(f64::INFINITY, f64::min),
        coverage_weighted: weighted,
        estimated: sorted.iter().any(|m| m.attribution.estimated),
        nodes,
        gpus,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A manifest file that passed verification.
#[derive(Debug, Clone)]
pub struct FoundManifest {
    /// Where it is.
    pub path: PathBuf,
    /// Its content.
    pub manifest: Manifest,
}

/// A manifest moved to quarantine.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// Where it was.
    pub from: PathBuf,
    /// Where it is now.
    pub to: PathBuf,
    /// Why.
    pub reason: String,
}

/// A manifest file a scan found good (verified now, or known from the index unchanged), with
/// what the spool index keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedFile {
    /// The file's path, as the index keys it.
    pub path: String,
    /// What the index remembers.
    pub entry: IndexEntry,
}

/// What one pass over the spools found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Verified manifests grouped by `cluster/job`: every job with a manifest that is new or
    /// not in the index, with all of its manifests (those in the index read again).
    pub jobs: BTreeMap<String, Vec<FoundManifest>>,
    /// Manifests put in quarantine by this scan.
    pub quarantined: Vec<Quarantined>,
    /// Jobs left for a later run because a manifest of theirs changed less than `settle` ago
    /// (another node's manifest may still be coming).
    pub unsettled: usize,
    /// The files the index may hold after this scan: those of the jobs in [`Scan::jobs`] and
    /// the unchanged ones of other jobs, in spool order. New files of unsettled jobs are left
    /// out, so that a later run reads them again. The caller keeps those of jobs it has.
    pub index: Vec<IndexedFile>,
    /// Files read, parsed and verified by this scan.
    pub read: usize,
    /// Files not read because the index knew them unchanged (same size and modification time).
    pub known: usize,
}

/// The index of a spool: [`crate::state::State::index`].
pub type SpoolIndex = BTreeMap<String, IndexEntry>;

/// [`scan_indexed`] with an empty index: every file is read.
pub fn scan(
    spools: &[PathBuf],
    quarantine: Option<&Path>,
    settle: Duration,
) -> std::io::Result<Scan> {
    scan_indexed(spools, quarantine, settle, &SpoolIndex::new())
}

/// A `*.json` file in a spool, as listed (before it is read).
struct Listed {
    path: PathBuf,
    /// The index key: the path as UTF-8 (`None`: not indexable, always read).
    key: Option<String>,
    size: u64,
    mtime_ns: i64,
    mtime: SystemTime,
}

/// What became of a listed file.
enum Outcome {
    /// Not (yet) read: known from the index, or not needed.
    Unread,
    /// Gone, unreadable or quarantined: not a manifest of any job this run.
    Dropped,
    /// Read and verified.
    Good(Box<Manifest>),
}

/// Read every `*.json` file directly in each spool directory (temporary files that ergond is
/// still writing, `.*` and `*.tmp`, are skipped), verify it, quarantine the bad ones, and group the
/// good ones by job. Jobs with a manifest modified less than `settle` ago are left out (counted in
/// [`Scan::unsettled`]).
///
/// `index` (the state's spool index) spares reading: a file it lists with the same size and
/// modification time is not read, and its job is not collected again, unless another file of
/// the job is new (then all the job's files are read, to combine them). A file it lists that
/// changed is read again: the same content hash only updates its entry; a different one means
/// the manifest changed after it was collected, and the file is quarantined (the job's record
/// keeps what was collected; ergond writes a manifest once, so this is not ergond's doing,
/// except a requeued job that ran again on the same node, which a person should look at).
///
/// With `quarantine` `None` (a dry run) bad manifests are reported but not moved.
pub fn scan_indexed(
    spools: &[PathBuf],
    quarantine: Option<&Path>,
    settle: Duration,
    index: &SpoolIndex,
) -> std::io::Result<Scan> {
    use std::os::unix::fs::MetadataExt as _;

    let mut scan = Scan::default();
    // 1. List, in spool order then name order (the order decides between two manifests of
    //    one node), with the size and modification time taken before any read.
    let mut files: Vec<Listed> = Vec::new();
    for spool in spools {
        let entries = match std::fs::read_dir(spool) {
            Ok(e) => e,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("reading spool directory {}: {e}", spool.display()),
                ))
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.') && name.ends_with(".json")
            })
            .collect();
        paths.sort();
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
    }
    let indexed = |f: &Listed| f.key.as_ref().and_then(|k| index.get(k));
    let unchanged =
        |f: &Listed| indexed(f).filter(|e| e.size == f.size && e.mtime_ns == f.mtime_ns);

    // 2. Read the files the index does not know unchanged.
    let mut outcome: Vec<Outcome> = files.iter().map(|_| Outcome::Unread).collect();
    // The job of each good file: from the index for unchanged ones, from the content otherwise.
    let mut job_of: Vec<Option<String>> = files
        .iter()
        .map(|f| unchanged(f).map(|e| e.job.clone()))
        .collect();
    let to_read: Vec<usize> = (0..files.len()).filter(|&i| job_of[i].is_none()).collect();
    // Jobs with a file that is new to the index: collected (again) from all their files.
    let mut affected: BTreeSet<String> = BTreeSet::new();
    let paths: Vec<&Path> = to_read.iter().map(|&i| files[i].path.as_path()).collect();
    for (&i, read) in to_read.iter().zip(read_and_verify(&paths)) {
        let f = &files[i];
        match check(&mut scan, f, read, indexed(f), quarantine)? {
            Some(manifest) => {
                let job = job_key(&manifest.cluster, manifest.job.job_id);
                if indexed(f).is_none() {
                    affected.insert(job.clone());
                }
                // Known with the same content (e.g. touched): only its entry changes.
                job_of[i] = Some(job);
                outcome[i] = Outcome::Good(Box::new(manifest));
            }
            None => outcome[i] = Outcome::Dropped,
        }
    }

    // 3. Settle: a job is collected once its newest file is `settle` old.
    let now = SystemTime::now();
    let mut newest: BTreeMap<&str, SystemTime> = BTreeMap::new();
    for (f, job) in files.iter().zip(&job_of) {
        if let Some(job) = job.as_deref().filter(|j| affected.contains(*j)) {
            let n = newest.entry(job).or_insert(f.mtime);
            *n = (*n).max(f.mtime);
        }
    }
    let settled: BTreeSet<String> = newest
        .into_iter()
        .filter(|(_, t)| now.duration_since(*t).is_ok_and(|age| age >= settle))
        .map(|(job, _)| job.to_owned())
        .collect();
    scan.unsettled = affected.len() - settled.len();

    // 4. Read the unchanged files of the jobs to collect, to combine them with the new ones.
    let again: Vec<usize> = (0..files.len())
        .filter(|&i| {
            matches!(outcome[i], Outcome::Unread)
                && job_of[i].as_ref().is_some_and(|j| settled.contains(j))
        })
        .collect();
    let paths: Vec<&Path> = again.iter().map(|&i| files[i].path.as_path()).collect();
    for (&i, read) in again.iter().zip(read_and_verify(&paths)) {
        let f = &files[i];
        outcome[i] = match check(&mut scan, f, read, indexed(f), quarantine)? {
            Some(manifest) => Outcome::Good(Box::new(manifest)),
            None => Outcome::Dropped,
        };
    }
    scan.read = to_read.len() + again.len();
    scan.known = files.len() - scan.read;

    // 5. Group the settled jobs' manifests, in listing order; list what the index may keep.
    for (i, (f, out)) in files.iter().zip(outcome).enumerate() {
        let Some(job) = job_of[i].take() else {
            continue;
        };
        let entry = |content_hash: String| IndexedFile {
            path: f.key.clone().unwrap_or_default(),
            entry: IndexEntry {
                size: f.size,
                mtime_ns: f.mtime_ns,
                content_hash,
                job: job.clone(),
            },
        };
        match out {
            Outcome::Dropped => {}
            Outcome::Unread => {
                // Known and unchanged, of a job not collected this run.
                if let Some(e) = unchanged(f) {
                    scan.index.push(entry(e.content_hash.clone()));
                }
            }
            Outcome::Good(manifest) => {
                let new_and_unsettled = affected.contains(&job) && !settled.contains(&job);
                if f.key.is_some() && !(new_and_unsettled && indexed(f).is_none()) {
                    scan.index.push(entry(manifest.content_hash.clone()));
                }
                if settled.contains(&job) {
                    add_found(&mut scan, &job, f.path.clone(), *manifest);
                }
            }
        }
    }
    Ok(scan)
}

/// Add a verified manifest to its job in `scan`. The same manifest seen twice (a local spool
/// and its copy on a shared filesystem) counts once; two different manifests of one node (a
/// rewritten one) count once too: the more complete, then the later.
fn add_found(scan: &mut Scan, job: &str, path: PathBuf, manifest: Manifest) {
    let found = scan.jobs.entry(job.to_owned()).or_default();
    match found.iter().position(|f| f.manifest.node == manifest.node) {
        None => found.push(FoundManifest { path, manifest }),
        Some(i) if found[i].manifest.content_hash == manifest.content_hash => {}
        Some(i) => {
            let old = &found[i].manifest;
            let better = (manifest.coverage.fraction, manifest.end_unix_ns)
                > (old.coverage.fraction, old.end_unix_ns);
            tracing::warn!(
                "two different manifests of job {} on node {}: {} and {}; using {}",
                manifest.job.job_id,
                manifest.node,
                found[i].path.display(),
                path.display(),
                if better { "the second" } else { "the first" }
            );
            if better {
                found[i] = FoundManifest { path, manifest };
            }
        }
    }
}

/// The verified manifest of a file just read, or `None` when it is gone, unreadable or bad
/// (then quarantined, or reported in a dry run), or changed after it was collected (then
/// quarantined too: see [`scan_indexed`]).
fn check(
    scan: &mut Scan,
    file: &Listed,
    read: Read,
    indexed: Option<&IndexEntry>,
    quarantine: Option<&Path>,
) -> std::io::Result<Option<Manifest>> {
    let path = &file.path;
    let reason = match read {
        Read::Gone => return Ok(None),
        Read::Failed(e) => {
            tracing::warn!("cannot read manifest {}: {e}; skipped", path.display());
            return Ok(None);
        }
        Read::Parsed(parsed) => match *parsed {
            Ok(m) => match indexed {
                Some(e) if e.content_hash != m.content_hash => format!(
                    "manifest changed after it was collected: it was {} (job {}), it is now {} (job {}); the job's record keeps the content collected",
                    e.content_hash,
                    e.job,
                    m.content_hash,
                    job_key(&m.cluster, m.job.job_id)
                ),
                _ => return Ok(Some(m)),
            },
            Err(e) => e.to_string(),
        },
    };
    let Some(quarantine) = quarantine else {
        tracing::warn!(
            "bad manifest {} (dry run: not moved): {reason}",
            path.display()
        );
        scan.quarantined.push(Quarantined {
            from: path.clone(),
            to: path.clone(),
            reason,
        });
        return Ok(None);
    };
    let q = quarantine_file(path, quarantine, &reason)?;
    tracing::warn!(
        "quarantined manifest {} as {}: {}",
        q.from.display(),
        q.to.display(),
        q.reason
    );
    scan.quarantined.push(q);
    Ok(None)
}

/// What reading one manifest file gave.
enum Read {
    /// The file went away between listing and reading.
    Gone,
    /// It could not be read.
    Failed(std::io::Error),
    /// Read; parsed and verified (or why not).
    Parsed(Box<Result<Manifest, ManifestError>>),
}

fn read_one(path: &Path) -> Read {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Gone,
        Err(e) => return Read::Failed(e),
    };
    let parsed = Manifest::from_json(&bytes).map(|mut m| {
        // The power trace is not part of the job record; dropping it here keeps a large
        // backlog's memory small (`ergon report` reads it from the file).
        m.trace.series = Vec::new();
        m
    });
    Read::Parsed(Box::new(parsed))
}

/// Read, parse and verify `paths` (the costly part of a scan: reading the files, JSON parsing
/// and the sha256 over each manifest's canonical form) on up to 8 threads, also with fewer
/// cores: manifests written an hour ago are often no longer in the page cache, and reading them
/// is then largely waiting for the disk (cold, 8 threads read 20,000 manifests about twice as
/// fast as 2 on a 2-core machine; warm, the same). The results in the order of `paths`.
fn read_and_verify(paths: &[&Path]) -> Vec<Read> {
    let threads = paths.len().div_ceil(64).clamp(1, 8);
    if threads == 1 {
        return paths.iter().map(|p| read_one(p)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, Read)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = paths.get(i) else { break };
                        out.push((i, read_one(path)));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a manifest reader thread panicked"))
            .collect()
    });
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Move `path` into `dir` (keeping its name, made unique if taken) and write `<name>.reason`
/// beside it.
pub fn quarantine_file(path: &Path, dir: &Path, reason: &str) -> std::io::Result<Quarantined> {
    std::fs::create_dir_all(dir).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("creating quarantine directory {}: {e}", dir.display()),
        )
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "manifest.json".into());
    let mut target = dir.join(&name);
    let mut n = 1;
    while target.exists() {
        target = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    if std::fs::rename(path, &target).is_err() {
        // Another filesystem (a shared spool): copy, sync, then remove.
        std::fs::copy(path, &target)?;
        std::fs::File::open(&target)?.sync_all()?;
        std::fs::remove_file(path)?;
    }
    let reason_path = PathBuf::from(format!("{}.reason", target.display()));
    std::fs::write(
        &reason_path,
        format!("{reason}\noriginal path: {}\n", path.display()),
    )?;
    Ok(Quarantined {
        from: path.to_path_buf(),
        to: target,
        reason: reason.to_owned(),
    })
}

/// How many manifests are in quarantine (the `.reason` files in `dir`).
pub fn quarantined_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".reason"))
                .count()
        })
        .unwrap_or(0)
}
