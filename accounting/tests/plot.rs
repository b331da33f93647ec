//! `ergon plot`: the real binary on sealed manifests of a two-node job with two steps.
//!
//! The SVG is read back as text (its polylines, its text elements); the PNG's header and pixels
//! are decoded.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{show, Setup};
use ergon_protocol::manifest::*;
use ergon_protocol::testing::ManifestBuilder;
use ergon_protocol::StepId;

const JOB: u32 = 4242;
/// The job's start: a fixed instant, so the plot is the same on every run.
const BASE: u64 = 1_795_319_086_000_000_000;
const S: u64 = 1_000_000_000;

fn ns(seconds: f64) -> u64 {
    BASE + (seconds * 1e9).round() as u64
}

fn gpu(index: u32, energy_j: Option<f64>) -> GpuEnergy {
    GpuEnergy {
        uuid: format!("GPU-0000000{index}-0000-0000-0000-000000000000"),
        index,
        minor: Some(index),
        pci_bus_id: None,
        energy_j,
        avg_w: energy_j.map(|e| e / 10.0),
        peak_w: Some(250.0),
        method: EnergyMethod::Counter,
        shared: false,
        mig: None,
        efficiency: None,
    }
}

fn step(id: StepId, start_s: f64, end_s: f64, gpu_j: f64) -> StepEnergy {
    StepEnergy {
        step: id,
        start_unix_ns: ns(start_s),
        end_unix_ns: ns(end_s),
        energy_j: gpu_j,
        gpu_j: Some(gpu_j),
        cpu_j: None,
        dram_j: None,
    }
}

/// GPU 0's power on node1 at `t` seconds: idle, step 0, between steps, step 1, idle.
fn profile(t: f64) -> f32 {
    match t {
        t if t < 1.0 => 60.0,
        t if t < 4.0 => 250.0,
        t if t < 5.0 => 80.0,
        t if t < 9.5 => 200.0 + 10.0 * ((t * 3.0).sin() as f32),
        _ => 60.0,
    }
}

/// Job 4242 of alice on `node` from `start_s` to `end_s`, its figures estimated, peak 400 W.
fn base_manifest(node: &str, start_s: f64, end_s: f64) -> ManifestBuilder {
    ManifestBuilder::new("testcl", JOB, node)
        .account("proj")
        .partition("gpu")
        .span(ns(start_s), ns(end_s))
        .peak_w(400.0)
        .attribution("gpu-exclusive-only", true)
        .sensor(SensorKind::Nvml, "550.54.15", "NVML 12.550.54.15; 4 GPU(s)")
}

/// node1: GPUs 0 (1.80 kJ) and 1 (energy null), steps 0 and 1, a 100 ms trace from the job's
/// start: gpu0 has 100 bins, gpu1 (at 60 % of gpu0's power) 99.
fn node1() -> Manifest {
    let gpu0: Vec<f32> = (0..100).map(|k| profile(k as f64 * 0.1 + 0.05)).collect();
    let gpu1: Vec<f32> = gpu0[..99].iter().map(|w| w * 0.6).collect();
    base_manifest("node1", 0.0, 10.0)
        .step(step(StepId::Numbered(0), 1.0, 4.0, 750.0))
        .step(step(StepId::Numbered(1), 5.0, 9.5, 900.0))
        .gpu_entry(gpu(0, Some(1800.0)))
        .gpu_entry(gpu(1, None))
        .trace(100, [("gpu0", gpu0), ("gpu1", gpu1)])
        .build()
}

/// node2: step 1 only, GPU 0 (950 J), socket 0 (420 J package, DRAM null), and a series for a
/// GPU 3 the manifest has no entry for (so its energy comes from the trace: 39 × 25 W × 0.2 s
/// = 195 J). The 200 ms trace starts 1 s after the job; the series have 40, 39, 38, 37 bins.
fn node2() -> Manifest {
    let series = |n: usize, w: f32| (0..n).map(|k| w + (k % 5) as f32).collect::<Vec<f32>>();
    base_manifest("node2", 0.5, 9.8)
        .step(step(StepId::Numbered(1), 5.2, 9.6, 500.0))
        .gpu_entry(gpu(0, Some(950.0)))
        .socket(420.0, None)
        .trace(
            200,
            [
                ("socket0", series(38, 50.0)),
                ("gpu0", series(40, 110.0)),
                ("dram0", series(37, 8.0)),
                ("gpu3", vec![25.0; 39]),
            ],
        )
        .trace_start(BASE + S)
        .build()
}

