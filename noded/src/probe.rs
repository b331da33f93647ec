//! `ergond probe`: measure the NVML read path of this node's GPUs.
//!
//! Samples every GPU at a fixed period for a fixed time on one dedicated thread, each tick at an
//! absolute CLOCK_MONOTONIC deadline (`clock_nanosleep(TIMER_ABSTIME)`, so lateness does not
//! accumulate), exactly as ergond reads them ([`GpuSource::read_timed`]), and reports per GPU:
//!
//! * the observed update period of the energy counter (and of the power reading): the
//!   intervals between successive changes of the value;
//! * the latency of each NVML call made per read (the single `nvmlDeviceGetFieldValues` call,
//!   or the fallback functions), p50/p99/max;
//! * the energy of the same interval by counter difference and by integrating the sampled
//!   instantaneous power, and how far apart they are.
//!
//! The comparison window runs from the first to the last observed counter change, so that both
//! ends of the counter difference sit on counter updates and the counter's own update
//! quantisation does not bias the comparison.

use crate::clock::monotonic_ns;
use crate::counter::Method;
use crate::inventory::{nvml_problem, ConfigReport, GpuSummary};
use crate::sources::nvml::{CallTimes, GpuEnergyMeter, GpuReading, GpuSource};
use crate::stats::percentile;
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

/// What to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeOptions {
    /// How long to sample.
    pub duration: Duration,
    /// Sampling period.
    pub period: Duration,
    /// Plausibility limit for counter deltas (W), from `sampling.gpu_max_power_w`.
    pub max_power_w: f64,
}

/// Latency of one kind of NVML call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    /// The call, e.g. `nvmlDeviceGetFieldValues`, or `whole read`.
    pub call: String,
    /// Number of calls timed.
    pub calls: usize,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Maximum, µs.
    pub max_us: f64,
}

/// Intervals between successive changes of a value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpdatePeriod {
    /// Number of changes seen.
    pub changes: usize,
    /// Shortest interval between two changes, ms.
    pub min_ms: f64,
    /// Median interval, ms.
    pub median_ms: f64,
    /// Mean interval (first to last change / intervals), ms.
    pub mean_ms: f64,
}

/// Energy of one interval measured both ways.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnergyComparison {
    /// Which interval: `first to last counter change`, or `whole run`.
    pub window: String,
    /// Its length, s.
    pub window_s: f64,
    /// Energy by counter difference, J (None without a counter).
    pub counter_j: Option<f64>,
    /// Energy by trapezoidal integration of the sampled power, J (None without power).
    pub integrated_j: Option<f64>,
    /// (counter − integrated) / counter.
    pub relative_difference: Option<f64>,
    /// Counter intervals dropped as implausible.
    pub counter_dropped: u64,
    /// Counter resets (driver reloads) seen.
    pub counter_resets: u64,
}

/// The probe's findings for one GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuProbe {
    /// Identity and read path (the same keys as `ergond check --json`).
    #[serde(flatten)]
    pub gpu: GpuSummary,
    /// Successful readings.
    pub readings: usize,
    /// Failed readings.
    pub read_errors: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Observed energy-counter update period (None: no counter, or fewer than 2 changes).
    pub counter_update: Option<UpdatePeriod>,
    /// Observed power-reading update period.
    pub power_update: Option<UpdatePeriod>,
    /// Per-call latency: each NVML call made per read, then the whole read.
    pub latency: Vec<Latency>,
    /// Counter energy vs integrated power.
    pub energy: Option<EnergyComparison>,
}

/// The whole probe result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    /// ergond version.
    pub ergond_version: String,
    /// The NVML library loaded.
    pub library: String,
    /// NVML version.
    pub nvml_version: Option<String>,
    /// Driver version.
    pub driver_version: Option<String>,
    /// Sampling period, ms.
    pub period_ms: f64,
    /// Sampling time, s.
    pub seconds: f64,
    /// Ticks run.
    pub ticks: usize,
    /// Ticks skipped because the previous one overran its period.
    pub ticks_skipped: u64,
    /// How late ticks started after their deadline: median, µs.
    pub lateness_p50_us: f64,
    /// Maximum lateness, µs.
    pub lateness_max_us: f64,
    /// Per GPU.
    pub gpus: Vec<GpuProbe>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    reading: GpuReading,
    times: CallTimes,
}

struct Samples {
    per_gpu: Vec<Vec<Sample>>,
    errors: Vec<(usize, Option<String>)>,
    lateness_ns: Vec<u64>,
    skipped: u64,
}

