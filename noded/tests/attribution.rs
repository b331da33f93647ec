//! The attribution model (`ergond::attribution`): conservation for random nodes, the rules one
//! by one (exclusive and shared GPUs, MIG, CPU time ratio, idle by cores, idle policy, OS time,
//! unallocated GPUs), refusal of invalid inputs, the CPU-time helpers and the accumulator.

use ergon_protocol::CpuSet;
use ergond::attribution::{
    attribute, check_conservation, cpus_per_socket, split_cpu_time, Accumulator, AttributionConfig,
    AttributionError, ConservationError, EstimateReason, GpuHolder, GpuInterval, GpuUsage,
    IdlePolicy, IntervalAttribution, IntervalInputs, MigInstance, SocketInterval, SocketJob,
};
use ergond::counter::Support;
use proptest::prelude::*;

const BY_CORES: AttributionConfig = AttributionConfig {
    cpu_idle: IdlePolicy::ByAllocatedCpus,
    rest_of_node: ergond::attribution::RestRule::Allocation,
    rest_cpu_weight: 1.0,
    rest_gpu_weight: 1.0,
    rest_mem_weight: 0.0,
};
const NODE_IDLE: AttributionConfig = AttributionConfig {
    cpu_idle: IdlePolicy::NodeIdle,
    rest_of_node: ergond::attribution::RestRule::Allocation,
    rest_cpu_weight: 1.0,
    rest_gpu_weight: 1.0,
    rest_mem_weight: 0.0,
};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

macro_rules! assert_close {
    ($a:expr, $b:expr) => {{
        let (a, b): (f64, f64) = ($a, $b);
        assert!(
            close(a, b),
            "{} = {a} but {} = {b}",
            stringify!($a),
            stringify!($b)
        );
    }};
}

fn whole(minor: u32, energy: f64, holders: &[(u32, Option<f64>)]) -> GpuInterval<u32> {
    GpuInterval {
        minor,
        energy_j: Support::Supported(energy),
        idle_power_w: None,
        usage: GpuUsage::Whole(
            holders
                .iter()
                .map(|&(job, utilisation)| GpuHolder { job, utilisation })
                .collect(),
        ),
    }
}

fn socket(
    id: u32,
    package: f64,
    busy: f64,
    total: f64,
    cpus: u32,
    jobs: &[(u32, f64, u32)],
) -> SocketInterval<u32> {
    SocketInterval {
        socket: id,
        package_j: Support::Supported(package),
        dram_j: Support::Unsupported("no DRAM domain".into()),
        busy_cpu_s: busy,
        total_cpu_s: total,
        cpus,
        jobs: jobs
            .iter()
            .map(|&(job, cpu_s, allocated_cpus)| SocketJob {
                job,
                cpu_s,
                allocated_cpus,
            })
            .collect(),
    }
}

fn inputs(gpus: Vec<GpuInterval<u32>>, sockets: Vec<SocketInterval<u32>>) -> IntervalInputs<u32> {
    IntervalInputs {
        duration_s: 1.0,
        gpus,
        sockets,
    }
}

fn run(i: &IntervalInputs<u32>, config: AttributionConfig) -> IntervalAttribution<u32> {
    let out = attribute(i, &config).expect("valid inputs");
    check_conservation(i, &out).expect("conserved");
    out
}

fn package(out: &IntervalAttribution<u32>, job: u32, socket: u32) -> f64 {
    out.jobs[&job].sockets[&socket].package_j.unwrap()
}

#[test]
fn an_exclusive_gpu_gets_all_its_energy_and_is_not_estimated() {
    let i = inputs(
        vec![
            whole(3, 250.0, &[(7, Some(0.0))]),
            whole(4, 90.0, &[(8, None)]),
        ],
        vec![],
    );
    let out = run(&i, BY_CORES);
    assert_eq!(out.jobs[&7].gpus[&3], Some(250.0));
    assert_eq!(out.jobs[&8].gpus[&4], Some(90.0));
    assert!(!out.jobs[&7].is_estimated());
    assert_eq!(out.node.gpu.unattributed_j, 0.0);
    assert_eq!(out.node.measured_j(), 340.0);
}

