//! The sampler's rates, limits and buffer sizes ([`SamplerOptions`]), and its errors.

use crate::config::SamplingConfig;
use crate::sources::cgroup::CgroupError;
use crate::sources::nvml::sampling_period;
use std::time::Duration;

/// Default number of samples kept per GPU and per RAPL zone.
pub const DEFAULT_TRACE_CAPACITY: usize = 4096;
/// Default number of ticks over which read latency and lateness percentiles are computed.
pub const DEFAULT_LATENCY_WINDOW: usize = 1024;
/// RAPL period in profiling mode (RAPL updates about every millisecond).
pub const PROFILING_RAPL_PERIOD: Duration = Duration::from_millis(1);
/// How long [`Sampler::start`](super::Sampler::start) spends detecting the GPU counters' update
/// period.
pub const DETECT_BUDGET: Duration = Duration::from_secs(1);

/// Rates, limits and buffer sizes of one sampler.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerOptions {
    /// GPU sampling period.
    pub gpu_period: Duration,
    /// The GPU energy counter's update period (detected, or assumed): how stale a reading may
    /// be, which widens the plausibility bound on short intervals.
    pub gpu_counter_period: Duration,
    /// RAPL sampling period (also the CPU thread's tick).
    pub rapl_period: Duration,
    /// cgroup and socket CPU-time period; rounded to a whole number of RAPL periods (at least
    /// one) when RAPL is sampled.
    pub cgroup_period: Duration,
    /// Plausibility limit per GPU (W).
    pub gpu_max_power_w: f64,
    /// Plausibility limit per RAPL zone (W).
    pub cpu_max_power_w: f64,
    /// Samples kept per GPU and per zone.
    pub trace_capacity: usize,
    /// Ticks per source over which latency and lateness percentiles are computed.
    pub latency_window: usize,
}

impl SamplerOptions {
    /// Default rates: GPUs at half the detected counter update period clamped to
    /// `[gpu_min_period_ms, gpu_max_period_ms]` (`gpu_default_period_ms` when nothing was
    /// detected), exactly as `ergond check` reports it; RAPL and cgroups at their configured
    /// periods.
    pub fn from_config(s: &SamplingConfig, detected_counter_period: Option<Duration>) -> Self {
        let ms = Duration::from_millis;
        Self {
            gpu_period: sampling_period(
                detected_counter_period,
                ms(s.gpu_min_period_ms),
                ms(s.gpu_max_period_ms),
                ms(s.gpu_default_period_ms),
            ),
            gpu_counter_period: detected_counter_period.unwrap_or(ms(s.gpu_default_period_ms)),
            rapl_period: ms(s.rapl_period_ms),
            cgroup_period: ms(s.cgroup_period_ms),
            gpu_max_power_w: s.gpu_max_power_w,
            cpu_max_power_w: s.cpu_max_power_w,
            trace_capacity: DEFAULT_TRACE_CAPACITY,
            latency_window: DEFAULT_LATENCY_WINDOW,
        }
    }

    /// Profiling mode: GPUs at `gpu_min_period_ms` (10 ms = 100 Hz by default) and RAPL at
    /// 1 kHz; cgroups and sockets keep `cgroup_period_ms` (still read on a RAPL tick). Reading
    /// 64 job cgroups costs several times a RAPL read, and job CPU shares change slowly, so a
    /// faster cgroup rate buys little for its cost.
    pub fn profiling(s: &SamplingConfig, detected_counter_period: Option<Duration>) -> Self {
        Self {
            gpu_period: Duration::from_millis(s.gpu_min_period_ms),
            rapl_period: PROFILING_RAPL_PERIOD,
            ..Self::from_config(s, detected_counter_period)
        }
    }

    pub(super) fn validate(&self) -> Result<(), SamplerError> {
        let invalid = |option, reason: &str| {
            Err(SamplerError::Invalid {
                option,
                reason: reason.to_string(),
            })
        };
        for (option, p) in [
            ("gpu_period", self.gpu_period),
            ("rapl_period", self.rapl_period),
            ("cgroup_period", self.cgroup_period),
        ] {
            if p.is_zero() {
                return invalid(option, "must be longer than 0");
            }
        }
        if self.trace_capacity == 0 {
            return invalid("trace_capacity", "must be at least 1");
        }
        if self.latency_window == 0 {
            return invalid("latency_window", "must be at least 1");
        }
        Ok(())
    }
}

/// Error starting or driving the sampler.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// An option is out of range.
    #[error("invalid sampler option `{option}`: {reason}")]
    Invalid {
        /// The [`SamplerOptions`] field.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A sampling thread could not be created.
    #[error("cannot start the sampling thread {name}: {source}")]
    Spawn {
        /// Thread name.
        name: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A cgroup was registered but no cgroup hierarchy is sampled.
    #[error(
        "cannot watch cgroup {path}: no cgroup hierarchy is being sampled (`cgroup_root` in \
         ergond.toml names no usable cgroup v1 or v2 hierarchy; see the start-up log)"
    )]
    NoCgroupHierarchy {
        /// The cgroup that was to be watched.
        path: String,
    },
    /// The cgroup's CPU usage file could not be opened or read.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_gpu_period_is_half_the_counter_period_clamped() {
        let s = SamplingConfig::default();
        let o = SamplerOptions::from_config(&s, Some(Duration::from_millis(100)));
        assert_eq!(o.gpu_period, Duration::from_millis(50));
        assert_eq!(o.gpu_counter_period, Duration::from_millis(100));
        let o = SamplerOptions::from_config(&s, None);
        assert_eq!(o.gpu_period, Duration::from_millis(100));
        let p = SamplerOptions::profiling(&s, Some(Duration::from_millis(100)));
        assert_eq!(
            (p.gpu_period, p.rapl_period, p.cgroup_period),
            (
                Duration::from_millis(10),
                Duration::from_millis(1),
                Duration::from_millis(100)
            )
        );
    }
}
