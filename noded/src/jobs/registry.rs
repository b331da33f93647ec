//! [`JobRegistry`]: the jobs and steps running on this node, built from the SPANK plugin's
//! events. Pure state machine: it performs no I/O and reads no clock. Each event returns the
//! [`Action`]s the I/O shell ([`super::worker`]) must perform (close an attribution interval
//! at the event's instant, watch or unwatch a cgroup, write the manifest).
//!
//! Events arrive in any order and may be missing (ergond restarted, a hook failed): a step or
//! job end for a job ergond never saw start creates the job with `start_seen = false`, so what
//! is known is still recorded and the manifest marks the coverage partial. Nothing here panics
//! on hostile or inconsistent input; memory is bounded by [`Limits`].

use std::collections::BTreeMap;
use std::sync::Arc;

use ergon_protocol::{
    CgroupPath, CpuSet, Gap, GpuAlloc, JobEnd, JobSnapshot, JobStart, ReportFormat, StepEnd,
    StepId, StepStart,
};
use serde::{Deserialize, Serialize};

/// How the gap of a job found running at start-up begins.
pub const DISCOVERED_GAP: &str = "ergond was not running when the job started";

/// Bounds on what the registry holds, so a misbehaving client cannot grow ergond's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open jobs (started, not yet finished) at most.
    pub max_jobs: usize,
    /// Steps per job at most.
    pub max_steps: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_jobs: 4096,
            max_steps: 1024,
        }
    }
}

/// The instant an event refers to, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTime {
    /// As the plugin stamped it (Unix ns).
    pub unix_ns: u64,
    /// The same instant on CLOCK_MONOTONIC, as the shell mapped it (readings are on this clock).
    pub mono_ns: u64,
}

/// Which event a reading belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    /// The job's start.
    JobStart,
    /// The job's end.
    JobEnd,
    /// A step's start.
    StepStart(StepId),
    /// A step's end.
    StepEnd(StepId),
}

/// What the shell must do after an event, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read every counter at `at.mono_ns` and close the attribution interval there.
    Read {
        /// The job.
        job_id: u32,
        /// The event.
        mark: Mark,
        /// The event's instant.
        at: EventTime,
    },
    /// Start sampling the CPU time of this cgroup (relative to its hierarchy).
    Watch {
        /// e.g. `slurm_node1/uid_1000/job_5/step_0`.
        path: String,
    },
    /// Stop sampling it.
    Unwatch {
        /// As given to [`Action::Watch`].
        path: String,
    },
    /// The job has ended: once the readings requested before are taken, take it out with
    /// [`JobRegistry::take`] and write its manifest.
    Finish {
        /// The job.
        job_id: u32,
    },
}

/// Why an event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Too many open jobs.
    #[error("ergond is tracking {0} open jobs, its limit; the job is not tracked")]
    TooManyJobs(usize),
    /// Too many steps in one job.
    #[error("job {job_id} has {max} steps, ergond's limit; step not tracked")]
    TooManySteps {
        /// The job.
        job_id: u32,
        /// The limit.
        max: usize,
    },
}

/// The job's step `id`, created empty if this is the first event about it (events may come out
/// of order, or the start may have been missed); refused beyond `max_steps`.
fn step_mut(job: &mut Job, id: StepId, max_steps: usize) -> Result<&mut Step, Refusal> {
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

/// One step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Which step.
    pub id: StepId,
    /// Its start, if seen.
    pub start: Option<EventTime>,
    /// Its end, if seen.
    pub end: Option<EventTime>,
    /// Its cgroups, as the plugin sent them.
    pub cgroups: Vec<CgroupPath>,
    /// Its CPUs (`cpuset.cpus`).
    pub cpus: CpuSet,
    /// The cgroup watched for its CPU time, if any.
    pub watched: Option<String>,
    /// Exit status, if seen.
    pub exit_status: Option<i32>,
}

