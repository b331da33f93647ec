//! Pure energy-counter arithmetic: turning successive raw readings of a cumulative hardware
//! counter into energy deltas, with wraps, resets and impossible jumps handled explicitly.
//!
//! Nothing here does I/O or reads a clock: every function takes the reading and its monotonic
//! timestamp, so the rules can be tested exhaustively (including with property tests).
//!
//! The rules, per counter:
//! * **Wrapping counters** (RAPL powercap `energy_uj`) count modulo their own range
//!   (`max_energy_range_uj + 1`). A reading below the previous one is a single wrap:
//!   `delta = modulus - prev + cur`.
//! * **Resetting counters** (NVML total energy, perf RAPL counts) are 64-bit and never wrap in
//!   practice; a reading below the previous one means the counter restarted from zero (driver
//!   reload). The new value is then the energy since the reset, and is taken as the delta only if
//!   it is plausible.
//! * **Plausibility**: a delta needs at most `max_power_w × (elapsed + staleness) × margin`
//!   joules. `staleness` is the counter's own update period: a counter that publishes every
//!   100 ms can hand a reader 100 ms of energy across a 1 ms read interval. Anything larger is
//!   dropped and flagged (a missed multi-wrap, a reset we cannot size, a broken sensor); the
//!   baseline moves to the new reading so the next interval is measured again.

use std::fmt;

/// How energy for a device or zone was obtained. Reported with every figure so that a reader
/// can tell exact counter energy from the less exact integrated fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Differences of a cumulative hardware energy counter.
    Counter,
    /// Trapezoidal integration of sampled power: used only when no counter exists.
    IntegratedPower,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Counter => "counter",
            Method::IntegratedPower => "integrated_power",
        })
    }
}

/// A sensor that may not exist on this hardware. Unsupported is a state of its own, so that no
/// code path can silently turn "we cannot measure this" into 0 J.
#[derive(Debug, Clone, PartialEq)]
pub enum Support<T> {
    /// The sensor exists and produced this value.
    Supported(T),
    /// The sensor does not exist here; the string says why (for logs and manifests).
    Unsupported(String),
}

impl<T> Support<T> {
    /// The value, if supported.
    pub fn supported(&self) -> Option<&T> {
        match self {
            Support::Supported(v) => Some(v),
            Support::Unsupported(_) => None,
        }
    }
}

/// How a counter behaves when its value goes down.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CounterKind {
    /// Counts modulo `modulus` raw units (powercap: `max_energy_range_uj + 1`).
    Wrapping {
        /// Number of distinct values; the counter goes from `modulus - 1` back to 0.
        modulus: u64,
    },
    /// Never wraps; going down means it restarted from 0 (NVML driver reload, perf re-open).
    Resetting,
}

/// Everything needed to interpret one counter's raw readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CounterSpec {
    /// Wrap or reset semantics.
    pub kind: CounterKind,
    /// Joules per raw unit (powercap µJ: 1e-6; NVML mJ: 1e-3; perf: the event's `.scale`).
    pub joules_per_unit: f64,
    /// Highest power the device can draw, in watts (e.g. 2 × TDP). Used to reject impossible deltas.
    pub max_power_w: f64,
    /// Safety factor on top of `max_power_w` (≥ 1).
    pub margin: f64,
    /// How stale a reading can be, in ns: the counter's update period (see module docs).
    pub staleness_ns: u64,
}

impl CounterSpec {
    /// Largest plausible delta, in raw units, over `elapsed_ns`.
    pub fn max_delta_units(&self, elapsed_ns: u64) -> f64 {
        let seconds = (elapsed_ns.saturating_add(self.staleness_ns)) as f64 / 1e9;
        self.max_power_w * seconds * self.margin / self.joules_per_unit
    }
}

/// One raw reading of a cumulative counter, with the monotonic time it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawReading {
    /// CLOCK_MONOTONIC nanoseconds.
    pub at_ns: u64,
    /// Raw counter value, in the counter's own units.
    pub value: u64,
}