#[test]
fn a_gpu_held_by_no_job_is_unattributed() {
    let i = inputs(
        vec![whole(0, 120.0, &[]), whole(1, 80.0, &[(5, None)])],
        vec![],
    );
    let out = run(&i, BY_CORES);
    assert_eq!(out.node.gpu.unattributed_j, 120.0);
    assert_eq!(out.node.idle_j(), 0.0);
    assert_eq!(out.jobs[&5].gpu_j(), Some(80.0));
    assert_eq!(out.jobs.len(), 1);
}

#[test]
fn a_shared_gpu_is_split_by_utilisation_when_known_else_equally_and_marked() {
    let by_util = run(
        &inputs(
            vec![whole(2, 100.0, &[(1, Some(60.0)), (2, Some(20.0))])],
            vec![],
        ),
        BY_CORES,
    );
    assert_close!(by_util.jobs[&1].gpus[&2].unwrap(), 75.0);
    assert_close!(by_util.jobs[&2].gpus[&2].unwrap(), 25.0);
    assert!(by_util.jobs[&1]
        .estimated
        .contains(&EstimateReason::SharedGpuByUtilisation { minor: 2 }));

    // One holder's utilisation unknown: equal split.
    let equal = run(
        &inputs(
            vec![whole(
                2,
                90.0,
                &[(1, Some(60.0)), (2, None), (3, Some(1.0))],
            )],
            vec![],
        ),
        BY_CORES,
    );
    for job in 1..=3 {
        assert_close!(equal.jobs[&job].gpus[&2].unwrap(), 30.0);
        assert!(equal.jobs[&job]
            .estimated
            .contains(&EstimateReason::SharedGpuEqual { minor: 2 }));
    }
}

#[test]
fn a_shared_gpus_idle_floor_is_split_equally_and_only_the_rest_by_utilisation() {
    let mut gpu = whole(0, 300.0, &[(1, Some(3.0)), (2, Some(1.0))]);
    gpu.idle_power_w = Some(50.0);
    let mut i = inputs(vec![gpu], vec![]);
    i.duration_s = 2.0; // floor 100 J: 50 each; active 200 J: 150 / 50
    let out = run(&i, BY_CORES);
    assert_close!(out.jobs[&1].gpus[&0].unwrap(), 200.0);
    assert_close!(out.jobs[&2].gpus[&0].unwrap(), 100.0);
}

fn mig(minor: u32, energy: f64, instances: &[(Option<u32>, u32, Option<f64>)]) -> GpuInterval<u32> {
    GpuInterval {
        minor,
        energy_j: Support::Supported(energy),
        idle_power_w: None,
        usage: GpuUsage::Mig {
            total_slices: 7,
            instances: instances
                .iter()
                .map(|&(job, slices, activity)| MigInstance {
                    job,
                    slices,
                    activity,
                })
                .collect(),
        },
    }
}

#[test]
fn mig_is_split_by_slice_size_unless_every_activity_is_known() {
    // 3g + 2g held, 1g unheld, 1 slice unconfigured: 3/7, 2/7 to jobs, 2/7 unattributed.
    let out = run(
        &inputs(
            vec![mig(
                0,
                700.0,
                &[(Some(1), 3, Some(0.5)), (Some(2), 2, None), (None, 1, None)],
            )],
            vec![],
        ),
        BY_CORES,
    );
    assert_close!(out.jobs[&1].gpus[&0].unwrap(), 300.0);
    assert_close!(out.jobs[&2].gpus[&0].unwrap(), 200.0);
    assert_close!(out.node.gpu.unattributed_j, 200.0);
    assert!(out.jobs[&1]
        .estimated
        .contains(&EstimateReason::MigBySliceSize { minor: 0 }));

    // All activities known: weights slices × activity = 1.5, 1.0, 0.5 of 3.0.
    let out = run(
        &inputs(
            vec![mig(
                0,
                600.0,
                &[
                    (Some(1), 3, Some(0.5)),
                    (Some(2), 2, Some(0.5)),
                    (None, 1, Some(0.5)),
                ],
            )],
            vec![],
        ),
        BY_CORES,
    );
    assert_close!(out.jobs[&1].gpus[&0].unwrap(), 300.0);
    assert_close!(out.jobs[&2].gpus[&0].unwrap(), 200.0);
    assert_close!(out.node.gpu.unattributed_j, 100.0);
    assert!(out.jobs[&2]
        .estimated
        .contains(&EstimateReason::MigByActivity { minor: 0 }));
}