/// One job on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Slurm job id.
    pub job_id: u32,
    /// Array job id, from JobStart or a StepStart.
    pub array_job_id: Option<u32>,
    /// Array task id.
    pub array_task_id: Option<u32>,
    /// Owner's uid, if known (JobStart or StepStart).
    pub uid: Option<u32>,
    /// Owner's user name (JobStart only).
    pub user: Option<String>,
    /// Owner's primary gid (JobStart only).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Slurm account.
    pub account: Option<String>,
    /// Slurm partition.
    pub partition: Option<String>,
    /// Slurm cluster.
    pub cluster: Option<String>,
    /// Node name as Slurm knows it (from the first event).
    pub node: String,
    /// GPUs allocated (JobStart).
    pub gpus: Vec<GpuAlloc>,
    /// CPUs allocated (JobStart, else the extern step's set).
    pub cpus: CpuSet,
    /// Report requested.
    pub report: Option<ReportFormat>,
    /// Working directory.
    pub work_dir: Option<String>,
    /// Stdout file.
    pub stdout_path: Option<String>,
    /// Whether ergond saw the JobStart. When false, `start` is the first event seen.
    pub start_seen: bool,
    /// The job's start (or the first event seen).
    pub start: EventTime,
    /// The job's end, once seen.
    pub end: Option<EventTime>,
    /// Steps, in the order their first event arrived.
    pub steps: Vec<Step>,
    /// Outages while the job ran (ergond restarted), with whether their energy was recovered.
    pub gaps: Vec<Gap>,
    /// Its attribution, once it has ended and its figures are final (until its manifest is
    /// written).
    #[serde(default)]
    pub result: Option<super::attributor::JobResult>,
    /// Found running in the cgroup tree when ergond started (its node name is then the one
    /// its processes' environment or ergond's configuration gives, until an event names it).
    #[serde(default)]
    pub discovered: bool,
    /// Slurm's cluster-unique job id (`SLURM_JOB_SLUID`, Slurm 26.05+), lowercase.
    #[serde(default)]
    pub sluid: Option<String>,
    /// Every node of the job, as Slurm's host list (the plugin's `SLURM_JOB_NODELIST`), when it
    /// said and the list expands.
    #[serde(default)]
    pub node_list: Option<String>,
    /// Why the job's GPUs on this node are not known, when they are not (a job found running
    /// whose allocation could not be read): its GPU energy is then unknown, not zero.
    #[serde(default)]
    pub gpus_unknown: Option<String>,
    /// Whether the user's report has been handed to the report writer (it is sent once, even
    /// when the manifest is retried or ergond restarts before writing it).
    #[serde(default)]
    pub report_sent: bool,
}

impl Job {
    fn unknown(job_id: u32, node: &str, first: EventTime) -> Self {
        Self {
            job_id,
            array_job_id: None,
            array_task_id: None,
            uid: None,
            user: None,
            gid: None,
            account: None,
            partition: None,
            cluster: None,
            node: node.to_owned(),
            gpus: Vec::new(),
            cpus: CpuSet::new(),
            report: None,
            work_dir: None,
            stdout_path: None,
            start_seen: false,
            start: first,
            end: None,
            steps: Vec::new(),
            gaps: Vec::new(),
            result: None,
            discovered: false,
            sluid: None,
            node_list: None,
            gpus_unknown: None,
            report_sent: false,
        }
    }

    /// The step `id`, if known.
    pub fn step(&self, id: StepId) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }
}

/// What start-up discovery knows of a job found running (see [`JobRegistry::discovered`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// Slurm job id.
    pub job_id: u32,
    /// Its SLUID, lowercase.
    pub sluid: Option<String>,
    /// Owner.
    pub uid: Option<u32>,
    /// Owner's name.
    pub user: Option<String>,
    /// Account.
    pub account: Option<String>,
    /// Partition.
    pub partition: Option<String>,
    /// Cluster.
    pub cluster: Option<String>,
    /// Array job id.
    pub array_job_id: Option<u32>,
    /// Array task id.
    pub array_task_id: Option<u32>,
    /// Slurm's name for this node.
    pub node: String,
    /// About when it started (the job cgroup's modification time).
    pub start: EventTime,
    /// Its CPUs.
    pub cpus: CpuSet,
    /// Its GPUs, or why they are not known.
    pub gpus: Result<Vec<GpuAlloc>, String>,
    /// Its steps and their cgroups.
    pub steps: Vec<(StepId, String)>,
}

/// How many finished jobs the registry remembers (see [`JobRegistry::closed`]).
pub const CLOSED_REMEMBERED: usize = 4096;

/// The jobs open on this node; see the module documentation.
#[derive(Debug, Default)]
pub struct JobRegistry {
    /// Copy-on-write: the journal's snapshot clones the `Arc`s, not the jobs.
    jobs: BTreeMap<u32, Arc<Job>>,
    limits: Limits,
    /// The last [`CLOSED_REMEMBERED`] jobs whose manifest was written, with their end (Unix
    /// ns), oldest first; `closed_ids` indexes them.
    closed: std::collections::VecDeque<(u32, u64)>,
    closed_ids: std::collections::HashMap<u32, u64>,
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

impl JobRegistry {
    /// An empty registry.
    pub fn new(limits: Limits) -> Self {
        Self {
            jobs: BTreeMap::new(),
            limits,
            closed: Default::default(),
            closed_ids: Default::default(),
        }
    }