/// Something notable that happened to a counter between two readings, kept for metrics and
/// manifests (a wrap is routine; a reset or a dropped interval is worth surfacing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterEvent {
    /// The counter wrapped once; the delta accounts for it.
    Wrapped,
    /// The counter restarted from 0; the delta is the value since the restart.
    Reset,
}

/// Why an interval's energy was dropped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Anomaly {
    /// The (wrap-corrected) delta exceeds what the device can draw in the interval.
    Implausible {
        /// The delta that was rejected, in raw units.
        units: u64,
        /// The limit it exceeded, in raw units.
        max_units: f64,
    },
    /// The counter went down (reset) and its new value is too large to be energy since the reset.
    ResetImplausible {
        /// The counter value after the reset, in raw units.
        units: u64,
        /// The limit it exceeded, in raw units.
        max_units: f64,
    },
    /// The new reading is not later than the previous one (clock misuse by the caller).
    TimeWentBackwards,
}

/// Energy attributed to one interval between two readings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnergyDelta {
    /// Start of the interval (monotonic ns).
    pub from_ns: u64,
    /// End of the interval (monotonic ns).
    pub to_ns: u64,
    /// Energy in joules.
    pub joules: f64,
    /// Wrap or reset seen in this interval, if any.
    pub event: Option<CounterEvent>,
}

/// Outcome of feeding one reading into a counter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// First reading: it only sets the baseline.
    Baseline,
    /// Energy for the interval since the previous reading.
    Delta(EnergyDelta),
    /// The interval `[from_ns, to_ns]` is unmeasured; the baseline moved to the new reading.
    Dropped {
        /// Start of the unmeasured interval.
        from_ns: u64,
        /// End of the unmeasured interval.
        to_ns: u64,
        /// Why.
        anomaly: Anomaly,
    },
}

/// Tracks one cumulative counter and turns its readings into [`Step`]s.
#[derive(Debug, Clone)]
pub struct EnergyCounter {
    spec: CounterSpec,
    last: Option<RawReading>,
}

impl EnergyCounter {
    /// A counter with no baseline yet.
    pub fn new(spec: CounterSpec) -> Self {
        Self { spec, last: None }
    }

    /// The counter's specification.
    pub fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    /// The last reading accepted as baseline.
    pub fn last(&self) -> Option<RawReading> {
        self.last
    }

    /// Forget the baseline (e.g. after the device was re-opened); the next reading is a baseline.
    pub fn clear(&mut self) {
        self.last = None;
    }

    /// Feed the next reading.
    pub fn update(&mut self, reading: RawReading) -> Step {
        let Some(prev) = self.last else {
            self.last = Some(reading);
            return Step::Baseline;
        };
        if reading.at_ns < prev.at_ns {
            // Keep the old baseline: a reading from the past cannot be placed on the timeline.
            return Step::Dropped {
                from_ns: reading.at_ns,
                to_ns: prev.at_ns,
                anomaly: Anomaly::TimeWentBackwards,
            };
        }
        self.last = Some(reading);
        let elapsed = reading.at_ns - prev.at_ns;
        let max_units = self.spec.max_delta_units(elapsed);
        let (units, event) = if reading.value >= prev.value {
            (reading.value - prev.value, None)
        } else {
            match self.spec.kind {
                CounterKind::Wrapping { modulus } => {
                    if prev.value >= modulus || reading.value >= modulus {
                        // Values outside the declared range: the range is wrong, not the energy.
                        return Step::Dropped {
                            from_ns: prev.at_ns,
                            to_ns: reading.at_ns,
                            anomaly: Anomaly::Implausible {
                                units: prev.value.max(reading.value),
                                max_units,
                            },
                        };
                    }
                    (
                        modulus - prev.value + reading.value,
                        Some(CounterEvent::Wrapped),
                    )
                }
                CounterKind::Resetting => {
                    if reading.value as f64 > max_units {
                        return Step::Dropped {
                            from_ns: prev.at_ns,
                            to_ns: reading.at_ns,
                            anomaly: Anomaly::ResetImplausible {
                                units: reading.value,
                                max_units,
                            },
                        };
                    }
                    (reading.value, Some(CounterEvent::Reset))
                }
            }
        };
        if units as f64 > max_units {
            return Step::Dropped {
                from_ns: prev.at_ns,
                to_ns: reading.at_ns,
                anomaly: Anomaly::Implausible { units, max_units },
            };
        }
        Step::Delta(EnergyDelta {
            from_ns: prev.at_ns,
            to_ns: reading.at_ns,
            joules: units as f64 * self.spec.joules_per_unit,
            event,
        })
    }
}

