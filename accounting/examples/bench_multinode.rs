//! `scripts/bench multinode`: does `ergon run` cost more per manifest when the manifests are the
//! nodes of multi-node jobs than when each is a job of its own?
//!
//! Writes two spools with the same number of sealed manifests, the way ergond writes them: in one,
//! `--jobs` jobs of `--nodes` nodes each (every manifest naming the job's nodes, schema 5); in the
//! other, `--jobs × --nodes` one-node jobs. Then runs `ergon run` (the library's `run::run`, sacct
//! and every sink off: collection, verification, combination and the state) over each, in
//! alternating order for `--rounds` rounds, each time on a fresh state, and checks that the run
//! made exactly one record per job. Prints the per-manifest times and their ratio (multi-node /
//! one-node, the median over the rounds); with `--json PATH`, appends one JSON object to PATH.
//!
//! With `ERGON_BENCH_NO_NODES` set, the multi-node manifests leave out `job.node_list` (as a
//! schema 4 ergond wrote them), for comparison.
//!
//! ```text
//! bench_multinode [--jobs 50] [--nodes 64] [--rounds 5] [--json PATH]
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ergon_accounting::config::Config;
use ergon_accounting::run::{run, RunOptions};
use ergon_protocol::testing::ManifestBuilder;
use serde_json::json;

fn main() {
    let mut jobs = 50u32;
    let mut nodes = 64u32;
    let mut rounds = 5usize;
    let mut json_path: Option<PathBuf> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--jobs" => jobs = value().parse().expect("--jobs N"),
            "--nodes" => nodes = value().parse().expect("--nodes N"),
            "--rounds" => rounds = value().parse().expect("--rounds N"),
            "--json" => json_path = Some(value().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    let base = std::env::temp_dir().join(format!("ergon-bench-multinode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let multi = base.join("multi");
    let single = base.join("single");
    let names: Vec<String> = (1..=nodes).map(|n| format!("gpu{n:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let t = 1_700_000_000_000_000_000u64;
    let manifest = |job: u32, node: &str, all: Option<&[&str]>| {
        let mut b = ManifestBuilder::new("bench", job, node)
            .span(t, t + 3_600_000_000_000)
            .gpu(Some(1.2e6))
            .gpu(Some(1.1e6))
            .socket(2.0e5, Some(3.0e4))
            .batch_step()
            .peak_w(700.0)
            .node_context(2.6e6, 1.0e4, 0.0);
        if let Some(all) = all.filter(|_| std::env::var_os("ERGON_BENCH_NO_NODES").is_none()) {
            b = b.nodes(all);
        }
        b.build()
    };
    let write = |dir: &Path, m: &ergon_protocol::Manifest| {
        let path = dir.join(format!("{}-{}-{}.json", m.cluster, m.job.job_id, m.node));
        std::fs::write(path, m.to_json().expect("sealed")).expect("write");
    };
    std::fs::create_dir_all(multi.join("spool")).unwrap();
    std::fs::create_dir_all(single.join("spool")).unwrap();
    for j in 0..jobs {
        for n in &refs {
            write(&multi.join("spool"), &manifest(1000 + j, n, Some(&refs)));
        }
    }
    for j in 0..jobs * nodes {
        write(&single.join("spool"), &manifest(100_000 + j, refs[0], None));
    }
    let manifests = f64::from(jobs * nodes);
    let once = |dir: &Path, records: u32| -> Duration {
        let state = dir.join("state");
        let _ = std::fs::remove_dir_all(&state);
        let config = dir.join("accounting.toml");
        std::fs::write(
            &config,
            format!(
                "spool_dirs = [{:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\nenabled = false\n",
                dir.join("spool"),
                dir.join("quarantine"),
                state
            ),
        )
        .unwrap();
        let config = Config::load(&config).expect("config");
        let t0 = Instant::now();
        let summary = run(
            &config,
            RunOptions {
                dry_run: false,
                progress: false,
                sequential: false,
                rescan: false,
            },
        )
        .expect("ergon run");
        let took = t0.elapsed();
        assert_eq!(summary.collected, records as usize, "one record per job");
        assert_eq!(summary.quarantined, 0);
        took
    };
    let (mut m_s, mut s_s) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        if r % 2 == 0 {
            m_s.push(once(&multi, jobs).as_secs_f64());
            s_s.push(once(&single, jobs * nodes).as_secs_f64());
        } else {
            s_s.push(once(&single, jobs * nodes).as_secs_f64());
            m_s.push(once(&multi, jobs).as_secs_f64());
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m, s) = (median(&mut m_s), median(&mut s_s));
    let ratio = m / s;
    println!(
        "ergon run over {} manifests, median of {rounds} rounds:",
        jobs * nodes
    );
    println!(
        "  {jobs} jobs of {nodes} nodes   {:>8.3} s   {:>7.1} µs/manifest",
        m,
        m / manifests * 1e6
    );
    println!(
        "  {} one-node jobs      {:>8.3} s   {:>7.1} µs/manifest",
        jobs * nodes,
        s,
        s / manifests * 1e6
    );
    println!("  ratio multi-node / one-node per manifest: {ratio:.3} (target ≤ 1)");
    if let Some(p) = json_path {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        let line = json!({
            "bench": "multinode_accounting",
            "manifests": jobs * nodes,
            "jobs_multi": jobs,
            "nodes": nodes,
            "rounds": rounds,
            "multi_s": m,
            "single_s": s,
            "multi_us_per_manifest": m / manifests * 1e6,
            "single_us_per_manifest": s / manifests * 1e6,
            "ratio": ratio,
        });
        writeln!(f, "{line}").unwrap();
    }
    let _ = std::fs::remove_dir_all(&base);
}
