//! Collection: read the manifests ergond left in its spool directories, verify them, put the
//! bad ones in quarantine and combine the nodes of each job into one [`JobRecordFull`].
//!
//! Reading and moving files is here; combining manifests is the pure function
//! [`combine`], tested without any files. [`scan_indexed`] skips the files the state's spool
//! index knows unchanged, so that a run reads only what is new.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ergon_protocol::manifest::{ComponentCoverage, Manifest, ManifestError};
use sha2::{Digest, Sha256};

use crate::job::{job_key, EstimatedGap, GpuSummary, GpusUnknown, JobRecordFull, NodeSummary};
use crate::spool::{list_sealed, IndexEntry, Listed, ListedDir, Seals, SpoolIndex, SEAL_AFTER};

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
            components: m.coverage.components,
            gpus_unknown: m.coverage.gpus_unknown.clone(),
            wall: m.wall.clone(),
        })
        .collect();
    let estimates: Vec<EstimatedGap> = sorted
        .iter()
        .flat_map(|m| {
            m.coverage.gaps.iter().filter_map(|g| {
                let e = g.estimate?;
                Some(EstimatedGap {
                    node: m.node.clone(),
                    start_unix_ns: g.start_unix_ns,
                    end_unix_ns: g.end_unix_ns,
                    reason: g.reason.clone(),
                    energy_j: e.energy_j,
                    bound_j: e.bound_j,
                })
            })
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
                mig: g.mig.clone(),
                efficiency: g.efficiency.clone(),
            })
        })
        .collect();
    gpus.sort_by(|a, b| a.node.cmp(&b.node).then(a.index.cmp(&b.index)));
    // The job's nodes as its manifests state them (each node's plugin saw the same list, so
    // each distinct list is expanded once; the longest wins should one differ).
    let mut lists: Vec<&str> = sorted
        .iter()
        .filter_map(|m| m.job.node_list.as_deref())
        .collect();
    lists.sort_unstable();
    lists.dedup();
    let job_nodes: Option<Vec<String>> = lists
        .into_iter()
        .filter_map(|l| ergon_protocol::hostlist::expand(l).ok())
        .max_by_key(Vec::len);
    let reported: std::collections::HashSet<&str> =
        sorted.iter().map(|m| m.node.as_str()).collect();

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
        coverage_components: component_coverage(&sorted),
        gpus_unknown: sorted
            .iter()
            .filter_map(|m| {
                Some(GpusUnknown {
                    node: m.node.clone(),
                    reason: m.coverage.gpus_unknown.clone()?,
                })
            })
            .collect(),
        estimate_bound_j: (!estimates.is_empty())
            .then(|| estimates.iter().map(|e| e.bound_j.max(0.0)).sum()),
        estimates,
        sluid: sorted
            .iter()
            .find_map(|m| m.job.sluid.as_deref())
            .map(str::to_ascii_lowercase),
        nodes_missing: job_nodes
            .iter()
            .flatten()
            .filter(|n| !reported.contains(n.as_str()))
            .cloned()
            .collect(),
        job_nodes,
        footprint: None,
    }
}

/// The job's coverage per component: for each component, the nodes that have it, each node's
/// coverage weighted by its duration (see [`JobRecordFull::coverage_components`]). `None` when
/// no manifest states per-component coverage. A node whose GPUs are unknown has GPU coverage 0
/// whatever its manifest says.
fn component_coverage(nodes: &[&Manifest]) -> Option<ComponentCoverage> {
    if nodes.iter().all(|m| m.coverage.components.is_none()) {
        return None;
    }
    let of = |m: &Manifest| -> ComponentCoverage {
        let mut c = m.coverage.components.unwrap_or(ComponentCoverage {
            // Before schema 4: the node's coverage, for each component it measured.
            gpu: (!m.gpus.is_empty() || m.totals.gpu_j.is_some()).then_some(m.coverage.fraction),
            cpu: m.totals.cpu_j.map(|_| m.coverage.fraction),
            dram: m.totals.dram_j.map(|_| m.coverage.fraction),
        });
        if m.coverage.gpus_unknown.is_some() {
            c.gpu = Some(0.0);
        }
        c
    };
    let per_node: Vec<(f64, ComponentCoverage)> = nodes
        .iter()
        .map(|m| (m.end_unix_ns.saturating_sub(m.start_unix_ns) as f64, of(m)))
        .collect();
    let weighted = |pick: fn(&ComponentCoverage) -> Option<f64>| -> Option<f64> {
        let have: Vec<(f64, f64)> = per_node
            .iter()
            .filter_map(|(d, c)| pick(c).map(|v| (*d, v.clamp(0.0, 1.0))))
            .collect();
        if have.is_empty() {
            return None;
        }
        let total: f64 = have.iter().map(|(d, _)| d).sum();
        Some(if total > 0.0 {
            have.iter().map(|(d, v)| d * v).sum::<f64>() / total
        } else {
            have.iter().map(|(_, v)| v).sum::<f64>() / have.len() as f64
        })
    };
    Some(ComponentCoverage {
        gpu: weighted(|c| c.gpu),
        cpu: weighted(|c| c.cpu),
        dram: weighted(|c| c.dram),
    })
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
    /// The entries of [`Scan::index`] that are not in the index the scan was given as they are
    /// (new files, and files read again that changed): what a run must write to where its
    /// job's entries are kept (for a delivered job, the ledger).
    pub fresh: Vec<IndexedFile>,
    /// Files the index named that this scan found gone or quarantined: their entries go (from
    /// where they are kept).
    pub gone: Vec<String>,
    /// With [`Sealing`]: what the caller needs to seal directories and forget stale seals.
    pub sealing: Option<SealCandidates>,
}

