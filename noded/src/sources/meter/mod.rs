//! Whole-node power meters: what the node as a whole draws, measured outside the CPUs and GPUs.
//!
//! Four kinds of meter, each optional and read by its own [`NodeMeter`]:
//!
//! * [`hwmon`]: Linux hwmon power meters (`/sys/class/hwmon/*/power*_average`,
//!   `energy*_input`), such as the ACPI power meter (`power_meter`) of many servers;
//! * [`pm_counters`]: HPE Cray EX `/sys/cray/pm_counters/` (node, CPU, memory and accelerator
//!   energy, with `freshness` and `generation`);
//! * [`redfish`]: the BMC's Redfish service (`Chassis/<id>/Power` `PowerControl`, or
//!   `EnvironmentMetrics`), over HTTPS with credentials from a root-only file;
//! * [`ipmi`]: the BMC over IPMI through `ipmitool`: the DCMI power reading, or an SDR power
//!   sensor.
//!
//! A meter only reads: every [`MeterReading`] carries the monotonic time of the read and either a
//! cumulative energy counter or a power. The [`EnergyIntegrator`] turns a sequence of readings
//! into a node energy total with the same rules as the GPU and RAPL counters
//! ([`crate::counter`]): counters are differenced with wrap/reset and plausibility handling, a
//! pm_counters `generation` change is a reset and a `freshness` that did not advance is a stale
//! reading (not a new sample); power-only meters are integrated with the trapezoid rule between
//! reads, and a gap longer than [`IntegratorConfig::max_gap_ns`] is a *hole*, counted and never
//! filled with an invented value. Implausible values (negative, not finite, above the configured
//! maximum node power) are rejected with a reason.
//!
//! BMC reads take 100 ms to seconds, so meters never run on the GPU/RAPL sampling threads: a
//! [`MeterWorker`] reads one meter on a thread of its own and publishes its totals, which a
//! reader copies without waiting for a read in progress.
//!
//! ergond reads at most one node meter ([`select`]): its [`MeterWorker`] also keeps the
//! meter's cumulative energy as a series of [`MeterPoint`]s, which the job worker interpolates
//! at each attribution instant (the node's energy "at the wall", split into components and the
//! rest of the node by [`crate::jobs::attributor`]).

pub mod hwmon;
pub mod ipmi;
pub mod pm_counters;
pub mod redfish;

use crate::counter::{
    CounterEvent, CounterKind, CounterSpec, EnergyCounter, EnergyDelta, EnergyTotals, Method,
    PowerIntegrator, RawReading, Step,
};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What a meter measured at one read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantity {
    /// A cumulative energy counter: `raw × joules_per_unit` joules since the counter's origin.
    Energy {
        /// Raw counter value, in the meter's own units (hwmon µJ, pm_counters J).
        raw: u64,
        /// Joules per raw unit.
        joules_per_unit: f64,
        /// How the counter behaves when it goes down.
        kind: CounterKind,
    },
    /// A power in watts (instantaneous or averaged by the meter over its interval).
    Power {
        /// Watts. May be anything the meter said, including negative or NaN: the integrator
        /// rejects those, with a reason.
        watts: f64,
    },
}

/// One read of a node meter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeterReading {
    /// CLOCK_MONOTONIC nanoseconds of the read (for a slow network read, the middle of the
    /// request).
    pub at_ns: u64,
    /// What was read.
    pub quantity: Quantity,
    /// pm_counters `generation`: a change means the counters were reset.
    pub generation: Option<u64>,
    /// pm_counters `freshness`: it advances each time the controller publishes new values; a
    /// reading with the same freshness as the previous one is stale.
    pub freshness: Option<u64>,
}

/// Which kind of meter a [`NodeMeter`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterKind {
    /// Linux hwmon (`/sys/class/hwmon`).
    Hwmon,
    /// HPE Cray EX `/sys/cray/pm_counters`.
    PmCounters,
    /// The BMC's Redfish service.
    Redfish,
    /// The BMC over IPMI (DCMI or an SDR sensor).
    Ipmi,
}

impl fmt::Display for MeterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MeterKind::Hwmon => "hwmon",
            MeterKind::PmCounters => "pm_counters",
            MeterKind::Redfish => "redfish",
            MeterKind::Ipmi => "ipmi",
        })
    }
}

/// Why a meter could not be opened or read. Every variant names the file or URL.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// The meter does not exist on this node.
    #[error("{0}")]
    NotFound(String),
    /// A file or response had an unexpected format.
    #[error("{what}: {why}")]
    Format {
        /// The file or URL.
        what: String,
        /// What was wrong.
        why: String,
    },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The credentials file is unsafe or unreadable.
    #[error("{0}")]
    Credentials(String),
    /// A request to a BMC failed: connection, TLS, timeout, HTTP status, size, ipmitool's exit.
    #[error("{0}")]
    Request(String),
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
}

/// A whole-node power or energy meter.
///
/// `read` may block (a BMC read takes up to seconds): call it from a thread of its own, such as a
/// [`MeterWorker`]'s, never from a sampling thread.
pub trait NodeMeter: Send {
    /// Which kind of meter this is.
    fn kind(&self) -> MeterKind;
    /// Where the values come from, for logs, `ergond check` and manifests (a path or a URL).
    fn source(&self) -> String;
    /// How often the meter publishes a new value, in ns (its averaging interval or update
    /// period): reading more often gives no new information.
    fn resolution_ns(&self) -> u64;
    /// Read the meter now.
    fn read(&mut self) -> Result<MeterReading, MeterError>;
    /// Let go of what ties the meter to the thread that has read it so far, before it moves to
    /// another (the IPMI meter's ipmitool session dies with the thread that opened it); the
    /// next read opens it again. Default: nothing.
    fn release(&mut self) {}
}