/// The sampling loop (runs on the probe thread).
fn sample(src: &mut GpuSource, opts: &ProbeOptions) -> Samples {
    let n = src.len();
    let period = opts.period.as_nanos() as u64;
    let ticks = (opts.duration.as_nanos() as u64 / period) as usize + 1;
    let mut out = Samples {
        per_gpu: (0..n).map(|_| Vec::with_capacity(ticks)).collect(),
        errors: vec![(0, None); n],
        lateness_ns: Vec::with_capacity(ticks),
        skipped: 0,
    };
    let mut times = CallTimes::default();
    // Start on a fresh deadline one period ahead, so the first tick is not already late.
    let start = monotonic_ns() + period;
    let mut k: u64 = 0;
    while (k as usize) < ticks {
        let deadline = start + k * period;
        crate::clock::sleep_until(deadline);
        let now = monotonic_ns();
        out.lateness_ns.push(now.saturating_sub(deadline));
        for (i, samples) in out.per_gpu.iter_mut().enumerate() {
            if src.info(i).lost {
                continue;
            }
            match src.read_timed(i, &mut times) {
                Ok(reading) => samples.push(Sample { reading, times }),
                Err(e) => {
                    let (count, first) = &mut out.errors[i];
                    *count += 1;
                    first.get_or_insert_with(|| e.to_string());
                }
            }
        }
        // A tick that overran its period skips the deadlines already past instead of
        // bursting to catch up.
        let after = monotonic_ns();
        let next = (after - start) / period + 1;
        out.skipped += next.saturating_sub(k + 1);
        k = next.max(k + 1);
    }
    out
}

fn latency(call: &str, mut ns: Vec<u64>) -> Option<Latency> {
    if ns.is_empty() {
        return None;
    }
    ns.sort_unstable();
    let us = |v: u64| v as f64 / 1e3;
    Some(Latency {
        call: call.into(),
        calls: ns.len(),
        p50_us: us(percentile(&ns, 50.0)),
        p99_us: us(percentile(&ns, 99.0)),
        max_us: us(*ns.last().unwrap_or(&0)),
    })
}

/// Indices of the samples at which `value` changed from the previous sample, with the estimated
/// instant of the change (midpoint between the two readings).
fn changes(samples: &[Sample], value: impl Fn(&GpuReading) -> Option<u64>) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    for j in 1..samples.len() {
        let (a, b) = (&samples[j - 1].reading, &samples[j].reading);
        if let (Some(va), Some(vb)) = (value(a), value(b)) {
            if va != vb {
                out.push((j, a.at_ns + (b.at_ns - a.at_ns) / 2));
            }
        }
    }
    out
}

fn update_period(changes: &[(usize, u64)]) -> Option<UpdatePeriod> {
    if changes.len() < 2 {
        return None;
    }
    let mut intervals: Vec<u64> = changes.windows(2).map(|w| w[1].1 - w[0].1).collect();
    intervals.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    let span = changes[changes.len() - 1].1 - changes[0].1;
    Some(UpdatePeriod {
        changes: changes.len(),
        min_ms: ms(intervals[0]),
        median_ms: ms(intervals[(intervals.len() - 1) / 2]),
        mean_ms: span as f64 / 1e6 / intervals.len() as f64,
    })
}

fn compare_energy(
    samples: &[Sample],
    counter_changes: &[(usize, u64)],
    opts: &ProbeOptions,
    counter_period: Duration,
) -> Option<EnergyComparison> {
    if samples.len() < 2 {
        return None;
    }
    let (a, b, window) = if counter_changes.len() >= 2 {
        (
            counter_changes[0].0,
            counter_changes[counter_changes.len() - 1].0,
            "first to last counter change",
        )
    } else {
        (0, samples.len() - 1, "whole run")
    };
    let max_w = opts.max_power_w;
    let mut counter = GpuEnergyMeter::new(Method::Counter, max_w, counter_period);
    let mut integrated = GpuEnergyMeter::new(Method::IntegratedPower, max_w, Duration::ZERO);
    let mut has_counter = false;
    let mut has_power = false;
    for s in &samples[a..=b] {
        has_counter |= s.reading.energy_mj.is_some();
        has_power |= s.reading.power_mw.is_some();
        counter.update(&s.reading);
        integrated.update(&s.reading);
    }
    let counter_j = has_counter.then(|| counter.totals().joules);
    let integrated_j = has_power.then(|| integrated.totals().joules);
    let relative_difference = match (counter_j, integrated_j) {
        (Some(c), Some(i)) if c > 0.0 => Some((c - i) / c),
        _ => None,
    };
    Some(EnergyComparison {
        window: window.into(),
        window_s: (samples[b].reading.at_ns - samples[a].reading.at_ns) as f64 / 1e9,
        counter_j,
        integrated_j,
        relative_difference,
        counter_dropped: counter.totals().dropped,
        counter_resets: counter.totals().resets,
    })
}