fn write(dir: &Path, name: &str, m: &Manifest) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, m.to_json().unwrap()).unwrap();
    path
}

fn ergon() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ergon"));
    // No config: plot reads only what it is given (and the defaults).
    c.arg("--config")
        .arg("/nonexistent/ergon-test/accounting.toml");
    c
}

fn plot(manifests: &[&Path], out: &Path, extra: &[&str]) -> Output {
    let mut c = ergon();
    c.args(["plot", &JOB.to_string(), "-o"]).arg(out);
    for m in manifests {
        c.arg("--manifest").arg(m);
    }
    c.args(extra).output().unwrap()
}

/// The texts of the SVG's `<text>` elements, trimmed and unescaped.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .map(|t| {
            let body = &t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()];
            body.trim()
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&")
        })
        .collect()
}

/// The points of the SVG's polylines.
fn svg_polylines(svg: &str) -> Vec<Vec<(i32, i32)>> {
    svg.split("<polyline")
        .skip(1)
        .map(|p| {
            let from = p.find("points=\"").unwrap() + 8;
            let to = from + p[from..].find('"').unwrap();
            p[from..to]
                .split_whitespace()
                .map(|xy| {
                    let (x, y) = xy.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

/// The data lines: polylines with more than two points (grid lines and ticks have two), by
/// number of points.
fn data_lines(svg: &str) -> Vec<Vec<(i32, i32)>> {
    let mut lines: Vec<_> = svg_polylines(svg)
        .into_iter()
        .filter(|p| p.len() > 2)
        .collect();
    lines.sort_by_key(|p| std::cmp::Reverse(p.len()));
    lines
}

/// With `ERGON_PLOT_KEEP=DIR`, keep a copy of a picture there to look at.
fn keep(out: &Path) {
    if let Some(dir) = std::env::var_os("ERGON_PLOT_KEEP") {
        let to = Path::new(&dir).join(format!(
            "ergon-plot-{}",
            out.file_name().unwrap().to_string_lossy()
        ));
        std::fs::copy(out, &to).unwrap();
        eprintln!("kept {}", to.display());
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn svg_of_a_two_node_job() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "testcl-4242-node1.json", &node1());
    let b = write(dir.path(), "testcl-4242-node2.json", &node2());
    let out = dir.path().join("job.svg");
    let o = plot(&[&a, &b], &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    keep(&out);
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("width=\"1200\"") && svg.contains("height=\"600\""));

    let texts = svg_texts(&svg);
    let has = |t: &str| texts.iter().any(|x| x == t);
    assert!(
        has("job 4242 — total 3.17 kJ (gpu 2.75 kJ / cpu 420 J / dram n/a)"),
        "{texts:?}"
    );
    // Legend: each series with its node, and its energy from the manifest (n/a for null), or
    // integrated from the trace when the manifest has no entry for the device.
    for (label, energy) in [
        ("node1/gpu0", "1.80 kJ"),
        ("node1/gpu1", "n/a"),
        ("node2/gpu0", "950 J"),
        ("node2/gpu3", "≈ 195 J (trace)"),
        ("node2/socket0", "420 J"),
        ("node2/dram0", "n/a"),
    ] {
        let i = texts
            .iter()
            .position(|t| t == label)
            .unwrap_or_else(|| panic!("no legend entry {label}: {texts:?}"));
        assert_eq!(texts[i + 1], energy, "{label}: {texts:?}");
    }
    // The legend is in series order: by node, then gpus, sockets, dram.
    let order: Vec<&String> = texts.iter().filter(|t| t.starts_with("node")).collect();
    assert_eq!(
        order,
        [
            "node1/gpu0",
            "node1/gpu1",
            "node2/gpu0",
            "node2/gpu3",
            "node2/socket0",
            "node2/dram0"
        ]
    );
    // The job's and the steps' intervals are labelled (step 1 once, merged over the nodes).
    assert!(has("job 4242"), "{texts:?}");
    assert_eq!(texts.iter().filter(|t| *t == "step 0").count(), 1);
    assert_eq!(texts.iter().filter(|t| *t == "step 1").count(), 1);
    assert!(has("time since job start (s)") && has("power (W)"));
    // The steps' boundaries are dashed vertical lines (short two-point segments): at the
    // start and end of step 0 and of step 1.
    let mut dash_xs: Vec<i32> = svg_polylines(&svg)
        .into_iter()
        .filter(|p| p.len() == 2 && p[0].0 == p[1].0 && (p[1].1 - p[0].1).abs() <= 4)
        .map(|p| p[0].0)
        .collect();
    dash_xs.sort_unstable();
    dash_xs.dedup();
    assert_eq!(dash_xs.len(), 4, "{dash_xs:?}");

    // One line per series, two points per bin: 100, 99 bins (node1), 40, 39, 38, 37 (node2).
    let lines = data_lines(&svg);
    let lengths: Vec<usize> = lines.iter().map(Vec::len).collect();
    assert_eq!(lengths, [200, 198, 80, 78, 76, 74]);
    for line in &lines {
        assert!(
            line.windows(2).all(|p| p[0].0 <= p[1].0),
            "time goes forward"
        );
    }
    let (n1_gpu0, n1_gpu1, n2_gpu0) = (&lines[0], &lines[1], &lines[2]);
    // gpu1 draws 60 % of gpu0's power: always lower on the page (larger y), and clearly so in
    // step 0 (250 W against 150 W).
    assert!(n1_gpu1.iter().zip(n1_gpu0).all(|(a, b)| a.1 >= b.1));
    assert!(
        n1_gpu1[40].1 - n1_gpu0[40].1 > 50,
        "{:?} {:?}",
        n1_gpu1[40],
        n1_gpu0[40]
    );
    // Both node1 series start at the job's start; node2's trace 1 s later, a tenth of the
    // 10 s axis further right.
    assert_eq!(n1_gpu0[0].0, n1_gpu1[0].0);
    let width = n1_gpu0.last().unwrap().0 - n1_gpu0[0].0;
    let shift = n2_gpu0[0].0 - n1_gpu0[0].0;
    assert!(
        (shift - width / 10).abs() <= 2,
        "node2 starts {shift} px after node1, want {}",
        width / 10
    );
    // The idle bins (60 W) before step 0 are lower on the page than step 0's 250 W bins.
    assert!(n1_gpu0[0].1 > n1_gpu0[30].1);

    // Written atomically: nothing else is left in the directory.
    assert_eq!(
        files_in(dir.path()),
        [
            "job.svg",
            "testcl-4242-node1.json",
            "testcl-4242-node2.json"
        ]
    );
}

#[test]
fn one_node_labels_have_no_node_and_an_existing_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "m.json", &node1());
    let out = dir.path().join("one.SVG");
    std::fs::write(&out, "old").unwrap();
    let o = plot(&[&a], &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let svg = std::fs::read_to_string(&out).unwrap();
    let texts = svg_texts(&svg);
    assert!(texts.iter().any(|t| t == "gpu0") && texts.iter().any(|t| t == "gpu1"));
    assert!(!texts.iter().any(|t| t.starts_with("node1/")), "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| t == "job 4242 — total 1.80 kJ (gpu 1.80 kJ / cpu n/a / dram n/a)"),
        "{texts:?}"
    );
    assert_eq!(data_lines(&svg).len(), 2);
    assert_eq!(files_in(dir.path()), ["m.json", "one.SVG"]);
}

#[test]
fn png_has_the_requested_size_and_the_lines() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.json", &node1());
    let b = write(dir.path(), "b.json", &node2());
    let out = dir.path().join("job.png");
    let o = plot(&[&a, &b], &out, &["--width", "900", "--height", "500"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    keep(&out);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (900, 500));

    let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut rgb).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px = |x: u32, y: u32| {
        let i = ((y * w + x) * 3) as usize;
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    };
    let count = |c: [u8; 3]| {
        (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .filter(|&(x, y)| px(x, y) == c)
            .count()
    };
    // The first series' colour (node1/gpu0) draws a line.
    assert!(
        count([0x1f, 0x77, 0xb4]) > 300,
        "no line of the first series"
    );
    assert!(
        count([0xff, 0xff, 0xff]) > (w * h / 2) as usize,
        "white background"
    );
    // With a font, the title is drawn: dark pixels in the top band. Without one the PNG has no
    // text (and ergon warns); SVG is unaffected.
    let dark_top = (0..30)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| px(x, y).iter().all(|c| *c < 100))
        .count();
    if ergon_accounting::plot::find_font().is_some() {
        assert!(dark_top > 100, "no title text in the PNG");
    } else {
        assert_eq!(dark_top, 0);
        assert!(String::from_utf8_lossy(&o.stderr).contains("no TrueType font"));
    }
}

#[test]
fn unknown_extension_is_a_usage_error_naming_the_formats() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.json", &node1());
    for name in ["job.pdf", "job", "job.svg.gz"] {
        let out = dir.path().join(name);
        let o = plot(&[&a], &out, &[]);
        assert_eq!(o.status.code(), Some(2), "{}", show(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(".svg") && err.contains(".png"), "{err}");
        assert!(!out.exists());
    }
    assert_eq!(files_in(dir.path()), ["a.json"]);
}

#[test]
fn a_tampered_manifest_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.json", &node1());
    let text = String::from_utf8(node2().to_json().unwrap()).unwrap();
    let tampered = text.replace("\"package_j\": 420.0", "\"package_j\": 42.0");
    assert_ne!(text, tampered);
    let b = dir.path().join("b.json");
    std::fs::write(&b, tampered).unwrap();
    let out = dir.path().join("job.svg");
    let o = plot(&[&a, &b], &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("content hash mismatch") && err.contains(&b.display().to_string()),
        "{err}"
    );
    assert!(!out.exists());

    // The same from the spool: the job's bad manifest is an error, not silently left out.
    let setup = Setup::new();
    setup.write_config("");
    std::fs::copy(&a, setup.spool().join("testcl-4242-node1.json")).unwrap();
    std::fs::copy(&b, setup.spool().join("testcl-4242-node2.json")).unwrap();
    let out = setup.dir.path().join("spool.svg");
    let o = setup
        .ergon()
        .args(["plot", "4242", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("content hash mismatch") && err.contains("testcl-4242-node2.json"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn manifests_are_found_in_the_spools() {
    let setup = Setup::new();
    setup.write_config("");
    let spool = setup.spool();
    write(&spool, "testcl-4242-node1.json", &node1());
    write(&spool, "testcl-4242-node2.json", &node2());
    // Another job's manifest and a file that is not a manifest are not the job's.
    let mut other = node1();
    other.job.job_id = 4243;
    other.seal();
    write(&spool, "testcl-4243-node1.json", &other);
    std::fs::write(spool.join("notes.json"), "{}").unwrap();
    let out = setup.dir.path().join("spool.svg");
    let o = setup
        .ergon()
        .args(["plot", "4242", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let svg = std::fs::read_to_string(&out).unwrap();
    assert_eq!(data_lines(&svg).len(), 6);
    assert!(svg_texts(&svg)
        .iter()
        .any(|t| t.starts_with("job 4242 — total 3.17 kJ")));

    // The same job id from another cluster in the spool: ambiguous until --cluster chooses.
    let mut elsewhere = node1();
    elsewhere.cluster = "othercl".into();
    elsewhere.seal();
    write(&spool, "othercl-4242-node1.json", &elsewhere);
    let o = setup
        .ergon()
        .args(["plot", "4242", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(
            "manifests from several clusters (othercl, testcl); choose one with --cluster"
        ),
        "{}",
        show(&o)
    );
    let o = setup
        .ergon()
        .args(["plot", "4242", "--cluster", "othercl", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let svg = std::fs::read_to_string(&out).unwrap();
    assert_eq!(data_lines(&svg).len(), 2, "only othercl's node1");

    // A job with no manifests: exit 1, a clear message, no file.
    let out = setup.dir.path().join("none.svg");
    let o = setup
        .ergon()
        .args(["plot", "999", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no manifests of job 999"),
        "{}",
        show(&o)
    );
    assert!(!out.exists());
}

#[test]
fn no_trace_wrong_job_and_unwritable_output_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut empty = node1();
    empty.trace.series.clear();
    empty.seal();
    let a = write(dir.path(), "a.json", &empty);
    let out = dir.path().join("job.png");
    let o = plot(&[&a], &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("hold no power trace"),
        "{}",
        show(&o)
    );
    assert!(!out.exists());

    let mut other = node1();
    other.job.job_id = 7;
    other.seal();
    let b = write(dir.path(), "b.json", &other);
    let o = plot(&[&b], &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("manifest of job 7 on cluster testcl, not of job 4242"),
        "{}",
        show(&o)
    );
    assert!(!out.exists());

    let c = write(dir.path(), "c.json", &node1());
    let missing = dir.path().join("no-such-dir").join("job.svg");
    let o = plot(&[&c], &missing, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("writing"),
        "{}",
        show(&o)
    );
    assert_eq!(files_in(dir.path()), ["a.json", "b.json", "c.json"]);
}