/// Integration rules for one meter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntegratorConfig {
    /// Highest power the node can draw, in watts: readings above it, and counter deltas needing
    /// more than it (× `margin`), are rejected.
    pub max_node_power_w: f64,
    /// Safety factor on `max_node_power_w` for counter deltas (≥ 1).
    pub margin: f64,
    /// For power-only meters: two reads further apart than this are not integrated across; the
    /// interval between them is a hole.
    pub max_gap_ns: u64,
    /// The meter's own update period ([`NodeMeter::resolution_ns`]): a counter may hand a reader
    /// that much energy more than the read interval holds.
    pub staleness_ns: u64,
}

/// Why a reading was rejected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rejection {
    /// A power below zero.
    NegativePower(f64),
    /// A power that is NaN or infinite.
    NotFinite,
    /// A power above the configured maximum node power.
    AbovePowerLimit {
        /// The power read.
        watts: f64,
        /// The limit.
        max_w: f64,
    },
    /// A counter delta (or the value after a reset) that needs more than the maximum node power.
    ImplausibleEnergy {
        /// The energy the delta would add, in joules.
        joules: f64,
        /// The most the node can have drawn over the interval, in joules.
        max_joules: f64,
    },
    /// The reading is older than the previous one.
    TimeWentBackwards,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rejection::NegativePower(w) => write!(f, "negative power {w} W"),
            Rejection::NotFinite => f.write_str("power is not a finite number"),
            Rejection::AbovePowerLimit { watts, max_w } => {
                write!(f, "power {watts} W above the node's maximum {max_w} W")
            }
            Rejection::ImplausibleEnergy { joules, max_joules } => write!(
                f,
                "energy delta {joules} J above the {max_joules} J the node can draw in the interval"
            ),
            Rejection::TimeWentBackwards => f.write_str("reading older than the previous one"),
        }
    }
}

/// What the integrator did with one reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The first usable reading (or the first after a hole or a change of quantity): a baseline.
    Baseline,
    /// Energy for the interval since the previous accepted reading.
    Delta(EnergyDelta),
    /// pm_counters `freshness` did not advance: the same values as before, not a new sample.
    Stale,
    /// Two power reads further apart than the gap bound: `[from_ns, to_ns]` is unmeasured, and
    /// the new reading is the baseline.
    Hole {
        /// Start of the unmeasured interval.
        from_ns: u64,
        /// End of the unmeasured interval.
        to_ns: u64,
    },
    /// The reading was rejected; the interval it closes (if any) is unmeasured.
    Rejected(Rejection),
}

/// Running totals of one node meter.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterTotals {
    /// Energy, covered and dropped time, wraps and resets ([`EnergyTotals`]); `method` is
    /// [`Method::Counter`] for energy counters, [`Method::IntegratedPower`] for power meters.
    pub energy: EnergyTotals,
    /// Power-read gaps longer than the bound, not integrated across.
    pub holes: u64,
    /// Total length of those gaps, ns.
    pub hole_ns: u64,
    /// Readings whose `freshness` had not advanced.
    pub stale: u64,
    /// Readings rejected as implausible.
    pub rejected: u64,
    /// The last rejection, for logs and `ergond check`.
    pub last_rejection: Option<Rejection>,
    /// pm_counters generation changes seen (each is also counted in `energy.resets`).
    pub generation_changes: u64,
}

/// Turns a meter's readings into a node energy counter.
#[derive(Debug, Clone)]
pub struct EnergyIntegrator {
    cfg: IntegratorConfig,
    counter: Option<(CounterKind, u64, EnergyCounter)>,
    power: PowerIntegrator,
    last_power_ns: Option<u64>,
    generation: Option<u64>,
    freshness: Option<u64>,
    totals: MeterTotals,
}

impl EnergyIntegrator {
    /// An integrator with no reading yet.
    pub fn new(cfg: IntegratorConfig) -> Self {
        Self {
            cfg,
            counter: None,
            power: PowerIntegrator::new(),
            last_power_ns: None,
            generation: None,
            freshness: None,
            totals: MeterTotals {
                energy: EnergyTotals::new(Method::Counter),
                holes: 0,
                hole_ns: 0,
                stale: 0,
                rejected: 0,
                last_rejection: None,
                generation_changes: 0,
            },
        }
    }

    /// The totals so far.
    pub fn totals(&self) -> &MeterTotals {
        &self.totals
    }

    /// Feed the next reading.
    pub fn update(&mut self, r: MeterReading) -> Outcome {
        if let (Some(prev), Some(now)) = (self.freshness, r.freshness) {
            if prev == now && self.generation == r.generation {
                self.totals.stale += 1;
                return Outcome::Stale;
            }
        }
        let outcome = match r.quantity {
            Quantity::Energy {
                raw,
                joules_per_unit,
                kind,
            } => self.counter_reading(r, raw, joules_per_unit, kind),
            Quantity::Power { watts } => self.power_reading(r.at_ns, watts),
        };
        if !matches!(outcome, Outcome::Rejected(Rejection::TimeWentBackwards)) {
            self.freshness = r.freshness;
            self.generation = r.generation;
        }
        outcome
    }

    fn reject(&mut self, why: Rejection) -> Outcome {
        self.totals.rejected += 1;
        self.totals.last_rejection = Some(why);
        Outcome::Rejected(why)
    }

