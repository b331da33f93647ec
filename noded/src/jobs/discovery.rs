//! Finding the Slurm jobs already running when ergond starts, from their cgroups and their
//! processes' environment.
//!
//! slurmstepd puts every job in a cgroup with one child per step (`step_batch`, `step_extern`,
//! `step_0`, …):
//!
//! | layout | job directory |
//! |---|---|
//! | cgroup v1 | `<root>/cpuacct/slurm[_<node>]/uid_<uid>/job_<id>` |
//! | cgroup v2, Slurm < 26.05, or 26.05+ with `CgroupJobIdPaths=yes` | `<root>/…/[<node>_]slurmstepd.scope/job_<id>` |
//! | cgroup v2, Slurm 26.05+ default | `<root>/…/[<node>_]slurmstepd.scope/<SLUID>` (e.g. `sEKNKTV3WPV500`) |
//!
//! [`scan`] lists the job directories by name only (cheap: the lost-job reaper runs it);
//! [`find_jobs`] also reads what each job's own processes say about it: the environment
//! slurmstepd gave its tasks (`/proc/<pid>/environ` of the pids in the step cgroups:
//! `SLURM_JOB_ID`, `SLURM_JOB_SLUID`, `SLURM_JOB_GPUS`, `CUDA_VISIBLE_DEVICES`, user, account,
//! partition, cluster, array ids), its CPUs (cpuset) and, where the device cgroup is
//! restrictive, the NVIDIA device minors it allows (v1 `devices.list`, character major 195).
//! A SLUID directory is named by the environment's `SLURM_JOB_ID`; one whose processes show no
//! environment cannot be named and is skipped (logged).
//!
//! Which GPUs a found job holds is decided in [`super::recovery::discover`]: the environment's
//! `SLURM_JOB_GPUS` (Slurm's gres.conf indices, mapped to minors through gres.conf as the
//! plugin does) or UUIDs in `CUDA_VISIBLE_DEVICES` (gres.conf `Flags=env_uuid`), else a
//! restrictive device list; where none of these can be read the job's GPUs are *unknown*, and
//! its manifest says so — never an empty list that would look like a CPU-only job. (On Slurm
//! 22.05 with cgroup v1 the job and step `devices.list` read `a *:* rwm`: they say nothing.)
//!
//! The walk is bounded ([`MAX_DIRS`] directories, [`MAX_DEPTH`] levels, [`MAX_PIDS`] processes
//! and [`MAX_ENVIRON_BYTES`] of environment per job) and follows no symlink.

use std::io::Read;
use std::path::{Path, PathBuf};

use ergon_protocol::{CpuSet, StepId};

use crate::sources::cgroup::{CgroupHierarchy, CgroupVersion};

/// Directories visited at most.
pub const MAX_DIRS: usize = 100_000;
/// Levels below the hierarchy's root searched at most.
pub const MAX_DEPTH: usize = 6;
/// Processes of one job whose environment is read at most.
pub const MAX_PIDS: usize = 32;
/// Bytes of one process's environment read at most.
pub const MAX_ENVIRON_BYTES: u64 = 256 * 1024;
/// Character major of NVIDIA GPUs (`/dev/nvidiaN`).
pub const NVIDIA_MAJOR: u32 = ergon_gres::NVIDIA_MAJOR;

/// How a job's cgroup directory names its job.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum JobKey {
    /// `job_<id>`.
    Id(u32),
    /// A SLUID (Slurm 26.05+ cgroup v2 default), as named (uppercase).
    Sluid(String),
}

/// A job's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir {
    /// What names it.
    pub key: JobKey,
    /// Relative to the hierarchy (as the sampler's paths are).
    pub rel: String,
    /// Owner, from a `uid_<uid>` ancestor (v1), if any.
    pub uid: Option<u32>,
    /// Its steps and their cgroups (relative paths).
    pub steps: Vec<(StepId, String)>,
}

/// What [`scan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Job directories with at least one step.
    pub jobs: Vec<JobDir>,
    /// Whether Slurm's cgroup tree is there at all (a `slurm*` directory under v1's cpuacct, a
    /// `*slurmstepd.scope` under v2): without it, a missing job directory says nothing.
    pub slurm_tree: bool,
}