#[test]
fn an_unsupported_gpu_is_reported_as_unsupported_not_zero() {
    let gpu = GpuInterval {
        minor: 1,
        energy_j: Support::Unsupported("NVML: not supported".into()),
        idle_power_w: None,
        usage: GpuUsage::Whole(vec![GpuHolder {
            job: 4,
            utilisation: None,
        }]),
    };
    let out = run(&inputs(vec![gpu], vec![]), BY_CORES);
    assert_eq!(out.jobs[&4].gpus[&1], None);
    assert_eq!(out.jobs[&4].gpu_j(), None);
    assert_eq!(out.node.measured_j(), 0.0);
}

#[test]
fn active_package_energy_follows_the_cpu_time_ratio() {
    // Busy 40 of 64 CPU-s, all of it in the two jobs (30:10): active = 100 × 40/64.
    let s = socket(0, 100.0, 40.0, 64.0, 64, &[(1, 30.0, 16), (2, 10.0, 16)]);
    let out = run(&inputs(vec![], vec![s.clone()]), NODE_IDLE);
    let (a, b) = (package(&out, 1, 0), package(&out, 2, 0));
    assert_close!(a / b, 3.0);
    assert_close!(a + b, 100.0 * 40.0 / 64.0);
    assert_close!(out.node.package.idle_j, 100.0 * 24.0 / 64.0);

    // With idle by cores the jobs' idle shares are equal (16 CPUs each), so the active parts
    // still differ 3:1.
    let out = run(&inputs(vec![], vec![s]), BY_CORES);
    let idle_each = 100.0 * 24.0 / 64.0 * 16.0 / 64.0;
    assert_close!(
        (package(&out, 1, 0) - idle_each) / (package(&out, 2, 0) - idle_each),
        3.0
    );
}

#[test]
fn idle_energy_is_split_by_allocated_cpus() {
    // Nothing busy: all 80 J are idle; 4 and 12 of 32 CPUs allocated, 16 unallocated.
    let s = socket(0, 80.0, 0.0, 32.0, 32, &[(1, 0.0, 4), (2, 0.0, 12)]);
    let out = run(&inputs(vec![], vec![s]), BY_CORES);
    assert_close!(package(&out, 1, 0), 10.0);
    assert_close!(package(&out, 2, 0), 30.0);
    assert_close!(out.node.package.idle_j, 40.0);
    assert_eq!(out.node.package.unattributed_j, 0.0);
}

#[test]
fn node_idle_policy_keeps_all_idle_energy_out_of_jobs() {
    let s = socket(0, 80.0, 0.0, 32.0, 32, &[(1, 0.0, 4), (2, 0.0, 12)]);
    let out = run(&inputs(vec![], vec![s]), NODE_IDLE);
    assert_eq!(package(&out, 1, 0), 0.0);
    assert_eq!(package(&out, 2, 0), 0.0);
    assert_close!(out.node.package.idle_j, 80.0);
}

#[test]
fn a_job_with_no_cpu_time_gets_only_its_idle_share() {
    // 16 of 32 CPU-s busy: 8 in job 1, 8 in the OS. Job 2 holds 8 CPUs and ran nothing.
    let s = socket(0, 64.0, 16.0, 32.0, 32, &[(1, 8.0, 8), (2, 0.0, 8)]);
    let out = run(&inputs(vec![], vec![s]), BY_CORES);
    let idle = 64.0 * 16.0 / 32.0;
    assert_close!(package(&out, 2, 0), idle * 8.0 / 32.0);
    assert_close!(package(&out, 1, 0), 16.0 + idle * 8.0 / 32.0);
    // The OS's busy time is unattributed, not idle.
    assert_close!(out.node.package.unattributed_j, 16.0);
    assert_close!(out.node.package.idle_j, idle * 16.0 / 32.0);
}