    fn counter_reading(
        &mut self,
        r: MeterReading,
        raw: u64,
        joules_per_unit: f64,
        kind: CounterKind,
    ) -> Outcome {
        self.totals.energy.method = Method::Counter;
        self.power.clear();
        self.last_power_ns = None;
        let spec = CounterSpec {
            kind,
            joules_per_unit,
            max_power_w: self.cfg.max_node_power_w,
            margin: self.cfg.margin,
            staleness_ns: self.cfg.staleness_ns,
        };
        // A counter of another kind or unit than before (reconfigured meter): start again.
        let same = matches!(&self.counter, Some((k, jpu, _)) if *k == kind && *jpu == joules_per_unit.to_bits());
        if !same {
            self.counter = Some((kind, joules_per_unit.to_bits(), EnergyCounter::new(spec)));
        }
        let (_, _, counter) = self.counter.as_mut().expect("counter set above");
        let reading = RawReading {
            at_ns: r.at_ns,
            value: raw,
        };
        let generation_changed = matches!(
            (self.generation, r.generation),
            (Some(a), Some(b)) if a != b
        );
        let step = match counter.last() {
            Some(prev) if generation_changed && r.at_ns >= prev.at_ns => {
                // The counters were reset: the new value is the energy since the reset, taken
                // if plausible for the interval, as for any resetting counter.
                self.totals.generation_changes += 1;
                counter.clear();
                counter.update(reading);
                let max_units = spec.max_delta_units(r.at_ns - prev.at_ns);
                if raw as f64 > max_units {
                    Step::Dropped {
                        from_ns: prev.at_ns,
                        to_ns: r.at_ns,
                        anomaly: crate::counter::Anomaly::ResetImplausible {
                            units: raw,
                            max_units,
                        },
                    }
                } else {
                    Step::Delta(EnergyDelta {
                        from_ns: prev.at_ns,
                        to_ns: r.at_ns,
                        joules: raw as f64 * joules_per_unit,
                        event: Some(CounterEvent::Reset),
                    })
                }
            }
            _ => counter.update(reading),
        };
        self.totals.energy.add(&step);
        match step {
            Step::Baseline => Outcome::Baseline,
            Step::Delta(d) => Outcome::Delta(d),
            Step::Dropped { anomaly, .. } => {
                self.totals.rejected += 1;
                let why = match anomaly {
                    crate::counter::Anomaly::Implausible { units, max_units }
                    | crate::counter::Anomaly::ResetImplausible { units, max_units } => {
                        Rejection::ImplausibleEnergy {
                            joules: units as f64 * joules_per_unit,
                            max_joules: max_units * joules_per_unit,
                        }
                    }
                    crate::counter::Anomaly::TimeWentBackwards => Rejection::TimeWentBackwards,
                };
                self.totals.last_rejection = Some(why);
                Outcome::Rejected(why)
            }
        }
    }

    fn power_reading(&mut self, at_ns: u64, watts: f64) -> Outcome {
        self.totals.energy.method = Method::IntegratedPower;
        self.counter = None;
        if !watts.is_finite() {
            return self.reject(Rejection::NotFinite);
        }
        if watts < 0.0 {
            return self.reject(Rejection::NegativePower(watts));
        }
        if watts > self.cfg.max_node_power_w {
            return self.reject(Rejection::AbovePowerLimit {
                watts,
                max_w: self.cfg.max_node_power_w,
            });
        }
        if let Some(prev) = self.last_power_ns {
            if at_ns < prev {
                return self.reject(Rejection::TimeWentBackwards);
            }
            if at_ns - prev > self.cfg.max_gap_ns {
                self.totals.holes += 1;
                self.totals.hole_ns += at_ns - prev;
                self.power.clear();
                self.power.update(at_ns, watts);
                self.last_power_ns = Some(at_ns);
                return Outcome::Hole {
                    from_ns: prev,
                    to_ns: at_ns,
                };
            }
        }
        self.last_power_ns = Some(at_ns);
        let step = self.power.update(at_ns, watts);
        self.totals.energy.add(&step);
        match step {
            Step::Delta(d) => Outcome::Delta(d),
            _ => Outcome::Baseline,
        }
    }
}

/// What a [`MeterWorker`] publishes after each read.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterStatus {
    /// Totals so far.
    pub totals: MeterTotals,
    /// Reads attempted.
    pub reads: u64,
    /// Reads that failed (the meter's error, not a rejected value).
    pub errors: u64,
    /// The last read error, if the last read failed.
    pub last_error: Option<String>,
    /// The last accepted reading.
    pub last_reading: Option<MeterReading>,
}

/// One point of a meter's cumulative energy series: the energy integrated up to `at_ns`.
/// Points of the same `segment` may be interpolated between (the energy between two of them is
/// spread in proportion to time); a new segment starts after a hole, a rejected counter delta
/// or at the first reading, and nothing is known between segments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeterPoint {
    /// CLOCK_MONOTONIC ns.
    pub at_ns: u64,
    /// Cumulative energy integrated so far, J.
    pub energy_j: f64,
    /// Which continuous stretch of readings the point belongs to.
    pub segment: u64,
}

/// Most points a [`MeterWorker`] keeps (at one read a second, more than an hour).
pub const MAX_POINTS: usize = 4096;

/// The cumulative energy at `at_ns`, linearly interpolated between the two points of one
/// segment that bracket it; `None` outside the series or between segments.
pub fn interpolate_points(points: &[MeterPoint], at_ns: u64) -> Option<f64> {
    let i = points.partition_point(|p| p.at_ns < at_ns);
    let after = points.get(i)?;
    if after.at_ns == at_ns {
        return Some(after.energy_j);
    }
    let before = points.get(i.checked_sub(1)?)?;
    if before.segment != after.segment {
        return None;
    }
    let f = (at_ns - before.at_ns) as f64 / (after.at_ns - before.at_ns) as f64;
    Some(before.energy_j + f * (after.energy_j - before.energy_j))
}

struct Shared {
    status: Mutex<MeterStatus>,
    points: Mutex<std::collections::VecDeque<MeterPoint>>,
    published: Condvar,
    stop: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<()>,
}

