//! The whole chain on the real cluster: `sbatch --energy-report` → the SPANK plugin → the real
//! `ergond` (on the fake NVML library, with the real `/sys/fs/cgroup` and `/proc`) → its
//! manifest in the spool → `ergon run` → the `ergon1` record in sacct → `ergon report`.
//!
//! - `job_is_measured_and_its_record_lands_in_sacct`: a `--gres=gpu:2` job runs ~4 s; its
//!   manifest verifies and charges exactly the two GPUs Slurm allocated (Slurm index → device
//!   minor → the fake NVML device with that minor, which is deliberately not the same index),
//!   each with its constant power × the job's interval; the interval agrees with sacct; the
//!   batch step's real cgroup is watched while it runs. Then `ergon run` writes the record into
//!   AdminComment with the manifest's numbers and `ergon report --json` shows the same.
//! - `killed_ergond_job_still_completes_and_the_manifest_is_honest`: ergond is SIGKILLed while
//!   a job runs and restarted; the job completes (fail-open), the restarted ergond takes the job
//!   back from its journal, and the manifest records the outage as a gap whose energy was
//!   recovered from the GPU's counter: the GPU energy over the whole job is right.
//! - `energy_report_is_written_as_the_user_and_never_through_a_symlink`: a job of the
//!   unprivileged test user with `--energy-report` gets the report appended to its
//!   `slurm-<id>.out`, which stays the user's; a `--energy-report=json` job whose
//!   `ergon-<id>.json` is a symlink to a root-owned file gets nothing written through it; the two
//!   tasks of a `--energy-report=json` array in one directory each get their own
//!   `ergon-<array id>_<task id>.json`, the user's.
//! - `an_idle_gpu_throttling_and_xids_are_reported_end_to_end`: the fake GPUs scripted with
//!   utilisation (Slurm's GPU 0 busy, the others idle), power-cap throttling, memory,
//!   temperature and, on GPU 0, an Xid every second; a `--gres=gpu:2` job's user report names its
//!   idle GPU and the energy it spent idle, the manifest has the throttle seconds and the Xids,
//!   and after `ergon run` the sacct record and `ergon report` show them.
//! - `two_jobs_on_mig_instances_of_one_gpu_get_their_slices_of_it`: gres.conf rewritten with two
//!   `MultipleFiles=` MIG instances of one fake GPU in MIG mode; two jobs on them at once are
//!   each charged their instance's slices of the board; gres.conf and slurmd are restored.
//!
//! The plugin's socket is shared with `spank_plugin.rs`, whose tests run in another test binary
//! (cargo runs binaries one after another); the tests here run one at a time (`SERIAL`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use ergon_protocol::record::JobRecord;
use ergon_protocol::{read_frame, write_frame, Manifest, Reply, Request, StepId};
use ergon_testkit::{PowercapLayout, PowercapTree};
use ergon_tests::{
    cluster, scratch_dir, target_dir, wait_for, wait_for_file, Cluster, TempDir, JOB_TIMEOUT,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Power of fake NVML device `i` (constant), watts.
fn watts(nvml_index: usize) -> f64 {
    100.0 * (nvml_index as f64 + 1.0)
}

/// The fake GPU counter's update period: fast, so that readings at events are sharp.
const COUNTER_PERIOD_MS: f64 = 20.0;

/// How long ergond may take to write a manifest after the job ended.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Relative error allowed on a GPU's energy against power × interval (the 0.5 %).
const ENERGY_TOLERANCE: f64 = 0.005;

/// Relative error allowed on a GPU's energy over a job during which ergond was killed and
/// restarted.
const RESTART_TOLERANCE: f64 = 0.02;

/// Power of the generated RAPL package zone, and of its DRAM zone, watts.
const PACKAGE_W: f64 = 50.0;
const DRAM_W: f64 = 10.0;

/// Device minor of the cluster's `dev/fakegpu<i>` (what gres.conf lists as GPU `i`).
fn minor_of(c: &Cluster, i: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let path = c.dir.join(format!("dev/fakegpu{i}"));
    let rdev = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .rdev();
    ((rdev & 0xff) | ((rdev >> 12) & !0xff)) as u32
}

/// One fake NVML device.
#[derive(Debug, Clone)]
struct FakeGpu {
    uuid: String,
    minor: u32,
    watts: f64,
    /// The fake NVML's `mig` object for a GPU in MIG mode.
    mig: Option<serde_json::Value>,
    /// More scenario fields of the GPU (its scripted utilisation, throttling, Xids, …).
    extra: Option<serde_json::Value>,
}

/// The fake GPUs in NVML order: the cluster's four devices in reverse gres.conf order, so that
/// no Slurm index equals its NVML index and only matching by minor gives the right device.
fn fake_gpus(c: &Cluster) -> Vec<FakeGpu> {
    let minors: Vec<u32> = (0..4).rev().map(|i| minor_of(c, i)).collect();
    minors
        .iter()
        .enumerate()
        .map(|(i, &minor)| FakeGpu {
            uuid: format!("GPU-{minor:08x}-0000-4000-8000-{i:012x}"),
            minor,
            watts: watts(i),
            mig: None,
            extra: None,
        })
        .collect()
}

/// The real `ergond` binary on the fake NVML library and the real cgroup tree, killed and its
/// socket removed on drop.
struct Ergond {
    /// Stops the thread that moves the generated RAPL counters.
    rapl: std::sync::Arc<std::sync::atomic::AtomicBool>,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    socket: PathBuf,
    metrics: String,
    spool: PathBuf,
    starts: u32,
}

impl Ergond {
    /// Write the configuration under `dir` and start ergond; returns once its socket answers a
    /// Ping and `/metrics` shows the four GPUs.
    fn start(c: &Cluster, dir: &Path, gpus: &[FakeGpu], extra: &str) -> Result<Ergond> {
        let built = target_dir().join("debug/libnvidia_ml.so");
        ensure!(
            built.exists(),
            "{} is missing: build it first (cargo build -p fake-nvml)",
            built.display()
        );
        let lib = dir.join("nvml/libnvidia-ml.so.1");
        std::fs::create_dir_all(lib.parent().unwrap())?;
        std::fs::copy(&built, &lib)?;
        // The counters start at the first start of ergond and keep counting across its
        // restarts, like a real driver's (mJ since the driver loaded).
        let scenario = serde_json::json!({
            "start_monotonic_ns": ergond::clock::monotonic_ns(),
            "gpus": gpus.iter().map(|g| {
                let mut gpu = serde_json::json!({
                    "uuid": g.uuid, "name": "Fake chain GPU", "minor": g.minor,
                    "profile": {"kind": "constant", "watts": g.watts},
                    "update_period_ms": COUNTER_PERIOD_MS,
                });
                if let Some(mig) = &g.mig {
                    gpu["mig"] = mig.clone();
                }
                if let Some(serde_json::Value::Object(extra)) = &g.extra {
                    for (k, v) in extra {
                        gpu[k] = v.clone();
                    }
                }
                gpu
            }).collect::<Vec<_>>(),
        });
        std::fs::write(
            format!("{}.scenario.json", lib.display()),
            serde_json::to_vec_pretty(&scenario)?,
        )?;
        let powercap = dir.join("powercap");
        PowercapTree::create(
            &powercap,
            &PowercapLayout::IntelServer { sockets: 1 }.zones(),
        );
        // The package and DRAM counters move at constant power (the node's real CPUs and
        // cgroups decide who gets it).
        let rapl = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let stop = std::sync::Arc::clone(&rapl);
            let (pkg, dram) = (
                powercap.join("intel-rapl:0/energy_uj"),
                powercap.join("intel-rapl:0:0/energy_uj"),
            );
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = t0.elapsed().as_secs_f64();
                    ergon_testkit::write_counter_file(&pkg, (PACKAGE_W * t * 1e6) as u64);
                    ergon_testkit::write_counter_file(&dram, (DRAM_W * t * 1e6) as u64);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        let socket = c.plugin_socket();
        // A fresh ergond replays only what its own test queues.
        c.clear_plugin_queue()?;
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let config = dir.join("ergond.toml");
        // Job data open to all users, as before private_data existed (tests/tests/privacy.rs
        // tests the private side); a test may set it itself.
        let private = if extra.contains("private_data") {
            ""
        } else {
            "private_data = \"no\"\n"
        };
        std::fs::write(
            &config,
            format!(
                "nvml_library = {}\npowercap_root = {}\nperf_sysfs_root = {}\nprefer_perf = false\n\
                 cgroup_root = \"/sys/fs/cgroup\"\nproc_root = \"/proc\"\nsocket_path = {}\n\
                 state_dir = {}\nspool_dir = {}\nmetrics_listen = \"127.0.0.1:{port}\"\n\
                 node_name = {:?}\ngres_conf = {}\n{private}{extra}",
                q(&lib),
                q(&powercap),
                q(&dir.join("no-perf")),
                q(&socket),
                q(&dir.join("state")),
                q(&spool),
                c.node,
                q(&c.dir.join("etc/gres.conf")),
            ),
        )?;
        let mut e = Ergond {
            rapl,
            child: None,
            config,
            log: dir.join("ergond.log"),
            socket,
            metrics: format!("127.0.0.1:{port}"),
            spool,
            starts: 0,
        };
        e.spawn()?;
        Ok(e)
    }

    fn bin() -> Result<PathBuf> {
        let bin = target_dir().join("debug/ergond");
        ensure!(
            bin.exists(),
            "{} is missing: build it first (cargo build -p ergond)",
            bin.display()
        );
        Ok(bin)
    }

    /// Start (or restart) the process and wait until it serves.
    fn spawn(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(Self::bin()?)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting ergond")?;
        self.child = Some(child);
        self.starts += 1;
        wait_for(Duration::from_secs(20), "ergond to serve", || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("ergond exited ({status})");
            }
            if !matches!(self.request(&Request::Ping), Ok(Reply::Pong)) {
                return Ok(None);
            }
            let Ok(metrics) = self.scrape() else {
                return Ok(None);
            };
            let gpus = metrics
                .lines()
                .filter(|l| l.starts_with("ergon_gpu_energy_joules_total{"))
                .count();
            Ok((gpus == 4).then_some(()))
        })?;
        println!(
            "ergond start #{} serving after {:?}",
            self.starts,
            t0.elapsed()
        );
        Ok(())
    }

    /// SIGKILL, as a crash would; the socket file stays behind, as it would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One request, one reply, as the plugin does.
    fn request(&self, req: &Request) -> Result<Reply> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write_frame(&mut s, req)?;
        Ok(read_frame(&mut s)?)
    }

    /// `GET /metrics`.
    fn scrape(&self) -> Result<String> {
        let mut s = TcpStream::connect(&self.metrics)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.metrics
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP head in {text:?}"))?;
        ensure!(head.starts_with("HTTP/1.1 200"), "/metrics: {head}");
        Ok(body.to_string())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The manifest of `job` on this node, once it is in the spool (any cluster prefix).
    fn wait_manifest(&self, job: u32, node: &str) -> Result<(PathBuf, Manifest)> {
        let suffix = format!("-{job}-{node}.json");
        let path = wait_for(MANIFEST_TIMEOUT, &format!("job {job}'s manifest"), || {
            Ok(std::fs::read_dir(&self.spool)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| !n.starts_with('.') && n.ends_with(&suffix))
                }))
        })?;
        let bytes = std::fs::read(&path)?;
        let m = Manifest::from_json(&bytes)
            .with_context(|| format!("{} does not verify", path.display()))?;
        Ok((path, m))
    }
}