    /// Whether an event for `job_id` at `at` is a late copy of one for a job already finished:
    /// the plugin queues an event ergond did not answer in time, though ergond may have taken
    /// it, and the replay may come after the job's manifest was written. Such a copy must not
    /// open the job again (a Slurm job id is not reused before it wraps at 67 million; an event
    /// after the finished job's end is a new job's).
    fn late_copy(&self, job_id: u32, at: EventTime) -> bool {
        let late = !self.jobs.contains_key(&job_id)
            && self
                .closed_ids
                .get(&job_id)
                .is_some_and(|&end| at.unix_ns <= end);
        if late {
            tracing::debug!(
                job_id,
                "event for a job already finished ignored (a late copy)"
            );
        }
        late
    }

    /// Remember a finished job (see [`Self::late_copy`]).
    fn remember_closed(&mut self, job_id: u32, end_unix_ns: u64) {
        if self.closed.len() >= CLOSED_REMEMBERED {
            if let Some((old, end)) = self.closed.pop_front() {
                if self.closed_ids.get(&old) == Some(&end) {
                    self.closed_ids.remove(&old);
                }
            }
        }
        self.closed.push_back((job_id, end_unix_ns));
        self.closed_ids.insert(job_id, end_unix_ns);
    }

    /// The finished jobs remembered, oldest first (for the journal).
    pub fn closed(&self) -> Vec<(u32, u64)> {
        self.closed.iter().copied().collect()
    }

    /// Put back the finished jobs the journal remembered.
    pub fn restore_closed(&mut self, closed: &[(u32, u64)]) {
        for &(job_id, end) in closed {
            self.remember_closed(job_id, end);
        }
    }

    /// Open jobs.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether no job is open.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The job, if open.
    pub fn get(&self, job_id: u32) -> Option<&Job> {
        self.jobs.get(&job_id).map(|j| &**j)
    }

    /// The owner's uid, if the job is open and its owner known.
    pub fn owner(&self, job_id: u32) -> Option<u32> {
        self.jobs.get(&job_id).and_then(|j| j.uid)
    }

    fn job_or_unknown(
        &mut self,
        job_id: u32,
        node: &str,
        at: EventTime,
    ) -> Result<&mut Job, Refusal> {
        // Only running jobs count: ended ones waiting for their manifest leave soon. Counting
        // them walks every job, under the lock the socket handler holds: only when the map is
        // large enough for the limit to be reached (running <= len).
        if !self.jobs.contains_key(&job_id)
            && self.jobs.len() >= self.limits.max_jobs
            && (self.running() >= self.limits.max_jobs
                || self.jobs.len() >= 2 * self.limits.max_jobs)
        {
            return Err(Refusal::TooManyJobs(self.limits.max_jobs));
        }
        let job = Arc::make_mut(
            self.jobs
                .entry(job_id)
                .or_insert_with(|| Arc::new(Job::unknown(job_id, node, at))),
        );
        if job.discovered && job.node != node && !node.is_empty() {
            job.node = node.to_owned();
        }
        Ok(job)
    }

    /// A job found running in the cgroup tree at start-up (see [`super::discovery`]): open
    /// since `found.start` (about), measured from `now`, with its steps' cgroups watched. A job
    /// already known is left alone (returns false).
    pub fn discovered(&mut self, found: &Discovered, now: EventTime) -> Result<bool, Refusal> {
        if self.jobs.contains_key(&found.job_id) {
            return Ok(false);
        }
        let max_steps = self.limits.max_steps;
        let start = found.start;
        let job = self.job_or_unknown(found.job_id, &found.node, start)?;
        job.start_seen = true;
        job.discovered = true;
        job.uid = found.uid;
        job.user.clone_from(&found.user);
        job.account.clone_from(&found.account);
        job.partition.clone_from(&found.partition);
        job.cluster.clone_from(&found.cluster);
        job.array_job_id = found.array_job_id;
        job.array_task_id = found.array_task_id;
        job.sluid.clone_from(&found.sluid);
        job.cpus = found.cpus.clone();
        match &found.gpus {
            Ok(gpus) => job.gpus.clone_from(gpus),
            Err(why) => job.gpus_unknown = Some(why.clone()),
        }
        job.gaps.push(Gap::new(
            start.unix_ns.min(now.unix_ns),
            now.unix_ns,
            format!(
                "{DISCOVERED_GAP}: it found the job in the cgroup tree when it started, and \
                 measured it from then on (the start is the job cgroup's modification time)"
            ),
            false,
        ));
        for (id, path) in found.steps.iter().take(max_steps) {
            let step = step_mut(job, *id, max_steps)?;
            step.watched = Some(path.clone());
        }
        Ok(true)
    }

