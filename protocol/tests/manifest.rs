//! The manifest: sealing and verification, error cases, exact JSON round trips, and
//! agreement with `manifest.schema.json`.

mod common;

use common::config;
use ergon_protocol::*;
use proptest::prelude::*;
use serde_json::Value;

#[test]
fn seal_then_verify_round_trips_through_json() {
    let m = Manifest::example();
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
/// hashed (field order, names, number formatting, the trace encoding): manifests already
/// written would no longer verify, so that change must bump MANIFEST_SCHEMA_VERSION.
#[test]
fn hash_of_the_sample_is_stable() {
    assert_eq!(MANIFEST_SCHEMA_VERSION, 2);
    assert_eq!(
        Manifest::example().content_hash,
        "sha256:8d861ed8dee32995721aec6fda75c1d3b6c809d4c56ea1f85c8e077d20d93d63"
    );
    // The same content as a schema 1 manifest hashes exactly as the schema 1 release did
    // (this is the value this test pinned before schema 2).
    let mut v1 = Manifest::example();
    v1.schema_version = 1;
    v1.seal();
    assert_eq!(
        v1.content_hash,
        "sha256:c57867c03072c97e7ab83ea5bdc7d3f957aa5b606607caaddea1785dd96193a7"
    );
}

/// A schema 1 manifest written and sealed by the schema 1 release (before the base64 trace
/// encoding), pretty as ergond wrote it, and its compact form.
const V1_PRETTY: &[u8] = include_bytes!("fixtures/manifest-v1.json");
const V1_COMPACT: &[u8] = include_bytes!("fixtures/manifest-v1-compact.json");

#[test]
fn schema_1_manifests_still_verify_byte_for_byte() {
    let m = Manifest::from_json(V1_PRETTY).unwrap();
    assert_eq!(m.schema_version, 1);
    assert_eq!(
        m.content_hash,
        "sha256:21700c80ca9c75ef1846f9100d46d803331385310522796de1626fddde904152"
    );
    assert_eq!(Manifest::from_json(V1_COMPACT).unwrap(), m);
    m.verify().unwrap();
    // Extremes, subnormals and negative zero came through the decimal form exactly.
    let gpu0 = &m.trace.series[0].watts;
    assert_eq!(gpu0.len(), 14);
    assert_eq!(gpu0[5].to_bits(), (-0.0f32).to_bits());
    assert_eq!(gpu0[6], f32::MAX);
    assert_eq!(gpu0[8].to_bits(), 1);
    assert!(m.trace.series[2].watts.is_empty());
    // The canonical form, and the file as written, are reproduced exactly: a schema 1
    // manifest is still serialised in schema 1's form (decimal `watts` arrays).
    assert_eq!(serde_json::to_vec(&m).unwrap(), V1_COMPACT);
    assert_eq!(m.to_json().unwrap(), V1_PRETTY);
    let v: Value = serde_json::from_slice(&m.to_json().unwrap()).unwrap();
    assert!(v["trace"]["series"][0]["watts"].is_array());
    assert!(v["trace"]["series"][0].get("watts_f32le_b64").is_none());
    // The same content as schema 2: the hash of its canonical form, computed independently
    // (Python: the compact fixture with `"schema_version":2`, each `"watts":[…]` replaced by
    // `"watts_f32le_b64":"<base64 of struct.pack('<f', …)>"` and content_hash "", sha256).
    let mut v2 = m.clone();
    v2.schema_version = 2;
    v2.seal();
    assert_eq!(
        v2.content_hash,
        "sha256:bc791678dfe3eb35a12ac70833d40560574d64076e422f93eb63a6ec53ae44c4"
    );
    let canonical = String::from_utf8(serde_json::to_vec(&v2).unwrap()).unwrap();
    assert!(
        canonical.contains(r#"{"name":"socket0","watts_f32le_b64":"AICgQgAAvkJmZptCmpmiQg=="}"#)
    );
    // Tampering with a schema 1 trace is still detected.
    let text = String::from_utf8(V1_PRETTY.to_vec()).unwrap();
    let tampered = text.replacen("123.456", "123.457", 1);
    assert_ne!(tampered, text);
    assert!(matches!(
        Manifest::from_json(tampered.as_bytes()),
        Err(ManifestError::HashMismatch { .. })
    ));
}

#[test]
fn schema_2_writes_traces_as_base64_of_little_endian_f32() {
    let mut m = Manifest::example();
    m.trace.series[0].watts = vec![1.0, -2.5];
    m.trace.series[1].watts = vec![];
    m.seal();
    let json = m.to_json().unwrap();
    let v: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["schema_version"], 2);
    let s0 = &v["trace"]["series"][0];
    // 00 00 80 3f | 00 00 20 c0, RFC 4648 standard alphabet with padding.
    assert_eq!(s0["watts_f32le_b64"], "AACAPwAAIMA=");
    assert_eq!(s0["name"], "gpu0");
    assert!(s0.get("watts").is_none());
    assert_eq!(v["trace"]["series"][1]["watts_f32le_b64"], "");
    // The canonical form carries the same string: hashing it is hashing what is written.
    let canonical = String::from_utf8(serde_json::to_vec(&m).unwrap()).unwrap();
    assert!(canonical.contains(r#"{"name":"gpu0","watts_f32le_b64":"AACAPwAAIMA="}"#));
    assert_eq!(Manifest::from_json(&json).unwrap(), m);
    // A long trace is about 4/3 byte per byte of f32, not ~8 characters per decimal value.
    let mut long = Manifest::example();
    long.trace.series[0].watts = (0..600).map(|i| 100.0 + i as f32 * 0.1).collect();
    long.seal();
    let b64 = serde_json::to_value(&long).unwrap()["trace"]["series"][0]["watts_f32le_b64"]
        .as_str()
        .unwrap()
        .len();
    assert_eq!(b64, 3200);
}

#[test]
fn a_series_is_read_in_either_spelling_and_hashed_in_the_version_s() {
    let m = Manifest::example();
    // A schema 2 manifest whose series were spelled as decimal arrays (not what a writer does)
    // reads as the same values, so it verifies: the canonical form is the version's.
    let mut v: Value = serde_json::to_value(&m).unwrap();
    for (i, s) in v["trace"]["series"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        let obj = s.as_object_mut().unwrap();
        obj.remove("watts_f32le_b64").unwrap();
        obj.insert(
            "watts".into(),
            serde_json::to_value(&m.trace.series[i].watts).unwrap(),
        );
    }
    assert_eq!(
        Manifest::from_json(&serde_json::to_vec(&v).unwrap()).unwrap(),
        m
    );
}

#[test]
fn bad_trace_encodings_are_json_errors() {
    let m = Manifest::example();
    let good = serde_json::to_value(&m).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = good.clone();
        f(v["trace"]["series"][0].as_object_mut().unwrap());
        serde_json::to_vec(&v).unwrap()
    };
    let nan = {
        use base64::Engine as _;
        let bytes: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not base64",
            with(&|o| {
                o.insert("watts_f32le_b64".into(), "not base64!".into());
            }),
        ),
        (
            "padding missing",
            with(&|o| {
                o.insert("watts_f32le_b64".into(), "AACAPwAAIMA".into());
            }),
        ),
        (
            "stray bits",
            with(&|o| {
                o.insert("watts_f32le_b64".into(), "AACAPwAAIMB=".into());
            }),
        ),
        (
            "line break",
            with(&|o| {
                o.insert("watts_f32le_b64".into(), "AACAPw\nAAIMA=".into());
            }),
        ),
        (
            "3 bytes",
            with(&|o| {
                o.insert("watts_f32le_b64".into(), "AACA".into());
            }),
        ),
        (
            "NaN",
            with(&|o| {
                o.insert("watts_f32le_b64".into(), nan.clone().into());
            }),
        ),
        (
            "a number",
            with(&|o| {
                o.insert("watts_f32le_b64".into(), 5.into());
            }),
        ),
        (
            "both spellings",
            with(&|o| {
                o.insert("watts".into(), Value::Array(vec![]));
            }),
        ),
        (
            "no values",
            with(&|o| {
                o.remove("watts_f32le_b64");
            }),
        ),
        (
            "no name",
            with(&|o| {
                o.remove("name");
            }),
        ),
    ];
    for (what, bytes) in cases {
        match Manifest::from_json(&bytes) {
            Err(ManifestError::Json(e)) => {
                let text = e.to_string();
                assert!(!text.is_empty(), "{what}");
            }
            other => panic!("{what}: expected a JSON error, got {other:?}"),
        }
    }
    // The JSON error names the problem.
    let err = Manifest::from_json(&with(&|o| {
        o.insert("watts_f32le_b64".into(), nan.clone().into());
    }))
    .unwrap_err();
    assert!(err.to_string().contains("NaN or infinite"), "{err}");
}

#[test]
fn tampering_is_detected() {
    let m = Manifest::example();
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
    let mut m = Manifest::example();
    m.content_hash.clear();
    assert!(matches!(m.verify(), Err(ManifestError::NotSealed)));
    assert!(matches!(
        Manifest::from_json(&m.to_json().unwrap()),
        Err(ManifestError::NotSealed)
    ));
}

#[test]
fn other_schema_versions_are_refused_first() {
    for version in [0u32, 7] {
        let mut v: Value = serde_json::to_value(Manifest::example()).unwrap();
        v["schema_version"] = version.into();
        let bytes = serde_json::to_vec(&v).unwrap();
        let err = Manifest::from_json(&bytes).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::UnsupportedSchema {
                    got,
                    supported: MANIFEST_SCHEMA_VERSION_MAX
                } if got == version
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("versions 1 to 6"), "{err}");
    }
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
    let json = Manifest::example().to_json().unwrap();
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
    let mut m = Manifest::example();
    m.totals.avg_w = f64::NAN;
    m.seal();
    assert!(matches!(
        m.to_json(),
        Err(ManifestError::NotRepresentable(_))
    ));
    let mut m = Manifest::example();
    m.trace.series[0].watts[1] = f32::INFINITY;
    assert!(matches!(
        m.to_json(),
        Err(ManifestError::NotRepresentable(_))
    ));
    let mut m = Manifest::example();
    m.totals.gpu_j = Some(f64::NAN);
    assert!(matches!(
        m.to_json(),
        Err(ManifestError::NotRepresentable(_))
    ));
}