/// Reads one meter on a thread of its own every `period` and publishes its totals: a slow or
/// hung BMC delays only this thread, never a sampler that reads [`MeterWorker::status`].
pub struct MeterWorker {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MeterWorker {
    /// Start reading `meter` every `period` (or as soon as the previous read returned, when a
    /// read takes longer than the period).
    pub fn spawn(
        mut meter: Box<dyn NodeMeter>,
        cfg: IntegratorConfig,
        period: Duration,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            status: Mutex::new(MeterStatus {
                totals: EnergyIntegrator::new(cfg).totals().clone(),
                reads: 0,
                errors: 0,
                last_error: None,
                last_reading: None,
            }),
            points: Mutex::new(std::collections::VecDeque::with_capacity(MAX_POINTS)),
            published: Condvar::new(),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(()),
        });
        let inner = Arc::clone(&shared);
        // Opened and read once elsewhere (ergond's start-up probe): what that thread holds goes.
        meter.release();
        let name = format!("ergond-meter-{}", meter.kind());
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut integrator = EnergyIntegrator::new(cfg);
            let mut segment = 0u64;
            let period_ns = period.as_nanos() as u64;
            let mut next = crate::clock::monotonic_ns();
            while !inner.stop.load(Ordering::Acquire) {
                let result = meter.read();
                {
                    let mut st = inner.status.lock().unwrap_or_else(|e| e.into_inner());
                    st.reads += 1;
                    match result {
                        Ok(r) => {
                            let outcome = integrator.update(r);
                            let energy_j = integrator.totals().energy.joules;
                            let point = match outcome {
                                Outcome::Delta(d) => Some((d.to_ns, false)),
                                Outcome::Baseline | Outcome::Hole { .. } => Some((r.at_ns, true)),
                                // A rejected counter delta: the counter starts again from the
                                // reading, the interval it closed is unmeasured.
                                Outcome::Rejected(why)
                                    if matches!(r.quantity, Quantity::Energy { .. })
                                        && why != Rejection::TimeWentBackwards =>
                                {
                                    Some((r.at_ns, true))
                                }
                                _ => None,
                            };
                            if let Some((at_ns, new_segment)) = point {
                                if new_segment {
                                    segment += 1;
                                }
                                let mut pts =
                                    inner.points.lock().unwrap_or_else(|e| e.into_inner());
                                if pts.back().is_some_and(|p| p.at_ns >= at_ns) {
                                    // Not after the last point: cannot extend the series.
                                } else {
                                    if pts.len() >= MAX_POINTS {
                                        pts.pop_front();
                                    }
                                    pts.push_back(MeterPoint {
                                        at_ns,
                                        energy_j,
                                        segment,
                                    });
                                }
                            }
                            st.totals = integrator.totals().clone();
                            st.last_reading = Some(r);
                            st.last_error = None;
                        }
                        Err(e) => {
                            st.errors += 1;
                            st.last_error = Some(e.to_string());
                        }
                    }
                }
                inner.published.notify_all();
                next += period_ns;
                let now = crate::clock::monotonic_ns();
                if next < now {
                    next = now;
                }
                let guard = inner.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
                if !inner.stop.load(Ordering::Acquire) {
                    let _ = inner
                        .wake
                        .wait_timeout(guard, Duration::from_nanos(next - now));
                }
            }
        })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// A copy of the latest totals: waits only for the copy, never for a read in progress.
    pub fn status(&self) -> MeterStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The points of the energy series from the last one at or before `from_ns` on, into
    /// `out` (cleared first).
    pub fn points_since(&self, from_ns: u64, out: &mut Vec<MeterPoint>) {
        out.clear();
        let pts = self.shared.points.lock().unwrap_or_else(|e| e.into_inner());
        let start = pts
            .partition_point(|p| p.at_ns <= from_ns)
            .saturating_sub(1);
        out.extend(pts.range(start..).copied());
    }

    /// The instant of the newest point of the energy series.
    pub fn newest_point_ns(&self) -> Option<u64> {
        let pts = self.shared.points.lock().unwrap_or_else(|e| e.into_inner());
        pts.back().map(|p| p.at_ns)
    }

    /// Wait until the energy series has a point at or after `at_ns`, at most `timeout`;
    /// whether it has.
    pub fn wait_for_point_at(&self, at_ns: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.newest_point_ns().is_some_and(|t| t >= at_ns) {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline || self.shared.stop.load(Ordering::Acquire) {
                return false;
            }
            st = self
                .shared
                .published
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stop the thread after its current read (a read in progress ends at its own timeout).
    pub fn stop(mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn signal_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _guard = self.shared.wake_lock.lock();
        self.shared.wake.notify_all();
    }
}

impl Drop for MeterWorker {
    fn drop(&mut self) {
        // Do not join here: a drop must not wait for a slow BMC; the thread ends after its read.
        self.signal_stop();
    }
}

fn default_true() -> bool {
    true
}
fn default_hwmon_root() -> PathBuf {
    PathBuf::from("/sys/class/hwmon")
}
fn default_pm_counters_root() -> PathBuf {
    PathBuf::from("/sys/cray/pm_counters")
}
fn default_pm_counter() -> String {
    pm_counters::DEFAULT_COUNTER.to_string()
}

/// `[meters.hwmon]`: hwmon power meters, looked for unless `enabled = false`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HwmonConfig {
    /// Look for one (default true). Absent hardware is not a problem.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The hwmon class directory.
    #[serde(default = "default_hwmon_root")]
    pub root: PathBuf,
    /// hwmon device `name`s that measure the whole node; empty: [`hwmon::DEFAULT_NAMES`].
    #[serde(default)]
    pub names: Vec<String>,
}

impl Default for HwmonConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            root: default_hwmon_root(),
            names: Vec::new(),
        }
    }
}