impl Drop for Ergond {
    fn drop(&mut self) {
        self.rapl.store(true, std::sync::atomic::Ordering::Relaxed);
        self.kill();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Everything a test here needs; ergond is stopped before the scratch directory goes.
struct Setup {
    c: &'static Cluster,
    ergond: Ergond,
    gpus: Vec<FakeGpu>,
    dir: TempDir,
    _guard: std::sync::MutexGuard<'static, ()>,
}

fn setup(name: &str) -> Setup {
    setup_with(name, "")
}

/// As [`setup`], with `extra` lines in ergond's configuration.
fn setup_with(name: &str, extra: &str) -> Setup {
    setup_gpus(name, extra, |_| {})
}

/// As [`setup_with`], with the fake GPUs changed by `edit` first.
fn setup_gpus(name: &str, extra: &str, edit: impl FnOnce(&mut Vec<FakeGpu>)) -> Setup {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    c.install_plugin(ergon_tests::PLUGIN_ARGS).unwrap();
    let dir = scratch_dir(name).unwrap();
    let mut gpus = fake_gpus(c);
    edit(&mut gpus);
    let ergond = Ergond::start(c, dir.path(), &gpus, extra).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.path().join("ergond.log")).unwrap_or_default();
        panic!("ergond did not start: {e:#}\n--- ergond log ---\n{log}")
    });
    Setup {
        c,
        ergond,
        gpus,
        dir,
        _guard: guard,
    }
}

impl Setup {
    /// Run `body`; on failure, panic with its error and ergond's log.
    fn run(&mut self, body: impl FnOnce(&mut Setup) -> Result<()>) {
        if let Err(e) = body(self) {
            panic!("{e:#}\n--- ergond log ---\n{}", self.ergond.log_text());
        }
    }