/// Picks one call's duration out of [`CallTimes`].
type CallTimeField = fn(&CallTimes) -> Option<u64>;

/// Sample `src`'s GPUs as described by `opts` on one dedicated thread and analyse the result.
/// `library` is only used in the report.
pub fn probe(src: GpuSource, library: String, opts: ProbeOptions) -> ProbeReport {
    let nvml_version = src.nvml_version().ok();
    let driver_version = src.driver_version().ok();
    let (src, samples) = std::thread::Builder::new()
        .name("ergond-probe".into())
        .spawn(move || {
            crate::clock::fine_timer_slack();
            let mut src = src;
            let samples = sample(&mut src, &opts);
            (src, samples)
        })
        .expect("spawn the probe thread")
        .join()
        .expect("the probe thread panicked");

    let mut lateness = samples.lateness_ns.clone();
    lateness.sort_unstable();
    let mut gpus = Vec::new();
    for (i, s) in samples.per_gpu.iter().enumerate() {
        let info = src.info(i);
        let counter_changes = changes(s, |r| r.energy_mj);
        let counter_update = update_period(&counter_changes);
        let power_update = update_period(&changes(s, |r| r.power_mw.map(u64::from)));
        let mut latencies = Vec::new();
        let calls: [(&str, CallTimeField); 3] = [
            ("nvmlDeviceGetFieldValues", |t| t.field_values_ns),
            ("nvmlDeviceGetTotalEnergyConsumption", |t| t.energy_fn_ns),
            ("nvmlDeviceGetPowerUsage", |t| t.power_fn_ns),
        ];
        for (name, get) in calls {
            latencies.extend(latency(
                name,
                s.iter().filter_map(|x| get(&x.times)).collect(),
            ));
        }
        latencies.extend(latency(
            "whole read",
            s.iter()
                .map(|x| x.reading.after_ns - x.reading.before_ns)
                .collect(),
        ));
        let counter_period = counter_update
            .as_ref()
            .map(|u| Duration::from_secs_f64(u.min_ms / 1e3))
            .unwrap_or(Duration::from_millis(100));
        let (errors, first_error) = samples.errors[i].clone();
        gpus.push(GpuProbe {
            gpu: GpuSummary::of(info),
            readings: s.len(),
            read_errors: errors,
            first_error,
            counter_update,
            power_update,
            latency: latencies,
            energy: compare_energy(s, &counter_changes, &opts, counter_period),
        });
    }
    ProbeReport {
        ergond_version: env!("CARGO_PKG_VERSION").to_string(),
        library,
        nvml_version,
        driver_version,
        period_ms: opts.period.as_secs_f64() * 1e3,
        seconds: opts.duration.as_secs_f64(),
        ticks: samples.lateness_ns.len(),
        ticks_skipped: samples.skipped,
        lateness_p50_us: percentile(&lateness, 50.0) as f64 / 1e3,
        lateness_max_us: lateness.last().copied().unwrap_or(0) as f64 / 1e3,
        gpus,
    }
}

fn fmt_period(p: &Option<UpdatePeriod>, what: &str) -> String {
    match p {
        Some(u) => format!(
            "{what} update period: min {:.1} ms, median {:.1} ms, mean {:.2} ms ({} changes)",
            u.min_ms, u.median_ms, u.mean_ms, u.changes
        ),
        None => format!(
            "{what} update period: not observed (the value changed fewer than twice during \
             the run)"
        ),
    }
}

