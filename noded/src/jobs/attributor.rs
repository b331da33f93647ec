//! [`Attributor`]: feeds the pure [`crate::attribution`] model with the node's counters, one
//! interval at a time, and keeps each open job's running share.
//!
//! The job worker calls [`Attributor::advance`] with a [`Reading`] at every job or step event
//! (the counters interpolated at the event's exact instant) and, between events, about once a
//! second at the newest instant every sampled series covers. Each call closes the interval
//! since the previous one and attributes it to the jobs that were open *during* it: membership
//! changes ([`Attributor::job_start`], [`Attributor::step_start`], ...) are applied only after
//! the interval up to the event is closed. So a job's share telescopes exactly from its start
//! reading to its end reading (an exclusive GPU's share is its counter difference over the
//! job, to floating-point rounding), and per interval
//! `Σ jobs + idle + unattributed = measured` ([`crate::attribution::check_conservation`]).
//!
//! CPU time comes from each step's cgroup (cumulative in the kernel): its difference between
//! two readings is the job's CPU time in the interval, spread over sockets by the job's
//! allocated CPUs ([`split_cpu_time`]). Busy and total CPU time per socket come from
//! `/proc/stat`. A step's cgroup counts from its value at the step's start reading (or, when
//! that is unknown, from its first reading).
//!
//! Pure and serialisable: no clock, no I/O; the journal stores it as it is.

use std::collections::{BTreeMap, BTreeSet};

use ergon_protocol::{CpuSet, StepId};
use serde::{Deserialize, Serialize};

use super::reading::Reading;
use crate::attribution::{
    allocated_share, attribute, check_conservation, cpus_per_socket, split_cpu_time, split_rest,
    Accumulator, AttributionConfig, GpuHolder, GpuInterval, GpuUsage, IntervalInputs, JobShare,
    MigInstance, NodeBalance, NodeResources, RestJob, SocketInterval, SocketJob, SocketShare,
    WallBalance,
};
use crate::counter::Support;
use crate::gpustats::GpuJobStats;
use crate::sources::nvml::MigLayout;
use crate::sources::rapl::RaplDomain;

use super::facts::{gpu_key, NodeFacts};

/// Where a socket's energy and CPUs are, by position in the snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocketLayout {
    /// Physical package id.
    pub socket: u32,
    /// Its logical CPUs.
    pub cpus: CpuSet,
    /// Snapshot positions of its package zones (one per die).
    pub package_zones: Vec<usize>,
    /// Snapshot positions of its DRAM zones.
    pub dram_zones: Vec<usize>,
}

/// The node's sockets: every socket that has CPUs or a package/DRAM zone.
pub fn socket_layout(facts: &NodeFacts) -> Vec<SocketLayout> {
    let mut ids: BTreeSet<u32> = facts.sockets.iter().map(|(s, _)| *s).collect();
    ids.extend(facts.zones.iter().filter_map(|z| z.socket));
    ids.into_iter()
        .map(|socket| {
            let zones = |d: RaplDomain| -> Vec<usize> {
                facts
                    .zones
                    .iter()
                    .enumerate()
                    .filter(|(_, z)| z.socket == Some(socket) && z.domain == d)
                    .map(|(i, _)| i)
                    .collect()
            };
            SocketLayout {
                socket,
                cpus: facts
                    .sockets
                    .iter()
                    .find(|(s, _)| *s == socket)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default(),
                package_zones: zones(RaplDomain::Package),
                dram_zones: zones(RaplDomain::Dram),
            }
        })
        .collect()
}

/// One open job as the attributor sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Snapshot positions of its GPUs.
    pub gpus: Vec<usize>,
    /// The MIG instances it holds: (GPU snapshot position, GPU instance id).
    #[serde(default)]
    pub mig: Vec<(usize, u32)>,
    /// Its allocated CPUs (may be empty: then its CPU time is spread by socket size).
    pub cpus: CpuSet,
    /// Its memory allocation on this node, MiB, when Slurm said.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Its steps' watched cgroups.
    pub cgroups: BTreeSet<String>,
    /// The node's balance when it started (its interval's node figures are the difference).
    pub node_at_start: NodeBalance,
    /// Its share when each open step started.
    pub step_marks: BTreeMap<StepId, JobShare>,
    /// Ended steps' shares.
    pub steps: BTreeMap<StepId, JobShare>,
    /// Intervals attributed while it was open.
    pub intervals: u64,
    /// Per socket: its cumulative share at the end of each interval (monotonic ns, package J,
    /// DRAM J), thinned to at most [`MAX_CPU_TRACE`] points: the manifest's CPU power trace.
    pub cpu_trace: BTreeMap<u32, Vec<(u64, f64, f64)>>,
    /// Its steps' cgroup CPU time over the intervals attributed (ns).
    #[serde(default)]
    pub cpu_ns: u64,
    /// Per GPU it holds (by share key): how long its counter could not be read while the
    /// node's others were (a lost GPU, failing reads), ns. Its energy then is not measured.
    #[serde(default)]
    pub gpu_unread_ns: BTreeMap<u32, u64>,
    /// Average power of its share over the last interval attributed (W): its energy in the
    /// interval over the interval's length (`/metrics`' `ergon_job_power_watts`).
    #[serde(default)]
    pub last_power_w: Option<f64>,
    /// Per GPU it holds (by share key): its activity and health over the job so far.
    #[serde(default)]
    pub gpu_stats: BTreeMap<u32, GpuJobStats>,
    /// Its energy at the wall so far (node meter).
    #[serde(default)]
    pub wall: JobWall,
}

/// Most disagreement intervals kept per job ([`JobWall::disagreement_intervals`]).
pub const MAX_DISAGREEMENTS_KEPT: usize = 16;

/// A job's energy at the wall: its component energy over the intervals the node meter covered,
/// plus its part of the rest of the node over them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobWall {
    /// Intervals the meter covered while the job was open, total length, ns.
    pub metered_ns: u64,
    /// Intervals it did not cover (no meter reading bracketing an end), ns.
    pub unmetered_ns: u64,
    /// The job's component energy over the metered intervals, J.
    pub components_j: f64,
    /// Its part of the rest of the node over them, J.
    pub rest_j: f64,
    /// Metered intervals where the node's components exceeded the meter beyond its accuracy.
    pub disagreements: u64,
    /// The first [`MAX_DISAGREEMENTS_KEPT`] of them (monotonic ns).
    pub disagreement_intervals: Vec<(u64, u64)>,
}

