//! Manifests for tests (feature `testing`, enabled only by dev-dependencies: never in a shipped
//! build). Every crate's tests build their manifests here, so a schema change is made once:
//! [`Manifest::example`] for a complete one, [`ManifestBuilder`] for one of a given shape.
//!
//! ```
//! use ergon_protocol::testing::ManifestBuilder;
//! let m = ManifestBuilder::new("c1", 42, "n1")
//!     .gpu(Some(1800.0))
//!     .socket(420.0, None)
//!     .batch_step()
//!     .build();
//! assert_eq!(m.totals.energy_j, 2220.0);
//! assert_eq!(m.gpus[0].avg_w, Some(18.0)); // over the default 100 s
//! m.verify().unwrap();
//! ```

use crate::manifest::*;
use crate::StepId;

/// The end of a manifest built without [`ManifestBuilder::span`] (2023-11-14, 22:15 UTC).
pub const DEFAULT_END_UNIX_NS: u64 = 1_700_000_100_000_000_000;

impl Manifest {
    /// A sealed manifest with every part filled in: job 1234 (array task 1200_34) of alice on
    /// `gpu-node-07` of `hpc1` over one hour, two steps, one GPU, one socket with DRAM, a
    /// recovered gap, two sensors and a two-series trace.
    pub fn example() -> Manifest {
        let start = 1_700_000_000_000_000_000;
        let end = start + 3_600_000_000_000;
        ManifestBuilder::new("hpc1", 1234, "gpu-node-07")
            .array(1200, 34)
            .user("alice", 1001)
            .account("physics")
            .span(start, end)
            .step(StepEnergy {
                step: StepId::Batch,
                start_unix_ns: start,
                end_unix_ns: end,
                energy_j: 1_500_000.25,
                gpu_j: Some(1_200_000.0),
                cpu_j: Some(280_000.25),
                dram_j: Some(20_000.0),
            })
            .step(StepEnergy {
                step: StepId::Numbered(0),
                start_unix_ns: start + 10,
                end_unix_ns: end - 10,
                energy_j: 0.1,
                gpu_j: None,
                cpu_j: Some(0.1),
                dram_j: None,
            })
            .gpu_entry(GpuEnergy {
                uuid: "GPU-8a1f0c4e-3b7d-4e7e-9a51-2f0c1d2e3f40".into(),
                index: 0,
                minor: Some(0),
                pci_bus_id: Some("00000000:3B:00.0".into()),
                energy_j: Some(1_200_000.0),
                avg_w: Some(333.333_333_333_333_3),
                peak_w: Some(699.5),
                method: EnergyMethod::Counter,
                shared: false,
                mig: None,
                efficiency: None,
            })
            .socket_entry(SocketEnergy {
                socket: 0,
                package_j: 280_000.25,
                dram_j: Some(20_000.0),
                method: EnergyMethod::Counter,
                share_method: ShareMethod::CgroupCpuTime,
            })
            .peak_w(812.0)
            .node_context(2_000_000.0, 400_000.0, 99_999.75)
            .coverage(0.997)
            .gap(Gap::new(
                start + 5_000_000_000,
                start + 15_000_000_000,
                "ergond restarted",
                true,
            ))
            .sensor(SensorKind::Nvml, "550.54.15", "1 device")
            .sensor(
                SensorKind::RaplPowercap,
                "6.1.0-18-amd64",
                "package-0, dram",
            )
            .trace(
                10_000,
                [
                    ("gpu0", vec![310.5, 699.5, 0.1, 1e-7]),
                    ("socket0", vec![80.25, 95.0, 77.7, 81.3]),
                ],
            )
            .build()
    }
}

/// A manifest of a given shape. What is not set is plausible: user `alice` (uid 1000), no
/// account or partition, 100 s ending at [`DEFAULT_END_UNIX_NS`], attribution
/// `exclusive-gpu+cgroup-cpu-time` v1, coverage 1, no gaps, sensors or trace (1 s interval).
/// The totals are the sum of the GPUs' and sockets' energies (average over the span, peak twice
/// the average) unless set, and the node saw them plus 10 J of idle.
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    m: Manifest,
    totals: Option<Totals>,
    peak_w: Option<f64>,
    node_context: Option<NodeContext>,
    batch_step: bool,
}

