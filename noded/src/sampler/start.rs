//! [`Sampler`]: sizes every buffer, publishes the empty snapshot parts and starts the threads.

use super::cpu_thread::cpu_thread_main;
use super::gpu_thread::gpu_thread;
use super::handle::SamplerHandle;
use super::health::Health;
use super::options::{SamplerError, SamplerOptions, DETECT_BUDGET};
use super::ring::Ring;
use super::shared::GpuStatsState;
use super::shared::{lock, CpuPart, GpuPart, Shared};
use super::sources::{detect_gpu_counter_period, SamplerSources};
use super::stats_thread::stats_thread;
use super::trace::UNSET_SAMPLE;
use crate::config::Config;
use crate::counter::Method;
use crate::snapshot::{GpuSnapshot, SocketSnapshot, ZoneSnapshot};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Starts the sampler (see the module docs).
#[derive(Debug)]
pub struct Sampler;

impl Sampler {
    /// Detect the GPU counters' update period (up to [`DETECT_BUDGET`]), derive the default rates
    /// from `config.sampling` ([`SamplerOptions::from_config`]) and start sampling `sources`.
    pub fn start(
        config: &Config,
        mut sources: SamplerSources,
    ) -> Result<SamplerHandle, SamplerError> {
        let detected = match sources.gpu.as_mut() {
            Some(g) if !g.is_empty() => detect_gpu_counter_period(g, DETECT_BUDGET),
            _ => None,
        };
        match detected {
            Some(p) => tracing::info!(
                period_ms = p.as_secs_f64() * 1e3,
                "GPU counter update period detected"
            ),
            None if sources.gpu.as_ref().is_some_and(|g| !g.is_empty()) => tracing::info!(
                default_ms = config.sampling.gpu_default_period_ms,
                "GPU counter update period not detected; using sampling.gpu_default_period_ms"
            ),
            None => {}
        }
        Self::start_with(
            SamplerOptions::from_config(&config.sampling, detected),
            sources,
        )
    }

