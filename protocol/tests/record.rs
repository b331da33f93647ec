//! The sacct record codec: round trips and merging into foreign content.

mod common;

use common::config;
use ergon_protocol::*;
use proptest::prelude::*;

/// Records whose floats are already at the encoded precision: tenths of a watt and
/// thousandths of coverage, built as `n / 10.0` (the nearest f64, as parsing gives).
fn rounded_record() -> impl Strategy<Value = JobRecord> {
    (
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<Option<u64>>(),
        ),
        (
            0u64..100_000_000,
            0u64..100_000_000,
            any::<u32>(),
            any::<u32>(),
            0u64..=1000,
        ),
        "[0-9a-f]{0,12}",
        (
            prop::option::of(0u64..=1000),
            prop::option::of(0u64..=1000),
            prop::option::of(0u64..=1000),
            any::<u32>(),
            any::<Option<u64>>(),
            prop::option::of("[0-9a-z]{1,32}"),
            any::<Option<u32>>(),
        ),
    )
        .prop_map(
            |(
                (energy_j, gpu_j, cpu_j, dram_j, other_j),
                (avg, peak, gpus, nodes, cov),
                hash,
                (gcov, ccov, dcov, gunk, errj, sluid, nexp),
            )| {
                let fraction = |c: Option<u64>| c.map(|c| c as f64 / 1000.0);
                JobRecord {
                    energy_j,
                    gpu_j,
                    cpu_j,
                    dram_j,
                    other_j,
                    avg_w: avg as f64 / 10.0,
                    peak_w: peak as f64 / 10.0,
                    gpus,
                    nodes,
                    coverage: cov as f64 / 1000.0,
                    hash,
                    coverage_gpu: fraction(gcov),
                    coverage_cpu: fraction(ccov),
                    coverage_dram: fraction(dcov),
                    gpus_unknown_nodes: gunk,
                    estimate_bound_j: errj,
                    sluid,
                    nodes_expected: nexp,
                    ..JobRecord::default()
                }
            },
        )
}

/// Records with any floats, hash and SLUID text, which encoding normalises.
fn any_record() -> impl Strategy<Value = JobRecord> {
    (
        rounded_record(),
        (any::<f64>(), any::<f64>(), any::<f64>()),
        ".{0,20}",
        (any::<Option<f64>>(), any::<Option<f64>>()),
        prop::option::of(".{0,40}"),
    )
        .prop_map(
            |(r, (avg_w, peak_w, coverage), hash, (gcov, dcov), sluid)| JobRecord {
                avg_w,
                peak_w,
                coverage,
                hash,
                coverage_gpu: gcov,
                coverage_dram: dcov,
                sluid,
                ..r
            },
        )
}

/// Foreign field content: jobstats-like blobs, separators, near-misses of our tag.
fn foreign() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            "[a-zA-Z0-9+/=:_-]{0,12}",
            Just(";".to_owned()),
            Just("; ".to_owned()),
            Just(" ".to_owned()),
            Just("ergon1".to_owned()),
            Just("ergon2 e=1".to_owned()),
            Just("xergon1 ".to_owned()),
            Just("é\"'".to_owned()),
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
    .prop_filter("contains an ergon segment", |s| find_in_field(s).is_none())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn decode_reverses_encode_for_rounded_records(r in rounded_record()) {
        prop_assert_eq!(JobRecord::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn decode_reverses_encode_up_to_normalisation(r in any_record()) {
        let text = r.encode();
        let back = JobRecord::decode(&text).unwrap();
        prop_assert_eq!(&back, &r.normalized());
        prop_assert_eq!(back.normalized(), back.clone());
        if r.avg_w.is_finite() && r.avg_w >= 0.0 {
            let written = r.avg_w.min(ergon_protocol::record::MAX_POWER_W);
            prop_assert!((back.avg_w - written).abs() <= 0.05 + written * 1e-12);
        }
        prop_assert!((0.0..=1.0).contains(&back.coverage));
    }

    #[test]
    fn encoding_is_lowercase_ascii_without_quotes_or_semicolons(r in any_record()) {
        let text = r.encode();
        prop_assert_eq!(text.to_lowercase(), text.clone());
        prop_assert!(text.is_ascii());
        prop_assert!(!text.contains('"') && !text.contains(';'));
        prop_assert!(text.starts_with("ergon1 "));
        prop_assert!(text.len() <= ergon_protocol::record::MAX_ENCODED_LEN, "{} bytes", text.len());
    }

    #[test]
    fn merge_keeps_foreign_content_byte_for_byte(f in foreign(), r in rounded_record(), r2 in rounded_record()) {
        let merged = merge_into_field(&f, &r);
        prop_assert!(merged.starts_with(f.as_str()));
        prop_assert_eq!(find_in_field(&merged), Some(Ok(r.clone())));
        prop_assert_eq!(strip_from_field(&merged), f.clone());

        let twice = merge_into_field(&merged, &r2);
        prop_assert_eq!(twice.matches("ergon1 e=").count(), 1, "one segment after merging twice: {}", twice);
        prop_assert_eq!(find_in_field(&twice), Some(Ok(r2.clone())));
        prop_assert_eq!(strip_from_field(&twice), f.clone());
        prop_assert_eq!(merge_into_field(&twice, &r2), twice.clone());
    }

    #[test]
    fn foreign_content_after_our_segment_is_kept(f in foreign(), r in rounded_record(), r2 in rounded_record()) {
        // Another tool appended after us.
        let field = format!("{}; {}", r.encode(), f);
        let merged = merge_into_field(&field, &r2);
        prop_assert_eq!(merged, format!("{}; {}", r2.encode(), f));
    }
}