/// What a job's own processes say about it: the environment slurmstepd set for its tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobEnv {
    /// `SLURM_JOB_ID`.
    pub job_id: Option<u32>,
    /// `SLURM_JOB_SLUID`, lowercase.
    pub sluid: Option<String>,
    /// `SLURM_JOB_UID`.
    pub uid: Option<u32>,
    /// `SLURM_JOB_USER`.
    pub user: Option<String>,
    /// `SLURM_JOB_ACCOUNT`.
    pub account: Option<String>,
    /// `SLURM_JOB_PARTITION`.
    pub partition: Option<String>,
    /// `SLURM_CLUSTER_NAME`.
    pub cluster: Option<String>,
    /// `SLURMD_NODENAME`.
    pub node: Option<String>,
    /// `SLURM_ARRAY_JOB_ID`.
    pub array_job_id: Option<u32>,
    /// `SLURM_ARRAY_TASK_ID`.
    pub array_task_id: Option<u32>,
    /// `SLURM_JOB_GPUS`: gres.conf indices of the job's GPUs on this node.
    pub job_gpus: Option<String>,
    /// `CUDA_VISIBLE_DEVICES` (UUIDs with gres.conf `Flags=env_uuid`).
    pub cuda_visible_devices: Option<String>,
}

impl JobEnv {
    /// Parse a `/proc/<pid>/environ` (NUL-separated `NAME=value`).
    pub fn parse(environ: &[u8]) -> JobEnv {
        let mut env = JobEnv::default();
        for entry in environ.split(|&b| b == 0) {
            let Ok(entry) = std::str::from_utf8(entry) else {
                continue;
            };
            let Some((name, value)) = entry.split_once('=') else {
                continue;
            };
            let text = || Some(value.to_owned()).filter(|v| !v.is_empty());
            let num = || value.trim().parse().ok();
            match name {
                "SLURM_JOB_ID" => env.job_id = num(),
                "SLURM_JOB_SLUID" => env.sluid = text().map(|s| s.to_ascii_lowercase()),
                "SLURM_JOB_UID" => env.uid = num(),
                "SLURM_JOB_USER" => env.user = text(),
                "SLURM_JOB_ACCOUNT" => env.account = text(),
                "SLURM_JOB_PARTITION" => env.partition = text(),
                "SLURM_CLUSTER_NAME" => env.cluster = text(),
                "SLURMD_NODENAME" => env.node = text(),
                "SLURM_ARRAY_JOB_ID" => env.array_job_id = num(),
                "SLURM_ARRAY_TASK_ID" => env.array_task_id = num(),
                "SLURM_JOB_GPUS" => env.job_gpus = Some(value.to_owned()),
                "CUDA_VISIBLE_DEVICES" => env.cuda_visible_devices = Some(value.to_owned()),
                _ => {}
            }
        }
        env
    }

    /// GPU UUIDs in `CUDA_VISIBLE_DEVICES`, when it lists UUIDs (`GPU-…`, `MIG-…`).
    pub fn gpu_uuids(&self) -> Option<Vec<String>> {
        let v = self.cuda_visible_devices.as_deref()?;
        let ids: Vec<String> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        (!ids.is_empty()
            && ids
                .iter()
                .all(|i| i.starts_with("GPU-") || i.starts_with("MIG-")))
        .then_some(ids)
    }
}

/// What ergond knows of this node's Slurm configuration, to name and map what it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmNode {
    /// Slurm's name for this node.
    pub name: String,
    /// The node's gres.conf.
    pub gres_conf: PathBuf,
    /// The NVIDIA driver's MIG capability minors.
    pub mig_minors: PathBuf,
}

