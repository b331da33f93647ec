//! CO2e and cost end to end through the real `ergon` binary: `ergon run` computes them over
//! the manifests' power traces with the configured factors (a site-maintained CSV of
//! intensity, a static PUE and price), the records database keeps them, and `ergon report`
//! and `ergon summary` show them with their factors.

mod common;

use common::*;
use ergon_protocol::testing::ManifestBuilder;

#[test]
fn run_report_and_summary_carry_co2e_and_cost_over_the_trace() {
    let s = Setup::new();
    let end = now_ns() - 60_000_000_000;
    let start = end - 100_000_000_000;
    // 20 kJ over 100 s; the trace: 100 W for 50 s, then 300 W.
    let m = ManifestBuilder::new("c1", 77, "n1")
        .account("phys")
        .partition("gpu")
        .span(start, end)
        .gpu(Some(20_000.0))
        .trace(50_000, [("gpu0", vec![100.0f32, 300.0])])
        .build();
    write_manifest(&s.spool(), &m);
    // Intensity 200 g/kWh from the start, 500 from half-way.
    let secs = |ns: u64| format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000);
    let csv = s.dir.path().join("intensity.csv");
    std::fs::write(
        &csv,
        format!(
            "timestamp,gco2e_per_kwh\n{},200\n{},500\n",
            secs(start),
            secs(start + 50_000_000_000)
        ),
    )
    .unwrap();
    s.write_config(&format!(
        "[carbon]\nintensity_file = {csv:?}\nintensity_source = \"test grid\"\npue = 1.2\n\
         embodied_g_per_gpu_hour = 36\n\n[cost]\ncurrency = \"EUR\"\nprice_per_kwh = 0.36\n"
    ));
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));

    // Computed by hand: 5 kJ at 200 g/kWh and 15 kJ at 500, × PUE 1.2:
    // (5000 × 200 + 15000 × 500) / 3.6e6 × 1.2 = 2.8333 g; embodied 1 GPU × 100 s × 36 g/h
    // = 1 g; cost 20 kJ = 1/180 kWh × 1.2 × 0.36 = 0.0024 EUR.
    let operational = (5_000.0 * 200.0 + 15_000.0 * 500.0) / 3.6e6 * 1.2;
    let out = s.ergon().args(["report", "77", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["source"], "records", "{v}");
    let f = &v["manifests"]["footprint"];
    assert_eq!(f["method"], "trace", "{f}");
    let c = &f["carbon"];
    assert!(
        (c["operational_g"].as_f64().unwrap() - operational).abs() < 1e-9,
        "{c}"
    );
    assert!(
        (c["embodied_g"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{c}"
    );
    assert_eq!(c["missing_energy_fraction"], 0.0);
    assert_eq!(c["intensity"]["source"], "test grid");
    assert_eq!(c["intensity"]["origin"], format!("file {}", csv.display()));
    assert_eq!(c["pue"]["value"], 1.2);
    let cost = &f["cost"];
    assert!(
        (cost["amount"].as_f64().unwrap() - 0.0024).abs() < 1e-12,
        "{cost}"
    );
    assert_eq!(cost["currency"], "EUR");

    let out = s.ergon().args(["report", "77"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("co2e      3.8 g = operational 2.8 g + embodied 1.0 g"),
        "{text}"
    );
    assert!(
        text.contains("[test grid]") && text.contains("0.0024 EUR"),
        "{text}"
    );

    let out = s
        .ergon()
        .args(["summary", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        (v["total"]["co2e_g"].as_f64().unwrap() - (operational + 1.0)).abs() < 1e-9,
        "{v}"
    );
    assert!(
        (v["total"]["cost"].as_f64().unwrap() - 0.0024).abs() < 1e-12,
        "{v}"
    );
    assert_eq!(v["total"]["currency"], "EUR");
    let out = s.ergon().args(["summary"]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("CO2E") && table.contains("COST EUR") && table.contains("3.8 g"),
        "{table}"
    );
}

#[test]
fn a_series_that_does_not_cover_the_job_says_how_much_is_missing() {
    let s = Setup::new();
    let end = now_ns() - 60_000_000_000;
    let start = end - 100_000_000_000;
    let m = ManifestBuilder::new("c1", 78, "n1")
        .span(start, end)
        .gpu(Some(10_000.0))
        .build();
    write_manifest(&s.spool(), &m);
    // One point, 25 s into the job, held 50 s: the job's first 25 s and last 25 s have no
    // intensity. No trace: the energy is even, so half of it is missing.
    let at = start + 25_000_000_000;
    let csv = s.dir.path().join("intensity.csv");
    std::fs::write(
        &csv,
        format!("{}.{:09},300\n", at / 1_000_000_000, at % 1_000_000_000),
    )
    .unwrap();
    s.write_config(&format!(
        "[carbon]\nintensity_file = {csv:?}\nmax_step_s = 50\n"
    ));
    let out = s.run();
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = s.ergon().args(["report", "78"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("missing intensity or PUE for 50.0% of the job's energy (50.0% of its time)"),
        "{text}"
    );
    assert!(text.contains("energy spread evenly"), "{text}");
    // 5 kJ at 300 g/kWh: 0.4167 g, and only that.
    let out = s.ergon().args(["report", "78", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &v["manifests"]["footprint"]["carbon"];
    assert!(
        (c["operational_g"].as_f64().unwrap() - 5_000.0 * 300.0 / 3.6e6).abs() < 1e-9,
        "{c}"
    );
    let out = s.ergon().args(["summary"]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("1 job(s) have CO2e or cost for part of their energy only"),
        "{table}"
    );
}