#[test]
fn dram_is_split_like_the_package() {
    let mut s = socket(1, 100.0, 30.0, 40.0, 40, &[(1, 20.0, 10), (2, 10.0, 10)]);
    s.dram_j = Support::Supported(10.0);
    let out = run(&inputs(vec![], vec![s]), BY_CORES);
    for job in [1, 2] {
        let sh = out.jobs[&job].sockets[&1];
        assert_close!(sh.dram_j.unwrap() * 10.0, sh.package_j.unwrap());
    }
    let total = out.jobs[&1].total_j();
    assert_close!(
        total,
        out.jobs[&1].package_j().unwrap() + out.jobs[&1].dram_j().unwrap()
    );
}

#[test]
fn cpu_time_above_busy_time_is_absorbed_not_amplified() {
    // Sampling skew: jobs report 33 CPU-s on a socket whose /proc/stat says 32 busy of 32.
    let s = socket(0, 50.0, 32.0, 32.0, 32, &[(1, 22.0, 16), (2, 11.0, 16)]);
    let out = run(&inputs(vec![], vec![s]), BY_CORES);
    assert_close!(package(&out, 1, 0) + package(&out, 2, 0), 50.0);
    assert_close!(package(&out, 1, 0) / package(&out, 2, 0), 2.0);
}

#[test]
fn invalid_numbers_are_refused_with_a_clear_error() {
    let good = || {
        inputs(
            vec![whole(0, 10.0, &[(1, None)])],
            vec![socket(0, 10.0, 1.0, 2.0, 2, &[(1, 1.0, 2)])],
        )
    };
    let cases: Vec<(IntervalInputs<u32>, &str)> = vec![
        (
            {
                let mut i = good();
                i.gpus[0].energy_j = Support::Supported(f64::NAN);
                i
            },
            "gpu minor 0 energy",
        ),
        (
            {
                let mut i = good();
                i.gpus[0].energy_j = Support::Supported(-1.0);
                i
            },
            "gpu minor 0 energy",
        ),
        (
            {
                let mut i = good();
                i.sockets[0].package_j = Support::Supported(f64::INFINITY);
                i
            },
            "socket 0 package energy",
        ),
        (
            {
                let mut i = good();
                i.sockets[0].dram_j = Support::Supported(-0.5);
                i
            },
            "socket 0 DRAM energy",
        ),
        (
            {
                let mut i = good();
                i.sockets[0].busy_cpu_s = f64::NAN;
                i
            },
            "socket 0 busy CPU time",
        ),
        (
            {
                let mut i = good();
                i.sockets[0].jobs[0].cpu_s = -3.0;
                i
            },
            "job 1 CPU time on socket 0",
        ),
        (
            {
                let mut i = good();
                i.gpus[0].usage = GpuUsage::Whole(vec![
                    GpuHolder {
                        job: 1,
                        utilisation: Some(f64::NAN),
                    },
                    GpuHolder {
                        job: 2,
                        utilisation: Some(1.0),
                    },
                ]);
                i
            },
            "job 1 utilisation of gpu minor 0",
        ),
        (
            {
                let mut i = good();
                i.gpus[0].idle_power_w = Some(-5.0);
                i
            },
            "gpu minor 0 idle power",
        ),
        (
            {
                let mut i = good();
                i.duration_s = f64::NAN;
                i
            },
            "interval duration",
        ),
    ];
    for (i, what) in cases {
        match attribute(&i, &BY_CORES) {
            Err(e @ AttributionError::InvalidValue { .. }) => {
                let msg = e.to_string();
                assert!(msg.starts_with(what), "{msg:?} should name {what:?}");
                assert!(msg.contains("finite and non-negative"), "{msg}");
            }
            other => panic!("{what}: expected InvalidValue, got {other:?}"),
        }
    }
}