    /// JobStart. A repeated JobStart for an open job only fills what was unknown (a job first
    /// seen through a step event); its start stays the first one seen.
    pub fn job_start(&mut self, m: &JobStart, at: EventTime) -> Result<Vec<Action>, Refusal> {
        if self.late_copy(m.ids.job_id, at) {
            return Ok(Vec::new());
        }
        let job_id = m.ids.job_id;
        let fresh = !self.jobs.contains_key(&job_id);
        let job = self.job_or_unknown(job_id, &m.node, at)?;
        job.uid = Some(m.uid);
        job.gid = Some(m.gid);
        job.user = Some(m.user.clone());
        job.array_job_id = m.ids.array_job_id.or(job.array_job_id);
        job.array_task_id = m.ids.array_task_id.or(job.array_task_id);
        job.account.clone_from(&m.account);
        job.partition.clone_from(&m.partition);
        job.cluster.clone_from(&m.cluster);
        job.gpus.clone_from(&m.gpus);
        if !m.cpus.is_empty() {
            job.cpus = m.cpus.clone();
        }
        job.report = m.report;
        if m.sluid.is_some() {
            job.sluid.clone_from(&m.sluid);
        }
        if let Some(list) = &m.node_list {
            match ergon_protocol::hostlist::expand(list) {
                Ok(_) => job.node_list = Some(list.trim().to_owned()),
                Err(e) => tracing::warn!(
                    job = job_id,
                    "the job's node list {list:?} is not one: {e}; its manifest will not list the job's nodes"
                ),
            }
        }
        // The plugin's allocation is the truth: a discovered job's unknown GPUs are known now.
        job.gpus_unknown = None;
        job.work_dir.clone_from(&m.work_dir);
        job.stdout_path.clone_from(&m.stdout_path);
        // A job found in the cgroup tree at start-up whose JobStart comes after all (ergond
        // started between Slurm creating its cgroups and its prolog): the event is the truth.
        let promoted = job.discovered && at.unix_ns >= job.start.unix_ns;
        if promoted {
            job.discovered = false;
            job.gaps.retain(|g| !g.reason.starts_with(DISCOVERED_GAP));
        }
        if fresh || promoted {
            job.start_seen = true;
            job.start = at;
            return Ok(vec![Action::Read {
                job_id,
                mark: Mark::JobStart,
                at,
            }]);
        }
        // Known already: either a duplicate JobStart (nothing to do) or a job first seen
        // through a step event, whose start ergond missed; its coverage stays partial.
        Ok(Vec::new())
    }

    /// StepStart: records the step, and asks for a reading and for its cgroup to be watched.
    pub fn step_start(&mut self, m: &StepStart, at: EventTime) -> Result<Vec<Action>, Refusal> {
        if self.late_copy(m.job_id, at) {
            return Ok(Vec::new());
        }
        let max_steps = self.limits.max_steps;
        let job = self.job_or_unknown(m.job_id, &m.node, at)?;
        if job.cluster.is_none() {
            job.cluster.clone_from(&m.cluster);
        }
        if job.sluid.is_none() {
            job.sluid.clone_from(&m.sluid);
        }
        job.uid = job.uid.or(Some(m.uid));
        job.array_job_id = job.array_job_id.or(m.array_job_id);
        job.array_task_id = job.array_task_id.or(m.array_task_id);
        // The job's CPUs: the extern step's set (the whole allocation on this node), else, until
        // it comes, the first step's (JobStart carries none when the plugin cannot tell).
        if (m.step == StepId::Extern || job.cpus.is_empty()) && !m.cpus.is_empty() {
            job.cpus = m.cpus.clone();
        }
        if job
            .steps
            .iter()
            .any(|s| s.id == m.step && s.start.is_some())
        {
            return Ok(Vec::new()); // duplicate
        }
        let watched = step_cgroup(&m.cgroups);
        let step = step_mut(job, m.step, max_steps)?;
        step.start = Some(at);
        step.cgroups.clone_from(&m.cgroups);
        step.cpus = m.cpus.clone();
        // Watch first, so that the start reading includes the cgroup's CPU time. A step whose
        // end came first (out of order) is not watched any more.
        let mut actions = Vec::with_capacity(2);
        if step.end.is_none() {
            if let Some(path) = watched {
                step.watched = Some(path.clone());
                actions.push(Action::Watch { path });
            }
        }
        actions.push(Action::Read {
            job_id: m.job_id,
            mark: Mark::StepStart(m.step),
            at,
        });
        Ok(actions)
    }

