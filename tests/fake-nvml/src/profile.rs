//! Pure model of a fake GPU: its power profile, the exact energy ground truth, and what the
//! (fake) driver reports at a given instant.
//!
//! This file has no dependency beyond `serde` so that tests outside this crate can include it
//! with `#[path = ".../tests/fake-nvml/src/profile.rs"] mod profile;` and compute the same
//! ground truth the fake library uses, without linking the cdylib's exported C symbols.

use serde::Deserialize;

/// A GPU's power over time, in watts, as a function of scenario time in seconds.
///
/// Every variant has a closed-form (or exactly summed) integral, so [`Profile::energy_j`] is the
/// ground truth that accuracy tests compare against.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Profile {
    /// Constant draw.
    Constant { watts: f64 },
    /// `high_w` during the first half of each period, `low_w` during the second half.
    Square {
        low_w: f64,
        high_w: f64,
        period_s: f64,
    },
    /// Sawtooth: rises linearly from `from_w` to `to_w` over `period_s`, then starts again.
    Ramp {
        from_w: f64,
        to_w: f64,
        period_s: f64,
    },
    /// Piecewise constant: a new level, uniform in `[min_w, max_w]`, every `segment_s` seconds,
    /// drawn from a deterministic generator seeded with `seed`.
    Random {
        seed: u64,
        min_w: f64,
        max_w: f64,
        segment_s: f64,
    },
}

/// splitmix64: a tiny, well-mixed, deterministic generator so the random profile is
/// reproducible from its seed alone and can be evaluated at any segment index in O(1).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Profile {
    /// Power in watts at scenario time `t` (seconds; negative times are treated as 0).
    pub fn power_w(&self, t: f64) -> f64 {
        let t = t.max(0.0);
        match *self {
            Profile::Constant { watts } => watts,
            Profile::Square {
                low_w,
                high_w,
                period_s,
            } => {
                let phase = t.rem_euclid(period_s);
                if phase < period_s / 2.0 {
                    high_w
                } else {
                    low_w
                }
            }
            Profile::Ramp {
                from_w,
                to_w,
                period_s,
            } => from_w + (to_w - from_w) * (t.rem_euclid(period_s) / period_s),
            Profile::Random {
                seed,
                min_w,
                max_w,
                segment_s,
            } => random_level(seed, min_w, max_w, (t / segment_s).floor() as u64),
        }
    }

    /// Exact energy in joules drawn between scenario times `t0` and `t1` (`t0 <= t1`).
    pub fn energy_j(&self, t0: f64, t1: f64) -> f64 {
        self.energy_from_zero(t1) - self.energy_from_zero(t0)
    }

    /// Exact energy in joules from time 0 to `t`.
    pub fn energy_from_zero(&self, t: f64) -> f64 {
        let t = t.max(0.0);
        match *self {
            Profile::Constant { watts } => watts * t,
            Profile::Square {
                low_w,
                high_w,
                period_s,
            } => {
                let periods = (t / period_s).floor();
                let phase = t - periods * period_s;
                let half = period_s / 2.0;
                let partial = if phase < half {
                    high_w * phase
                } else {
                    high_w * half + low_w * (phase - half)
                };
                periods * (high_w + low_w) * half + partial
            }
            Profile::Ramp {
                from_w,
                to_w,
                period_s,
            } => {
                let periods = (t / period_s).floor();
                let phase = t - periods * period_s;
                let slope = (to_w - from_w) / period_s;
                periods * (from_w + to_w) / 2.0 * period_s
                    + from_w * phase
                    + slope * phase * phase / 2.0
            }
            Profile::Random {
                seed,
                min_w,
                max_w,
                segment_s,
            } => {
                let full = (t / segment_s).floor() as u64;
                let mut sum = 0.0;
                for k in 0..full {
                    sum += random_level(seed, min_w, max_w, k) * segment_s;
                }
                sum + random_level(seed, min_w, max_w, full) * (t - full as f64 * segment_s)
            }
        }
    }

    /// Highest power the profile ever reaches (used to size plausibility limits in tests).
    pub fn max_w(&self) -> f64 {
        match *self {
            Profile::Constant { watts } => watts,
            Profile::Square { low_w, high_w, .. } => low_w.max(high_w),
            Profile::Ramp { from_w, to_w, .. } => from_w.max(to_w),
            Profile::Random { max_w, .. } => max_w,
        }
    }
}