impl JobWall {
    /// Its energy at the wall: components plus rest over the metered intervals, J.
    pub fn wall_j(&self) -> f64 {
        self.components_j + self.rest_j
    }
}

/// Most points kept per socket in [`Member::cpu_trace`]; beyond, every other point is dropped
/// (the trace's resolution halves, its cumulative values stay exact).
pub const MAX_CPU_TRACE: usize = 300;

/// What a job got, when it ends (kept with the job until its manifest is written, so the
/// journal carries it across a restart).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct JobResult {
    /// Its share of the node over its life.
    pub share: JobShare,
    /// The node's balance over the job's life (measured, idle, unattributed, all jobs).
    pub node: NodeBalance,
    /// Each step's share over the step's life (steps that overlap share the node's energy:
    /// each step gets the job's energy during its own interval).
    pub steps: BTreeMap<StepId, JobShare>,
    /// Intervals attributed while it was open.
    pub intervals: u64,
    /// See [`Member::cpu_trace`].
    pub cpu_trace: BTreeMap<u32, Vec<(u64, f64, f64)>>,
    /// See [`Member::cpu_ns`].
    #[serde(default)]
    pub cpu_ns: u64,
    /// See [`Member::gpu_unread_ns`].
    #[serde(default)]
    pub gpu_unread_ns: BTreeMap<u32, u64>,
    /// See [`Member::gpu_stats`].
    #[serde(default)]
    pub gpu_stats: BTreeMap<u32, GpuJobStats>,
    /// Its energy at the wall, when the node meter covered any of its intervals.
    #[serde(default)]
    pub wall: Option<JobWall>,
}

/// Counters of the attributor's own health, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct AttributorStats {
    /// Intervals attributed.
    pub intervals: u64,
    /// Intervals whose inputs the model refused (nothing attributed; logged).
    pub failed_intervals: u64,
    /// Intervals that failed the independent conservation check (logged).
    pub conservation_failures: u64,
    /// Readings older than the last closed interval (an event stamped before the previous
    /// periodic close): applied at that instant instead.
    pub late_readings: u64,
}

/// See the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attributor {
    config: AttributionConfig,
    /// Per GPU position: its device minor (NVML index + 1,000,000 when it has none).
    gpu_minors: Vec<u32>,
    /// Per GPU position: its MIG instances, when it is in MIG mode.
    #[serde(default)]
    gpu_mig: Vec<Option<MigLayout>>,
    sockets: Vec<SocketLayout>,
    last: Option<Reading>,
    members: BTreeMap<u32, Member>,
    acc: Accumulator<u32>,
    /// Last CPU time (ns) of each member cgroup.
    cg_last: BTreeMap<String, u64>,
    stats: AttributorStats,
    /// The node's energy at the wall since ergond started measuring it.
    #[serde(default)]
    wall: WallBalance,
    /// The node meter's accuracy, a fraction of its reading.
    #[serde(default)]
    meter_accuracy: f64,
    /// The node's memory, MiB, when known (the memory part of the rest-of-node allocation).
    #[serde(default)]
    node_memory_mib: Option<u64>,
}

fn balance_sub(a: &NodeBalance, b: &NodeBalance) -> NodeBalance {
    let mut out = *a;
    for (o, x) in [
        (&mut out.gpu, &b.gpu),
        (&mut out.package, &b.package),
        (&mut out.dram, &b.dram),
    ] {
        o.measured_j -= x.measured_j;
        o.jobs_j -= x.jobs_j;
        o.idle_j -= x.idle_j;
        o.unattributed_j -= x.unattributed_j;
    }
    out
}

fn opt_sub(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some((a - b).max(0.0)),
        (a, _) => a,
    }
}

/// `a - b`, entry by entry (a share's figures only grow, so this is the share between two
/// instants).
pub fn share_sub(a: &JobShare, b: &JobShare) -> JobShare {
    JobShare {
        gpus: a
            .gpus
            .iter()
            .map(|(m, v)| (*m, opt_sub(*v, b.gpus.get(m).copied().flatten())))
            .collect(),
        sockets: a
            .sockets
            .iter()
            .map(|(s, v)| {
                let o = b.sockets.get(s).copied().unwrap_or_default();
                (
                    *s,
                    SocketShare {
                        package_j: opt_sub(v.package_j, o.package_j),
                        dram_j: opt_sub(v.dram_j, o.dram_j),
                    },
                )
            })
            .collect(),
        estimated: a.estimated.clone(),
    }
}

impl Attributor {
    /// An attributor for the node described by `facts`.
    pub fn new(facts: &NodeFacts, config: AttributionConfig) -> Self {
        Self {
            config,
            gpu_minors: facts.gpus.iter().map(gpu_key).collect(),
            gpu_mig: facts.gpus.iter().map(|g| g.mig.clone()).collect(),
            sockets: socket_layout(facts),
            last: None,
            members: BTreeMap::new(),
            acc: Accumulator::new(),
            cg_last: BTreeMap::new(),
            stats: AttributorStats::default(),
            wall: WallBalance::default(),
            meter_accuracy: 0.05,
            node_memory_mib: facts.memory_mib,
        }
    }

    /// The node meter's stated accuracy, percent of its reading: components above the meter by
    /// more than this are a disagreement.
    pub fn set_meter_accuracy(&mut self, percent: f64) {
        self.meter_accuracy = percent / 100.0;
    }

    /// The node's energy at the wall so far.
    pub fn wall(&self) -> &WallBalance {
        &self.wall
    }

    /// Take the running state (open jobs, balance, baselines, last reading, counters) of a
    /// journaled attributor, keeping this one's configuration and node layout: a changed
    /// `cpu_idle` applies from the restart on.
    pub fn restore_state(&mut self, journaled: Attributor) {
        self.last = journaled.last;
        self.members = journaled.members;
        self.acc = journaled.acc;
        self.cg_last = journaled.cg_last;
        self.stats = journaled.stats;
        self.wall = journaled.wall;
    }

    /// Whether `other` was built for the same GPUs and sockets as this one.
    pub fn same_layout(&self, other: &Attributor) -> bool {
        let mig = |a: &Attributor, pos: usize| a.gpu_mig.get(pos).cloned().flatten();
        self.gpu_minors == other.gpu_minors
            && self.sockets == other.sockets
            && (0..self.gpu_minors.len()).all(|pos| mig(self, pos) == mig(other, pos))
    }

    /// The instant of the last closed interval (monotonic ns).
    pub fn last_at(&self) -> Option<u64> {
        self.last.as_ref().map(|r| r.at_mono_ns)
    }