/// The probe report as text for people.
pub fn render_text(r: &ProbeReport) -> String {
    let mut o = String::new();
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
    let _ = writeln!(
        o,
        "ergond {} probe: NVML {}, driver {} ({})",
        r.ergond_version,
        opt(&r.nvml_version),
        opt(&r.driver_version),
        r.library
    );
    let _ = writeln!(
        o,
        "sampled {} GPU(s) every {} ms for {} s on one thread: {} ticks, {} skipped, tick \
         lateness p50 {:.0} µs, max {:.0} µs",
        r.gpus.len(),
        r.period_ms,
        r.seconds,
        r.ticks,
        r.ticks_skipped,
        r.lateness_p50_us,
        r.lateness_max_us
    );
    for g in &r.gpus {
        let id = &g.gpu;
        let _ = writeln!(
            o,
            "\nGPU {}  minor {}  {}  {}",
            id.index,
            id.minor
                .map(|m| m.to_string())
                .unwrap_or_else(|| "?".into()),
            id.uuid,
            opt(&id.name)
        );
        let _ = writeln!(o, "  method: {}", id.method_line());
        let _ = writeln!(o, "  readings: {} ok, {} failed", g.readings, g.read_errors);
        if let Some(e) = &g.first_error {
            let _ = writeln!(o, "  first failure: {e}");
        }
        if id.energy_read != "unsupported" {
            let _ = writeln!(o, "  {}", fmt_period(&g.counter_update, "energy counter"));
        }
        if id.power_read != "unsupported" {
            let _ = writeln!(o, "  {}", fmt_period(&g.power_update, "power reading"));
        }
        let _ = writeln!(
            o,
            "  latency per call (µs)                    p50       p99       max    calls"
        );
        for l in &g.latency {
            let _ = writeln!(
                o,
                "    {:<36} {:>9.1} {:>9.1} {:>9.1} {:>8}",
                l.call, l.p50_us, l.p99_us, l.max_us, l.calls
            );
        }
        if let Some(e) = &g.energy {
            let _ = writeln!(o, "  energy over {:.3} s ({}):", e.window_s, e.window);
            let w = |j: f64| {
                if e.window_s > 0.0 {
                    j / e.window_s
                } else {
                    0.0
                }
            };
            if let Some(c) = e.counter_j {
                let _ = writeln!(
                    o,
                    "    by counter difference     {c:>12.3} J  ({:.2} W average)",
                    w(c)
                );
            }
            if let Some(i) = e.integrated_j {
                let _ = writeln!(
                    o,
                    "    by integrating power      {i:>12.3} J  ({:.2} W average)",
                    w(i)
                );
            }
            if let Some(d) = e.relative_difference {
                let _ = writeln!(
                    o,
                    "    difference (counter - integrated) / counter: {:+.3} %",
                    d * 100.0
                );
            }
            if e.counter_dropped > 0 || e.counter_resets > 0 {
                let _ = writeln!(
                    o,
                    "    counter intervals dropped as implausible: {}, counter resets: {}",
                    e.counter_dropped, e.counter_resets
                );
            }
        }
    }
    o
}

/// Run `probe` from the CLI and return its exit status: 0 on success, 1 for an invalid
/// configuration, 2 when no GPU can be read.
pub fn run_probe(
    explicit_config: Option<&std::path::PathBuf>,
    seconds: f64,
    period_ms: u64,
    json: bool,
) -> u8 {
    use crate::inventory::{describe_config_error, load_config, EXIT_CONFIG, EXIT_NO_SOURCE};
    let (config, report): (_, ConfigReport) =
        match load_config(explicit_config.map(|p| p.as_path())) {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "ergond probe: {}",
                    describe_config_error(&e, explicit_config.map(|p| p.as_path()))
                );
                return EXIT_CONFIG;
            }
        };
    let library = config
        .nvml_library
        .clone()
        .unwrap_or_else(crate::sources::nvml::default_library)
        .display()
        .to_string();
    let src = match GpuSource::open(config.nvml_library.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "ergond probe: {}",
                nvml_problem(&e, &library, config.nvml_library.is_some(), &report)
            );
            return EXIT_NO_SOURCE;
        }
    };
    if src.is_empty() {
        eprintln!("ergond probe: NVML ({library}) lists no GPU; nothing to probe");
        return EXIT_NO_SOURCE;
    }
    let opts = ProbeOptions {
        duration: Duration::from_secs_f64(seconds),
        period: Duration::from_millis(period_ms),
        max_power_w: config.sampling.gpu_max_power_w,
    };
    let r = probe(src, library, opts);
    if json {
        match serde_json::to_string_pretty(&r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("ergond probe: cannot encode the report as JSON: {e}"),
        }
    } else {
        print!("{}", render_text(&r));
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_period_from_changes() {
        let ch: Vec<(usize, u64)> = [0u64, 20, 41, 60, 80]
            .iter()
            .enumerate()
            .map(|(i, &ms)| (i, ms * 1_000_000))
            .collect();
        let u = update_period(&ch).unwrap();
        assert_eq!(u.changes, 5);
        assert!((u.min_ms - 19.0).abs() < 1e-9);
        assert!((u.median_ms - 20.0).abs() < 1e-9);
        assert!((u.mean_ms - 20.0).abs() < 1e-9);
        assert!(update_period(&ch[..1]).is_none());
    }
}
