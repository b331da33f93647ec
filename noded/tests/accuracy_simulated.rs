//! Accuracy on simulated time (no sleeping): RAPL through generated powercap trees with tiny
//! ranges so that counters wrap many times, and the power-integration fallback at exactly 10 Hz
//! over long runs. Ground truth is the exact integral of each profile.

mod common;

use common::profile::{DeviceModel, Profile};
use common::rel_err;
use ergon_testkit::{PowercapTree, ZoneFixture};
use ergond::counter::{EnergyCounter, EnergyTotals, Method, PowerIntegrator, RawReading};
use ergond::sources::rapl::Powercap;

fn profiles() -> Vec<Profile> {
    vec![
        Profile::Constant { watts: 180.0 },
        Profile::Square {
            low_w: 60.0,
            high_w: 320.0,
            period_s: 7.3,
        },
        Profile::Ramp {
            from_w: 40.0,
            to_w: 350.0,
            period_s: 13.0,
        },
        Profile::Random {
            seed: 42,
            min_w: 30.0,
            max_w: 300.0,
            segment_s: 0.75,
        },
    ]
}

#[test]
fn rapl_counter_path_is_exact_across_many_wraps() {
    let dir = tempfile::tempdir().unwrap();
    // Four zones with deliberately small, different ranges (40–90 J) so a 120 s run wraps
    // hundreds of times, each at its own max_energy_range_uj.
    let ranges = [40_000_000u64, 55_555_555, 71_000_001, 90_000_000];
    let zones = [
        ZoneFixture::new("intel-rapl:0", "package-0").with_range(ranges[0]),
        ZoneFixture::new("intel-rapl:0:0", "dram").with_range(ranges[1]),
        ZoneFixture::new("intel-rapl:1", "package-1").with_range(ranges[2]),
        ZoneFixture::new("intel-rapl:1:0", "dram").with_range(ranges[3]),
    ];
    let tree = PowercapTree::create(dir.path(), &zones);
    let profiles = profiles();
    let offsets = [1.0e6, 3.3e6, 0.0, 7.7e6]; // µJ already on the counter at t = 0
    let write = |t: f64| {
        for (k, z) in zones.iter().enumerate() {
            let total_uj = offsets[k] + profiles[k].energy_from_zero(t) * 1e6;
            let v = (total_uj.floor() as u64) % (ranges[k] + 1);
            tree.set_energy_uj(&z.dir, v);
        }
    };
    write(0.0);
    let mut src = Powercap::open(tree.root()).unwrap();
    let mut counters: Vec<_> = src
        .zones()
        .iter()
        .map(|z| EnergyCounter::new(z.counter_spec(400.0, 1.5)))
        .collect();
    let mut totals = vec![EnergyTotals::new(Method::Counter); 4];
    let mut raw = Vec::new();
    let dt_ns = 100_000_000u64; // 10 Hz
    let steps = 1200; // 120 s
    for step in 0..=steps {
        let t_ns = step * dt_ns;
        write(t_ns as f64 / 1e9);
        src.read(&mut raw).unwrap();
        for k in 0..4 {
            totals[k].add(&counters[k].update(RawReading {
                at_ns: t_ns,
                value: raw[k],
            }));
        }
    }
    for k in 0..4 {
        let truth = profiles[k].energy_j(0.0, steps as f64 * 0.1);
        let err = rel_err(totals[k].joules, truth);
        eprintln!(
            "zone {} ({:?}): {:.3} J vs {:.3} J, {} wraps, error {:.2e}%",
            src.zones()[k].key,
            profiles[k],
            totals[k].joules,
            truth,
            totals[k].wraps,
            err * 100.0
        );
        assert!(totals[k].wraps > 100, "zone {k} should wrap often");
        assert_eq!(totals[k].dropped, 0);
        assert!(err < 1e-3, "zone {k}: {err}");
    }
}

#[test]
fn power_integration_at_10_hz_over_ten_minutes_is_within_1_percent() {
    for (k, profile) in profiles().into_iter().enumerate() {
        // Sensor publishes every 20 ms; sampled at 10 Hz starting at an arbitrary phase.
        let m = DeviceModel {
            profile: profile.clone(),
            update_period_s: 0.02,
            initial_energy_mj: 0,
            reset_at_s: None,
        };
        let mut integ = PowerIntegrator::new();
        let mut totals = EnergyTotals::new(Method::IntegratedPower);
        let t0 = 0.0123 * (k as f64 + 1.0);
        let n = 6000; // 600 s at 10 Hz
        for i in 0..=n {
            let t = t0 + i as f64 * 0.1;
            let watts = f64::from(m.power_mw(t)) / 1000.0;
            totals.add(&integ.update((t * 1e9) as u64, watts));
        }
        let truth = profile.energy_j(t0, t0 + n as f64 * 0.1);
        let err = rel_err(totals.joules, truth);
        eprintln!(
            "{profile:?}: integrated at 10 Hz, error {:.3}%",
            err * 100.0
        );
        assert!(err < 0.01, "{profile:?}: {err}");
    }
}