/// A job found in the cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundJob {
    /// Slurm job id (from the directory name, else the environment).
    pub job_id: u32,
    /// Its directory.
    pub dir: JobDir,
    /// The job cgroup's modification time (Unix ns): about when the job started.
    pub since_unix_ns: Option<u64>,
    /// Its CPUs, from the cpuset controller.
    pub cpus: CpuSet,
    /// What its processes' environment says, when one could be read.
    pub env: Option<JobEnv>,
    /// Device minors of the NVIDIA GPUs its device cgroup allows, when the device cgroup is
    /// restrictive (v1 `devices.list` without an `a` entry); `None` when it says nothing.
    pub device_minors: Option<Vec<u32>>,
}

impl FoundJob {
    /// The owner's uid: the environment's, else the `uid_<uid>` directory's.
    pub fn uid(&self) -> Option<u32> {
        self.env.as_ref().and_then(|e| e.uid).or(self.dir.uid)
    }
}

/// Whether `name` is a Slurm SLUID: `s` and 13 characters of Crockford's base32 alphabet.
pub fn is_sluid(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 14
        && b[0] == b's'
        && b[1..]
            .iter()
            .all(|c| matches!(c, b'0'..=b'9' | b'A'..=b'H' | b'J' | b'K' | b'M' | b'N' | b'P'..=b'T' | b'V'..=b'Z'))
}

fn step_id(name: &str) -> Option<StepId> {
    let s = name.strip_prefix("step_")?;
    Some(match s {
        "batch" => StepId::Batch,
        "extern" => StepId::Extern,
        "interactive" => StepId::Interactive,
        n => StepId::Numbered(n.parse().ok()?),
    })
}

fn dirs(path: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    out.sort();
    out
}

/// Whether a directory named `name` at `depth` belongs to another node's Slurm: a v1
/// `slurm_<other>` at the top, or a v2 `<other>_slurmstepd.scope` (several slurmd on one host,
/// as `slurmd -N` or multiple-slurmd builds run them). `node`: this node's Slurm name.
fn other_nodes(name: &str, depth: usize, version: CgroupVersion, node: &str) -> bool {
    if depth == 0 && version == CgroupVersion::V1 {
        if let Some(n) = name.strip_prefix("slurm_") {
            return n != node;
        }
    }
    match name.strip_suffix("_slurmstepd.scope") {
        Some(n) => n != node,
        None => false,
    }
}

/// The Slurm job directories of node `node` in the hierarchy, by name (no file is read).
/// Another node's directories (several slurmd on one host) are skipped.
pub fn scan(h: &CgroupHierarchy, node: &str) -> Scan {
    let base = h.cpu_dir("");
    let mut out = Scan::default();
    let mut visited = 0usize;
    // (directory, path relative to base, depth, uid seen above, inside a slurmstepd scope)
    let mut stack = vec![(base, String::new(), 0usize, None::<u32>, false)];
    while let Some((dir, rel, depth, uid, in_scope)) = stack.pop() {
        for (name, path) in dirs(&dir) {
            visited += 1;
            if visited > MAX_DIRS {
                tracing::warn!(
                    "cgroup tree larger than {MAX_DIRS} directories: the job scan stopped early"
                );
                return out;
            }
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let key = match name
                .strip_prefix("job_")
                .and_then(|n| n.parse::<u32>().ok())
            {
                Some(id) => Some(JobKey::Id(id)),
                None if in_scope && is_sluid(&name) => Some(JobKey::Sluid(name.clone())),
                None => None,
            };
            if let Some(key) = key {
                let steps: Vec<(StepId, String)> = dirs(&path)
                    .into_iter()
                    .filter_map(|(s, _)| Some((step_id(&s)?, format!("{child_rel}/{s}"))))
                    .collect();
                if !steps.is_empty() {
                    out.jobs.push(JobDir {
                        key,
                        rel: child_rel,
                        uid,
                        steps,
                    });
                }
                continue;
            }
            if other_nodes(&name, depth, h.version, node) {
                continue;
            }
            let scope = name.ends_with("slurmstepd.scope");
            if (depth == 0 && h.version == CgroupVersion::V1 && name.starts_with("slurm")) || scope
            {
                out.slurm_tree = true;
            }
            let uid = name
                .strip_prefix("uid_")
                .and_then(|u| u.parse().ok())
                .or(uid);
            if depth + 1 < MAX_DEPTH {
                stack.push((path, child_rel, depth + 1, uid, scope));
            }
        }
    }
    out.jobs.sort_by(|a, b| a.key.cmp(&b.key));
    out.slurm_tree |= !out.jobs.is_empty();
    out
}