#[test]
fn inconsistent_inputs_are_refused() {
    let dup_gpu = inputs(vec![whole(0, 1.0, &[]), whole(0, 1.0, &[])], vec![]);
    assert_eq!(
        attribute(&dup_gpu, &BY_CORES),
        Err(AttributionError::DuplicateGpu { minor: 0 })
    );
    let dup_socket = inputs(
        vec![],
        vec![
            socket(1, 1.0, 0.0, 1.0, 1, &[]),
            socket(1, 1.0, 0.0, 1.0, 1, &[]),
        ],
    );
    assert_eq!(
        attribute(&dup_socket, &BY_CORES),
        Err(AttributionError::DuplicateSocket { socket: 1 })
    );
    let dup_job = inputs(
        vec![],
        vec![socket(0, 1.0, 0.0, 1.0, 1, &[(3, 0.0, 1), (3, 0.0, 0)])],
    );
    assert!(matches!(
        attribute(&dup_job, &BY_CORES),
        Err(AttributionError::DuplicateJob { .. })
    ));
    let dup_holder = inputs(vec![whole(0, 1.0, &[(3, None), (3, None)])], vec![]);
    assert!(matches!(
        attribute(&dup_holder, &BY_CORES),
        Err(AttributionError::DuplicateJob { .. })
    ));
    let busy = inputs(vec![], vec![socket(0, 1.0, 5.0, 4.0, 4, &[])]);
    assert!(matches!(
        attribute(&busy, &BY_CORES),
        Err(AttributionError::BusyExceedsTotal { .. })
    ));
    let too_many = inputs(
        vec![mig(0, 1.0, &[(Some(1), 4, None), (Some(2), 4, None)])],
        vec![],
    );
    assert!(matches!(
        attribute(&too_many, &BY_CORES),
        Err(AttributionError::BadMigLayout {
            used: 8,
            total: 7,
            ..
        })
    ));
    let empty_instance = inputs(vec![mig(0, 1.0, &[(Some(1), 0, None)])], vec![]);
    assert!(matches!(
        attribute(&empty_instance, &BY_CORES),
        Err(AttributionError::BadMigLayout { .. })
    ));
}

#[test]
fn check_conservation_catches_a_leak() {
    let i = inputs(
        vec![whole(0, 100.0, &[(1, None)])],
        vec![socket(0, 50.0, 10.0, 20.0, 20, &[(1, 5.0, 10)])],
    );
    let mut out = run(&i, BY_CORES);
    out.node.package.unattributed_j += 1e-3;
    assert!(matches!(
        check_conservation(&i, &out),
        Err(ConservationError::Imbalance { .. })
    ));

    let mut out = run(&i, BY_CORES);
    *out.jobs.get_mut(&1).unwrap().gpus.get_mut(&0).unwrap() = Some(99.0);
    assert!(matches!(
        check_conservation(&i, &out),
        Err(ConservationError::JobsMismatch { .. })
    ));

    let mut out = run(&i, BY_CORES);
    out.jobs
        .get_mut(&1)
        .unwrap()
        .sockets
        .get_mut(&0)
        .unwrap()
        .package_j = Some(f64::NAN);
    assert!(matches!(
        check_conservation(&i, &out),
        Err(ConservationError::InvalidShare { .. })
    ));
}

#[test]
fn cpu_time_is_split_across_sockets_by_allocated_cpus() {
    let sockets = vec![
        (0, CpuSet::parse("0-15,32-47").unwrap()),
        (1, CpuSet::parse("16-31,48-63").unwrap()),
    ];
    let job = CpuSet::parse("12-19,44-47").unwrap();
    let per_socket = cpus_per_socket(&job, &sockets);
    assert_eq!(per_socket, vec![(0, 8), (1, 4)]);
    let split = split_cpu_time(6.0, &per_socket).unwrap();
    assert_eq!(split.len(), 2);
    assert_close!(split[0].1, 4.0);
    assert_close!(split[1].1, 2.0);
    assert_eq!(split[0].1 + split[1].1, 6.0);

    assert_eq!(split_cpu_time(0.0, &[(0, 0)]).unwrap(), vec![(0, 0.0)]);
    assert!(matches!(
        split_cpu_time(1.0, &[(0, 0), (1, 0)]),
        Err(AttributionError::NoAllocatedCpus { .. })
    ));
    assert!(matches!(
        split_cpu_time(f64::NAN, &[(0, 1)]),
        Err(AttributionError::InvalidValue { .. })
    ));
}

