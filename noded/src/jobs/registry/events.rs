//! The events applied to the job table: a job found running at start-up, JobStart, StepStart,
//! StepEnd and JobEnd. Each returns the [`Action`]s the I/O shell must perform, in order.

use ergon_protocol::{Gap, JobEnd, JobStart, StepEnd, StepId, StepStart};

use super::job::{Discovered, EventTime, DISCOVERED_GAP};
use super::steps::{step_cgroup, step_mut};
use super::table::{JobRegistry, Refusal};

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

impl JobRegistry {
    /// A job found running in the cgroup tree at start-up (see [`crate::jobs::discovery`]): open
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
        if (m.step == StepId::Extern || job.memory_mib.is_none()) && m.job_mem_mb.is_some() {
            job.memory_mib = m.job_mem_mb;
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
}

#[cfg(test)]
mod tests {
    use ergon_protocol::CpuSet;

    use super::super::fixtures::{job_end, job_start, step_end, step_start, t};
    use super::*;

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
}