/// `[meters.pm_counters]`: HPE Cray pm_counters, looked for unless `enabled = false`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmCountersConfig {
    /// Look for them (default true). Absent hardware is not a problem.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The pm_counters directory.
    #[serde(default = "default_pm_counters_root")]
    pub root: PathBuf,
    /// The counter read: `energy` (the node), or `cpu0_energy`, `memory_energy`,
    /// `accel0_energy`, ...
    #[serde(default = "default_pm_counter")]
    pub counter: String,
}

impl Default for PmCountersConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            root: default_pm_counters_root(),
            counter: default_pm_counter(),
        }
    }
}

/// `[meters]` in ergond.toml: the node meters and how their readings are integrated.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetersConfig {
    /// Highest power the node can draw, watts (its power supplies' rating): readings above it
    /// are rejected.
    pub max_node_power_w: f64,
    /// Power-only meters: reads further apart than this are not integrated across (a hole).
    pub max_gap_ms: u64,
    /// hwmon power meters.
    pub hwmon: HwmonConfig,
    /// HPE Cray pm_counters.
    pub pm_counters: PmCountersConfig,
    /// The BMC's Redfish service; only read when configured.
    pub redfish: Option<redfish::RedfishConfig>,
    /// The BMC over IPMI; only read when configured.
    pub ipmi: Option<ipmi::IpmiConfig>,
    /// Which meter ergond reads for the node's energy at the wall ([`select`]).
    #[serde(rename = "use")]
    pub use_: MeterChoice,
    /// The meter's stated accuracy, percent of its reading: components measured above the
    /// meter by more than this (and 1 J) over an interval are a disagreement.
    pub accuracy_percent: f64,
    /// How often the meter is read, ms; 0: at its resolution (at least every 100 ms, at most
    /// every 10 s).
    pub read_period_ms: u64,
}

/// `[meters] use`: which node meter is read for attribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterChoice {
    /// The first of pm_counters, hwmon, Redfish, IPMI that opens and reads.
    #[default]
    Auto,
    /// Only hwmon.
    Hwmon,
    /// Only pm_counters.
    PmCounters,
    /// Only Redfish.
    Redfish,
    /// Only IPMI.
    Ipmi,
    /// No meter: nothing at the wall.
    None,
}

impl Default for MetersConfig {
    fn default() -> Self {
        Self {
            max_node_power_w: 15_000.0,
            max_gap_ms: 10_000,
            hwmon: HwmonConfig::default(),
            pm_counters: PmCountersConfig::default(),
            redfish: None,
            ipmi: None,
            use_: MeterChoice::Auto,
            accuracy_percent: 5.0,
            read_period_ms: 0,
        }
    }
}

impl MetersConfig {
    /// Check the values that TOML alone cannot: the key at fault and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.max_node_power_w.is_finite() && self.max_node_power_w > 0.0) {
            return Err((
                "meters.max_node_power_w",
                format!("a positive number of watts, not {}", self.max_node_power_w),
            ));
        }
        if self.max_gap_ms == 0 {
            return Err(("meters.max_gap_ms", "must be at least 1".into()));
        }
        if !(self.accuracy_percent.is_finite() && (0.0..=100.0).contains(&self.accuracy_percent)) {
            return Err((
                "meters.accuracy_percent",
                format!("a percentage in 0..=100, not {}", self.accuracy_percent),
            ));
        }
        if self.read_period_ms > 60_000 {
            return Err((
                "meters.read_period_ms",
                "at most 60000 (0: the meter's resolution)".into(),
            ));
        }
        if let Some(r) = &self.redfish {
            if r.timeout_ms == 0 || r.max_response_bytes == 0 || r.resolution_ms == 0 {
                return Err((
                    "meters.redfish",
                    "timeout_ms, max_response_bytes and resolution_ms must be at least 1".into(),
                ));
            }
            if !r.credentials_file.is_absolute() {
                return Err((
                    "meters.redfish.credentials_file",
                    "must be an absolute path".into(),
                ));
            }
        }
        if let Some(i) = &self.ipmi {
            if i.timeout_ms == 0 || i.resolution_ms == 0 {
                return Err((
                    "meters.ipmi",
                    "timeout_ms and resolution_ms must be at least 1".into(),
                ));
            }
            if i.host.is_some() && i.credentials_file.is_none() {
                return Err((
                    "meters.ipmi.credentials_file",
                    "needed with `host` (IPMI over LAN)".into(),
                ));
            }
            if i.credentials_file
                .as_ref()
                .is_some_and(|p| !p.is_absolute())
            {
                return Err((
                    "meters.ipmi.credentials_file",
                    "must be an absolute path".into(),
                ));
            }
        }
        Ok(())
    }

    /// The integration rules for `meter`.
    pub fn integrator_config(&self, meter: &dyn NodeMeter) -> IntegratorConfig {
        IntegratorConfig {
            max_node_power_w: self.max_node_power_w,
            margin: 1.2,
            max_gap_ns: self.max_gap_ms.saturating_mul(1_000_000),
            staleness_ns: meter.resolution_ns(),
        }
    }
}

/// What `ergond check` says about one kind of meter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MeterDetection {
    /// The kind of meter.
    pub kind: MeterKind,
    /// Whether it is looked for (hwmon and pm_counters by default, Redfish and IPMI when
    /// configured).
    pub enabled: bool,
    /// Whether it was opened and read.
    pub ok: bool,
    /// Where the values come from.
    pub source: Option<String>,
    /// Its resolution, ms.
    pub resolution_ms: Option<f64>,
    /// The value read, with its unit (`312.5 W`, `1234567 J`).
    pub reading: Option<String>,
    /// Why it is absent or failed.
    pub why: Option<String>,
    /// Whether `why` is a problem to fix (a configured meter that fails), rather than hardware
    /// this node does not have.
    pub problem: bool,
    /// Whether ergond would read this one for the energy at the wall (`[meters] use`).
    pub used: bool,
}