#[test]
fn the_accumulator_sums_intervals() {
    let a = inputs(
        vec![whole(0, 100.0, &[(1, None)])],
        vec![socket(0, 40.0, 10.0, 20.0, 20, &[(1, 10.0, 10)])],
    );
    let b = inputs(
        vec![whole(0, 60.0, &[(2, None)])],
        vec![socket(0, 30.0, 5.0, 20.0, 20, &[(2, 5.0, 10)])],
    );
    let (oa, ob) = (run(&a, BY_CORES), run(&b, BY_CORES));
    let mut acc = Accumulator::new();
    acc.add(&oa);
    acc.add(&ob);
    acc.add(&oa);
    assert_eq!(acc.intervals(), 3);
    assert_close!(acc.job(&1).unwrap().gpu_j().unwrap(), 200.0);
    assert_close!(
        acc.job(&1).unwrap().package_j().unwrap(),
        2.0 * package(&oa, 1, 0)
    );
    assert_close!(acc.job(&2).unwrap().total_j(), ob.jobs[&2].total_j());
    assert_close!(acc.node().measured_j(), 2.0 * 140.0 + 90.0);
    assert!(acc.abs_conservation_error_j() < 1e-9);
    let taken = acc.take_job(&1).unwrap();
    assert!(acc.job(&1).is_none());
    assert_close!(taken.gpu_j().unwrap(), 200.0);
    // The node's balance keeps the ended job's energy.
    assert_close!(
        acc.node().jobs_j(),
        2.0 * oa.node.jobs_j() + ob.node.jobs_j()
    );

    let json = serde_json::to_string(&acc).unwrap();
    let back: Accumulator<u32> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, acc);
}

// ---------------------------------------------------------------------------------------------
// Random nodes

fn energy() -> impl Strategy<Value = Support<f64>> {
    prop_oneof![
        6 => (0.0..5000.0f64).prop_map(Support::Supported),
        1 => Just(Support::Supported(0.0)),
        1 => (0.0..1e-6f64).prop_map(Support::Supported),
        1 => Just(Support::Unsupported("unsupported".into())),
    ]
}

fn weight() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![3 => (0.0..100.0f64).prop_map(Some), 1 => Just(Some(0.0)), 1 => Just(None)]
}

fn gpu() -> impl Strategy<Value = GpuInterval<u32>> {
    let whole = proptest::collection::btree_map(0u32..8, weight(), 0..4).prop_map(|h| {
        GpuUsage::Whole(
            h.into_iter()
                .map(|(job, utilisation)| GpuHolder { job, utilisation })
                .collect(),
        )
    });
    let mig = proptest::collection::vec(
        (
            proptest::option::of(0u32..8),
            1u32..4,
            proptest::option::weighted(0.8, 0.0..1.0f64),
        ),
        0..4,
    )
    .prop_map(|inst| {
        let mut used = 0;
        let instances = inst
            .into_iter()
            .filter(|&(_, s, _)| {
                used += s;
                used <= 7
            })
            .map(|(job, slices, activity)| MigInstance {
                job,
                slices,
                activity,
            })
            .collect();
        GpuUsage::Mig {
            total_slices: 7,
            instances,
        }
    });
    (
        energy(),
        proptest::option::of(0.0..400.0f64),
        prop_oneof![3 => whole, 1 => mig],
    )
        .prop_map(|(energy_j, idle_power_w, usage)| GpuInterval {
            minor: 0,
            energy_j,
            idle_power_w,
            usage,
        })
}

fn sock() -> impl Strategy<Value = SocketInterval<u32>> {
    (
        energy(),
        energy(),
        0u32..129,
        0.0..=1.0f64,
        proptest::collection::btree_map(0u32..8, (0.0..=1.0f64, 0.0..=1.0f64), 0..5),
    )
        .prop_map(|(package_j, dram_j, cpus, busy, jobs)| {
            let total = f64::from(cpus) * 0.1;
            let busy_cpu_s = total * busy;
            SocketInterval {
                socket: 0,
                package_j,
                dram_j,
                busy_cpu_s,
                total_cpu_s: total,
                cpus,
                jobs: jobs
                    .into_iter()
                    .map(|(job, (t, c))| SocketJob {
                        job,
                        // Mostly within the busy time; sometimes above it (skew).
                        cpu_s: busy_cpu_s * t * 0.6,
                        allocated_cpus: (f64::from(cpus) * c * 0.5) as u32,
                    })
                    .collect(),
            }
        })
}

