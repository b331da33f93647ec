//! Collection: read the manifests ergond left in its spool directories, verify them, put the
//! bad ones in quarantine and combine the nodes of each job into one [`JobRecordFull`].
//!
//! Reading and moving files is here; combining manifests is the pure function
//! [`combine`], tested without any files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ergon_protocol::manifest::{EnergyMethod, Manifest, ManifestError};
use ergon_protocol::record::JobRecord;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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

/// What one pass over the spools found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Verified manifests grouped by `cluster/job`.
    pub jobs: BTreeMap<String, Vec<FoundManifest>>,
    /// Manifests put in quarantine by this scan.
    pub quarantined: Vec<Quarantined>,
    /// Jobs left for a later run because a manifest of theirs changed less than `settle` ago
    /// (another node's manifest may still be coming).
    pub unsettled: usize,
}

/// Read every `*.json` file directly in each spool directory (temporary files that ergond is
/// still writing, `.*` and `*.tmp`, are skipped), verify it, quarantine the bad ones, and group the
/// good ones by job. Jobs with a manifest modified less than `settle` ago are left out (counted in
/// [`Scan::unsettled`]).
///
/// With `quarantine` `None` (a dry run) bad manifests are reported but not moved.
pub fn scan(
    spools: &[PathBuf],
    quarantine: Option<&Path>,
    settle: Duration,
) -> std::io::Result<Scan> {
    let mut scan = Scan::default();
    let mut newest: BTreeMap<String, SystemTime> = BTreeMap::new();
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
                !name.starts_with('.') && name.ends_with(".json") && p.is_file()
            })
            .collect();
        paths.sort();
        for (path, read) in paths.iter().zip(read_and_verify(&paths)) {
            let path = path.clone();
            let (parsed, mtime) = match read {
                Read::Gone => continue,
                Read::Failed(e) => {
                    tracing::warn!("cannot read manifest {}: {e}; skipped", path.display());
                    continue;
                }
                Read::Parsed(parsed, mtime) => (*parsed, mtime),
            };
            match parsed {
                Ok(manifest) => {
                    let key = job_key(&manifest.cluster, manifest.job.job_id);
                    let n = newest.entry(key.clone()).or_insert(mtime);
                    *n = (*n).max(mtime);
                    let found = scan.jobs.entry(key).or_default();
                    // The same manifest seen twice (a local spool and its copy on a shared
                    // filesystem) counts once; two different manifests of one node (a
                    // rewritten one) count once too: the more complete, then the later.
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
                Err(e) => {
                    let Some(quarantine) = quarantine else {
                        tracing::warn!("bad manifest {} (dry run: not moved): {e}", path.display());
                        scan.quarantined.push(Quarantined {
                            from: path.clone(),
                            to: path,
                            reason: e.to_string(),
                        });
                        continue;
                    };
                    let q = quarantine_file(&path, quarantine, &e.to_string())?;
                    tracing::warn!(
                        "quarantined manifest {} as {}: {}",
                        q.from.display(),
                        q.to.display(),
                        q.reason
                    );
                    scan.quarantined.push(q);
                }
            }
        }
    }
    let now = SystemTime::now();
    scan.jobs.retain(|key, _| {
        let settled = newest
            .get(key)
            .and_then(|t| now.duration_since(*t).ok())
            .is_some_and(|age| age >= settle);
        if !settled {
            scan.unsettled += 1;
        }
        settled
    });
    Ok(scan)
}

/// What reading one manifest file gave.
enum Read {
    /// The file went away between listing and reading.
    Gone,
    /// It could not be read.
    Failed(std::io::Error),
    /// Read; parsed and verified (or why not), and its modification time.
    Parsed(Box<Result<Manifest, ManifestError>>, SystemTime),
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
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Read::Parsed(Box::new(parsed), mtime)
}

/// Read, parse and verify `paths` (the costly part of a scan: JSON parsing and the sha256 over
/// each manifest's canonical form) on up to 8 threads; the results in the order of `paths`.
fn read_and_verify(paths: &[PathBuf]) -> Vec<Read> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(paths.len().div_ceil(64).max(1));
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