/// The Slurm jobs of node `node` in the hierarchy, with what their cgroups and processes say
/// about them. `proc_root` is procfs (normally `/proc`).
pub fn find_jobs(h: &CgroupHierarchy, proc_root: &Path, node: &str) -> Vec<FoundJob> {
    let mut out = Vec::new();
    for dir in scan(h, node).jobs {
        let env = job_env(h, proc_root, &dir);
        let job_id = match (&dir.key, env.as_ref().and_then(|e| e.job_id)) {
            (JobKey::Id(id), _) => *id,
            (JobKey::Sluid(_), Some(id)) => id,
            (JobKey::Sluid(s), None) => {
                tracing::warn!(
                    sluid = %s,
                    cgroup = %dir.rel,
                    "found a running job's cgroup named by its SLUID, but none of its processes \
                     shows its job id: it is not measured (set CgroupJobIdPaths=yes in \
                     cgroup.conf to name job cgroups by job id)"
                );
                continue;
            }
        };
        let since_unix_ns = std::fs::metadata(h.cpu_dir(&dir.rel))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let (cpus_text, devices) = match h.version {
            CgroupVersion::V1 => (
                read(h.root.join("cpuset").join(&dir.rel).join("cpuset.cpus")),
                std::fs::read_to_string(h.root.join("devices").join(&dir.rel).join("devices.list"))
                    .ok(),
            ),
            CgroupVersion::V2 => (
                read(h.cpu_dir(&dir.rel).join("cpuset.cpus.effective")),
                None,
            ),
        };
        out.push(FoundJob {
            job_id,
            since_unix_ns,
            cpus: CpuSet::parse(cpus_text.trim()).unwrap_or_default(),
            env,
            device_minors: devices.as_deref().and_then(gpu_minors),
            dir,
        });
    }
    out.sort_by_key(|j| j.job_id);
    out
}

/// The pids in the job's step cgroups (`cgroup.procs` of each step and of the cgroups below
/// it, two levels deep: v1 `task_<n>`, v2 `user/task_<n>`), at most [`MAX_PIDS`].
fn job_pids(h: &CgroupHierarchy, dir: &JobDir) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = dir
        .steps
        .iter()
        // The extern step holds only slurmstepd's placeholder (no job environment): last.
        .rev()
        .map(|(_, rel)| (h.cpu_dir(rel), 0))
        .collect();
    while let Some((d, depth)) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            if pids.len() >= MAX_PIDS {
                pids.truncate(MAX_PIDS);
                break;
            }
        }
        if depth < 2 {
            stack.extend(dirs(&d).into_iter().rev().map(|(_, p)| (p, depth + 1)));
        }
    }
    pids
}

/// The environment of the job's processes: the first that names a job (`SLURM_JOB_ID`),
/// preferring one that also lists GPUs.
pub fn job_env(h: &CgroupHierarchy, proc_root: &Path, dir: &JobDir) -> Option<JobEnv> {
    let mut best: Option<JobEnv> = None;
    for pid in job_pids(h, dir) {
        let path = proc_root.join(pid.to_string()).join("environ");
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_ENVIRON_BYTES).read_to_end(&mut bytes));
        if read.is_err() {
            continue;
        }
        let env = JobEnv::parse(&bytes);
        let Some(id) = env.job_id else { continue };
        if let JobKey::Id(want) = dir.key {
            if id != want {
                continue;
            }
        }
        let has_gpus = env.job_gpus.is_some() || env.cuda_visible_devices.is_some();
        if has_gpus {
            return Some(env);
        }
        best.get_or_insert(env);
    }
    best
}