/// Skipping sealed node directories ([`crate::spool::Sealed`]) in a scan with `peek`.
pub struct Sealing<'a> {
    /// The seals.
    pub seals: &'a Seals,
    /// Every index entry kept elsewhere (the ledger) of these jobs: when a job with a file in a
    /// skipped directory is combined again (a late node manifest), its files there are taken
    /// from these entries.
    pub files_of_jobs: MoreIndex<'a>,
}

/// What a scan with [`Sealing`] found of the node directories.
#[derive(Debug, Default)]
pub struct SealCandidates {
    /// Seals of directories the listing did not find (removed): to forget.
    pub stale: Vec<String>,
    /// Directories skipped, and the manifests in them.
    pub skipped: (usize, u64),
    /// Listed directories unchanged for [`SEAL_AFTER`] at the listing, with their manifests
    /// (path, size, modification time): sealed by the caller if every one of them is in the
    /// ledger as listed once the run is over.
    pub candidates: Vec<(ListedDir, Vec<ListedFile>)>,
}

/// A manifest as listed: path, size, modification time (ns).
pub type ListedFile = (String, u64, i64);

/// Index entries kept elsewhere (the ledger: [`crate::ledger`]), asked once per scan for the
/// listed files the given index does not name.
pub type MoreIndex<'a> = &'a mut dyn FnMut(&[&str]) -> std::io::Result<SpoolIndex>;