/// Open a meter of `kind` as configured; `Ok(None)` when it is disabled or not configured.
pub fn open(cfg: &MetersConfig, kind: MeterKind) -> Result<Option<Box<dyn NodeMeter>>, MeterError> {
    Ok(match kind {
        MeterKind::Hwmon if cfg.hwmon.enabled => Some(Box::new(hwmon::HwmonMeter::open(
            &cfg.hwmon.root,
            &cfg.hwmon.names,
        )?)),
        MeterKind::PmCounters if cfg.pm_counters.enabled => Some(Box::new(
            pm_counters::PmCountersMeter::open(&cfg.pm_counters.root, &cfg.pm_counters.counter)?,
        )),
        MeterKind::Redfish => match &cfg.redfish {
            Some(r) => Some(Box::new(redfish::RedfishMeter::new(r.clone())?)),
            None => None,
        },
        MeterKind::Ipmi => match &cfg.ipmi {
            Some(i) => Some(Box::new(ipmi::IpmiMeter::new(i.clone())?)),
            None => None,
        },
        _ => None,
    })
}

/// The order [`MeterChoice::Auto`] tries the meters in: the most precise first (pm_counters
/// and hwmon are local energy counters or averages; a BMC is slower and coarser).
pub const AUTO_ORDER: [MeterKind; 4] = [
    MeterKind::PmCounters,
    MeterKind::Hwmon,
    MeterKind::Redfish,
    MeterKind::Ipmi,
];

/// Open the node meter ergond reads for attribution, as `[meters] use` says: the first of
/// [`AUTO_ORDER`] (or the one named) that opens and reads once. Blocks for a BMC's read: call
/// it off any async runtime. `None` (and why, for the log) when there is none.
pub fn select(cfg: &MetersConfig) -> Result<Box<dyn NodeMeter>, String> {
    let kinds: Vec<MeterKind> = match cfg.use_ {
        MeterChoice::None => return Err("[meters] use = \"none\"".into()),
        MeterChoice::Auto => AUTO_ORDER.to_vec(),
        MeterChoice::Hwmon => vec![MeterKind::Hwmon],
        MeterChoice::PmCounters => vec![MeterKind::PmCounters],
        MeterChoice::Redfish => vec![MeterKind::Redfish],
        MeterChoice::Ipmi => vec![MeterKind::Ipmi],
    };
    let mut why = Vec::new();
    for kind in kinds {
        match open(cfg, kind) {
            Ok(Some(mut m)) => match m.read() {
                Ok(_) => return Ok(m),
                Err(e) => why.push(format!("{kind}: {e}")),
            },
            Ok(None) => why.push(format!("{kind}: not enabled or configured")),
            Err(e) => why.push(format!("{kind}: {e}")),
        }
    }
    Err(why.join("; "))
}

/// How often to read `meter`: `[meters] read_period_ms`, or its resolution within 100 ms..10 s.
pub fn read_period(cfg: &MetersConfig, meter: &dyn NodeMeter) -> Duration {
    if cfg.read_period_ms > 0 {
        return Duration::from_millis(cfg.read_period_ms);
    }
    Duration::from_nanos(meter.resolution_ns().clamp(100_000_000, 10_000_000_000))
}

/// Open and read each kind of meter once, for `ergond check`. A Redfish read takes up to its
/// `timeout_ms`.
pub fn detect(cfg: &MetersConfig) -> Vec<MeterDetection> {
    let mut found = [
        MeterKind::Hwmon,
        MeterKind::PmCounters,
        MeterKind::Redfish,
        MeterKind::Ipmi,
    ]
    .into_iter()
    .map(|kind| {
        let mut d = MeterDetection {
            kind,
            enabled: false,
            ok: false,
            source: None,
            resolution_ms: None,
            reading: None,
            why: None,
            problem: false,
            used: false,
        };
        let opened = open(cfg, kind);
        d.enabled = !matches!(opened, Ok(None));
        let result = opened.and_then(|m| match m {
            None => Ok(None),
            Some(mut m) => {
                let r = m.read();
                d.source = Some(m.source());
                d.resolution_ms = Some(m.resolution_ns() as f64 / 1e6);
                r.map(Some)
            }
        });
        match result {
            Ok(None) => {
                d.why = Some(match kind {
                    MeterKind::Redfish => "not configured ([meters.redfish])".into(),
                    MeterKind::Ipmi => "not configured ([meters.ipmi])".into(),
                    _ => "disabled in the configuration".into(),
                });
            }
            Ok(Some(r)) => {
                d.ok = true;
                d.reading = Some(match r.quantity {
                    Quantity::Energy {
                        raw,
                        joules_per_unit,
                        ..
                    } => format!("{} J", raw as f64 * joules_per_unit),
                    Quantity::Power { watts } => format!("{watts} W"),
                });
            }
            Err(e) => {
                // Absent local hardware is normal; a configured BMC that fails is not, nor
                // is local hardware that exists and cannot be read.
                d.problem = !matches!(e, MeterError::NotFound(_))
                    || matches!(kind, MeterKind::Redfish | MeterKind::Ipmi);
                d.why = Some(e.to_string());
            }
        }
        d
    })
    .collect::<Vec<_>>();
    mark_used(&mut found, cfg.use_);
    found
}