/// The GPUs a found job holds, as the plugin would have sent them, or why they cannot be
/// known. In order: `SLURM_JOB_GPUS` from its processes' environment (gres.conf indices,
/// mapped to device minors through `gres`, the node's gres.conf GPUs: `None` when it could not
/// be read, then matched by index), UUIDs in `CUDA_VISIBLE_DEVICES` (`node_gpus`: the node's
/// NVML devices as (index, minor, UUID)), a job environment without GPU variables (no GPUs), a
/// restrictive device cgroup's minors. A node without GPUs has none to know.
pub fn resolve_gpus(
    found: &FoundJob,
    node_gpus: &[(u32, Option<u32>, String)],
    gres: Option<&[ergon_gres::GresGpu]>,
    mig_minors: &Path,
) -> Result<Vec<ergon_protocol::GpuAlloc>, String> {
    use ergon_protocol::GpuAlloc;
    if node_gpus.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(env) = &found.env {
        if let Some(list) = &env.job_gpus {
            let indices = ergon_gres::parse_job_gpus(list);
            let allocs = match gres {
                Some(gres) => {
                    let (allocs, notes) = ergon_gres::allocations(&indices, gres, mig_minors);
                    for note in notes {
                        tracing::warn!(job_id = found.job_id, "{note}");
                    }
                    allocs
                }
                None => indices
                    .iter()
                    .map(|&index| GpuAlloc {
                        index,
                        minor: None,
                        mig: None,
                    })
                    .collect(),
            };
            return Ok(allocs);
        }
        if let Some(uuids) = env.gpu_uuids() {
            let mut allocs = Vec::new();
            for u in &uuids {
                match node_gpus.iter().find(|(_, _, uuid)| uuid == u) {
                    Some((index, minor, _)) => allocs.push(GpuAlloc {
                        index: *index,
                        minor: *minor,
                        mig: None,
                    }),
                    None => {
                        return Err(format!(
                            "its processes' CUDA_VISIBLE_DEVICES names {u}, which is not one of \
                             this node's GPUs (a MIG instance UUID, or a GPU NVML does not list)"
                        ))
                    }
                }
            }
            return Ok(allocs);
        }
        // A task's environment lists the job's GPUs whenever it has some.
        return Ok(Vec::new());
    }
    if let Some(minors) = &found.device_minors {
        return Ok(minors
            .iter()
            .map(|&m| GpuAlloc {
                index: node_gpus
                    .iter()
                    .find(|(_, minor, _)| *minor == Some(m))
                    .map_or(u32::MAX, |g| g.0),
                minor: Some(m),
                mig: None,
            })
            .collect());
    }
    Err(
        "ergond found the job already running and could not read its GPU allocation: none of \
         its processes showed its environment (SLURM_JOB_GPUS) and its device cgroup allows \
         every device"
            .to_owned(),
    )
}

