//! The manifest: sealing and verification, error cases, exact JSON round trips, and
//! agreement with `manifest.schema.json`.

mod common;

use common::config;
use ergon_protocol::*;
use proptest::prelude::*;
use serde_json::Value;

fn sample() -> Manifest {
    let start = 1_700_000_000_000_000_000;
    let end = start + 3_600_000_000_000;
    let mut m = Manifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        cluster: "hpc1".into(),
        node: "gpu-node-07".into(),
        job: JobInfo {
            job_id: 1234,
            array_job_id: Some(1200),
            array_task_id: Some(34),
            user: "alice".into(),
            uid: 1001,
            account: Some("physics".into()),
            partition: None,
        },
        start_unix_ns: start,
        end_unix_ns: end,
        duration_s: 3600.0,
        steps: vec![
            StepEnergy {
                step: StepId::Batch,
                start_unix_ns: start,
                end_unix_ns: end,
                energy_j: 1_500_000.25,
                gpu_j: Some(1_200_000.0),
                cpu_j: Some(280_000.25),
                dram_j: Some(20_000.0),
            },
            StepEnergy {
                step: StepId::Numbered(0),
                start_unix_ns: start + 10,
                end_unix_ns: end - 10,
                energy_j: 0.1,
                gpu_j: None,
                cpu_j: Some(0.1),
                dram_j: None,
            },
        ],
        gpus: vec![GpuEnergy {
            uuid: "GPU-8a1f0c4e-3b7d-4e7e-9a51-2f0c1d2e3f40".into(),
            index: 0,
            minor: Some(0),
            pci_bus_id: Some("00000000:3B:00.0".into()),
            energy_j: Some(1_200_000.0),
            avg_w: Some(333.333_333_333_333_3),
            peak_w: Some(699.5),
            method: EnergyMethod::Counter,
            shared: false,
        }],
        sockets: vec![SocketEnergy {
            socket: 0,
            package_j: 280_000.25,
            dram_j: Some(20_000.0),
            method: EnergyMethod::Counter,
            share_method: ShareMethod::CgroupCpuTime,
        }],
        totals: Totals {
            energy_j: 1_500_000.25,
            gpu_j: Some(1_200_000.0),
            cpu_j: Some(280_000.25),
            dram_j: Some(20_000.0),
            avg_w: 416.666_736_111_111_1,
            peak_w: 812.0,
        },
        node_context: NodeContext {
            node_energy_j: 2_000_000.0,
            idle_j: 400_000.0,
            unattributed_j: 99_999.75,
        },
        coverage: Coverage {
            fraction: 0.997,
            gaps: vec![Gap {
                start_unix_ns: start + 5_000_000_000,
                end_unix_ns: start + 15_000_000_000,
                reason: "ergond restarted".into(),
                recovered: true,
            }],
        },
        attribution: AttributionInfo {
            model: "exclusive-gpu+cgroup-cpu-time".into(),
            version: 1,
            estimated: false,
        },
        sensors: vec![
            SensorInfo {
                kind: SensorKind::Nvml,
                version: "550.54.15".into(),
                detail: "1 device".into(),
            },
            SensorInfo {
                kind: SensorKind::RaplPowercap,
                version: "6.1.0-18-amd64".into(),
                detail: "package-0, dram".into(),
            },
        ],
        trace: PowerTrace {
            interval_ms: 10_000,
            start_unix_ns: start,
            series: vec![
                TraceSeries {
                    name: "gpu0".into(),
                    watts: vec![310.5, 699.5, 0.1, 1e-7],
                },
                TraceSeries {
                    name: "socket0".into(),
                    watts: vec![80.25, 95.0, 77.7, 81.3],
                },
            ],
        },
        content_hash: String::new(),
    };
    m.seal();
    m
}