/// Mark the meter [`select`] would take: the first working one in [`AUTO_ORDER`], or the one
/// named.
fn mark_used(found: &mut [MeterDetection], choice: MeterChoice) {
    let wanted = |k: MeterKind| match choice {
        MeterChoice::Auto => true,
        MeterChoice::None => false,
        MeterChoice::Hwmon => k == MeterKind::Hwmon,
        MeterChoice::PmCounters => k == MeterKind::PmCounters,
        MeterChoice::Redfish => k == MeterKind::Redfish,
        MeterChoice::Ipmi => k == MeterKind::Ipmi,
    };
    let used = AUTO_ORDER
        .into_iter()
        .find(|&k| wanted(k) && found.iter().any(|d| d.kind == k && d.ok));
    for d in found.iter_mut() {
        d.used = Some(d.kind) == used;
    }
}

/// Read a whole small file, trimmed, naming it in the error.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String, MeterError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| MeterError::Io {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn cfg() -> IntegratorConfig {
        IntegratorConfig {
            max_node_power_w: 2000.0,
            margin: 1.2,
            max_gap_ns: 10 * S,
            staleness_ns: 0,
        }
    }

    fn power(at_ns: u64, watts: f64) -> MeterReading {
        MeterReading {
            at_ns,
            quantity: Quantity::Power { watts },
            generation: None,
            freshness: None,
        }
    }

    fn joules(at_ns: u64, j: u64, generation: u64, freshness: u64) -> MeterReading {
        MeterReading {
            at_ns,
            quantity: Quantity::Energy {
                raw: j,
                joules_per_unit: 1.0,
                kind: CounterKind::Resetting,
            },
            generation: Some(generation),
            freshness: Some(freshness),
        }
    }

    fn microjoules(at_ns: u64, uj: u64) -> MeterReading {
        MeterReading {
            at_ns,
            quantity: Quantity::Energy {
                raw: uj,
                joules_per_unit: 1e-6,
                kind: CounterKind::Resetting,
            },
            generation: None,
            freshness: None,
        }
    }

    #[test]
    fn power_is_integrated_with_the_trapezoid_rule() {
        let mut i = EnergyIntegrator::new(cfg());
        assert_eq!(i.update(power(0, 100.0)), Outcome::Baseline);
        let Outcome::Delta(d) = i.update(power(2 * S, 300.0)) else {
            panic!()
        };
        assert!((d.joules - 400.0).abs() < 1e-9);
        i.update(power(3 * S, 300.0));
        let t = i.totals();
        assert_eq!(t.energy.method, Method::IntegratedPower);
        assert!((t.energy.joules - 700.0).abs() < 1e-9);
        assert_eq!(t.energy.covered_ns, 3 * S);
    }

    #[test]
    fn a_long_gap_is_a_hole_not_filled() {
        let mut i = EnergyIntegrator::new(cfg());
        i.update(power(0, 100.0));
        assert_eq!(
            i.update(power(30 * S, 100.0)),
            Outcome::Hole {
                from_ns: 0,
                to_ns: 30 * S
            }
        );
        // The read after the hole is the new baseline: integration resumes from there.
        let Outcome::Delta(d) = i.update(power(31 * S, 100.0)) else {
            panic!()
        };
        assert_eq!(d.from_ns, 30 * S);
        let t = i.totals();
        assert_eq!((t.holes, t.hole_ns), (1, 30 * S));
        assert!((t.energy.joules - 100.0).abs() < 1e-9);
    }

    #[test]
    fn implausible_power_is_rejected_with_a_reason() {
        let mut i = EnergyIntegrator::new(cfg());
        i.update(power(0, 100.0));
        assert_eq!(
            i.update(power(S, -5.0)),
            Outcome::Rejected(Rejection::NegativePower(-5.0))
        );
        assert_eq!(
            i.update(power(S, f64::NAN)),
            Outcome::Rejected(Rejection::NotFinite)
        );
        let r = i.update(power(S, 5000.0));
        assert_eq!(
            r,
            Outcome::Rejected(Rejection::AbovePowerLimit {
                watts: 5000.0,
                max_w: 2000.0
            })
        );
        let Outcome::Rejected(why) = r else { panic!() };
        assert!(why.to_string().contains("above the node's maximum 2000 W"));
        // Rejected values are not integrated: the next good read spans from the last good one.
        let Outcome::Delta(d) = i.update(power(2 * S, 100.0)) else {
            panic!()
        };
        assert_eq!((d.from_ns, d.joules), (0, 200.0));
        assert_eq!(i.totals().rejected, 3);
    }

    #[test]
    fn counters_reuse_reset_and_plausibility_rules() {
        let mut i = EnergyIntegrator::new(cfg());
        assert_eq!(i.update(microjoules(0, 5_000_000)), Outcome::Baseline);
        let Outcome::Delta(d) = i.update(microjoules(S, 505_000_000)) else {
            panic!()
        };
        assert!((d.joules - 500.0).abs() < 1e-9);
        // Reset (driver reload): the new value is the energy since the reset.
        let Outcome::Delta(d) = i.update(microjoules(2 * S, 300_000_000)) else {
            panic!()
        };
        assert_eq!(d.event, Some(CounterEvent::Reset));
        assert!((d.joules - 300.0).abs() < 1e-9);
        // 1 s at 2000 W × 1.2 is at most 2400 J: 3000 J is rejected.
        let r = i.update(microjoules(3 * S, 3_300_000_000));
        assert!(matches!(
            r,
            Outcome::Rejected(Rejection::ImplausibleEnergy { joules, max_joules })
                if (joules - 3000.0).abs() < 1e-6 && (max_joules - 2400.0).abs() < 1e-6
        ));
        let t = i.totals();
        assert_eq!(t.energy.method, Method::Counter);
        assert_eq!((t.energy.resets, t.rejected, t.energy.dropped), (1, 1, 1));
        assert!((t.energy.joules - 800.0).abs() < 1e-6);
        // Counters are exact across long gaps: no hole.
        let Outcome::Delta(d) = i.update(microjoules(100 * S, 3_400_000_000)) else {
            panic!()
        };
        assert!((d.joules - 100.0).abs() < 1e-6);
    }

    #[test]
    fn generation_change_is_a_reset_and_stale_freshness_is_not_a_sample() {
        let mut i = EnergyIntegrator::new(cfg());
        assert_eq!(i.update(joules(0, 1000, 7, 1)), Outcome::Baseline);
        // Same freshness: the controller has not published since; not a sample.
        assert_eq!(i.update(joules(S / 10, 1000, 7, 1)), Outcome::Stale);
        let Outcome::Delta(d) = i.update(joules(S, 1300, 7, 2)) else {
            panic!()
        };
        assert_eq!((d.from_ns, d.joules), (0, 300.0));
        // New generation: reset even though the value went up (2000 > 1300).
        let Outcome::Delta(d) = i.update(joules(3 * S, 2000, 8, 1)) else {
            panic!()
        };
        assert_eq!(d.event, Some(CounterEvent::Reset));
        assert_eq!(d.joules, 2000.0);
        // A new generation whose value the node cannot have drawn since: rejected.
        let r = i.update(joules(4 * S, 9000, 9, 1));
        assert!(matches!(
            r,
            Outcome::Rejected(Rejection::ImplausibleEnergy { .. })
        ));
        // ... and the new generation's value is the baseline after that.
        let Outcome::Delta(d) = i.update(joules(5 * S, 9100, 9, 2)) else {
            panic!()
        };
        assert_eq!(d.joules, 100.0);
        let t = i.totals();
        assert_eq!((t.stale, t.generation_changes, t.energy.resets), (1, 2, 1));
        assert_eq!(t.energy.joules, 2400.0);
    }

    proptest::proptest! {
        /// Power meters: every accepted read closes an integrated interval or a hole, so the
        /// covered and hole time add up to the span between the first and the last good read,
        /// and the energy is within what the power limits allow over the covered time.
        #[test]
        fn power_time_is_covered_or_a_hole(
            reads in proptest::collection::vec((0u64..25 * S, -100.0f64..2500.0), 1..60)
        ) {
            let mut i = EnergyIntegrator::new(cfg());
            let mut at = 0;
            let (mut first, mut last) = (None, 0);
            for (dt, w) in reads {
                at += dt;
                if !matches!(i.update(power(at, w)), Outcome::Rejected(_)) {
                    first.get_or_insert(at);
                    last = at;
                }
            }
            let t = i.totals();
            let span = first.map_or(0, |f| last - f);
            proptest::prop_assert_eq!(t.energy.covered_ns + t.hole_ns, span);
            proptest::prop_assert!(t.energy.joules >= 0.0);
            proptest::prop_assert!(t.energy.joules <= 2000.0 * t.energy.covered_ns as f64 / 1e9 + 1e-6);
        }

        /// pm_counters: with plausible increments, generation changes (resets to a small value)
        /// and stale repeats, the node energy is exactly the sum of the increments and of the
        /// values after each reset.
        #[test]
        fn pm_counters_energy_is_exact(
            steps in proptest::collection::vec((0u64..3, 1u64..1000, 0u64..1500), 1..80)
        ) {
            let mut i = EnergyIntegrator::new(cfg());
            let (mut at, mut value, mut generation, mut freshness) = (S, 0u64, 1u64, 1u64);
            i.update(joules(at, value, generation, freshness));
            let mut expected = 0.0;
            for (what, dt_ms, j) in steps {
                at += dt_ms * 1_000_000;
                match what {
                    // Stale: the same freshness and values.
                    0 => {
                        proptest::prop_assert_eq!(
                            i.update(joules(at, value, generation, freshness)),
                            Outcome::Stale
                        );
                        continue;
                    }
                    // A reset: new generation, the counter restarts at a value the node can
                    // have drawn since (at most 2000 W over dt).
                    1 => {
                        generation += 1;
                        value = j.min(dt_ms * 2);
                        expected += value as f64;
                    }
                    // New energy, within the power limit.
                    _ => {
                        let add = j.min(dt_ms * 2);
                        value += add;
                        expected += add as f64;
                    }
                }
                freshness += 1;
                let o = i.update(joules(at, value, generation, freshness));
                proptest::prop_assert!(!matches!(o, Outcome::Rejected(_)), "{:?}", o);
            }
            proptest::prop_assert_eq!(i.totals().energy.joules, expected);
        }
    }

    #[test]
    fn points_interpolate_within_a_segment_only() {
        let p = |at_ns, energy_j, segment| MeterPoint {
            at_ns,
            energy_j,
            segment,
        };
        let pts = [
            p(0, 0.0, 1),
            p(2 * S, 200.0, 1),
            p(10 * S, 200.0, 2),
            p(11 * S, 300.0, 2),
        ];
        // A meter interval's energy is spread in proportion to time.
        assert_eq!(interpolate_points(&pts, S / 2), Some(50.0));
        assert_eq!(interpolate_points(&pts, 2 * S), Some(200.0));
        assert_eq!(interpolate_points(&pts, 10 * S + S / 10), Some(210.0));
        // Between segments (a hole) and outside the series: unknown.
        assert_eq!(interpolate_points(&pts, 5 * S), None);
        assert_eq!(interpolate_points(&pts, 12 * S), None);
    }

    #[test]
    fn time_going_backwards_is_rejected() {
        let mut i = EnergyIntegrator::new(cfg());
        i.update(power(5 * S, 10.0));
        assert_eq!(
            i.update(power(S, 10.0)),
            Outcome::Rejected(Rejection::TimeWentBackwards)
        );
        let mut i = EnergyIntegrator::new(cfg());
        i.update(microjoules(5 * S, 10));
        assert_eq!(
            i.update(microjoules(S, 20)),
            Outcome::Rejected(Rejection::TimeWentBackwards)
        );
    }
}