    /// StepEnd: asks for a reading and for the step's cgroup to be unwatched.
    pub fn step_end(&mut self, m: &StepEnd, at: EventTime) -> Result<Vec<Action>, Refusal> {
        if self.late_copy(m.job_id, at) {
            return Ok(Vec::new());
        }
        let max_steps = self.limits.max_steps;
        let job = self.job_or_unknown(m.job_id, &m.node, at)?;
        if job.cluster.is_none() {
            job.cluster.clone_from(&m.cluster);
        }
        let step = step_mut(job, m.step, max_steps)?;
        if step.end.is_some() {
            return Ok(Vec::new()); // duplicate
        }
        step.end = Some(at);
        step.exit_status = m.exit_status;
        let mut actions = vec![Action::Read {
            job_id: m.job_id,
            mark: Mark::StepEnd(m.step),
            at,
        }];
        if let Some(path) = step.watched.clone() {
            actions.push(Action::Unwatch { path });
        }
        Ok(actions)
    }

    /// JobEnd: asks for the final reading, unwatches steps still watched, then finishes the job.
    /// A repeated JobEnd does nothing.
    pub fn job_end(&mut self, m: &JobEnd, at: EventTime) -> Result<Vec<Action>, Refusal> {
        if self.late_copy(m.job_id, at) {
            return Ok(Vec::new());
        }
        let job = self.job_or_unknown(m.job_id, &m.node, at)?;
        if job.cluster.is_none() {
            job.cluster.clone_from(&m.cluster);
        }
        if job.end.is_some() {
            return Ok(Vec::new());
        }
        job.end = Some(at);
        let mut actions = vec![Action::Read {
            job_id: m.job_id,
            mark: Mark::JobEnd,
            at,
        }];
        for s in &job.steps {
            if s.end.is_none() {
                if let Some(path) = &s.watched {
                    actions.push(Action::Unwatch { path: path.clone() });
                }
            }
        }
        actions.push(Action::Finish { job_id: m.job_id });
        Ok(actions)
    }

    /// Jobs that have ended and wait for their manifest to be written.
    pub fn ended(&self) -> usize {
        self.jobs.values().filter(|j| j.end.is_some()).count()
    }

    /// Jobs started and not yet ended.
    pub fn running(&self) -> usize {
        self.jobs.values().filter(|j| j.end.is_none()).count()
    }

    /// The open jobs (for the journal).
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().map(|j| &**j)
    }

    /// Put back jobs from the journal (beyond the limit, the rest are returned).
    pub fn restore(&mut self, jobs: Vec<Job>) -> Vec<Job> {
        let mut refused = Vec::new();
        for job in jobs {
            if self.jobs.len() >= self.limits.max_jobs && !self.jobs.contains_key(&job.job_id) {
                refused.push(job);
            } else {
                self.jobs.insert(job.job_id, Arc::new(job));
            }
        }
        refused
    }

    /// A job, to change (restart recovery records gaps and ends).
    pub fn get_mut(&mut self, job_id: u32) -> Option<&mut Job> {
        self.jobs.get_mut(&job_id).map(Arc::make_mut)
    }

    /// Take an ended job out of the registry (after [`Action::Finish`]). `None` if it is not
    /// open or has not ended.
    pub fn take(&mut self, job_id: u32) -> Option<Job> {
        self.jobs.get(&job_id)?.end?;
        self.jobs
            .remove(&job_id)
            .map(|j| Arc::try_unwrap(j).unwrap_or_else(|j| (*j).clone()))
    }

    /// The open jobs, shared (cheap: the journal takes this under the lock and serialises it
    /// after).
    pub fn shared_jobs(&self) -> Vec<Arc<Job>> {
        self.jobs.values().cloned().collect()
    }