    /// The last reading (the start of the interval now open).
    pub fn last(&self) -> Option<&Reading> {
        self.last.as_ref()
    }

    /// Replace the last reading (restart recovery maps the journal's reading onto the new
    /// sampler's counters and sets it here).
    pub fn set_last(&mut self, reading: Option<Reading>) {
        self.last = reading;
    }

    /// Health counters.
    pub fn stats(&self) -> AttributorStats {
        self.stats
    }

    /// The node's running balance since the attributor started.
    pub fn node(&self) -> &NodeBalance {
        self.acc.node()
    }

    /// The accumulator (conservation figures for `/metrics`).
    pub fn accumulator(&self) -> &Accumulator<u32> {
        &self.acc
    }

    /// How many open jobs hold each GPU (by snapshot position).
    pub fn holders_per_gpu(&self) -> Vec<usize> {
        (0..self.gpu_minors.len())
            .map(|pos| {
                self.members
                    .values()
                    .filter(|m| m.gpus.contains(&pos))
                    .count()
            })
            .collect()
    }

    /// Open jobs.
    pub fn members(&self) -> &BTreeMap<u32, Member> {
        &self.members
    }

    /// A job's share so far, if it is open.
    pub fn share(&self, job_id: u32) -> Option<JobShare> {
        self.members.get(&job_id)?;
        Some(self.acc.job(&job_id).cloned().unwrap_or_default())
    }

    /// Close the interval from the last reading to `r` and attribute it to the open jobs.
    /// The first reading only sets the start. A reading not after the last one is counted
    /// in [`AttributorStats::late_readings`] and closes nothing.
    pub fn advance(&mut self, r: &Reading) {
        let Some(last) = &self.last else {
            self.move_baselines(r);
            self.last = Some(r.clone());
            return;
        };
        if r.at_mono_ns <= last.at_mono_ns {
            if r.at_mono_ns < last.at_mono_ns {
                self.stats.late_readings += 1;
            }
            return;
        }
        let inputs = self.inputs(last, r);
        let last_meter = (last.at_mono_ns, last.meter);
        let cpu_ns: Vec<(u32, u64)> = self
            .members
            .iter()
            .map(|(&job, m)| (job, self.member_cpu_ns(m, r)))
            .collect();
        for (job, ns) in cpu_ns {
            if let Some(m) = self.members.get_mut(&job) {
                m.cpu_ns += ns;
            }
        }
        // A held GPU not read in this interval while the node's other series were: that
        // stretch of its energy is not the job's (nor anyone's). An interval with nothing read
        // at all is ergond not measuring, which the job's gaps say.
        let anything_read = (0..last.gpus.len()).any(|p| last.gpu_delta(r, p).is_some())
            || (0..last.zones.len()).any(|z| last.zone_delta(r, z).is_some());
        if anything_read {
            let dur = r.at_mono_ns - last.at_mono_ns;
            let unread: Vec<usize> = (0..self.gpu_minors.len())
                .filter(|&p| last.gpu_delta(r, p).is_none())
                .collect();
            if !unread.is_empty() {
                for m in self.members.values_mut() {
                    for &p in m.gpus.iter().filter(|p| unread.contains(p)) {
                        *m.gpu_unread_ns.entry(self.gpu_minors[p]).or_insert(0) += dur;
                    }
                }
            }
        }
        match attribute(&inputs, &self.config) {
            Ok(out) => {
                if let Err(e) = check_conservation(&inputs, &out) {
                    self.stats.conservation_failures += 1;
                    tracing::error!(error = %e, "attribution failed its conservation check");
                }
                self.acc.add(&out);
                self.stats.intervals += 1;
                self.wall_interval(last_meter, r, &out);
                for (job, m) in self.members.iter_mut() {
                    m.intervals += 1;
                    if inputs.duration_s > 0.0 {
                        let j = out.jobs.get(job).map_or(0.0, JobShare::total_j);
                        m.last_power_w = Some(j / inputs.duration_s);
                    }
                    let Some(share) = self.acc.job(job) else {
                        continue;
                    };
                    for (socket, sh) in &share.sockets {
                        let t = m
                            .cpu_trace
                            .entry(*socket)
                            .or_insert_with(|| Vec::with_capacity(MAX_CPU_TRACE + 1));
                        t.push((
                            r.at_mono_ns,
                            sh.package_j.unwrap_or(0.0),
                            sh.dram_j.unwrap_or(0.0),
                        ));
                        if t.len() > MAX_CPU_TRACE {
                            let mut k = 0;
                            t.retain(|_| {
                                k += 1;
                                k % 2 == 1
                            });
                        }
                    }
                }
            }
            Err(e) => {
                self.stats.failed_intervals += 1;
                tracing::warn!(error = %e, "an interval could not be attributed");
            }
        }
        // The GPUs' statistics since the last reading, to the jobs that held them.
        for m in self.members.values_mut() {
            for &p in &m.gpus {
                if let Some(Some(w)) = r.gpu_stats.get(p) {
                    m.gpu_stats
                        .entry(self.gpu_minors[p])
                        .or_insert_with(|| GpuJobStats::starting(None))
                        .add(w);
                }
            }
        }
        self.move_baselines(r);
        self.last = Some(r.clone());
    }

