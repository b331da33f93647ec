//! The GPU source through the real nvml-wrapper against the fake NVML library: enumeration,
//! read paths, update-period detection, counter accuracy across a reset, a lost GPU, and the
//! power-integration fallback.

mod common;

use common::profile::{DeviceModel, Profile};
use common::{rel_err, FakeNvml};
use ergond::clock::monotonic_ns;
use ergond::counter::{Method, Support};
use ergond::sources::nvml::{GpuEnergyMeter, GpuError, GpuReading, GpuSource, ReadVia};
use serde_json::json;
use std::time::Duration;

fn model(profile: &serde_json::Value, period_ms: f64, reset_at_s: Option<f64>) -> DeviceModel {
    DeviceModel {
        profile: serde_json::from_value::<Profile>(profile.clone()).unwrap(),
        update_period_s: period_ms / 1000.0,
        initial_energy_mj: 0,
        reset_at_s,
    }
}

/// Sample every GPU of `src` every `period` for `run`, feeding one meter per GPU; returns the
/// meters and the first (baseline) and last readings of each GPU.
fn sample(
    src: &mut GpuSource,
    meters: &mut [GpuEnergyMeter],
    period: Duration,
    run: Duration,
) -> Vec<(Option<GpuReading>, Option<GpuReading>, Vec<GpuError>)> {
    let n = src.len();
    let mut out: Vec<(Option<GpuReading>, Option<GpuReading>, Vec<GpuError>)> =
        (0..n).map(|_| (None, None, Vec::new())).collect();
    let start = monotonic_ns();
    let mut next = start;
    while monotonic_ns() < start + run.as_nanos() as u64 {
        for i in 0..n {
            match src.read(i) {
                Ok(r) => {
                    meters[i].update(&r);
                    out[i].0.get_or_insert(r);
                    out[i].1 = Some(r);
                }
                Err(e) => out[i].2.push(e),
            }
        }
        next += period.as_nanos() as u64;
        let now = monotonic_ns();
        if next > now {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
    }
    out
}

/// Ground truth as the counter can see it: energy between the update instants the first and
/// last readings reflect, minus what a reset makes unobservable. A reading whose driver call
/// straddled an update instant may reflect either one, so both candidates are returned.
fn counter_truths(
    m: &DeviceModel,
    fake: &FakeNvml,
    first: &GpuReading,
    last: &GpuReading,
) -> Vec<f64> {
    let q = |r: &GpuReading| {
        let (a, b) = (
            m.published_at(fake.t(r.before_ns, 1.0)),
            m.published_at(fake.t(r.after_ns, 1.0)),
        );
        if a == b {
            vec![a]
        } else {
            vec![a, b]
        }
    };
    let mut out = Vec::new();
    for a in q(first) {
        for b in q(last) {
            let lost = match m.reset_at_s {
                Some(r) if a < r && r <= b => m.energy_lost_at_reset_j(),
                _ => 0.0,
            };
            out.push(m.profile.energy_j(a, b) - lost);
        }
    }
    out
}

#[test]
fn counter_path_matches_ground_truth_across_profiles_and_a_reset() {
    let period_ms = 10.0;
    let profiles = [
        json!({"kind": "constant", "watts": 250.0}),
        json!({"kind": "square", "low_w": 80.0, "high_w": 400.0, "period_s": 0.3}),
        json!({"kind": "ramp", "from_w": 60.0, "to_w": 500.0, "period_s": 0.7}),
        json!({"kind": "random", "seed": 3, "min_w": 50.0, "max_w": 450.0, "segment_s": 0.05}),
        json!({"kind": "random", "seed": 11, "min_w": 100.0, "max_w": 300.0, "segment_s": 0.03}),
    ];
    let reset_at = 0.6;
    let gpus: Vec<_> = profiles
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut g = json!({
                "uuid": format!("GPU-0000000{i}-aaaa-bbbb-cccc-ddddeeeeffff"),
                "minor": i,
                "profile": p,
                "update_period_ms": period_ms,
                "initial_energy_mj": 123_456_789u64 * (i as u64 + 1),
            });
            if i == 0 {
                g["unsupported"] = json!(["field_values"]);
            }
            if i == 4 {
                g["reset_at_s"] = json!(reset_at);
            }
            g
        })
        .collect();
    let fake = FakeNvml::new(json!({ "gpus": gpus }));
    let mut src = GpuSource::open(Some(&fake.lib)).unwrap();
    assert_eq!(src.len(), 5);
    let infos = src.gpus();
    assert_eq!(infos[2].id.uuid, "GPU-00000002-aaaa-bbbb-cccc-ddddeeeeffff");
    assert_eq!(infos[2].id.minor, Some(2));
    assert_eq!(infos[2].id.pci_bus_id.as_deref(), Some("00000000:19:00.0"));
    assert_eq!(
        infos[0].energy_via,
        ReadVia::Function,
        "no field values → separate calls"
    );
    assert_eq!(infos[1].energy_via, ReadVia::FieldValue);
    assert_eq!(infos[1].power_via, ReadVia::FieldValue);
    assert!(infos
        .iter()
        .all(|g| g.method == Support::Supported(Method::Counter)));

    fake.wait_for_start();
    let detected = src
        .detect_update_period(1, Duration::from_millis(300), 8)
        .unwrap()
        .expect("counter changes every 10 ms");
    eprintln!("detected counter update period: {detected:?} (scenario: {period_ms} ms)");
    assert!(
        detected >= Duration::from_millis(8) && detected <= Duration::from_millis(12),
        "{detected:?}"
    );
    let sample_period = ergond::sources::nvml::sampling_period(
        Some(detected),
        Duration::from_millis(2),
        Duration::from_millis(200),
        Duration::from_millis(100),
    );

    let mut meters: Vec<_> = (0..5)
        .map(|_| GpuEnergyMeter::new(Method::Counter, 1000.0, detected))
        .collect();
    let results = sample(
        &mut src,
        &mut meters,
        sample_period,
        Duration::from_millis(1200),
    );
    for (i, (first, last, errors)) in results.iter().enumerate() {
        assert!(errors.is_empty(), "gpu {i}: {errors:?}");
        let (first, last) = (first.unwrap(), last.unwrap());
        let m = model(&profiles[i], period_ms, (i == 4).then_some(reset_at));
        let totals = meters[i].totals();
        let err = counter_truths(&m, &fake, &first, &last)
            .into_iter()
            .map(|t| rel_err(totals.joules, t))
            .fold(f64::INFINITY, f64::min);
        eprintln!(
            "gpu {i} ({}): counter {:.3} J, error vs ground truth {:.5}%",
            profiles[i]["kind"],
            totals.joules,
            err * 100.0
        );
        assert!(err < 0.001, "gpu {i}: error {err}");
        assert_eq!(totals.dropped, 0, "gpu {i}");
        assert_eq!(totals.resets, u64::from(i == 4), "gpu {i}");
        // Against the wall-clock interval the counter can lag by one update at each end.
        let wall = m
            .profile
            .energy_j(fake.t(first.at_ns, 1.0), fake.t(last.at_ns, 1.0))
            - m.energy_lost_at_reset_j() * f64::from(u8::from(i == 4));
        assert!(
            (totals.joules - wall).abs() <= 2.0 * period_ms / 1000.0 * m.profile.max_w() + 1e-3,
            "gpu {i}: {} vs wall-interval truth {wall}",
            totals.joules
        );
    }
}