/// Trapezoidal integration of power samples: the fallback when a device has no energy counter.
/// Every delta it produces is [`Method::IntegratedPower`].
#[derive(Debug, Clone, Default)]
pub struct PowerIntegrator {
    last: Option<(u64, f64)>,
}

impl PowerIntegrator {
    /// An integrator with no sample yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget the previous sample (after a gap in sampling: never integrate across it).
    pub fn clear(&mut self) {
        self.last = None;
    }

    /// Feed a power sample in watts taken at `at_ns`; returns the energy since the previous one.
    pub fn update(&mut self, at_ns: u64, watts: f64) -> Step {
        let Some((t0, w0)) = self.last else {
            self.last = Some((at_ns, watts));
            return Step::Baseline;
        };
        if at_ns < t0 {
            return Step::Dropped {
                from_ns: at_ns,
                to_ns: t0,
                anomaly: Anomaly::TimeWentBackwards,
            };
        }
        self.last = Some((at_ns, watts));
        let dt = (at_ns - t0) as f64 / 1e9;
        Step::Delta(EnergyDelta {
            from_ns: t0,
            to_ns: at_ns,
            joules: (w0 + watts) / 2.0 * dt,
            event: None,
        })
    }
}

/// Running totals for one device or zone: what a sampler keeps and exports.
#[derive(Debug, Clone, PartialEq)]
pub struct EnergyTotals {
    /// How the energy was obtained.
    pub method: Method,
    /// Energy accumulated over accepted intervals, in joules.
    pub joules: f64,
    /// Sum of the accepted intervals' lengths, in ns.
    pub covered_ns: u64,
    /// Sum of the dropped intervals' lengths, in ns (energy there is unknown, not zero).
    pub dropped_ns: u64,
    /// Number of dropped intervals.
    pub dropped: u64,
    /// Number of wraps handled.
    pub wraps: u64,
    /// Number of resets handled.
    pub resets: u64,
}