#[test]
fn seal_then_verify_round_trips_through_json() {
    let m = sample();
    assert!(m.content_hash.starts_with("sha256:"));
    assert_eq!(m.content_hash.len(), 7 + 64);
    assert!(m.content_hash[7..]
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    m.verify().unwrap();
    let json = m.to_json().unwrap();
    assert!(json.ends_with(b"}\n"));
    assert_eq!(Manifest::from_json(&json).unwrap(), m);
    // Compact or pretty, the file verifies: the hash is over the re-serialisation.
    assert_eq!(
        Manifest::from_json(&serde_json::to_vec(&m).unwrap()).unwrap(),
        m
    );
}

/// Pins the canonical serialisation. If this fails, a change altered the bytes that are
/// hashed (field order, names, number formatting): manifests already written would no
/// longer verify, so that change must bump MANIFEST_SCHEMA_VERSION.
#[test]
fn hash_of_the_sample_is_stable() {
    assert_eq!(
        sample().content_hash,
        "sha256:c57867c03072c97e7ab83ea5bdc7d3f957aa5b606607caaddea1785dd96193a7"
    );
}

#[test]
fn tampering_is_detected() {
    let m = sample();
    let json = String::from_utf8(m.to_json().unwrap()).unwrap();
    let tampered = json.replacen("1500000.25", "1400000.25", 1);
    assert_ne!(tampered, json);
    match Manifest::from_json(tampered.as_bytes()) {
        Err(ManifestError::HashMismatch { expected, computed }) => {
            assert_eq!(expected, m.content_hash);
            assert_ne!(computed, expected);
        }
        other => panic!("expected HashMismatch, got {other:?}"),
    }
    // The unverified reader still shows it.
    assert!(Manifest::from_json_unverified(tampered.as_bytes()).is_ok());

    let mut edited = m.clone();
    edited.job.user = "mallory".into();
    assert!(matches!(
        edited.verify(),
        Err(ManifestError::HashMismatch { .. })
    ));
    edited.seal();
    edited.verify().unwrap();
}

#[test]
fn unsealed_manifest_is_refused() {
    let mut m = sample();
    m.content_hash.clear();
    assert!(matches!(m.verify(), Err(ManifestError::NotSealed)));
    assert!(matches!(
        Manifest::from_json(&m.to_json().unwrap()),
        Err(ManifestError::NotSealed)
    ));
}

#[test]
fn other_schema_versions_are_refused_first() {
    let mut v: Value = serde_json::to_value(sample()).unwrap();
    v["schema_version"] = 2.into();
    let bytes = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        Manifest::from_json(&bytes),
        Err(ManifestError::UnsupportedSchema {
            got: 2,
            supported: MANIFEST_SCHEMA_VERSION
        })
    ));
    // Even when the rest has a shape this build does not know.
    let future = br#"{"schema_version": 7, "totally": ["different"]}"#;
    let err = Manifest::from_json(future).unwrap_err();
    assert!(
        matches!(err, ManifestError::UnsupportedSchema { got: 7, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains('7'));
}

#[test]
fn truncated_or_malformed_json_is_a_json_error() {
    let json = sample().to_json().unwrap();
    for cut in [0, 1, json.len() / 2, json.len() - 3] {
        assert!(
            matches!(
                Manifest::from_json(&json[..cut]),
                Err(ManifestError::Json(_))
            ),
            "cut at {cut}"
        );
    }
    assert!(matches!(
        Manifest::from_json(b"{\"schema_version\": 1}"),
        Err(ManifestError::Json(_))
    ));
    assert!(matches!(
        Manifest::from_json(b"[]"),
        Err(ManifestError::Json(_))
    ));
}

#[test]
fn values_json_cannot_carry_are_refused_at_write() {
    let mut m = sample();
    m.totals.avg_w = f64::NAN;
    m.seal();
    assert!(matches!(
        m.to_json(),
        Err(ManifestError::NotRepresentable(_))
    ));
    let mut m = sample();
    m.trace.series[0].watts[1] = f32::INFINITY;
    assert!(matches!(
        m.to_json(),
        Err(ManifestError::NotRepresentable(_))
    ));
    let mut m = sample();
    m.totals.gpu_j = Some(f64::NAN);
    assert!(matches!(
        m.to_json(),
        Err(ManifestError::NotRepresentable(_))
    ));
}

#[test]
fn enums_serialise_as_documented() {
    let v: Value = serde_json::to_value(sample()).unwrap();
    assert_eq!(v["steps"][0]["step"], "batch");
    assert_eq!(v["steps"][1]["step"], "0");
    assert_eq!(v["gpus"][0]["method"], "counter");
    assert_eq!(v["sockets"][0]["share_method"], "cgroup_cpu_time");
    assert_eq!(v["sensors"][1]["kind"], "rapl-powercap");
    assert_eq!(v["job"]["partition"], Value::Null);
    let m = Manifest {
        gpus: vec![],
        ..sample()
    };
    let v: Value = serde_json::to_value(&m).unwrap();
    assert_eq!(v["gpus"], Value::Array(vec![]));
    assert_eq!(
        serde_json::to_value(EnergyMethod::IntegratedPower).unwrap(),
        "integrated_power"
    );
    assert_eq!(
        serde_json::to_value(SensorKind::RaplPerf).unwrap(),
        "rapl-perf"
    );
}

fn finite_f32() -> impl Strategy<Value = f32> {
    prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO
}

proptest! {
    #![proptest_config(config(64))]

    /// Floats of every magnitude survive the JSON round trip bit for bit, so the hash
    /// verifies after reading.
    #[test]
    fn floats_round_trip_exactly(
        a in common::finite(),
        b in common::finite(),
        c in proptest::option::of(common::finite()),
        watts in prop::collection::vec(finite_f32(), 0..64),
    ) {
        let mut m = sample();
        m.totals.energy_j = a;
        m.duration_s = b;
        m.steps[1].dram_j = c;
        m.trace.series[1].watts = watts;
        m.seal();
        let json = m.to_json().unwrap();
        let back = Manifest::from_json(&json).unwrap();
        prop_assert_eq!(back.totals.energy_j.to_bits(), a.to_bits());
        prop_assert_eq!(back, m);
    }
}

/// The schema's `properties`/`required` match what the types serialise, object by object.
#[test]
fn schema_matches_the_serialised_manifest() {
    let schema: Value = serde_json::from_str(include_str!("../manifest.schema.json")).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let sample = serde_json::to_value(sample()).unwrap();
    let mut checked = 0;
    check_object(&schema, &schema, &sample, "$", &mut checked);
    assert!(checked >= 14, "only {checked} objects checked");
}

fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/$defs/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            &root["$defs"][name]
        }
        None => schema,
    }
}