/// [`scan_indexed`] with an empty index: every file is read.
pub fn scan(
    spools: &[PathBuf],
    quarantine: Option<&Path>,
    settle: Duration,
) -> std::io::Result<Scan> {
    scan_indexed(spools, quarantine, settle, &SpoolIndex::new())
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
///
/// This is [`scan_streaming`] without peeking: every new file is read before any job is
/// grouped, and the jobs are returned together in [`Scan::jobs`].
pub fn scan_indexed(
    spools: &[PathBuf],
    quarantine: Option<&Path>,
    settle: Duration,
    index: &SpoolIndex,
) -> std::io::Result<Scan> {
    scan_indexed_more(spools, quarantine, settle, index, None)
}

/// [`scan_indexed`], with the index entries `more` has of the files `index` does not name.
pub fn scan_indexed_more(
    spools: &[PathBuf],
    quarantine: Option<&Path>,
    settle: Duration,
    index: &SpoolIndex,
    more: Option<MoreIndex<'_>>,
) -> std::io::Result<Scan> {
    let mut jobs = BTreeMap::new();
    let mut scan = scan_streaming(
        spools,
        quarantine,
        settle,
        index,
        more,
        false,
        None,
        |found| {
            if let Streamed::Job(job, manifests) = found {
                jobs.insert(job, manifests);
            }
            Ok::<(), std::io::Error>(())
        },
    )?;
    scan.jobs = jobs;
    Ok(scan)
}

/// Bring in the files in skipped (sealed) directories of the jobs that new files belong to
/// (from their heads, kept in `peeked` for the scan): such a job is combined again, and needs
/// all its manifests. Their entries, from `files_of_jobs`, join `extra` (they are known and
/// unchanged unless they changed since); the files go where the listing would have put them.
fn bring_in_skipped(
    files: &mut Vec<Listed>,
    dirs: &[ListedDir],
    index: &SpoolIndex,
    extra: &mut SpoolIndex,
    peeked: &mut BTreeMap<PathBuf, Option<String>>,
    files_of_jobs: MoreIndex<'_>,
) -> std::io::Result<()> {
    let skipped: BTreeMap<&str, usize> = dirs
        .iter()
        .filter(|d| d.skipped)
        .map(|d| (d.path.as_str(), d.at))
        .collect();
    if skipped.is_empty() {
        return Ok(());
    }
    let new: Vec<PathBuf> = files
        .iter()
        .filter(|f| {
            f.key
                .as_ref()
                .is_none_or(|k| !index.contains_key(k) && !extra.contains_key(k))
        })
        .map(|f| f.path.clone())
        .collect();
    let mut jobs: BTreeSet<String> = BTreeSet::new();
    parallel_each(
        new.len(),
        |k| peek_job(&new[k]),
        |k, job| {
            if let Some(j) = &job {
                jobs.insert(j.clone());
            }
            peeked.insert(new[k].clone(), job);
            Ok::<(), std::io::Error>(())
        },
    )?;
    if jobs.is_empty() {
        return Ok(());
    }
    let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    let mut add: Vec<(usize, Listed)> = Vec::new();
    for (path, entry) in files_of_jobs(&jobs)? {
        let at = Path::new(&path)
            .parent()
            .and_then(Path::to_str)
            .and_then(|d| skipped.get(d));
        let Some(&at) = at else {
            continue;
        };
        if let Some(listed) = crate::spool::stat_listed(PathBuf::from(&path)) {
            add.push((at, listed));
            extra.insert(path, entry);
        }
    }
    if add.is_empty() {
        return Ok(());
    }
    tracing::debug!(
        "{} manifests of {} jobs combined again taken from sealed directories",
        add.len(),
        jobs.len()
    );
    add.sort_by(|a, b| (a.0, &a.1.path).cmp(&(b.0, &b.1.path)));
    let old = std::mem::take(files);
    let mut add = add.into_iter().peekable();
    for (i, f) in old.into_iter().enumerate() {
        while let Some((_, listed)) = add.next_if(|(at, _)| *at <= i) {
            files.push(listed);
        }
        files.push(f);
    }
    files.extend(add.map(|(_, listed)| listed));
    Ok(())
}

/// What [`scan_streaming`] hands its caller while it scans.
#[derive(Debug)]
pub enum Streamed {
    /// Sent once, before any job: how many jobs the scan expects to hand over (the jobs with a
    /// new file that have settled, as far as known before reading the files).
    Planned(usize),
    /// A job whose files in this scan have all been read: every verified manifest of it, one per
    /// node (as in [`Scan::jobs`]). Each job is handed over at most once per scan.
    Job(String, Vec<FoundManifest>),
}

/// Where a listed file stands.
enum Outcome {
    /// Not (yet) read: known from the index, or not needed.
    Unread,
    /// Gone, unreadable or quarantined: not a manifest of any job this run.
    Dropped,
    /// Read and verified.
    Good(Box<Manifest>),
    /// Read and verified, and handed over in its job.
    Taken,
    /// Read and verified, but of a job already handed over (its head named another job): left
    /// for the next run, which combines the job again with it. Not indexed.
    Late,
}

/// [`scan_indexed`], handing each job to `on` as soon as all of its files have been read, so
/// that the caller can deliver the first jobs while later files are still being read.
///
/// **Grouping.** A job must be handed over with all its manifests in the spools, so the scan
/// must know which files belong to a job before it has read them all. It knows it for files in
/// the index (the job is in the entry) and, with `peek`, for new files from their first bytes
/// (`"cluster"` and `"job_id"`, which ergond writes near the top: [`peek_job`]); a file whose
/// head does not say is read before anything is handed over. The files are then read in spool
/// order, and a job is handed over when the last of its files has been read and verified (for
/// ergond's file names, `<cluster>-<job>-<node>.json`, a job's files are next to each other in
/// a spool). The job a file really belongs to is taken from its verified content, as without
/// peeking: a file whose head named another job joins its real job; if that job was already
/// handed over in this scan the file is left for the next run ([`Outcome::Late`]: not indexed,
/// so the next run reads it and combines the job again, as for a late node manifest). Files
/// whose content cannot disagree with their heads (ergond's) never take that path.
///
/// Jobs that could not be handed over while reading (a head that named another job, or a job
/// spread over several spools) are handed over at the end. The return value is as for
/// [`scan_indexed`], with [`Scan::jobs`] empty. An error from `on` stops the scan and is
/// returned.
#[allow(clippy::too_many_arguments)]
pub fn scan_streaming<E: From<std::io::Error>>(
    spools: &[PathBuf],
    quarantine: Option<&Path>,
    settle: Duration,
    index: &SpoolIndex,
    more: Option<MoreIndex<'_>>,
    peek: bool,
    sealing: Option<Sealing<'_>>,
    mut on: impl FnMut(Streamed) -> Result<(), E>,
) -> Result<Scan, E> {
    static NO_SEALS: Seals = Seals::new();
    let mut scan = Scan::default();
    // Sealed directories are skipped only with `peek`: the jobs of new files must be known
    // before reading, to bring in their files from skipped directories.
    let sealing = sealing.filter(|_| peek);
    // 1. List, in spool order then name order (the order decides between two manifests of
    //    one node), with the size and modification time taken before any read.
    let listed_at = SystemTime::now();
    let listing = list_sealed(spools, sealing.as_ref().map_or(&NO_SEALS, |s| s.seals))?;
    let mut files = listing.files;
    // The entries kept elsewhere of the files `index` does not name (one lookup).
    let mut extra: SpoolIndex = match more {
        Some(more) => {
            let keys: Vec<&str> = files
                .iter()
                .filter_map(|f| f.key.as_deref())
                .filter(|k| !index.contains_key(*k))
                .collect();
            more(&keys)?
        }
        None => SpoolIndex::new(),
    };
    // The jobs of new files, from their heads (with `peek`), by path.
    let mut peeked: BTreeMap<PathBuf, Option<String>> = BTreeMap::new();
    if let Some(sealing) = sealing {
        let mut found = SealCandidates::default();
        let old_enough = |d: &ListedDir| {
            let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(d.mtime_ns.max(0) as u64);
            listed_at
                .duration_since(mtime)
                .is_ok_and(|age| age >= SEAL_AFTER)
        };
        let seen: BTreeSet<&str> = listing.dirs.iter().map(|d| d.path.as_str()).collect();
        found.stale = sealing
            .seals
            .keys()
            .filter(|k| !seen.contains(k.as_str()))
            .cloned()
            .collect();
        for d in &listing.dirs {
            if d.skipped {
                found.skipped.0 += 1;
                found.skipped.1 += d.files;
            } else if d.files > 0 && old_enough(d) {
                let mine = files[d.at..d.at + d.files as usize]
                    .iter()
                    .filter_map(|f| Some((f.key.clone()?, f.size, f.mtime_ns)))
                    .collect::<Vec<_>>();
                found.candidates.push((d.clone(), mine));
            }
        }
        scan.sealing = Some(found);
        bring_in_skipped(
            &mut files,
            &listing.dirs,
            index,
            &mut extra,
            &mut peeked,
            sealing.files_of_jobs,
        )?;
    }
    let indexed = |f: &Listed| {
        f.key
            .as_ref()
            .and_then(|k| index.get(k).or_else(|| extra.get(k)))
    };
    let unchanged =
        |f: &Listed| indexed(f).filter(|e| e.size == f.size && e.mtime_ns == f.mtime_ns);
    let n = files.len();
    let mut outcome: Vec<Outcome> = (0..n).map(|_| Outcome::Unread).collect();
    // The job of each file, by content: from the index for unchanged files, from the verified
    // manifest for the files read. `None` until known.
    let mut job_of: Vec<Option<String>> = files
        .iter()
        .map(|f| unchanged(f).map(|e| e.job.clone()))
        .collect();
    let mut hash_of: Vec<Option<String>> = vec![None; n];
    let to_read: Vec<usize> = (0..n).filter(|&i| job_of[i].is_none()).collect();

    // 2. The job each file to read is expected to hold: a changed file in the index holds the
    //    job of its entry (or it fails verification against the entry's hash and is
    //    quarantined); a new file, what its head says (with `peek`).
    let mut hint: Vec<Option<String>> = vec![None; n];
    for &i in &to_read {
        hint[i] = indexed(&files[i]).map(|e| e.job.clone());
    }
    if peek {
        for &i in &to_read {
            if let Some(job) = peeked.get(&files[i].path) {
                hint[i] = job.clone();
            }
        }
        let new: Vec<usize> = to_read
            .iter()
            .copied()
            .filter(|&i| hint[i].is_none() && !peeked.contains_key(&files[i].path))
            .collect();
        let paths: Vec<&Path> = new.iter().map(|&i| files[i].path.as_path()).collect();
        parallel_each(
            paths.len(),
            |k| peek_job(paths[k]),
            |k, job| {
                hint[new[k]] = job;
                Ok::<(), std::io::Error>(())
            },
        )?;
    }

    let mut reads = 0usize;
    // Read a file and record what it holds.
    let mut take = |scan: &mut Scan,
                    i: usize,
                    read: Read,
                    outcome: &mut [Outcome],
                    job_of: &mut [Option<String>],
                    hash_of: &mut [Option<String>]|
     -> std::io::Result<()> {
        let f = &files[i];
        reads += 1;
        match check(scan, f, read, indexed(f), quarantine)? {
            Some(manifest) => {
                job_of[i] = Some(job_key(&manifest.cluster, manifest.job.job_id));
                hash_of[i] = Some(manifest.content_hash.clone());
                outcome[i] = Outcome::Good(Box::new(manifest));
            }
            None => outcome[i] = Outcome::Dropped,
        }
        Ok(())
    };

    // 3. Read the files whose job is not known at all (without `peek`: every file to read).
    let blind: Vec<usize> = to_read
        .iter()
        .copied()
        .filter(|&i| hint[i].is_none())
        .collect();
    let paths: Vec<&Path> = blind.iter().map(|&i| files[i].path.as_path()).collect();
    parallel_each(
        paths.len(),
        |k| read_one(paths[k]),
        |k, read| {
            take(
                &mut scan,
                blind[k],
                read,
                &mut outcome,
                &mut job_of,
                &mut hash_of,
            )
        },
    )?;

    // 4. Plan: the jobs with a new file (as far as known), those that have settled (a job is
    //    collected once its newest file is `settle` old), and for these the files still to
    //    read: their unread new files and their files in the index, to combine them.
    let now = SystemTime::now();
    let is_settled = |newest: SystemTime| now.duration_since(newest).is_ok_and(|a| a >= settle);
    let expected =
        |i: usize, job_of: &[Option<String>]| job_of[i].clone().or_else(|| hint[i].clone());
    let mut newest: BTreeMap<String, SystemTime> = BTreeMap::new();
    let mut affected: BTreeSet<String> = BTreeSet::new();
    for (i, f) in files.iter().enumerate() {
        if indexed(f).is_none() && !matches!(outcome[i], Outcome::Dropped) {
            if let Some(job) = expected(i, &job_of) {
                affected.insert(job);
            }
        }
    }
    for (i, f) in files.iter().enumerate() {
        if matches!(outcome[i], Outcome::Dropped) {
            continue;
        }
        if let Some(job) = expected(i, &job_of).filter(|j| affected.contains(j)) {
            let t = newest.entry(job).or_insert(f.mtime);
            *t = (*t).max(f.mtime);
        }
    }
    let planned: BTreeSet<String> = newest
        .into_iter()
        .filter(|(_, t)| is_settled(*t))
        .map(|(job, _)| job)
        .collect();
    let plan: Vec<usize> = (0..n)
        .filter(|&i| match outcome[i] {
            Outcome::Unread => {
                job_of[i].is_none() || job_of[i].as_ref().is_some_and(|j| planned.contains(j))
            }
            _ => false,
        })
        .collect();
    // The files of each planned job still to read.
    let mut remaining: BTreeMap<String, usize> = planned.iter().map(|j| (j.clone(), 0)).collect();
    for &i in &plan {
        if let Some(r) = expected(i, &job_of).and_then(|j| remaining.get_mut(&j)) {
            *r += 1;
        }
    }
    on(Streamed::Planned(planned.len()))?;

    // The files of each job by content, in listing order (known ones now, read ones as read).
    let mut files_of: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, job) in job_of.iter().enumerate() {
        if let Some(job) = job {
            files_of.entry(job.clone()).or_default().push(i);
        }
    }
    let mut handed: BTreeSet<String> = BTreeSet::new();
    // Hand `job` over if it has a new file and has settled, judged on the files it holds
    // (some files may have been quarantined, or may have turned out to be of another job).
    let hand = |job: &str,
                files_of: &BTreeMap<String, Vec<usize>>,
                outcome: &mut [Outcome],
                handed: &mut BTreeSet<String>|
     -> Option<Vec<FoundManifest>> {
        let mine = files_of.get(job)?;
        let live = || {
            mine.iter()
                .filter(|&&i| matches!(outcome[i], Outcome::Unread | Outcome::Good(_)))
        };
        let new = live().any(|&i| indexed(&files[i]).is_none());
        let newest = live().map(|&i| files[i].mtime).max()?;
        if !new || !is_settled(newest) {
            return None;
        }
        let mut found = Scan::default();
        for &i in mine {
            if let Outcome::Good(_) = outcome[i] {
                let Outcome::Good(m) = std::mem::replace(&mut outcome[i], Outcome::Taken) else {
                    unreachable!()
                };
                add_found(&mut found, job, files[i].path.clone(), *m);
            }
        }
        handed.insert(job.to_owned());
        found.jobs.remove(job)
    };

    // Jobs with nothing left to read go at once.
    let ready: Vec<String> = remaining
        .iter()
        .filter(|(_, r)| **r == 0)
        .map(|(j, _)| j.clone())
        .collect();
    for job in ready {
        if let Some(found) = hand(&job, &files_of, &mut outcome, &mut handed) {
            on(Streamed::Job(job, found))?;
        }
    }

    // 5. Read the plan in listing order; hand each job over when its last file is in.
    let paths: Vec<&Path> = plan.iter().map(|&i| files[i].path.as_path()).collect();
    parallel_each(
        paths.len(),
        |k| read_one(paths[k]),
        |k, read| -> Result<(), E> {
            let i = plan[k];
            let expected_job = expected(i, &job_of);
            let known = job_of[i].is_some();
            take(&mut scan, i, read, &mut outcome, &mut job_of, &mut hash_of)?;
            if let Some(job) = job_of[i].clone().filter(|_| !known) {
                if Some(&job) != expected_job.as_ref() && handed.contains(&job) {
                    // Its head named another job, and that job has been handed over.
                    {
                        tracing::warn!(
                            "manifest {} is of job {job}, already collected by this run (its first bytes named {}): left for the next run",
                            files[i].path.display(),
                            expected_job.as_deref().unwrap_or("no job")
                        );
                        outcome[i] = Outcome::Late;
                    }
                } else {
                    // Its job (usually the one its head named; if not, its real one, which
                    // has not been handed over yet).
                    files_of.entry(job).or_default().push(i);
                }
            }
            if let Some(job) = expected_job {
                if let Some(r) = remaining.get_mut(&job) {
                    *r -= 1;
                    if *r == 0 && !handed.contains(&job) {
                        if let Some(v) = files_of.get_mut(&job) {
                            v.sort_unstable();
                        }
                        if let Some(found) = hand(&job, &files_of, &mut outcome, &mut handed) {
                            on(Streamed::Job(job, found))?;
                        }
                    }
                }
            }
            Ok(())
        },
    )?;

    // 6. The rest: jobs that now have a new file and have settled but were not handed over
    //    (a file whose head named another job): read their other files and hand them over.
    let mut rest: Vec<String> = Vec::new();
    for (job, mine) in files_of.iter_mut() {
        mine.sort_unstable();
        if handed.contains(job) {
            continue;
        }
        let live = mine
            .iter()
            .filter(|&&i| matches!(outcome[i], Outcome::Unread | Outcome::Good(_)));
        let mut new = false;
        let mut newest = None;
        for &i in live {
            new |= indexed(&files[i]).is_none();
            newest = newest.max(Some(files[i].mtime));
        }
        if new && newest.is_some_and(is_settled) {
            rest.push(job.clone());
        }
    }
    let again: Vec<usize> = rest
        .iter()
        .flat_map(|j| files_of[j].iter().copied())
        .filter(|&i| matches!(outcome[i], Outcome::Unread))
        .collect();
    let paths: Vec<&Path> = again.iter().map(|&i| files[i].path.as_path()).collect();
    parallel_each(
        paths.len(),
        |k| read_one(paths[k]),
        |k, read| {
            take(
                &mut scan,
                again[k],
                read,
                &mut outcome,
                &mut job_of,
                &mut hash_of,
            )
        },
    )?;
    for job in rest {
        if let Some(found) = hand(&job, &files_of, &mut outcome, &mut handed) {
            on(Streamed::Job(job, found))?;
        }
    }
    scan.read = reads;
    scan.known = n - reads;

    // 7. Jobs with a new file that have not settled; list what the index may keep.
    let mut unsettled: BTreeSet<&str> = BTreeSet::new();
    for (i, f) in files.iter().enumerate() {
        if indexed(f).is_none() && matches!(outcome[i], Outcome::Good(_) | Outcome::Taken) {
            if let Some(job) = job_of[i].as_deref().filter(|j| !handed.contains(*j)) {
                unsettled.insert(job);
            }
        }
    }
    scan.unsettled = unsettled.len();
    for (i, f) in files.iter().enumerate() {
        // (A dropped file's job is never known: only read, good files have one.)
        if matches!(outcome[i], Outcome::Dropped) {
            if let (Some(k), Some(_)) = (&f.key, indexed(f)) {
                scan.gone.push(k.clone());
            }
        }
        let Some(job) = job_of[i].as_ref() else {
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
        match outcome[i] {
            Outcome::Dropped | Outcome::Late => {}
            Outcome::Unread => {
                // Known and unchanged, of a job not collected this run.
                if let Some(e) = unchanged(f) {
                    scan.index.push(entry(e.content_hash.clone()));
                }
            }
            Outcome::Good(_) | Outcome::Taken => {
                // New files of a job that has not settled are read again next run.
                let new_and_unsettled = unsettled.contains(job.as_str()) && indexed(f).is_none();
                if f.key.is_some() && !new_and_unsettled {
                    if let Some(hash) = hash_of[i].clone() {
                        let e = entry(hash);
                        if indexed(f) != Some(&e.entry) {
                            scan.fresh.push(e.clone());
                        }
                        scan.index.push(e);
                    }
                }
            }
        }
    }
    Ok(scan)
}

/// The job (`cluster/job`) a manifest file's first bytes name, without reading the rest: the
/// first `"cluster": "…"` and `"job_id": N` in its first 1 KiB (ergond writes `schema_version`,
/// `cluster`, `node`, then `job` with `job_id` first, in the first ~200 bytes). `None` when
/// they are not there, or the cluster name has an escape. Only a hint: the job a file belongs
/// to is what its verified content says ([`scan_streaming`]).
pub fn peek_job(path: &Path) -> Option<String> {
    // Decompressed for a `.json.gz`: only its first block is inflated.
    let head = crate::spool::read_manifest_head(path, 1024).ok()?;
    peek_head(&head)
}

/// [`peek_job`] on bytes.
pub fn peek_head(head: &[u8]) -> Option<String> {
    fn value_after<'a>(head: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
        let at = head.windows(key.len()).position(|w| w == key)? + key.len();
        let rest = &head[at..];
        let rest = rest.trim_ascii_start().strip_prefix(b":")?;
        Some(rest.trim_ascii_start())
    }
    let cluster = value_after(head, b"\"cluster\"")?.strip_prefix(b"\"")?;
    let end = cluster.iter().position(|&b| b == b'"' || b == b'\\')?;
    if cluster[end] != b'"' {
        return None;
    }
    let cluster = std::str::from_utf8(&cluster[..end]).ok()?;
    let id = value_after(head, b"\"job_id\"")?;
    let digits = id.iter().take_while(|b| b.is_ascii_digit()).count();
    // The number must end inside the head (a cut-off number would be another job).
    if digits == 0 || digits == id.len() {
        return None;
    }
    let job: u32 = std::str::from_utf8(&id[..digits]).ok()?.parse().ok()?;
    Some(job_key(cluster, job))
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
        Read::Corrupt(reason) => reason,
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
    /// A compressed file that does not decompress: bad for good, like bad JSON.
    Corrupt(String),
    /// Read; parsed and verified (or why not).
    Parsed(Box<Result<Manifest, ManifestError>>),
}