#[test]
fn lost_gpu_is_reported_and_the_others_continue() {
    let gpus: Vec<_> = (0..3)
        .map(|i| {
            let mut g = json!({
                "uuid": format!("GPU-lost-test-{i}"),
                "minor": i,
                "profile": {"kind": "constant", "watts": 100.0 + 50.0 * i as f64},
                "update_period_ms": 5.0,
            });
            if i == 1 {
                g["lost_at_s"] = json!(0.2);
            }
            g
        })
        .collect();
    let fake = FakeNvml::new(json!({ "gpus": gpus }));
    let mut src = GpuSource::open(Some(&fake.lib)).unwrap();
    fake.wait_for_start();
    let mut meters: Vec<_> = (0..3)
        .map(|_| GpuEnergyMeter::new(Method::Counter, 1000.0, Duration::from_millis(5)))
        .collect();
    let results = sample(
        &mut src,
        &mut meters,
        Duration::from_millis(5),
        Duration::from_millis(500),
    );
    let (_, last1, errors1) = &results[1];
    assert!(!errors1.is_empty());
    assert!(errors1
        .iter()
        .all(|e| matches!(e, GpuError::Lost { uuid } if uuid == "GPU-lost-test-1")));
    assert!(src.info(1).lost);
    assert!(fake.t(last1.unwrap().after_ns, 1.0) <= 0.2 + 1e-3);
    let msg = errors1[0].to_string();
    assert!(
        msg.contains("GPU-lost-test-1") && msg.contains("GPU_IS_LOST"),
        "{msg}"
    );
    for i in [0, 2] {
        let (first, last, errors) = &results[i];
        assert!(errors.is_empty());
        assert!(!src.info(i).lost);
        let covered = fake.t(last.unwrap().at_ns, 1.0) - fake.t(first.unwrap().at_ns, 1.0);
        assert!(covered > 0.45, "gpu {i} kept being sampled ({covered} s)");
        let expected = (100.0 + 50.0 * i as f64) * covered;
        assert!(rel_err(meters[i].totals().joules, expected) < 0.03);
    }
}

