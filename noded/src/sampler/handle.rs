//! [`SamplerHandle`]: the running sampler as the rest of ergond sees it (snapshots, traces,
//! holes, watched cgroups) and its threads.

use super::health::{finish_health, hole_ns, Health};
use super::options::{SamplerError, SamplerOptions};
use super::ring::UNSET;
use super::shared::{lock, Shared, Watched};
use super::trace::{TraceOf, TraceSample};
use crate::clock::monotonic_ns;
use crate::gpustats::{summarise, GpuWindow, WeightedSample};
use crate::snapshot::{CgroupSnapshot, NodeSnapshot, SamplerThread};
use crate::sources::cgroup::{CgroupCpu, CgroupHierarchy};
use crate::sources::nvml::GpuStatsSample;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A running thread.
#[derive(Debug)]
pub(super) struct ThreadEntry {
    pub(super) name: &'static str,
    pub(super) sources: &'static [&'static str],
    pub(super) handle: Option<JoinHandle<()>>,
    /// CPU time recorded by the thread as it exits (`UNSET` before).
    pub(super) final_cpu_ns: Arc<AtomicU64>,
}

/// The running sampler. Dropping it stops the threads (as [`Self::stop`] does).
#[derive(Debug)]
pub struct SamplerHandle {
    pub(super) shared: Arc<Shared>,
    pub(super) threads: Vec<ThreadEntry>,
    pub(super) cgroups: Option<CgroupHierarchy>,
    pub(super) options: SamplerOptions,
    /// The node meter read for attribution, if any (on its own thread).
    pub(super) meter: Option<super::meter::NodeMeterHandle>,
}