fn read_one(path: &Path) -> Read {
    let bytes = match crate::spool::read_manifest(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Gone,
        Err(e)
            if path.to_str().is_some_and(|p| p.ends_with(".gz"))
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData
                        | std::io::ErrorKind::InvalidInput
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
        {
            return Read::Corrupt(format!(
                "not a valid gzip-compressed manifest: {e}; the file may be truncated or not an ergon manifest"
            ))
        }
        Err(e) => return Read::Failed(e),
    };
    let parsed = Manifest::from_json(&bytes).map(|mut m| {
        // The power trace is not part of the job record: only its sum over the node's series
        // is kept (the shape the job's CO2e and cost are computed over, crate::carbon), so
        // that a large backlog's memory stays small (`ergon report` and `ergon plot` read the
        // series from the file).
        m.trace.series = if KEEP_TRACE_SUM.load(std::sync::atomic::Ordering::Relaxed) {
            sum_trace(&m.trace.series)
        } else {
            Vec::new()
        };
        m
    });
    Read::Parsed(Box::new(parsed))
}

/// Whether scans keep each manifest's summed trace (set by `ergon run` when `[carbon]` or
/// `[cost]` is configured: up to 2.4 kB a manifest while its job waits to be collected).
static KEEP_TRACE_SUM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keep (or drop) the summed power trace of the manifests scans read.
pub fn keep_trace_sum(keep: bool) {
    KEEP_TRACE_SUM.store(keep, std::sync::atomic::Ordering::Relaxed);
}