#[test]
fn power_integration_fallback_at_10_hz_is_within_1_percent() {
    // Scenario time runs 20× faster than the wall clock: 2 s of test = 40 s of GPU time,
    // sampled every 5 ms wall = 10 Hz in GPU time.
    let scale = 20.0;
    let profiles = [
        json!({"kind": "constant", "watts": 250.0}),
        json!({"kind": "square", "low_w": 80.0, "high_w": 400.0, "period_s": 8.0}),
        json!({"kind": "ramp", "from_w": 60.0, "to_w": 500.0, "period_s": 20.0}),
        json!({"kind": "random", "seed": 5, "min_w": 50.0, "max_w": 450.0, "segment_s": 2.0}),
    ];
    let gpus: Vec<_> = profiles
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({
                "uuid": format!("GPU-noenergy-{i}"),
                "minor": i,
                "profile": p,
                "update_period_ms": 10.0,
                "unsupported": ["energy"],
            })
        })
        .collect();
    let fake = FakeNvml::new(json!({ "gpus": gpus, "time_scale": scale }));
    let mut src = GpuSource::open(Some(&fake.lib)).unwrap();
    for g in src.gpus() {
        assert_eq!(g.energy_via, ReadVia::Unsupported);
        assert_eq!(g.power_via, ReadVia::FieldValue);
        assert_eq!(g.method, Support::Supported(Method::IntegratedPower));
    }
    fake.wait_for_start();
    let mut meters: Vec<_> = (0..4)
        .map(|_| GpuEnergyMeter::new(Method::IntegratedPower, 1000.0, Duration::ZERO))
        .collect();
    let results = sample(
        &mut src,
        &mut meters,
        Duration::from_millis(5),
        Duration::from_millis(2000),
    );
    for (i, (first, last, errors)) in results.iter().enumerate() {
        assert!(errors.is_empty());
        let m = model(&profiles[i], 10.0, None);
        let truth = m.profile.energy_j(
            fake.t(first.unwrap().at_ns, scale),
            fake.t(last.unwrap().at_ns, scale),
        );
        let got = meters[i].totals().joules * scale;
        let err = rel_err(got, truth);
        eprintln!(
            "gpu {i} ({}): integrated power at 10 Hz: {got:.1} J vs truth {truth:.1} J, error {:.3}%",
            profiles[i]["kind"],
            err * 100.0
        );
        assert_eq!(meters[i].totals().method, Method::IntegratedPower);
        assert!(err < 0.01, "gpu {i}: error {err}");
    }
}

#[test]
fn gpu_without_energy_or_power_is_unsupported_not_zero() {
    let fake = FakeNvml::new(json!({"gpus": [{
        "uuid": "GPU-blind", "minor": 0, "profile": {"kind": "constant", "watts": 100.0},
        "unsupported": ["energy", "power"]
    }]}));
    let mut src = GpuSource::open(Some(&fake.lib)).unwrap();
    let info = src.info(0).clone();
    assert!(matches!(info.method, Support::Unsupported(_)));
    let r = src.read(0).unwrap();
    assert_eq!((r.energy_mj, r.power_mw), (None, None));
}