impl ManifestBuilder {
    /// Job `job_id` on `node` of `cluster`.
    pub fn new(cluster: &str, job_id: u32, node: &str) -> Self {
        let end = DEFAULT_END_UNIX_NS;
        let start = end - 100_000_000_000;
        Self {
            m: Manifest {
                schema_version: MANIFEST_SCHEMA_VERSION,
                cluster: cluster.into(),
                node: node.into(),
                job: JobInfo {
                    job_id,
                    array_job_id: None,
                    array_task_id: None,
                    user: "alice".into(),
                    uid: 1000,
                    account: None,
                    partition: None,
                    sluid: None,
                    node_list: None,
                },
                start_unix_ns: start,
                end_unix_ns: end,
                duration_s: 100.0,
                steps: vec![],
                gpus: vec![],
                sockets: vec![],
                totals: Totals {
                    energy_j: 0.0,
                    gpu_j: None,
                    cpu_j: None,
                    dram_j: None,
                    avg_w: 0.0,
                    peak_w: 0.0,
                },
                node_context: NodeContext {
                    node_energy_j: 0.0,
                    idle_j: 0.0,
                    unattributed_j: 0.0,
                },
                coverage: Coverage {
                    fraction: 1.0,
                    gaps: vec![],
                    components: None,
                    gpus_unknown: None,
                },
                attribution: AttributionInfo {
                    model: "exclusive-gpu+cgroup-cpu-time".into(),
                    version: 1,
                    estimated: false,
                },
                sensors: vec![],
                trace: PowerTrace {
                    interval_ms: 1000,
                    start_unix_ns: start,
                    series: vec![],
                },
                wall: None,
                content_hash: String::new(),
            },
            totals: None,
            peak_w: None,
            node_context: None,
            batch_step: false,
        }
    }

    /// The manifest's schema version (default: the current one).
    pub fn schema(mut self, version: u32) -> Self {
        self.m.schema_version = version;
        self
    }

    /// The job's user.
    pub fn user(mut self, name: &str, uid: u32) -> Self {
        self.m.job.user = name.into();
        self.m.job.uid = uid;
        self
    }

    /// The job's account.
    pub fn account(mut self, account: &str) -> Self {
        self.m.job.account = Some(account.into());
        self
    }

    /// The job's partition.
    pub fn partition(mut self, partition: &str) -> Self {
        self.m.job.partition = Some(partition.into());
        self
    }

    /// The job is task `task` of array `array_job_id`.
    pub fn array(mut self, array_job_id: u32, task: u32) -> Self {
        self.m.job.array_job_id = Some(array_job_id);
        self.m.job.array_task_id = Some(task);
        self
    }

    /// The job's Slurm 25.05+ SLUID.
    pub fn sluid(mut self, sluid: &str) -> Self {
        self.m.job.sluid = Some(sluid.into());
        self
    }

    /// Every node of the job (`job.node_list`, here a comma-separated host list; schema 5:
    /// the schema is raised to it).
    pub fn nodes(mut self, nodes: &[&str]) -> Self {
        self.m.job.node_list = Some(nodes.join(","));
        self.m.schema_version = self
            .m
            .schema_version
            .max(crate::manifest::MANIFEST_SCHEMA_VERSION_NODES);
        self
    }

    /// The job ran on the node from `start_unix_ns` to `end_unix_ns` (the trace starts then
    /// too). Set it before adding GPUs with [`Self::gpu`], whose power is over it.
    pub fn span(mut self, start_unix_ns: u64, end_unix_ns: u64) -> Self {
        self.m.start_unix_ns = start_unix_ns;
        self.m.end_unix_ns = end_unix_ns;
        self.m.duration_s = end_unix_ns.saturating_sub(start_unix_ns) as f64 / 1e9;
        self.m.trace.start_unix_ns = start_unix_ns;
        self
    }

    /// The job ran for `seconds` up to `end_unix_ns`.
    pub fn ended(self, end_unix_ns: u64, seconds: u64) -> Self {
        self.span(end_unix_ns - seconds * 1_000_000_000, end_unix_ns)
    }

    /// The next GPU (index 0, 1, …; minor = index; UUID `GPU-<node>-<index>`), measured by its
    /// counter, with `energy_j` (`None`: not measured) and an average power over the span,
    /// peak twice that.
    pub fn gpu(self, energy_j: Option<f64>) -> Self {
        let index = self.m.gpus.len() as u32;
        let avg_w = energy_j.map(|e| e / self.m.duration_s);
        let uuid = format!("GPU-{}-{index}", self.m.node);
        self.gpu_entry(GpuEnergy {
            uuid,
            index,
            minor: Some(index),
            pci_bus_id: None,
            energy_j,
            avg_w,
            peak_w: avg_w.map(|w| 2.0 * w),
            method: EnergyMethod::Counter,
            shared: false,
            mig: None,
            efficiency: None,
        })
    }

    /// Give the last GPU added these efficiency figures (schema 6).
    pub fn gpu_efficiency(mut self, e: crate::GpuEfficiency) -> Self {
        if let Some(g) = self.m.gpus.last_mut() {
            g.efficiency = Some(e);
        }
        self.m.schema_version = self
            .m
            .schema_version
            .max(crate::manifest::MANIFEST_SCHEMA_VERSION_EFFICIENCY);
        self
    }

    /// The node's energy at the wall (manifest schema 6).
    pub fn wall(mut self, w: crate::WallEnergy) -> Self {
        self.m.wall = Some(w);
        self.m.schema_version = self
            .m
            .schema_version
            .max(crate::manifest::MANIFEST_SCHEMA_VERSION_EFFICIENCY);
        self
    }