    /// Move the member cgroups' baselines on to `r`, whether or not its interval was
    /// attributed; a cgroup first seen now counts from here.
    /// The interval's energy at the wall: the meter's energy less the components', split
    /// between the open jobs by the configured rule ([`split_rest`]).
    fn wall_interval(
        &mut self,
        (from_ns, from_meter): (u64, Option<f64>),
        r: &Reading,
        out: &crate::attribution::IntervalAttribution<u32>,
    ) {
        let dur = r.at_mono_ns.saturating_sub(from_ns);
        let meter_j = match (from_meter, r.meter) {
            (Some(a), Some(b)) if b >= a => b - a,
            _ => {
                // Not metered (no meter, or its readings do not bracket both ends).
                if r.meter.is_some() || from_meter.is_some() || self.wall.intervals > 0 {
                    for m in self.members.values_mut() {
                        m.wall.unmetered_ns += dur;
                    }
                }
                return;
            }
        };
        let node = NodeResources {
            cpus: self.sockets.iter().map(|s| s.cpus.len()).sum(),
            gpus: self.gpu_minors.len(),
            memory_mib: self.node_memory_mib,
        };
        let jobs: Vec<RestJob<u32>> = self
            .members
            .iter()
            .map(|(&job, m)| RestJob {
                job,
                allocation: allocated_share(
                    &self.config,
                    &node,
                    m.cpus.len(),
                    m.gpus.len(),
                    m.memory_mib,
                ),
                energy_j: out.jobs.get(&job).map_or(0.0, JobShare::total_j),
            })
            .collect();
        let split = split_rest(
            meter_j,
            dur,
            &out.node,
            &jobs,
            self.config.rest_of_node,
            self.meter_accuracy,
        );
        let (e_meter, e_rest) = split.balance.conservation_error_j();
        if e_meter.abs() > 1e-6 * meter_j.abs().max(1.0)
            || e_rest.abs() > 1e-6 * meter_j.abs().max(1.0)
        {
            self.stats.conservation_failures += 1;
            tracing::error!(
                meter_j,
                e_meter,
                e_rest,
                "the energy at the wall failed its conservation check"
            );
        }
        let disagreement = split.balance.disagreements > 0;
        self.wall.add(&split.balance);
        if disagreement && self.wall.disagreements.is_power_of_two() {
            // Rate-limited: the 1st, 2nd, 4th, 8th, ... disagreement.
            tracing::warn!(
                meter_j,
                components_j = split.balance.components_j,
                accuracy_percent = self.meter_accuracy * 100.0,
                disagreements = self.wall.disagreements,
                "the node's components measured more energy than the node meter, beyond its \
                 accuracy; the rest of the node is 0 for the interval"
            );
        }
        for (job, m) in self.members.iter_mut() {
            m.wall.metered_ns += dur;
            m.wall.components_j += out.jobs.get(job).map_or(0.0, JobShare::total_j);
            m.wall.rest_j += split.jobs.get(job).copied().unwrap_or(0.0);
            if disagreement {
                m.wall.disagreements += 1;
                if m.wall.disagreement_intervals.len() < MAX_DISAGREEMENTS_KEPT {
                    m.wall.disagreement_intervals.push((from_ns, r.at_mono_ns));
                }
            }
        }
    }

    fn move_baselines(&mut self, r: &Reading) {
        for m in self.members.values() {
            for path in &m.cgroups {
                if let Some(v) = r.cgroup_ns(path) {
                    let last = self.cg_last.entry(path.clone()).or_insert(v);
                    *last = (*last).max(v);
                }
            }
        }
    }

    /// How the open jobs hold a GPU in MIG mode: each instance of `layout` with the job
    /// holding it (the lowest job id, should two claim one). `None` when a holder of the GPU
    /// holds no instance of the layout (a whole-GPU or unresolved allocation): then the caller
    /// splits the GPU as a whole among its holders.
    fn mig_usage(
        &self,
        pos: usize,
        layout: &MigLayout,
        holders: &[GpuHolder<u32>],
    ) -> Option<GpuUsage<u32>> {
        let holds = |job: u32, gi: u32| {
            self.members
                .get(&job)
                .is_some_and(|m| m.mig.contains(&(pos, gi)))
        };
        let every_holder_has_one = holders.iter().all(|h| {
            layout
                .instances
                .iter()
                .any(|i| holds(h.job, i.gpu_instance_id))
        });
        if !every_holder_has_one {
            return None;
        }
        Some(GpuUsage::Mig {
            total_slices: layout.total_slices,
            instances: layout
                .instances
                .iter()
                .map(|i| MigInstance {
                    job: holders
                        .iter()
                        .map(|h| h.job)
                        .find(|&j| holds(j, i.gpu_instance_id)),
                    slices: i.slices,
                    activity: None,
                })
                .collect(),
        })
    }

    fn inputs(&self, a: &Reading, b: &Reading) -> IntervalInputs<u32> {
        let duration_s = (b.at_mono_ns - a.at_mono_ns) as f64 / 1e9;
        let gpus = self
            .gpu_minors
            .iter()
            .enumerate()
            .map(|(pos, &minor)| {
                // Each holder's processes' utilisation, when the driver reported it for this
                // GPU at the interval's end (a holder with no process there: 0).
                let util = b.gpu_util.get(pos).and_then(Option::as_ref);
                let holders: Vec<GpuHolder<u32>> = self
                    .members
                    .iter()
                    .filter(|(_, m)| m.gpus.contains(&pos))
                    .map(|(&job, _)| GpuHolder {
                        job,
                        utilisation: util
                            .map(|u| u.iter().filter(|(j, _)| *j == job).map(|(_, v)| *v).sum()),
                    })
                    .collect();
                let usage = match self.gpu_mig.get(pos) {
                    Some(Some(layout)) => self
                        .mig_usage(pos, layout, &holders)
                        .unwrap_or(GpuUsage::Whole(holders)),
                    _ => GpuUsage::Whole(holders),
                };
                GpuInterval {
                    minor,
                    energy_j: match a.gpu_delta(b, pos) {
                        Some(e) => Support::Supported(e),
                        None => Support::Unsupported("not read in this interval".into()),
                    },
                    idle_power_w: None,
                    usage,
                }
            })
            .collect();
        // Each member's CPU time in the interval, spread over sockets.
        let socket_cpus: Vec<(u32, CpuSet)> = self
            .sockets
            .iter()
            .map(|s| (s.socket, s.cpus.clone()))
            .collect();
        let mut per_socket: BTreeMap<u32, Vec<SocketJob<u32>>> = BTreeMap::new();
        for (&job, m) in &self.members {
            let cpu_ns = self.member_cpu_ns(m, b);
            let allocated = cpus_per_socket(&m.cpus, &socket_cpus);
            let cpu_s = cpu_ns as f64 / 1e9;
            let split = split_cpu_time(cpu_s, &allocated).or_else(|_| {
                let by_size: Vec<(u32, u32)> = self
                    .sockets
                    .iter()
                    .map(|s| (s.socket, s.cpus.len().max(1) as u32))
                    .collect();
                split_cpu_time(cpu_s, &by_size)
            });
            let split = split.unwrap_or_default();
            for s in &self.sockets {
                let n = allocated
                    .iter()
                    .find(|(id, _)| *id == s.socket)
                    .map_or(0, |(_, n)| *n);
                let c = split
                    .iter()
                    .find(|(id, _)| *id == s.socket)
                    .map_or(0.0, |(_, c)| *c);
                if n > 0 || c > 0.0 {
                    per_socket.entry(s.socket).or_default().push(SocketJob {
                        job,
                        cpu_s: c,
                        allocated_cpus: n,
                    });
                }
            }
        }
        let sockets = self
            .sockets
            .iter()
            .map(|s| {
                let energy = |zones: &[usize], what: &str| -> Support<f64> {
                    if zones.is_empty() {
                        return Support::Unsupported(format!("no {what} zone"));
                    }
                    zones
                        .iter()
                        .map(|&z| a.zone_delta(b, z))
                        .sum::<Option<f64>>()
                        .map_or_else(
                            || Support::Unsupported("not read in this interval".into()),
                            Support::Supported,
                        )
                };
                let times = |r: &Reading| r.sockets.iter().find(|t| t.0 == s.socket).copied();
                let (busy, total) = match (times(a), times(b)) {
                    (Some(x), Some(y)) => (
                        y.1.saturating_sub(x.1) as f64 / 1e9,
                        y.2.saturating_sub(x.2) as f64 / 1e9,
                    ),
                    _ => (0.0, 0.0),
                };
                SocketInterval {
                    socket: s.socket,
                    package_j: energy(&s.package_zones, "package"),
                    dram_j: energy(&s.dram_zones, "DRAM"),
                    busy_cpu_s: busy,
                    total_cpu_s: total,
                    cpus: s.cpus.len().max(1) as u32,
                    jobs: per_socket.remove(&s.socket).unwrap_or_default(),
                }
            })
            .collect();
        IntervalInputs {
            duration_s,
            gpus,
            sockets,
        }
    }

