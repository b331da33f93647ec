//! Finding the Slurm jobs already running when ergond starts, from their cgroups.
//!
//! slurmstepd puts every job in a cgroup named `job_<id>` with one child per step
//! (`step_batch`, `step_extern`, `step_0`, …): under cgroup v1 at
//! `<root>/cpuacct/slurm[_<node>]/uid_<uid>/job_<id>/step_<step>`, under v2 at
//! `<root>/system.slice/slurmstepd.scope/job_<id>/step_<step>` (or below another slice). A job
//! found there that ergond does not know (it was down when the job started, and the journal
//! does not have it) is taken on from now: its steps' cgroups are watched, its CPUs read from
//! its cpuset, its GPUs from the device cgroup's allow list (v1 `devices.list`, NVIDIA's
//! character major 195), and its manifest carries a gap from about the job's start (the job
//! cgroup's modification time) to now, not recovered: its coverage is partial.
//!
//! The walk is bounded ([`MAX_DIRS`] directories, [`MAX_DEPTH`] levels) and follows no symlink.

use std::path::Path;

use ergon_protocol::{CpuSet, StepId};

use crate::sources::cgroup::CgroupVersion;

/// Directories visited at most.
pub const MAX_DIRS: usize = 100_000;
/// Levels below the hierarchy's root searched at most.
pub const MAX_DEPTH: usize = 6;
/// Character major of NVIDIA GPUs (`/dev/nvidiaN`).
pub const NVIDIA_MAJOR: u32 = 195;

/// A job found in the cgroup tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundJob {
    /// Slurm job id.
    pub job_id: u32,
    /// Owner, from a `uid_<uid>` ancestor (v1), if any.
    pub uid: Option<u32>,
    /// The job's cgroup, relative to the hierarchy (as the sampler's paths are).
    pub path: String,
    /// Its steps and their cgroups (relative paths).
    pub steps: Vec<(StepId, String)>,
    /// The job cgroup's modification time (Unix ns): about when the job started.
    pub since_unix_ns: Option<u64>,
    /// Its CPUs, from the cpuset controller.
    pub cpus: CpuSet,
    /// Device minors of the NVIDIA GPUs its device cgroup allows.
    pub gpu_minors: Vec<u32>,
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

fn dirs(path: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut out: Vec<(String, std::path::PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    out.sort();
    out
}

/// The Slurm jobs in the cgroup hierarchy at `root` (the `cgroup_root`, e.g. `/sys/fs/cgroup`).
pub fn find_jobs(root: &Path, version: CgroupVersion) -> Vec<FoundJob> {
    let base = match version {
        CgroupVersion::V1 => root.join("cpuacct"),
        CgroupVersion::V2 => root.to_path_buf(),
    };
    let mut out = Vec::new();
    let mut visited = 0usize;
    // (directory, path relative to base, depth, uid seen above)
    let mut stack = vec![(base.clone(), String::new(), 0usize, None::<u32>)];
    while let Some((dir, rel, depth, uid)) = stack.pop() {
        for (name, path) in dirs(&dir) {
            visited += 1;
            if visited > MAX_DIRS {
                tracing::warn!(
                    "cgroup tree larger than {MAX_DIRS} directories: job discovery stopped early"
                );
                return out;
            }
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if let Some(id) = name
                .strip_prefix("job_")
                .and_then(|n| n.parse::<u32>().ok())
            {
                let steps: Vec<(StepId, String)> = dirs(&path)
                    .into_iter()
                    .filter_map(|(s, _)| Some((step_id(&s)?, format!("{child_rel}/{s}"))))
                    .collect();
                if !steps.is_empty() {
                    out.push(found(root, version, id, uid, &child_rel, &path, steps));
                }
                continue;
            }
            let uid = name
                .strip_prefix("uid_")
                .and_then(|u| u.parse().ok())
                .or(uid);
            if depth + 1 < MAX_DEPTH {
                stack.push((path, child_rel, depth + 1, uid));
            }
        }
    }
    out.sort_by_key(|j| j.job_id);
    out
}

fn found(
    root: &Path,
    version: CgroupVersion,
    job_id: u32,
    uid: Option<u32>,
    rel: &str,
    dir: &Path,
    steps: Vec<(StepId, String)>,
) -> FoundJob {
    let since_unix_ns = std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64);
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let (cpus_text, devices) = match version {
        CgroupVersion::V1 => (
            read(root.join("cpuset").join(rel).join("cpuset.cpus")),
            read(root.join("devices").join(rel).join("devices.list")),
        ),
        CgroupVersion::V2 => (
            read(root.join(rel).join("cpuset.cpus.effective")),
            String::new(),
        ),
    };
    FoundJob {
        job_id,
        uid,
        path: rel.to_owned(),
        steps,
        since_unix_ns,
        cpus: CpuSet::parse(cpus_text.trim()).unwrap_or_default(),
        gpu_minors: gpu_minors(&devices),
    }
}