fn node() -> impl Strategy<Value = IntervalInputs<u32>> {
    (
        0.0..2.0f64,
        proptest::collection::vec(gpu(), 0..6),
        proptest::collection::vec(sock(), 0..4),
    )
        .prop_map(|(duration_s, mut gpus, mut sockets)| {
            for (n, g) in gpus.iter_mut().enumerate() {
                g.minor = n as u32;
            }
            for (n, s) in sockets.iter_mut().enumerate() {
                s.socket = n as u32;
            }
            IntervalInputs {
                duration_s,
                gpus,
                sockets,
            }
        })
}

fn config() -> impl Strategy<Value = AttributionConfig> {
    prop_oneof![Just(BY_CORES), Just(NODE_IDLE)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_nodes_conserve_energy(i in node(), config in config()) {
        let out = attribute(&i, &config).unwrap();
        prop_assert_eq!(check_conservation(&i, &out), Ok(()));
        // Independently of check_conservation: every joule measured is somewhere.
        let measured: f64 = i.gpus.iter().filter_map(|g| g.energy_j.supported().copied()).sum::<f64>()
            + i.sockets.iter().flat_map(|s| [s.package_j.supported().copied(), s.dram_j.supported().copied()]).flatten().sum::<f64>();
        let accounted: f64 = out.jobs.values().map(|j| j.total_j()).sum::<f64>() + out.node.idle_j() + out.node.unattributed_j();
        prop_assert!((measured - accounted).abs() <= 1e-9 * measured.max(1e-3), "measured {} accounted {}", measured, accounted);
        for b in [out.node.gpu, out.node.package, out.node.dram] {
            prop_assert!(b.idle_j >= 0.0 && b.unattributed_j >= 0.0);
        }
        // An exclusive GPU is never estimated; a job is estimated only through a shared or MIG GPU.
        for j in out.jobs.values() {
            for r in &j.estimated {
                let minor = match r {
                    EstimateReason::SharedGpuByUtilisation { minor } | EstimateReason::SharedGpuEqual { minor }
                    | EstimateReason::MigByActivity { minor } | EstimateReason::MigBySliceSize { minor } => *minor,
                };
                let g = &i.gpus[minor as usize];
                let shared = match &g.usage { GpuUsage::Whole(h) => h.len() > 1, GpuUsage::Mig { .. } => true };
                prop_assert!(shared);
            }
        }
        // Under NodeIdle, no job is charged for idle: a job with no CPU time gets 0 CPU energy.
        if config == NODE_IDLE {
            for s in &i.sockets {
                for sj in s.jobs.iter().filter(|sj| sj.cpu_s == 0.0) {
                    let share = out.jobs[&sj.job].sockets[&s.socket];
                    prop_assert_eq!(share.package_j.unwrap_or(0.0), 0.0);
                    prop_assert_eq!(share.dram_j.unwrap_or(0.0), 0.0);
                }
            }
        }
    }

    #[test]
    fn the_accumulator_conserves_over_many_intervals(
        intervals in proptest::collection::vec(node(), 1..12),
        config in config(),
    ) {
        let mut acc = Accumulator::new();
        let mut expected: std::collections::BTreeMap<u32, f64> = Default::default();
        let mut measured = 0.0;
        for i in &intervals {
            let out = attribute(i, &config).unwrap();
            for (job, share) in &out.jobs {
                *expected.entry(*job).or_default() += share.total_j();
            }
            measured += out.node.measured_j();
            acc.add(&out);
        }
        prop_assert_eq!(acc.intervals(), intervals.len() as u64);
        for (job, total) in &expected {
            let got = acc.job(job).unwrap().total_j();
            prop_assert!((got - total).abs() <= 1e-9 * total.max(1e-3), "job {}: {} vs {}", job, got, total);
        }
        let n = acc.node();
        prop_assert!((n.measured_j() - measured).abs() <= 1e-9 * measured.max(1e-3));
        let accounted = n.jobs_j() + n.idle_j() + n.unattributed_j();
        prop_assert!((n.measured_j() - accounted).abs() <= 1e-9 * measured.max(1e-3));
        prop_assert!(acc.abs_conservation_error_j() <= 1e-9 * measured.max(1e-3));
    }

    #[test]
    fn split_cpu_time_is_exact_and_proportional(
        cpu_s in 0.0..1e6f64,
        alloc in proptest::collection::vec(0u32..256, 1..5),
    ) {
        let allocated: Vec<(u32, u32)> = alloc.iter().enumerate().map(|(s, &n)| (s as u32, n)).collect();
        let total_cpus: u32 = alloc.iter().sum();
        match split_cpu_time(cpu_s, &allocated) {
            Ok(parts) => {
                let sum: f64 = parts.iter().map(|p| p.1).sum();
                prop_assert!((sum - cpu_s).abs() <= 1e-12 * cpu_s.max(1.0));
                for ((_, part), &n) in parts.iter().zip(&alloc) {
                    prop_assert!(*part >= 0.0);
                    if total_cpus > 0 {
                        let want = cpu_s * f64::from(n) / f64::from(total_cpus);
                        prop_assert!((part - want).abs() <= 1e-9 * cpu_s.max(1.0));
                    }
                }
            }
            Err(AttributionError::NoAllocatedCpus { .. }) => prop_assert!(total_cpus == 0 && cpu_s > 0.0),
            Err(e) => prop_assert!(false, "unexpected {}", e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The rest of the node by allocation: a job's weighted share of the node

#[test]
fn allocated_share_weighs_cpus_gpus_and_memory() {
    use ergond::attribution::{allocated_share, NodeResources};
    let node = NodeResources {
        cpus: 64,
        gpus: 4,
        memory_mib: Some(512 * 1024),
    };
    let mut c = AttributionConfig::default();
    // Defaults: CPUs and GPUs weigh 1, memory 0. 16 of 64 CPUs and 2 of 4 GPUs: (0.25 + 0.5) / 2.
    assert!(close(
        allocated_share(&c, &node, 16, 2, Some(256 * 1024)),
        0.375
    ));
    // Memory weighs in: half the node's memory. (0.25 + 0.5 + 2 × 0.5) / 4.
    c.rest_mem_weight = 2.0;
    assert!(close(
        allocated_share(&c, &node, 16, 2, Some(256 * 1024)),
        1.75 / 4.0
    ));
    // Memory not said: the CPU share stands in for it. (0.25 + 0.5 + 2 × 0.25) / 4.
    assert!(close(allocated_share(&c, &node, 16, 2, None), 1.25 / 4.0));
    // A node whose memory is unknown: memory drops out with its weight.
    let unknown = NodeResources {
        memory_mib: None,
        ..node
    };
    assert!(close(
        allocated_share(&c, &unknown, 16, 2, Some(256 * 1024)),
        0.375
    ));
    // A node without GPUs: GPUs drop out. (0.25 + 2 × 0.5) / 3.
    let cpu_only = NodeResources { gpus: 0, ..node };
    assert!(close(
        allocated_share(&c, &cpu_only, 16, 0, Some(256 * 1024)),
        1.25 / 3.0
    ));
    // Memory only (CPU and GPU weights 0): exactly the memory share; more than the node: 1.
    c.rest_cpu_weight = 0.0;
    c.rest_gpu_weight = 0.0;
    assert!(close(
        allocated_share(&c, &node, 16, 2, Some(128 * 1024)),
        0.25
    ));
    assert!(close(
        allocated_share(&c, &node, 16, 2, Some(1024 * 1024)),
        1.0
    ));
    // Every weight dropped out: nothing.
    assert_eq!(allocated_share(&c, &unknown, 16, 2, None), 0.0);
}

proptest! {
    /// Whatever the weights and allocations, a share is within 0..=1, and jobs that together
    /// hold at most the node never hold more than all of it.
    #[test]
    fn allocated_shares_stay_within_the_node(
        wc in 0.0f64..4.0, wg in 0.0f64..4.0, wm in 0.0f64..4.0,
        split in 1usize..8,
    ) {
        use ergond::attribution::{allocated_share, NodeResources};
        let c = AttributionConfig { rest_cpu_weight: wc, rest_gpu_weight: wg, rest_mem_weight: wm, ..AttributionConfig::default() };
        let node = NodeResources { cpus: 64, gpus: 8, memory_mib: Some(64_000) };
        let per = |n: usize| n / split;
        let total: f64 = (0..split)
            .map(|_| allocated_share(&c, &node, per(64), per(8), Some(64_000 / split as u64)))
            .sum();
        prop_assert!((0.0..=1.0 + 1e-12).contains(&total), "{total}");
    }
}