    /// A GPU as given.
    pub fn gpu_entry(mut self, gpu: GpuEnergy) -> Self {
        self.m.gpus.push(gpu);
        self
    }

    /// The next socket (0, 1, …): package and DRAM energy by counter, shared by cgroup CPU
    /// time.
    pub fn socket(self, package_j: f64, dram_j: Option<f64>) -> Self {
        let socket = self.m.sockets.len() as u32;
        self.socket_entry(SocketEnergy {
            socket,
            package_j,
            dram_j,
            method: EnergyMethod::Counter,
            share_method: ShareMethod::CgroupCpuTime,
        })
    }

    /// A socket as given.
    pub fn socket_entry(mut self, socket: SocketEnergy) -> Self {
        self.m.sockets.push(socket);
        self
    }

    /// A step as given.
    pub fn step(mut self, step: StepEnergy) -> Self {
        self.m.steps.push(step);
        self
    }

    /// A batch step over the whole span with the totals' energies (added at [`Self::build`]).
    pub fn batch_step(mut self) -> Self {
        self.batch_step = true;
        self
    }

    /// The totals as given, instead of the sums.
    pub fn totals(mut self, totals: Totals) -> Self {
        self.totals = Some(totals);
        self
    }

    /// The job's peak power, instead of twice the average.
    pub fn peak_w(mut self, watts: f64) -> Self {
        self.peak_w = Some(watts);
        self
    }

    /// What the node measured over the job, instead of the job's energy and 10 J idle.
    pub fn node_context(mut self, node_energy_j: f64, idle_j: f64, unattributed_j: f64) -> Self {
        self.node_context = Some(NodeContext {
            node_energy_j,
            idle_j,
            unattributed_j,
        });
        self
    }

    /// The fraction of the job its readings cover.
    pub fn coverage(mut self, fraction: f64) -> Self {
        self.m.coverage.fraction = fraction;
        self
    }

    /// A gap in the readings.
    pub fn gap(mut self, gap: Gap) -> Self {
        self.m.coverage.gaps.push(gap);
        self
    }

    /// The attribution model, and whether parts of the figures are estimated.
    pub fn attribution(mut self, model: &str, estimated: bool) -> Self {
        self.m.attribution.model = model.into();
        self.m.attribution.estimated = estimated;
        self
    }

    /// A sensor the node measured with.
    pub fn sensor(mut self, kind: SensorKind, version: &str, detail: &str) -> Self {
        self.m.sensors.push(SensorInfo {
            kind,
            version: version.into(),
            detail: detail.into(),
        });
        self
    }

    /// The power trace: one bin per `interval_ms` from the span's start, series by name.
    pub fn trace<N: Into<String>>(
        mut self,
        interval_ms: u32,
        series: impl IntoIterator<Item = (N, Vec<f32>)>,
    ) -> Self {
        self.m.trace.interval_ms = interval_ms;
        self.m.trace.series = series
            .into_iter()
            .map(|(name, watts)| TraceSeries {
                name: name.into(),
                watts,
            })
            .collect();
        self
    }

    /// The trace starts at `unix_ns` instead of the span's start.
    pub fn trace_start(mut self, unix_ns: u64) -> Self {
        self.m.trace.start_unix_ns = unix_ns;
        self
    }

    /// The manifest, sealed.
    pub fn build(self) -> Manifest {
        let mut m = self.m;
        m.totals = self.totals.unwrap_or_else(|| {
            let gpu_j =
                (!m.gpus.is_empty()).then(|| m.gpus.iter().filter_map(|g| g.energy_j).sum());
            let cpu_j =
                (!m.sockets.is_empty()).then(|| m.sockets.iter().map(|s| s.package_j).sum());
            let dram_j = m
                .sockets
                .iter()
                .any(|s| s.dram_j.is_some())
                .then(|| m.sockets.iter().filter_map(|s| s.dram_j).sum());
            let energy_j: f64 = [gpu_j, cpu_j, dram_j].into_iter().flatten().sum();
            let avg_w = if m.duration_s > 0.0 {
                energy_j / m.duration_s
            } else {
                0.0
            };
            Totals {
                energy_j,
                gpu_j,
                cpu_j,
                dram_j,
                avg_w,
                peak_w: 2.0 * avg_w,
            }
        });
        if let Some(w) = self.peak_w {
            m.totals.peak_w = w;
        }
        m.node_context = self.node_context.unwrap_or(NodeContext {
            node_energy_j: m.totals.energy_j + 10.0,
            idle_j: 10.0,
            unattributed_j: 0.0,
        });
        if self.batch_step {
            m.steps.insert(
                0,
                StepEnergy {
                    step: StepId::Batch,
                    start_unix_ns: m.start_unix_ns,
                    end_unix_ns: m.end_unix_ns,
                    energy_j: m.totals.energy_j,
                    gpu_j: m.totals.gpu_j,
                    cpu_j: m.totals.cpu_j,
                    dram_j: m.totals.dram_j,
                },
            );
        }
        m.seal();
        m
    }
}