/// NVIDIA GPU minors allowed by a v1 `devices.list` (`c 195:6 rw` lines; `c 195:255` is
/// nvidiactl and `c 195:254` nvidia-modeset, not GPUs). `None` when the list allows every
/// device (an `a` entry, as Slurm 22.05 leaves job and step cgroups): it says nothing about
/// the job's GPUs.
pub fn gpu_minors(devices_list: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for l in devices_list.lines() {
        let mut f = l.split_whitespace();
        match f.next() {
            Some("a") => return None,
            Some("c") => {}
            _ => continue,
        }
        let Some((maj, min)) = f.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        if let (Ok(maj), Ok(min)) = (maj.parse::<u32>(), min.parse::<u32>()) {
            if maj == NVIDIA_MAJOR && min < ergon_gres::NVIDIA_FIRST_CONTROL_MINOR {
                out.push(min);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(root: &Path, rel: &str, files: &[(&str, &str)]) {
        let d = root.join(rel);
        std::fs::create_dir_all(&d).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
    }

    fn environ(vars: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in vars {
            out.extend_from_slice(format!("{k}={v}").as_bytes());
            out.push(0);
        }
        out
    }

    fn hier(root: &Path, version: CgroupVersion) -> CgroupHierarchy {
        CgroupHierarchy {
            root: root.to_path_buf(),
            version,
        }
    }

    #[test]
    fn finds_v1_jobs_with_owner_cpus_device_minors_steps_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("cg");
        let proc = dir.path().join("proc");
        mk(
            &r,
            "cpuacct/slurm_n1/uid_1000/job_42/step_batch/task_0",
            &[("cgroup.procs", "77\n")],
        );
        mk(&r, "cpuacct/slurm_n1/uid_1000/job_42/step_0", &[]);
        mk(
            &r,
            "cpuacct/slurm_n1/uid_1000/job_42/step_extern",
            &[("cgroup.procs", "76\n")],
        );
        mk(&r, "cpuacct/slurm_n1/uid_1000/job_43", &[]); // no step: not a running job
        mk(&r, "cpuacct/slurm_n1/uid_7/job_44/step_extern", &[]);
        mk(&r, "cpuacct/system.slice/sshd.service", &[]);
        mk(
            &r,
            "cpuset/slurm_n1/uid_1000/job_42",
            &[("cpuset.cpus", "0-3,8\n")],
        );
        mk(
            &r,
            "devices/slurm_n1/uid_1000/job_42",
            &[(
                "devices.list",
                "c 195:255 rw\nc 195:6 rw\nc 195:4 rw\nb 8:0 r\nc 1:3 rwm\n",
            )],
        );
        mk(
            &r,
            "devices/slurm_n1/uid_7/job_44",
            &[("devices.list", "a *:* rwm\n")],
        );
        let env42 = environ(&[
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_GPUS", "0,2"),
            ("SLURM_JOB_USER", "alice"),
            ("SLURM_JOB_ACCOUNT", "proj"),
            ("SLURMD_NODENAME", "n1"),
            ("SLURM_JOB_SLUID", "s2GXM9475CEH00"),
        ]);
        mk(&proc, "77", &[]);
        std::fs::write(proc.join("77/environ"), env42).unwrap();
        mk(&proc, "76", &[("environ", "")]);
        let h = hier(&r, CgroupVersion::V1);
        let s = scan(&h, "n1");
        assert!(s.slurm_tree);
        assert_eq!(s.jobs.len(), 2);
        let jobs = find_jobs(&h, &proc, "n1");
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        let j = &jobs[0];
        assert_eq!((j.job_id, j.uid()), (42, Some(1000)));
        assert_eq!(j.dir.rel, "slurm_n1/uid_1000/job_42");
        assert_eq!(j.cpus, CpuSet::parse("0-3,8").unwrap());
        assert_eq!(j.device_minors, Some(vec![4, 6]));
        assert!(j.since_unix_ns.is_some());
        let env = j.env.as_ref().unwrap();
        assert_eq!(env.job_gpus.as_deref(), Some("0,2"));
        assert_eq!(env.user.as_deref(), Some("alice"));
        assert_eq!(env.node.as_deref(), Some("n1"));
        assert_eq!(env.sluid.as_deref(), Some("s2gxm9475ceh00"), "lowercase");
        let steps: Vec<StepId> = j.dir.steps.iter().map(|s| s.0).collect();
        assert_eq!(
            steps,
            vec![StepId::Numbered(0), StepId::Batch, StepId::Extern]
        );
        // Job 44: its device list allows everything and no process shows an environment.
        assert_eq!((jobs[1].job_id, jobs[1].uid()), (44, Some(7)));
        assert_eq!(jobs[1].device_minors, None);
        assert_eq!(jobs[1].env, None);
    }

    #[test]
    fn finds_v2_jobs_by_id_and_by_sluid_below_any_slurmstepd_scope() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("cg");
        let proc = dir.path().join("proc");
        // Slurm < 26.05 or CgroupJobIdPaths=yes.
        mk(
            &r,
            "system.slice/slurmstepd.scope/job_9",
            &[("cpuset.cpus.effective", "2-3\n")],
        );
        mk(
            &r,
            "system.slice/slurmstepd.scope/job_9/step_batch/user/task_0",
            &[],
        );
        // 26.05 default: the SLUID names the directory; a multiple-slurmd node prefixes the
        // scope with its name.
        let sluid = "sEKNKTV3WPV500";
        let job = format!("system.slice/n2_slurmstepd.scope/{sluid}");
        mk(&r, &job, &[("cpuset.cpus.effective", "0\n")]);
        mk(
            &r,
            &format!("{job}/step_0/user/task_0"),
            &[("cgroup.procs", "501\n")],
        );
        mk(
            &r,
            &format!("{job}/step_extern/user/task_0"),
            &[("cgroup.procs", "500\n")],
        );
        mk(&proc, "501", &[]);
        std::fs::write(
            proc.join("501/environ"),
            environ(&[
                ("SLURM_JOB_ID", "123"),
                ("SLURM_JOB_SLUID", sluid),
                ("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb"),
                ("SLURM_JOB_UID", "1001"),
            ]),
        )
        .unwrap();
        // A SLUID directory whose processes show nothing cannot be named: skipped.
        mk(
            &r,
            "system.slice/slurmstepd.scope/s0000000000000/step_0",
            &[],
        );
        // A SLUID-looking name outside a slurmstepd scope is not a job.
        mk(&r, "system.slice/sABCDEFGHJKMNP/step_0", &[]);
        let h = hier(&r, CgroupVersion::V2);
        let s = scan(&h, "n2");
        assert!(s.slurm_tree);
        assert_eq!(
            s.jobs.iter().map(|j| j.key.clone()).collect::<Vec<_>>(),
            vec![
                JobKey::Id(9),
                JobKey::Sluid("s0000000000000".into()),
                JobKey::Sluid(sluid.into())
            ]
        );
        let jobs = find_jobs(&h, &proc, "n2");
        assert_eq!(
            jobs.iter().map(|j| j.job_id).collect::<Vec<_>>(),
            vec![9, 123]
        );
        assert_eq!(jobs[0].dir.rel, "system.slice/slurmstepd.scope/job_9");
        assert_eq!(jobs[0].cpus, CpuSet::parse("2-3").unwrap());
        assert_eq!((jobs[0].uid(), jobs[0].device_minors.clone()), (None, None));
        let j = &jobs[1];
        assert_eq!(j.dir.rel, job);
        assert_eq!(j.uid(), Some(1001));
        assert_eq!(
            j.env.as_ref().unwrap().gpu_uuids(),
            Some(vec!["GPU-aaaa".to_owned(), "GPU-bbbb".to_owned()])
        );
        assert!(find_jobs(&hier(&r.join("missing"), CgroupVersion::V2), &proc, "n2").is_empty());
        // Node n1 on the same host (another slurmd) does not take n2's jobs.
        let n1 = scan(&h, "n1");
        assert_eq!(
            n1.jobs.iter().map(|j| j.key.clone()).collect::<Vec<_>>(),
            vec![JobKey::Id(9), JobKey::Sluid("s0000000000000".into())]
        );
    }

    #[test]
    fn no_slurm_tree_no_jobs() {
        let dir = tempfile::tempdir().unwrap();
        mk(dir.path(), "cpuacct/system.slice/sshd.service", &[]);
        let s = scan(&hier(dir.path(), CgroupVersion::V1), "n1");
        assert!(!s.slurm_tree && s.jobs.is_empty());
    }

    #[test]
    fn sluids_and_device_lists() {
        assert!(is_sluid("sEKNKTV3WPV500") && is_sluid("s2GXM9475CEH00"));
        assert!(!is_sluid("job_12") && !is_sluid("sEKNKTV3WPV5000") && !is_sluid("SEKNKTV3WPV500"));
        assert!(
            !is_sluid("sEKNKTV3WPVI00"),
            "I is not in Crockford's alphabet"
        );
        assert_eq!(gpu_minors("a *:* rwm\n"), None);
        assert_eq!(gpu_minors(""), Some(vec![]));
        assert_eq!(gpu_minors("c 195:255 rw\nc 195:1 rw\n"), Some(vec![1]));
        let env = JobEnv::parse(b"CUDA_VISIBLE_DEVICES=0,1\0SLURM_JOB_ID=x\0");
        assert_eq!((env.gpu_uuids(), env.job_id), (None, None));
    }
}
