//! The events the registry's tests apply.

use ergon_protocol::{
    CgroupPath, CpuSet, GpuAlloc, JobEnd, JobIds, JobStart, StepEnd, StepId, StepStart, Timestamp,
};

use super::job::EventTime;

pub(super) fn t(s: u64) -> EventTime {
    EventTime {
        unix_ns: 1_700_000_000_000_000_000 + s * 1_000_000_000,
        mono_ns: s * 1_000_000_000,
    }
}

pub(super) fn job_start(id: u32) -> JobStart {
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

pub(super) fn step_start(id: u32, step: StepId) -> StepStart {
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
        job_mem_mb: None,
    }
}

pub(super) fn step_end(id: u32, step: StepId) -> StepEnd {
    StepEnd {
        cluster: None,
        job_id: id,
        step,
        node: "n1".into(),
        exit_status: Some(0),
        time: Timestamp::default(),
    }
}

pub(super) fn job_end(id: u32) -> JobEnd {
    JobEnd {
        cluster: None,
        job_id: id,
        node: "n1".into(),
        time: Timestamp::default(),
    }
}