/// The series summed bin by bin (a bin counts the series that have it), as one series
/// `"sum"`; nothing for no series.
pub fn sum_trace(
    series: &[ergon_protocol::manifest::TraceSeries],
) -> Vec<ergon_protocol::manifest::TraceSeries> {
    let len = series.iter().map(|s| s.watts.len()).max().unwrap_or(0);
    if len == 0 {
        return Vec::new();
    }
    let mut sum = vec![0f32; len];
    for s in series {
        for (acc, w) in sum.iter_mut().zip(&s.watts) {
            *acc += w.max(0.0);
        }
    }
    vec![ergon_protocol::manifest::TraceSeries {
        name: "sum".into(),
        watts: sum,
    }]
}

/// Run `work` on the items `0..n` on up to 8 threads and hand the results to `consume` on the
/// calling thread, in item order, as they come (a result waits only for those before it).
/// Reading, parsing and verifying manifests is the costly part of a scan: reading the files,
/// JSON parsing and the sha256 over each manifest's canonical form. Up to 8 threads also with
/// fewer cores: manifests written an hour ago are often no longer in the page cache, and
/// reading them is then largely waiting for the disk (cold, 8 threads read 20,000 manifests
/// about twice as fast as 2 on a 2-core machine; warm, the same). An error from `consume` stops
/// the workers and is returned.
fn parallel_each<T: Send, E>(
    n: usize,
    work: impl Fn(usize) -> T + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let threads = n.div_ceil(64).clamp(1, 8);
    if threads == 1 {
        for i in 0..n {
            consume(i, work(i))?;
        }
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // Bounded, so that the readers stay at most a few hundred files ahead of `consume`.
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, T)>(256);
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, stop, work) = (&next, &stop, &work);
            s.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || tx.send((i, work(i))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut waiting: BTreeMap<usize, T> = BTreeMap::new();
        let mut due = 0;
        let result = (|| {
            for (i, t) in rx.iter() {
                waiting.insert(i, t);
                while let Some(t) = waiting.remove(&due) {
                    consume(due, t)?;
                    due += 1;
                }
            }
            Ok(())
        })();
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // Dropping the receiver ends the workers blocked on a full channel.
        drop(rx);
        result
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_missing_nodes_is_combined_from_what_reported_and_says_so() {
        use ergon_protocol::testing::ManifestBuilder;
        let all = ["n1", "n2", "n3"];
        let node = |n: &str| {
            ManifestBuilder::new("c", 7, n)
                .span(0, 10_000_000_000)
                .gpu(Some(1000.0))
                .nodes(&all)
                .build()
        };
        let two = combine(&[node("n2"), node("n1")]);
        assert_eq!(two.job_nodes.as_deref(), Some(&all.map(String::from)[..]));
        assert_eq!(two.nodes_missing, vec!["n3".to_owned()]);
        assert_eq!(two.gpu_j, Some(2000.0), "nothing invented for n3");
        let rec = two.sacct_record();
        assert_eq!((rec.nodes, rec.nodes_expected), (2, Some(3)));
        // The late manifest arrives: complete, and a different job hash (the record is replaced).
        let three = combine(&[node("n3"), node("n1"), node("n2")]);
        assert!(three.nodes_missing.is_empty());
        assert_eq!(three.sacct_record().nodes_expected, None);
        assert_ne!(three.job_hash, two.job_hash);
        // Manifests that do not name the job's nodes (schema 4): nothing is said missing.
        let old = combine(&[ManifestBuilder::new("c", 8, "n1").build()]);
        assert!(old.job_nodes.is_none() && old.nodes_missing.is_empty());
        assert_eq!(old.sacct_record().nodes_expected, None);
    }

    #[test]
    fn the_head_names_the_job_or_nothing() {
        let pretty = b"{\n  \"schema_version\": 2,\n  \"cluster\": \"c-1\",\n  \"node\": \"n1\",\n  \"job\": {\n    \"job_id\": 42,\n    \"array_job_id\": 7,";
        assert_eq!(peek_head(pretty).as_deref(), Some("c-1/42"));
        let compact =
            br#"{"schema_version":2,"cluster":"c","node":"n","job":{"array_job_id":7,"job_id":5}}"#;
        assert_eq!(peek_head(compact).as_deref(), Some("c/5"));
        // An escape in the cluster name, a number cut off by the end of the head, or no job:
        // not known (the file is then read before anything is handed over).
        assert_eq!(peek_head(br#"{"cluster":"a\"b","job":{"job_id":1}}"#), None);
        assert_eq!(peek_head(br#"{"cluster":"c","job":{"job_id":12"#), None);
        assert_eq!(peek_head(br#"{"cluster":"c","node":"n"}"#), None);
        assert_eq!(peek_head(b"not json"), None);
    }
}