#[test]
fn enums_serialise_as_documented() {
    let v: Value = serde_json::to_value(Manifest::example()).unwrap();
    assert_eq!(v["steps"][0]["step"], "batch");
    assert_eq!(v["steps"][1]["step"], "0");
    assert_eq!(v["gpus"][0]["method"], "counter");
    assert_eq!(v["sockets"][0]["share_method"], "cgroup_cpu_time");
    assert_eq!(v["sensors"][1]["kind"], "rapl-powercap");
    assert_eq!(v["job"]["partition"], Value::Null);
    let m = Manifest {
        gpus: vec![],
        ..Manifest::example()
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
        version in MANIFEST_SCHEMA_VERSION_MIN..=MANIFEST_SCHEMA_VERSION,
    ) {
        let mut m = Manifest::example();
        m.schema_version = version;
        m.totals.energy_j = a;
        m.duration_s = b;
        m.steps[1].dram_j = c;
        m.trace.series[1].watts = watts;
        m.seal();
        let json = m.to_json().unwrap();
        let back = Manifest::from_json(&json).unwrap();
        prop_assert_eq!(back.totals.energy_j.to_bits(), a.to_bits());
        for (x, y) in back.trace.series[1].watts.iter().zip(&m.trace.series[1].watts) {
            prop_assert_eq!(x.to_bits(), y.to_bits());
        }
        prop_assert_eq!(back, m);
    }
}