    /// A member's CPU time since the last reading, up to `b` (its cgroups' counters' rise).
    fn member_cpu_ns(&self, m: &Member, b: &Reading) -> u64 {
        m.cgroups
            .iter()
            .filter_map(|path| Some(b.cgroup_ns(path)?.saturating_sub(*self.cg_last.get(path)?)))
            .sum()
    }

    /// A job starts (after [`Attributor::advance`] to its start reading). `gpus` are snapshot
    /// positions. A job already open keeps its figures (a duplicate start).
    pub fn job_start(&mut self, job_id: u32, gpus: Vec<usize>, cpus: CpuSet) {
        let node = *self.acc.node();
        let m = self.members.entry(job_id).or_insert_with(|| Member {
            gpus: Vec::new(),
            mig: Vec::new(),
            cpus: CpuSet::new(),
            memory_mib: None,
            cgroups: BTreeSet::new(),
            node_at_start: node,
            step_marks: BTreeMap::new(),
            steps: BTreeMap::new(),
            intervals: 0,
            cpu_trace: BTreeMap::new(),
            cpu_ns: 0,
            gpu_unread_ns: BTreeMap::new(),
            last_power_w: None,
            gpu_stats: BTreeMap::new(),
            wall: JobWall::default(),
        });
        if m.gpus.is_empty() {
            m.gpus = gpus;
            // Its GPUs' counters as of its start reading are its baselines (for GPUs whose
            // statistics are sampled).
            for &p in &m.gpus {
                let at_start = self
                    .last
                    .as_ref()
                    .and_then(|r| r.gpu_stats.get(p))
                    .and_then(Option::as_ref);
                if let (Some(&key), Some(_)) = (self.gpu_minors.get(p), at_start) {
                    m.gpu_stats
                        .entry(key)
                        .or_insert_with(|| GpuJobStats::starting(at_start));
                }
            }
        }
        if m.cpus.is_empty() {
            m.cpus = cpus;
        }
    }

    /// A step starts (after [`Attributor::advance`] to its start reading): its cgroup's CPU
    /// time counts from `baseline_ns` (its value in the start reading), else from its first
    /// reading. Opens the job if it is not open (a start ergond missed).
    pub fn step_start(
        &mut self,
        job_id: u32,
        step: StepId,
        cgroup: Option<&str>,
        baseline_ns: Option<u64>,
    ) {
        if !self.members.contains_key(&job_id) {
            self.job_start(job_id, Vec::new(), CpuSet::new());
        }
        let share = self.acc.job(&job_id).cloned().unwrap_or_default();
        let m = self.members.get_mut(&job_id).expect("just ensured");
        m.step_marks.entry(step).or_insert(share);
        if let Some(path) = cgroup {
            m.cgroups.insert(path.to_owned());
            if let Some(v) = baseline_ns {
                self.cg_last.entry(path.to_owned()).or_insert(v);
            }
        }
    }

    /// Set the MIG instances an open job holds: (GPU snapshot position, GPU instance id), from
    /// its allocation. On a GPU in MIG mode a job holding no known instance makes the GPU fall
    /// back to the whole-GPU split (see docs/attribution.md); it is logged here, once per job.
    pub fn set_mig(&mut self, job_id: u32, mig: Vec<(usize, u32)>) {
        let Some(m) = self.members.get_mut(&job_id) else {
            return;
        };
        for &pos in &m.gpus {
            let Some(Some(layout)) = self.gpu_mig.get(pos) else {
                continue;
            };
            let known = mig.iter().any(|&(p, gi)| {
                p == pos && layout.instances.iter().any(|i| i.gpu_instance_id == gi)
            });
            if !known {
                tracing::warn!(
                    job = job_id,
                    minor = self.gpu_minors[pos],
                    held = ?mig.iter().filter(|(p, _)| *p == pos).map(|(_, gi)| gi).collect::<Vec<_>>(),
                    "job holds a GPU in MIG mode but no MIG instance ergond knows; the GPU's \
                     holders share it as a whole GPU while this job runs (a MIG change needs \
                     gres.conf, slurmd and ergond to be updated together)"
                );
            }
        }
        m.mig = mig;
    }

    /// Set an open job's CPUs and memory from the registry's latest view (the extern step's
    /// set replaces a first step's); what the registry does not know is left as it was.
    pub fn set_allocation(&mut self, job_id: u32, cpus: CpuSet, memory_mib: Option<u64>) {
        if let Some(m) = self.members.get_mut(&job_id) {
            if !cpus.is_empty() {
                m.cpus = cpus;
            }
            if memory_mib.is_some() {
                m.memory_mib = memory_mib;
            }
        }
    }

    /// Begin counting an already running cgroup from `value` (restart discovery).
    pub fn baseline_cgroup(&mut self, path: &str, value: u64) {
        self.cg_last.entry(path.to_owned()).or_insert(value);
    }

    /// A step ends (after [`Attributor::advance`] to its end reading).
    pub fn step_end(&mut self, job_id: u32, step: StepId, cgroup: Option<&str>) {
        let share = self.acc.job(&job_id).cloned().unwrap_or_default();
        let Some(m) = self.members.get_mut(&job_id) else {
            return;
        };
        let start = m.step_marks.remove(&step).unwrap_or_default();
        m.steps.insert(step, share_sub(&share, &start));
        if let Some(path) = cgroup {
            if m.cgroups.remove(path) {
                self.cg_last.remove(path);
            }
        }
    }

