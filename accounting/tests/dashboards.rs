//! The Grafana dashboards that read the accounting's uploads (`dashboards/`, tag `accounting`:
//! the site dashboard) against a real VictoriaMetrics after real `ergon run`s uploaded the usage
//! counters of jobs of two users, two accounts and two partitions, with CO2e and cost
//! configured. Every target of every panel (rows' nested panels too), its template variables
//! substituted once with one cluster, partition, account and user and once with "All", must
//! return data through VictoriaMetrics' Prometheus query API, and every metric it names must be
//! a series the uploads made: a panel whose counter is renamed or dropped fails here. A new
//! panel or dashboard is picked up from the JSON alone. (The node and job dashboards, over
//! ergond's `/metrics`, are checked in `noded/tests/dashboards.rs`.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::victoria::*;
use common::*;
use ergon_protocol::testing::ManifestBuilder;
use ergon_testkit::dashboards::{self, Api, Source};

/// The metric names VictoriaMetrics holds series of.
fn names(api: Api) -> BTreeSet<String> {
    let now = now_ns() / 1_000_000_000;
    get(&format!(
        "http://{}/api/v1/label/__name__/values?start={}&end={}",
        api.addr,
        now - 3600,
        now + 60
    ))
    .map(|text| {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    })
    .unwrap_or_default()
}

#[test]
fn every_site_dashboard_panel_returns_data_from_victoria_metrics_after_ergon_run() {
    assert!(
        Path::new(VM).exists(),
        "{VM} is missing: run scripts/slurm-cluster up (it installs victoria-metrics)"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let boards: Vec<_> = dashboards::load_all()
        .into_iter()
        .filter(|d| d.source == Source::Accounting)
        .collect();
    assert!(
        boards.iter().any(|d| d.file == "site.json"),
        "{:?}",
        boards.iter().map(|d| &d.file).collect::<Vec<_>>()
    );
    let s = Setup::new();
    let port = free_port();
    // Queries see samples a second old (the default hides the newest 30 s, and ergon stamps
    // the counters with the time of the upload).
    let _vm = Vm::start_with(
        port,
        &s.dir.path().join("vm-data"),
        &["-search.latencyOffset=1s", "-search.disableCache"],
    );
    let api = Api {
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
    };
    s.write_config(&format!(
        "[victoria_metrics]\nurl = \"http://127.0.0.1:{port}\"\ntimeout_s = 5\n\n\
         [carbon]\nintensity_g_per_kwh = 300\nintensity_source = \"test grid\"\npue = 1.2\n\
         embodied_g_per_gpu_hour = 36\n\n[cost]\ncurrency = \"EUR\"\nprice_per_kwh = 0.3\n"
    ));
    // Two runs, so that every group's counters have two samples (as at a site, where each run
    // adds to them); the second adds little to the first, as a day's run adds to a year's
    // counters (MetricsQL's increase() would drop such a series' first sample as a reset).
    let groups = [
        ("alice", "phys", "gpu"),
        ("bob", "chem", "gpu"),
        ("alice", "chem", "cpu"),
        ("bob", "phys", "cpu"),
    ];
    let mut job = 0;
    // Per group: energy (J), GPU hours, jobs.
    let mut expected: BTreeMap<(&str, &str, &str), (f64, f64, f64)> = BTreeMap::new();
    for run in 0..2 {
        for (user, account, partition) in groups {
            job += 1;
            let m = ManifestBuilder::new("c1", job, "n1")
                .user(user, 1000)
                .account(account)
                .partition(partition)
                .ended(now_ns() - 60_000_000_000, 100)
                .gpu(Some(if run == 0 { 1e6 * f64::from(job) } else { 10.0 }))
                .socket(200.0, Some(20.0))
                .build();
            let e = expected.entry((user, account, partition)).or_default();
            e.0 += m.totals.energy_j;
            e.2 += 1.0;
            write_manifest(&s.spool(), &m);
        }
        let out = s.run();
        assert_eq!(out.status.code(), Some(0), "{}", show(&out));
        assert_eq!(backlog(&s.status_json(), "victoria_metrics"), 0);
    }
    // What ergon exports to VictoriaMetrics: the series the uploads made (the usage counters,
    // CO2e and cost among them).
    let exported =
        dashboards::await_some("the usage counters in VictoriaMetrics", deadline, || {
            let n = names(api);
            (n.contains("ergon_usage_co2e_grams_total") && n.contains("ergon_usage_cost_total"))
                .then_some(n)
        });
    assert!(
        exported.iter().all(|n| n.starts_with("ergon_usage_")),
        "{exported:?}"
    );

    let one = BTreeMap::from([
        ("cluster", "c1"),
        ("partition", "cpu"),
        ("account", "chem"),
        ("user", "alice"),
    ]);
    let all = BTreeMap::from([
        ("cluster", ".*"),
        ("partition", ".*"),
        ("account", ".*"),
        ("user", ".*"),
    ]);
    for d in &boards {
        for chosen in [&one, &all] {
            let evaluated = dashboards::evaluate(d, api, chosen, &exported, deadline);
            println!(
                "dashboards/{} ({chosen:?}): {} queries return data",
                d.file,
                evaluated.len()
            );
            for (_, e) in &evaluated {
                println!("  {e}");
            }
            assert!(
                evaluated
                    .iter()
                    .all(|(_, e)| e.contains(&format!("user=~\"{}\"", chosen["user"]))),
                "{evaluated:#?}"
            );
            if d.file != "site.json" {
                continue;
            }
            // The totals are the jobs' own figures: the jobs collected, their energy in kWh,
            // CO2e in kg (300 g/kWh × PUE 1.2, plus 36 g per GPU hour) and cost (0.3 per kWh ×
            // PUE 1.2), each group's first upload counted too.
            let picked = |k: &(&str, &str, &str)| {
                chosen["user"] == ".*"
                    || (k.0, k.1, k.2) == (chosen["user"], chosen["account"], chosen["partition"])
            };
            let (energy_j, jobs) = expected
                .iter()
                .filter(|(k, _)| picked(k))
                .fold((0.0, 0.0), |a, (_, v)| (a.0 + v.0, a.1 + v.2));
            let stat = |title: &str| -> f64 {
                let (t, e) = evaluated
                    .iter()
                    .find(|(t, _)| t.panel == title)
                    .unwrap_or_else(|| panic!("no panel {title:?}"));
                let r = api.eval(e, t.instant).unwrap();
                assert_eq!(r.len(), 1, "{title}: {r:?}");
                r[0]["value"][1].as_str().unwrap().parse().unwrap()
            };
            let close = |got: f64, want: f64, what: &str| {
                assert!(
                    (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "{what} ({chosen:?}): the dashboard shows {got}, the jobs have {want}"
                );
            };
            let kwh = energy_j / 3.6e6;
            close(stat("Jobs"), jobs, "jobs");
            close(stat("Energy"), kwh, "energy (kWh)");
            let gpu_hours = stat("GPU hours");
            assert!(gpu_hours > 0.0, "{gpu_hours}");
            close(
                stat("CO2e"),
                (kwh * 1.2 * 300.0 + gpu_hours * 36.0) / 1000.0,
                "CO2e (kg)",
            );
            close(stat("Cost"), kwh * 1.2 * 0.3, "cost");
        }
    }
}
