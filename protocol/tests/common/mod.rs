//! Proptest strategies and settings shared by the integration tests.
#![allow(dead_code)]

use ergon_protocol::*;
use proptest::prelude::*;

/// `cases` unless `PROPTEST_CASES` is set, which then wins, as with proptest's defaults.
pub fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

pub fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9_./=-]{0,24}", ".{0,12}",]
}

pub fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text())
}

pub fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        -1e15..1e15f64,
        prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
    ]
}

pub fn timestamp() -> impl Strategy<Value = Timestamp> {
    any::<u64>().prop_map(Timestamp::from_unix_ns)
}

pub fn step_id() -> impl Strategy<Value = StepId> {
    prop_oneof![
        Just(StepId::Batch),
        Just(StepId::Extern),
        Just(StepId::Interactive),
        Just(StepId::Pending),
        (0u32..0xffff_fff0).prop_map(StepId::Numbered),
    ]
}

pub fn cpu_set() -> impl Strategy<Value = CpuSet> {
    prop_oneof![
        prop::collection::vec(0u32..512, 0..40).prop_map(|v| v.into_iter().collect::<CpuSet>()),
        prop::collection::vec(any::<u32>(), 0..8).prop_map(|v| v.into_iter().collect::<CpuSet>()),
    ]
}

pub fn job_ids() -> impl Strategy<Value = JobIds> {
    (any::<u32>(), any::<Option<u32>>(), any::<Option<u32>>()).prop_map(
        |(job_id, array_job_id, array_task_id)| JobIds {
            job_id,
            array_job_id,
            array_task_id,
        },
    )
}

pub fn gpu_alloc() -> impl Strategy<Value = GpuAlloc> {
    (any::<u32>(), any::<Option<u32>>()).prop_map(|(index, minor)| GpuAlloc {
        index,
        minor,
        mig: None,
    })
}

pub fn report_format() -> impl Strategy<Value = Option<ReportFormat>> {
    prop_oneof![
        Just(None),
        Just(Some(ReportFormat::Text)),
        Just(Some(ReportFormat::Json))
    ]
}

pub fn job_start() -> impl Strategy<Value = JobStart> {
    (
        (
            job_ids(),
            any::<u32>(),
            any::<u32>(),
            text(),
            opt_text(),
            opt_text(),
            opt_text(),
        ),
        (
            text(),
            prop::collection::vec(gpu_alloc(), 0..9),
            cpu_set(),
            report_format(),
        ),
        (opt_text(), opt_text(), timestamp()),
    )
        .prop_map(
            |(
                (ids, uid, gid, user, account, partition, cluster),
                (node, gpus, cpus, report),
                (work_dir, stdout_path, time),
            )| JobStart {
                ids,
                uid,
                gid,
                user,
                account,
                partition,
                cluster,
                node,
                gpus,
                cpus,
                report,
                work_dir,
                stdout_path,
                time,
                sluid: None,
                node_list: None,
            },
        )
}

pub fn cgroup_path() -> impl Strategy<Value = CgroupPath> {
    (
        prop_oneof![Just(String::new()), "[a-z_=]{1,12}"],
        "/[a-z0-9_/]{0,40}",
    )
        .prop_map(|(controller, path)| CgroupPath { controller, path })
}

pub fn step_start() -> impl Strategy<Value = StepStart> {
    (
        any::<u32>(),
        step_id(),
        any::<u32>(),
        text(),
        prop::collection::vec(cgroup_path(), 0..14),
        any::<Option<u32>>(),
        any::<Option<u32>>(),
        timestamp(),
        (
            any::<(Option<u32>, Option<u32>)>(),
            cpu_set(),
            prop::option::of(text()),
        ),
    )
        .prop_map(
            |(
                job_id,
                step,
                uid,
                node,
                cgroups,
                pid,
                tasks,
                time,
                ((array_job_id, array_task_id), cpus, cluster),
            )| StepStart {
                job_id,
                cluster,
                array_job_id,
                array_task_id,
                cpus,
                step,
                uid,
                node,
                cgroups,
                pid,
                tasks,
                time,
                sluid: None,
                job_mem_mb: None,
            },
        )
}

pub fn step_end() -> impl Strategy<Value = StepEnd> {
    (
        any::<u32>(),
        step_id(),
        text(),
        any::<Option<i32>>(),
        timestamp(),
        prop::option::of(text()),
    )
        .prop_map(|(job_id, step, node, exit_status, time, cluster)| StepEnd {
            job_id,
            cluster,
            step,
            node,
            exit_status,
            time,
        })
}

pub fn job_end() -> impl Strategy<Value = JobEnd> {
    (any::<u32>(), text(), timestamp(), prop::option::of(text())).prop_map(
        |(job_id, node, time, cluster)| JobEnd {
            job_id,
            cluster,
            node,
            time,
        },
    )
}

pub fn job_snapshot() -> impl Strategy<Value = JobSnapshot> {
    (
        any::<u32>(),
        any::<u32>(),
        timestamp(),
        prop::collection::vec(step_id(), 0..20),
        proptest::option::of(finite()),
        proptest::option::of(0.0..=1.0f64),
    )
        .prop_map(
            |(job_id, uid, started, steps, energy_j, coverage)| JobSnapshot {
                job_id,
                uid,
                started,
                steps,
                energy_j,
                coverage,
            },
        )
}

pub fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        text().prop_map(|client| Request::Hello { client }),
        job_start().prop_map(Request::JobStart),
        job_end().prop_map(Request::JobEnd),
        step_start().prop_map(Request::StepStart),
        step_end().prop_map(Request::StepEnd),
        any::<u32>().prop_map(|job_id| Request::QueryJob { job_id }),
        Just(Request::Ping),
    ]
}

pub fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Malformed),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::PermissionDenied),
        Just(ErrorCode::UnknownJob),
        Just(ErrorCode::Busy),
        Just(ErrorCode::Internal),
    ]
}

pub fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (text(), any::<u16>()).prop_map(|(server, version)| Reply::Hello { server, version }),
        Just(Reply::Ok),
        (error_code(), text()).prop_map(|(code, reason)| Reply::Error { code, reason }),
        job_snapshot().prop_map(Reply::Job),
        Just(Reply::Pong),
    ]
}