/// NVIDIA GPU minors allowed by a v1 `devices.list` (`c 195:6 rw` lines; `c 195:255` is
/// nvidiactl and `c 195:254` nvidia-modeset, not GPUs).
pub fn gpu_minors(devices_list: &str) -> Vec<u32> {
    let mut out: Vec<u32> = devices_list
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == "c").then_some(())?;
            let (maj, min) = f.next()?.split_once(':')?;
            let (maj, min): (u32, u32) = (maj.parse().ok()?, min.parse().ok()?);
            (maj == NVIDIA_MAJOR && min < 254).then_some(min)
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
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

    #[test]
    fn finds_v1_jobs_with_owner_cpus_gpus_and_steps() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        mk(r, "cpuacct/slurm_n1/uid_1000/job_42/step_batch", &[]);
        mk(r, "cpuacct/slurm_n1/uid_1000/job_42/step_0", &[]);
        mk(r, "cpuacct/slurm_n1/uid_1000/job_42/step_extern", &[]);
        mk(r, "cpuacct/slurm_n1/uid_1000/job_43", &[]); // no step: not a running job
        mk(r, "cpuacct/slurm_n1/uid_7/job_44/step_extern", &[]);
        mk(r, "cpuacct/system.slice/sshd.service", &[]);
        mk(
            r,
            "cpuset/slurm_n1/uid_1000/job_42",
            &[("cpuset.cpus", "0-3,8\n")],
        );
        mk(
            r,
            "devices/slurm_n1/uid_1000/job_42",
            &[(
                "devices.list",
                "c 195:255 rw\nc 195:6 rw\nc 195:4 rw\nb 8:0 r\nc 1:3 rwm\n",
            )],
        );
        let jobs = find_jobs(r, CgroupVersion::V1);
        assert_eq!(jobs.len(), 2, "{jobs:?}");
        let j = &jobs[0];
        assert_eq!((j.job_id, j.uid), (42, Some(1000)));
        assert_eq!(j.path, "slurm_n1/uid_1000/job_42");
        assert_eq!(j.cpus, CpuSet::parse("0-3,8").unwrap());
        assert_eq!(j.gpu_minors, vec![4, 6]);
        assert!(j.since_unix_ns.is_some());
        let steps: Vec<StepId> = j.steps.iter().map(|s| s.0).collect();
        assert_eq!(
            steps,
            vec![StepId::Numbered(0), StepId::Batch, StepId::Extern]
        );
        assert_eq!(j.steps[1].1, "slurm_n1/uid_1000/job_42/step_batch");
        assert_eq!((jobs[1].job_id, jobs[1].uid), (44, Some(7)));
    }

    #[test]
    fn finds_v2_jobs_below_slurmstepd_scope() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        mk(
            r,
            "system.slice/slurmstepd.scope/job_9",
            &[("cpuset.cpus.effective", "2-3\n")],
        );
        mk(
            r,
            "system.slice/slurmstepd.scope/job_9/step_batch/user/task_0",
            &[],
        );
        let jobs = find_jobs(r, CgroupVersion::V2);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].path, "system.slice/slurmstepd.scope/job_9");
        assert_eq!(jobs[0].uid, None);
        assert_eq!(jobs[0].cpus, CpuSet::parse("2-3").unwrap());
        assert_eq!(jobs[0].steps.len(), 1);
        assert!(find_jobs(&r.join("missing"), CgroupVersion::V2).is_empty());
    }
}