/// Fields the schema lists but does not require: written only when they apply.
const OPTIONAL_FIELDS: &[&str] = &[
    "mig",
    "sluid",
    "components",
    "gpus_unknown",
    "estimate",
    "node_list",
    "efficiency",
    "wall",
    "disagreement_intervals",
];

/// The schema's `properties`/`required` match what the types serialise, object by object.
#[test]
fn schema_matches_the_serialised_manifest() {
    let schema: Value = serde_json::from_str(include_str!("../manifest.schema.json")).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let mut with_mig = Manifest::example();
    let sample = serde_json::to_value(Manifest::example()).unwrap();
    let mut checked = 0;
    check_object(&schema, &schema, &sample, "$", &mut checked);
    assert!(checked >= 14, "only {checked} objects checked");
    // A GPU held as MIG instances: its optional `mig` object too.
    with_mig.gpus[0].shared = true;
    with_mig.gpus[0].mig = Some(GpuMig {
        total_slices: 7,
        instances: vec![
            MigInstanceRef {
                gpu_instance_id: 1,
                compute_instance_id: Some(0),
                slices: Some(3),
                uuid: Some("MIG-11111111-2222-3333-4444-555555555555".into()),
            },
            MigInstanceRef {
                gpu_instance_id: 9,
                compute_instance_id: None,
                slices: None,
                uuid: None,
            },
        ],
        share_method: MigShareMethod::SliceSize,
    });
    let value = serde_json::to_value(&with_mig).unwrap();
    assert!(value["gpus"][0].get("mig").is_some());
    assert!(
        sample["gpus"][0].get("mig").is_none(),
        "absent for a whole GPU"
    );
    let mut checked_mig = 0;
    check_object(&schema, &schema, &value, "$", &mut checked_mig);
    assert!(checked_mig >= checked + 3, "{checked_mig} vs {checked}");
    // It survives sealing and verification, as schema 3; as schema 2 it is refused.
    assert_eq!(with_mig.schema_version_for(), MANIFEST_SCHEMA_VERSION_MIG);
    let mut as_v2 = with_mig.clone();
    as_v2.seal();
    assert!(matches!(
        Manifest::from_json(&as_v2.to_json().unwrap()),
        Err(ManifestError::FieldNeedsVersion { version: 2, .. })
    ));
    with_mig.schema_version = with_mig.schema_version_for();
    with_mig.seal();
    let back = Manifest::from_json(&with_mig.to_json().unwrap()).unwrap();
    assert_eq!(back.gpus[0].mig, with_mig.gpus[0].mig);
    // The schema 1 fixture too (the other form of trace series).
    let v1: Value = serde_json::from_slice(V1_PRETTY).unwrap();
    let mut checked = 0;
    check_object(&schema, &schema, &v1, "$", &mut checked);
    assert!(checked >= 14, "only {checked} objects checked");
    // Each version's trace form is the one the schema ties to it.
    let forms = &schema["allOf"];
    for (i, (version, field)) in [(2, "watts_f32le_b64"), (1, "watts")].iter().enumerate() {
        assert_eq!(
            forms[i]["if"]["properties"]["schema_version"]["const"],
            *version
        );
        assert_eq!(
            forms[i]["then"]["properties"]["trace"]["properties"]["series"]["items"]["required"],
            serde_json::json!([field])
        );
    }
    assert!(sample["trace"]["series"][0]
        .get("watts_f32le_b64")
        .is_some());
    assert!(v1["trace"]["series"][0].get("watts").is_some());
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
            // Alternatives (`oneOf`, each naming the fields it requires): exactly one of them
            // is written, and its fields count as required.
            let alternatives: Vec<Vec<&str>> = schema
                .get("oneOf")
                .and_then(Value::as_array)
                .map(|alts| {
                    alts.iter()
                        .map(|a| {
                            a["required"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|v| v.as_str().unwrap())
                                .collect()
                        })
                        .collect()
                })
                .unwrap_or_default();
            if !alternatives.is_empty() {
                let present: Vec<&Vec<&str>> = alternatives
                    .iter()
                    .filter(|alt| alt.iter().all(|k| map.contains_key(*k)))
                    .collect();
                assert_eq!(present.len(), 1, "{at}: exactly one of {alternatives:?}");
                required.extend(present[0]);
                let chosen = present[0].clone();
                schema_keys.retain(|k| {
                    chosen.contains(k) || !alternatives.iter().flatten().any(|a| a == k)
                });
            }
            keys.sort_unstable();
            schema_keys.sort_unstable();
            required.sort_unstable();
            // Every field is always written, so every field is required, except the few
            // optional ones (absent in older manifests, whose hashes must not change).
            let optional: Vec<&str> = schema_keys
                .iter()
                .copied()
                .filter(|k| !required.contains(k))
                .collect();
            assert!(
                optional.iter().all(|k| OPTIONAL_FIELDS.contains(k)),
                "{at}: {optional:?} not required by the schema"
            );
            let written_required: Vec<&str> = keys
                .iter()
                .copied()
                .filter(|k| !optional.contains(k))
                .collect();
            assert_eq!(
                written_required, required,
                "{at}: serialised keys vs schema's required properties"
            );
            assert!(
                keys.iter().all(|k| schema_keys.contains(k)),
                "{at}: serialised keys {keys:?} vs schema properties {schema_keys:?}"
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
                    || schema.get("enum").is_some()
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
        Value::Bool(_) => {
            let ty = &schema["type"];
            assert!(
                ty == "boolean"
                    || ty
                        .as_array()
                        .is_some_and(|t| t.iter().any(|t| t == "boolean")),
                "{at}: schema type {ty} for a boolean"
            );
        }
    }
}