    /// Remove a finished job once its manifest is written, if it is still the same job (its
    /// start unchanged: a job id reused meanwhile stays).
    pub fn remove_written(&mut self, job_id: u32, start: EventTime) {
        if self
            .jobs
            .get(&job_id)
            .is_some_and(|j| j.end.is_some() && j.start == start)
        {
            if let Some(job) = self.jobs.remove(&job_id) {
                let end = job.end.map_or(start.unix_ns, |e| e.unix_ns);
                self.remember_closed(job_id, end);
            }
        }
    }

    /// What [`ergon_protocol::Request::QueryJob`] answers; `energy_j` is filled by the shell.
    pub fn snapshot(&self, job_id: u32) -> Option<JobSnapshot> {
        let job = self.jobs.get(&job_id)?;
        Some(JobSnapshot {
            job_id,
            uid: job.uid.unwrap_or(u32::MAX),
            started: ergon_protocol::Timestamp::from_unix_ns(job.start.unix_ns),
            steps: job.steps.iter().map(|s| s.id).collect(),
            energy_j: None,
            coverage: Some(if job.start_seen { 1.0 } else { 0.0 }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ergon_protocol::{JobIds, Timestamp};

    fn t(s: u64) -> EventTime {
        EventTime {
            unix_ns: 1_700_000_000_000_000_000 + s * 1_000_000_000,
            mono_ns: s * 1_000_000_000,
        }
    }

    fn job_start(id: u32) -> JobStart {
        JobStart {
            ids: JobIds {
                job_id: id,
                array_job_id: None,
                array_task_id: None,
            },
            uid: 1000,
            gid: 1000,
            user: "alice".into(),
            account: Some("proj".into()),
            partition: Some("gpu".into()),
            cluster: Some("c1".into()),
            node: "n1".into(),
            gpus: vec![GpuAlloc {
                index: 0,
                minor: Some(3),
                mig: None,
            }],
            cpus: CpuSet::new(),
            report: None,
            work_dir: None,
            stdout_path: None,
            time: Timestamp::from_unix_ns(t(0).unix_ns),
            sluid: None,
            node_list: None,
        }
    }

    fn step_start(id: u32, step: StepId) -> StepStart {
        StepStart {
            cluster: None,
            job_id: id,
            array_job_id: Some(77),
            array_task_id: Some(2),
            step,
            uid: 1000,
            node: "n1".into(),
            cgroups: vec![
                CgroupPath {
                    controller: "memory".into(),
                    path: "/slurm_n1/uid_1000/job_5/step_0/task_0".into(),
                },
                CgroupPath {
                    controller: "cpuacct".into(),
                    path: "/slurm_n1/uid_1000/job_5/step_0/task_0".into(),
                },
            ],
            cpus: "0-3".parse().unwrap(),
            pid: None,
            tasks: None,
            time: Timestamp::default(),
            sluid: None,
        }
    }

    fn step_end(id: u32, step: StepId) -> StepEnd {
        StepEnd {
            cluster: None,
            job_id: id,
            step,
            node: "n1".into(),
            exit_status: Some(0),
            time: Timestamp::default(),
        }
    }

    fn job_end(id: u32) -> JobEnd {
        JobEnd {
            cluster: None,
            job_id: id,
            node: "n1".into(),
            time: Timestamp::default(),
        }
    }

    #[test]
    fn a_job_found_at_start_up_is_promoted_by_a_later_job_start() {
        let mut r = JobRegistry::default();
        let found = Discovered {
            job_id: 5,
            sluid: None,
            uid: Some(1000),
            user: None,
            account: None,
            partition: None,
            cluster: None,
            array_job_id: None,
            array_task_id: None,
            node: "n1".into(),
            start: t(0),
            cpus: CpuSet::new(),
            gpus: Err("not known".into()),
            steps: vec![(StepId::Extern, "slurm/job_5/step_extern".to_owned())],
        };
        assert!(r.discovered(&found, t(1)).unwrap());
        let j = r.get(5).unwrap();
        assert!(j.discovered && j.gaps.len() == 1);
        assert_eq!(j.gpus_unknown.as_deref(), Some("not known"));
        assert!(!r.discovered(&found, t(1)).unwrap());
        let a = r.job_start(&job_start(5), t(2)).unwrap();
        assert!(
            matches!(
                a[..],
                [Action::Read {
                    mark: Mark::JobStart,
                    ..
                }]
            ),
            "{a:?}"
        );
        let j = r.get(5).unwrap();
        assert!(!j.discovered && j.start_seen && j.gaps.is_empty());
        assert_eq!(j.gpus_unknown, None, "the plugin's allocation is the truth");
        assert_eq!(j.start, t(2));
        // A second JobStart is a duplicate.
        assert!(r.job_start(&job_start(5), t(3)).unwrap().is_empty());
    }

    #[test]
    fn a_jobs_cpus_come_from_its_first_step_until_the_extern_step_names_them() {
        let mut r = JobRegistry::default();
        r.job_start(&job_start(5), t(0)).unwrap();
        assert!(r.get(5).unwrap().cpus.is_empty());
        let mut batch = step_start(5, StepId::Batch);
        batch.cpus = "1".parse().unwrap();
        r.step_start(&batch, t(1)).unwrap();
        assert_eq!(r.get(5).unwrap().cpus, "1".parse().unwrap());
        let mut ext = step_start(5, StepId::Extern);
        ext.cpus = "0-3".parse().unwrap();
        r.step_start(&ext, t(2)).unwrap();
        assert_eq!(r.get(5).unwrap().cpus, "0-3".parse().unwrap());
        let mut s0 = step_start(5, StepId::Numbered(0));
        s0.cpus = "2".parse().unwrap();
        r.step_start(&s0, t(3)).unwrap();
        assert_eq!(
            r.get(5).unwrap().cpus,
            "0-3".parse().unwrap(),
            "a later step does not narrow it"
        );
    }

    #[test]
    fn full_lifecycle_asks_for_readings_watches_and_finishes() {
        let mut r = JobRegistry::default();
        let a = r.job_start(&job_start(5), t(0)).unwrap();
        assert_eq!(
            a,
            vec![Action::Read {
                job_id: 5,
                mark: Mark::JobStart,
                at: t(0)
            }]
        );
        let a = r
            .step_start(&step_start(5, StepId::Numbered(0)), t(1))
            .unwrap();
        let path = "slurm_n1/uid_1000/job_5/step_0".to_string();
        assert_eq!(
            a,
            vec![
                Action::Watch { path: path.clone() },
                Action::Read {
                    job_id: 5,
                    mark: Mark::StepStart(StepId::Numbered(0)),
                    at: t(1)
                },
            ]
        );
        let a = r.step_end(&step_end(5, StepId::Numbered(0)), t(3)).unwrap();
        assert_eq!(a[1], Action::Unwatch { path: path.clone() });
        assert!(r.take(5).is_none(), "not ended yet");
        let a = r.job_end(&job_end(5), t(4)).unwrap();
        assert_eq!(
            a,
            vec![
                Action::Read {
                    job_id: 5,
                    mark: Mark::JobEnd,
                    at: t(4)
                },
                Action::Finish { job_id: 5 }
            ]
        );
        let job = r.take(5).unwrap();
        assert!(job.start_seen);
        assert_eq!((job.start, job.end), (t(0), Some(t(4))));
        assert_eq!(job.array_job_id, Some(77), "array ids from the step");
        assert_eq!(job.user.as_deref(), Some("alice"));
        let s = job.step(StepId::Numbered(0)).unwrap();
        assert_eq!(
            (s.start, s.end, s.exit_status),
            (Some(t(1)), Some(t(3)), Some(0))
        );
        assert!(r.is_empty());
        assert!(r.get(5).is_none(), "gone");
    }

    #[test]
    fn end_of_an_unknown_job_is_recorded_with_start_unseen() {
        let mut r = JobRegistry::default();
        let a = r.step_end(&step_end(9, StepId::Batch), t(10)).unwrap();
        assert_eq!(a.len(), 1, "no cgroup to unwatch: {a:?}");
        let a = r.job_end(&job_end(9), t(11)).unwrap();
        assert_eq!(a.last(), Some(&Action::Finish { job_id: 9 }));
        let job = r.take(9).unwrap();
        assert!(!job.start_seen);
        assert_eq!(job.start, t(10), "first event seen");
        assert_eq!(job.uid, None);
        assert_eq!(job.steps[0].start, None);
    }

    #[test]
    fn duplicates_do_nothing_and_late_job_start_keeps_partial_coverage() {
        let mut r = JobRegistry::default();
        r.step_start(&step_start(5, StepId::Extern), t(1)).unwrap();
        assert!(r
            .step_start(&step_start(5, StepId::Extern), t(2))
            .unwrap()
            .is_empty());
        assert_eq!(
            r.get(5).unwrap().cpus.to_string(),
            "0-3",
            "extern step's set"
        );
        assert!(r.job_start(&job_start(5), t(3)).unwrap().is_empty());
        let job = r.get(5).unwrap();
        assert!(!job.start_seen);
        assert_eq!(job.start, t(1));
        assert_eq!(job.gpus.len(), 1, "fields filled in");
        r.job_end(&job_end(5), t(4)).unwrap();
        assert!(r.job_end(&job_end(5), t(5)).unwrap().is_empty());
        assert_eq!(r.get(5).unwrap().end, Some(t(4)));
        // JobEnd unwatches the steps that never ended.
        let mut r = JobRegistry::default();
        r.job_start(&job_start(6), t(0)).unwrap();
        r.step_start(&step_start(6, StepId::Batch), t(1)).unwrap();
        let a = r.job_end(&job_end(6), t(2)).unwrap();
        assert!(matches!(&a[1], Action::Unwatch { .. }), "{a:?}");
    }

    #[test]
    fn limits_refuse_instead_of_growing() {
        let mut r = JobRegistry::new(Limits {
            max_jobs: 2,
            max_steps: 1,
        });
        r.job_start(&job_start(1), t(0)).unwrap();
        r.job_start(&job_start(2), t(0)).unwrap();
        assert_eq!(
            r.job_start(&job_start(3), t(0)),
            Err(Refusal::TooManyJobs(2))
        );
        assert!(r.job_end(&job_end(3), t(0)).is_err());
        r.step_start(&step_start(1, StepId::Numbered(0)), t(1))
            .unwrap();
        assert!(matches!(
            r.step_start(&step_start(1, StepId::Numbered(1)), t(1)),
            Err(Refusal::TooManySteps { job_id: 1, max: 1 })
        ));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn query_snapshot_and_owner() {
        let mut r = JobRegistry::default();
        assert!(r.snapshot(5).is_none());
        r.job_start(&job_start(5), t(0)).unwrap();
        r.step_start(&step_start(5, StepId::Batch), t(1)).unwrap();
        assert_eq!(r.owner(5), Some(1000));
        let s = r.snapshot(5).unwrap();
        assert_eq!((s.uid, s.steps.as_slice()), (1000, &[StepId::Batch][..]));
        assert_eq!(s.coverage, Some(1.0));
    }

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

    #[test]
    fn a_job_first_seen_through_its_end_takes_the_cluster_the_event_names() {
        let mut r = JobRegistry::default();
        let mut end = job_end(9);
        end.cluster = Some("c9".into());
        r.job_end(&end, t(5)).unwrap();
        assert_eq!(r.take(9).unwrap().cluster.as_deref(), Some("c9"));
    }

    #[test]
    fn a_late_copy_of_a_finished_jobs_event_does_not_open_it_again() {
        let mut r = JobRegistry::default();
        r.job_start(&job_start(5), t(0)).unwrap();
        r.step_start(&step_start(5, StepId::Batch), t(1)).unwrap();
        r.job_end(&job_end(5), t(10)).unwrap();
        r.remove_written(5, t(0));
        assert_eq!(r.len(), 0);
        // The plugin queued these too (ergond answered after the plugin stopped waiting).
        assert!(r.job_start(&job_start(5), t(0)).unwrap().is_empty());
        assert!(r
            .step_start(&step_start(5, StepId::Batch), t(1))
            .unwrap()
            .is_empty());
        assert!(r.job_end(&job_end(5), t(10)).unwrap().is_empty());
        assert_eq!(r.len(), 0, "a late copy reopened the finished job");
        // Remembered across a restart (through the journal).
        let mut again = JobRegistry::default();
        again.restore_closed(&r.closed());
        assert!(again.job_start(&job_start(5), t(0)).unwrap().is_empty());
        assert_eq!(again.len(), 0);
        // The same id after the end is a new job (ids wrap).
        assert!(!r.job_start(&job_start(5), t(11)).unwrap().is_empty());
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_finished_jobs_remembered_are_bounded() {
        let mut r = JobRegistry::default();
        for id in 0..(CLOSED_REMEMBERED as u32 + 10) {
            r.remember_closed(id, 1);
        }
        assert_eq!(r.closed().len(), CLOSED_REMEMBERED);
        assert_eq!(r.closed_ids.len(), CLOSED_REMEMBERED);
        assert!(!r.closed_ids.contains_key(&0));
    }
}
