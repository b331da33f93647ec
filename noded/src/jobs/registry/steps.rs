//! A job's steps: created on the first event about them (events come out of order, or a start
//! is missed), bounded by [`super::Limits::max_steps`], and the cgroup watched for each step's
//! CPU time.

use ergon_protocol::{CgroupPath, CpuSet, StepId};

use super::job::{Job, Step};
use super::table::Refusal;

/// The job's step `id`, created empty if this is the first event about it (events may come out
/// of order, or the start may have been missed); refused beyond `max_steps`.
pub(super) fn step_mut(job: &mut Job, id: StepId, max_steps: usize) -> Result<&mut Step, Refusal> {
    if let Some(i) = job.steps.iter().position(|s| s.id == id) {
        return Ok(&mut job.steps[i]);
    }
    if job.steps.len() >= max_steps {
        return Err(Refusal::TooManySteps {
            job_id: job.job_id,
            max: max_steps,
        });
    }
    job.steps.push(Step {
        id,
        start: None,
        end: None,
        cgroups: Vec::new(),
        cpus: CpuSet::new(),
        watched: None,
        exit_status: None,
    });
    Ok(job.steps.last_mut().expect("just pushed"))
}

/// The cgroup to watch for a step's CPU time: the v1 `cpuacct` entry, else the v2 unified one;
/// truncated after its `step_*` component (the plugin sends a task's cgroup, e.g.
/// `…/step_0/task_0` or `…/step_0/user/task_0`, and the step's own cgroup holds all its tasks);
/// relative to the hierarchy (no leading `/`). `None` when the step has neither entry.
pub fn step_cgroup(cgroups: &[CgroupPath]) -> Option<String> {
    let entry = cgroups
        .iter()
        .find(|c| c.controller == "cpuacct")
        .or_else(|| cgroups.iter().find(|c| c.is_unified()))?;
    let mut out = Vec::new();
    for part in entry.path.split('/').filter(|p| !p.is_empty()) {
        if part == ".." || part == "." {
            return None;
        }
        out.push(part);
        if part.starts_with("step_") {
            break;
        }
    }
    (!out.is_empty()).then(|| out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_cgroup_picks_the_step_and_refuses_traversal() {
        let cg = |c: &str, p: &str| CgroupPath {
            controller: c.into(),
            path: p.into(),
        };
        assert_eq!(
            step_cgroup(&[cg(
                "",
                "/system.slice/slurmstepd.scope/job_7/step_0/user/task_0"
            )])
            .as_deref(),
            Some("system.slice/slurmstepd.scope/job_7/step_0")
        );
        assert_eq!(
            step_cgroup(&[cg("cpuacct", "/slurm/uid_0/job_5/step_batch/task_0")]).as_deref(),
            Some("slurm/uid_0/job_5/step_batch")
        );
        assert_eq!(step_cgroup(&[cg("memory", "/a/step_0")]), None);
        assert_eq!(step_cgroup(&[cg("", "/a/../../etc")]), None);
        assert_eq!(step_cgroup(&[cg("", "/")]), None);
    }
}