/// Schema 4's fields: in the JSON Schema, refused in an older version, kept through sealing.
#[test]
fn schema_4_fields_need_schema_4() {
    let schema: Value = serde_json::from_str(include_str!("../manifest.schema.json")).unwrap();
    let mut m = Manifest::example();
    assert_eq!(m.schema_version_for(), MANIFEST_SCHEMA_VERSION);
    m.job.sluid = Some("s2gxm9475ceh00".into());
    m.coverage.components = Some(ComponentCoverage {
        gpu: Some(0.0),
        cpu: Some(0.9),
        dram: None,
    });
    m.coverage.gpus_unknown = Some("not in the job's cgroup".into());
    m.coverage.gaps[0].estimate = Some(GapEstimate {
        energy_j: 120.0,
        bound_j: 35.5,
    });
    let value = serde_json::to_value(&m).unwrap();
    let mut checked = 0;
    check_object(&schema, &schema, &value, "$", &mut checked);
    assert!(checked >= 17, "only {checked} objects checked");
    assert_eq!(m.schema_version_for(), MANIFEST_SCHEMA_VERSION_COVERAGE);
    assert_eq!(m.coverage.components.unwrap().lowest(), 0.0);
    // Each field alone makes a schema 3 manifest unreadable: an older reader would hash it
    // without the field.
    for field in [
        "job.sluid",
        "coverage.components",
        "coverage.gpus_unknown",
        "coverage.gaps[].estimate",
    ] {
        let mut one = Manifest::example();
        match field {
            "job.sluid" => one.job.sluid = m.job.sluid.clone(),
            "coverage.components" => one.coverage.components = m.coverage.components,
            "coverage.gpus_unknown" => one.coverage.gpus_unknown = m.coverage.gpus_unknown.clone(),
            _ => one.coverage.gaps[0].estimate = m.coverage.gaps[0].estimate,
        }
        one.schema_version = MANIFEST_SCHEMA_VERSION_MIG;
        one.seal();
        match Manifest::from_json(&one.to_json().unwrap()) {
            Err(ManifestError::FieldNeedsVersion {
                version: 3,
                field: f,
                needs: 4,
            }) => {
                assert_eq!(f, field)
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    m.schema_version = m.schema_version_for();
    m.seal();
    let back = Manifest::from_json(&m.to_json().unwrap()).unwrap();
    assert_eq!(back, m);
}

/// Schema 5's field, the job's nodes: in the JSON Schema, refused in an older version (an older
/// reader would hash the manifest without it), kept through sealing.
#[test]
fn the_jobs_node_list_needs_schema_5() {
    let schema: Value = serde_json::from_str(include_str!("../manifest.schema.json")).unwrap();
    let mut m = Manifest::example();
    m.job.node_list = Some(format!("{},gpu[02-03]", m.node));
    let value = serde_json::to_value(&m).unwrap();
    let mut checked = 0;
    check_object(&schema, &schema, &value, "$", &mut checked);
    assert_eq!(
        schema["$defs"]["JobInfo"]["properties"]["node_list"]["type"],
        "string"
    );
    assert_eq!(
        m.job.nodes(),
        Some(vec![m.node.clone(), "gpu02".into(), "gpu03".into()])
    );
    assert_eq!(m.schema_version_for(), MANIFEST_SCHEMA_VERSION_NODES);
    let mut old = m.clone();
    old.schema_version = MANIFEST_SCHEMA_VERSION_COVERAGE;
    old.seal();
    match Manifest::from_json(&old.to_json().unwrap()) {
        Err(ManifestError::FieldNeedsVersion {
            version: 4,
            field: "job.node_list",
            needs: 5,
        }) => {}
        other => panic!("{other:?}"),
    }
    m.schema_version = m.schema_version_for();
    m.seal();
    let back = Manifest::from_json(&m.to_json().unwrap()).unwrap();
    assert_eq!(back, m);
    // Without the field a manifest is what it was.
    assert!(Manifest::example().schema_version_for() < MANIFEST_SCHEMA_VERSION_NODES);
}

/// Schema 6's field, a GPU's efficiency: in the JSON Schema, refused in an older version, kept
/// through sealing; a manifest without it keeps its version.
#[test]
fn a_gpus_efficiency_needs_schema_6() {
    let schema: Value = serde_json::from_str(include_str!("../manifest.schema.json")).unwrap();
    let mut m = Manifest::example();
    m.gpus[0].efficiency = Some(ergon_protocol::GpuEfficiency {
        sampled_s: 10.0,
        partial: false,
        sm_util_avg_pct: Some(1.5),
        idle: Some(true),
        idle_threshold_pct: 5.0,
        memory_used_max_bytes: Some(1 << 30),
        temperature_max_c: Some(60),
        sm_clock_avg_mhz: None,
        mem_clock_avg_mhz: Some(1593.0),
        throttle_s: ergon_protocol::ThrottleSeconds {
            power_cap: Some(1.5),
            sw_thermal: None,
            hw_thermal: Some(0.0),
            hw_power_brake: None,
        },
        ecc_corrected: Some(0),
        ecc_uncorrected: None,
        xid_count: Some(1),
        xids: Some(vec![ergon_protocol::XidEvent {
            at_unix_ns: 5,
            xid: 79,
        }]),
    });
    let value = serde_json::to_value(&m).unwrap();
    let mut checked = 0;
    check_object(&schema, &schema, &value, "$", &mut checked);
    assert!(
        schema["$defs"]["GpuEfficiency"]["required"]
            .as_array()
            .unwrap()
            .len()
            == 14
    );
    assert_eq!(
        m.schema_version_for(),
        ergon_protocol::MANIFEST_SCHEMA_VERSION_EFFICIENCY
    );
    let mut old = m.clone();
    old.schema_version = MANIFEST_SCHEMA_VERSION_NODES;
    old.seal();
    match Manifest::from_json(&old.to_json().unwrap()) {
        Err(ManifestError::FieldNeedsVersion {
            version: 5,
            field: "gpus[].efficiency",
            needs: 6,
        }) => {}
        other => panic!("{other:?}"),
    }
    m.schema_version = m.schema_version_for();
    m.seal();
    let back = Manifest::from_json(&m.to_json().unwrap()).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.idle_gpu_j(), m.gpus[0].energy_j.or(Some(0.0)));
    assert!(
        Manifest::example().schema_version_for()
            < ergon_protocol::MANIFEST_SCHEMA_VERSION_EFFICIENCY
    );
    assert_eq!(Manifest::example().idle_gpu_j(), None);
}

/// Schema 6's `wall` section: in the JSON Schema (nested objects included), refused in an older
/// version, kept through sealing.
#[test]
fn the_wall_section_needs_schema_6() {
    use ergon_protocol::manifest::{WallEnergy, WallInterval, WallMeter};
    let schema: Value = serde_json::from_str(include_str!("../manifest.schema.json")).unwrap();
    let mut m = Manifest::example();
    m.wall = Some(WallEnergy {
        energy_j: 1500.0,
        components_j: 1200.0,
        rest_of_node_j: 300.0,
        rule: "allocation".into(),
        meter: WallMeter {
            kind: "hwmon".into(),
            source: "/sys/class/hwmon/hwmon3".into(),
            resolution_s: 1.0,
            accuracy_percent: 5.0,
        },
        metered_s: 100.0,
        unmetered_s: 0.5,
        disagreements: 1,
        disagreement_intervals: vec![WallInterval {
            start_unix_ns: 1,
            end_unix_ns: 2,
        }],
    });
    let value = serde_json::to_value(&m).unwrap();
    let mut checked = 0;
    check_object(&schema, &schema, &value, "$", &mut checked);
    assert!(value["wall"]["meter"].is_object());
    assert_eq!(
        m.schema_version_for(),
        ergon_protocol::MANIFEST_SCHEMA_VERSION_EFFICIENCY
    );
    let mut old = m.clone();
    old.schema_version = MANIFEST_SCHEMA_VERSION_NODES;
    old.seal();
    match Manifest::from_json(&old.to_json().unwrap()) {
        Err(ManifestError::FieldNeedsVersion {
            version: 5,
            field: "wall",
            needs: 6,
        }) => {}
        other => panic!("{other:?}"),
    }
    m.schema_version = m.schema_version_for();
    m.seal();
    let back = Manifest::from_json(&m.to_json().unwrap()).unwrap();
    assert_eq!(back, m);
    // Without it, nothing is written.
    let plain = serde_json::to_value(Manifest::example()).unwrap();
    assert!(plain.get("wall").is_none());
}