fn check_object(root: &Value, schema: &Value, value: &Value, at: &str, checked: &mut usize) {
    let schema = resolve(root, schema);
    match value {
        Value::Object(map) => {
            let props = schema["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("{at}: schema has no properties"));
            let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
            let mut schema_keys: Vec<&str> = props.keys().map(String::as_str).collect();
            let mut required: Vec<&str> = schema["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            keys.sort_unstable();
            schema_keys.sort_unstable();
            required.sort_unstable();
            assert_eq!(
                keys, schema_keys,
                "{at}: serialised keys vs schema properties"
            );
            assert_eq!(
                keys, required,
                "{at}: every field is always written, so every field is required"
            );
            assert_eq!(schema["additionalProperties"], false, "{at}");
            *checked += 1;
            for (k, v) in map {
                check_object(root, &props[k], v, &format!("{at}.{k}"), checked);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check_object(root, &schema["items"], item, &format!("{at}[{i}]"), checked);
            }
        }
        Value::String(s) => {
            if let Some(options) = schema.get("enum").and_then(Value::as_array) {
                assert!(
                    options.iter().any(|o| o == s),
                    "{at}: {s:?} not in the schema's enum"
                );
            }
        }
        Value::Number(_) => {
            let ty = &schema["type"];
            assert!(
                ty == "number"
                    || ty == "integer"
                    || schema.get("const").is_some()
                    || ty.as_array().is_some(),
                "{at}: schema type {ty} for a number"
            );
        }
        Value::Null => {
            let types = schema["type"]
                .as_array()
                .unwrap_or_else(|| panic!("{at}: null but the schema is not nullable"));
            assert!(
                types.iter().any(|t| t == "null"),
                "{at}: null but the schema is not nullable"
            );
        }
        Value::Bool(_) => assert_eq!(schema["type"], "boolean", "{at}"),
    }
}