impl EnergyTotals {
    /// Empty totals for a device measured with `method`.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            joules: 0.0,
            covered_ns: 0,
            dropped_ns: 0,
            dropped: 0,
            wraps: 0,
            resets: 0,
        }
    }

    /// Account one step.
    pub fn add(&mut self, step: &Step) {
        match *step {
            Step::Baseline => {}
            Step::Delta(d) => {
                self.joules += d.joules;
                self.covered_ns += d.to_ns - d.from_ns;
                match d.event {
                    Some(CounterEvent::Wrapped) => self.wraps += 1,
                    Some(CounterEvent::Reset) => self.resets += 1,
                    None => {}
                }
            }
            Step::Dropped {
                from_ns,
                to_ns,
                anomaly,
            } => {
                self.dropped += 1;
                if !matches!(anomaly, Anomaly::TimeWentBackwards) {
                    self.dropped_ns += to_ns - from_ns;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    fn rapl(modulus: u64) -> CounterSpec {
        CounterSpec {
            kind: CounterKind::Wrapping { modulus },
            joules_per_unit: 1e-6,
            max_power_w: 500.0,
            margin: 1.5,
            staleness_ns: 0,
        }
    }

    fn nvml(staleness_ns: u64) -> CounterSpec {
        CounterSpec {
            kind: CounterKind::Resetting,
            joules_per_unit: 1e-3,
            max_power_w: 1000.0,
            margin: 1.5,
            staleness_ns,
        }
    }

    fn delta(step: Step) -> EnergyDelta {
        match step {
            Step::Delta(d) => d,
            other => panic!("expected a delta, got {other:?}"),
        }
    }

    #[test]
    fn first_reading_is_a_baseline() {
        let mut c = EnergyCounter::new(rapl(1 << 32));
        assert_eq!(c.update(RawReading { at_ns: 5, value: 9 }), Step::Baseline);
        assert_eq!(c.last(), Some(RawReading { at_ns: 5, value: 9 }));
    }

    #[test]
    fn forward_delta_in_joules() {
        let mut c = EnergyCounter::new(rapl(1 << 40));
        c.update(RawReading {
            at_ns: 0,
            value: 1_000,
        });
        let d = delta(c.update(RawReading {
            at_ns: 100 * MS,
            value: 31_001_000,
        }));
        assert!((d.joules - 31.0).abs() < 1e-9);
        assert_eq!((d.from_ns, d.to_ns, d.event), (0, 100 * MS, None));
    }

    #[test]
    fn wrap_uses_the_zones_own_modulus() {
        // max_energy_range_uj = 262143328850 → modulus = range + 1.
        let modulus = 262_143_328_851;
        let mut c = EnergyCounter::new(rapl(modulus));
        c.update(RawReading {
            at_ns: 0,
            value: modulus - 1_000,
        });
        let d = delta(c.update(RawReading {
            at_ns: 100 * MS,
            value: 4_000,
        }));
        assert_eq!(d.event, Some(CounterEvent::Wrapped));
        assert!((d.joules - 5_000e-6).abs() < 1e-12);
    }

    #[test]
    fn wrap_to_exactly_zero() {
        let mut c = EnergyCounter::new(rapl(1_000_000));
        c.update(RawReading {
            at_ns: 0,
            value: 999_999,
        });
        let d = delta(c.update(RawReading {
            at_ns: MS,
            value: 0,
        }));
        assert!((d.joules - 1e-6).abs() < 1e-15);
    }

    #[test]
    fn implausible_forward_jump_is_dropped_and_baseline_moves() {
        let mut c = EnergyCounter::new(rapl(1 << 40));
        c.update(RawReading { at_ns: 0, value: 0 });
        // 500 W × 1.5 × 0.1 s = 75 J max; 100 J is impossible.
        let step = c.update(RawReading {
            at_ns: 100 * MS,
            value: 100_000_000,
        });
        assert!(matches!(
            step,
            Step::Dropped {
                anomaly: Anomaly::Implausible {
                    units: 100_000_000,
                    ..
                },
                ..
            }
        ));
        let d = delta(c.update(RawReading {
            at_ns: 200 * MS,
            value: 110_000_000,
        }));
        assert!((d.joules - 10.0).abs() < 1e-9);
    }

    #[test]
    fn wrap_that_would_need_too_much_energy_is_dropped() {
        // Small modulus: going from 10 to 5 would mean nearly a full range (1 kJ) in 10 ms.
        let mut c = EnergyCounter::new(rapl(1_000_000_000));
        c.update(RawReading {
            at_ns: 0,
            value: 10,
        });
        let step = c.update(RawReading {
            at_ns: 10 * MS,
            value: 5,
        });
        assert!(matches!(
            step,
            Step::Dropped {
                anomaly: Anomaly::Implausible { .. },
                ..
            }
        ));
    }

    #[test]
    fn values_outside_the_declared_range_are_dropped() {
        let mut c = EnergyCounter::new(rapl(1_000));
        c.update(RawReading {
            at_ns: 0,
            value: 5_000,
        });
        let step = c.update(RawReading {
            at_ns: MS,
            value: 10,
        });
        assert!(matches!(step, Step::Dropped { .. }));
    }

    #[test]
    fn nvml_decrease_is_a_reset_not_a_wrap() {
        let mut c = EnergyCounter::new(nvml(0));
        c.update(RawReading {
            at_ns: 0,
            value: 9_000_000_000,
        });
        let d = delta(c.update(RawReading {
            at_ns: 100 * MS,
            value: 20_000,
        }));
        assert_eq!(d.event, Some(CounterEvent::Reset));
        assert!((d.joules - 20.0).abs() < 1e-9);
    }

    #[test]
    fn nvml_reset_to_a_large_value_is_dropped() {
        let mut c = EnergyCounter::new(nvml(0));
        c.update(RawReading {
            at_ns: 0,
            value: 9_000_000_000,
        });
        // 1000 W × 1.5 × 0.1 s = 150 J max; 500 J since a reset within 100 ms is impossible.
        let step = c.update(RawReading {
            at_ns: 100 * MS,
            value: 500_000,
        });
        assert!(matches!(
            step,
            Step::Dropped {
                anomaly: Anomaly::ResetImplausible { units: 500_000, .. },
                ..
            }
        ));
        assert_eq!(c.last().map(|r| r.value), Some(500_000));
    }

    #[test]
    fn staleness_allows_a_full_update_period_in_a_short_interval() {
        // A counter updating every 100 ms can publish 100 ms of 700 W (70 J) across a 1 ms read.
        let mut strict = EnergyCounter::new(nvml(0));
        let mut aware = EnergyCounter::new(nvml(100 * MS));
        for c in [&mut strict, &mut aware] {
            c.update(RawReading { at_ns: 0, value: 0 });
        }
        let r = RawReading {
            at_ns: MS,
            value: 70_000,
        };
        assert!(matches!(strict.update(r), Step::Dropped { .. }));
        assert!(matches!(aware.update(r), Step::Delta(_)));
    }

    #[test]
    fn time_going_backwards_keeps_the_baseline() {
        let mut c = EnergyCounter::new(rapl(1 << 32));
        c.update(RawReading {
            at_ns: 100,
            value: 1,
        });
        assert!(matches!(
            c.update(RawReading {
                at_ns: 50,
                value: 2
            }),
            Step::Dropped {
                anomaly: Anomaly::TimeWentBackwards,
                ..
            }
        ));
        assert_eq!(c.last().map(|r| r.at_ns), Some(100));
    }

    #[test]
    fn totals_count_events_and_gaps() {
        // 1 J range; 500 W × 1.5 allows 750 µJ per ms.
        let mut c = EnergyCounter::new(rapl(1_000_000));
        let mut t = EnergyTotals::new(Method::Counter);
        for (at, v) in [(0, 999_000), (MS, 999_100), (2 * MS, 50), (3 * MS, 900_000)] {
            t.add(&c.update(RawReading {
                at_ns: at,
                value: v,
            }));
        }
        assert_eq!(
            (t.wraps, t.dropped, t.covered_ns, t.dropped_ns),
            (1, 1, 2 * MS, MS)
        );
        assert!((t.joules - (100.0 + 950.0) * 1e-6).abs() < 1e-12);
    }

    #[test]
    fn trapezoid_is_exact_for_linear_power() {
        let mut p = PowerIntegrator::new();
        let mut total = EnergyTotals::new(Method::IntegratedPower);
        // P(t) = 100 + 50 t over 2 s in 10 steps: exact integral 200 + 100 = 300 J.
        for i in 0..=10u64 {
            let t = i as f64 * 0.2;
            total.add(&p.update(i * 200 * MS, 100.0 + 50.0 * t));
        }
        assert!((total.joules - 300.0).abs() < 1e-9);
    }

    #[test]
    fn unsupported_is_not_zero() {
        let s: Support<f64> = Support::Unsupported("no energy counter".into());
        assert_eq!(s.supported(), None);
        assert_eq!(Support::Supported(0.0).supported(), Some(&0.0));
    }

    proptest! {
        /// For any power trace within limits and any zone range, summing wrap-corrected deltas of
        /// the wrapped counter gives exactly the true (unwrapped) energy.
        #[test]
        fn wrapped_deltas_sum_to_true_energy(
            modulus in 1_000_000u64..=u64::MAX / 4,
            start in 0u64..1_000_000,
            steps in proptest::collection::vec((1u64..200, 0u64..=400), 1..200),
        ) {
            let spec = CounterSpec { max_power_w: 500.0, ..rapl(modulus) };
            let mut c = EnergyCounter::new(spec);
            let mut t = 0u64;
            let mut truth: u128 = 0;
            let mut raw = start % modulus;
            let mut sum = 0.0;
            prop_assert_eq!(c.update(RawReading { at_ns: t, value: raw }), Step::Baseline);
            for (dt_ms, watts) in steps {
                let dt = dt_ms * MS;
                // µJ drawn: watts × ms × 1000, capped so a single interval never exceeds one wrap.
                let units = (watts * dt_ms * 1000).min(modulus - 1);
                t += dt;
                truth += units as u128;
                raw = ((raw as u128 + units as u128) % modulus as u128) as u64;
                match c.update(RawReading { at_ns: t, value: raw }) {
                    Step::Delta(d) => sum += d.joules,
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            let truth_j = truth as f64 * 1e-6;
            prop_assert!((sum - truth_j).abs() <= 1e-9 * truth_j.max(1.0));
        }

        /// Deltas are never negative and never exceed the plausibility bound, whatever the readings.
        #[test]
        fn deltas_are_bounded(
            kind in prop_oneof![
                (1u64..u64::MAX).prop_map(|m| CounterKind::Wrapping { modulus: m }),
                Just(CounterKind::Resetting),
            ],
            readings in proptest::collection::vec((0u64..1_000_000_000, any::<u64>()), 2..50),
        ) {
            let spec = CounterSpec { kind, ..nvml(5 * MS) };
            let mut c = EnergyCounter::new(spec);
            let mut t = 0;
            for (dt, v) in readings {
                t += dt;
                if let Step::Delta(d) = c.update(RawReading { at_ns: t, value: v }) {
                    prop_assert!(d.joules >= 0.0);
                    let max_j = spec.max_delta_units(d.to_ns - d.from_ns) * spec.joules_per_unit;
                    prop_assert!(d.joules <= max_j * (1.0 + 1e-12));
                }
            }
        }

        /// A resetting counter that restarts once loses at most the energy between the last
        /// reading before the reset and the reset itself; everything else is counted.
        #[test]
        fn reset_counts_everything_after_it(
            before in proptest::collection::vec(1u64..=50_000, 1..50),
            after in proptest::collection::vec(1u64..=50_000, 1..50),
            base in 1_000_000u64..1_000_000_000_000,
        ) {
            // 10 ms steps, ≤ 50 J each (≤ 5 kW would be implausible, so use a 10 kW limit).
            let spec = CounterSpec { max_power_w: 10_000.0, ..nvml(0) };
            let mut c = EnergyCounter::new(spec);
            let mut t = 0;
            let mut v = base;
            c.update(RawReading { at_ns: t, value: v });
            let mut sum = 0.0;
            for u in &before {
                t += 10 * MS;
                v += u;
                if let Step::Delta(d) = c.update(RawReading { at_ns: t, value: v }) { sum += d.joules; }
            }
            // Driver reload: the counter restarts from 0 and has counted `after[0]` since.
            v = 0;
            let mut resets = 0;
            for u in &after {
                t += 10 * MS;
                v += u;
                match c.update(RawReading { at_ns: t, value: v }) {
                    Step::Delta(d) => {
                        if d.event == Some(CounterEvent::Reset) { resets += 1; }
                        sum += d.joules;
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            let expected: u64 = before.iter().sum::<u64>() + after.iter().sum::<u64>();
            // base > any post-reset value, so the reset is always visible as a decrease.
            prop_assert_eq!(resets, 1);
            prop_assert!((sum - expected as f64 * 1e-3).abs() < 1e-6 * (expected as f64).max(1.0));
        }
    }
}
