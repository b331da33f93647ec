//! The job table: the jobs open on this node, bounded by [`Limits`] (an event beyond them is
//! refused: [`Refusal`]), and the finished jobs remembered so that a late copy of their events
//! does not open them again. The events that change it are in [`super::events`].

use std::collections::BTreeMap;
use std::sync::Arc;

use ergon_protocol::JobSnapshot;

use super::job::{EventTime, Job};

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

/// How many finished jobs the registry remembers (see [`JobRegistry::closed`]).
pub const CLOSED_REMEMBERED: usize = 4096;

/// The jobs open on this node; see the module documentation.
#[derive(Debug, Default)]
pub struct JobRegistry {
    /// Copy-on-write: the journal's snapshot clones the `Arc`s, not the jobs.
    pub(super) jobs: BTreeMap<u32, Arc<Job>>,
    pub(super) limits: Limits,
    /// The last [`CLOSED_REMEMBERED`] jobs whose manifest was written, with their end (Unix
    /// ns), oldest first; `closed_ids` indexes them.
    closed: std::collections::VecDeque<(u32, u64)>,
    closed_ids: std::collections::HashMap<u32, u64>,
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
    pub(super) fn late_copy(&self, job_id: u32, at: EventTime) -> bool {
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

    /// The job `job_id`, created (first seen at `at`, on `node`) if it is not open; refused
    /// when the table is full.
    pub(super) fn job_or_unknown(
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

    /// Take an ended job out of the registry (after [`super::Action::Finish`]). `None` if it is not
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
    use ergon_protocol::StepId;

    use super::super::fixtures::{job_end, job_start, step_start, t};
    use super::*;

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