impl SamplerHandle {
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        sources: &'static [&'static str],
        body: impl FnOnce(&AtomicU64) + Send + 'static,
    ) -> Result<(), SamplerError> {
        let final_cpu_ns = Arc::new(AtomicU64::new(UNSET));
        let cpu = Arc::clone(&final_cpu_ns);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                crate::clock::fine_timer_slack();
                body(&cpu);
            })
            .map_err(|source| SamplerError::Spawn { name, source })?;
        self.threads.push(ThreadEntry {
            name,
            sources,
            handle: Some(handle),
            final_cpu_ns,
        });
        Ok(())
    }

    /// Attach the node meter ergond reads for attribution (before the handle is shared).
    pub fn attach_meter(&mut self, meter: super::meter::NodeMeterHandle) {
        self.meter = Some(meter);
    }

    /// The node meter in use, if any.
    pub fn meter(&self) -> Option<&super::meter::NodeMeterHandle> {
        self.meter.as_ref()
    }

    /// The options in force.
    pub fn options(&self) -> &SamplerOptions {
        &self.options
    }

    /// The node as of the latest ticks. Costs the reader a copy (and the percentile
    /// computation); the sampling threads wait at most for that copy.
    pub fn snapshot(&self) -> NodeSnapshot {
        let mut s = NodeSnapshot {
            taken_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
            taken_monotonic_ns: monotonic_ns(),
            ..Default::default()
        };
        let mut healths = Vec::with_capacity(3);
        if let Some(part) = &self.shared.gpu {
            let g = lock(part);
            s.gpus = g.gpus.clone();
            healths.push(g.health.copy());
        }
        if let Some(part) = &self.shared.cpu {
            let c = lock(part);
            s.zones = c.zones.clone();
            s.sockets = c.sockets.clone();
            healths.extend(c.rapl.as_ref().map(Health::copy));
            healths.extend(c.cgroup.as_ref().map(Health::copy));
        }
        s.cgroups = lock(&self.shared.cgroups)
            .iter()
            .map(|w| CgroupSnapshot {
                path: w.path.clone(),
                cpu_ns: w.cpu_ns,
                at_ns: w.at_ns,
                read_errors: w.read_errors,
            })
            .collect();
        s.samplers = healths.into_iter().map(finish_health).collect();
        if let Some(part) = &self.shared.gpu_stats {
            let p = lock(part);
            s.gpu_stats = p
                .iter()
                .zip(&s.gpus)
                .filter_map(|(g, snap)| {
                    Some(crate::snapshot::GpuStatsSnapshot {
                        uuid: snap.uuid.clone(),
                        sample: g.latest?,
                        xid_total: g.xid_supported.then_some(g.xid_total),
                    })
                })
                .collect();
        }
        s.threads = self
            .threads
            .iter()
            .map(|t| SamplerThread {
                name: t.name,
                sources: t.sources,
                cpu_ns: match t.final_cpu_ns.load(Ordering::Relaxed) {
                    UNSET => t
                        .handle
                        .as_ref()
                        .and_then(|h| crate::sys::thread_cpu_ns(h.as_pthread_t())),
                    v => Some(v),
                },
            })
            .collect();
        s.meter = self
            .meter
            .as_ref()
            .map(super::meter::NodeMeterHandle::snapshot);
        s
    }

    /// The trace of one GPU or zone, oldest sample first, into `out` (cleared first). Returns
    /// false when there is no such GPU or zone.
    pub fn trace(&self, of: TraceOf, out: &mut Vec<TraceSample>) -> bool {
        out.clear();
        let (part, i) = match of {
            TraceOf::Gpu(i) => match &self.shared.gpu {
                Some(p) => {
                    let g = lock(p);
                    return match g.traces.get(i) {
                        Some(r) => {
                            r.copy_into(out);
                            true
                        }
                        None => false,
                    };
                }
                None => return false,
            },
            TraceOf::Zone(i) => (&self.shared.cpu, i),
        };
        match part {
            Some(p) => match lock(p).traces.get(i) {
                Some(r) => {
                    r.copy_into(out);
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// Block until every GPU and RAPL zone being read has a reading taken at or after `at_ns`
    /// (CLOCK_MONOTONIC), or until `timeout` has passed; returns whether they all have.
    ///
    /// The job registry calls this after a job or step event so that the readings bracketing the
    /// event's instant are both in the traces, and the counters at that exact instant can be
    /// interpolated between them ([`Self::trace`]). It waits at most one sampling period in
    /// normal operation. It polls the published parts (one short lock each, every millisecond)
    /// and never disturbs the sampling threads. GPUs that are lost or not measurable are not
    /// waited for.
    pub fn wait_for_readings_after(&self, at_ns: u64, timeout: Duration) -> bool {
        let deadline = monotonic_ns().saturating_add(timeout.as_nanos() as u64);
        loop {
            let gpus_done = self.shared.gpu.as_ref().is_none_or(|p| {
                lock(p)
                    .gpus
                    .iter()
                    .all(|g| !g.measurable || g.lost || g.at_ns >= at_ns)
            });
            let zones_done = self.shared.cpu.as_ref().is_none_or(|p| {
                let c = lock(p);
                c.rapl.is_none() || c.zones.iter().all(|z| z.at_ns >= at_ns)
            });
            if gpus_done && zones_done {
                return true;
            }
            if monotonic_ns() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The stretches where a source did not sample for longer than [`hole_ns`] of its period
    /// (ergond stopped, hung or starved; a read blocking for seconds), merged across sources,
    /// oldest first: (last tick before, first tick after), CLOCK_MONOTONIC ns. The last
    /// [`HOLES_KEPT`](super::HOLES_KEPT) per source are kept.
    pub fn holes(&self) -> Vec<(u64, u64)> {
        let mut all = Vec::new();
        let mut one = Vec::new();
        if let Some(p) = &self.shared.gpu {
            lock(p).health.holes.copy_into(&mut one);
            all.append(&mut one);
        }
        if let Some(p) = &self.shared.cpu {
            let c = lock(p);
            for h in [&c.rapl, &c.cgroup].into_iter().flatten() {
                h.holes.copy_into(&mut one);
                all.append(&mut one);
            }
        }
        all.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
        for (a, b) in all {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        merged
    }

    /// Whether GPU `i` (snapshot position) is read by the sampler (measurable, not lost).
    pub fn gpu_readable(&self, i: usize) -> bool {
        self.shared
            .gpu
            .as_ref()
            .is_some_and(|p| lock(p).gpus.get(i).is_some_and(|g| g.measurable && !g.lost))
    }

    /// The widest bracket between two samples of a series of `of` that is not a hole.
    pub fn hole_threshold_ns(&self, of: TraceOf) -> u64 {
        hole_ns(match of {
            TraceOf::Gpu(_) => self.options.gpu_period.as_nanos() as u64,
            TraceOf::Zone(_) => self.options.rapl_period.as_nanos() as u64,
        })
    }

    /// What GPU `i`'s (snapshot position) statistics samples and Xid events in
    /// `(from_ns, to_ns]` say; `None` when its statistics are not sampled.
    pub fn gpu_stats_window(
        &self,
        i: usize,
        from_ns: u64,
        to_ns: u64,
        buf: &mut Vec<WeightedSample>,
    ) -> Option<GpuWindow> {
        let part = self.shared.gpu_stats.as_ref()?;
        let mut xids = Vec::new();
        let supported = {
            let p = lock(part);
            let g = p.get(i)?;
            g.samples.copy_into(buf);
            g.xids.copy_into(&mut xids);
            g.xid_supported
        };
        Some(summarise(
            buf,
            supported.then_some(&xids[..]),
            from_ns,
            to_ns,
        ))
    }

    /// GPU `i`'s latest statistics sample, Xid events since start (`None`: not reported), for
    /// `/metrics`; `None` when its statistics are not sampled or no sample is in yet.
    pub fn gpu_stats_latest(&self, i: usize) -> Option<(GpuStatsSample, Option<u64>)> {
        let part = self.shared.gpu_stats.as_ref()?;
        let p = lock(part);
        let g = p.get(i)?;
        Some((g.latest?, g.xid_supported.then_some(g.xid_total)))
    }

    /// Say whether several jobs hold GPU `i` (snapshot position): only then does the GPU
    /// thread read its per-process utilisation (into
    /// [`GpuSnapshot::processes`](crate::snapshot::GpuSnapshot::processes)).
    pub fn set_gpu_shared(&self, i: usize, shared: bool) {
        if let Some(f) = self.shared.gpu_shared.get(i) {
            f.store(shared, Ordering::Relaxed);
        }
    }

    /// The cgroup hierarchy [`Self::watch_cgroup`] reads, if any.
    pub fn cgroup_hierarchy(&self) -> Option<&CgroupHierarchy> {
        self.cgroups.as_ref()
    }

    /// Start sampling the CPU time of cgroup `path` (relative to the hierarchy, e.g.
    /// `slurm/uid_1000/job_42` for v1 or `system.slice/slurmstepd.scope/job_42` for v2). The
    /// file is opened and read once here, so a missing cgroup is an error now, and the cgroup
    /// is in the next snapshot with a valid `cpu_ns`. Watching a path already watched does
    /// nothing.
    pub fn watch_cgroup(&self, path: &str) -> Result<(), SamplerError> {
        let Some(h) = &self.cgroups else {
            return Err(SamplerError::NoCgroupHierarchy {
                path: path.to_string(),
            });
        };
        if lock(&self.shared.cgroups).iter().any(|w| w.path == path) {
            return Ok(());
        }
        let mut file = CgroupCpu::open(&h.root, h.version, path)?;
        let before = monotonic_ns();
        let cpu_ns = file.read_usage_ns()?;
        let at_ns = before + (monotonic_ns() - before) / 2;
        let mut watched = lock(&self.shared.cgroups);
        if !watched.iter().any(|w| w.path == path) {
            watched.push(Watched {
                path: path.to_string(),
                file,
                cpu_ns,
                at_ns,
                read_errors: 0,
                fresh: false,
            });
        }
        Ok(())
    }

    /// Stop sampling cgroup `path`; returns whether it was watched.
    pub fn unwatch_cgroup(&self, path: &str) -> bool {
        let mut watched = lock(&self.shared.cgroups);
        let before = watched.len();
        watched.retain(|w| w.path != path);
        watched.len() != before
    }

    /// Stop and join the threads; returns the final snapshot (every tick that ran is in it).
    pub fn stop(mut self) -> NodeSnapshot {
        self.shutdown();
        self.snapshot()
    }

    pub(super) fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in &mut self.threads {
            if let Some(h) = t.handle.take() {
                if h.join().is_err() {
                    tracing::error!(thread = t.name, "sampler thread panicked");
                }
            }
        }
    }
}

impl Drop for SamplerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