    /// Start sampling `sources` with explicit options (tests, benchmarks, profiling mode).
    pub fn start_with(
        options: SamplerOptions,
        sources: SamplerSources,
    ) -> Result<SamplerHandle, SamplerError> {
        options.validate()?;
        let SamplerSources {
            gpu,
            gpu_stats,
            rapl,
            cgroups,
            sockets,
        } = sources;
        let gpu = gpu.filter(|g| !g.is_empty());
        let window = options.latency_window;
        let cap = options.trace_capacity;

        let gpu_part = gpu.as_ref().map(|src| {
            let gpus = (0..src.len())
                .map(|i| {
                    let info = src.info(i);
                    let method = info.method.supported().copied();
                    GpuSnapshot {
                        index: info.id.index,
                        uuid: info.id.uuid.clone(),
                        minor: info.id.minor,
                        name: info.id.name.clone().unwrap_or_default(),
                        energy_j: 0.0,
                        power_w: None,
                        method: method.unwrap_or(Method::IntegratedPower),
                        lost: info.lost,
                        resets: 0,
                        dropped_intervals: 0,
                        measurable: method.is_some(),
                        read_errors: 0,
                        at_ns: 0,
                        raw_j: None,
                        processes: None,
                    }
                })
                .collect();
            Mutex::new(GpuPart {
                gpus,
                traces: (0..src.len())
                    .map(|_| Ring::new(cap, UNSET_SAMPLE))
                    .collect(),
                health: Health::new("gpu", options.gpu_period.as_nanos() as u64, window),
            })
        });

        let cpu_thread = rapl.is_some() || cgroups.is_some() || sockets.is_some();
        let (base_period, cgroup_every) = cpu_tick(&options, rapl.is_some());
        let cpu_part = cpu_thread.then(|| {
            let zones = rapl
                .as_ref()
                .map(|r| {
                    r.zones()
                        .iter()
                        .map(|z| ZoneSnapshot {
                            key: z.key.clone(),
                            energy_j: 0.0,
                            power_w: None,
                            wraps: 0,
                            dropped_intervals: 0,
                            at_ns: 0,
                            raw_j: None,
                            range_j: None,
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let sockets_snap = sockets
                .as_ref()
                .map(|s| {
                    s.sockets()
                        .iter()
                        .map(|&socket| SocketSnapshot {
                            socket,
                            busy_ns: 0,
                            total_ns: 0,
                            at_ns: 0,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let has_cpu_time = cgroups.is_some() || sockets.is_some();
            Mutex::new(CpuPart {
                traces: zones.iter().map(|_| Ring::new(cap, UNSET_SAMPLE)).collect(),
                zones,
                sockets: sockets_snap,
                rapl: rapl
                    .is_some()
                    .then(|| Health::new("rapl", base_period, window)),
                cgroup: has_cpu_time
                    .then(|| Health::new("cgroup", base_period * cgroup_every, window)),
            })
        });

        let gpu_count = gpu_part.as_ref().map_or(0, |p| lock(p).gpus.len());
        // Statistics only for the energy source's GPUs, position for position.
        let gpu_stats = gpu_stats.filter(|s| s.len() == gpu_count && gpu_count > 0);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            gpu_shared: (0..gpu_count).map(|_| AtomicBool::new(false)).collect(),
            gpu: gpu_part,
            gpu_stats: gpu_stats
                .as_ref()
                .map(|s| Mutex::new((0..s.len()).map(|_| GpuStatsState::new()).collect())),
            cpu: cpu_part,
            cgroups: Mutex::new(Vec::new()),
        });
        let mut handle = SamplerHandle {
            meter: None,
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            cgroups,
            options: options.clone(),
        };
        if let Some(src) = gpu {
            let shared = Arc::clone(&shared);
            let opts = options.clone();
            handle.spawn("ergond-gpu", &["gpu"], move |cpu| {
                gpu_thread(src, &opts, &shared);
                cpu.store(crate::clock::thread_cpu_ns(), Ordering::Relaxed);
            })?;
        }
        if let Some(reader) = gpu_stats {
            let shared = Arc::clone(&shared);
            let opts = options.clone();
            handle.spawn("ergond-gpustat", &["gpustat"], move |cpu| {
                stats_thread(reader, &opts, &shared);
                cpu.store(crate::clock::thread_cpu_ns(), Ordering::Relaxed);
            })?;
        }
        if cpu_thread {
            let shared = Arc::clone(&shared);
            let opts = options.clone();
            handle.spawn("ergond-cpu", &["rapl", "cgroup"], move |cpu| {
                cpu_thread_main(rapl, sockets, &opts, base_period, cgroup_every, &shared);
                cpu.store(crate::clock::thread_cpu_ns(), Ordering::Relaxed);
            })?;
        }
        Ok(handle)
    }
}

/// The CPU thread's tick (ns) and every how many ticks cgroups are read.
pub(super) fn cpu_tick(options: &SamplerOptions, rapl: bool) -> (u64, u64) {
    let cgroup = options.cgroup_period.as_nanos() as u64;
    if rapl {
        let base = options.rapl_period.as_nanos() as u64;
        let every = ((cgroup as f64 / base as f64).round() as u64).max(1);
        (base, every)
    } else {
        (cgroup, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SamplingConfig;
    use std::time::Duration;

    #[test]
    fn cgroup_ticks_are_a_whole_number_of_rapl_ticks() {
        let s = SamplingConfig::default();
        let o = SamplerOptions::from_config(&s, None);
        assert_eq!(cpu_tick(&o, true), (100_000_000, 1));
        assert_eq!(cpu_tick(&o, false), (100_000_000, 1));
        let p = SamplerOptions::profiling(&s, None);
        assert_eq!(cpu_tick(&p, true), (1_000_000, 100));
        let o = SamplerOptions {
            cgroup_period: Duration::from_millis(1),
            rapl_period: Duration::from_millis(5),
            ..o
        };
        assert_eq!(cpu_tick(&o, true), (5_000_000, 1));
    }

    #[test]
    fn invalid_options_are_named() {
        let o = SamplerOptions {
            trace_capacity: 0,
            ..SamplerOptions::from_config(&SamplingConfig::default(), None)
        };
        let e = Sampler::start_with(o, SamplerSources::default()).unwrap_err();
        assert!(e.to_string().contains("trace_capacity"), "{e}");
    }
}