fn random_level(seed: u64, min_w: f64, max_w: f64, segment: u64) -> f64 {
    let r = splitmix64(seed ^ splitmix64(segment));
    let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
    min_w + (max_w - min_w) * unit
}

/// What the fake driver reports for one GPU at scenario time `t`: a model of how real NVML
/// counters behave (values only change at update-period boundaries, the energy counter counts
/// millijoules since "driver load" and restarts from 0 at a reset).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceModel {
    /// Power profile (ground truth).
    pub profile: Profile,
    /// Counter / power update period in seconds (0 = continuously updated).
    pub update_period_s: f64,
    /// Energy counter value (mJ) at scenario time 0: energy "since driver load".
    pub initial_energy_mj: u64,
    /// Scenario time at which the driver was "reloaded": the counter restarts from 0 there.
    pub reset_at_s: Option<f64>,
}

impl DeviceModel {
    /// The last update instant at or before `t`: the time the reported values describe.
    pub fn published_at(&self, t: f64) -> f64 {
        let t = t.max(0.0);
        if self.update_period_s > 0.0 {
            (t / self.update_period_s).floor() * self.update_period_s
        } else {
            t
        }
    }

    /// Energy counter (mJ) as the driver reports it at time `t`.
    pub fn energy_counter_mj(&self, t: f64) -> u64 {
        let q = self.published_at(t);
        match self.reset_at_s {
            Some(r) if q >= r => (self.profile.energy_j(r, q) * 1000.0).floor() as u64,
            _ => {
                self.initial_energy_mj + (self.profile.energy_from_zero(q) * 1000.0).floor() as u64
            }
        }
    }

    /// Instantaneous power (mW) as the driver reports it at time `t`: the power at the last
    /// update instant, like a sensor that is sampled once per update period.
    pub fn power_mw(&self, t: f64) -> u32 {
        (self.profile.power_w(self.published_at(t)) * 1000.0).round() as u32
    }

    /// Energy (J) that no reader can ever observe because of the reset: what the counter
    /// accumulated between its last publication before the reset and the reset itself.
    /// Accuracy tests that span a reset subtract it from the ground truth.
    pub fn energy_lost_at_reset_j(&self) -> f64 {
        match self.reset_at_s {
            None => 0.0,
            Some(r) => {
                let last_before = if self.update_period_s > 0.0 {
                    let q = self.published_at(r);
                    if q >= r {
                        q - self.update_period_s
                    } else {
                        q
                    }
                } else {
                    r
                };
                self.profile.energy_j(last_before.max(0.0), r)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numerical integration by the midpoint rule with many steps: an independent check of the
    /// closed forms.
    fn numeric(p: &Profile, t0: f64, t1: f64) -> f64 {
        let n = 200_000;
        let dt = (t1 - t0) / n as f64;
        (0..n)
            .map(|i| p.power_w(t0 + (i as f64 + 0.5) * dt) * dt)
            .sum()
    }

    #[test]
    fn closed_forms_match_numeric_integration() {
        let profiles = [
            Profile::Constant { watts: 250.0 },
            Profile::Square {
                low_w: 80.0,
                high_w: 400.0,
                period_s: 0.37,
            },
            Profile::Ramp {
                from_w: 60.0,
                to_w: 700.0,
                period_s: 1.3,
            },
            Profile::Random {
                seed: 7,
                min_w: 50.0,
                max_w: 500.0,
                segment_s: 0.05,
            },
        ];
        for p in &profiles {
            let exact = p.energy_j(0.123, 3.456);
            let approx = numeric(p, 0.123, 3.456);
            assert!(
                (exact - approx).abs() / exact < 1e-4,
                "{p:?}: {exact} vs {approx}"
            );
        }
    }

    #[test]
    fn counter_restarts_at_reset_and_loss_is_one_period() {
        let m = DeviceModel {
            profile: Profile::Constant { watts: 100.0 },
            update_period_s: 0.01,
            initial_energy_mj: 5_000,
            reset_at_s: Some(0.5),
        };
        assert_eq!(m.energy_counter_mj(0.0), 5_000);
        assert_eq!(m.energy_counter_mj(0.499), 5_000 + 49_000);
        assert_eq!(m.energy_counter_mj(0.5), 0);
        assert_eq!(m.energy_counter_mj(0.515), 1_000);
        assert!((m.energy_lost_at_reset_j() - 1.0).abs() < 1e-9);
    }
}