    /// A job (one per test) that writes `started` once its batch script runs and then holds
    /// until `release` exists.
    fn held_job(&self, extra: &[&str]) -> Result<(u32, PathBuf, PathBuf)> {
        let started = self.dir.path().join("started");
        let release = self.dir.path().join("release");
        let script = format!(
            "touch {s}; while [ ! -e {r} ]; do sleep 0.05; done",
            s = started.display(),
            r = release.display()
        );
        let mut args: Vec<String> = vec![
            "--energy-report".into(),
            "--time=5".into(),
            "--job-name=ergon-chain".into(),
            "--output=/dev/null".into(),
            // The report (--energy-report) then goes to ergon-<id>.txt here, not into the
            // directory the tests run from.
            format!("--chdir={}", self.dir.path().display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--wrap".into(), script]);
        let job = self.c.sbatch(&args)?;
        Ok((job, started, release))
    }
}

/// sacct's Start and End of the allocation, Unix seconds.
fn sacct_start_end(c: &Cluster, job: u32) -> Result<(u64, u64)> {
    let out = c
        .cmd("sacct")
        .env("SLURM_TIME_FORMAT", "%s")
        .args(["-X", "-n", "-P", "-j", &job.to_string(), "-o", "Start,End"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let line = text.lines().next().unwrap_or_default();
    let (s, e) = line
        .split_once('|')
        .ok_or_else(|| anyhow!("sacct Start|End printed {text:?}"))?;
    Ok((
        s.trim().parse().with_context(|| format!("Start {s:?}"))?,
        e.trim().parse().with_context(|| format!("End {e:?}"))?,
    ))
}

/// The Slurm GPU indices of the job on this node (`GRES=gpu:2(IDX:0-1)` in `scontrol -d`).
fn allocated_gpu_indices(c: &Cluster, job: u32) -> Result<Vec<u32>> {
    let fields = c.scontrol_job(job)?;
    let gres = fields
        .iter()
        .filter(|(k, _)| k == "GRES")
        .map(|(_, v)| v)
        .find(|v| v.contains("IDX:"))
        .ok_or_else(|| anyhow!("scontrol -d shows no GRES IDX: {fields:?}"))?;
    let idx = gres
        .split("IDX:")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| anyhow!("GRES {gres:?}"))?;
    let set = ergon_protocol::CpuSet::parse(idx).map_err(|e| anyhow!("IDX {idx:?}: {e}"))?;
    Ok(set.iter().collect())
}

fn ergon(c: &Cluster, config: &Path, args: &[&str]) -> Result<Output> {
    let bin = target_dir().join("debug/ergon");
    ensure!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p ergon-accounting)",
        bin.display()
    );
    Ok(c.cmd(bin).arg("--config").arg(config).args(args).output()?)
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn job_is_measured_and_its_record_lands_in_sacct() {
    let t_test = Instant::now();
    let mut s = setup("chain");
    s.run(|s| {
        let c = s.c;
        let (job, started, release) = s.held_job(&["--gres=gpu:2"])?;
        wait_for_file(&started, JOB_TIMEOUT)?;
        let t_running = Instant::now();

        // While it runs: ergond knows the job (as root may ask) and samples the batch step's
        // real cgroup (cpuacct under /sys/fs/cgroup).
        // (The plugin sends the batch StepStart from task_post_fork, which may come just
        // after the script's first command.)
        let snap = wait_for(Duration::from_secs(10), "ergond to know the batch step", || {
            match s.ergond.request(&Request::QueryJob { job_id: job })? {
                Reply::Job(snap) if snap.steps.contains(&StepId::Batch) => Ok(Some(snap)),
                Reply::Job(_) => Ok(None),
                other => bail!("QueryJob while the job runs: {other:?}"),
            }
        })?;
        ensure!(snap.job_id == job && snap.uid == 0, "{snap:?}");
        let step_cgroup = format!("/job_{job}/step_batch\"");
        wait_for(
            Duration::from_secs(10),
            "the batch step's cgroup in /metrics",
            || {
                let m = s.ergond.scrape()?;
                Ok(m.lines()
                    .any(|l| {
                        l.starts_with("ergon_cgroup_cpu_seconds_total{")
                            && l.contains(&step_cgroup)
                    })
                    .then_some(()))
            },
        )?;
        // Its live per-job series (on by default): GPU energy that rises while it runs.
        let gpu_series = format!("ergon_job_energy_joules_total{{job_id=\"{job}\",component=\"gpu\"}} ");
        let job_gpu_j = |m: &str| -> Option<f64> {
            m.lines()
                .find_map(|l| l.strip_prefix(gpu_series.as_str()))
                .and_then(|v| v.parse().ok())
        };
        let e1 = wait_for(
            Duration::from_secs(10),
            "the job's GPU energy in /metrics",
            || Ok(job_gpu_j(&s.ergond.scrape()?)),
        )?;
        wait_for(
            Duration::from_secs(10),
            "the job's GPU energy to rise in /metrics",
            || Ok(job_gpu_j(&s.ergond.scrape()?).filter(|&e| e > e1)),
        )?;
        let indices = allocated_gpu_indices(c, job)?;
        ensure!(indices.len() == 2, "Slurm allocated {indices:?}");

        // The job's length: about 4 s of running. The fake counter moves in 20 ms steps and the
        // readings at the two events can each be off by up to a step's worth of time, which is
        // more than 0.5 % of a 2 s job (seen on 26.05: 0.53 % and 0.63 %); 0.5 % of 4 s is 21 ms.
        if let Some(rest) = Duration::from_secs(4).checked_sub(t_running.elapsed()) {
            std::thread::sleep(rest);
        }
        std::fs::write(&release, b"")?;
        c.wait_completed(job)?;
        let (path, m) = s.ergond.wait_manifest(job, &c.node)?;
        // Ended: its per-job series are gone.
        let after = s.ergond.scrape()?;
        ensure!(
            !after.contains(&format!("job_id=\"{job}\"")),
            "job {job}'s series outlive it:\n{after}"
        );
        println!(
            "manifest {} after {:?}",
            path.display(),
            t_test.elapsed()
        );
        ensure!(
            path.file_name().unwrap().to_str() == Some(&format!("ergon-dev-{job}-{}.json", c.node)),
            "manifest name {}",
            path.display()
        );

        // Identity, against Slurm's own record.
        ensure!(m.cluster == "ergon-dev" && m.node == c.node, "{} {}", m.cluster, m.node);
        let sacct = wait_for(Duration::from_secs(60), "the job's whole sacct record", || {
            let row = c.sacct_field(job, "User,Account,Partition,JobName")?;
            Ok(row.filter(|r| r.ends_with("|ergon-chain")))
        })?;
        let sacct: Vec<&str> = sacct.split('|').collect();
        ensure!(
            (m.job.job_id, m.job.uid, m.job.user.as_str()) == (job, 0, sacct[0]),
            "{:?} vs sacct {sacct:?}",
            m.job
        );
        ensure!(
            m.job.account.as_deref() == Some(sacct[1])
                && m.job.partition.as_deref() == Some(sacct[2]),
            "{:?} vs sacct {sacct:?}",
            m.job
        );

        // Interval: the plugin's prolog/epilog stamps, inside sacct's Start..End (± 2 s).
        let (start_s, end_s) = sacct_start_end(c, job)?;
        let (m_start, m_end) = (m.start_unix_ns / 1_000_000_000, m.end_unix_ns / 1_000_000_000);
        ensure!(
            m_start + 2 >= start_s && m_start <= start_s + 2,
            "manifest start {m_start} vs sacct Start {start_s}"
        );
        ensure!(
            m_end + 2 >= end_s && m_end <= end_s + 2,
            "manifest end {m_end} vs sacct End {end_s}"
        );
        let secs = (m.end_unix_ns - m.start_unix_ns) as f64 / 1e9;
        ensure!(secs > 1.5, "job interval {secs} s");

        // GPUs: exactly the two Slurm allocated, found by minor, each at its power × interval.
        ensure!(m.gpus.len() == 2, "charged GPUs: {:#?}", m.gpus);
        let mut total = 0.0;
        let mut sum_w = 0.0;
        for index in &indices {
            let minor = minor_of(c, *index);
            let fake = s.gpus.iter().find(|g| g.minor == minor).unwrap();
            let g = m
                .gpus
                .iter()
                .find(|g| g.uuid == fake.uuid)
                .ok_or_else(|| anyhow!("GPU {index} (minor {minor}, {}) not charged: {:#?}", fake.uuid, m.gpus))?;
            ensure!(
                (g.index, g.minor) == (*index, Some(minor)),
                "{g:?}: expected Slurm index {index}, minor {minor}"
            );
            let truth = fake.watts * secs;
            let energy = g.energy_j.ok_or_else(|| anyhow!("GPU {index} not measured: {g:?}"))?;
            let err = (energy - truth).abs() / truth;
            println!(
                "GPU {index} (minor {minor}, {} W): {:.2} J over {secs:.3} s, truth {truth:.2} J, error {:.3}%",
                fake.watts,
                energy,
                100.0 * err
            );
            ensure!(err < ENERGY_TOLERANCE, "{g:?} vs {truth} J");
            ensure!(
                g.method == ergon_protocol::manifest::EnergyMethod::Counter && !g.shared,
                "{g:?}"
            );
            total += truth;
            sum_w += fake.watts;
        }
        for other in s.gpus.iter().filter(|f| {
            !indices.iter().any(|i| minor_of(c, *i) == f.minor)
        }) {
            ensure!(
                m.gpus.iter().all(|g| g.uuid != other.uuid),
                "unallocated {} charged",
                other.uuid
            );
        }
        let gpu_j = m.totals.gpu_j.ok_or_else(|| anyhow!("no GPU total"))?;
        ensure!(
            (gpu_j - total).abs() / total < ENERGY_TOLERANCE,
            "{:?} vs {total} J",
            m.totals
        );
        // Peak: the highest total over the power trace's bins, at constant power. A bin sees
        // whole counter updates only (one per COUNTER_PERIOD_MS), so it can be off by one
        // update's worth: the period over the bin's length.
        let slack = COUNTER_PERIOD_MS / f64::from(m.trace.interval_ms.max(1));
        ensure!(
            m.totals.peak_w <= (1.0 + slack + 0.01) * sum_w && m.totals.peak_w >= 0.95 * sum_w,
            "peak {} W at a constant {sum_w} W; trace {:?}",
            m.totals.peak_w,
            m.trace
        );
        ensure!(
            m.coverage.fraction == 1.0 && m.coverage.gaps.is_empty(),
            "{:?}",
            m.coverage
        );
        for step in [StepId::Batch, StepId::Extern] {
            ensure!(
                m.steps.iter().any(|x| x.step == step),
                "no step {step}: {:?}",
                m.steps
            );
        }

        // --- Test B: the accounting run puts the manifest's numbers into sacct. ---
        let acct = s.dir.path().join("accounting.toml");
        std::fs::write(
            &acct,
            format!(
                "spool_dirs = [{:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\n",
                s.ergond.spool,
                s.dir.path().join("quarantine"),
                s.dir.path().join("acct-state"),
            ),
        )?;
        let t_run = Instant::now();
        let out = ergon(c, &acct, &["run"])?;
        ensure!(out.status.code() == Some(0), "ergon run: {}", show(&out));
        println!("ergon run took {:?}", t_run.elapsed());
        let field = c.sacct_field(job, "AdminComment")?.unwrap_or_default();
        let rec = ergon_protocol::find_in_field(&field)
            .ok_or_else(|| anyhow!("no ergon1 record in AdminComment {field:?}"))?
            .map_err(|e| anyhow!("AdminComment {field:?}: {e}"))?;
        println!("AdminComment: {field}");
        ensure!(
            rec.gpu_j == gpu_j.round() as u64 && rec.energy_j == m.totals.energy_j.round() as u64,
            "{rec:?} vs manifest totals {:?}",
            m.totals
        );
        ensure!(
            (rec.gpus, rec.nodes, rec.coverage) == (2, 1, 1.0),
            "{rec:?}"
        );
        // Slurm 25.11+: the job's own ConsumedEnergy is ergon's total too.
        let consumed = c.sacct_field(job, "ConsumedEnergyRaw")?.unwrap_or_default();
        let consumed: u64 = consumed.trim().parse().unwrap_or(0);
        let want = if c.version() >= (25, 11) { rec.energy_j } else { 0 };
        println!("ConsumedEnergyRaw: {consumed} (Slurm {})", c.release);
        ensure!(consumed == want, "ConsumedEnergyRaw {consumed}, expected {want}: {}", show(&out));
        let out = ergon(c, &acct, &["report", &job.to_string(), "--json"])?;
        ensure!(out.status.code() == Some(0), "ergon report: {}", show(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let from_report: JobRecord = serde_json::from_value(report["sacct_record"].clone())?;
        ensure!(from_report == rec, "report {from_report:?} vs sacct {rec:?}");
        let full = &report["manifests"];
        ensure!(
            full["gpu_j"].as_f64() == Some(gpu_j)
                && full["energy_j"].as_f64() == Some(m.totals.energy_j),
            "report manifests {full} vs manifest totals {:?}",
            m.totals
        );
        let job_hash = full["job_hash"].as_str().unwrap_or_default();
        ensure!(rec.hash == JobRecord::short_hash(job_hash), "{rec:?} vs {job_hash}");
        ensure!(
            !s.ergond.log_text().contains("cannot watch"),
            "ergond could not watch a step's cgroup"
        );
        Ok(())
    });
    println!("test took {:?}", t_test.elapsed());
}

#[test]
fn killed_ergond_job_still_completes_and_the_manifest_is_honest() {
    let t_test = Instant::now();
    let mut s = setup("chain-restart");
    s.run(|s| {
        let c = s.c;
        let (job, started, release) = s.held_job(&["--gres=gpu:1"])?;
        wait_for_file(&started, JOB_TIMEOUT)?;
        ensure!(
            matches!(
                s.ergond.request(&Request::QueryJob { job_id: job })?,
                Reply::Job(_)
            ),
            "ergond does not know the running job"
        );
        let index = allocated_gpu_indices(c, job)?[0];
        // Wait until the journal holds the job (it is written within 250 ms of a change).
        let known = std::time::SystemTime::now();
        let journal = s.dir.path().join("state/jobs.journal");
        wait_for(Duration::from_secs(5), "the journal to be written", || {
            Ok(std::fs::metadata(&journal)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > known)
                .then_some(()))
        })?;
        let t_kill = Instant::now();
        s.ergond.kill();
        s.ergond.spawn()?;
        let outage = t_kill.elapsed();
        std::fs::write(&release, b"")?;
        // Fail-open: the job completes, whatever happened to ergond.
        c.wait_completed(job)?;
        // The restarted ergond took the job back from the journal: the manifest is complete,
        // the outage is a gap whose energy was recovered from the GPU's counter.
        let (path, m) = s.ergond.wait_manifest(job, &c.node)?;
        println!(
            "manifest after restart: {} (outage {outage:?})",
            path.display()
        );
        ensure!(m.job.job_id == job, "{:?}", m.job);
        ensure!(
            m.coverage.gaps.len() == 1 && m.coverage.gaps[0].recovered,
            "the outage is not a recovered gap: {:?}",
            m.coverage
        );
        ensure!(m.coverage.fraction == 1.0, "{:?}", m.coverage);
        let secs = (m.end_unix_ns - m.start_unix_ns) as f64 / 1e9;
        let fake = s
            .gpus
            .iter()
            .find(|g| g.minor == minor_of(c, index))
            .unwrap();
        let truth = fake.watts * secs;
        let energy = m.gpus[0]
            .energy_j
            .ok_or_else(|| anyhow!("GPU not measured: {:?}", m.gpus))?;
        println!("GPU {energy:.2} J over {secs:.3} s (outage included), truth {truth:.2} J");
        // Bounded: the outage is measured by the counters at its two ends, read 10-20 ms
        // apart from the instants the gap's bounds name.
        ensure!(
            (energy - truth).abs() / truth < RESTART_TOLERANCE,
            "{energy} J vs {truth} J"
        );
        // The plugin sends the cluster's name with every event, so even a job whose start was
        // missed is named right (and `ergon run` can find it in sacct).
        ensure!(m.cluster == "ergon-dev", "cluster {:?}", m.cluster);
        Ok(())
    });
    println!("test took {:?}", t_test.elapsed());
}

/// ergond is down for a whole GPU job: the plugin queues every event; ergond, restarted after
/// the job, replays them: the job has its GPUs and its real start and end (Slurm's), and the
/// energy of the outage it fell in is split at them as an estimate with a stated bound.
#[test]
fn a_job_run_while_ergond_is_down_is_measured_from_its_queued_events() {
    let t_test = Instant::now();
    let mut s = setup("chain-queued");
    s.run(|s| {
        let c = s.c;
        // Let the journal hold ergond's last reading (written within 250 ms of the start).
        let journal = s.dir.path().join("state/jobs.journal");
        wait_for(Duration::from_secs(5), "the journal", || {
            Ok(journal.exists().then_some(()))
        })?;
        s.ergond.kill();
        let (job, started, release) = s.held_job(&["--gres=gpu:2"])?;
        wait_for_file(&started, JOB_TIMEOUT)?;
        let indices = allocated_gpu_indices(c, job)?;
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(&release, b"")?;
        c.wait_completed(job)?;
        // sacct says COMPLETED when the job ends, before the epilog (whose job_epilog hook
        // queues the end) has finished: the end is awaited.
        let mut queued = Vec::new();
        wait_for(
            Duration::from_secs(30),
            "the job's end in the queue",
            || {
                queued = c.queued_events()?;
                Ok(queued
                    .iter()
                    .any(|r| matches!(r, Request::JobEnd(e) if e.job_id == job))
                    .then_some(()))
            },
        )
        .with_context(|| format!("the job's end is not queued: {queued:?}"))?;
        s.ergond.spawn()?;
        let (_, m) = s.ergond.wait_manifest(job, &c.node)?;
        // Its GPUs, from the queued start.
        let mut want: Vec<u32> = indices.iter().map(|&i| minor_of(c, i)).collect();
        let mut got: Vec<u32> = m.gpus.iter().filter_map(|g| g.minor).collect();
        want.sort_unstable();
        got.sort_unstable();
        ensure!(got == want, "GPUs {got:?}, allocated minors {want:?}");
        ensure!(m.coverage.gpus_unknown.is_none(), "{:?}", m.coverage);
        // Its real start and end: Slurm's, to the second.
        let (start, end) = sacct_start_end(c, job)?;
        let near = |ns: u64, s: u64| (ns / 1_000_000_000).abs_diff(s) <= 1;
        ensure!(
            near(m.start_unix_ns, start) && near(m.end_unix_ns, end),
            "manifest {}..{} vs sacct {start}..{end}",
            m.start_unix_ns,
            m.end_unix_ns
        );
        // The energy: the GPUs' constant power over the job, within the stated bound.
        let secs = (m.end_unix_ns - m.start_unix_ns) as f64 / 1e9;
        let truth: f64 = want
            .iter()
            .map(|&minor| s.gpus.iter().find(|g| g.minor == minor).unwrap().watts * secs)
            .sum();
        let got_j = m
            .totals
            .gpu_j
            .ok_or_else(|| anyhow!("no GPU energy: {:?}", m.totals))?;
        let bound: f64 = m
            .coverage
            .gaps
            .iter()
            .filter_map(|g| g.estimate.map(|e| e.bound_j))
            .sum();
        println!("GPU {got_j:.1} J, truth {truth:.1} J, stated bound {bound:.1} J");
        ensure!(bound > 0.0 && m.attribution.estimated, "{:?}", m.coverage);
        ensure!((got_j - truth).abs() <= bound, "{got_j} J vs {truth} J");
        ensure!(c.queued_events()?.is_empty(), "the queue is drained");
        Ok(())
    });
    println!("test took {:?}", t_test.elapsed());
}

/// ergond restarts while a GPU job runs, and nothing was queued (the plugin's queue is off):
/// it finds the job in the cgroup tree and its GPUs in its processes' environment
/// (SLURM_JOB_GPUS mapped through gres.conf), never an empty list that looks CPU-only.
#[test]
fn a_job_found_running_after_a_restart_keeps_its_gpus() {
    let t_test = Instant::now();
    let mut s = setup("chain-found");
    s.run(|s| {
        let c = s.c;
        c.install_plugin(&format!("{} queue_dir=none", ergon_tests::PLUGIN_ARGS))?;
        s.ergond.kill();
        let (job, started, release) = s.held_job(&["--gres=gpu:2"])?;
        wait_for_file(&started, JOB_TIMEOUT)?;
        let indices = allocated_gpu_indices(c, job)?;
        s.ergond.spawn()?;
        ensure!(
            matches!(
                s.ergond.request(&Request::QueryJob { job_id: job })?,
                Reply::Job(_)
            ),
            "ergond did not find the running job"
        );
        std::thread::sleep(Duration::from_millis(1000));
        std::fs::write(&release, b"")?;
        c.wait_completed(job)?;
        let (_, m) = s.ergond.wait_manifest(job, &c.node)?;
        c.install_plugin(ergon_tests::PLUGIN_ARGS)?;
        let mut want: Vec<u32> = indices.iter().map(|&i| minor_of(c, i)).collect();
        let mut got: Vec<u32> = m.gpus.iter().filter_map(|g| g.minor).collect();
        want.sort_unstable();
        got.sort_unstable();
        ensure!(
            got == want,
            "GPUs {got:?}, allocated minors {want:?}: {:?}",
            m.coverage
        );
        ensure!(m.coverage.gpus_unknown.is_none(), "{:?}", m.coverage);
        ensure!(m.totals.gpu_j.is_some_and(|j| j > 0.0), "{:?}", m.totals);
        let gpu_cov = m.coverage.components.and_then(|c| c.gpu).unwrap_or(0.0);
        ensure!(gpu_cov > 0.0 && gpu_cov < 1.0, "{:?}", m.coverage);
        ensure!(
            m.coverage
                .gaps
                .iter()
                .any(|g| g.reason.contains("found the job in the cgroup tree")),
            "{:?}",
            m.coverage
        );
        Ok(())
    });
    println!("test took {:?}", t_test.elapsed());
}

/// The uid and gid of `user`.
fn ids_of(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        ensure!(out.status.success(), "id {flag} {user} failed");
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

#[test]
fn energy_report_is_written_as_the_user_and_never_through_a_symlink() {
    use std::os::unix::fs::MetadataExt;
    let t_test = Instant::now();
    let mut s = setup("chain-report");
    s.run(|s| {
        let c = s.c;
        let user = c.test_user.clone();
        let (uid, gid) = ids_of(&user)?;
        let home = s.dir.path().join("userdir");
        std::fs::create_dir_all(&home)?;
        std::os::unix::fs::chown(&home, Some(uid), Some(gid))?;
        let sbatch_as = |args: Vec<String>| -> Result<u32> {
            let mut all: Vec<String> = vec![
                "-u".into(),
                user.clone(),
                "--".into(),
                "sbatch".into(),
                "--parsable".into(),
                format!("--chdir={}", home.display()),
                "--time=5".into(),
            ];
            all.extend(args);
            let out = c.run("runuser", &all)?;
            let text = String::from_utf8(out.stdout)?;
            Ok(text.trim().split(';').next().unwrap_or_default().parse()?)
        };

        // 1. A text report lands at the end of the job's own stdout file, still the user's.
        let job = sbatch_as(vec![
            "--energy-report".into(),
            "--gres=gpu:1".into(),
            format!("--output={}", home.join("slurm-%j.out").display()),
            "--wrap".into(),
            "echo hello from the job; sleep 1".into(),
        ])?;
        c.wait_completed(job)?;
        let (_, m) = s.ergond.wait_manifest(job, &c.node)?;
        let out = home.join(format!("slurm-{job}.out"));
        let text = wait_for(
            Duration::from_secs(15),
            "the report in the job's stdout",
            || {
                let t = std::fs::read_to_string(&out).unwrap_or_default();
                Ok(t.contains("ergon energy report").then_some(t))
            },
        )?;
        println!("{text}");
        ensure!(text.starts_with("hello from the job\n"), "{text}");
        ensure!(text.contains(&format!("job {job} on {}", c.node)), "{text}");
        ensure!(
            m.gpus.len() == 1 && text.contains(&m.gpus[0].uuid),
            "the report does not name the job's GPU {:?}:\n{text}",
            m.gpus
        );
        let md = std::fs::metadata(&out)?;
        ensure!(
            (md.uid(), md.gid()) == (uid, gid),
            "owner {}:{}",
            md.uid(),
            md.gid()
        );
        ensure!(!home.join(format!("ergon-{job}.txt")).exists());

        // The user reads the job's energy with `ergon report`, as themself (no root): from the
        // manifest in the spool (sacct has no record before `ergon run`).
        let config = home.join("accounting.toml");
        std::fs::write(
            &config,
            format!(
                "spool_dirs = [{:?}]\nstate_dir = {:?}\n",
                s.ergond.spool.display().to_string(),
                home.join("state").display().to_string()
            ),
        )?;
        let bin = target_dir().join("debug/ergon");
        let out = c
            .cmd("runuser")
            .args(["-u", &user, "--"])
            .arg(&bin)
            .arg("--config")
            .arg(&config)
            .args(["report", &job.to_string(), "--json"])
            .output()?;
        ensure!(
            out.status.success(),
            "ergon report as {user}: {}",
            show(&out)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| show(&out))?;
        let reported = v["manifests"]["energy_j"].as_f64().unwrap_or(-1.0);
        ensure!(
            (reported - m.totals.energy_j).abs() < 1e-6 * m.totals.energy_j.max(1.0),
            "ergon report as {user} says {reported} J, the manifest {} J: {}",
            m.totals.energy_j,
            show(&out)
        );

        // 2. A JSON report whose file is a symlink to a root-owned file: nothing is written
        // through it, and ergond says why.
        let victim = s.dir.path().join("victim");
        std::fs::write(&victim, b"root's file\n")?;
        let job2 = sbatch_as(vec![
            "--hold".into(),
            "--energy-report=json".into(),
            "--output=/dev/null".into(),
            "--wrap".into(),
            "true".into(),
        ])?;
        let link = home.join(format!("ergon-{job2}.json"));
        std::os::unix::fs::symlink(&victim, &link)?;
        c.run("scontrol", ["release", &job2.to_string()])?;
        c.wait_completed(job2)?;
        s.ergond.wait_manifest(job2, &c.node)?;
        let needle = format!("job_id={job2}");
        wait_for(
            Duration::from_secs(15),
            "ergond to refuse the report",
            || {
                Ok(s.ergond
                    .log_text()
                    .lines()
                    .any(|l| l.contains("energy report not written") && l.contains(&needle))
                    .then_some(()))
            },
        )?;
        ensure!(
            std::fs::read(&victim)? == b"root's file\n",
            "written through the symlink"
        );
        ensure!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());

        // 3. The tasks of an array share a working directory: each task's report has a name of
        // its own, `ergon-<array job id>_<task id>.json` (Slurm's `%A_%a`), the user's.
        let array = sbatch_as(vec![
            "--array=1-2".into(),
            "--energy-report=json".into(),
            "--output=/dev/null".into(),
            "--wrap".into(),
            "true".into(),
        ])?;
        for t in array_tasks(c, array, 2)? {
            c.wait_completed(t)?;
            let (_, m) = s.ergond.wait_manifest(t, &c.node)?;
            let task = m
                .job
                .array_task_id
                .ok_or_else(|| anyhow!("task {t}: no task id"))?;
            let path = home.join(format!("ergon-{array}_{task}.json"));
            let text = wait_for(
                Duration::from_secs(15),
                &format!("{}", path.display()),
                || {
                    Ok(std::fs::read_to_string(&path)
                        .ok()
                        .filter(|t| !t.is_empty()))
                },
            )?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: {text}", path.display()))?;
            ensure!(
                v.to_string().contains(&format!("\"job_id\":{t}")),
                "{} is not task {t}'s report: {text}",
                path.display()
            );
            let meta = std::fs::metadata(&path)?;
            ensure!(
                (meta.uid(), meta.gid()) == (uid, gid),
                "{} is {}:{}, not the user's",
                path.display(),
                meta.uid(),
                meta.gid()
            );
        }
        ensure!(
            !home.join(format!("ergon-{array}.json")).exists(),
            "an array task's report under the array's bare id"
        );
        Ok(())
    });
    println!("test took {:?}", t_test.elapsed());
}

/// The job ids of an array's tasks (sacct's JobIDRaw), once sacct lists them all.
fn array_tasks(c: &Cluster, array: u32, n: usize) -> Result<Vec<u32>> {
    wait_for(
        Duration::from_secs(60),
        "sacct to list the array's tasks",
        || {
            let out = c.run(
                "sacct",
                ["-X", "-n", "-P", "-j", &array.to_string(), "-o", "JobIDRaw"],
            )?;
            let ids: Vec<u32> = String::from_utf8(out.stdout)?
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            Ok((ids.len() == n).then_some(ids))
        },
    )
}

/// `job cgroup CPU time X s` from the manifest's cgroup sensor.
fn cgroup_cpu_s(m: &Manifest) -> Result<f64> {
    let s = m
        .sensors
        .iter()
        .find(|s| s.kind == ergon_protocol::manifest::SensorKind::Cgroup)
        .ok_or_else(|| anyhow!("no cgroup sensor: {:?}", m.sensors))?;
    let v = s
        .detail
        .split("job cgroup CPU time ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no CPU time in {:?}", s.detail))?;
    Ok(v)
}

#[test]
fn short_array_and_multi_step_jobs_are_measured() {
    let t_test = Instant::now();
    let mut s = setup("chain-kinds");
    s.run(|s| {
        let c = s.c;
        let dir = s.dir.path().display().to_string();
        let common = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec![
                "--time=5".into(),
                "--output=/dev/null".into(),
                format!("--chdir={dir}"),
            ];
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        // A one-second GPU job: its energy is the GPU's power over exactly its interval.
        let short = c.sbatch(common(&["--gres=gpu:1", "--wrap", "sleep 1"]))?;
        // A job array of three tasks.
        let array = c.sbatch(common(&["--array=1-3", "--wrap", "sleep 0.2"]))?;
        // A job with two srun steps.
        let multi = c.sbatch(common(&[
            "--gres=gpu:1",
            "--wrap",
            "srun -n1 true; srun -n1 sleep 0.5",
        ]))?;

        c.wait_completed(short)?;
        let (_, m) = s.ergond.wait_manifest(short, &c.node)?;
        let secs = (m.end_unix_ns - m.start_unix_ns) as f64 / 1e9;
        ensure!((0.8..5.0).contains(&secs), "a 1 s job lasted {secs} s");
        let g = &m.gpus[0];
        let fake = s.gpus.iter().find(|f| f.uuid == g.uuid).unwrap();
        let (energy, truth) = (g.energy_j.unwrap_or(0.0), fake.watts * secs);
        println!("1-second job: {energy:.3} J over {secs:.3} s, truth {truth:.3} J");
        // Within one counter update at each end: the fake counter moves in 20 ms steps, and the
        // readings at the two events are interpolated between samples of it.
        let bound = 2.0 * fake.watts * COUNTER_PERIOD_MS / 1000.0;
        ensure!(
            (energy - truth).abs() <= bound,
            "{energy} vs {truth} (bound {bound} J)"
        );
        ensure!(m.coverage.fraction == 1.0, "{:?}", m.coverage);

        let tasks = array_tasks(c, array, 3)?;
        let mut seen = Vec::new();
        for t in &tasks {
            c.wait_completed(*t)?;
            let (_, m) = s.ergond.wait_manifest(*t, &c.node)?;
            ensure!(
                m.job.array_job_id == Some(array),
                "task {t}: array id {:?}, expected {array}",
                m.job.array_job_id
            );
            seen.push(
                m.job
                    .array_task_id
                    .ok_or_else(|| anyhow!("task {t}: no task id"))?,
            );
            ensure!(
                m.totals.cpu_j.is_some(),
                "task {t}: no CPU energy {:?}",
                m.totals
            );
        }
        seen.sort_unstable();
        ensure!(seen == vec![1, 2, 3], "array task ids {seen:?}");

        c.wait_completed(multi)?;
        let (_, m) = s.ergond.wait_manifest(multi, &c.node)?;
        let steps: Vec<StepId> = m.steps.iter().map(|s| s.step).collect();
        for want in [StepId::Batch, StepId::Numbered(0), StepId::Numbered(1)] {
            ensure!(steps.contains(&want), "step {want} missing: {steps:?}");
        }
        let g = &m.gpus[0];
        let watts = s.gpus.iter().find(|f| f.uuid == g.uuid).unwrap().watts;
        for st in &m.steps {
            let secs = (st.end_unix_ns - st.start_unix_ns) as f64 / 1e9;
            let gpu = st
                .gpu_j
                .ok_or_else(|| anyhow!("step {} has no GPU energy", st.step))?;
            println!("step {}: {gpu:.3} J over {secs:.3} s", st.step);
            ensure!(
                (gpu - watts * secs).abs() <= 0.01 * watts * secs + watts * 0.02,
                "step {}: {gpu} J over {secs} s at {watts} W",
                st.step
            );
            ensure!(
                st.energy_j <= m.totals.energy_j + 1e-6,
                "{st:?} > {:?}",
                m.totals
            );
        }
        Ok(())
    });
    println!("test took {:?}", t_test.elapsed());
}

#[test]
fn two_jobs_sharing_the_node_split_cpu_energy_by_cpu_time() {
    let t_test = Instant::now();
    let mut s = setup_with("chain-share", "[attribution]\ncpu_idle = \"node_idle\"\n");
    s.run(|s| {
        let c = s.c;
        let dir = s.dir.path().display().to_string();
        let job = |script: &str| -> Result<u32> {
            c.sbatch([
                "--time=5".to_string(),
                "-c1".into(),
                "--output=/dev/null".into(),
                format!("--chdir={dir}"),
                "--wrap".into(),
                script.into(),
            ])
        };
        let before = s.ergond.scrape()?;
        // A keeps one CPU busy for 3 s; B for 1 s, then sleeps 2 s.
        let a = job("timeout 3 sh -c 'while :; do :; done'; true")?;
        let b = job("timeout 1 sh -c 'while :; do :; done'; sleep 2")?;
        c.wait_completed(a)?;
        c.wait_completed(b)?;
        let (_, ma) = s.ergond.wait_manifest(a, &c.node)?;
        let (_, mb) = s.ergond.wait_manifest(b, &c.node)?;
        let (ta, tb) = (cgroup_cpu_s(&ma)?, cgroup_cpu_s(&mb)?);
        let (ea, eb) = (
            ma.totals.cpu_j.ok_or_else(|| anyhow!("A: no CPU energy"))?,
            mb.totals.cpu_j.ok_or_else(|| anyhow!("B: no CPU energy"))?,
        );
        println!("A: {ta:.3} CPU-s, {ea:.2} J; B: {tb:.3} CPU-s, {eb:.2} J");
        ensure!(
            ta / tb > 1.8,
            "the jobs' CPU times are too close to tell: {ta} vs {tb}"
        );
        // Jobs pay for their CPU time only (node_idle): the energies stand as the CPU times.
        let (re, rt) = (ea / eb, ta / tb);
        ensure!(
            (re / rt - 1.0).abs() < 0.25,
            "energy ratio {re:.3} vs CPU-time ratio {rt:.3}"
        );
        // Conservation, node-wide over the run: every joule measured is in a job, idle or
        // unattributed, and the running check reports no error.
        let after = s.ergond.scrape()?;
        let value = |text: &str, name: &str, labels: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains(labels))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        for comp in ["cpu", "dram", "gpu"] {
            let d = |bucket: &str| {
                let l = format!("component=\"{comp}\",bucket=\"{bucket}\"");
                value(&after, "ergon_attribution_energy_joules_total", &l)
                    - value(&before, "ergon_attribution_energy_joules_total", &l)
            };
            let (m, j, i, u) = (d("measured"), d("jobs"), d("idle"), d("unattributed"));
            ensure!(
                (m - (j + i + u)).abs() < 1e-6 * m.max(1.0),
                "{comp}: measured {m} J vs jobs {j} + idle {i} + unattributed {u}"
            );
            if comp == "cpu" {
                ensure!(
                    j + 1e-6 >= ea + eb,
                    "{comp}: jobs bucket {j} J < A + B {}",
                    ea + eb
                );
            }
        }
        let err = value(&after, "ergon_attribution_conservation_error_joules", "");
        ensure!(err.abs() < 1e-3, "conservation error {err} J");
        Ok(())
    });
    println!("test took {:?}", t_test.elapsed());
}

fn restart_slurmd() -> Result<()> {
    let out = Command::new(ergon_tests::repo_root().join("scripts/slurm-cluster"))
        .arg("restart-slurmd")
        .output()?;
    ensure!(
        out.status.success(),
        "restart-slurmd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Puts the cluster's gres.conf back, removes the fake capability devices and restarts slurmd
/// when dropped (also when the test fails).
struct RestoreGres {
    gres_conf: PathBuf,
    original: String,
    caps: Vec<PathBuf>,
}

impl Drop for RestoreGres {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.gres_conf, &self.original);
        for c in &self.caps {
            let _ = std::fs::remove_file(c);
        }
        if let Err(e) = restart_slurmd() {
            eprintln!("could not restore slurmd: {e:#}");
        }
    }
}

/// MIG through the whole chain. The GPU behind `dev/fakegpu0` (device minor 6) is in MIG mode
/// in the fake NVML: GPU instances 1 (3 of 7 slices), 2 (2 slices) and 5 (1 slice). gres.conf
/// is rewritten so that the node's four GPUs are GI 1 and GI 2 of it (`MultipleFiles=` with
/// fake nvidia-caps devices, named in a mig-minors fixture) and the whole GPUs fakegpu1 and
/// fakegpu2; slurmd is restarted, and everything is put back at the end. Two jobs with
/// `--gres=gpu:1` run at once on the two instances: each manifest names its instance and
/// charges it its slices of the board (3/7 and 2/7 of its constant power), never the board.
#[test]
fn two_jobs_on_mig_instances_of_one_gpu_get_their_slices_of_it() {
    let dev = cluster().dir.join("dev");
    let mig_minor = minor_of(cluster(), 0);
    let mut s = setup_gpus("chain-mig", "", |gpus| {
        let g = gpus.iter_mut().find(|g| g.minor == mig_minor).unwrap();
        g.mig = Some(serde_json::json!({"total_slices": 7, "instances": [
            {"gi": 1, "ci": 0, "slices": 3, "uuid": "MIG-00000000-0000-4000-8000-0000000000c1"},
            {"gi": 2, "ci": 0, "slices": 2, "uuid": "MIG-00000000-0000-4000-8000-0000000000c2"},
            {"gi": 5, "ci": 0, "slices": 1, "uuid": "MIG-00000000-0000-4000-8000-0000000000c5"},
        ]}));
    });
    let board_w = s.gpus.iter().find(|g| g.minor == mig_minor).unwrap().watts;
    let gres_conf = s.c.dir.join("etc/gres.conf");
    let caps: Vec<PathBuf> = [21, 22, 30, 31]
        .iter()
        .map(|n| dev.join(format!("nvidia-cap{n}")))
        .collect();
    let restore = RestoreGres {
        gres_conf: gres_conf.clone(),
        original: std::fs::read_to_string(&gres_conf).unwrap(),
        caps: caps.clone(),
    };
    s.run(|s| {
        let c = s.c;
        for (path, minor) in caps.iter().zip([21, 22, 30, 31]) {
            let _ = std::fs::remove_file(path);
            let out = Command::new("mknod")
                .arg(path)
                .args(["c", "236", &minor.to_string()])
                .output()?;
            ensure!(out.status.success(), "mknod {}", path.display());
        }
        let mig_minors = s.dir.path().join("mig-minors");
        std::fs::write(
            &mig_minors,
            format!(
                "config 1\nmonitor 2\n\
                 gpu{mig_minor}/gi1/access 21\ngpu{mig_minor}/gi1/ci0/access 22\n\
                 gpu{mig_minor}/gi2/access 30\ngpu{mig_minor}/gi2/ci0/access 31\n"
            ),
        )?;
        let d = dev.display();
        std::fs::write(
            &gres_conf,
            format!(
                "AutoDetect=off\n\
                 Name=gpu MultipleFiles={d}/fakegpu0,{d}/nvidia-cap21,{d}/nvidia-cap22\n\
                 Name=gpu MultipleFiles={d}/fakegpu0,{d}/nvidia-cap30,{d}/nvidia-cap31\n\
                 Name=gpu File={d}/fakegpu[1-2]\n"
            ),
        )?;
        c.install_plugin(&format!(
            "{} mig_minors={}",
            ergon_tests::PLUGIN_ARGS,
            mig_minors.display()
        ))?;
        restart_slurmd()?;

        // Two jobs holding one GPU each, both running at once.
        let release = s.dir.path().join("release");
        let mut jobs = Vec::new();
        for k in 0..2 {
            let started = s.dir.path().join(format!("started-{k}"));
            let script = format!(
                "echo SLURM_JOB_GPUS=$SLURM_JOB_GPUS; touch {s}; while [ ! -e {r} ]; do sleep 0.05; done",
                s = started.display(),
                r = release.display()
            );
            let out = s.dir.path().join(format!("job-{k}.out"));
            let job = c.sbatch([
                "--gres=gpu:1",
                "--time=5",
                &format!("--output={}", out.display()),
                "--wrap",
                &script,
            ])?;
            wait_for_file(&started, JOB_TIMEOUT)?;
            jobs.push((job, out));
        }
        let mut indices: Vec<u32> = Vec::new();
        for (job, _) in &jobs {
            indices.extend(allocated_gpu_indices(c, *job)?);
        }
        indices.sort_unstable();
        ensure!(indices == [0, 1], "Slurm gave the jobs GPUs {indices:?}, not the two MIG instances");
        std::thread::sleep(Duration::from_secs(2));
        std::fs::write(&release, b"")?;
        let mut seen = Vec::new();
        for (job, out) in &jobs {
            c.wait_completed(*job)?;
            let (_, m) = s.ergond.wait_manifest(*job, &c.node)?;
            let text = std::fs::read_to_string(out).unwrap_or_default();
            ensure!(m.gpus.len() == 1, "job {job}: {:?}\n{text}", m.gpus);
            let g = &m.gpus[0];
            let mig = g
                .mig
                .as_ref()
                .ok_or_else(|| anyhow!("job {job}: no MIG instance in {g:?}\n{text}"))?;
            // Schema 5: the plugin gave the job's nodes (this node).
            ensure!(
                m.schema_version == ergon_protocol::MANIFEST_SCHEMA_VERSION_NODES
                    && m.job.node_list.as_deref() == Some(c.node.as_str()),
                "schema {} node list {:?}",
                m.schema_version,
                m.job.node_list
            );
            ensure!(g.minor == Some(mig_minor) && g.shared, "{g:?}");
            ensure!(
                mig.total_slices == 7
                    && mig.share_method == ergon_protocol::MigShareMethod::SliceSize
                    && mig.instances.len() == 1,
                "{mig:?}"
            );
            let gi = mig.instances[0].gpu_instance_id;
            let slices = match gi {
                1 => 3.0,
                2 => 2.0,
                other => bail!("job {job} charged for GPU instance {other}"),
            };
            ensure!(mig.instances[0].slices == Some(slices as u32), "{mig:?}");
            let want_w = board_w * slices / 7.0;
            let got_w = g.energy_j.unwrap_or(f64::NAN) / m.duration_s;
            println!("job {job}: GI {gi}, {got_w:.2} W of the board's {board_w} W (expected {want_w:.2})");
            ensure!(
                (got_w / want_w - 1.0).abs() < ENERGY_TOLERANCE * 2.0,
                "job {job} (GI {gi}): {got_w} W, expected {want_w} W"
            );
            seen.push(gi);
        }
        seen.sort_unstable();
        ensure!(seen == [1, 2], "instances charged: {seen:?}");
        Ok(())
    });
    // gres.conf and slurmd back, and the plugin's usual arguments, before the next test may
    // take the lock.
    drop(restore);
    cluster().install_plugin(ergon_tests::PLUGIN_ARGS).unwrap();
    drop(s);
}

/// Runs `args` (the program first) as `user` in `dir` with a pseudo-terminal as its standard
/// input, output and error and controlling terminal, as a person at a terminal would; returns everything written to the
/// terminal once the program exits (within `timeout`).
fn on_a_terminal(
    c: &Cluster,
    user: &str,
    dir: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<String> {
    use std::os::fd::OwnedFd;
    let pty = nix::pty::openpty(None, None)?;
    let slave = |fd: &OwnedFd| -> Result<Stdio> { Ok(Stdio::from(fd.try_clone()?)) };
    // setsid -c: a session of its own with the terminal as its controlling terminal (salloc
    // wants one for its shell handling); runuser, this release's, runs the program as `user`.
    let mut child = c
        .cmd("setsid")
        .arg("-c")
        .arg(c.program("runuser"))
        .args(["-u", user, "--"])
        .args(args)
        .current_dir(dir)
        .stdin(slave(&pty.slave)?)
        .stdout(slave(&pty.slave)?)
        .stderr(slave(&pty.slave)?)
        .spawn()
        .context("starting runuser")?;
    drop(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once every holder of the terminal's other side has closed it.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let status = wait_for(timeout, &format!("{args:?} to exit"), || {
        Ok(child.try_wait()?)
    })?;
    let out = String::from_utf8_lossy(&reader.join().map_err(|_| anyhow!("reader panicked"))?)
        .replace("\r\n", "\n");
    ensure!(status.success(), "{args:?} failed ({status}):\n{out}");
    Ok(out)
}

/// A person at a terminal who typed `srun --energy-report …` or `salloc --energy-report …`
/// sees the job's report there when the job ends: the same figures as its manifest, once
/// (an `srun` inside the `salloc` allocation prints none of its own).
#[test]
fn interactive_srun_and_salloc_show_the_report_on_the_terminal() {
    let mut s = setup("chain-interactive");
    s.run(|s| {
        let c = s.c;
        let user = c.test_user.clone();
        let (uid, gid) = ids_of(&user)?;
        let home = s.dir.path().join("userdir");
        std::fs::create_dir_all(&home)?;
        std::os::unix::fs::chown(&home, Some(uid), Some(gid))?;
        let cases: [&[&str]; 2] = [
            &[
                "srun",
                "--energy-report",
                "--gres=gpu:1",
                "--time=5",
                "sleep",
                "2",
            ],
            &[
                "salloc",
                "--energy-report",
                "--gres=gpu:1",
                "--time=5",
                "srun",
                "sleep",
                "2",
            ],
        ];
        for args in cases {
            let text = on_a_terminal(c, &user, &home, args, Duration::from_secs(90))?;
            println!("{args:?} printed:\n{text}");
            let header = "==== ergon energy report: job ";
            ensure!(
                text.matches(header).count() == 1,
                "{args:?}: the terminal shows the report {} times:\n{text}",
                text.matches(header).count()
            );
            let after = &text[text.find(header).unwrap() + header.len()..];
            let job: u32 = after
                .split_whitespace()
                .next()
                .and_then(|id| id.parse().ok())
                .with_context(|| format!("no job id after {header:?}:\n{text}"))?;
            ensure!(
                after.starts_with(&format!("{job} on {} ", c.node)),
                "{text}"
            );
            let (_, m) = s.ergond.wait_manifest(job, &c.node)?;
            ensure!(m.job.user == user, "user {:?}", m.job.user);
            ensure!(
                m.gpus.len() == 1 && text.contains(&m.gpus[0].uuid),
                "the terminal does not name the job's GPU {:?}:\n{text}",
                m.gpus
            );
            let energy = format!(
                "Energy     {}",
                ergon_protocol::format::energy(m.totals.energy_j)
            );
            ensure!(
                text.contains(&energy),
                "{energy:?} not on the terminal:\n{text}"
            );
            // The file it came from stays where it was, the user's.
            let files =
                spank_ergon::terminal::report_files(&home, job, ergon_protocol::ReportFormat::Text);
            ensure!(files.len() == 1, "{files:?}");
        }
        Ok(())
    });
}

#[test]
fn an_idle_gpu_throttling_and_xids_are_reported_end_to_end() {
    // Slurm's GPU 0 is busy (90 %) and has an Xid 79 every second; the others sit idle (1 %);
    // every GPU is held at its power cap 30 % of the time.
    let busy_minor = minor_of(cluster(), 0);
    let mut s = setup_gpus("gpueff", "[report]\nidle_gpu_util_percent = 5\n", |gpus| {
        for g in gpus.iter_mut() {
            let busy = g.minor == busy_minor;
            let xids: Vec<serde_json::Value> = if busy {
                (1..=600)
                    .map(|k| serde_json::json!({"at_s": f64::from(k), "xid": 79}))
                    .collect()
            } else {
                Vec::new()
            };
            g.extra = Some(serde_json::json!({
                "utilization": if busy { 90 } else { 1 },
                "memory_used_bytes": if busy { 40_000_000_000u64 } else { 500_000_000 },
                "temperature_c": if busy { 75 } else { 40 },
                "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
                "throttle": {"power_cap": 0.3, "hw_thermal": 0.0},
                "ecc": {"corrected": 0, "uncorrected": 0},
                "xids": xids,
            }));
        }
    });
    s.run(|s| {
        let c = s.c;
        let (job, started, release) = s.held_job(&["--gres=gpu:2"])?;
        wait_for_file(&started, JOB_TIMEOUT)?;
        let indices = allocated_gpu_indices(c, job)?;
        ensure!(indices.len() == 2, "Slurm allocated {indices:?}");
        // While it runs, /metrics has the GPUs' utilisation and the job's.
        wait_for(Duration::from_secs(10), "the job's GPU utilisation in /metrics", || {
            let m = s.ergond.scrape()?;
            Ok((m.contains("ergon_gpu_utilization_ratio{gpu=")
                && m.contains(&format!("ergon_job_gpu_utilization_ratio{{job_id=\"{job}\"}}")))
            .then_some(()))
        })?;
        std::thread::sleep(Duration::from_secs(4));
        std::fs::write(&release, b"")?;
        c.wait_completed(job)?;
        let (_, m) = s.ergond.wait_manifest(job, &c.node)?;
        ensure!(m.schema_version == 6, "schema {}", m.schema_version);
        let secs = m.duration_s;
        let mut idle_j = 0.0;
        let mut idle_names = Vec::new();
        for g in &m.gpus {
            let e = g
                .efficiency
                .as_ref()
                .ok_or_else(|| anyhow!("GPU {} has no efficiency figures", g.index))?;
            let busy = g.minor == Some(busy_minor);
            let util = e.sm_util_avg_pct.ok_or_else(|| anyhow!("{e:?}"))?;
            ensure!(
                (util - if busy { 90.0 } else { 1.0 }).abs() < 0.01 && e.idle == Some(!busy),
                "GPU {}: {e:?}",
                g.index
            );
            let cap = e.throttle_s.power_cap.ok_or_else(|| anyhow!("{e:?}"))?;
            ensure!((cap - 0.3 * secs).abs() < 0.3, "power cap {cap} s over {secs} s");
            ensure!(e.throttle_s.hw_thermal == Some(0.0), "{e:?}");
            ensure!(e.throttle_s.sw_thermal.is_none(), "not scripted: {e:?}");
            ensure!(e.ecc_uncorrected == Some(0), "{e:?}");
            let xids = e.xid_count.ok_or_else(|| anyhow!("Xids not reported: {e:?}"))?;
            if busy {
                // One a second, those that arrived while the job ran.
                ensure!(
                    (xids as f64 - secs).abs() <= 2.0,
                    "{xids} Xids over {secs} s: {e:?}"
                );
                let list = e.xids.as_ref().unwrap();
                ensure!(
                    list.iter().all(|x| x.xid == 79
                        && (m.start_unix_ns..=m.end_unix_ns).contains(&x.at_unix_ns)),
                    "{list:?}"
                );
                ensure!(e.memory_used_max_bytes == Some(40_000_000_000), "{e:?}");
                ensure!(e.temperature_max_c == Some(75), "{e:?}");
            } else {
                ensure!(xids == 0, "{e:?}");
                idle_j += g.energy_j.unwrap_or(0.0);
                idle_names.push(format!("gpu{}", g.index));
            }
        }
        let busy_held = indices.contains(&0);
        ensure!(
            idle_names.len() == if busy_held { 1 } else { 2 },
            "idle {idle_names:?} of {indices:?}"
        );

        // The user's report (--energy-report, stdout /dev/null: a file in the job's directory).
        let report_path = s.dir.path().join(format!("ergon-{job}.txt"));
        wait_for_file(&report_path, Duration::from_secs(30))?;
        let report = std::fs::read_to_string(&report_path)?;
        println!("{report}");
        for name in &idle_names {
            ensure!(
                report.contains(&format!("{name}: 1 % average SM utilisation")),
                "{name} not named idle:\n{report}"
            );
        }
        ensure!(
            report.contains(&format!(
                "{} of the job's",
                ergon_protocol::format::energy(idle_j)
            )) && report.contains("went to allocated GPUs that sat idle"),
            "idle energy {idle_j} J not in:\n{report}"
        );
        ensure!(report.contains("power cap"), "{report}");

        // The accounting: the sacct record's keys and `ergon report`.
        let acct = s.dir.path().join("accounting.toml");
        std::fs::write(
            &acct,
            format!(
                "spool_dirs = [{:?}]\nquarantine_dir = {:?}\nstate_dir = {:?}\nsettle_s = 0\n\n[sacct]\n",
                s.ergond.spool,
                s.dir.path().join("quarantine"),
                s.dir.path().join("acct-state"),
            ),
        )?;
        let out = ergon(c, &acct, &["run"])?;
        ensure!(out.status.code() == Some(0), "ergon run: {}", show(&out));
        let field = c.sacct_field(job, "AdminComment")?.unwrap_or_default();
        let rec = ergon_protocol::find_in_field(&field)
            .ok_or_else(|| anyhow!("no ergon1 record in AdminComment {field:?}"))?
            .map_err(|e| anyhow!("AdminComment {field:?}: {e}"))?;
        println!("AdminComment: {field}");
        ensure!(
            rec.gpu_idle_j == Some(idle_j.round() as u64),
            "{rec:?} vs idle {idle_j} J"
        );
        ensure!(
            rec.xid_events.is_some_and(|n| n >= 1) == busy_held,
            "{rec:?}"
        );
        ensure!(rec.gpu_throttle_s.is_some_and(|t| t > 0.0), "{rec:?}");
        let out = ergon(c, &acct, &["report", &job.to_string()])?;
        ensure!(out.status.code() == Some(0), "ergon report: {}", show(&out));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        println!("{text}");
        ensure!(text.contains("gpu use") && text.contains("on idle GPUs"), "{text}");
        ensure!(text.contains("idle GPUs") && text.contains("throttled"), "{text}");
        if busy_held {
            ensure!(text.contains("Xid event(s): 79"), "{text}");
        }
        Ok(())
    });
}