    /// A job ends (after [`Attributor::advance`] to its end reading): its result, and it is
    /// no longer charged. `None` if it was not open.
    pub fn job_end(&mut self, job_id: u32) -> Option<JobResult> {
        let mut m = self.members.remove(&job_id)?;
        let share = self.acc.take_job(&job_id).unwrap_or_default();
        for (step, start) in std::mem::take(&mut m.step_marks) {
            m.steps.insert(step, share_sub(&share, &start));
        }
        for path in &m.cgroups {
            self.cg_last.remove(path);
        }
        Some(JobResult {
            node: balance_sub(self.acc.node(), &m.node_at_start),
            share,
            steps: m.steps,
            intervals: m.intervals,
            cpu_trace: m.cpu_trace,
            cpu_ns: m.cpu_ns,
            gpu_unread_ns: m.gpu_unread_ns,
            gpu_stats: m.gpu_stats,
            wall: (m.wall.metered_ns > 0).then_some(m.wall),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::EstimateReason;
    use crate::jobs::facts::GpuFact;
    use crate::sources::rapl::ZoneKey;
    use ergon_protocol::EnergyMethod;

    fn facts() -> NodeFacts {
        let gpu = |index, minor| GpuFact {
            index,
            uuid: format!("GPU-{index}"),
            minor: Some(minor),
            pci_bus_id: None,
            method: EnergyMethod::Counter,
            mig: None,
        };
        let zone = |socket, domain| ZoneKey {
            socket: Some(socket),
            die: None,
            domain,
        };
        NodeFacts {
            gpus: vec![gpu(0, 6), gpu(1, 7)],
            zones: vec![
                zone(0, RaplDomain::Package),
                zone(0, RaplDomain::Dram),
                zone(1, RaplDomain::Package),
                zone(1, RaplDomain::Dram),
            ],
            sockets: vec![
                (0, CpuSet::parse("0-3").unwrap()),
                (1, CpuSet::parse("4-7").unwrap()),
            ],
            sensors: Vec::new(),
            memory_mib: Some(64 * 1024),
        }
    }

    /// A reading at `t` seconds: GPUs at 100 W and 200 W, packages at 50 W, DRAM at 10 W, all
    /// 8 CPUs half busy, and the given cgroups' CPU times.
    fn reading(t: f64, cgroups: &[(&str, f64)]) -> Reading {
        Reading {
            at_mono_ns: (t * 1e9) as u64,
            gpus: vec![Some(100.0 * t), Some(200.0 * t)],
            zones: vec![
                Some(50.0 * t),
                Some(10.0 * t),
                Some(50.0 * t),
                Some(10.0 * t),
            ],
            cgroups: cgroups
                .iter()
                .map(|(p, s)| ((*p).to_owned(), (s * 1e9) as u64))
                .collect(),
            sockets: vec![
                (0, (2.0 * t * 1e9) as u64, (4.0 * t * 1e9) as u64),
                (1, (2.0 * t * 1e9) as u64, (4.0 * t * 1e9) as u64),
            ],
            gpu_util: vec![],
            gpu_stats: vec![],
            across: None,
            meter: None,
        }
    }

    /// [`reading`] with a node meter at `meter_w` watts.
    fn metered(t: f64, cgroups: &[(&str, f64)], meter_w: f64) -> Reading {
        Reading {
            meter: Some(meter_w * t),
            ..reading(t, cgroups)
        }
    }

    /// Two jobs over 10 s under a node meter at `meter_w` (components: 420 W): job 1 holds GPU
    /// minor 6 and CPUs 0-1, job 2 CPUs 2-3; then 5 s with no job.
    fn wall_run(config: AttributionConfig, meter_w: f64) -> (Attributor, JobResult, JobResult) {
        let mut a = Attributor::new(&facts(), config);
        a.advance(&metered(0.0, &[], meter_w));
        a.job_start(1, vec![0], CpuSet::parse("0-1").unwrap());
        a.step_start(1, StepId::Batch, Some("job_1/step_batch"), Some(0));
        a.job_start(2, vec![], CpuSet::parse("2-3").unwrap());
        a.step_start(2, StepId::Batch, Some("job_2/step_batch"), Some(0));
        let cg = |t: f64| [("job_1/step_batch", 1.5 * t), ("job_2/step_batch", 0.5 * t)];
        for k in 1..=10 {
            let t = f64::from(k);
            a.advance(&metered(t, &cg(t), meter_w));
        }
        let r1 = a.job_end(1).unwrap();
        let r2 = a.job_end(2).unwrap();
        for k in 11..=15 {
            a.advance(&metered(f64::from(k), &[], meter_w));
        }
        (a, r1, r2)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn rest_of_node_is_split_by_allocation_and_idle_gets_the_rest() {
        let (a, r1, r2) = wall_run(AttributionConfig::default(), 600.0);
        let (w1, w2) = (r1.wall.unwrap(), r2.wall.unwrap());
        // Rest: 600 − 420 = 180 W. Job 1: (2/8 CPUs + 1/2 GPUs) / 2 = 0.375 → 67.5 W; job 2:
        // (2/8 + 0) / 2 = 0.125 → 22.5 W; over 10 s.
        assert!(close(w1.rest_j, 675.0), "{w1:?}");
        assert!(close(w2.rest_j, 225.0), "{w2:?}");
        assert_eq!((w1.metered_ns, w1.unmetered_ns), (10_000_000_000, 0));
        assert!(close(w1.components_j, r1.share.total_j()));
        assert!(close(w1.wall_j(), r1.share.total_j() + 675.0));
        assert_eq!(w1.disagreements, 0);
        // The node: 15 s metered; the jobs' 900 J of rest, the rest idle (no job in the last
        // 5 s: all 900 J of it idle).
        let n = a.wall();
        assert!(close(n.meter_j, 9000.0) && close(n.components_j, 6300.0));
        assert!(close(n.rest_j, 2700.0) && close(n.jobs_j, 900.0));
        assert!(close(n.idle_j, 900.0 + 900.0) && close(n.unattributed_j, 0.0));
        let (e1, e2) = n.conservation_error_j();
        assert!(close(e1, 0.0) && close(e2, 0.0));
        assert_eq!(a.stats().conservation_failures, 0);
    }

    #[test]
    fn rest_of_node_is_split_by_energy() {
        let cfg = AttributionConfig {
            rest_of_node: crate::attribution::RestRule::Energy,
            ..AttributionConfig::default()
        };
        let (a, r1, r2) = wall_run(cfg, 600.0);
        // Each job gets the rest (180 W) in proportion to its component energy out of 420 W.
        for r in [&r1, &r2] {
            let w = r.wall.as_ref().unwrap();
            assert!(
                close(w.rest_j, 1800.0 * r.share.total_j() / 4200.0),
                "{w:?}"
            );
        }
        // Unattributed components (GPU minor 7 held by nobody: 200 W of 420) take their part.
        let n = a.wall();
        assert!(n.unattributed_j >= 1800.0 * 2000.0 / 4200.0 - 1e-6, "{n:?}");
        let (e1, e2) = n.conservation_error_j();
        assert!(close(e1, 0.0) && close(e2, 0.0));
    }

    #[test]
    fn components_above_the_meter_are_a_disagreement_not_a_negative_rest() {
        // 300 W at the wall against 420 W of components: beyond 5 % + 1 J each second.
        let (a, r1, _) = wall_run(AttributionConfig::default(), 300.0);
        let w1 = r1.wall.unwrap();
        assert_eq!(w1.rest_j, 0.0);
        assert_eq!(w1.disagreements, 10);
        assert_eq!(w1.disagreement_intervals.len(), 10);
        assert_eq!(w1.disagreement_intervals[0], (0, 1_000_000_000));
        let n = a.wall();
        assert_eq!(n.disagreements, 15);
        assert!(close(n.excess_j, 120.0 * 15.0) && close(n.rest_j, 0.0));
        let (e1, _) = n.conservation_error_j();
        assert!(close(e1, 0.0));
        // Within the meter's accuracy (400 W: 20 W under 5 % + 1 J): rest 0, no disagreement.
        let (a, r1, _) = wall_run(AttributionConfig::default(), 400.0);
        assert_eq!(r1.wall.unwrap().disagreements, 0);
        assert!(close(a.wall().excess_j, 300.0));
    }

    #[test]
    fn no_meter_no_wall() {
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.job_start(1, vec![0], CpuSet::parse("0-1").unwrap());
        a.advance(&reading(1.0, &[]));
        assert_eq!(a.job_end(1).unwrap().wall, None);
        assert_eq!(a.wall().intervals, 0);
    }

    #[test]
    fn two_jobs_share_a_socket_by_cpu_time_and_the_node_balances() {
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        // Job 1: GPU minor 6, CPUs 0-1; job 2: no GPU, CPUs 2-3. Both on socket 0.
        a.job_start(1, vec![0], CpuSet::parse("0-1").unwrap());
        a.step_start(1, StepId::Batch, Some("job_1/step_batch"), Some(0));
        a.job_start(2, vec![], CpuSet::parse("2-3").unwrap());
        a.step_start(2, StepId::Batch, Some("job_2/step_batch"), Some(0));
        // Over 10 s, job 1 uses 15 CPU-s, job 2 uses 5 (socket 0: 20 of 40 CPU-s busy).
        for k in 1..=10 {
            let t = f64::from(k);
            a.advance(&reading(
                t,
                &[("job_1/step_batch", 1.5 * t), ("job_2/step_batch", 0.5 * t)],
            ));
        }
        let r1 = a.job_end(1).unwrap();
        let r2 = a.job_end(2).unwrap();
        // GPU: all of minor 6's energy to job 1, none of minor 7's to anyone.
        assert!((r1.share.gpus[&6].unwrap() - 1000.0).abs() < 1e-9);
        assert!(!r1.share.gpus.contains_key(&7) && r2.share.gpus.is_empty());
        // Socket 0 package: 500 J, busy half: 250 J active split 3:1, 250 J idle split by the
        // 2 + 2 of 4 CPUs allocated.
        let p1 = r1.share.sockets[&0].package_j.unwrap();
        let p2 = r2.share.sockets[&0].package_j.unwrap();
        assert!((p1 - (187.5 + 125.0)).abs() < 1e-9, "{p1}");
        assert!((p2 - (62.5 + 125.0)).abs() < 1e-9, "{p2}");
        // Conservation over the run, per component.
        let n = a.node();
        for (_, c) in n.components() {
            let acc = c.jobs_j + c.idle_j + c.unattributed_j;
            assert!((c.measured_j - acc).abs() < 1e-9, "{c:?}");
        }
        assert!((n.gpu.measured_j - 3000.0).abs() < 1e-9);
        assert!((n.gpu.unattributed_j - 2000.0).abs() < 1e-9);
        assert_eq!(a.stats().conservation_failures, 0);
        assert_eq!(a.stats().intervals, 10);
    }

    /// Each GPU's statistics go to the jobs that held it in the interval, from the counters
    /// as of the job's start reading; a GPU not sampled gets no figures; a job's figures survive
    /// the journal (serialisation) and end in its result.
    #[test]
    fn gpu_statistics_go_to_the_jobs_holding_the_gpu_over_their_interval() {
        use crate::gpustats::GpuWindow;
        let window = |util: f64, throttle_ns: u64, xids: Vec<(u64, u64)>| GpuWindow {
            sampled_ns: 1_000_000_000,
            util_pct_ns: util * 1e9,
            util_ns: 1_000_000_000,
            throttle_ns: [Some(throttle_ns), None, None, None],
            xids: Some(xids),
            ..Default::default()
        };
        let with = |t: f64, w: Vec<Option<GpuWindow>>| Reading {
            gpu_stats: w,
            ..reading(t, &[])
        };
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        // Before the job: 7 s of power-cap throttling so far, one Xid.
        a.advance(&with(
            0.0,
            vec![Some(window(50.0, 7_000_000_000, vec![(1, 13)])), None],
        ));
        a.job_start(1, vec![0, 1], CpuSet::new());
        a.advance(&with(
            1.0,
            vec![Some(window(80.0, 7_500_000_000, vec![(2, 79)])), None],
        ));
        let journaled: Attributor =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let mut b = Attributor::new(&facts(), AttributionConfig::default());
        b.restore_state(journaled);
        b.advance(&with(
            2.0,
            vec![Some(window(40.0, 8_000_000_000, vec![])), None],
        ));
        let r = b.job_end(1).unwrap();
        let s = &r.gpu_stats[&6];
        assert_eq!(
            s.util_avg_pct(),
            Some(60.0),
            "80 % then 40 %, not the 50 % before"
        );
        assert_eq!(
            s.throttle[0].total,
            Some(1_000_000_000),
            "8 s - 7 s at its start"
        );
        assert_eq!(s.xids, Some(vec![(2, 79)]));
        assert!(!r.gpu_stats.contains_key(&7), "minor 7 is not sampled");
    }

    /// `facts()` with minor 7 (200 W in `reading`) in MIG mode: 7 slices, instances GI 1 (3
    /// slices), GI 2 (2) and GI 5 (1); one slice in no instance.
    fn mig_facts() -> NodeFacts {
        use crate::sources::nvml::{MigInstanceInfo, MigLayout};
        let mut f = facts();
        let inst = |gi: u32, slices: u32| MigInstanceInfo {
            gpu_instance_id: gi,
            compute_instance_id: 0,
            slices,
            uuid: format!("MIG-{gi}"),
            name: None,
        };
        f.gpus[1].mig = Some(MigLayout {
            total_slices: 7,
            instances: vec![inst(1, 3), inst(2, 2), inst(5, 1)],
        });
        f
    }

    #[test]
    fn mig_instances_share_their_gpu_by_slice_size_and_the_rest_is_unattributed() {
        let mut a = Attributor::new(&mig_facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.job_start(1, vec![1], CpuSet::new());
        a.set_mig(1, vec![(1, 1)]);
        a.job_start(2, vec![1], CpuSet::new());
        a.set_mig(2, vec![(1, 2)]);
        for k in 1..=7 {
            a.advance(&reading(f64::from(k), &[]));
        }
        let (r1, r2) = (a.job_end(1).unwrap(), a.job_end(2).unwrap());
        // 7 s of 200 W = 1400 J: 3/7 and 2/7 of it; GI 5 (held by nobody) and the free slice
        // are unattributed. Never the whole board to either job.
        assert!((r1.share.gpus[&7].unwrap() - 600.0).abs() < 1e-9, "{r1:?}");
        assert!((r2.share.gpus[&7].unwrap() - 400.0).abs() < 1e-9, "{r2:?}");
        assert!(r1
            .share
            .estimated
            .contains(&EstimateReason::MigBySliceSize { minor: 7 }));
        let n = a.node();
        assert!((n.gpu.measured_j - 2100.0).abs() < 1e-9);
        // Minor 6 (700 J, no holder) + 2/7 of minor 7.
        assert!((n.gpu.unattributed_j - 1100.0).abs() < 1e-9, "{n:?}");
        assert_eq!(a.stats().conservation_failures, 0);
    }

    #[test]
    fn a_job_holding_two_instances_gets_both_and_a_whole_gpu_holder_falls_back() {
        let mut a = Attributor::new(&mig_facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.job_start(1, vec![1, 1], CpuSet::new());
        a.set_mig(1, vec![(1, 1), (1, 5)]);
        a.advance(&reading(1.0, &[]));
        assert!((a.share(1).unwrap().gpus[&7].unwrap() - 200.0 * 4.0 / 7.0).abs() < 1e-9);
        // A job whose allocation names no known instance (an unresolved MIG device): the GPU
        // is split as a whole between its holders, equally (no utilisation reported).
        a.job_start(2, vec![1], CpuSet::new());
        a.set_mig(2, vec![(1, 9)]);
        a.advance(&reading(2.0, &[]));
        let (r1, r2) = (a.job_end(1).unwrap(), a.job_end(2).unwrap());
        assert!((r2.share.gpus[&7].unwrap() - 100.0).abs() < 1e-9, "{r2:?}");
        assert!((r1.share.gpus[&7].unwrap() - (200.0 * 4.0 / 7.0 + 100.0)).abs() < 1e-9);
        assert!(r2
            .share
            .estimated
            .contains(&EstimateReason::SharedGpuEqual { minor: 7 }));
    }

    #[test]
    fn membership_changes_apply_after_the_interval_up_to_the_event() {
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.advance(&reading(2.0, &[]));
        a.job_start(1, vec![1], CpuSet::new());
        a.advance(&reading(2.5, &[]));
        a.advance(&reading(3.0, &[]));
        let r = a.job_end(1).unwrap();
        // Exactly 1 s of minor 7's 200 W.
        assert!((r.share.gpus[&7].unwrap() - 200.0).abs() < 1e-9);
        assert!((r.node.gpu.measured_j - 300.0).abs() < 1e-9);
        assert_eq!(r.intervals, 2);
        a.advance(&reading(4.0, &[]));
        assert!(a.share(1).is_none());
    }

    #[test]
    fn steps_get_the_jobs_energy_during_their_own_interval() {
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.job_start(1, vec![0], CpuSet::parse("0-3").unwrap());
        a.advance(&reading(1.0, &[]));
        a.step_start(1, StepId::Numbered(0), Some("s0"), Some(0));
        a.advance(&reading(3.0, &[("s0", 4.0)]));
        a.step_end(1, StepId::Numbered(0), Some("s0"));
        a.advance(&reading(4.0, &[]));
        let r = a.job_end(1).unwrap();
        assert!((r.share.gpus[&6].unwrap() - 400.0).abs() < 1e-9);
        assert!((r.steps[&StepId::Numbered(0)].gpus[&6].unwrap() - 200.0).abs() < 1e-9);
    }

    #[test]
    fn an_open_jobs_power_is_its_share_over_the_last_interval() {
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.job_start(1, vec![1], CpuSet::new());
        assert_eq!(a.members()[&1].last_power_w, None);
        a.advance(&reading(2.0, &[]));
        // Minor 7 at 200 W, no CPU time: 200 W.
        let p = a.members()[&1].last_power_w.unwrap();
        assert!((p - 200.0).abs() < 1e-9, "{p}");
        let before = a.share(1).unwrap().gpu_j().unwrap();
        a.advance(&reading(2.5, &[]));
        assert!(a.share(1).unwrap().gpu_j().unwrap() > before);
    }

    #[test]
    fn a_late_reading_closes_nothing_and_is_counted() {
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.advance(&reading(2.0, &[]));
        a.advance(&reading(1.0, &[]));
        assert_eq!(a.stats().late_readings, 1);
        assert_eq!(a.last_at(), Some(2_000_000_000));
    }

    #[test]
    fn serialises_for_the_journal() {
        let mut a = Attributor::new(&facts(), AttributionConfig::default());
        a.advance(&reading(0.0, &[]));
        a.job_start(1, vec![0], CpuSet::parse("0-1").unwrap());
        a.step_start(1, StepId::Batch, Some("b"), Some(0));
        a.advance(&reading(1.0, &[("b", 0.5)]));
        let bytes = rmp_serde::to_vec_named(&a).unwrap();
        let b: Attributor = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(a, b);
    }
}
